"""Sampler-aware log-probabilities: log μ(a) under the truncated, renormalized distribution the
engine actually samples from.

With temperature τ, min-p, top-k or top-p, vLLM samples token a from

    μ(a) = exp(z_a) / Σ_{b∈K} exp(z_b)  for a ∈ K,   0 otherwise,      z = logits / τ

where K is the set of tokens that survive the filters, and with ``logprobs_mode=
"processed_logprobs"`` (TRL's and prime-rl's setting) it reports log μ(a). A trainer that
recomputes a full-vocabulary ``log_softmax(logits / τ)`` gets log μ(a) + log S with
S = Σ_{b∈K} softmax(z)_b the surviving mass, so every importance ratio is multiplied by S
(TRL issue #6789: ratio ≈ 0.9 at top_p = 0.9, ≈ 0.17 at top_k = 50 on a 32k vocabulary). This
function recomputes the engine's μ, so π_old / μ and π_θ / μ compare like with like.

Order of operations (vLLM v1, ``vllm/v1/sample/sampler.py`` at commit 3e342658b2e9 and
``vllm/v1/sample/ops/topk_topp_sampler.py`` ``apply_top_k_top_p_pytorch`` at commit
01fa3fe74b05; min-p from ``vllm/v1/sample/logits_processor/builtin.py`` ``MinPLogitsProcessor``
at commit bf17660a2493):

1. logits in fp32 (fp64 here when the logits are fp64), divided by τ;
2. min-p (an argmax-invariant logits processor, applied before top-k/top-p): drop a token if
   softmax(z)_a < min_p · max_b softmax(z)_b, evaluated here as z_a − max z < log(min_p);
3. top-k: drop a token whose z is strictly below the k-th largest z (every token tied with the
   k-th value is kept, so K may hold more than k tokens);
4. top-p: on the survivors, sorted ascending, with p the renormalized probabilities and c their
   cumulative sums, drop every position with c ≤ 1 − top_p; the largest token is always kept;
5. softmax over the survivors.

Ties at the top-p cut-off: vLLM's sort is not stable, so when several tokens share the value at
the cut-off, which of them survive depends on the sort, but how many survive (and so the
normalizer) does not. Here the normalizer counts exactly that many, and every token of such a
tie is reported as kept (the engine drew the sampled one, so it survived): its log-prob is
z_a − log Σ_K. At the top-k cut-off vLLM keeps all tied tokens, as here.

Tokens outside K get −inf (and a zero gradient); a −inf logit bans a token (vLLM's allowed ids).
Rounding can move a token that sits within a few ulp of a cut-off across it (vLLM computes
top-p's cumulative sum in fp32, possibly in another order on GPU or in its Triton kernel); a −inf
for a token the engine actually sampled is the sign of such a boundary case: mask that token out
of the loss. Other engine steps (logit bias, bad words, penalties, allowed ids) are not
reproduced; pass logits that already include them.

Memory: besides the fp32/fp64 copy of z, one masked copy of z for the differentiable logsumexp
and bool masks; the top-p and min-p thresholds are found without gradient, ``chunk_rows`` rows at
a time (top-p sorts each row: with top-k set, only the top-k values are sorted).
"""

from __future__ import annotations

import math

import torch

from stable_async._numerics import compute_dtype
from stable_async.checks import check_int, check_number

_CHUNK_ELEMENTS = 1 << 24


def _check_options(
    temperature: float, top_k: int | None, top_p: float | None, min_p: float | None
) -> tuple[int | None, float | None, float | None]:
    """Validated settings, with vLLM's "off" values (top_k 0 / -1, top_p 1, min_p 0) as None."""
    check_number("temperature", temperature, low=0.0, low_open=True)
    if top_k is not None and check_int("top_k", top_k, low=-1) in (0, -1):
        top_k = None
    if top_p is not None and check_number("top_p", top_p, low=0.0, high=1.0, low_open=True) == 1:
        top_p = None
    if min_p is not None and check_number("min_p", min_p, low=0.0, high=1.0) == 0:
        min_p = None
    return top_k, top_p, min_p


