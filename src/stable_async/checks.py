"""Argument checks shared by the public API: one rule per kind of value, one message style.

Every check names the argument and states what was expected, e.g.
``eps_low: expected a finite number in [0, 1), got 1.5``. A ``bool`` is never a number and a
number or a string is never a flag (``"false"`` is truthy in Python; here it is an error).

Wrong types raise `ArgumentTypeError`, a `TypeError` that is also a `ValueError`, so code that
catches ``ValueError`` for every bad argument keeps working; wrong values raise ``ValueError``.

Masks follow one rule everywhere (`PolicyBatch`, `stable_async.aggregate`, ESS, baselines):
a ``bool`` tensor, or a real tensor whose every entry is exactly 0 or 1; anything else
(0.5, 2, −1) is an error, never ``.bool()``-ed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import torch

LOGPROB_TOLERANCE = 1e-4
"""A log-probability may exceed 0 by at most this much (fp32/bf16 log-softmax rounding)."""

PROBABILITY_MASS_TOLERANCE = 1e-3
"""A top-K probability mass Σ_k exp(log p_k) may exceed 1 by at most this much."""


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (a `TypeError`, and a `ValueError` for callers that catch that)."""


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is None and high is None:
        return ""
    if high is None:
        return f" {'>' if low_open else '>='} {low:g}"
    if low is None:
        return f" {'<' if high_open else '<='} {high:g}"
    return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    finite: bool = True,
) -> float:
    """``value`` as a float after checking it is a real number (not a bool) in the interval.

    Args:
        name: the argument's name, for the message.
        low, high: bounds (None: unbounded); ``low_open`` / ``high_open`` exclude them.
        integer: the value must be integral (``3`` or ``3.0``; a Python or NumPy int is fine).
        finite: NaN and ±inf are errors (default). With ``finite=False`` only NaN is.

    A one-element tensor is accepted (its value is read with one host sync).
    """
    kind = "an integer" if integer else "a finite number" if finite else "a number"
    expected = f"{kind}{_interval(low, high, low_open, high_open)}"
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        if value.dtype == torch.bool:
            raise ArgumentTypeError(f"{name}: expected {expected}, got a bool tensor")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name}: expected {expected}, got {type(value).__name__} {value!r}")
    number = float(value)
    if math.isnan(number) or (finite and math.isinf(number)):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    if integer and not (math.isfinite(number) and number == math.floor(number)):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    if low is not None and (number < low or (low_open and number == low)):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    if high is not None and (number > high or (high_open and number == high)):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return number


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int: a Python/NumPy integer (not a bool, not a float) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        interval = _interval(low, high, False, False)
        raise ArgumentTypeError(f"{name}: expected an int{interval}, got {type(value).__name__} {value!r}")
    return int(check_number(name, value, low=low, high=high, integer=True))


def check_optional_number(name: str, value: Any, **bounds: Any) -> float | None:
    """None, or `check_number` of ``value``."""
    return None if value is None else check_number(name, value, **bounds)


