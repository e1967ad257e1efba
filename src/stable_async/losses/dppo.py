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

Settings: ``anchor`` chooses q for the trust region: ``"rollout"`` (default; q = μ,
``rollout_logprobs``, the paper's setting) or ``"old"`` (q = π_old, ``old_logprobs``; veRL's
``dppo_tv`` / ``dppo_kl``, where the "old" log-prob equals the rollout one in bypass mode).
``weight_anchor`` chooses the denominator of the weight sg(min(π_θ/q_w, c)): ``None`` (default)
uses the trust-region anchor, ``"rollout"`` or ``"old"`` name one. The paper code's
``dppo_binary_tv_recompute`` / ``dppo_binary_kl_recompute`` modes gate with π_old and weight
with π_θ/μ: ``anchor="old", weight_anchor="rollout"`` (sail-sg/Stable-RL,
``verl/trainer/ppo/core_algos.py``: ``_compute_token_mask_for_policy_loss`` builds the mask from
``old_log_prob`` in the ``*_recompute`` modes, ``compute_policy_loss_with_mask`` always weights
with ``log_prob − rollout_log_prob``). ``delta_low`` / ``delta_high`` (δ_TV = 0.15,
δ_KL = 0.05, low = high, the paper's defaults). ``ratio_cap`` c = 10, as in the paper's code;
``None`` disables the cap. veRL's ``dppo_*`` read ``clip_ratio_c`` and fall back to 20 only
when the key is absent, but veRL's ActorConfig always carries ``clip_ratio_c = 3.0`` (the
dual-clip PPO setting), so veRL applies c = 3 unless overridden; its DPPO example sets 10000
(off). Pass ``ratio_cap`` equal to the ``clip_ratio_c`` you ran veRL with to reproduce it.

Differences from the reference code, all on purpose:
- veRL's binary KL adds 1e-8 inside ``log((1−q)/(1−p))``; we evaluate it exactly in log
  space (`stable_async.divergence.binary_kl`), so the mask can differ from veRL's only for
  tokens whose KL is within ~1e-8 of δ, or with p or q within ~1e-8 of 1.
- The paper code clamps the log-ratio at +20 only; we clamp at ±20 like veRL (the lower clamp
  only lifts weights below e^−20 ≈ 2e−9).
- Top-K divergences avoid a second full-vocabulary log-softmax (see `gather_topk_logprobs`).

Metrics (token means over valid tokens), veRL's names and meanings: ``actor/pg_clipfrac``
(fraction masked by the trust region; A = 0 tokens follow the A < 0 rule, as in veRL),
``actor/pg_clipfrac_lower`` (fraction kept with p/q_w > c, i.e. truncated), ``actor/ppo_kl``
(mean of log q_w − log p). Also ``dppo/masked_frac_pos`` / ``dppo/masked_frac_neg`` (masked by
the A > 0 / the A ≤ 0 rule; they add up to ``actor/pg_clipfrac``) and ``dppo/divergence_mean`` /
``dppo/divergence_max``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stable_async._numerics import LOG_RATIO_BOUND
from stable_async.batch import PolicyBatch
from stable_async.checks import check_number
from stable_async.divergence import binary_kl, binary_tv, topk_kl, topk_tv
from stable_async.losses.base import LossConfig, LossOutput, check_positive, finish
from stable_async.registry import register_loss

ANCHORS = ("rollout", "old")
ANCHOR_FIELDS = {"rollout": "rollout_logprobs", "old": "old_logprobs"}
TOPK_FIELDS = ("topk_logprobs", "current_topk_logprobs")


@dataclass(frozen=True)
class DPPOConfig(LossConfig):
    """DPPO settings; the defaults are the TV variants' (δ = 0.15). See the module docstring."""

    delta_low: float = 0.15
    delta_high: float = 0.15
    anchor: str = "rollout"
    weight_anchor: str | None = None
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
        if self.weight_anchor is not None and self.weight_anchor not in ANCHORS:
            raise ValueError(f"weight_anchor: expected one of {list(ANCHORS)} or None, got {self.weight_anchor!r}")
        if self.ratio_cap is not None:
            check_positive("ratio_cap", self.ratio_cap)

    @property
    def weight_anchor_or_default(self) -> str:
        """The policy the weight divides by: ``weight_anchor``, or ``anchor`` when it is None."""
        return self.anchor if self.weight_anchor is None else self.weight_anchor