@torch.no_grad()
def _thresholds(
    z: torch.Tensor, top_k: int | None, top_p: float | None, min_p: float | None, chunk_rows: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per row: the smallest kept value c (K = {z ≥ c}), and for top-p the log of the kept
    fraction of the tie at c (0 where the whole tie is kept), or None without top-p."""
    rows, V = z.shape
    cut = torch.empty(rows, dtype=z.dtype, device=z.device)
    tie_log_frac = torch.zeros(rows, dtype=z.dtype, device=z.device) if top_p is not None else None
    k = None if top_k is None or top_k >= V else top_k
    for start in range(0, rows, chunk_rows):
        zc = z[start : start + chunk_rows]
        c = torch.full((zc.shape[0],), -math.inf, dtype=z.dtype, device=z.device)
        if min_p is not None:
            c = zc.amax(dim=-1) + math.log(min_p)
        if k is not None:
            c = torch.maximum(c, zc.topk(k, dim=-1).values[:, -1])
        if top_p is not None and tie_log_frac is not None:
            _top_p_cut(zc, c, k, top_p, out_cut=c, out_tie=tie_log_frac[start : start + chunk_rows])
        cut[start : start + chunk_rows] = c
    return cut, tie_log_frac


def _top_p_cut(
    zc: torch.Tensor, c: torch.Tensor, k: int | None, top_p: float, out_cut: torch.Tensor, out_tie: torch.Tensor
) -> None:
    """Step 4 on the survivors {z ≥ c}; writes the new cut and the tie fraction in place."""
    survivors = zc >= c[:, None]
    n_kept = survivors.sum(dim=-1)
    if k is not None and bool((n_kept <= k).all()):
        values = zc.topk(k, dim=-1).values.flip(-1)  # ascending; every survivor is among them
        values = values.masked_fill(values < c[:, None], -math.inf)
    else:
        values = zc.masked_fill(~survivors, -math.inf).sort(dim=-1).values
    cumulative = values.softmax(dim=-1).cumsum(dim=-1)
    dropped = cumulative <= 1 - top_p
    dropped[:, -1] = False
    n_dropped = dropped.sum(dim=-1, keepdim=True)
    new_cut = values.gather(-1, n_dropped)[:, 0]  # the first (smallest) survivor
    at_cut = values == new_cut[:, None]
    n_tie = at_cut.sum(dim=-1)
    n_tie_dropped = (at_cut & dropped).sum(dim=-1)
    out_tie.copy_(torch.log((n_tie - n_tie_dropped).to(zc.dtype) / n_tie.to(zc.dtype)))
    out_cut.copy_(new_cut)


def sampling_logprobs(
    logits: torch.Tensor,
    ids: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    *,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """log μ(ids) under vLLM's filtered, renormalized sampling distribution (see module docstring).

    Args:
        logits: (..., V) raw logits (after any logit bias or penalties the engine applied).
        ids: (...) integer token ids in [0, V), the same leading shape.
        temperature: τ > 0.
        top_k: keep the k largest (ties kept); None, 0 or -1: off (vLLM's convention).
        top_p: nucleus mass in (0, 1]; None or 1: off.
        min_p: in [0, 1]; None or 0: off.
        chunk_rows: rows per threshold pass (default: about 2^24 elements per chunk).

    Returns:
        (...) log-probabilities in fp32 (fp64 for fp64 logits), −inf for ids outside the kept set;
        differentiable with respect to ``logits``.
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() < 1:
        raise TypeError(f"logits: expected a floating tensor (..., V), got {getattr(logits, 'shape', logits)!r}")
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"ids: expected an integer tensor, got {getattr(ids, 'dtype', type(ids).__name__)}")
    if tuple(ids.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"ids: expected shape {tuple(logits.shape[:-1])} (logits without V), got {tuple(ids.shape)}")
    if ids.device != logits.device:
        raise ValueError(f"ids: expected device {logits.device} (the device of logits), got {ids.device}")
    V = logits.shape[-1]
    if V == 0:
        raise ValueError("logits: the vocabulary dimension is empty")
    if ids.numel() and not bool(((ids >= 0) & (ids < V)).all()):
        raise ValueError(f"ids: expected values in [0, {V}), got min {int(ids.min())}, max {int(ids.max())}")
    top_k, top_p, min_p = _check_options(temperature, top_k, top_p, min_p)
    if chunk_rows is not None:
        check_int("chunk_rows", chunk_rows, low=1)

    dtype = compute_dtype(logits)
    z = logits.reshape(-1, V).to(dtype)
    if temperature != 1.0:
        z = z / temperature
    zd = z.detach()
    if zd.numel() and not bool(
        (~torch.isnan(zd).any()) & (zd.amax(dim=-1) < math.inf).all() & (zd.amax(dim=-1) > -math.inf).all()
    ):
        raise ValueError("logits: expected no NaN or +inf, and a finite maximum in every row (-inf bans a token)")
    flat_ids = ids.reshape(-1, 1).long()
    chosen = z.gather(-1, flat_ids)[:, 0]
    if top_k is None and top_p is None and min_p is None:
        return (chosen - torch.logsumexp(z, dim=-1)).reshape(ids.shape)
    rows = max(1, chunk_rows or _CHUNK_ELEMENTS // V)
    cut, tie_log_frac = _thresholds(zd, top_k, top_p, min_p, rows)
    kept_logits = z.masked_fill(zd < cut[:, None], -math.inf)
    if tie_log_frac is not None and bool((tie_log_frac < 0).any()):
        # A tie at the top-p cut-off that vLLM keeps only in part: count the kept share of it.
        partial = (zd == cut[:, None]) & (tie_log_frac < 0)[:, None]
        kept_logits = kept_logits + torch.where(partial, tie_log_frac[:, None], 0.0)
    out = chosen - torch.logsumexp(kept_logits, dim=-1)
    return out.masked_fill(chosen.detach() < cut, -math.inf).reshape(ids.shape)
