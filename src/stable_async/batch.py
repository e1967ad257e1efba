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
from dataclasses import dataclass, field
from typing import Any

import torch

from stable_async._numerics import compute_dtype, count_true, float_mask, weighted_sum

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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


def _all_finite(tensors: list[torch.Tensor | None]) -> list[bool]:
    """Per tensor: True if every value is certainly finite (False: unknown, check position by position).

    One reduction per tensor and one host sync for all: a sum is finite only if every term is
    (any NaN/inf makes it NaN/inf). A finite tensor whose sum overflows reads as False, which
    only sends it to the exact path. ``None`` entries give True.
    """
    present = [t for t in tensors if t is not None and t.numel()]
    if not present:
        return [True] * len(tensors)
    sums = []
    for t in present:
        acc = torch.float64 if t.dtype == torch.float64 else torch.float32
        sums.append(t.detach().sum(dtype=acc).to(device=present[0].device, dtype=torch.float64))
    flags = iter(torch.isfinite(torch.stack(sums)).tolist())
    return [True if t is None or not t.numel() else bool(next(flags)) for t in tensors]


@dataclass
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
        current_version: the trainer's policy version; required with ``versions``.
        topk_ids: (B, T, K) integer ids of the rollout policy's top-K tokens, or None.
        topk_logprobs: (B, T, K) log μ at ``topk_ids``, or None.
        current_topk_logprobs: (B, T, K) log π_θ at ``topk_ids`` (carries the gradient), or None.
        global_num_tokens: valid tokens in the global minibatch (all ranks); None = local count.
        global_num_seqs: sequences with a valid token in the global minibatch; None = local count.
        dp_size: the factor by which the framework averages gradients across ranks.
        check_finite: raise on NaN/inf at valid positions (default True).
        dtype: the compute dtype (derived).
    """

    logprobs: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    old_logprobs: torch.Tensor | None = None
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
    # Derived in __post_init__; not constructor arguments.
    dtype: torch.dtype = field(init=False)
    _maskf: torch.Tensor | None = field(init=False, default=None, repr=False, compare=False)
    _num_valid: torch.Tensor | None = field(init=False, default=None, repr=False, compare=False)
    _denominators: dict = field(init=False, default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        lp = _check_tensor("logprobs", self.logprobs)
        _check_float("logprobs", lp)
        if lp.dim() != 2:
            raise BatchValidationError(f"logprobs: expected a 2-D tensor (B, T), got {_describe(lp)}")
        B, T = lp.shape
        device = lp.device

        def same_device(name: str, t: torch.Tensor) -> None:
            if t.device != device:
                raise BatchValidationError(
                    f"{name}: expected device {device} (the device of logprobs), got {_describe(t)}"
                )

        mask = _check_tensor("mask", self.mask)
        same_device("mask", mask)
        _check_shape("mask", mask, (B, T), "same as logprobs")
        if mask.dtype != torch.bool:
            if mask.dtype.is_complex:
                raise BatchValidationError(f"mask: expected bool or 0/1 values, got {_describe(mask)}")
            nonzero = mask != 0
            # 0/1 values iff every nonzero entry is 1: two counts instead of a full-size 0-or-1 test.
            if mask.numel() and int((mask == 1).sum()) != int(nonzero.sum()):
                raise BatchValidationError("mask: expected bool or 0/1 values, found other values")
            mask = nonzero
        self.mask = mask

        adv = _check_tensor("advantages", self.advantages)
        same_device("advantages", adv)
        _check_float("advantages", adv)
        if adv.dim() == 1:
            _check_shape("advantages", adv, (B,), "one advantage per sequence, or (B, T)")
            adv = adv.unsqueeze(-1).expand(B, T)
        elif adv.dim() == 2 and tuple(adv.shape) == (B, 1):
            adv = adv.expand(B, T)
        else:
            _check_shape("advantages", adv, (B, T), "(B,) or (B, T) with B, T from logprobs")

        self.dtype = compute_dtype(lp, adv, self.old_logprobs, self.rollout_logprobs)
        old = ro = None
        if self.old_logprobs is not None:
            old = _check_tensor("old_logprobs", self.old_logprobs)
            same_device("old_logprobs", old)
            _check_float("old_logprobs", old)
            _check_shape("old_logprobs", old, (B, T), "same as logprobs")
        if self.rollout_logprobs is not None:
            ro = _check_tensor("rollout_logprobs", self.rollout_logprobs)
            same_device("rollout_logprobs", ro)
            _check_float("rollout_logprobs", ro)
            _check_shape("rollout_logprobs", ro, (B, T), "same as logprobs")
        # One fused finiteness screen (one host sync) for the (B, T) float fields; only a tensor
        # that fails it (or needs a cast) takes the exact, per-position path of `_clean`.
        # ``self.advantages`` is the unexpanded input: the same values, fewer to read.
        finite = _all_finite([lp, self.advantages, old, ro])
        self.logprobs = self._clean("logprobs", lp, known_finite=finite[0])
        self.advantages = self._clean("advantages", adv, known_finite=finite[1])
        if old is None:
            self.old_logprobs = self.logprobs.detach()
        else:
            self.old_logprobs = self._clean("old_logprobs", old.detach(), known_finite=finite[2])
        if ro is not None:
            self.rollout_logprobs = self._clean("rollout_logprobs", ro.detach(), known_finite=finite[3])

        for name in ("rewards", "group_ids"):
            value = getattr(self, name)
            if value is None:
                continue
            t = _check_tensor(name, value)
            same_device(name, t)
            _check_shape(name, t, (B,), "one value per sequence")
            if name == "rewards":
                _check_float(name, t)
                if self.check_finite and t.numel() and not bool(torch.isfinite(t).all()):
                    raise BatchValidationError("rewards: found NaN/inf")
                self.rewards = t.detach().to(self.dtype)
            elif t.dtype.is_floating_point or t.dtype == torch.bool:
                raise BatchValidationError(f"group_ids: expected an integer dtype, got {_describe(t)}")

        if self.versions is not None:
            v = _check_tensor("versions", self.versions)
            same_device("versions", v)
            if v.dim() == 1:
                _check_shape("versions", v, (B,), "one version per sequence, or (B, T)")
                v = v.unsqueeze(-1).expand(B, T)
            else:
                _check_shape("versions", v, (B, T), "(B,) or (B, T)")
            if self.current_version is None:
                raise BatchValidationError("current_version: required when versions is given")
            self.versions = v
        if self.current_version is not None and not isinstance(self.current_version, int):
            raise BatchValidationError(f"current_version: expected an int, got {type(self.current_version).__name__}")

        self._validate_topk(B, T, same_device)

        if self.dp_size < 1 or int(self.dp_size) != self.dp_size:
            raise BatchValidationError(f"dp_size: expected a positive integer, got {self.dp_size!r}")
        for name in ("global_num_tokens", "global_num_seqs"):
            value = getattr(self, name)
            if value is not None and float(value) < 0:
                raise BatchValidationError(f"{name}: expected a count >= 0, got {value!r}")

    def _validate_topk(self, B: int, T: int, same_device: Any) -> None:
        ids, lps, cur = self.topk_ids, self.topk_logprobs, self.current_topk_logprobs
        if ids is None and lps is None and cur is None:
            return
        if ids is not None:
            ids = _check_tensor("topk_ids", ids)
            same_device("topk_ids", ids)
            if ids.dim() != 3 or tuple(ids.shape[:2]) != (B, T):
                raise BatchValidationError(f"topk_ids: expected shape ({B}, {T}, K), got {_describe(ids)}")
            if ids.dtype.is_floating_point or ids.dtype == torch.bool:
                raise BatchValidationError(f"topk_ids: expected an integer dtype, got {_describe(ids)}")
        K = None
        finite = dict(
            zip(
                ("topk_logprobs", "current_topk_logprobs"),
                _all_finite([self._float_or_none(lps), self._float_or_none(cur)]),
            )
        )
        for name in ("topk_ids", "topk_logprobs", "current_topk_logprobs"):
            t = getattr(self, name)
            if t is None:
                continue
            t = _check_tensor(name, t)
            same_device(name, t)
            if t.dim() != 3 or tuple(t.shape[:2]) != (B, T):
                raise BatchValidationError(f"{name}: expected shape ({B}, {T}, K), got {_describe(t)}")
            if K is None:
                K = t.shape[2]
            elif t.shape[2] != K:
                raise BatchValidationError(
                    f"{name}: expected K={K} entries like the other top-K fields, got {_describe(t)}"
                )
            if name != "topk_ids":
                _check_float(name, t)
                cleaned = self._clean(
                    name,
                    t if name == "current_topk_logprobs" else t.detach(),
                    extra_dim=True,
                    known_finite=finite[name],
                )
                setattr(self, name, cleaned)

    @staticmethod
    def _float_or_none(t: Any) -> torch.Tensor | None:
        """``t`` if it is a floating tensor (worth a finiteness screen), else None (validated later)."""
        return t if isinstance(t, torch.Tensor) and t.dtype in _FLOAT_DTYPES else None

    def _clean(
        self, name: str, t: torch.Tensor, extra_dim: bool = False, known_finite: bool | None = None
    ) -> torch.Tensor:
        """Cast to the compute dtype, check finiteness where valid, zero the masked positions.

        ``known_finite=True`` (every value is finite, from `_all_finite`) skips the per-position
        work for a tensor already in the compute dtype: it is returned as given.
        """
        if not t.numel():
            return t.to(self.dtype)
        if known_finite is None:
            known_finite = _all_finite([t])[0]
        if known_finite and t.dtype == self.dtype:
            return t
        valid = self.mask.unsqueeze(-1).expand_as(t) if extra_dim else self.mask
        finite = torch.isfinite(t)
        if self.check_finite:
            bad = ~finite & valid
            if bool(bad.any()):
                n = int(bad.sum())
                raise BatchValidationError(
                    f"{name}: {n} NaN/inf value(s) at valid (mask=1) positions; fix the input or mask them out"
                )
        if t.dtype == self.dtype and bool(finite.all()):
            # Nothing to clean: keep the caller's tensor (no new autograd node, so the batch can
            # serve several backward passes). Masked positions are ignored downstream.
            return t
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
            self._maskf = float_mask(self.mask, self.dtype)
        return self._maskf

    @property
    def num_valid(self) -> torch.Tensor:
        """Number of valid (mask = 1) tokens, an integer 0-dim tensor (computed once per batch)."""
        if self._num_valid is None:
            self._num_valid = count_true(self.mask)
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

    @property
    def behavior_logprobs(self) -> torch.Tensor:
        """log μ: the rollout log-probs if reported, otherwise the old (proximal) log-probs."""
        return self.rollout_logprobs if self.rollout_logprobs is not None else self.old_logprobs  # type: ignore[return-value]

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

        Without an initialized process group this is the local counts and ``dp_size=1``.
        """
        from stable_async.distributed import all_reduce_sum, world_size

        counts = torch.stack([self.maskf.sum(), (self.mask.sum(-1) > 0).to(self.dtype).sum()])
        counts = all_reduce_sum(counts, process_group)
        return self.replace(
            global_num_tokens=float(counts[0]),
            global_num_seqs=float(counts[1]),
            dp_size=world_size(process_group),
        )
