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

import itertools
import math
from typing import Any

import torch

from stable_async._numerics import LOG_RATIO_BOUND, compute_dtype
from stable_async.checks import check_int, check_number, check_tensor


def _as_compute(*tensors: torch.Tensor) -> list[torch.Tensor]:
    dtype = compute_dtype(*tensors)
    return [t.to(dtype) for t in tensors]


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
    with ``eps = 0`` it is evaluated from the log-probabilities as
    q·(log q − log p) + (1 − q)·log1p((p − q)/(1 − p)) with p − q = q·expm1(log p − log q),
    1 − max(p, q) from ``expm1`` and the other complement as it plus |p − q|. In fp64 the error
    stays below 1e-12 of the value plus 1e-15 of q·|log q − log p|, even for p ≈ q or p, q near 1
    (tests/unit/test_dppo.py checks it against an 80-digit evaluation); infinite only where
    p = 1 > q.

    ``eps`` must lie in [0, 0.5): the interval [eps, 1 − eps] is empty above 0.5, and at 0.5 it
    is the single point ½, which makes the KL identically 0 (``eps=0.7`` used to return 0 where
    the true value is 2.04).
    """
    eps = check_number("eps", eps, low=0.0, high=0.5, high_open=True)
    lp, lq = _as_compute(logprobs, rollout_logprobs)
    if eps > 0:
        lo, hi = torch.log(torch.tensor(eps, dtype=lp.dtype)), torch.log1p(torch.tensor(-eps, dtype=lp.dtype))
        lp, lq = lp.clamp(min=float(lo), max=float(hi)), lq.clamp(min=float(lo), max=float(hi))
    return _binary_kl_log_space(lp, lq)


def _binary_kl_log_space(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """q·(log q − log p) + (1 − q)·log1p((p − q)/(1 − p)), every factor from log-probabilities:

    p − q = q·expm1(log p − log q) is accurate to a few ulp however close p is to q. Of the two
    complements, the smaller, 1 − max(p, q) = −expm1(max(log p, log q)), is accurate however
    close the probability is to 1, and the larger is it plus |p − q|: a sum of non-negative
    terms, so no complement comes from a cancellation. The tail is 0 where q ≥ 1; where
    p = 1 > q it is +inf (the divergence is infinite).
    """
    lp = lp.clamp(max=0.0)
    q = torch.exp(lq)
    log_ratio = lp - lq
    gap = q * torch.expm1(log_ratio)  # p − q
    # 0 − expm1(·): +0.0, never −0.0, at probability 1; a log q > 0 counts as q = 1.
    one_minus_high = torch.rsub(torch.expm1(torch.maximum(lp, lq)), 0.0).clamp_(min=0.0)
    one_minus_p = one_minus_high + (-gap).clamp(min=0.0)
    one_minus_q = one_minus_high + gap.clamp(min=0.0)
    tail = torch.log1p(gap / one_minus_p) * one_minus_q
    # NaN and −inf only arise where the tail is 0 or negligible: at q = 1 (0·log 0, or 0·∞ when
    # p = 1 too), and where 1 − q is below an ulp of 1 − p (the log1p argument rounds to ≤ −1;
    # the true tail (1 − q)·log((1 − q)/(1 − p)) is then negligible next to the head term).
    # +inf (p = 1 > q: the divergence is infinite) is kept.
    tail = torch.nan_to_num(tail, nan=0.0, neginf=0.0, posinf=math.inf)
    return (tail - q * log_ratio).clamp(min=0.0)


# ----------------------------------------------------------------------------- top-K (DPPO)
# Top-K divergences over S = the rollout's top-K ids at a position (the sampled token forced in)
# plus one "rest" bucket holding the remaining mass, clamped to >= REST_MASS_FLOOR:
#
#     KL(q ‖ p) = Σ_{k∈S} q_k (log q_k − log p_k) + q_rest log(q_rest / p_rest)
#     TV(q, p)  = ½ (Σ_{k∈S} |q_k − p_k| + |q_rest − p_rest|)
#
# Coarse-graining the vocabulary into S ∪ {rest} can only shrink a divergence (data
# processing), so binary ≤ top-K ≤ full vocabulary when the sampled token is in S, with
# equality to the full divergence for K = V. As in the reference code (sail-sg/Stable-RL,
# ``compute_topk_kl``) the values are detached: they gate a mask and carry no gradient.
# Differences from the reference: the rest mass is −expm1(logsumexp(log p_S)) rather than
# 1 − Σ exp(log p_k) (more accurate when the top-K mass is near 1), only the rest masses are
# clamped (the reference also clamps the top-K mass, which no formula above uses), entries
# with q_k = 0 (padding at −inf) contribute 0, and the arithmetic is fp64 for fp64 input.

REST_MASS_FLOOR = 1e-12
_CHUNK_ELEMENTS = 1 << 22  # logits entries per chunk in gather_topk_logprobs (16 MiB of fp32)


def _topk_masses(topk_logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(probabilities (..., K), rest mass (...), log rest mass (...)); the rest mass is clamped ≥ 1e-12."""
    probs = torch.exp(topk_logprobs)
    rest = (-torch.expm1(torch.logsumexp(topk_logprobs, dim=-1))).clamp(min=REST_MASS_FLOOR)
    return probs, rest, torch.log(rest)


