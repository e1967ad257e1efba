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
``compile=True`` (``gspo_token`` only) runs the fused surrogate core through ``torch.compile``.
Log-ratios are clamped to ±20 (veRL clamps the token log-ratio at +10, OpenRLHF not at all;
identical on any realistic input). Metrics: ``actor/pg_clipfrac`` (token fraction clipped),
``actor/pg_clipfrac_lower`` (token fraction hit by the dual-clip bound; 0 without one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stable_async._numerics import LOG_RATIO_BOUND, sequence_log_ratio
from stable_async.batch import PolicyBatch
from stable_async.diagnostics import approx_kl, fraction
from stable_async.losses.base import LossConfig, LossOutput, check_clip_settings, check_flag, finish
from stable_async.losses.fused_surrogate import fused_clipped_surrogate, surrogate_metrics
from stable_async.losses.ppo import clipped_surrogate
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


def _clipped_surrogate(batch: PolicyBatch, config: GSPOConfig, log_ratio: torch.Tensor) -> LossOutput:
    ratio = torch.exp(log_ratio.clamp(min=-LOG_RATIO_BOUND, max=LOG_RATIO_BOUND))
    loss_mat, clipped, dual_active = clipped_surrogate(
        ratio, batch.advantages, config.eps_low, config.eps_high, config.dual_clip
    )
    metrics = {
        "actor/pg_clipfrac": fraction(clipped, batch.mask),
        "actor/pg_clipfrac_lower": fraction(dual_active, batch.mask),
        "actor/ppo_kl": approx_kl(batch.logprobs, batch.old_logprobs, batch.mask),
    }
    return finish(batch, config, loss_mat, metrics)


def _sequence_log_ratio(batch: PolicyBatch) -> torch.Tensor:
    return sequence_log_ratio(batch.logprobs - batch.old_logprobs, batch.mask, mean=True)


@register_loss("gspo", config=GSPOConfig, requires={"old_logprobs"})
def gspo(batch: PolicyBatch, config: GSPOConfig) -> LossOutput:
    """GSPO with the gradient through the sequence ratio (see module docstring)."""
    if config.compile:
        raise ValueError(
            "compile: only gspo_token has a compiled core (gspo's gradient runs through the sequence mean)"
        )
    log_s = _sequence_log_ratio(batch).unsqueeze(-1).expand_as(batch.logprobs)
    return _clipped_surrogate(batch, config, log_s)


@register_loss("gspo_token", config=GSPOConfig, requires={"old_logprobs"})
def gspo_token(batch: PolicyBatch, config: GSPOConfig) -> LossOutput:
    """GSPO-token: value s_i, gradient s_i·∇log π_θ(a_t) per token (see module docstring)."""
    if batch.advantages.requires_grad:
        log_s = _sequence_log_ratio(batch).detach().unsqueeze(-1)
        return _clipped_surrogate(batch, config, log_s + batch.logprobs - batch.logprobs.detach())
    # The token log-ratio sg(log s_i) + log π_θ − sg(log π_θ) moves one for one with log π_θ: the
    # fused surrogate applies, on the (B, 1) sequence log-ratio broadcast over the tokens.
    token_log_ratio = batch.logprobs.detach() - batch.old_logprobs
    log_s = sequence_log_ratio(token_log_ratio, batch.mask, mean=True).unsqueeze(-1)
    loss_mat, clipped, dual_active = fused_clipped_surrogate(
        log_s, batch.logprobs, batch.advantages, batch.mask, config.eps_low, config.eps_high, config.dual_clip,
        compile=config.compile,
    )  # fmt: skip
    return finish(batch, config, loss_mat, surrogate_metrics(batch, clipped, dual_active, token_log_ratio))
