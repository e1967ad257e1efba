"""Rollout-mismatch and staleness corrections: a per-token multiplier (and mask) for any loss.

The behavior weight of token t of sequence i is w_t = π_num(a_t) / μ(a_t), where μ is the
rollout policy (``rollout_logprobs``) and π_num is the old policy ``π_old`` (mismatch only,
the trainers' default, ``numerator="old"``) or the current policy π_θ (mismatch and staleness
in one weight, ``numerator="current"``). Weights are always detached.

Level (how w is formed and gated):

* ``token``:      w_t itself.
* ``sequence``:   W_i = Π_t w_t = exp(Σ_t m·log w_t) for every token of sequence i.
* ``geometric``:  G_i = exp(Σ_t m·log w_t / Σ_t m), length-robust (a sequence product grows
  with length: 0.012 nats/token over 100 tokens is ×3.3).

Mode:

* ``truncate`` (TIS): the weight clamped to [low, high] (``low=None``: one-sided min(w, high)).
* ``mask`` (MIS / IcePop): a unit (token or sequence) is kept iff its gating statistic lies in
  [low, high] (a missing bound is no bound); rejected units get weight 0 and survivors carry the
  weight chosen by ``weight``.

Gating statistic (mask mode): ``ratio`` (the weight at the level), or a divergence of π_num
from μ per token — ``k1`` = log(μ/π), ``k2`` = ½(log(μ/π))², ``k3`` = π/μ − 1 − log(π/μ),
``binary_kl``, ``binary_tv`` (see `stable_async.divergence`) — summed over the sequence for
``level="sequence"`` and averaged for ``level="geometric"``. ``divergence_eps`` > 0 clamps both
probabilities to [eps, 1 − eps] before a binary divergence, as OpenRLHF's gate does with 1e-6.
The default 0 is exact: a token with π_num = 1 ≠ μ then has an infinite binary KL and is always
rejected, where the clamped form keeps it finite (and usually inside the band).

Survivors' weight (mask mode, ``weight``): ``"level"`` (default: the ratio at the gating
level; for a divergence gate: 1), ``"token"`` (the per-token ratio, as OpenRLHF does for every
mask mode), ``"sequence"``, ``"geometric"``, or ``"none"`` (1: a pure rejection filter).

Rejected tokens keep counting in the aggregation denominator (TRL, OpenRLHF: weight 0);
``exclude_rejected=True`` removes them from the loss mask instead (veRL's rejection sampling
with local counts). Sources: TIS (Yao et al. 2025, "Your efficient RL framework secretly brings
you off-policy RL training"), IcePop (Ling team, arXiv 2510.18855), MIS / sequence masking
(TRL's ``vllm_importance_sampling_mode``), veRL's ``rollout_corr_helper``.

Defaults: ``level="token", mode="truncate", high=2.0`` (token TIS, C=2). IcePop is
``RolloutCorrection(mode="mask", low=0.5, high=5.0)``; TRL's default is
``RolloutCorrection(level="sequence", mode="mask", high=3.0)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from stable_async import divergence
from stable_async._numerics import masked_mean, safe_exp, sequence_log_ratio
from stable_async.batch import PolicyBatch
from stable_async.checks import check_choice, check_flag, check_number, check_optional_number, check_str
from stable_async.diagnostics import fraction, mismatch_kl, weight_stats

LEVELS = ("token", "sequence", "geometric")
MODES = ("truncate", "mask")
STATISTICS = ("ratio", "k1", "k2", "k3", "binary_kl", "binary_tv")
NUMERATORS = ("old", "current")
WEIGHTS = ("level", "token", "sequence", "geometric", "none")


@dataclass
class CorrectionResult:
    """Output of a `RolloutCorrection`.

    Attributes:
        weights: (B, T) detached multipliers for the per-token loss (0 where rejected or masked).
        keep: (B, T) bool, the loss mask to use (``batch.mask`` unless ``exclude_rejected``).
        rejected: (B, T) bool, valid tokens zeroed by a mask mode.
        metrics: ``rollout_corr/*`` metrics as tensors.
    """

    weights: torch.Tensor
    keep: torch.Tensor
    rejected: torch.Tensor
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RolloutCorrection:
    """Truncated / masked importance weights for rollout mismatch and staleness.

    See the module docstring for the math. Call it on a `PolicyBatch` that has
    ``rollout_logprobs``; any loss takes it as ``correction=``.
    """

    level: str = "token"
    mode: str = "truncate"
    low: float | None = None
    high: float | None = 2.0
    statistic: str = "ratio"
    numerator: str = "old"
    weight: str = "level"
    exclude_rejected: bool = False
    divergence_eps: float = 0.0
    prefix: str = "rollout_corr/"

    def __post_init__(self) -> None:
        check_choice("level", self.level, LEVELS)
        check_choice("mode", self.mode, MODES)
        check_choice("statistic", self.statistic, STATISTICS)
        check_choice("numerator", self.numerator, NUMERATORS)
        check_choice("weight", self.weight, WEIGHTS)
        check_flag("exclude_rejected", self.exclude_rejected)
        check_str("prefix", self.prefix)
        low_bound = 0.0 if self.statistic == "ratio" else None  # a ratio bound must be >= 0
        for name in ("low", "high"):
            check_optional_number(name, getattr(self, name), low=low_bound)
        if self.low is None and self.high is None:
            raise ValueError("low / high: at least one bound is required")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"low / high: expected low <= high, got low={self.low}, high={self.high}")
        check_number("divergence_eps", self.divergence_eps, low=0.0, high=0.5, high_open=True)
        if self.mode == "truncate" and self.statistic != "ratio":
            raise ValueError(
                f"statistic: mode='truncate' clamps the ratio itself; got statistic={self.statistic!r} "
                "(use mode='mask' to gate on a divergence)"
            )

    # ------------------------------------------------------------------ math
    def _numerator_and_behavior(self, batch: PolicyBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(log π_num, log μ), both detached."""
        if batch.rollout_logprobs is None:
            raise ValueError("rollout_logprobs: RolloutCorrection needs the behavior log-probs in the PolicyBatch")
        numerator = batch.old_logprobs if self.numerator == "old" else batch.logprobs.detach()
        return numerator, batch.rollout_logprobs

    def log_weights(self, batch: PolicyBatch) -> torch.Tensor:
        """Per-token log w_t = log π_num − log μ, detached, 0 at masked positions."""
        numerator, rollout = self._numerator_and_behavior(batch)
        return torch.where(batch.mask, numerator - rollout, torch.zeros_like(numerator))

    def _level_log_weight(self, log_w: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
        if level == "token":
            return log_w
        seq = sequence_log_ratio(log_w, mask, mean=(level == "geometric"))
        return seq.unsqueeze(-1).expand_as(log_w)

    def _statistic(self, batch: PolicyBatch, log_w: torch.Tensor) -> torch.Tensor:
        mask = batch.mask
        if self.statistic == "ratio":
            return safe_exp(self._level_log_weight(log_w, mask, self.level))
        numerator, rollout = self._numerator_and_behavior(batch)
        if self.divergence_eps > 0 and self.statistic in ("binary_kl", "binary_tv"):
            # Clamp both probabilities to [eps, 1 − eps], in log space.
            lo, hi = math.log(self.divergence_eps), math.log1p(-self.divergence_eps)
            numerator, rollout = numerator.clamp(min=lo, max=hi), rollout.clamp(min=lo, max=hi)
        per_token = {
            "k1": lambda: divergence.k1(numerator, rollout),
            "k2": lambda: divergence.k2(numerator, rollout),
            "k3": lambda: divergence.k3(numerator, rollout),
            "binary_kl": lambda: divergence.binary_kl(numerator, rollout),
            "binary_tv": lambda: divergence.binary_tv(numerator, rollout),
        }[self.statistic]()
        if self.level == "token":
            return per_token
        return self._level_log_weight(per_token, mask, self.level)

    def __call__(self, batch: PolicyBatch) -> CorrectionResult:
        mask = batch.mask
        log_w = self.log_weights(batch)
        level_for_weight = self.level if self.weight == "level" else self.weight
        if self.mode == "truncate":
            raw = safe_exp(self._level_log_weight(log_w, mask, self.level))
            weights = raw.clamp(min=self.low, max=self.high)
            rejected = torch.zeros_like(mask)
            truncated = (weights != raw) & mask
        else:
            stat = self._statistic(batch, log_w)
            inside = torch.ones_like(mask)
            if self.low is not None:
                inside &= stat >= self.low
            if self.high is not None:
                inside &= stat <= self.high
            rejected = ~inside & mask
            if level_for_weight == "none" or (self.weight == "level" and self.statistic != "ratio"):
                carried = torch.ones_like(log_w)
            else:
                carried = safe_exp(self._level_log_weight(log_w, mask, level_for_weight))
            weights = torch.where(inside, carried, torch.zeros_like(carried))
            raw = safe_exp(self._level_log_weight(log_w, mask, self.level))
            truncated = torch.zeros_like(mask)
        weights = torch.where(mask, weights, torch.zeros_like(weights)).detach()
        keep = mask & ~rejected if self.exclude_rejected else mask
        metrics = self._metrics(batch, weights, raw, rejected, truncated)
        return CorrectionResult(weights=weights, keep=keep, rejected=rejected, metrics=metrics)

    def _metrics(
        self,
        batch: PolicyBatch,
        weights: torch.Tensor,
        raw: torch.Tensor,
        rejected: torch.Tensor,
        truncated: torch.Tensor,
    ) -> dict[str, Any]:
        mask, p = batch.mask, self.prefix
        metrics: dict[str, Any] = dict(weight_stats(weights, mask, prefix=f"{p}rollout_is_"))
        if self.level == "token":
            unit_mask, raw_unit = mask, raw
        else:
            unit_mask, raw_unit = mask.any(dim=-1), raw[:, 0] if raw.shape[-1] else raw.sum(-1)
        if self.statistic == "ratio":  # with a divergence gate, low/high are not ratio bounds
            if self.high is not None:
                metrics[f"{p}rollout_is_ratio_fraction_high"] = fraction(raw_unit > self.high, unit_mask)
            if self.low is not None:
                metrics[f"{p}rollout_is_ratio_fraction_low"] = fraction(raw_unit < self.low, unit_mask)
        metrics[f"{p}rollout_rs_masked_fraction"] = fraction(rejected, mask)
        metrics[f"{p}rollout_rs_seq_masked_fraction"] = masked_mean(
            rejected.any(dim=-1).to(weights.dtype), mask.any(dim=-1)
        )
        metrics[f"{p}truncated_fraction"] = fraction(truncated, mask)
        metrics.update(mismatch_kl(*self._numerator_and_behavior(batch), mask, prefix=p))
        return metrics


# Named presets users ask for by name.
def token_tis(high: float = 2.0, **kwargs: Any) -> RolloutCorrection:
    """Token-level truncated IS, min(w_t, C) (TIS, C = 2)."""
    return RolloutCorrection(level="token", mode="truncate", high=high, **kwargs)


def icepop(low: float = 0.5, high: float = 5.0, **kwargs: Any) -> RolloutCorrection:
    """IcePop: token weights kept only inside [0.5, 5], zero outside."""
    return RolloutCorrection(level="token", mode="mask", low=low, high=high, **kwargs)


def sequence_mask(high: float = 3.0, low: float | None = None, **kwargs: Any) -> RolloutCorrection:
    """Sequence-level masked IS (TRL's default ``sequence_mask``, C = 3)."""
    return RolloutCorrection(level="sequence", mode="mask", low=low, high=high, **kwargs)