def _check_topk_pair(current: torch.Tensor, rollout: torch.Tensor) -> None:
    check_tensor("current_topk_logprobs", current, floating=True)
    check_tensor(
        "rollout_topk_logprobs",
        rollout,
        floating=True,
        device=current.device,
        what="the device of current_topk_logprobs",
    )
    if current.shape != rollout.shape or current.dim() < 1:
        raise ValueError(
            "current_topk_logprobs, rollout_topk_logprobs: expected the same shape (..., K), got "
            f"{tuple(current.shape)} and {tuple(rollout.shape)}"
        )


@torch.no_grad()
def topk_tv(current_topk_logprobs: torch.Tensor, rollout_topk_logprobs: torch.Tensor) -> torch.Tensor:
    """Top-K total variation ½(Σ_k |q_k − p_k| + |q_rest − p_rest|), (..., K) -> (...), detached.

    ``current_topk_logprobs`` are log p = log π_θ at the rollout's top-K ids,
    ``rollout_topk_logprobs`` are log q = log μ at the same ids.
    """
    _check_topk_pair(current_topk_logprobs, rollout_topk_logprobs)
    lp, lq = _as_compute(current_topk_logprobs.detach(), rollout_topk_logprobs.detach())
    p, p_rest, _ = _topk_masses(lp)
    q, q_rest, _ = _topk_masses(lq)
    return 0.5 * ((q - p).abs().sum(dim=-1) + (q_rest - p_rest).abs())


@torch.no_grad()
def topk_kl(current_topk_logprobs: torch.Tensor, rollout_topk_logprobs: torch.Tensor) -> torch.Tensor:
    """Top-K KL(q ‖ p) = Σ_k q_k(log q_k − log p_k) + q_rest log(q_rest/p_rest), (..., K) -> (...), detached.

    q = μ (``rollout_topk_logprobs``) is the distribution the tokens were sampled from, as in
    `binary_kl`; p = π_θ (``current_topk_logprobs``). The result is ≥ 0 up to rounding.
    """
    _check_topk_pair(current_topk_logprobs, rollout_topk_logprobs)
    lp, lq = _as_compute(current_topk_logprobs.detach(), rollout_topk_logprobs.detach())
    _, _, log_p_rest = _topk_masses(lp)
    q, q_rest, log_q_rest = _topk_masses(lq)
    head = torch.where(q > 0, q * (lq - lp), torch.zeros_like(q)).sum(dim=-1)
    return head + q_rest * (log_q_rest - log_p_rest)


def _row_blocks(lead: tuple[int, ...], rows: int) -> list[tuple[int | slice, ...]]:
    """Indices into the leading dims, each selecting ≤ ``rows`` positions as a 2-D (rows, V) view."""
    if not lead:
        return [()]
    *outer, last = lead
    return [(*o, slice(s, s + rows)) for o in itertools.product(*map(range, outer)) for s in range(0, last, rows)]