def check_flag(name: str, value: Any) -> bool:
    """``value`` if it is a ``bool`` (NumPy bools too); ``"false"``, 0 and 1 are errors."""
    if isinstance(value, bool):
        return value
    if type(value).__name__ == "bool_" and type(value).__module__ == "numpy":
        return bool(value)
    raise ArgumentTypeError(f"{name}: expected True or False, got {type(value).__name__} {value!r}")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices`` (compared by type and value: ``True`` is not ``1``)."""
    options = tuple(choices)
    if not any(type(value) is type(c) and value == c for c in options):
        raise ValueError(f"{name}: expected one of {list(options)}, got {value!r}")
    return value


def check_str(name: str, value: Any) -> str:
    """``value`` if it is a ``str``."""
    if not isinstance(value, str):
        raise ArgumentTypeError(f"{name}: expected a str, got {type(value).__name__} {value!r}")
    return value


def check_tensor(
    name: str,
    value: Any,
    *,
    floating: bool = False,
    device: torch.device | None = None,
    shape: tuple[int, ...] | None = None,
    what: str = "",
) -> torch.Tensor:
    """``value`` if it is a real (not a meta) tensor, floating if asked, on ``device``, of ``shape``."""
    if not isinstance(value, torch.Tensor):
        raise ArgumentTypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if device is not None and value.device != device:
        raise ValueError(f"{name}: expected device {device}{what and f' ({what})'}, got {value.device}")
    if value.is_meta:
        raise ValueError(f"{name}: expected a tensor with data, got a meta tensor (shape {tuple(value.shape)})")
    if floating and not value.dtype.is_floating_point:
        raise ArgumentTypeError(f"{name}: expected a floating tensor, got dtype {value.dtype}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}{what and f' ({what})'}, got {tuple(value.shape)}")
    return value


def check_mask(
    name: str,
    mask: Any,
    *,
    shape: tuple[int, ...] | None = None,
    device: torch.device | None = None,
    what: str = "",
) -> torch.Tensor:
    """``mask`` as a bool tensor: bool, or a real tensor of exact 0/1 values (one host sync).

    A fractional or out-of-range entry (0.5, 2, −1, NaN) is an error, not a truthy value.
    """
    mask = check_tensor(name, mask, device=device, shape=shape, what=what)
    if mask.dtype == torch.bool:
        return mask
    if mask.dtype.is_complex:
        raise ArgumentTypeError(f"{name}: expected a bool or 0/1 tensor, got dtype {mask.dtype}")
    nonzero = mask != 0
    # 0/1 values iff every nonzero entry is 1: two counts instead of a full-size 0-or-1 test.
    if mask.numel() and int((mask == 1).sum()) != int(nonzero.sum()):
        raise ValueError(f"{name}: expected bool or 0/1 values, found other values (e.g. 0.5); pass a bool mask")
    return nonzero


def check_same_shape(name: str, value: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    """``value`` has exactly the shape of ``other`` (no broadcasting)."""
    if tuple(value.shape) != tuple(other.shape):
        raise ValueError(
            f"{name}: expected shape {tuple(other.shape)} (the shape of {other_name}), got {tuple(value.shape)}"
        )


def check_logprobs(name: str, logprobs: torch.Tensor, valid: torch.Tensor | None = None) -> None:
    """Log-probabilities are ≤ 0 up to `LOGPROB_TOLERANCE` (at ``valid`` positions; NaN is left to
    the finiteness checks). One host sync."""
    values = logprobs.detach()
    if valid is not None:
        values = torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device))
    if values.numel() and bool((values > LOGPROB_TOLERANCE).any()):
        worst = float(values.nan_to_num(nan=0.0).max())
        raise ValueError(
            f"{name}: expected log-probabilities <= 0 (tolerance {LOGPROB_TOLERANCE:g}), got a value of {worst:.6g}; "
            "pass log-probs, not logits or probabilities"
        )


def check_probability_mass(name: str, logprobs: torch.Tensor, valid: torch.Tensor | None = None) -> None:
    """Σ_k exp(log p_k) over the last dim is ≤ 1 up to `PROBABILITY_MASS_TOLERANCE` (at ``valid``
    positions, which index all dims but the last). One host sync."""
    values = logprobs.detach().to(torch.float64)
    if valid is not None:
        values = torch.where(valid.unsqueeze(-1), values, torch.full((), -math.inf, dtype=values.dtype))
    mass = torch.logsumexp(values.nan_to_num(nan=-math.inf), dim=-1) if values.numel() else values.sum(-1)
    if mass.numel() and bool((mass > math.log1p(PROBABILITY_MASS_TOLERANCE)).any()):
        worst = math.exp(float(mass.max()))
        raise ValueError(
            f"{name}: expected a top-K probability mass <= 1 (tolerance {PROBABILITY_MASS_TOLERANCE:g}), "
            f"got {worst:.6g}; the top-K log-probs must be log-softmax values of one distribution"
        )


__all__ = [
    "LOGPROB_TOLERANCE",
    "PROBABILITY_MASS_TOLERANCE",
    "ArgumentTypeError",
    "check_choice",
    "check_flag",
    "check_int",
    "check_logprobs",
    "check_mask",
    "check_number",
    "check_optional_number",
    "check_probability_mass",
    "check_same_shape",
    "check_str",
    "check_tensor",
]
