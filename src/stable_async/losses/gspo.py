"""GSPO (Group Sequence Policy Optimization, arXiv 2507.18071): a sequence-level ratio.

    s_i = exp( Σ_t m·(log π_θ − log π_old) / Σ_t m )        (length-normalized sequence ratio)
    ℓ_{i,t} = max(−s_i·A_{i,t}, −clip(s_i, 1−ε_low, 1+ε_high)·A_{i,t})

``gspo``: the gradient flows through s_i (the paper's form; OpenRLHF's ``gspo``), so with the
default ``seq-mean-token-mean`` aggregation each sequence contributes one clipped term.
``gspo_token`` (the paper's GSPO-token; veRL's ``gspo``): the per-token ratio
s_{i,t} = sg(s_i)·π_θ(a_t)/sg(π_θ(a_t)) has the value s_i but the gradient s_i·∇log π_θ(a_t),
so per-token advantages are allowed. With one advantage per sequence and
``seq-mean-token-mean`` the two have the same value and gradient.

Defaults from the paper: ε_low = 3e-4, ε_high = 4e-4, aggregation ``seq-mean-token-mean``.
Optional ``dual_clip`` c > 1 bounds the loss of a negative advantage by −c·A, as PPO's dual clip
(OpenRLHF's ``PolicyLoss(policy_loss_type="gspo", dual_clip=c)`` applies it; default off).
``compile=True`` runs the surrogate (the ratio and the clipped loss) through ``torch.compile``.
Log-ratios are clamped to ±20 (veRL clamps the token log-ratio at +10, OpenRLHF not at all;
identical on any realistic input). Metrics: ``actor/pg_clipfrac`` (token fraction clipped),
``actor/pg_clipfrac_lower`` (token fraction hit by the dual-clip bound; 0 without one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stable_async._numerics import sequence_log_ratio
from stable_async.batch import PolicyBatch
from stable_async.diagnostics import approx_kl, fraction
from stable_async.losses.base import LossConfig, LossOutput, check_clip_settings, check_flag, finish
from stable_async.losses.ppo import surrogate
from stable_async.registry import register_loss


@dataclass(frozen=True)
class GSPOConfig(LossConfig):
    """GSPO settings (paper defaults)."""

    aggregation: str = "seq-mean-token-mean"
    eps_low: float = 3e-4
    eps_high: float = 4e-4
    dual_clip: float | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_clip_settings(self.eps_low, self.eps_high, self.dual_clip)
        check_flag("compile", self.compile)


def _sequence_clipped_surrogate(batch: PolicyBatch, config: GSPOConfig, log_ratio: torch.Tensor) -> LossOutput:
    """The clipped surrogate of a (B, T) log-ratio that holds log s_i at every token of sequence i."""
    loss_mat, clipped, dual_active = surrogate(config.compile)(
        log_ratio, batch.advantages, config.eps_low, config.eps_high, config.dual_clip
    )
    metrics = {
        "actor/pg_clipfrac": fraction(clipped, batch.mask),
        "actor/pg_clipfrac_lower": fraction(dual_active, batch.mask),
        "actor/ppo_kl": approx_kl(batch.logprobs, batch.old_logprobs, batch.mask),
    }
    return finish(batch, config, loss_mat, metrics)


def _log_s(token_log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log s_i = Σ_t m·log r_t / Σ_t m, shape (B, 1)."""
    return sequence_log_ratio(token_log_ratio, mask, mean=True).unsqueeze(-1)


@register_loss("gspo", config=GSPOConfig, requires={"old_logprobs"})
def gspo(batch: PolicyBatch, config: GSPOConfig) -> LossOutput:
    """GSPO with the gradient through the sequence ratio (see module docstring)."""
    log_s = _log_s(batch.logprobs - batch.old_logprobs, batch.mask)
    return _sequence_clipped_surrogate(batch, config, log_s.expand_as(batch.logprobs))


@register_loss("gspo_token", config=GSPOConfig, requires={"old_logprobs"})
def gspo_token(batch: PolicyBatch, config: GSPOConfig) -> LossOutput:
    """GSPO-token: value s_i, gradient s_i·∇log π_θ(a_t) per token (see module docstring)."""
    lp = batch.logprobs
    log_s = _log_s(lp.detach() - batch.old_logprobs, batch.mask)
    token_log_ratio = log_s + (lp - lp.detach())  # sg(log s_i) + log π_θ − sg(log π_θ)
    return _sequence_clipped_surrogate(batch, config, token_log_ratio)
