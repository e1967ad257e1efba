"""CISPO (MiniMax-M1, arXiv 2506.13585): clipped IS weight, every token keeps its gradient.

    ℓ = −sg(clip(r, 1−ε_low, 1+ε_high))·A·log π_θ,   r = exp(log π_θ − log π_old)

Unlike PPO, a clipped token is not dropped: only its weight is bounded. The lower bound is
usually off: the default ε_low = 1 makes it 0 (ratios are positive). Default ε_high = 4
(a weight cap of 5, TRL's recommended ``epsilon_high`` for ``cispo`` is this absolute cap; pass
``eps_high = cap − 1``). veRL's ``cispo`` reads its ε from ``clip_ratio_low/high``.

Metric ``actor/pg_clipfrac``: token fraction whose weight was clipped.
"""

from __future__ import annotations

from dataclasses import dataclass

from stable_async._numerics import safe_exp
from stable_async.batch import PolicyBatch
from stable_async.losses.base import LossConfig, LossOutput, check_positive, finish
from stable_async.registry import register_loss


@dataclass(frozen=True)
class CISPOConfig(LossConfig):
    """CISPO settings."""

    eps_low: float = 1.0
    eps_high: float = 4.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("eps_low", self.eps_low, allow_zero=True)
        check_positive("eps_high", self.eps_high, allow_zero=True)


@register_loss("cispo", config=CISPOConfig, requires={"old_logprobs"})
def cispo(batch: PolicyBatch, config: CISPOConfig) -> LossOutput:
    """CISPO (see module docstring)."""
    log_ratio = batch.logprobs.detach() - batch.old_logprobs  # no graph: the weight is detached
    ratio = safe_exp(log_ratio)
    weight = ratio.clamp(1.0 - config.eps_low, 1.0 + config.eps_high)
    loss_mat = -weight * batch.advantages * batch.logprobs
    metrics = {
        "actor/pg_clipfrac": batch.token_fraction(weight != ratio),
        "actor/pg_clipfrac_lower": batch.token_fraction(ratio < 1.0 - config.eps_low),
        "actor/ppo_kl": -batch.token_mean(log_ratio),
    }
    return finish(batch, config, loss_mat, metrics)
