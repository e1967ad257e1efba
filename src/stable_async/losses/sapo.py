"""SAPO (Soft Adaptive Policy Optimization, arXiv 2511.20347): a sigmoid gate instead of a clip.

    f_τ(r) = σ(τ·(r − 1))·4/τ,   τ = τ_pos if A > 0 else τ_neg,   ℓ = −f_τ(r)·A

with r = exp(log π_θ − log π_old) (log-ratio clamped to ±20). f_τ(1) = 2/τ and f_τ'(1) = 1, so
near the old policy SAPO is the plain policy gradient; far from it the gradient fades softly
instead of being cut. Defaults τ_pos = 1.0, τ_neg = 1.05 (TRL's) and aggregation
``seq-mean-token-mean`` (veRL forces this mode for ``sapo``; TRL uses it for ``loss_type="sapo"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stable_async._numerics import safe_exp
from stable_async.batch import PolicyBatch
from stable_async.diagnostics import approx_kl
from stable_async.losses.base import LossConfig, LossOutput, check_positive, finish
from stable_async.registry import register_loss


@dataclass(frozen=True)
class SAPOConfig(LossConfig):
    """SAPO settings."""

    aggregation: str = "seq-mean-token-mean"
    tau_pos: float = 1.0
    tau_neg: float = 1.05

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("tau_pos", self.tau_pos)
        check_positive("tau_neg", self.tau_neg)


@register_loss("sapo", config=SAPOConfig, requires={"old_logprobs"})
def sapo(batch: PolicyBatch, config: SAPOConfig) -> LossOutput:
    """SAPO (see module docstring)."""
    ratio = safe_exp(batch.logprobs - batch.old_logprobs)
    tau_pos = torch.tensor(config.tau_pos, dtype=ratio.dtype, device=ratio.device)
    tau_neg = torch.tensor(config.tau_neg, dtype=ratio.dtype, device=ratio.device)
    tau = torch.where(batch.advantages > 0, tau_pos, tau_neg)
    gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    loss_mat = -gate * batch.advantages
    metrics = {"actor/ppo_kl": approx_kl(batch.logprobs, batch.old_logprobs, batch.mask)}
    return finish(batch, config, loss_mat, metrics)
