"""Decoupled PPO (AReaL, arXiv 2505.24298): clip against the proximal policy, reweight by π_old/μ.

With u = exp(log π_θ − log π_old) (π_old the *proximal* policy, recomputed by the trainer),
w = exp(log π_old − log μ) the behavior weight (μ the policy that sampled the token; both
log-ratios clamped to ±20) and advantage A:

    ℓ = sg(w̃)·max(−u·A, −clip(u, 1−ε_low, 1+ε_high)·A)
    ℓ ← min(ℓ, −c·A)   where A < 0                        (dual clip, c = ``dual_clip`` > 1)
    w̃ = w                          (``behavior_cap=None``, default)
    w̃ = w·1[w ≤ C]                 (``behavior_cap=C``, ``behavior_cap_mode="mask"``, default mode)
    w̃ = min(w, C)                  (``behavior_cap_mode="truncate"``)

Normalization: the aggregation denominator counts every valid token *before* the cap, so a
masked token lowers the numerator but never the denominator (AReaL divides by the loss-mask
count taken before its behavior filter).

Proximal policy (``proximal``): ``"recomputed"`` (default) reads ``old_logprobs``.
``"loglinear"`` skips that forward pass and interpolates, per token and detached,

    log π_old ≈ log μ + α·(log π_θ − log μ),   α = clamp((v − 1 − v_μ) / (v − v_μ), 0, 1)

with v = ``current_version`` and v_μ = ``versions`` (the version that sampled the token). v is
the version of the weights being trained, as AReaL passes it (``engine.get_version()``, set to
s + 1 with the weights broadcast after step s; ``areal/trainer/rl_trainer.py``) and as the TRL
and veRL adapters pass it; AReaL's comment on this formula calls v − 1 the proximal version.
α = 0 (π_old := μ) wherever v − v_μ ≤ 0 or v_μ < 0 (AReaL's guard: same version, a version from the future, or "no
version"), so such tokens get w = 1 and a plain PPO ratio against μ.

Defaults from AReaL: ε_low = ε_high = 0.2 (its ``eps_clip``; ``eps_clip_higher`` unset), no dual
clip, no behavior cap (AReaL's ``behav_imp_weight_cap`` defaults to None; its docs recommend 5).
Without ``rollout_logprobs`` μ := π_old, w = 1 and this is exactly ``ppo``.

Differences from the reference code (AReaL ``ppo_actor_loss_fn``):

* log-ratios are clamped to ±20 before ``exp`` (AReaL does not clamp the behavior log-ratio);
* AReaL treats a token from a *newer* version (v_μ > v) with α = 0; the bare formula would give
  α = 1 after the clamp. We follow AReaL;
* a `RolloutCorrection` can still be passed, but it multiplies a second weight in: leave it unset
  unless that is what you want.

Metrics (token means over valid tokens): ``actor/pg_clipfrac``, ``actor/pg_clipfrac_lower``,
``actor/ppo_kl`` (mean of log π_old − log π_θ), ``actor/behav_imp_weight_{mean,std,min,max,
eff_sample_size}`` (the raw w, before the cap), ``actor/behav_capped_fraction`` (w > C),
``actor/behav_kl`` (mean of log π_old − log μ), and ``actor/prox_alpha_mean`` (loglinear only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stable_async._numerics import masked_mean, safe_exp
from stable_async.batch import PolicyBatch
from stable_async.checks import check_number
from stable_async.diagnostics import approx_kl, fraction, weight_stats
from stable_async.losses.base import LossConfig, LossOutput, check_clip_settings, finish
from stable_async.losses.ppo import clipped_surrogate
from stable_async.registry import register_loss

PROXIMAL_MODES = ("recomputed", "loglinear")
CAP_MODES = ("mask", "truncate")


@dataclass(frozen=True)
class DecoupledPPOConfig(LossConfig):
    """Decoupled PPO settings (AReaL defaults).

    Attributes:
        eps_low, eps_high: PPO clip range of u = π_θ/π_old.
        dual_clip: c > 1 bounds the loss of a negative advantage by −c·A (None: off).
        behavior_cap: cap C on w = π_old/μ (None: no cap). Must be > 1, as in AReaL.
        behavior_cap_mode: ``"mask"`` (w := 0 where w > C; AReaL's behavior) or ``"truncate"``
            (w := min(w, C)).
        proximal: ``"recomputed"`` (use ``old_logprobs``) or ``"loglinear"`` (approximate it from
            ``rollout_logprobs``, ``versions`` and ``current_version``).
    """

    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = None
    behavior_cap: float | None = None
    behavior_cap_mode: str = "mask"
    proximal: str = "recomputed"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_clip_settings(self.eps_low, self.eps_high, self.dual_clip)
        if self.behavior_cap is not None:
            check_number(
                "behavior_cap",
                self.behavior_cap,
                low=1.0,
                low_open=True,
                expected="a value > 1 (a finite number, or None)",
            )
        if self.behavior_cap_mode not in CAP_MODES:
            raise ValueError(f"behavior_cap_mode: expected one of {list(CAP_MODES)}, got {self.behavior_cap_mode!r}")
        if self.proximal not in PROXIMAL_MODES:
            raise ValueError(f"proximal: expected one of {list(PROXIMAL_MODES)}, got {self.proximal!r}")


def loglinear_alpha(versions: torch.Tensor, current_version: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-token interpolation weight α of the log-linear proximal approximation (AReaL's guards).

    α = clamp((v − 1 − v_μ) / (v − v_μ), 0, 1) where v − v_μ > 0 and v_μ ≥ 0, and 0 elsewhere.
    """
    v_mu = versions.to(dtype)
    gap = float(current_version) - v_mu
    usable = (gap > 0) & (v_mu >= 0)
    alpha = torch.where(usable, (gap - 1.0) / torch.where(usable, gap, torch.ones_like(gap)), torch.zeros_like(gap))
    return alpha.clamp(0.0, 1.0)


def _proximal_logprobs(batch: PolicyBatch, config: DecoupledPPOConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π_old (detached) and, for the log-linear approximation, the per-token α."""
    if config.proximal == "recomputed":
        return batch.old_logprobs, None
    if batch.rollout_logprobs is None:
        raise ValueError("rollout_logprobs: required by decoupled_ppo with proximal='loglinear'")
    if batch.versions is None or batch.current_version is None:
        raise ValueError("versions / current_version: required by decoupled_ppo with proximal='loglinear'")
    alpha = loglinear_alpha(batch.versions, batch.current_version, batch.dtype)
    mu = batch.rollout_logprobs
    prox = mu + alpha * (batch.logprobs.detach() - mu)
    return prox, alpha


def behavior_weight(
    old_logprobs: torch.Tensor, behavior_logprobs: torch.Tensor, config: DecoupledPPOConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(raw w, applied w̃, capped-out condition w > C); all detached."""
    raw = safe_exp(old_logprobs - behavior_logprobs).detach()
    if config.behavior_cap is None:
        return raw, raw, torch.zeros_like(raw, dtype=torch.bool)
    capped = raw > config.behavior_cap
    if config.behavior_cap_mode == "mask":
        applied = torch.where(capped, torch.zeros_like(raw), raw)
    else:
        applied = raw.clamp(max=config.behavior_cap)
    return raw, applied, capped


@register_loss(
    "decoupled_ppo",
    config=DecoupledPPOConfig,
    requires=lambda c: (
        {"old_logprobs", "rollout_logprobs"}
        if c.proximal == "recomputed"
        else {"rollout_logprobs", "versions", "current_version"}
    ),
    weights_by_rollout=True,
)
def decoupled_ppo(batch: PolicyBatch, config: DecoupledPPOConfig) -> LossOutput:
    """Decoupled PPO (see module docstring)."""
    prox, alpha = _proximal_logprobs(batch, config)
    behavior = batch.rollout_logprobs if batch.rollout_logprobs is not None else prox
    raw_w, w, capped = behavior_weight(prox, behavior, config)
    ratio = safe_exp(batch.logprobs - prox)
    ppo_mat, clipped, dual_active = clipped_surrogate(
        ratio, batch.advantages, config.eps_low, config.eps_high, config.dual_clip
    )
    # The cap only zeroes (or shrinks) the numerator; `finish` keeps the full mask as denominator.
    loss_mat = w * ppo_mat
    mask = batch.mask
    metrics = {
        "actor/pg_clipfrac": fraction(clipped, mask),
        "actor/pg_clipfrac_lower": fraction(dual_active, mask),
        "actor/ppo_kl": approx_kl(batch.logprobs, prox, mask),
        **weight_stats(raw_w, mask, prefix="actor/behav_imp_weight_"),
        "actor/behav_capped_fraction": fraction(capped, mask),
        "actor/behav_kl": masked_mean((prox - behavior).detach(), mask),
    }
    if alpha is not None:
        metrics["actor/prox_alpha_mean"] = masked_mean(alpha, mask)
    return finish(batch, config, loss_mat, metrics)
