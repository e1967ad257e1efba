"""PPO-clip with asymmetric ε, dual clip and an optional cap on the unclipped ratio.

With r = exp(log π_θ − log π_old) (log-ratio clamped to ±20) and advantage A:

    ℓ = max(−r̃·A, −clip(r, 1−ε_low, 1+ε_high)·A),     r̃ = min(r, ratio_cap)
    ℓ ← min(ℓ, −c·A)   where A < 0                     (dual clip, c = ``dual_clip`` > 1)

Sources: Schulman et al. 2017 (arXiv 1707.06347); clip-higher ε_high from DAPO (arXiv
2503.14476); dual clip from Ye et al. 2019 (arXiv 1912.09729). ``ratio_cap`` is TRL's
``delta`` ("two-sided clipping", INTELLECT-2). Defaults ε_low = ε_high = 0.2, no dual clip
(OpenRLHF and TRL); veRL's ``vanilla`` always applies a dual clip with c = 3 — pass
``dual_clip=3.0`` to reproduce it.

Metrics (token means): ``actor/pg_clipfrac`` (the clipped term is the larger loss),
``actor/pg_clipfrac_lower`` (the dual-clip bound is active, A < 0), ``actor/ppo_kl``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stable_async._numerics import safe_exp
from stable_async.batch import PolicyBatch
from stable_async.diagnostics import approx_kl, fraction
from stable_async.losses.base import LossConfig, LossOutput, check_positive, finish
from stable_async.registry import register_loss


@dataclass(frozen=True)
class PPOConfig(LossConfig):
    """PPO-clip settings (paper defaults)."""

    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = None
    ratio_cap: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("eps_low", self.eps_low, allow_zero=True)
        check_positive("eps_high", self.eps_high, allow_zero=True)
        if self.dual_clip is not None and not self.dual_clip > 1.0:
            raise ValueError(f"dual_clip: expected a value > 1 (or None), got {self.dual_clip!r}")
        if self.ratio_cap is not None:
            check_positive("ratio_cap", self.ratio_cap)


def ppo_token_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    config: PPOConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO loss, and the masks (clipped, dual-clipped) behind the clip fractions."""
    ratio = safe_exp(logprobs - old_logprobs)
    unclipped_ratio = ratio if config.ratio_cap is None else ratio.clamp(max=config.ratio_cap)
    loss_unclipped = -advantages * unclipped_ratio
    loss_clipped = -advantages * ratio.clamp(1.0 - config.eps_low, 1.0 + config.eps_high)
    loss = torch.maximum(loss_unclipped, loss_clipped)
    clipped = loss_clipped > loss_unclipped
    if config.dual_clip is None:
        return loss, clipped, torch.zeros_like(clipped)
    dual_bound = -advantages * config.dual_clip
    dual_active = (loss > dual_bound) & (advantages < 0)
    loss = torch.where(advantages < 0, torch.minimum(loss, dual_bound), loss)
    return loss, clipped, dual_active


@register_loss("ppo", config=PPOConfig)
def ppo(batch: PolicyBatch, config: PPOConfig) -> LossOutput:
    """PPO-clip (see module docstring)."""
    loss_mat, clipped, dual_active = ppo_token_loss(batch.logprobs, batch.old_logprobs, batch.advantages, config)
    metrics = {
        "actor/pg_clipfrac": fraction(clipped, batch.mask),
        "actor/pg_clipfrac_lower": fraction(dual_active, batch.mask),
        "actor/ppo_kl": approx_kl(batch.logprobs, batch.old_logprobs, batch.mask),
    }
    return finish(batch, config, loss_mat, metrics)
