"""Clip-Cov and KL-Cov (Cui et al., "The Entropy Mechanism of Reinforcement Learning for Reasoning
Language Models", arXiv 2505.22617): restrain the few tokens whose log-prob and advantage covary
most, which drive the collapse of the policy's entropy.

For valid token t (of the whole local micro-batch, N valid tokens), with r = π_θ/π_old:

    Cov_t = (A_t − Ā)·(log π_θ(a_t) − mean log π_θ)        (Ā, means over valid tokens; detached)

``clip_cov``: PPO-clip, except that n = max(⌊ρ·N⌋, 1) tokens drawn uniformly at random from the
candidates {lb < Cov_t < ub, and the PPO clip is not already active at t} lose their gradient
(and their loss):

    ℓ_t = 0 at the drawn tokens,   max(−r·A, −clip(r, 1−ε_low, 1+ε_high)·A) elsewhere

``kl_cov``: the plain IS surrogate −r·A (no clipping), plus a KL penalty on the n = max(⌊ρ·N⌋, 1)
tokens with the largest Cov_t:

    ℓ_t = −r·A + β·|log r| at those tokens,   −r·A elsewhere

Defaults are veRL 0.9.1's (``policy_loss.loss_mode = "clip_cov" / "kl_cov"``):
ρ = ``clip_cov_ratio`` = 2e-4, lb = ``clip_cov_lb`` = 1, ub = ``clip_cov_ub`` = 5,
ε_low = ε_high = 0.2 (``clip_ratio_low/high``); ρ = ``kl_cov_ratio`` = 2e-4, β =
``ppo_kl_coef`` = 0.1 (the config's default; the loss function's own fallback, for a config
without the key, is 1). Clip-Cov has no dual clip (veRL's ``clip_cov`` applies none).

Random selection: ``torch.randperm`` over the candidates in row-major order, drawn from
``generator`` or, by default, the global CPU generator, exactly as veRL draws it: with the same
seed both select the same tokens. The selection, N and the means are per call (per rank under
data parallelism), as in veRL. veRL's means divide by N + 1e-8; here by N (a relative 1e-8 / N
on Cov, which can only matter for a Cov within that of lb, ub, or a tie for the top-n).

Metrics: ``actor/pg_clipfrac`` (Clip-Cov: fraction of valid tokens drawn; KL-Cov: fraction
penalized), ``actor/ppo_kl`` (Clip-Cov: mean of −log r; KL-Cov: mean of |log r|, veRL's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stable_async._numerics import LOG_RATIO_BOUND, masked_mean
from stable_async.batch import PolicyBatch
from stable_async.checks import check_number
from stable_async.diagnostics import fraction
from stable_async.losses.base import LossConfig, LossOutput, finish
from stable_async.losses.ppo import clipped_surrogate
from stable_async.registry import register_loss


@dataclass(frozen=True)
class ClipCovConfig(LossConfig):
    """Clip-Cov settings (veRL 0.9.1 defaults)."""

    eps_low: float = 0.2
    eps_high: float = 0.2
    clip_cov_ratio: float = 2e-4
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("eps_low", self.eps_low, low=0.0)
        check_number("eps_high", self.eps_high, low=0.0)
        check_number("clip_cov_ratio", self.clip_cov_ratio, low=0.0, high=1.0, low_open=True)
        check_number("clip_cov_lb", self.clip_cov_lb)
        check_number("clip_cov_ub", self.clip_cov_ub)
        if not self.clip_cov_lb < self.clip_cov_ub:
            raise ValueError(f"clip_cov_lb / clip_cov_ub: expected lb < ub, got {self.clip_cov_lb}, {self.clip_cov_ub}")
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {type(self.generator).__name__}")


@dataclass(frozen=True)
class KLCovConfig(LossConfig):
    """KL-Cov settings (veRL 0.9.1 defaults)."""

    kl_cov_ratio: float = 2e-4
    ppo_kl_coef: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("kl_cov_ratio", self.kl_cov_ratio, low=0.0, high=1.0, low_open=True)
        check_number("ppo_kl_coef", self.ppo_kl_coef, low=0.0)


def token_covariance(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cov_t = (A_t − Ā)(log π_t − mean log π) over valid tokens (detached; arbitrary where masked)."""
    lp, adv = logprobs.detach(), advantages.detach()
    return (adv - masked_mean(adv, mask)) * (lp - masked_mean(lp, mask))


def _selected_count(ratio: float, mask: torch.Tensor) -> int:
    return max(int(ratio * int(mask.sum())), 1)


@register_loss("clip_cov", config=ClipCovConfig, requires={"old_logprobs"})
def clip_cov(batch: PolicyBatch, config: ClipCovConfig) -> LossOutput:
    """Clip-Cov (see module docstring)."""
    mask = batch.mask
    log_ratio = (batch.logprobs - batch.old_logprobs).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    loss_mat, clipped, _ = clipped_surrogate(torch.exp(log_ratio), batch.advantages, config.eps_low, config.eps_high)
    cov = token_covariance(batch.logprobs, batch.advantages, mask)
    candidates = (cov > config.clip_cov_lb) & (cov < config.clip_cov_ub) & mask & ~clipped
    positions = torch.nonzero(candidates)
    n = min(_selected_count(config.clip_cov_ratio, mask), len(positions))
    drawn = torch.zeros_like(mask)
    if len(positions):
        chosen = positions[torch.randperm(len(positions), generator=config.generator)[:n]]
        drawn[chosen[:, 0], chosen[:, 1]] = True
    loss_mat = loss_mat * (~drawn).to(loss_mat.dtype)
    metrics = {
        "actor/pg_clipfrac": fraction(drawn, mask),
        "actor/ppo_kl": masked_mean(-log_ratio.detach(), mask),
    }
    return finish(batch, config, loss_mat, metrics)


@register_loss("kl_cov", config=KLCovConfig, requires={"old_logprobs"})
def kl_cov(batch: PolicyBatch, config: KLCovConfig) -> LossOutput:
    """KL-Cov (see module docstring)."""
    mask = batch.mask
    log_ratio = (batch.logprobs - batch.old_logprobs).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    loss_mat = -batch.advantages * torch.exp(log_ratio)
    penalized = torch.zeros_like(mask)
    valid = mask.reshape(-1).nonzero()[:, 0]
    if len(valid):
        cov = token_covariance(batch.logprobs, batch.advantages, mask).reshape(-1)[valid]
        top = valid[cov.topk(_selected_count(config.kl_cov_ratio, mask)).indices]
        penalized.view(-1)[top] = True
    loss_mat = loss_mat + config.ppo_kl_coef * log_ratio.abs() * penalized.to(loss_mat.dtype)
    metrics = {
        "actor/pg_clipfrac": fraction(penalized, mask),
        "actor/ppo_kl": masked_mean(log_ratio.detach().abs(), mask),
    }
    return finish(batch, config, loss_mat, metrics)
