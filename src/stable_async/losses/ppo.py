"""PPO-clip with asymmetric ε, dual clip and an optional cap on the unclipped ratio.

With r = exp(log π_θ − log π_old) (log-ratio clamped to ±20) and advantage A:

    ℓ = max(−r̃·A, −clip(r, 1−ε_low, 1+ε_high)·A),     r̃ = min(r, ratio_cap)
    ℓ ← min(ℓ, −c·A)   where A < 0                     (dual clip, c = ``dual_clip`` > 1)

Sources: Schulman et al. 2017 (arXiv 1707.06347); clip-higher ε_high from DAPO (arXiv
2503.14476); dual clip from Ye et al. 2019 (arXiv 1912.09729). ``ratio_cap`` is TRL's
``delta`` ("two-sided clipping", INTELLECT-2). Defaults ε_low = ε_high = 0.2, no dual clip
(OpenRLHF and TRL); veRL's ``vanilla`` always applies a dual clip with c = 3 — pass
``dual_clip=3.0`` to reproduce it.

The loss is the formula above, differentiated by autograd (second derivatives included).
``compile=True`` runs the same function through ``torch.compile`` (one fused kernel for the
elementwise chain, values within a few ulp of eager); where compiling is unavailable it falls
back to eager with one warning (see `stable_async._compile`).

Metrics (token means): ``actor/pg_clipfrac`` (the clipped term is the larger loss),
``actor/pg_clipfrac_lower`` (the dual-clip bound is active, A < 0), ``actor/ppo_kl``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from stable_async._compile import compiled_or_eager
from stable_async._numerics import safe_exp
from stable_async.batch import PolicyBatch
from stable_async.losses.base import (
    LossConfig,
    LossOutput,
    check_clip_settings,
    check_flag,
    check_positive,
    finish,
)
from stable_async.registry import register_loss


@dataclass(frozen=True)
class PPOConfig(LossConfig):
    """PPO-clip settings (paper defaults)."""

    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = None
    ratio_cap: float | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_clip_settings(self.eps_low, self.eps_high, self.dual_clip)
        if self.ratio_cap is not None:
            check_positive("ratio_cap", self.ratio_cap)
        check_flag("compile", self.compile)


def clipped_surrogate(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None = None,
    ratio_cap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO loss of a given ratio, and the bool masks (clipped, dual-clip bound active).

    ℓ = max(−min(r, cap)·A, −clip(r, 1−ε_low, 1+ε_high)·A), then min(ℓ, −c·A) where A < 0.
    Shared by ``ppo``, ``gspo``/``gspo_token`` (sequence ratio) and ``decoupled_ppo``.
    """
    unclipped_ratio = ratio if ratio_cap is None else ratio.clamp(max=ratio_cap)
    loss_unclipped = -advantages * unclipped_ratio
    loss_clipped = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(loss_unclipped, loss_clipped)
    clipped = loss_clipped > loss_unclipped
    if dual_clip is None:
        return loss, clipped, torch.zeros_like(clipped)
    dual_bound = -advantages * dual_clip
    negative = advantages < 0
    dual_active = negative & (loss > dual_bound)
    return torch.where(negative, torch.minimum(loss, dual_bound), loss), clipped, dual_active


def surrogate_of_log_ratio(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None = None,
    ratio_cap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`clipped_surrogate` of r = exp(clamp(log r, ±20)): the whole elementwise chain of PPO."""
    return clipped_surrogate(safe_exp(log_ratio), advantages, eps_low, eps_high, dual_clip, ratio_cap)


_compiled_surrogate = compiled_or_eager(surrogate_of_log_ratio)


def surrogate(compile: bool) -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`surrogate_of_log_ratio`, through ``torch.compile`` if ``compile`` (eager fallback)."""
    return _compiled_surrogate if compile else surrogate_of_log_ratio


@register_loss("ppo", config=PPOConfig, requires={"old_logprobs"})
def ppo(batch: PolicyBatch, config: PPOConfig) -> LossOutput:
    """PPO-clip (see module docstring)."""
    log_ratio = batch.logprobs - batch.old_logprobs
    loss_mat, clipped, dual_active = surrogate(config.compile)(
        log_ratio, batch.advantages, config.eps_low, config.eps_high, config.dual_clip, config.ratio_cap
    )
    metrics = {
        "actor/pg_clipfrac": batch.token_fraction(clipped),
        # Without a dual clip the bound is never active: 0 exactly, without a pass over the tokens.
        "actor/pg_clipfrac_lower": batch.token_fraction(dual_active) if config.dual_clip is not None else 0.0,
        "actor/ppo_kl": -batch.token_mean(log_ratio.detach()),
    }
    return finish(batch, config, loss_mat, metrics)
