"""GMPO / geometric-mean policy optimization (arXiv 2507.20673), as veRL's ``geo_mean``.

Per token, the log-ratio λ_t = log π_θ − log π_old is clipped in log space in the direction
the advantage pushes, sgn(A)·min(sgn(A)·λ_t, sgn(A)·clip(λ_t, −ε_low, ε_high)); the sequence
ratio is the geometric mean of the clipped token ratios, and the loss is per sequence:

    R_i = exp( Σ_t m·λ̃_t / Σ_t m ),   Ā_i = Σ_t m·A_t / Σ_t m,   ℓ_i = −Ā_i·R_i

averaged over sequences (the ``aggregation`` setting does not apply; a correction's token
weights are reduced to their per-sequence geometric mean). Defaults ε_low = ε_high = 0.4
(the paper's clip range (e^−0.4, e^0.4)); veRL reads them from ``clip_ratio_low/high``.
Differences from veRL: fully masked sequences are left out of the mean (veRL averages over all
rows), and counts are exact where veRL adds 1e-8. With a mask-mode correction a sequence with a
rejected token gets weight 0; veRL reduces the weights by exp(mean log(w + 1e-10)), which leaves
such a sequence a small non-zero weight (e^(−23/L) for one zeroed token among L).

Metrics: ``actor/pg_clipfrac`` (token fraction clipped with A > 0), ``actor/pg_clipfrac_lower``
(clipped with A < 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stable_async._numerics import LOG_RATIO_BOUND, masked_mean
from stable_async.batch import PolicyBatch
from stable_async.diagnostics import approx_kl, fraction
from stable_async.losses.base import LossConfig, LossOutput, check_positive, finish_sequences
from stable_async.registry import register_loss


@dataclass(frozen=True)
class GeoMeanConfig(LossConfig):
    """GMPO settings; ε are bounds on the log-ratio."""

    eps_low: float = 0.4
    eps_high: float = 0.4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("eps_low", self.eps_low, allow_zero=True)
        check_positive("eps_high", self.eps_high, allow_zero=True)


@register_loss("geo_mean", config=GeoMeanConfig, requires={"old_logprobs"})
def geo_mean(batch: PolicyBatch, config: GeoMeanConfig) -> LossOutput:
    """GMPO (see module docstring)."""
    log_ratio = (batch.logprobs - batch.old_logprobs).clamp(min=-LOG_RATIO_BOUND, max=LOG_RATIO_BOUND)
    sign = torch.sign(batch.advantages)
    clipped = log_ratio.clamp(-config.eps_low, config.eps_high)
    log_ratio_tilde = sign * torch.minimum(sign * log_ratio, sign * clipped)
    seq_ratio = torch.exp(masked_mean(log_ratio_tilde, batch.mask, dim=-1))
    seq_loss = -batch.sequence_advantages * seq_ratio
    was_clipped = log_ratio != clipped
    metrics = {
        "actor/pg_clipfrac": fraction(was_clipped & (batch.advantages > 0), batch.mask),
        "actor/pg_clipfrac_lower": fraction(was_clipped & (batch.advantages < 0), batch.mask),
        "actor/ppo_kl": approx_kl(batch.logprobs, batch.old_logprobs, batch.mask),
    }
    return finish_sequences(batch, config, seq_loss, metrics)
