"""M2PO (Second-Moment Trust Policy Optimization, arXiv 2510.01161): mask the worst tokens, no clip.

Per valid token, the second moment of the behavior log-ratio

    m_t = (log μ − log π_old)²            (``numerator="old"``, default; AReaL)
    m_t = (log μ − sg(log π_θ))²          (``numerator="current"``; the paper's log(π_θ/π_behav))

Masking (the paper's Algorithm 1): while the mean of the remaining m_t is > τ, drop the token
with the largest m_t. So the kept set is the largest set of smallest-m tokens whose mean is
≤ τ; nothing is dropped when mean(m) ≤ τ, and everything is dropped when even min(m) > τ.
Then, with M_t the result and r = exp(log π_θ − log π_old) (clamped to ±20):

    ℓ_t = −M_t·r·A,     loss = Σ_valid ℓ_t / N_valid   (token-mean; dropped tokens stay in N_valid)

No ratio clipping: the M2 mask is the trust region. Default τ = 0.04 (``m2_threshold``, the
paper's τ_M2, used in all of its experiments).

Selection scope (``scope``): ``"global"`` (default) selects over the whole batch *across
data-parallel ranks*, so the mask does not depend on how the batch is sharded. It needs no
all-gather: the cut value is found by a 256-ary search over the bit patterns of the (non-
negative, fp64) m values with all-reduced counts and sums: at most 8 rounds of one sum-reduce
of 510 numbers, plus three small reductions (only one when mean(m) ≤ τ). Every rank must call the
loss the same number of times, as for any collective. ``"local"`` selects within this call's tokens
only (AReaL's behavior: per micro-batch, per rank). Without a process group both are the same.

Ties at the cut: when only e of the n tokens sharing the cut value may stay, each of them gets
the weight e/n instead of an arbitrary 0/1 choice — the average over tie-breaking orders, so the
result is independent of token order and sharding (the kept m-sum and count equal those of any
largest-first removal order). Without exact ties the mask is 0/1.

Differences from the reference code:

* AReaL (``_apply_m2po_masking``) stops at the first suffix mean *strictly* below τ, never masks
  the last token (if every suffix mean is ≥ τ it keeps the smallest one), selects per micro-batch
  on each rank, and then divides by the *kept* token count; it also still applies its PPO clip
  (its example sets ``eps_clip: 0.0``) and the behavior weight. We follow the paper: stop at
  mean ≤ τ, allow an all-masked batch (loss 0, zero gradient), keep masked tokens in the
  denominator (the paper's 1/Σ|o_i|), select globally, no clip. Compose a `RolloutCorrection`
  for a behavior weight.
* The authors' code (Infini-AI-Lab/M2PO, verl ``compute_m2po_policy_loss``) does not mask: it
  restricts to "harmful" tokens (A > 0 and r > 1, or A < 0 and r < 1), finds a bound τ on |Δ|
  such that the capped second moment meets the budget, and PPO-clips with bounds exp(±τ). With
  rollout-time log-probs as π_old there, Δ is log π_θ − log μ. Not implemented here.

Metrics: ``actor/m2po_masked_fraction`` (token fraction dropped), ``actor/m2po_m2_before`` and
``actor/m2po_m2_after`` (mean m over valid / kept tokens) — all over the selection scope (global
with ``scope="global"``); ``actor/ppo_kl`` (local token mean of log π_old − log π_θ).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from stable_async._numerics import safe_exp
from stable_async.batch import PolicyBatch
from stable_async.diagnostics import approx_kl
from stable_async.distributed import all_reduce_max, all_reduce_sum
from stable_async.losses.base import LossConfig, LossOutput, check_positive, finish
from stable_async.registry import register_loss

NUMERATORS = ("old", "current")
SCOPES = ("global", "local")
_PROBES = 255  # thresholds tested per search round: the interval shrinks 256-fold per all-reduce


@dataclass(frozen=True)
class M2POConfig(LossConfig):
    """M2PO settings (paper defaults).

    Attributes:
        m2_threshold: τ, the bound on the mean second moment of the kept tokens (≥ 0).
        numerator: ``"old"`` (m = (log μ − log π_old)², AReaL) or ``"current"``
            (m = (log μ − log π_θ)², detached; use it when ``old_logprobs`` is not recomputed).
        scope: ``"global"`` (select across data-parallel ranks) or ``"local"`` (this call only).
        process_group: the data-parallel group for ``scope="global"`` (default: the default group).
    """

    m2_threshold: float = 0.04
    numerator: str = "old"
    scope: str = "global"
    process_group: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("m2_threshold", self.m2_threshold, allow_zero=True)
        if self.numerator not in NUMERATORS:
            raise ValueError(f"numerator: expected one of {list(NUMERATORS)}, got {self.numerator!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope: expected one of {list(SCOPES)}, got {self.scope!r}")


@dataclass
class M2Selection:
    """Result of `m2_keep_weights`.

    Attributes:
        weights: (B, T) keep weights in [0, 1] (1 kept, 0 dropped, e/n for ties at the cut;
            0 at masked positions), in the dtype of the input.
        n: number of valid tokens in the scope; ``kept``: Σ weights over the scope.
        m2_before, m2_after: mean m over the valid / kept tokens (0 when there are none).
    """

    weights: torch.Tensor
    n: float
    kept: float
    m2_before: float
    m2_after: float

    @property
    def masked_fraction(self) -> float:
        return 1.0 - self.kept / self.n if self.n > 0 else 0.0


def _bits(value: float) -> int:
    return int(torch.tensor(value, dtype=torch.float64).view(torch.int64))


def _counts_at(sorted_vals: torch.Tensor, prefix: torch.Tensor, bits: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Local #{m ≤ c} and Σ{m : m ≤ c} for thresholds c given as fp64 bit patterns (≥ 0)."""
    thresholds = torch.tensor(bits, dtype=torch.int64, device=sorted_vals.device).view(torch.float64)
    idx = torch.searchsorted(sorted_vals, thresholds, right=True)
    return idx.to(torch.float64), prefix[idx]


