"""PPO's clipped surrogate evaluated together with its derivative: one autograd node, one multiply backward.

For a log-ratio that moves one for one with log π_θ (``ppo``: log π_θ − log π_old; ``gspo_token``:
the sequence log-ratio, whose token form sg(log s_i) + log π_θ − sg(log π_θ) has derivative 1),
with r = exp(clamp(log_ratio, ±20)), r̃ = min(r, cap) and advantage A:

    ℓ = max(−r̃·A, −clip(r, 1−ε_low, 1+ε_high)·A),   then min(ℓ, −c·A) where A < 0 (dual clip)

    ∂ℓ/∂log π = −A·r · 1[|log r| ≤ 20] · g,   g = 1[r ≤ cap]                  where −r̃·A ≥ −clip(r)·A
                                                 g = 1[1−ε_low ≤ r ≤ 1+ε_high]   otherwise
                and 0 where the dual-clip bound is active.

This is the derivative autograd produces through ``exp``, ``clamp``, ``maximum`` and ``minimum``
(a tie between the two branches has equal branch gradients, so taking the unclipped side is
exact). For A ≥ 0 the loss is ≤ 0 ≤ c·|A|, so the dual clip is ``minimum(ℓ, c·|A|)`` for every
token, which equals −c·A exactly where A < 0. The one deliberate difference: at an exact tie
between the loss and the dual-clip bound autograd's ``minimum`` splits the gradient in halves,
here the unbounded side keeps it. Schulman et al. 2017 (arXiv 1707.06347), dual clip Ye et al.
2019 (arXiv 1912.09729), clip-higher DAPO (arXiv 2503.14476).
"""

from __future__ import annotations

import torch

from stable_async._compile import compiled_or_eager
from stable_async._known_gradient import with_known_gradient
from stable_async._numerics import LOG_RATIO_BOUND, count_true, float_mask, select_bool
from stable_async.batch import PolicyBatch


def surrogate_value_and_derivative(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None,
    ratio_cap: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(ℓ, ∂ℓ/∂log π, number of clipped valid tokens, number of valid tokens at the dual-clip
    bound or None), all without a graph; the counts are integer 0-dim tensors.

    ``log_ratio`` may be (B, T) or (B, 1) (broadcast over the tokens); ``advantages`` and the
    bool ``mask`` are (B, T). Counts rather than bool masks come out so that a compiled version
    writes no bool tensors (slow in inductor's CPU code).
    """
    clamped = log_ratio.clamp(min=-LOG_RATIO_BOUND, max=LOG_RATIO_BOUND)
    ratio = torch.exp(clamped)
    neg_adv = -advantages
    neg_adv_ratio = neg_adv * ratio
    loss_unclipped = neg_adv_ratio if ratio_cap is None else neg_adv * ratio.clamp(max=ratio_cap)
    loss_clipped = neg_adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    unclipped_wins = loss_unclipped >= loss_clipped
    loss = torch.maximum(loss_unclipped, loss_clipped)
    if ratio_cap is None:
        # The clipped branch can only win where r is outside the clip range: zero gradient there.
        open_gradient = unclipped_wins & (clamped == log_ratio)
    else:
        # With a cap it can also win inside the range (r > cap, A < 0), and then carries −A·r.
        inside = (ratio >= 1.0 - eps_low) & (ratio <= 1.0 + eps_high)
        open_gradient = select_bool(unclipped_wins, ratio <= ratio_cap, inside) & (clamped == log_ratio)
    dual_count = None
    if dual_clip is not None:
        bound = advantages.abs() * dual_clip
        dual_active = loss > bound
        loss = torch.minimum(loss, bound)
        open_gradient = open_gradient & ~dual_active
        dual_count = count_true(dual_active & mask)
    derivative = neg_adv_ratio * float_mask(open_gradient, ratio.dtype)
    return loss, derivative, count_true(~unclipped_wins & mask), dual_count


_compiled_value_and_derivative = compiled_or_eager(surrogate_value_and_derivative)


def fused_clipped_surrogate(
    log_ratio: torch.Tensor,
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None = None,
    ratio_cap: float | None = None,
    compile: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The surrogate of ``log_ratio`` (detached) with its gradient attached to ``logprobs``.

    Returns (per-token loss, clipped valid-token count, dual-clip-active valid-token count or
    None). ``compile=True`` runs the elementwise core through ``torch.compile`` (see
    `stable_async._compile`): the same formulas, values within a few ulp of the eager ones
    (vectorized ``exp``).
    """
    core = _compiled_value_and_derivative if compile else surrogate_value_and_derivative
    with torch.no_grad():
        loss, derivative, clipped, dual_active = core(
            log_ratio.detach(), advantages.detach(), mask, eps_low, eps_high, dual_clip, ratio_cap
        )
    return with_known_gradient(logprobs, loss, derivative), clipped, dual_active


def surrogate_metrics(
    batch: PolicyBatch, clipped: torch.Tensor, dual_active: torch.Tensor | None, log_ratio: torch.Tensor
) -> dict[str, torch.Tensor | float]:
    """veRL's PPO metrics from `fused_clipped_surrogate`'s counts and the (B, T) token log-ratio
    log π_θ − log π_old: ``actor/pg_clipfrac``, ``actor/pg_clipfrac_lower`` (0 without a dual
    clip), ``actor/ppo_kl`` (token mean of log π_old − log π_θ)."""
    return {
        "actor/pg_clipfrac": batch.count_fraction(clipped),
        "actor/pg_clipfrac_lower": 0.0 if dual_active is None else batch.count_fraction(dual_active),
        "actor/ppo_kl": -batch.token_mean(log_ratio),
    }