@dataclass(frozen=True)
class DPPOKLConfig(DPPOConfig):
    """DPPO settings for the KL variants (δ = 0.05)."""

    delta_low: float = 0.05
    delta_high: float = 0.05


def trust_region_mask(
    logprobs: torch.Tensor,
    anchor_logprobs: torch.Tensor,
    pushed_up: torch.Tensor,
    divergence: torch.Tensor,
    delta_low: float,
    delta_high: float,
) -> torch.Tensor:
    """Bool (B, T): True where DPPO drops the token, 1 − M_t of the module docstring.

    On the signed divergence s_t = sign(p − q)·D_t (positive where π_θ rose above the anchor,
    negative where it fell; the direction always from the sampled token's probabilities), with
    ``pushed_up`` the bool A > 0: dropped where the advantage pushes up and π_θ has risen past
    δ_high (s_t > δ_high), or it pushes down (A ≤ 0) and π_θ has fallen past δ_low (s_t < −δ_low).
    """
    signed = torch.sign(logprobs.detach() - anchor_logprobs.detach()) * divergence
    return torch.where(pushed_up, signed > delta_high, signed < -delta_low)


def dppo_metrics(
    batch: PolicyBatch,
    dropped: torch.Tensor,
    pushed_up: torch.Tensor,
    log_ratio: torch.Tensor,
    ratio: torch.Tensor,
    divergence: torch.Tensor,
    ratio_cap: float | None,
) -> dict[str, torch.Tensor | float]:
    """The DPPO metrics of the module docstring; ``log_ratio`` = log π_θ − log q_w (clamped),
    ``ratio`` its exp (before the cap), ``pushed_up`` the bool A > 0."""
    dropped_frac = batch.token_fraction(dropped)
    dropped_pos_frac = batch.token_fraction(dropped & pushed_up)
    # D ≥ 0, so zeros at masked positions change neither the sum nor the maximum.
    valid_divergence = torch.where(batch.mask, divergence, 0.0)
    return {
        "actor/pg_clipfrac": dropped_frac,
        "actor/pg_clipfrac_lower": 0.0 if ratio_cap is None else batch.token_fraction((ratio > ratio_cap) & ~dropped),
        "actor/ppo_kl": -batch.token_mean(log_ratio),
        "dppo/masked_frac_pos": dropped_pos_frac,
        "dppo/masked_frac_neg": dropped_frac - dropped_pos_frac,  # the A ≤ 0 rule's share
        "dppo/divergence_mean": batch.token_mean(valid_divergence),
        "dppo/divergence_max": valid_divergence.amax() if valid_divergence.numel() else 0.0,
    }


def dppo_loss(batch: PolicyBatch, config: DPPOConfig, divergence: torch.Tensor) -> LossOutput:
    """ℓ_t = −M_t · sg(min(π_θ/q_w, c)) · A · log π_θ, given the divergence D_t (B, T)."""
    anchor = _anchor_logprobs(batch, config.anchor)
    weight_anchor = _anchor_logprobs(batch, config.weight_anchor_or_default)
    adv = batch.advantages
    pushed_up = adv > 0
    dropped = trust_region_mask(batch.logprobs, anchor, pushed_up, divergence, config.delta_low, config.delta_high)
    log_ratio = (batch.logprobs.detach() - weight_anchor).clamp(min=-LOG_RATIO_BOUND, max=LOG_RATIO_BOUND)
    ratio = torch.exp(log_ratio)
    weight = ratio if config.ratio_cap is None else ratio.clamp(max=config.ratio_cap)
    keep = (~dropped).to(weight.dtype)  # M_t
    loss_mat = -(keep * weight * adv) * batch.logprobs
    metrics = dppo_metrics(batch, dropped, pushed_up, log_ratio, ratio, divergence, config.ratio_cap)
    return finish(batch, config, loss_mat, metrics)


