"""prime-rl's default loss: DPPO binary-TV masking plus a squared-log-ratio KL towards the inference
policy (DPPO, arXiv 2602.04879; the KL term from Kimi K2.5, arXiv 2602.02276).

Read from PrimeIntellect-ai/prime-rl at commit 559b44772e471d1538537b8805cc77f3824a5e64
(``src/prime_rl/trainer/rl/loss.py``, ``default_loss_fn``; defaults from
``packages/prime-rl-configs/src/prime_rl/configs/trainer.py``, ``DefaultLossConfig``). With
p = π_θ(a_t), q = μ(a_t) the inference policy's probability, r = p/q:

    M_t = 0  if A > 0 and p − q > δ_high,   or A ≤ 0 and p − q < −δ_low;   1 otherwise
    ℓ_t = −M_t · τ_A · A · r  +  τ_KL · (log r)²

The policy term keeps the gradient through r (∇ℓ = −M·τ_A·A·r·∇log π_θ, DPPO's gradient, with no
cap on r); the KL term is not masked by M and pulls π_θ back towards μ with gradient
2·τ_KL·log r·∇log π_θ. M is `stable_async.losses.dppo.trust_region_mask` with the binary TV
|p − q| (the same mask as ``dppo_binary_tv``). prime-rl sums ℓ over tokens and divides by the
global count of loss tokens: ``token-mean`` with ``global_num_tokens``.

Defaults (prime-rl's): δ_low = δ_high = 0.2 (``dppo_mask_low/high``), τ_A = 1 (``adv_tau``),
τ_KL = 1e-3 (``kl_tau``). μ is ``rollout_logprobs`` (prime-rl's ``inference_logprobs``; it has no
separate π_old). The log-ratio is clamped to ±20 before ``exp`` (prime-rl does not clamp).

Metrics: the DPPO ones (``actor/pg_clipfrac`` = masked fraction, ``dppo/masked_frac_pos/neg``,
``dppo/divergence_mean/max``), and ``prime_rl/kl_loss`` (the mean of (log r)²) and
``prime_rl/mismatch_kl`` (the mean of r − 1 − log r, prime-rl's ``mismatch_kl``).
"""

from __future__ import annotations

from dataclasses import dataclass

from stable_async._numerics import LOG_RATIO_BOUND, masked_mean
from stable_async.batch import BatchValidationError, PolicyBatch
from stable_async.checks import check_number
from stable_async.divergence import binary_tv
from stable_async.losses.base import LossConfig, LossOutput, finish
from stable_async.losses.dppo import dppo_metrics, trust_region_mask
from stable_async.registry import register_loss

PRIME_RL_COMMIT = "559b44772e471d1538537b8805cc77f3824a5e64"


@dataclass(frozen=True)
class PrimeRLConfig(LossConfig):
    """prime-rl ``DefaultLossConfig`` settings."""

    delta_low: float = 0.2
    delta_high: float = 0.2
    adv_tau: float = 1.0
    kl_tau: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("delta_low", "delta_high", "adv_tau", "kl_tau"):
            check_number(name, getattr(self, name), low=0.0)


@register_loss("prime_rl", config=PrimeRLConfig, requires={"rollout_logprobs"}, weights_by_rollout=True)
def prime_rl(batch: PolicyBatch, config: PrimeRLConfig) -> LossOutput:
    """prime-rl's default loss (see module docstring)."""
    if batch.rollout_logprobs is None:
        raise BatchValidationError("rollout_logprobs: required by prime_rl (the inference policy μ)")
    mu, lp, adv = batch.rollout_logprobs, batch.logprobs, batch.advantages
    log_ratio = (lp - mu).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    ratio = log_ratio.exp()
    divergence = binary_tv(lp.detach(), mu)
    pushed_up = adv > 0
    dropped = trust_region_mask(lp, mu, pushed_up, divergence, config.delta_low, config.delta_high)
    kl = log_ratio.square()
    loss_mat = -(~dropped).to(ratio.dtype) * config.adv_tau * adv * ratio + config.kl_tau * kl
    metrics = dppo_metrics(batch, dropped, pushed_up, log_ratio.detach(), ratio.detach(), divergence, None)
    metrics["prime_rl/kl_loss"] = masked_mean(kl.detach(), batch.mask)
    r = ratio.detach()
    metrics["prime_rl/mismatch_kl"] = masked_mean(r - 1.0 - log_ratio.detach(), batch.mask)
    return finish(batch, config, loss_mat, metrics)
