"""DPPO (arXiv 2602.04879, code sail-sg/Stable-RL): a divergence trust region instead of ratio clipping.

With p = π_θ(a_t), q = anchor(a_t) for the sampled token, advantage A and a divergence D_t
between the anchor and π_θ at position t:

    ℓ_t = −M_t · sg(min(p/q, c)) · A · log π_θ(a_t)
    M_t = 0  if A > 0 and D_t > δ_high and p > q     (pushed up, already risen too far)
    M_t = 0  if A ≤ 0 and D_t > δ_low  and p < q     (pushed down, already fallen too far)
    M_t = 1  otherwise;  M_t is detached.

A token keeps its gradient as long as π_θ has not left the trust region in the direction the
advantage pushes; moving back towards the anchor is never blocked. D_t per loss:

=================  ============================================================  ==========
loss               D_t                                                           δ default
=================  ============================================================  ==========
dppo_binary_tv     |p − q|  (the rule reduces to p − q > δ_high / p − q < −δ_low)  0.15
dppo_binary_kl     q log(q/p) + (1−q) log((1−q)/(1−p))                           0.05
dppo_topk_tv       ½(Σ_{k∈S}|q_k − p_k| + |q_rest − p_rest|)                     0.15
dppo_topk_kl       Σ_{k∈S} q_k log(q_k/p_k) + q_rest log(q_rest/p_rest)           0.05
=================  ============================================================  ==========

S is the anchor's top-K ids at the position (the sampled token forced in): the batch must
carry ``topk_logprobs`` (log q at S) and ``current_topk_logprobs`` (log π_θ at S, e.g. from
`stable_async.divergence.gather_topk_logprobs`). The direction (p > q or p < q) always uses
the sampled token's probabilities, as veRL's ``dppo_kl`` and the reference code do.

Settings: ``anchor="rollout"`` (default; q = μ, ``rollout_logprobs``, the paper's setting) or
``"old"`` (q = π_old, ``old_logprobs``; veRL's ``dppo_tv`` / ``dppo_kl``, where the
"old" log-prob equals the rollout one in bypass mode). The anchor is used for both the ratio
and the divergence. ``delta_low`` / ``delta_high`` (δ_TV = 0.15, δ_KL = 0.05, low = high, the
paper's defaults). ``ratio_cap`` c = 10, as in the paper's code (sail-sg/Stable-RL); ``None``
disables the cap. veRL's ``dppo_*`` read ``clip_ratio_c`` and fall back to 20 only when the key
is absent, but veRL's ActorConfig always carries ``clip_ratio_c = 3.0`` (the dual-clip PPO
setting), so veRL applies c = 3 unless overridden; its DPPO example sets 10000 (off). Pass
``ratio_cap`` equal to the ``clip_ratio_c`` you ran veRL with to reproduce it.

Differences from the reference code, all on purpose:
- veRL's binary KL adds 1e-8 inside ``log((1−q)/(1−p))``; we evaluate it exactly in log
  space (`stable_async.divergence.binary_kl`), so the mask can differ from veRL's only for
  tokens whose KL is within ~1e-8 of δ, or with p or q within ~1e-8 of 1.
- The paper's ``*_recompute`` modes gate with π_old but weight with π_θ/μ; here one anchor
  sets both. The paper code clamps the log-ratio at +20 only; we clamp at ±20
  like veRL (the lower clamp only lifts weights below e^−20 ≈ 2e−9).
- Top-K divergences avoid a second full-vocabulary log-softmax (see `gather_topk_logprobs`).

Metrics (token means over valid tokens), veRL's names and meanings: ``actor/pg_clipfrac``
(fraction masked by the trust region; A = 0 tokens follow the A < 0 rule, as in veRL),
``actor/pg_clipfrac_lower`` (fraction kept with p/q > c, i.e. truncated), ``actor/ppo_kl``
(mean of log q − log p). Also ``dppo/masked_frac_pos`` / ``dppo/masked_frac_neg`` (masked
with A > 0 / A < 0) and ``dppo/divergence_mean`` / ``dppo/divergence_max``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from stable_async._numerics import (
    LOG_RATIO_BOUND,
    count_true,
    masked_max,
    masked_mean,
    safe_exp,
    select_bool,
    zero_where_false,
)
from stable_async.batch import BatchValidationError, PolicyBatch
from stable_async.checks import check_number
from stable_async.diagnostics import fraction
from stable_async.divergence import _as_compute, _binary_kl_log_space, binary_kl, binary_tv, topk_kl, topk_tv
from stable_async.losses.base import LossConfig, LossOutput, check_positive, finish
from stable_async.registry import register_loss

ANCHORS = ("rollout", "old")


@dataclass(frozen=True)
class DPPOConfig(LossConfig):
    """DPPO settings; the defaults are the TV variants' (δ = 0.15). See the module docstring."""

    delta_low: float = 0.15
    delta_high: float = 0.15
    anchor: str = "rollout"
    ratio_cap: float | None = 10.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("delta_low", "delta_high"):
            value = getattr(self, name)
            # +inf is allowed: it switches that side of the trust region off.
            check_number(
                name, value, low=0.0, low_open=True, finite=False, expected="a number > 0 (math.inf disables this side)"
            )
        if self.anchor not in ANCHORS:
            raise ValueError(f"anchor: expected one of {list(ANCHORS)}, got {self.anchor!r}")
        if self.ratio_cap is not None:
            check_positive("ratio_cap", self.ratio_cap)