def _anchor_logprobs(batch: PolicyBatch, anchor: str) -> torch.Tensor:
    """log q of an anchor name (`require` has named a missing field with its reason)."""
    return batch.require(ANCHOR_FIELDS[anchor], f"DPPO with anchor={anchor!r}")


def _topk_logprobs(batch: PolicyBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π_θ, log q) at the anchor's top-K ids (`require` has named a missing field)."""
    return batch.require("current_topk_logprobs", "a top-K DPPO"), batch.require("topk_logprobs", "a top-K DPPO")


def required_fields(config: DPPOConfig, topk: bool = False) -> tuple[str, ...]:
    """The batch fields a DPPO loss reads with ``config`` (its registry declaration), in check order."""
    anchors = dict.fromkeys([ANCHOR_FIELDS[config.anchor], ANCHOR_FIELDS[config.weight_anchor_or_default]])
    return (*anchors, *TOPK_FIELDS) if topk else tuple(anchors)


def require(batch: PolicyBatch, config: DPPOConfig, name: str, topk: bool = False) -> None:
    """Raise a `BatchValidationError` naming the first field the loss needs and the batch lacks."""
    for field_name in required_fields(config, topk):
        batch.require(field_name, f"{name} with {_why(config, field_name)}")


def _why(config: DPPOConfig, field_name: str) -> str:
    if field_name in TOPK_FIELDS:
        return (
            "its top-K divergence; the batch needs topk_logprobs (the anchor's log-probs at its top-K ids, "
            "sampled token included) and current_topk_logprobs (log π_θ at the same ids, see "
            "stable_async.divergence.gather_topk_logprobs)"
        )
    return (
        f"anchor={config.anchor!r}, weight_anchor={config.weight_anchor!r}; pass the rollout engine's log-probs, "
        "or anchor='old' (and weight_anchor='old' or None) to use old_logprobs"
    )


def _declare(topk: bool) -> dict:
    return {
        "requires": lambda config: required_fields(config, topk),
        "weights_by_rollout": lambda config: config.weight_anchor_or_default == "rollout",
        "needs_topk": topk,
    }


@register_loss("dppo_binary_tv", config=DPPOConfig, **_declare(topk=False))
def dppo_binary_tv(batch: PolicyBatch, config: DPPOConfig) -> LossOutput:
    """DPPO with the binary total variation |p − q| (see module docstring)."""
    require(batch, config, "dppo_binary_tv")
    return dppo_loss(batch, config, binary_tv(batch.logprobs.detach(), _anchor_logprobs(batch, config.anchor)))


@register_loss("dppo_binary_kl", config=DPPOKLConfig, **_declare(topk=False))
def dppo_binary_kl(batch: PolicyBatch, config: DPPOConfig) -> LossOutput:
    """DPPO with the binary KL(q ‖ p) over {sampled token, rest} (see module docstring)."""
    require(batch, config, "dppo_binary_kl")
    return dppo_loss(batch, config, binary_kl(batch.logprobs.detach(), _anchor_logprobs(batch, config.anchor)))


@register_loss("dppo_topk_tv", config=DPPOConfig, **_declare(topk=True))
def dppo_topk_tv(batch: PolicyBatch, config: DPPOConfig) -> LossOutput:
    """DPPO with the top-K total variation (see module docstring)."""
    require(batch, config, "dppo_topk_tv", topk=True)
    return dppo_loss(batch, config, topk_tv(*_topk_logprobs(batch)))


@register_loss("dppo_topk_kl", config=DPPOKLConfig, **_declare(topk=True))
def dppo_topk_kl(batch: PolicyBatch, config: DPPOConfig) -> LossOutput:
    """DPPO with the top-K KL(q ‖ p) (see module docstring)."""
    require(batch, config, "dppo_topk_kl", topk=True)
    return dppo_loss(batch, config, topk_kl(*_topk_logprobs(batch)))