def m2_keep_weights(
    m: torch.Tensor,
    mask: torch.Tensor,
    threshold: float,
    *,
    distributed: bool = True,
    process_group: Any = None,
) -> M2Selection:
    """M2PO's mask: drop the largest m, largest first, until the mean of the rest is ≤ ``threshold``.

    Args:
        m: (B, T) non-negative second moments (detached inside).
        mask: (B, T) valid tokens.
        threshold: τ ≥ 0.
        distributed: reduce over ``process_group`` (a no-op without an initialized group).
        process_group: the data-parallel group (default: the default group).
    """
    valid = mask.bool()
    values = torch.where(valid, m.detach().to(torch.float64), torch.zeros((), dtype=torch.float64, device=m.device))
    sorted_vals = torch.sort(values[valid]).values
    prefix = torch.cat([sorted_vals.new_zeros(1), torch.cumsum(sorted_vals, 0)])

    def reduce_sum(t: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(t, process_group) if distributed else t

    def reduce_max(t: torch.Tensor) -> torch.Tensor:
        return all_reduce_max(t, process_group) if distributed else t

    n, total = (float(x) for x in reduce_sum(torch.stack([prefix.new_tensor(float(sorted_vals.numel())), prefix[-1]])))
    ones = valid.to(m.dtype)
    if n == 0 or total <= threshold * n:
        mean = total / n if n > 0 else 0.0
        return M2Selection(weights=ones, n=n, kept=n, m2_before=mean, m2_after=mean)

    local_max = sorted_vals[-1] if sorted_vals.numel() else sorted_vals.new_tensor(0.0)
    # Invariant: ok(lo) and not ok(hi), where ok(c) ⇔ Σ{m ≤ c} ≤ τ·#{m ≤ c} (monotone in c).
    # lo = -1 stands for "keep nothing" (ok). Bits of non-negative doubles are ordered like values.
    lo, hi = -1, _bits(float(reduce_max(local_max)))
    while hi - lo > 1:
        probes = sorted({lo + (hi - lo) * j // (_PROBES + 1) for j in range(1, _PROBES + 1)} - {lo, hi})
        counts, sums = _counts_at(sorted_vals, prefix, probes)
        reduced = reduce_sum(torch.cat([counts, sums]))
        counts, sums = reduced[: len(probes)], reduced[len(probes) :]
        ok = (sums <= threshold * counts).tolist()
        for bit, good in zip(probes, ok, strict=True):
            if good:
                lo = bit
            else:
                hi = bit
                break

    # Everything ≤ value(lo) stays; value(hi) is a data value (the smallest m that cannot all stay).
    cut = float(torch.tensor(hi, dtype=torch.int64).view(torch.float64))
    below_n, below_s = _counts_at(sorted_vals, prefix, [lo]) if lo >= 0 else (prefix.new_zeros(1), prefix.new_zeros(1))
    ties = (sorted_vals == cut).sum().to(torch.float64).reshape(1)
    kept_n, kept_s, n_ties = (float(x) for x in reduce_sum(torch.cat([below_n, below_s, ties])))
    # e of the n_ties tokens at the cut value may stay: the largest e with kept_s + e·cut ≤ τ(kept_n + e).
    estimate = (threshold * kept_n - kept_s) / (cut - threshold) if cut > threshold else n_ties
    e = max(0, min(int(n_ties) - 1, math.floor(estimate)))
    while e > 0 and kept_s + e * cut > threshold * (kept_n + e):
        e -= 1
    while e + 1 < n_ties and kept_s + (e + 1) * cut <= threshold * (kept_n + e + 1):
        e += 1
    tie_weight = e / n_ties if n_ties > 0 else 0.0
    weights = torch.where(values < cut, ones, torch.where(values == cut, ones * tie_weight, torch.zeros_like(ones)))
    weights = torch.where(valid, weights, torch.zeros_like(weights))
    kept = kept_n + e
    after = (kept_s + e * cut) / kept if kept > 0 else 0.0
    return M2Selection(weights=weights, n=n, kept=kept, m2_before=total / n, m2_after=after)


@register_loss("m2po", config=M2POConfig, requires={"old_logprobs", "rollout_logprobs"})
def m2po(batch: PolicyBatch, config: M2POConfig) -> LossOutput:
    """M2PO (see module docstring)."""
    reference = batch.old_logprobs if config.numerator == "old" else batch.logprobs.detach()
    m = (batch.behavior_logprobs - reference).detach() ** 2
    selection = m2_keep_weights(
        m,
        batch.mask,
        config.m2_threshold,
        distributed=config.scope == "global",
        process_group=config.process_group,
    )
    ratio = safe_exp(batch.logprobs - batch.old_logprobs)
    loss_mat = -selection.weights * ratio * batch.advantages
    metrics = {
        "actor/m2po_masked_fraction": selection.masked_fraction,
        "actor/m2po_m2_before": selection.m2_before,
        "actor/m2po_m2_after": selection.m2_after,
        "actor/ppo_kl": approx_kl(batch.logprobs, batch.old_logprobs, batch.mask),
    }
    return finish(batch, config, loss_mat, metrics)
