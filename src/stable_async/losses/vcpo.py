"""VCPO loss (arXiv 2602.17616, code mit-han-lab/vcpo): REINFORCE with a truncated sequence IS weight.

    λ_i = Σ_t m_t·(log π_θ − log μ)        (detached)
    ρ̄_i = min(exp(clamp(λ_i, −20, 20)), C)  C = ratio_cap = 8
    ℓ_t = −ρ̄_i · A_t · log π_θ(y_t)

so ∇ℓ_t = −ρ̄_i·A_t·∇log π_θ(y_t). Default aggregation ``seq-mean-token-mean``. This is what the
reference runs: veRL's ``vanilla`` PPO loss with π_old = sg(π_θ) (ratio ≡ 1, so PPO clipping is
inert; the scripts also set ``clip_ratio_high=1e9``) times veRL's ``rollout_is="sequence"``
weight with ``rollout_is_threshold=8``. The rest of VCPO lives elsewhere: the ESS-scaled
learning rate (`stable_async.ESSScaledLR`) and the off-policy optimal baseline
(`stable_async.baselines.min_variance_baseline`, which turns rewards into advantages; use
``ratio_cap=8`` there so the baseline matches this loss's truncated weight).

μ (``anchor``): ``"rollout"`` (default) uses ``rollout_logprobs``, falling back to
``old_logprobs`` when the batch has none (then the metric ``vcpo/anchor_fallback`` is 1);
``"old"`` uses ``old_logprobs``. With neither given, old_logprobs defaults to sg(log π_θ), so
ρ̄ = 1 (on-policy REINFORCE).

``ratio_cap=None`` disables truncation (ρ̄ = exp(clamp(λ, ±20))). Do not add a sequence-level
`RolloutCorrection` as well: it would apply a second IS weight.

Metrics (sequence means over sequences with a valid token): ``vcpo/seq_is_mean`` (ρ̄),
``vcpo/seq_is_max`` (ρ before truncation, after the ±20 clamp), ``vcpo/truncated_fraction``
(fraction with ρ > C), ``actor/pg_clipfrac`` (the same fraction, for dashboards) and
``actor/ppo_kl``. The ESS that drives `ESSScaledLR` must be computed on the whole optimizer
minibatch (`stable_async.effective_sample_size`), not per micro-batch, so it is not a metric here.

Difference from the reference: none in the math. veRL clamps the summed log-ratio at ±20
exactly as here; stable-async computes in fp32/fp64 whatever the input dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from stable_async._numerics import LOG_RATIO_BOUND, masked_max, masked_mean, sequence_log_ratio
from stable_async.batch import PolicyBatch
from stable_async.diagnostics import approx_kl
from stable_async.losses.base import LossConfig, LossOutput, check_positive, finish
from stable_async.registry import register_loss

ANCHORS = ("rollout", "old")


@dataclass(frozen=True)
class VCPOConfig(LossConfig):
    """VCPO loss settings (paper / reference defaults)."""

    aggregation: str = "seq-mean-token-mean"
    ratio_cap: float | None = 8.0
    anchor: str = "rollout"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ratio_cap is not None:
            check_positive("ratio_cap", self.ratio_cap)
        if self.anchor not in ANCHORS:
            raise ValueError(f"anchor: expected one of {list(ANCHORS)}, got {self.anchor!r}")


def sequence_is_weights(batch: PolicyBatch, config: VCPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(ρ̄, ρ) per sequence (B,), detached: ρ = exp(clamp(λ, ±20)), ρ̄ = min(ρ, ratio_cap)."""
    behavior = batch.old_logprobs if config.anchor == "old" else batch.behavior_logprobs
    assert behavior is not None
    log_ratio = sequence_log_ratio(batch.logprobs.detach() - behavior, batch.mask, mean=False)
    rho = torch.exp(log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    capped = rho if config.ratio_cap is None else rho.clamp(max=config.ratio_cap)
    return capped, rho


@register_loss(
    "vcpo",
    config=VCPOConfig,
    requires=lambda c: {"rollout_logprobs" if c.anchor == "rollout" else "old_logprobs"},
    weights_by_rollout=lambda c: c.anchor == "rollout",
)
def vcpo(batch: PolicyBatch, config: VCPOConfig) -> LossOutput:
    """VCPO loss (see module docstring)."""
    weight, rho = sequence_is_weights(batch, config)
    loss_mat = -weight.unsqueeze(-1) * batch.advantages * batch.logprobs
    seq_valid = batch.mask.any(dim=-1)
    cap = math.inf if config.ratio_cap is None else config.ratio_cap
    truncated = masked_mean((rho > cap).to(rho.dtype), seq_valid)
    metrics = {
        "vcpo/seq_is_mean": masked_mean(weight, seq_valid),
        "vcpo/seq_is_max": masked_max(rho, seq_valid),
        "vcpo/truncated_fraction": truncated,
        "vcpo/anchor_fallback": float(config.anchor == "rollout" and batch.rollout_logprobs is None),
        "actor/pg_clipfrac": truncated,
        "actor/ppo_kl": approx_kl(batch.logprobs, batch.old_logprobs, batch.mask),
    }
    return finish(batch, config, loss_mat, metrics)
