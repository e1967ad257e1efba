"""`StepAccumulator`: what the micro-batches of one optimizer step contribute, reduced once at the step.

A trainer calls the loss once per micro-batch and the optimizer once per step, and VCPO's
ESS-scaled learning rate needs a statistic of the whole step (every micro-batch, every
data-parallel rank). One `StepAccumulator` per optimizer (per model) records each micro-batch
with `StepAccumulator.record` and is reduced once, at that optimizer's step, by
`StepAccumulator.reduce` (two all-reduces: one max, one sum); `StepAccumulator.clear` empties it.
It holds a fixed vector of statistics, so its memory is O(number of statistics) whatever the
number of micro-batches, and there is no module-level state: two accumulators never share
anything.

With λ_i = Σ_t m_it·(log π_θ − log μ)_it the log-weight of sequence i (sequences with a valid
token) and λ_t = (log π_θ − log μ)_t of each valid token, each statistic declares how it merges,
across micro-batches and across ranks (the torchmetrics habit of a per-state reduction):

| statistic | reduction | value |
|---|---|---|
| ``seq_lse1``, ``seq_lse2`` | logsumexp | logsumexp_i λ_i, logsumexp_i 2λ_i |
| ``seq_count`` | sum | number of sequences N_seq |
| ``tok_lse1``, ``tok_lse2`` | logsumexp | logsumexp_t λ_t, logsumexp_t 2λ_t |
| ``tok_count`` | sum | number of valid tokens N_tok |
| ``k1_sum``, ``k3_sum`` | sum (mean by ``tok_count``) | Σ_t (log μ − log π_θ), Σ_t k3 (log-ratio clamped to ±20) |
| ``log_ratio_max``, ``log_ratio_min`` | max, min | extremes of λ_t |
| ``nonfinite`` | sum | valid positions with a NaN/inf log-weight (an error at `reduce`) |

The ESS (Kong 1992) of the step is then ESS = (Σ ρ)²/Σ ρ² = exp(2·lse1 − lse2), clamped to
[1, N]: exactly `stable_async.effective_sample_size` of the concatenated micro-batches of all
ranks, with no list of log-weights kept (a running ``logaddexp`` in fp64 per micro-batch). A
logsumexp across ranks is M + log Σ_r exp(L_r − M) with M the max-reduced L_r.

Recording never synchronizes with the host (a NaN/inf is counted and raised at `reduce`, on
every rank alike). `reduce` is a collective: every rank of the group must call it at every
step, also ranks that recorded nothing (they contribute nothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from stable_async._numerics import LOG_RATIO_BOUND
from stable_async.checks import ArgumentTypeError, check_mask, check_tensor
from stable_async.diagnostics import ESSResult
from stable_async.distributed import all_reduce_max, all_reduce_sum, world_size

REDUCTIONS = ("sum", "max", "min", "logsumexp")
"""How a statistic merges across micro-batches and ranks."""


@dataclass(frozen=True)
class Statistic:
    """One recorded statistic: its name and its declared reduction (one of `REDUCTIONS`)."""

    name: str
    reduction: str


STATISTICS: tuple[Statistic, ...] = (
    Statistic("seq_lse1", "logsumexp"),
    Statistic("seq_lse2", "logsumexp"),
    Statistic("seq_count", "sum"),
    Statistic("tok_lse1", "logsumexp"),
    Statistic("tok_lse2", "logsumexp"),
    Statistic("tok_count", "sum"),
    Statistic("k1_sum", "sum"),
    Statistic("k3_sum", "sum"),
    Statistic("log_ratio_max", "max"),
    Statistic("log_ratio_min", "min"),
    Statistic("nonfinite", "sum"),
)
_INDEX = {s.name: i for i, s in enumerate(STATISTICS)}
_IDENTITY = {"sum": 0.0, "max": -math.inf, "min": math.inf, "logsumexp": -math.inf}


def _positions(reduction: str) -> list[int]:
    return [i for i, s in enumerate(STATISTICS) if s.reduction == reduction]


def _ess(lse1: float, lse2: float, n: float) -> ESSResult:
    """ESS = exp(2·lse1 − lse2) clamped to [1, N]; as `effective_sample_size` for N = 0."""
    if n <= 0:
        return ESSResult(ess=0.0, ess_ratio=1.0, n=0.0)
    ess = min(max(math.exp(min(2.0 * lse1 - lse2, 700.0)), 1.0), n)
    return ESSResult(ess=ess, ess_ratio=ess / n, n=n)


@dataclass(frozen=True)
class StepStatistics:
    """The reduced statistics of one optimizer step (all micro-batches, all ranks).

    Attributes:
        sequence: ESS of the sequence weights ρ_i = exp(λ_i) (VCPO's ESS); ``n`` = sequences.
        token: ESS of the token weights; ``n`` = valid tokens.
        mismatch_kl: token mean of k1 = log μ − log π_θ (NaN without tokens).
        mismatch_k3_kl: token mean of k3 = ρ − 1 − log ρ, log ρ clamped to ±20 (NaN without tokens).
        log_ratio_max, log_ratio_min: extremes of log π_θ − log μ over valid tokens (NaN without).
        num_records: micro-batches recorded on this rank.
    """

    sequence: ESSResult
    token: ESSResult
    mismatch_kl: float
    mismatch_k3_kl: float
    log_ratio_max: float
    log_ratio_min: float
    num_records: int

    def metrics(self, prefix: str = "vcpo/") -> dict[str, float]:
        """Step-level metrics; the ESS and mismatch values only when something was recorded.

        ``ess`` / ``ess_num_seqs`` (sequence level), ``token_ess_ratio`` / ``ess_num_tokens``,
        ``mismatch_kl``, ``mismatch_k3_kl``, ``log_ratio_max``, ``log_ratio_min``.
        """
        out = {f"{prefix}ess_num_seqs": self.sequence.n, f"{prefix}ess_num_tokens": self.token.n}
        if self.sequence.n > 0:
            out[f"{prefix}ess"] = self.sequence.ess
        if self.token.n > 0:
            out[f"{prefix}token_ess_ratio"] = self.token.ess_ratio
            out[f"{prefix}mismatch_kl"] = self.mismatch_kl
            out[f"{prefix}mismatch_k3_kl"] = self.mismatch_k3_kl
            out[f"{prefix}log_ratio_max"] = self.log_ratio_max
            out[f"{prefix}log_ratio_min"] = self.log_ratio_min
        return out


class StepAccumulator:
    """Per-optimizer record of a step's micro-batches, reduced once at the step (see the module docstring).

    Args:
        process_group: the data-parallel group of `reduce` (None: the default group if one is
            initialized, otherwise no collective at all).

    Example::

        acc = sa.StepAccumulator()
        for micro in micro_batches:
            batch = sa.PolicyBatch(...)
            loss_fn(batch).loss.backward()
            acc.record(batch)                  # log π_θ − log μ of this micro-batch
        stats = acc.reduce()                   # every rank; one max- and one sum-all-reduce
        opt.step(stats.sequence.ess_ratio)     # an ESSScaledLR
        acc.clear()

    `stable_async.StableStep` does the last three lines (and GAC) for you.
    """

    def __init__(self, process_group: Any = None) -> None:
        self.process_group = process_group
        self._state: torch.Tensor | None = None
        self.num_records = 0

    def __repr__(self) -> str:
        return f"StepAccumulator(num_records={self.num_records})"

    @property
    def state(self) -> torch.Tensor | None:
        """The local statistic vector (fp64, one entry per `STATISTICS` item), None when empty."""
        return None if self._state is None else self._state.detach().clone()

    # ------------------------------------------------------------------ recording
    def record(self, batch: Any) -> None:
        """Record a `PolicyBatch`: log-weights ``logprobs − behavior_logprobs`` at its mask (detached)."""
        from stable_async.batch import PolicyBatch

        if not isinstance(batch, PolicyBatch):
            raise ArgumentTypeError(f"batch: expected a stable_async.PolicyBatch, got {type(batch).__name__}")
        self._add(batch.logprobs.detach() - batch.behavior_logprobs.detach(), batch.mask)

    def record_log_weights(self, log_weights: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Record (B, T) per-token log-weights log π_θ − log μ with a (B, T) bool or 0/1 mask (default all valid)."""
        lw = check_tensor("log_weights", log_weights, floating=True)
        if lw.dim() != 2:
            raise ValueError(f"log_weights: expected a (B, T) tensor, got shape {tuple(lw.shape)}")
        if mask is None:
            valid = torch.ones(lw.shape, dtype=torch.bool, device=lw.device)
        else:
            valid = check_mask("mask", mask, shape=tuple(lw.shape), device=lw.device, what="like log_weights")
        self._add(lw.detach(), valid)

    def _add(self, lw: torch.Tensor, valid: torch.Tensor) -> None:
        lw = lw.to(torch.float64)
        finite = torch.isfinite(lw)
        nonfinite = (~finite & valid).sum()
        lw = torch.where(valid & finite, lw, torch.zeros((), dtype=lw.dtype, device=lw.device))
        neg_inf = torch.full((), -math.inf, dtype=lw.dtype, device=lw.device)
        seq_valid = valid.any(dim=-1)
        lam = torch.where(seq_valid, lw.sum(dim=-1), neg_inf)
        tok = torch.where(valid, lw, neg_inf)
        clamped = lw.clamp(min=-LOG_RATIO_BOUND, max=LOG_RATIO_BOUND)
        k3 = torch.where(valid, torch.expm1(clamped) - clamped, torch.zeros((), dtype=lw.dtype, device=lw.device))
        count = valid.sum().to(lw.dtype)
        has = count > 0
        part = torch.stack(
            [
                _logsumexp(lam),
                _logsumexp(2.0 * lam),
                seq_valid.sum().to(lw.dtype),
                _logsumexp(tok),
                _logsumexp(2.0 * tok),
                count,
                -lw.sum(),
                k3.sum(),
                torch.where(has, tok.max() if tok.numel() else neg_inf, neg_inf),
                torch.where(has, torch.where(valid, lw, -neg_inf).min() if tok.numel() else -neg_inf, -neg_inf),
                nonfinite.to(lw.dtype),
            ]
        )
        if self._state is None:
            self._state = _identity(part.device)
        self._state = _merge(self._state, part.to(self._state.device))
        self.num_records += 1

    # ------------------------------------------------------------------ the step
    def reduce(self, device: torch.device | str | None = None) -> StepStatistics:
        """The step's statistics over every record since `clear`, on all ranks (a collective).

        Args:
            device: where the collective runs when nothing was recorded on this rank (e.g. the
                CUDA device under NCCL); default: the records' device, else CPU.

        Raises:
            ValueError: a recorded log-weight was NaN/inf at a valid position (on every rank).
        """
        state = self._state if self._state is not None else _identity(device or "cpu")
        if device is not None:
            state = state.to(device)
        if world_size(self.process_group) > 1:
            state = _reduce_across_ranks(state, self.process_group)
        v = dict(zip((s.name for s in STATISTICS), state.tolist(), strict=True))  # one host sync
        if v["nonfinite"] > 0:
            raise ValueError(
                f"log_weights: {int(v['nonfinite'])} NaN/inf log-weight(s) at valid positions were recorded "
                "this step (over all ranks)"
            )
        tokens = v["tok_count"]
        mean = (lambda total: total / tokens) if tokens > 0 else (lambda total: math.nan)
        return StepStatistics(
            sequence=_ess(v["seq_lse1"], v["seq_lse2"], v["seq_count"]),
            token=_ess(v["tok_lse1"], v["tok_lse2"], tokens),
            mismatch_kl=mean(v["k1_sum"]),
            mismatch_k3_kl=mean(v["k3_sum"]),
            log_ratio_max=v["log_ratio_max"] if tokens > 0 else math.nan,
            log_ratio_min=v["log_ratio_min"] if tokens > 0 else math.nan,
            num_records=self.num_records,
        )

    def clear(self) -> None:
        """Forget every record (a new step starts)."""
        self._state = None
        self.num_records = 0


def _logsumexp(x: torch.Tensor) -> torch.Tensor:
    """logsumexp of a 1-D (or any) tensor; −inf when empty or all −inf."""
    if x.numel() == 0:
        return torch.full((), -math.inf, dtype=x.dtype, device=x.device)
    return torch.logsumexp(x.reshape(-1), dim=0)


def _identity(device: torch.device | str) -> torch.Tensor:
    return torch.tensor([_IDENTITY[s.reduction] for s in STATISTICS], dtype=torch.float64, device=device)


def _merge(state: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """Combine two statistic vectors by each statistic's declared reduction."""
    out = state.clone()
    for reduction, combine in (
        ("sum", torch.add),
        ("max", torch.maximum),
        ("min", torch.minimum),
        ("logsumexp", torch.logaddexp),
    ):
        idx = _positions(reduction)
        out[idx] = combine(state[idx], part[idx])
    return out


def _reduce_across_ranks(state: torch.Tensor, process_group: Any) -> torch.Tensor:
    """Each statistic reduced by its declared reduction: one max-all-reduce, one sum-all-reduce."""
    maxed, mined = _positions("max") + _positions("logsumexp"), _positions("min")
    summed, lse = _positions("sum"), _positions("logsumexp")
    peaks = all_reduce_max(torch.cat([state[maxed], -state[mined]]), process_group)
    out = state.clone()
    out[maxed] = peaks[: len(maxed)]
    out[mined] = -peaks[len(maxed) :]
    shift = out[lse]
    finite_shift = torch.isfinite(shift)
    safe_shift = torch.where(finite_shift, shift, torch.zeros_like(shift))
    scaled = torch.where(finite_shift, torch.exp(state[lse] - safe_shift), torch.zeros_like(shift))
    sums = all_reduce_sum(torch.cat([state[summed], scaled]), process_group)
    out[summed] = sums[: len(summed)]
    out[lse] = torch.where(finite_shift, safe_shift + torch.log(sums[len(summed) :]), shift)
    return out


__all__ = ["REDUCTIONS", "STATISTICS", "Statistic", "StepAccumulator", "StepStatistics"]