@dataclass(frozen=True)
class DPPOKLConfig(DPPOConfig):
    """DPPO settings for the KL variants (δ = 0.05)."""

    delta_low: float = 0.05
    delta_high: float = 0.05


def trust_region_mask(
    logprobs: torch.Tensor,
    anchor_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    divergence: torch.Tensor,
    delta_low: float,
    delta_high: float,
) -> torch.Tensor:
    """Bool (B, T): True where DPPO drops the token (left the trust region in the pushed direction)."""
    lp, lq = logprobs.detach(), anchor_logprobs.detach()
    rose, fell = lp > lq, lp < lq
    return select_bool(advantages > 0, (divergence > delta_high) & rose, (divergence > delta_low) & fell)


def dppo_token_loss(
    logprobs: torch.Tensor,
    anchor_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    dropped: torch.Tensor,
    ratio_cap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss −M·sg(min(p/q, c))·A·log p, and the detached untruncated ratio p/q."""
    ratio = safe_exp(logprobs.detach() - anchor_logprobs)
    weight = ratio if ratio_cap is None else ratio.clamp(max=ratio_cap)
    keep = (~dropped).to(logprobs.dtype)
    return -advantages * weight * logprobs * keep, ratio


def _anchor_logprobs(batch: PolicyBatch, config: DPPOConfig, name: str) -> torch.Tensor:
    if config.anchor == "old":
        return batch.old_logprobs  # type: ignore[return-value]
    if batch.rollout_logprobs is None:
        raise BatchValidationError(
            f"rollout_logprobs: required by {name} with anchor='rollout' (the default); pass the rollout "
            "engine's log-probs, or anchor='old' to use old_logprobs as the anchor"
        )
    return batch.rollout_logprobs


def _topk_fields(batch: PolicyBatch, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    for field_name in ("topk_logprobs", "current_topk_logprobs"):
        if getattr(batch, field_name) is None:
            raise BatchValidationError(
                f"{field_name}: required by {name}; the batch needs topk_logprobs (the anchor's log-probs at its "
                "top-K ids, sampled token included) and current_topk_logprobs (log π_θ at the same ids, see "
                "stable_async.divergence.gather_topk_logprobs)"
            )
    return batch.current_topk_logprobs, batch.topk_logprobs  # type: ignore[return-value]


def _dppo(
    batch: PolicyBatch,
    config: DPPOConfig,
    name: str,
    divergence: torch.Tensor,
    dropped: torch.Tensor | None = None,
    nonnegative: bool = False,
    positive: torch.Tensor | None = None,
) -> LossOutput:
    """Shared DPPO body. ``dropped`` may be passed precomputed (the binary losses derive it from
    quantities they already hold); ``nonnegative`` lets the divergence mean and max share one pass."""
    anchor = _anchor_logprobs(batch, config, name)
    adv, mask = batch.advantages, batch.mask
    lp = batch.logprobs
    if dropped is None:
        dropped = trust_region_mask(lp, anchor, adv, divergence, config.delta_low, config.delta_high)
    # One clamped log-ratio for the weight (exp of it is exactly safe_exp(lp − q)) and ``actor/ppo_kl``.
    log_ratio = (lp.detach() - anchor).clamp(min=-LOG_RATIO_BOUND, max=LOG_RATIO_BOUND)
    ratio = torch.exp(log_ratio)
    weight = ratio if config.ratio_cap is None else ratio.clamp(max=config.ratio_cap)
    # −M·w·A·log p with M applied to the detached coefficient: the same value and gradient as
    # (−A·w·log p)·M, one full-size temporary fewer.
    coef = zero_where_false(-adv * weight, ~dropped) if adv.dtype == weight.dtype else None
    if coef is not None and coef.dtype == lp.dtype:
        loss_mat = coef * lp
    else:
        loss_mat, _ = dppo_token_loss(lp, anchor, adv, dropped, config.ratio_cap)
    metrics = _dppo_metrics(mask, adv, dropped, ratio, log_ratio, divergence, config.ratio_cap, nonnegative, positive)
    return finish(batch, config, loss_mat, metrics)


def _dppo_metrics(
    mask: torch.Tensor,
    adv: torch.Tensor,
    dropped: torch.Tensor,
    ratio: torch.Tensor,
    log_ratio: torch.Tensor,
    divergence: torch.Tensor,
    ratio_cap: float | None,
    nonnegative: bool,
    positive: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The DPPO metrics with one valid-token count, integer counts stacked into one division, and
    (for a nonnegative divergence) one masked copy of the divergence for its mean and max."""
    if mask.dtype != torch.bool or mask.shape != dropped.shape:
        capped = torch.zeros_like(dropped) if ratio_cap is None else (ratio > ratio_cap) & ~dropped
        return {
            "actor/pg_clipfrac": fraction(dropped, mask),
            "actor/pg_clipfrac_lower": fraction(capped, mask),
            "actor/ppo_kl": masked_mean(-log_ratio, mask),
            "dppo/masked_frac_pos": fraction(dropped & (adv > 0), mask),
            "dppo/masked_frac_neg": fraction(dropped & (adv < 0), mask),
            "dppo/divergence_mean": masked_mean(divergence, mask),
            "dppo/divergence_max": masked_max(divergence, mask),
        }
    n_int = count_true(mask)
    dm = dropped & mask
    zero = n_int.new_zeros(())
    pos = count_true(dm & (adv > 0 if positive is None else positive))
    counts = [count_true(dm), zero, pos, count_true(dm & (adv < 0))]
    if ratio_cap is not None:
        capped = ratio > ratio_cap
        capped &= mask
        capped &= ~dm
        counts[1] = count_true(capped)
    n = n_int.to(torch.float32).clamp(min=1.0)
    fracs = torch.stack(counts).to(torch.float32) / n
    vdtype = log_ratio.dtype
    n_v = n_int.to(vdtype).clamp(min=1.0)
    ppo_kl = -zero_where_false(log_ratio, mask).sum() / n_v
    if nonnegative and divergence.dtype.is_floating_point:
        # D ≥ 0: zeroing invalid tokens cannot raise the max, so one copy serves both (0 if none valid).
        dz = zero_where_false(divergence, mask)
        div_mean = dz.sum() / n_int.to(divergence.dtype).clamp(min=1.0)
        div_max = dz.max() if dz.numel() else dz.sum()
    else:
        div_mean, div_max = masked_mean(divergence, mask), masked_max(divergence, mask)
    return {
        "actor/pg_clipfrac": fracs[0],
        "actor/pg_clipfrac_lower": fracs[1],
        "actor/ppo_kl": ppo_kl,
        "dppo/masked_frac_pos": fracs[2],
        "dppo/masked_frac_neg": fracs[3],
        "dppo/divergence_mean": div_mean,
        "dppo/divergence_max": div_max,
    }


def _binary_tv_parts(lp: torch.Tensor, lq: torch.Tensor, config: DPPOConfig, adv: torch.Tensor):
    """|p − q| and the trust-region mask from one difference p − q (exp is monotone, so
    p − q > δ > 0 implies p > q: the same mask as ``trust_region_mask``)."""
    lp, lq = _as_compute(lp, lq)
    diff = torch.exp(lp)
    diff -= torch.exp(lq)
    pos = adv > 0
    dropped = select_bool(pos, diff > config.delta_high, diff < -config.delta_low)
    return diff.abs_(), dropped, pos


def _binary_kl_parts(lp: torch.Tensor, lq: torch.Tensor, config: DPPOConfig, adv: torch.Tensor):
    """`binary_kl` (the same function) and the trust-region mask with the direction test folded
    into one comparison (D > δ > 0 implies p ≠ q)."""
    lp, lq = _as_compute(lp, lq)
    div = _binary_kl_log_space(lp, lq)
    pos = adv > 0
    big = div > config.delta_high if config.delta_low == config.delta_high else None
    if big is None:
        big = select_bool(pos, div > config.delta_high, div > config.delta_low)
    # Where D > δ > 0, p ≠ q, so "fell" is "not rose": drop iff (rose == pushed up).
    rose = lp > lq
    rose ^= pos
    big &= ~rose
    return div, big, pos


def _binary_dppo(batch: PolicyBatch, config: DPPOConfig, name: str, divergence: Any, fused_parts: Any) -> LossOutput:
    """A binary DPPO loss: the fused divergence + mask path, or the generic one for odd advantage shapes."""
    anchor = _anchor_logprobs(batch, config, name)
    if batch.advantages.shape != batch.logprobs.shape:
        return _dppo(batch, config, name, divergence(batch.logprobs.detach(), anchor))
    div, dropped, positive = fused_parts(batch.logprobs.detach(), anchor.detach(), config, batch.advantages)
    return _dppo(batch, config, name, div, dropped, nonnegative=True, positive=positive)


@register_loss("dppo_binary_tv", config=DPPOConfig)
def dppo_binary_tv(batch: PolicyBatch, config: DPPOConfig) -> LossOutput:
    """DPPO with the binary total variation |p − q| (see module docstring)."""
    return _binary_dppo(batch, config, "dppo_binary_tv", binary_tv, _binary_tv_parts)


@register_loss("dppo_binary_kl", config=DPPOKLConfig)
def dppo_binary_kl(batch: PolicyBatch, config: DPPOConfig) -> LossOutput:
    """DPPO with the binary KL(q ‖ p) over {sampled token, rest} (see module docstring)."""
    return _binary_dppo(batch, config, "dppo_binary_kl", binary_kl, _binary_kl_parts)


@register_loss("dppo_topk_tv", config=DPPOConfig)
def dppo_topk_tv(batch: PolicyBatch, config: DPPOConfig) -> LossOutput:
    """DPPO with the top-K total variation (see module docstring)."""
    current, anchor_topk = _topk_fields(batch, "dppo_topk_tv")
    return _dppo(batch, config, "dppo_topk_tv", topk_tv(current, anchor_topk))


@register_loss("dppo_topk_kl", config=DPPOKLConfig)
def dppo_topk_kl(batch: PolicyBatch, config: DPPOConfig) -> LossOutput:
    """DPPO with the top-K KL(q ‖ p) (see module docstring)."""
    current, anchor_topk = _topk_fields(batch, "dppo_topk_kl")
    return _dppo(batch, config, "dppo_topk_kl", topk_kl(current, anchor_topk))
