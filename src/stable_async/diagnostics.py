"""Diagnostics: effective sample size, IS-weight statistics, mismatch KL, clip fractions.

Metric names follow veRL by default. Each is a *token mean* (over valid tokens of the local
micro-batch) unless the table says *sequence*:

| metric | averaged over | meaning |
|---|---|---|
| `actor/pg_loss` | — | the aggregated loss value |
| `actor/pg_clipfrac` | tokens | fraction of tokens whose clipped (or masked) term is active |
| `actor/pg_clipfrac_lower` | tokens | PPO: the dual-clip bound is active (A < 0); see each loss's docs |
| `actor/ppo_kl` | tokens | mean of −log(π_θ/π_old), an approximate KL |
| `rollout_corr/rollout_is_mean`, `_std`, `_min`, `_max` | tokens | the applied correction weights |
| `rollout_corr/rollout_is_eff_sample_size` | tokens | ESS/N of the applied weights (veRL's form) |
| `rollout_corr/rollout_is_ratio_fraction_high` | tokens (sequences†) | raw ratio above `high` (ratio gates only) |
| `rollout_corr/rollout_is_ratio_fraction_low` | tokens (sequences†) | raw ratio below `low` (ratio gates only) |
| `rollout_corr/rollout_rs_masked_fraction` | tokens | fraction of tokens zeroed by a mask mode |
| `rollout_corr/rollout_rs_seq_masked_fraction` | sequences | fraction of sequences with a zeroed token |
| `rollout_corr/truncated_fraction` | tokens | fraction of tokens whose weight was clamped |
| `rollout_corr/kl` | tokens | mean k1 = log μ − log π_num |
| `rollout_corr/k3_kl` | tokens | mean k3 of π_num against μ |

† a sequence mean for `level="sequence"` / `"geometric"` corrections.

ESS (Kong 1992): ESS = (Σ ρ)² / Σ ρ². With λ = log ρ it is exp(2·logsumexp(λ) − logsumexp(2λ)),
computed as S1²/S2 with S1 = Σ e^(λ−M), S2 = Σ e^(2(λ−M)) and M = max λ: every term is ≤ 1,
so it is finite for any λ (the reference VCPO code exponentiates first and overflows at
log-ratios of a few hundred), and exactly N when all weights are equal. Across data-parallel
ranks M is max-reduced and (S1, S2, N) sum-reduced, so the result equals the ESS of the
concatenated batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from stable_async._numerics import compute_dtype, count_true, masked_max, masked_mean, masked_min, masked_sum
from stable_async.checks import check_choice, check_mask, check_optional_number, check_str, check_tensor
from stable_async.distributed import all_reduce_max, all_reduce_sum


@dataclass
class ESSResult:
    """Effective sample size of a set of importance weights.

    Attributes:
        ess: (Σρ)²/Σρ², in [1, N] (0 when N = 0).
        ess_ratio: ESS / N in (0, 1] (1 when N = 0: nothing to correct).
        n: the number of weights N (sequences or tokens, over all ranks).
    """

    ess: float
    ess_ratio: float
    n: float

    def metrics(self, prefix: str = "rollout_corr/") -> dict[str, float]:
        check_str("prefix", prefix)
        return {f"{prefix}ess": self.ess, f"{prefix}ess_ratio": self.ess_ratio}


def effective_sample_size(
    log_weights: torch.Tensor,
    mask: torch.Tensor | None = None,
    level: str = "sequence",
    process_group: Any = None,
    max_log_weight: float | None = None,
) -> ESSResult:
    """ESS of importance weights given as per-token log-weights.

    Args:
        log_weights: (B, T) per-token log ρ_t, e.g. ``logprobs − rollout_logprobs``; or (N,)
            per-sample log-weights (then ``level`` is ignored).
        mask: (B, T) valid tokens (default: all valid).
        level: ``"sequence"``: one weight per sequence, log ρ_i = Σ_t m·log ρ_t (VCPO's choice);
            sequences without a valid token are left out. ``"token"``: one weight per valid token.
        process_group: reduce over this data-parallel group (default: the default group if
            initialized); one max-all-reduce of one number and one sum-all-reduce of three (S1, S2, N).
        max_log_weight: optional clip of the log-weights from above (the "clipped" variant); a
            finite number.

    Raises:
        ValueError / TypeError naming the argument: a mask that is not bool or 0/1, of another
            shape or device; NaN/inf log-weights at valid positions; a non-finite ``max_log_weight``.
    """
    check_choice("level", level, ("sequence", "token"))
    check_tensor("log_weights", log_weights, floating=True)
    max_log_weight = check_optional_number("max_log_weight", max_log_weight)
    lw = log_weights.detach().to(compute_dtype(log_weights))
    if lw.dim() not in (1, 2):
        raise ValueError(f"log_weights: expected a (B, T) or (N,) tensor, got shape {tuple(lw.shape)}")
    if mask is None:
        m = torch.ones_like(lw, dtype=torch.bool)
    else:
        m = check_mask("mask", mask, shape=tuple(lw.shape), device=lw.device, what="like log_weights")
    if lw.dim() == 2 and level == "sequence":
        flat, keep = masked_sum(lw, m, dim=-1), m.any(dim=-1)
    else:
        flat, keep = lw.reshape(-1), m.reshape(-1)
    if keep.any() and not bool(torch.isfinite(flat[keep]).all()):
        raise ValueError("log_weights: NaN/inf at a valid position")
    if max_log_weight is not None:
        flat = flat.clamp(max=max_log_weight)
    # With M the global max of λ: S1 = Σ e^(λ−M), S2 = Σ e^(2(λ−M)), ESS = S1² / S2, each term ≤ 1.
    local_max = flat[keep].max() if bool(keep.any()) else torch.tensor(float("-inf"), dtype=flat.dtype)
    global_max = all_reduce_max(local_max.to(flat.device), process_group)
    if not bool(torch.isfinite(global_max)):
        return ESSResult(ess=0.0, ess_ratio=1.0, n=0.0)
    shifted = torch.exp(torch.where(keep, flat - global_max, torch.full_like(flat, float("-inf"))))
    sums = all_reduce_sum(torch.stack([shifted.sum(), (shifted**2).sum(), keep.to(flat.dtype).sum()]), process_group)
    s1, s2, n = sums[0], sums[1], float(sums[2])
    ess = float((s1 * s1 / s2).clamp(min=1.0, max=n))
    return ESSResult(ess=ess, ess_ratio=ess / n, n=n)


def weight_stats(
    weights: torch.Tensor,
    mask: torch.Tensor,
    prefix: str = "rollout_corr/rollout_is_",
) -> dict[str, torch.Tensor]:
    """Token mean / std / min / max of (applied) weights, and veRL's ESS/N of them.

    ESS/N here is veRL's ``rollout_is_eff_sample_size``: 1 / mean((w / mean w)²) over valid
    tokens, a token-level ratio in (0, 1].
    """
    mean = masked_mean(weights, mask)
    var = (masked_mean(weights**2, mask) - mean**2).clamp(min=0.0)
    normalized = weights / mean.clamp(min=1e-30)
    second = masked_mean(normalized**2, mask)
    return {
        f"{prefix}mean": mean,
        f"{prefix}std": var.sqrt(),
        f"{prefix}min": masked_min(weights, mask),
        f"{prefix}max": masked_max(weights, mask),
        f"{prefix}eff_sample_size": torch.where(second > 0, 1.0 / second.clamp(min=1e-30), torch.ones_like(second)),
    }


def mismatch_kl(
    logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    mask: torch.Tensor,
    prefix: str = "rollout_corr/",
) -> dict[str, torch.Tensor]:
    """Token means of k1 = log μ − log π and k3 = π/μ − 1 − log(π/μ): the trainer–engine mismatch."""
    from stable_async.divergence import k1, k3

    return {
        f"{prefix}kl": masked_mean(k1(logprobs, rollout_logprobs), mask),
        f"{prefix}k3_kl": masked_mean(k3(logprobs, rollout_logprobs), mask),
    }


def approx_kl(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token mean of −log(π_θ/π_old): veRL's ``actor/ppo_kl``."""
    return masked_mean(old_logprobs.detach() - logprobs.detach(), mask)


def fraction(condition: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token mean of a boolean condition over valid positions (a clip or mask fraction), fp32."""
    if condition.dtype == torch.bool and mask.dtype == torch.bool and condition.shape == mask.shape:
        # Integer counts: exact, and no float copies of the condition or the mask.
        hits = count_true(condition & mask).to(torch.float32)
        return hits / count_true(mask).to(torch.float32).clamp(min=1.0)
    return masked_mean(condition.to(torch.float32), mask)