class _GatherLogSoftmax(torch.autograd.Function):
    """log_softmax(logits).gather(-1, ids) without a (tokens, V) temporary.

    Forward: logsumexp over the vocabulary in row blocks (fp32, or fp64 for fp64 logits), then
    a gather. Backward: d/dlogits = scatter(g) − softmax(logits)·Σ_k g_k, again block by block,
    written straight into the logits' gradient (the only (tokens, V) tensor, which any
    gradient with respect to the logits needs). Blocks are views: no copy of the logits even
    when they are not contiguous (e.g. ``logits[:, :-1]``).
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, ids: torch.Tensor, chunk_rows: int) -> torch.Tensor:
        dtype = compute_dtype(logits)
        lse = torch.empty(logits.shape[:-1], dtype=dtype, device=logits.device)
        for block in _row_blocks(tuple(logits.shape[:-1]), chunk_rows):
            lse[block] = torch.logsumexp(logits[block].to(dtype), dim=-1)
        out = logits.gather(-1, ids).to(dtype) - lse.unsqueeze(-1)
        ctx.save_for_backward(logits, ids, lse)
        ctx.chunk_rows = chunk_rows
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, ids, lse = ctx.saved_tensors
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        total = grad_out.sum(dim=-1, keepdim=True)
        in_place = logits.dtype == lse.dtype  # compute each block inside the gradient: no block temporary
        for block in _row_blocks(tuple(logits.shape[:-1]), ctx.chunk_rows):
            if in_place:
                part = grad[block]
                torch.sub(logits[block], lse[block].unsqueeze(-1), out=part)
            else:
                part = logits[block].to(lse.dtype) - lse[block].unsqueeze(-1)
            part.exp_().mul_(-total[block])
            part.scatter_add_(-1, ids[block], grad_out[block])
            if not in_place:
                grad[block] = part
        return grad, None, None


def gather_topk_logprobs(logits: torch.Tensor, topk_ids: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """log π_θ at ``topk_ids`` from the trainer's logits: (..., V), (..., K) -> (..., K).

    Equal to ``log_softmax(logits, -1).gather(-1, topk_ids)`` but computed from one
    logsumexp over the vocabulary and a gather, in fp32 (fp64 for fp64 logits), without any
    (tokens, V) tensor besides ``logits`` itself: a second full-vocabulary log-softmax costs as
    much memory as the logits (gigabytes at V ≈ 150k). ``torch.logsumexp`` itself allocates a
    full-size temporary, so rows are processed in blocks of ``chunk_rows`` (default: about 4M
    logits per block), as views of ``logits`` (no copy, contiguous or not). Gradients flow to
    ``logits`` (this is the current policy); the backward allocates only the logits' gradient.
    Not twice differentiable.
    """
    check_tensor("logits", logits)
    check_tensor("topk_ids", topk_ids, device=logits.device, what="the device of logits")
    if logits.dim() < 1 or topk_ids.dim() != logits.dim() or topk_ids.shape[:-1] != logits.shape[:-1]:
        raise ValueError(
            f"topk_ids: expected shape (..., K) with the leading dimensions of logits {tuple(logits.shape)}, "
            f"got {tuple(topk_ids.shape)}"
        )
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise ValueError(f"topk_ids: expected an integer dtype, got {topk_ids.dtype}")
    if not logits.dtype.is_floating_point:
        raise ValueError(f"logits: expected a floating dtype, got {logits.dtype}")
    vocab = logits.shape[-1]
    if topk_ids.numel() and not (int(topk_ids.min()) >= 0 and int(topk_ids.max()) < vocab):
        raise ValueError(
            f"topk_ids: expected token ids in [0, {vocab}) (the vocabulary size of logits), "
            f"got values in [{int(topk_ids.min())}, {int(topk_ids.max())}]"
        )
    if chunk_rows is None:
        chunk_rows = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    else:
        chunk_rows = check_int("chunk_rows", chunk_rows, low=1)
    ids = topk_ids.long()
    if logits.dim() > 2:
        try:  # one flat (tokens, V) view when the layout allows it: fewer, larger blocks
            flat = logits.view(-1, vocab)
        except RuntimeError:
            flat = None
        if flat is not None:
            out = _GatherLogSoftmax.apply(flat, ids.reshape(-1, ids.shape[-1]), chunk_rows)
            return out.view(*ids.shape)
    return _GatherLogSoftmax.apply(logits, ids, chunk_rows)
