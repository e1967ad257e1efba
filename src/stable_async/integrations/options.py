"""How the adapters read and validate our optimizer-side options (``ess_lr=``, ``gac=``).

Each option is off (``None`` / ``False``), on with defaults (``True``) or a dict of keyword
arguments of the class it configures (`ESSScaledLR`, `GradientAlignmentControl`). The dict is
checked where the user types it, when the trainer or loss is built: an unknown key, a value the
class refuses, or a mode the adapter cannot run raises an error that starts with the option's
name and names the key (``gac: unknown key 'treshold' ...``), not later inside a worker.
"""

from __future__ import annotations

import inspect
from collections.abc import Collection, Mapping
from typing import Any

import torch

from stable_async.correction_chain import Correction, as_correction
from stable_async.optim.ess_lr import ESSScaledLR
from stable_async.optim.gac import GradientAlignmentControl

__all__ = ["correction_option", "ess_lr_settings", "gac_settings", "option_settings"]


def option_settings(value: Any, argument: str) -> dict[str, Any] | None:
    """None/False → off (None); True → defaults ({}); a mapping → its keyword arguments (not validated)."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{argument}: expected True, False, None or a dict of keyword arguments, got {value!r}")


def _keywords(cls: type[Any], positional: str) -> list[str]:
    """The keyword arguments of ``cls`` besides ``self`` and its first, ``positional`` one."""
    names = [name for name in inspect.signature(cls.__init__).parameters if name not in ("self", positional)]
    return sorted(names)


def _check_keys(settings: Mapping[str, Any], argument: str, allowed: list[str]) -> None:
    for key in settings:
        if not isinstance(key, str) or key not in allowed:
            raise TypeError(f"{argument}: unknown key {key!r}; expected some of {allowed}")


def _build(build: Any, argument: str) -> None:
    try:
        build()
    except (TypeError, ValueError) as err:
        raise type(err)(f"{argument}: {err}") from err


def gac_settings(
    value: Any, argument: str = "gac", *, refused_modes: Collection[str] = (), reason: str = ""
) -> dict[str, Any] | None:
    """``gac=`` as `GradientAlignmentControl` keyword arguments, validated (``None`` when off).

    Every key must be an argument of `GradientAlignmentControl` (besides ``params``) and the
    combination must be one it accepts (e.g. ``memory="sketch"`` needs ``mode="monitor"`` or
    ``"skip"``); a mode in ``refused_modes`` raises with ``reason``.
    """
    settings = option_settings(value, argument)
    if settings is None:
        return None
    _check_keys(settings, argument, _keywords(GradientAlignmentControl, "params"))
    mode = settings.get("mode", "project")
    if isinstance(mode, str) and mode in refused_modes:
        raise ValueError(f"{argument}: mode={mode!r} is not supported here{': ' + reason if reason else ''}")
    _build(lambda: GradientAlignmentControl([torch.zeros(1)], **settings), argument)
    return settings


def ess_lr_settings(value: Any, argument: str = "ess_lr") -> dict[str, Any] | None:
    """``ess_lr=`` as `ESSScaledLR` keyword arguments, validated (``None`` when off)."""
    settings = option_settings(value, argument)
    if settings is None:
        return None
    _check_keys(settings, argument, _keywords(ESSScaledLR, "optimizer"))
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    _build(lambda: ESSScaledLR(probe, **settings), argument)
    return settings


def correction_option(value: Any, argument: str = "correction") -> Correction | bool | None:
    """``correction=``: ``None`` (the trainer's own, translated), ``False`` (none), or a correction
    (`RolloutCorrection`, ``sa.opsm(...)``, or a tuple of them), validated."""
    if value is None or value is False:
        return value
    if value is True:
        raise TypeError(f"{argument}: expected a stable_async correction (or a tuple of them), False or None, got True")
    try:
        return as_correction(value)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{argument}: {err}") from err
