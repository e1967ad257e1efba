"""Per-token divergences between the current policy p = π and a reference policy q = μ.

KL is KL(q ‖ p) throughout: the expectation is under the policy that sampled the tokens.
With λ = log p(a) − log q(a) for the sampled token a:

* k1 = −λ = log(q/p)                   (unbiased for KL(q‖p) under q; can be negative)
* k2 = ½ λ²                             (low variance, biased)
* k3 = e^λ − 1 − λ = p/q − 1 − log(p/q) (unbiased, ≥ 0; Schulman 2020, "Approximating KL")
* binary KL = q log(q/p) + (1−q) log((1−q)/(1−p)): KL between the two-outcome distributions
  {a, not a}; by the data-processing inequality a lower bound of the full KL.
* binary TV = |p − q|, likewise a lower bound of the full total variation.

DPPO (arXiv 2602.04879) uses the binary and top-K forms as a trust region. Everything is
computed in the compute dtype from log-probabilities, with ``log(1 − e^x)`` evaluated stably.
"""

from __future__ import annotations

import torch

from stable_async._numerics import LOG_RATIO_BOUND, compute_dtype


def _as_compute(*tensors: torch.Tensor) -> list[torch.Tensor]:
    dtype = compute_dtype(*tensors)
    return [t.to(dtype) for t in tensors]


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − e^x) for x ≤ 0, accurate near 0 and for very negative x (Mächler 2012)."""
    x = x.clamp(max=0.0)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log q − log p (per token)."""
    lp, lq = _as_compute(logprobs, ref_logprobs)
    return lq - lp


def k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = ½ (log p − log q)² (per token)."""
    lp, lq = _as_compute(logprobs, ref_logprobs)
    return 0.5 * (lp - lq) ** 2


def k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = p/q − 1 − log(p/q), with the log-ratio clamped to ±20 before ``exp``."""
    lp, lq = _as_compute(logprobs, ref_logprobs)
    lam = (lp - lq).clamp(min=-LOG_RATIO_BOUND, max=LOG_RATIO_BOUND)
    return torch.expm1(lam) - lam


def binary_tv(logprobs: torch.Tensor, rollout_logprobs: torch.Tensor) -> torch.Tensor:
    """Binary total variation |p − q| of the sampled token's probability (elementwise)."""
    lp, lq = _as_compute(logprobs, rollout_logprobs)
    return (torch.exp(lp) - torch.exp(lq)).abs()


def binary_kl(logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Binary KL(q ‖ p) over {sampled token, everything else} (elementwise, ≥ 0).

    ``eps`` > 0 clamps both probabilities to [eps, 1 − eps] first (OpenRLHF's gate uses 1e-6);
    with ``eps = 0`` the computation is exact in log space and infinite only where p = 1 ≠ q.
    """
    lp, lq = _as_compute(logprobs, rollout_logprobs)
    if eps > 0:
        lo, hi = torch.log(torch.tensor(eps, dtype=lp.dtype)), torch.log1p(torch.tensor(-eps, dtype=lp.dtype))
        lp, lq = lp.clamp(min=float(lo), max=float(hi)), lq.clamp(min=float(lo), max=float(hi))
    q = torch.exp(lq)
    head = q * (lq - lp)
    tail = (1.0 - q) * (log1mexp(lq) - log1mexp(lp))
    # (1 − q)·log(...) with q = 1 is 0·finite, or 0 · inf when p = 1 too: define it as 0.
    tail = torch.where(q >= 1.0, torch.zeros_like(tail), tail)
    return (head + tail).clamp(min=0.0)
