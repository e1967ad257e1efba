"""REINFORCE / vanilla policy gradient: ℓ = −sg(ρ)·A·log π_θ.

The importance weight ρ is not part of the loss itself: pass a `RolloutCorrection` (e.g.
``RolloutCorrection(numerator="current", high=2.0)`` for ρ = min(π_θ/μ, 2)) and it multiplies
the per-token loss, detached. Without one, ρ = 1 (on-policy REINFORCE; Williams 1992). This
is veRL's ``compute_policy_loss_reinforce`` (bypass mode with ``loss_type="reinforce"``).

Metric ``actor/ppo_kl``: token mean of log π_old − log π_θ.
"""

from __future__ import annotations

from stable_async.batch import PolicyBatch
from stable_async.diagnostics import approx_kl
from stable_async.losses.base import LossConfig, LossOutput, finish
from stable_async.registry import register_loss


@register_loss("reinforce", config=LossConfig)
def reinforce(batch: PolicyBatch, config: LossConfig) -> LossOutput:
    """REINFORCE (see module docstring)."""
    loss_mat = -batch.advantages * batch.logprobs
    metrics = {"actor/ppo_kl": approx_kl(batch.logprobs, batch.old_logprobs, batch.mask)}
    return finish(batch, config, loss_mat, metrics)
