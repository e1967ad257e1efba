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

from stable_async._known_gradient import with_known_gradient
from stable_async._numerics import LOG_RATIO_BOUND, float_mask, safe_exp, select_bool
from stable_async.batch import PolicyBatch
from stable_async.diagnostics import approx_kl, fraction
from stable_async.losses.base import LossConfig, LossOutput, check_clip_settings, check_positive, finish
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
        check_clip_settings(self.eps_low, self.eps_high, self.dual_clip)
        if self.ratio_cap is not None:
            check_positive("ratio_cap", self.ratio_cap)


def clipped_surrogate(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None = None,
    ratio_cap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO surrogate of a given ratio, and the (clipped, dual-clip-active) masks.

    Shared by ``ppo``, ``gspo``/``gspo_token`` (sequence ratio) and ``decoupled_ppo``.
    """
    unclipped_ratio = ratio if ratio_cap is None else ratio.clamp(max=ratio_cap)
    neg_adv = -advantages.detach() if not advantages.requires_grad else -advantages
    loss_unclipped = neg_adv * unclipped_ratio
    loss_clipped = neg_adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(loss_unclipped, loss_clipped)
    clipped = loss_clipped > loss_unclipped
    if dual_clip is None:
        return loss, clipped, torch.zeros_like(clipped)
    dual_bound = neg_adv * dual_clip
    negative = advantages < 0
    dual_active = (loss > dual_bound) & negative
    return torch.where(negative, torch.minimum(loss, dual_bound), loss), clipped, dual_active


def fused_clipped_surrogate(
    log_ratio: torch.Tensor,
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None = None,
    ratio_cap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`clipped_surrogate` of r = exp(clamp(log_ratio, ±20)) for a log-ratio that moves one for one
    with ``logprobs`` (∂ log_ratio / ∂ logprobs = 1 elementwise; ``log_ratio`` itself detached).

    The value is computed without a graph together with its derivative, which autograd would
    produce through ``exp``, ``clamp``, ``maximum`` and ``minimum``:

        ∂ℓ/∂log π = −A·r · 1[|log r| ≤ 20] · g,   g = 1[r ≤ cap]            where −A·r̃ ≥ −A·clip(r)
                                                     g = 1[1−ε_low ≤ r ≤ 1+ε_high]  otherwise
        and 0 where the dual clip bounds the loss.

    For A ≥ 0 the loss is ≤ 0 ≤ c·|A|, so the dual clip is ``minimum(ℓ, c·|A|)`` for every token,
    which equals −c·A exactly where A < 0. At an exact tie between the loss and the dual-clip
    bound autograd would split the gradient in halves; here the unbounded side is taken.
    Returns (loss with that gradient, clipped mask, dual-clip-active mask or None).
    """
    with torch.no_grad():
        clamped = log_ratio.clamp(min=-LOG_RATIO_BOUND, max=LOG_RATIO_BOUND)
        ratio = torch.exp(clamped)
        neg_adv = -advantages
        neg_adv_ratio = neg_adv * ratio
        loss_unclipped = neg_adv_ratio if ratio_cap is None else neg_adv * ratio.clamp(max=ratio_cap)
        loss_clipped = neg_adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
        unclipped_wins = loss_unclipped >= loss_clipped
        loss = torch.maximum(loss_unclipped, loss_clipped)
        # Without a cap, the clipped branch can only win where r is outside the clip range (zero
        # gradient); with one it can win inside the range (r > cap, A < 0) and carry −A.
        if ratio_cap is None:
            open_gradient = unclipped_wins & (clamped == log_ratio)
        else:
            open_gradient = _capped_gradient_gate(ratio, unclipped_wins, eps_low, eps_high, ratio_cap)
            open_gradient &= clamped == log_ratio
        dual_active = None
        if dual_clip is not None:
            bound = advantages.abs() * dual_clip
            dual_active = loss > bound
            loss = torch.minimum(loss, bound)
            open_gradient &= ~dual_active
        derivative = neg_adv_ratio * float_mask(open_gradient, ratio.dtype)
    return with_known_gradient(logprobs, loss, derivative), ~unclipped_wins, dual_active


def _capped_gradient_gate(
    ratio: torch.Tensor, unclipped_wins: torch.Tensor, eps_low: float, eps_high: float, ratio_cap: float
) -> torch.Tensor:
    inside = (ratio >= 1.0 - eps_low) & (ratio <= 1.0 + eps_high)
    return select_bool(unclipped_wins, ratio <= ratio_cap, inside)


@register_loss("ppo", config=PPOConfig)
def ppo(batch: PolicyBatch, config: PPOConfig) -> LossOutput:
    """PPO-clip (see module docstring)."""
    if not batch.advantages.requires_grad:
        log_ratio = batch.logprobs.detach() - batch.old_logprobs
        loss_mat, clipped, dual_active = fused_clipped_surrogate(
            log_ratio, batch.logprobs, batch.advantages, config.eps_low, config.eps_high, config.dual_clip,
            config.ratio_cap,
        )  # fmt: skip
        metrics = {
            "actor/pg_clipfrac": batch.token_fraction(clipped),
            "actor/pg_clipfrac_lower": 0.0 if dual_active is None else batch.token_fraction(dual_active),
            "actor/ppo_kl": -batch.token_mean(log_ratio),
        }
        return finish(batch, config, loss_mat, metrics)
    log_ratio = batch.logprobs - batch.old_logprobs
    ratio = safe_exp(log_ratio)
    loss_mat, clipped, dual_active = clipped_surrogate(
        ratio, batch.advantages, config.eps_low, config.eps_high, config.dual_clip, config.ratio_cap
    )
    mask = batch.mask
    if mask.dtype == torch.bool and log_ratio.shape == mask.shape and clipped.shape == mask.shape:
        # One valid-token count for every metric, and actor/ppo_kl from the log-ratio already computed
        # (old − new = −(new − old) exactly, so −Σ(new − old) is the same number as Σ(old − new)).
        n = mask.sum()
        n_frac = n.to(torch.float32).clamp(min=1.0)
        zero = torch.zeros((), dtype=log_ratio.dtype, device=log_ratio.device)
        kl = -torch.where(mask, log_ratio.detach(), zero).sum() / n.to(log_ratio.dtype).clamp(min=1.0)
        metrics = {
            "actor/pg_clipfrac": (clipped & mask).sum().to(torch.float32) / n_frac,
            "actor/pg_clipfrac_lower": (dual_active & mask).sum().to(torch.float32) / n_frac
            if config.dual_clip is not None
            else 0.0,
            "actor/ppo_kl": kl,
        }
        return finish(batch, config, loss_mat, metrics)
    metrics = {
        "actor/pg_clipfrac": fraction(clipped, batch.mask),
        # Without a dual clip the bound is never active: 0 exactly, without a pass over the tokens.
        "actor/pg_clipfrac_lower": fraction(dual_active, batch.mask) if config.dual_clip is not None else 0.0,
        "actor/ppo_kl": approx_kl(batch.logprobs, batch.old_logprobs, batch.mask),
    }
    return finish(batch, config, loss_mat, metrics)
