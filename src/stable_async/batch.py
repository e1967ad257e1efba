"""`PolicyBatch`: the one input record every loss, correction and diagnostic reads.

It is validated once, at construction: shapes, dtypes, devices and batch sizes, and the
finiteness of every value at a valid position (NaN/inf there raises `BatchValidationError`).
After validation the floating tensors are in the compute dtype (fp32, or fp64 for fp64 input).
A tensor that needs a cast, or holds NaN/inf at masked positions, is replaced by a cleaned copy
with every masked position set to 0, so `-inf` log-probs at padding never reach an `exp` or a
gradient; a tensor that needs neither is kept as given (every downstream reduction is masked).

Shapes (B sequences, T response tokens, K top-K entries):

| field | shape | meaning |
|---|---|---|
| `logprobs` | (B, T) | log π_θ of the sampled tokens; carries the gradient |
| `advantages` | (B, T) or (B,) | advantage; a per-sequence value is broadcast over T |
| `mask` | (B, T) | 1 / True where the token counts |
| `old_logprobs` | (B, T) | proximal policy π_old (default: `logprobs.detach()`) |
| `rollout_logprobs` | (B, T) | behavior policy μ as the rollout engine reported it |
| `rewards`, `group_ids` | (B,) | scalar rewards and prompt-group ids (baselines) |
| `versions` | (B,) or (B, T) | policy version that produced each sequence / token |
| `current_version` | int | the trainer's version now |
| `topk_ids`, `topk_logprobs` | (B, T, K) | rollout top-K token ids and their log μ |
| `current_topk_logprobs` | (B, T, K) | log π_θ at `topk_ids` |

Data-parallel bookkeeping (see `stable_async.aggregate`): ``global_num_tokens`` and
``global_num_seqs`` are the valid-token and valid-sequence counts of the whole optimizer
minibatch over all ranks; ``dp_size`` is the factor by which the framework averages gradients
across ranks (DDP / FSDP / DeepSpeed average, so pass the world size; pass 1 if gradients are
summed). `PolicyBatch.with_global_counts` fills the counts with one all-reduce.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch

from stable_async._numerics import compute_dtype, count_true, weighted_sum
from stable_async.aggregate import check_dp_size, check_global_count
from stable_async.checks import check_logprobs, check_mask, check_probability_mass, logprob_tolerance

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LOGPROB_FIELDS = ("logprobs", "old_logprobs", "rollout_logprobs")
_TOPK_FIELDS = ("topk_logprobs", "current_topk_logprobs")


class BatchValidationError(ValueError):
    """A `PolicyBatch` field has the wrong shape, dtype, device or values."""


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _check_tensor(name: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise BatchValidationError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise BatchValidationError(f"{name}: expected a floating dtype (fp16/bf16/fp32/fp64), got {_describe(t)}")


def _check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
    if tuple(t.shape) != expected:
        raise BatchValidationError(f"{name}: expected shape {expected} ({what}), got {_describe(t)}")


def _check_integer(name: str, t: torch.Tensor) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise BatchValidationError(f"{name}: expected an integer dtype, got {_describe(t)}")


def _screen(
    tensors: list[torch.Tensor | None], mask: torch.Tensor
) -> tuple[list[bool], list[float], torch.Tensor, float, float]:
    """One host sync for the fast checks of the float fields and the mask counts.

    Returns, per tensor: True if every value is finite (its minimum and maximum are: NaN and
    ±inf reach both; True for None or empty), and the largest value (−inf for None or empty; for
    a top-K (B, T, K) tensor the largest log Σ_k exp, the log of its probability mass). Then the
    number of valid tokens as an integer 0-dim tensor (`PolicyBatch.num_valid`), and the two
    mask counts as floats [valid tokens, sequences with a valid token]. Every tensor is on the
    device of ``mask``.
    """
    per_row = count_true(mask, dim=-1)  # valid tokens per sequence
    num_valid = per_row.sum(dtype=per_row.dtype)
    scalars = [num_valid.to(torch.float64), count_true(per_row > 0)]
    present = [t is not None and t.numel() > 0 for t in tensors]
    for t, there in zip(tensors, present, strict=True):
        if t is None or not there:
            continue
        d = t.detach()
        low, high = torch.aminmax(d)
        peak = torch.logsumexp(d.to(compute_dtype(d)), dim=-1).amax() if d.dim() == 3 else high
        scalars += [low, high, peak]
    values = torch.stack(scalars).tolist()  # all promoted to float64, exact for every count and value
    finite, peaks, i = [], [], 2
    for there in present:
        if not there:
            finite.append(True)
            peaks.append(-math.inf)
            continue
        low, high, peak = values[i : i + 3]
        finite.append(math.isfinite(low) and math.isfinite(high))
        peaks.append(peak)
        i += 3
    return finite, peaks, num_valid, values[0], values[1]


def _as_batch_error(check: Any, *args: Any) -> None:
    """Run a `stable_async.checks` check; a ValueError becomes a `BatchValidationError` (a wrong
    type stays an `stable_async.checks.ArgumentTypeError`, a TypeError that is also a ValueError)."""
    try:
        check(*args)
    except ValueError as exc:
        if isinstance(exc, TypeError):
            raise
        raise BatchValidationError(str(exc)) from None


@dataclass(init=False)
class PolicyBatch:
    """The validated input of every stable-async loss.

    Attributes:
        logprobs: (B, T) log π_θ of the sampled tokens; carries the gradient.
        advantages: (B, T), or (B,) broadcast over the tokens of each sequence.
        mask: (B, T) bool or 0/1; stored as bool.
        old_logprobs: (B, T) proximal policy π_old; default ``logprobs.detach()``.
        rollout_logprobs: (B, T) behavior policy μ reported by the rollout engine, or None.
        rewards: (B,) scalar rewards (baselines), or None.
        group_ids: (B,) integer prompt-group ids (baselines), or None.
        versions: (B,) or (B, T) integer policy version that produced each token, or None.
        current_version: the trainer's policy version (an int); required with ``versions``.
        topk_ids: (B, T, K) integer ids of the rollout policy's top-K tokens, or None.
        topk_logprobs: (B, T, K) log μ at ``topk_ids``, or None.
        current_topk_logprobs: (B, T, K) log π_θ at ``topk_ids`` (carries the gradient), or None.
        global_num_tokens: valid tokens in the global minibatch (all ranks); None = local count.
        global_num_seqs: sequences with a valid token in the global minibatch; None = local count.
        dp_size: the factor by which the framework averages gradients across ranks.
        check_finite: raise on NaN/inf at valid positions (default True).
        process_group: the data-parallel group the global counts were reduced over (set by
            `with_global_counts`; None: the default group).
        global_counts_from_mask: True when the global counts are this batch's mask counted over
            the ranks of ``process_group`` (set by `with_global_counts`); then a correction with
            ``exclude_rejected=True`` subtracts the units it rejects on every rank (see
            `counts_for`). False (counts given directly): they are taken as the counts of the
            units that count, after any rejection.
        dtype: the compute dtype (derived).
    """

    logprobs: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    old_logprobs: torch.Tensor  # always a tensor once built: the constructor's None is logprobs.detach()
    rollout_logprobs: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    group_ids: torch.Tensor | None = None
    versions: torch.Tensor | None = None
    current_version: int | None = None
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    current_topk_logprobs: torch.Tensor | None = None
    global_num_tokens: float | None = None
    global_num_seqs: float | None = None
    dp_size: int = 1
    check_finite: bool = True
    process_group: Any = field(default=None, repr=False, compare=False)
    global_counts_from_mask: bool = False
    # Derived at validation; not constructor arguments.
    dtype: torch.dtype = field(init=False)
    _maskf: torch.Tensor | None = field(init=False, default=None, repr=False, compare=False)
    _num_valid: torch.Tensor = field(init=False, repr=False, compare=False)
    _denominators: dict[torch.dtype, torch.Tensor] = field(init=False, repr=False, compare=False)

    # Written out (not generated) because ``old_logprobs`` is optional here but always a tensor
    # on the built batch; `dataclasses.replace` passes every field above back in by name.
    def __init__(
        self,
        logprobs: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        old_logprobs: torch.Tensor | None = None,
        rollout_logprobs: torch.Tensor | None = None,
        rewards: torch.Tensor | None = None,
        group_ids: torch.Tensor | None = None,
        versions: torch.Tensor | None = None,
        current_version: int | None = None,
        topk_ids: torch.Tensor | None = None,
        topk_logprobs: torch.Tensor | None = None,
        current_topk_logprobs: torch.Tensor | None = None,
        global_num_tokens: float | None = None,
        global_num_seqs: float | None = None,
        dp_size: int = 1,
        check_finite: bool = True,
        process_group: Any = None,
        global_counts_from_mask: bool = False,
    ) -> None:
        self.logprobs, self.advantages, self.mask = logprobs, advantages, mask
        self.rollout_logprobs, self.rewards, self.group_ids = rollout_logprobs, rewards, group_ids
        self.versions, self.current_version = versions, current_version
        self.topk_ids, self.topk_logprobs, self.current_topk_logprobs = topk_ids, topk_logprobs, current_topk_logprobs
        self.global_num_tokens, self.global_num_seqs, self.dp_size = global_num_tokens, global_num_seqs, dp_size
        self.check_finite, self.process_group = check_finite, process_group
        self.global_counts_from_mask = global_counts_from_mask
        self._maskf, self._denominators = None, {}
        self._validate(old_logprobs)

    def _validate(self, old_logprobs: torch.Tensor | None) -> None:
        self._validate_flags()
        B, T = self._validate_logprobs()
        self._validate_mask(B, T)
        advantages = self._validate_advantages(B, T)
        old = self._validate_policy(B, T, "old_logprobs", old_logprobs)
        rollout = self._validate_policy(B, T, "rollout_logprobs", self.rollout_logprobs)
        self._validate_topk_layout(B, T)
        self.dtype = compute_dtype(self.logprobs, advantages, old, rollout)
        # One host sync for the fast finiteness / log-prob / mass screens of every float field
        # and the mask counts; only a tensor that fails a screen (or needs a cast) takes the
        # exact, per-position path of `_clean`. ``self.advantages`` is the unexpanded input.
        floats = [self.logprobs, self.advantages, old, rollout]
        floats += [self._float_or_none(self.topk_logprobs), self._float_or_none(self.current_topk_logprobs)]
        finite, peaks, self._num_valid, num_tokens, num_seqs = _screen(floats, self.mask)
        self._validate_counts(num_tokens, num_seqs)
        self._clean_policy(advantages, old, rollout, finite[:4], peaks[:4])
        self._validate_rewards_and_groups(B)
        self._validate_versions(B, T)
        self._clean_topk(finite[4:], peaks[4:])

    def _clean_policy(
        self,
        advantages: torch.Tensor,
        old: torch.Tensor | None,
        rollout: torch.Tensor | None,
        finite: list[bool],
        peaks: list[float],
    ) -> None:
        """Log-probs <= tolerance at valid positions; then the cleaned (B, T) float fields."""
        for name, tensor, peak in zip(
            _LOGPROB_FIELDS, (self.logprobs, old, rollout), (peaks[0], *peaks[2:]), strict=True
        ):
            if tensor is not None and not peak <= logprob_tolerance(tensor.dtype):
                _as_batch_error(check_logprobs, name, tensor, self.mask)
        self.logprobs = self._clean("logprobs", self.logprobs, known_finite=finite[0])
        self.advantages = self._clean("advantages", advantages, known_finite=finite[1])
        if old is None:
            self.old_logprobs = self.logprobs.detach()
        else:
            self.old_logprobs = self._clean("old_logprobs", old.detach(), known_finite=finite[2])
        if rollout is not None:
            self.rollout_logprobs = self._clean("rollout_logprobs", rollout.detach(), known_finite=finite[3])

    def _clean_topk(self, finite: list[bool], peaks: list[float]) -> None:
        """Top-K log-probs <= tolerance and masses <= 1 (up to it) at valid positions; then cleaned."""
        for name, known, peak in zip(_TOPK_FIELDS, finite, peaks, strict=True):
            t = getattr(self, name)
            if t is None:
                continue
            if not peak <= logprob_tolerance(t.dtype):  # peak: the largest log top-K mass
                _as_batch_error(check_logprobs, name, t, self.mask.unsqueeze(-1).expand_as(t))
                _as_batch_error(check_probability_mass, name, t, self.mask)
            cleaned = self._clean(name, t if name == "current_topk_logprobs" else t.detach(), known, extra_dim=True)
            setattr(self, name, cleaned)

    # ------------------------------------------------------------------ per-field validators
    def _validate_flags(self) -> None:
        for name in ("check_finite", "global_counts_from_mask"):
            if not isinstance(getattr(self, name), bool):
                value = getattr(self, name)
                raise BatchValidationError(f"{name}: expected True or False, got {type(value).__name__} {value!r}")

    def _same_device(self, name: str, t: torch.Tensor) -> None:
        device = self.logprobs.device
        if t.device != device:
            raise BatchValidationError(f"{name}: expected device {device} (the device of logprobs), got {_describe(t)}")

    def _validate_logprobs(self) -> tuple[int, int]:
        lp = _check_tensor("logprobs", self.logprobs)
        if lp.is_meta:  # every other field must be on the device of logprobs, so this covers them
            raise BatchValidationError(f"logprobs: expected a tensor with data, got a meta tensor ({_describe(lp)})")
        _check_float("logprobs", lp)
        if lp.dim() != 2:
            raise BatchValidationError(f"logprobs: expected a 2-D tensor (B, T), got {_describe(lp)}")
        B, T = lp.shape
        return int(B), int(T)

    def _validate_mask(self, B: int, T: int) -> None:
        mask = _check_tensor("mask", self.mask)
        self._same_device("mask", mask)
        _check_shape("mask", mask, (B, T), "same as logprobs")
        if mask.dtype != torch.bool:
            _as_batch_error(check_mask, "mask", mask)  # the rule of every mask: bool or exact 0/1
            mask = mask != 0
        self.mask = mask

    def _validate_advantages(self, B: int, T: int) -> torch.Tensor:
        adv = _check_tensor("advantages", self.advantages)
        self._same_device("advantages", adv)
        _check_float("advantages", adv)
        if adv.dim() == 1:
            _check_shape("advantages", adv, (B,), "one advantage per sequence, or (B, T)")
            return adv.unsqueeze(-1).expand(B, T)
        if adv.dim() == 2 and tuple(adv.shape) == (B, 1):
            return adv.expand(B, T)
        _check_shape("advantages", adv, (B, T), "(B,) or (B, T) with B, T from logprobs")
        return adv

    def _validate_policy(self, B: int, T: int, name: str, value: Any) -> torch.Tensor | None:
        if value is None:
            return None
        t = _check_tensor(name, value)
        self._same_device(name, t)
        _check_float(name, t)
        _check_shape(name, t, (B, T), "same as logprobs")
        return t

    def _validate_rewards_and_groups(self, B: int) -> None:
        if self.rewards is not None:
            t = _check_tensor("rewards", self.rewards)
            self._same_device("rewards", t)
            _check_shape("rewards", t, (B,), "one value per sequence")
            _check_float("rewards", t)
            if self.check_finite and t.numel() and not bool(torch.isfinite(t).all()):
                raise BatchValidationError("rewards: found NaN/inf")
            self.rewards = t.detach().to(self.dtype)
        if self.group_ids is not None:
            t = _check_tensor("group_ids", self.group_ids)
            self._same_device("group_ids", t)
            _check_shape("group_ids", t, (B,), "one value per sequence")
            _check_integer("group_ids", t)

    def _validate_versions(self, B: int, T: int) -> None:
        current = self.current_version
        if current is not None and (isinstance(current, bool) or not isinstance(current, numbers.Integral)):
            raise BatchValidationError(f"current_version: expected an int, got {type(current).__name__} {current!r}")
        if self.versions is None:
            return
        v = _check_tensor("versions", self.versions)
        self._same_device("versions", v)
        _check_integer("versions", v)
        if v.dim() == 1:
            _check_shape("versions", v, (B,), "one version per sequence, or (B, T)")
            v = v.unsqueeze(-1).expand(B, T)
        else:
            _check_shape("versions", v, (B, T), "(B,) or (B, T)")
        if current is None:
            raise BatchValidationError("current_version: required when versions is given")
        self.versions = v

    def _validate_topk_layout(self, B: int, T: int) -> None:
        """Shapes, dtypes and devices of the top-K fields (values: `_screen` and `_clean`)."""
        K = None
        for name in ("topk_ids", *_TOPK_FIELDS):
            t = getattr(self, name)
            if t is None:
                continue
            t = _check_tensor(name, t)
            self._same_device(name, t)
            if t.dim() != 3 or tuple(t.shape[:2]) != (B, T):
                raise BatchValidationError(f"{name}: expected shape ({B}, {T}, K), got {_describe(t)}")
            if K is None:
                K = t.shape[2]
            elif t.shape[2] != K:
                raise BatchValidationError(
                    f"{name}: expected K={K} entries like the other top-K fields, got {_describe(t)}"
                )
            if name == "topk_ids":
                _check_integer(name, t)
                if t.numel() and bool((t < 0).any()):
                    raise BatchValidationError(f"topk_ids: expected token ids >= 0, got {int(t.min())}")
            else:
                _check_float(name, t)

    def _validate_counts(self, num_tokens: float, num_seqs: float) -> None:
        """dp_size a positive int; each global count a finite integer >= the local count."""
        _as_batch_error(self._check_counts, num_tokens, num_seqs)

    def _check_counts(self, num_tokens: float, num_seqs: float) -> None:
        self.dp_size = check_dp_size(self.dp_size)
        self.global_num_tokens = check_global_count("global_num_tokens", self.global_num_tokens, num_tokens)
        self.global_num_seqs = check_global_count("global_num_seqs", self.global_num_seqs, num_seqs)

    @staticmethod
    def _float_or_none(t: Any) -> torch.Tensor | None:
        """``t`` if it is a floating tensor (worth a finiteness screen), else None (validated later)."""
        return t if isinstance(t, torch.Tensor) and t.dtype in _FLOAT_DTYPES else None

    def _clean(self, name: str, t: torch.Tensor, known_finite: bool, extra_dim: bool = False) -> torch.Tensor:
        """Cast to the compute dtype, check finiteness where valid, zero the masked positions.

        ``known_finite=True`` (every value is finite, from `_screen`) skips the per-position
        work for a tensor already in the compute dtype: the caller's tensor is kept (no new
        autograd node, so the batch can serve several backward passes).
        """
        if not t.numel():
            return t.to(self.dtype)
        if known_finite and t.dtype == self.dtype:
            return t
        valid = self.mask.unsqueeze(-1).expand_as(t) if extra_dim else self.mask
        if self.check_finite:
            bad = ~torch.isfinite(t) & valid
            if bool(bad.any()):
                n = int(bad.sum())
                raise BatchValidationError(
                    f"{name}: {n} NaN/inf value(s) at valid (mask=1) positions; fix the input or mask them out"
                )
        t = t.to(self.dtype)
        return torch.where(valid, t, torch.zeros((), dtype=t.dtype, device=t.device))

    # ------------------------------------------------------------------ properties
    @property
    def batch_size(self) -> int:
        return int(self.logprobs.shape[0])

    @property
    def maskf(self) -> torch.Tensor:
        """The mask as 0/1 in the compute dtype (computed once per batch)."""
        if self._maskf is None:
            self._maskf = self.mask.to(self.dtype)
        return self._maskf

    @property
    def num_valid(self) -> torch.Tensor:
        """Number of valid (mask = 1) tokens, an integer 0-dim tensor (counted at validation)."""
        return self._num_valid

    def token_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Σ m·v / max(Σ m, 1) over this batch's valid tokens, in the dtype of ``values``.

        For (B, T) values computed from the batch's own fields, which are finite at masked
        positions (see the module docstring); a NaN/inf at a masked position of ``values`` would
        poison the mean (use `stable_async._numerics.masked_mean` for arbitrary values).
        """
        return weighted_sum(values, self.maskf.to(values.dtype)) / self._denominator(values.dtype)

    def token_fraction(self, condition: torch.Tensor) -> torch.Tensor:
        """Fraction of valid tokens where the bool (B, T) ``condition`` holds, fp32."""
        return self.count_fraction(count_true(condition & self.mask))

    def count_fraction(self, count: torch.Tensor) -> torch.Tensor:
        """``count`` (of valid tokens) over the number of valid tokens, fp32; 0 when none is valid."""
        return count.to(torch.float32) / self._denominator(torch.float32)

    def _denominator(self, dtype: torch.dtype) -> torch.Tensor:
        """max(number of valid tokens, 1) in ``dtype``, computed once per batch and dtype."""
        denominator = self._denominators.get(dtype)
        if denominator is None:
            denominator = self._denominators[dtype] = self.num_valid.to(dtype).clamp(min=1.0)
        return denominator

    def require(self, name: str, by: str) -> torch.Tensor:
        """The optional tensor field ``name``; a `BatchValidationError` naming it and what needs it
        (``by``, e.g. ``"opsm(behavior='rollout')"``) when the batch lacks it."""
        value = getattr(self, name)
        if not isinstance(value, torch.Tensor):
            raise BatchValidationError(f"{name}: required by {by}")
        return value

    @property
    def behavior_logprobs(self) -> torch.Tensor:
        """log μ: the rollout log-probs if reported, otherwise the old (proximal) log-probs."""
        return self.rollout_logprobs if self.rollout_logprobs is not None else self.old_logprobs

    @property
    def sequence_advantages(self) -> torch.Tensor:
        """Per-sequence advantage: the masked token mean of ``advantages`` (B,)."""
        m = self.maskf
        return (self.advantages * m).sum(-1) / m.sum(-1).clamp(min=1.0)

    def replace(self, **changes: Any) -> PolicyBatch:
        """A new, re-validated batch with some fields replaced (like `dataclasses.replace`)."""
        return dataclasses.replace(self, **changes)

    def with_global_counts(self, process_group: Any = None) -> PolicyBatch:
        """Fill ``global_num_tokens`` / ``global_num_seqs`` / ``dp_size`` with one all-reduce.

        Without an initialized process group this is the local counts and ``dp_size=1``. The
        result remembers ``process_group`` and that its counts are of its mask
        (``global_counts_from_mask=True``), so a correction with ``exclude_rejected=True`` can
        remove what it rejects on every rank from them (`counts_for`).
        """
        from stable_async.distributed import all_reduce_sum, world_size

        counts = torch.stack([self.maskf.sum(), (self.mask.sum(-1) > 0).to(self.dtype).sum()])
        counts = all_reduce_sum(counts, process_group)
        return self.replace(
            global_num_tokens=float(counts[0]),
            global_num_seqs=float(counts[1]),
            dp_size=world_size(process_group),
            process_group=process_group,
            global_counts_from_mask=True,
        )

    def counts_for(self, keep: torch.Tensor | None = None) -> dict[str, Any]:
        """The aggregation counts (``global_num_tokens``, ``global_num_seqs``, ``dp_size``) for a
        loss aggregated over ``keep`` ⊆ ``mask`` (the mask after a correction's rejection).

        The global counts count the units that count. For a batch from `with_global_counts`
        (counts of its mask over the ranks of ``process_group``) and a ``keep`` smaller than the
        mask, the units removed on every rank are subtracted: one sum-all-reduce of two numbers
        over that group (none without a process group), so one process, one process with
        `with_global_counts` and N ranks give the same loss and gradients. Counts given directly
        are used as given: pass the counts after rejection (veRL's rejection sampling edits the
        response mask before counting, so its counts already are).
        """
        counts = {
            "global_num_tokens": self.global_num_tokens,
            "global_num_seqs": self.global_num_seqs,
            "dp_size": self.dp_size,
        }
        if keep is None or keep is self.mask or not self.global_counts_from_mask:
            return counts
        if self.global_num_tokens is None and self.global_num_seqs is None:
            return counts
        from stable_async.distributed import all_reduce_sum

        removed = torch.stack(
            [count_true(self.mask) - count_true(keep), count_true(self.mask.any(-1)) - count_true(keep.any(-1))]
        )
        tokens, seqs = all_reduce_sum(removed.to(torch.float64), self.process_group).tolist()
        if self.global_num_tokens is not None:
            counts["global_num_tokens"] = self.global_num_tokens - tokens
        if self.global_num_seqs is not None:
            counts["global_num_seqs"] = self.global_num_seqs - seqs
        return counts
