"""VESPO (arXiv 2602.10693): a smooth Gamma-shaped weight on the sequence IS ratio instead of clipping.

With the sequence ratio w_i = Π_t r_{i,t} · Π_t ρ_{i,t} (r = π_θ/π_old, ρ the optional token-level
rollout correction weight π_old/μ), evaluated in log space and clamped to [log 1e-8, 20]:

    φ(w) = exp(λ + k·log w − λ·w) = e^λ · w^k · e^{−λw}      (φ(1) = 1, the mode at w = k/λ)
    ℓ_{i,t} = −sg(φ(w_i))·A_{i,t}·log π_θ(a_t)

with (k, λ) = (k_pos, λ_pos) where A ≥ 0 and (k_neg, λ_neg) where A < 0. φ is detached: it only
scales the REINFORCE gradient A·∇log π_θ, smoothly, vanishing for w → 0 (k > 0) and w → ∞.
The log-ratio of each token is clamped to ±20 before the sum; log ρ to [log 1e-8, 20].

Defaults: TRL 1.16's ``loss_type="vespo"`` (``vespo_k_pos=2``, ``vespo_lambda_pos=3``,
``vespo_k_neg=3``, ``vespo_lambda_neg=2``), aggregated like TRL (``token-mean`` over the
global token count: pass ``global_num_tokens``). TRL also clamps λ at 1e-4 from below; here λ
must be > 0 and is used as given (identical for λ ≥ 1e-4).

Corrections: a token-level `RolloutCorrection` given as ``correction=`` is folded into w (its
weights ρ enter the product; a masked token's ρ = 0 is clamped to 1e-8, which all but zeroes
φ), exactly as TRL folds its vLLM ``token_truncate`` / ``token_mask`` ratio into VESPO's weight
instead of multiplying the loss by it. A sequence- or geometric-level correction's weight W_i
enters w once (TRL refuses its ``sequence_*`` modes with VESPO; this is our extension). OPSM
(`stable_async.opsm`) still multiplies the loss.

Metric: ``vespo/phi_mean``, the mean of φ over valid tokens (TRL's ``vespo/phi_seq_mean`` is
this with per-token advantages; with one advantage per sequence TRL averages over sequences).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from stable_async._numerics import LOG_RATIO_BOUND, masked_mean, masked_sum
from stable_async.batch import PolicyBatch
from stable_async.checks import check_number
from stable_async.correction_chain import split_corrections
from stable_async.losses.base import LossConfig, LossOutput, finish
from stable_async.registry import register_loss

LOG_W_MIN = math.log(1e-8)


@dataclass(frozen=True)
class VESPOConfig(LossConfig):
    """VESPO settings (TRL 1.16 defaults)."""

    k_pos: float = 2.0
    lambda_pos: float = 3.0
    k_neg: float = 3.0
    lambda_neg: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("k_pos", "k_neg"):
            check_number(name, getattr(self, name), low=0.0)
        for name in ("lambda_pos", "lambda_neg"):
            check_number(name, getattr(self, name), low=0.0, low_open=True)


def gamma_weight(log_w: torch.Tensor, k: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """φ(w) = exp(λ + k·log w − λ·w), 0 where it is not finite."""
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


@register_loss("vespo", config=VESPOConfig, requires={"old_logprobs"})
def vespo(batch: PolicyBatch, config: VESPOConfig) -> LossOutput:
    """VESPO (see module docstring)."""
    mask = batch.mask
    log_ratio = (batch.logprobs.detach() - batch.old_logprobs).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    seq_log_w = masked_sum(log_ratio, mask, dim=-1)
    metrics: dict = {}
    rollout_weights, masks = split_corrections(config.correction)
    for correction in getattr(rollout_weights, "corrections", () if rollout_weights is None else (rollout_weights,)):
        result = correction(batch)
        log_rho = torch.log(result.weights).clamp(LOG_W_MIN, LOG_RATIO_BOUND)
        # Token weights multiply into w; a sequence-level weight (the same at every token) enters once.
        fold = masked_sum if getattr(correction, "level", None) == "token" else masked_mean
        seq_log_w = seq_log_w + fold(log_rho, mask, dim=-1)
        metrics.update(result.metrics)
    log_w = seq_log_w.clamp(LOG_W_MIN, LOG_RATIO_BOUND).unsqueeze(-1)
    nonneg = batch.advantages >= 0
    k = torch.where(nonneg, config.k_pos, config.k_neg).to(log_w.dtype)
    lam = torch.where(nonneg, config.lambda_pos, config.lambda_neg).to(log_w.dtype)
    phi = gamma_weight(log_w, k, lam)
    loss_mat = -phi * batch.advantages * batch.logprobs
    metrics["vespo/phi_mean"] = masked_mean(phi.expand_as(mask), mask)
    return finish(batch, dataclasses.replace(config, correction=masks), loss_mat, metrics)
