"""Loss aggregation: a (B, T) per-token loss matrix and its mask to one scalar.

Modes (m the mask, ℓ the per-token loss, B the number of sequences with at least one valid
token, L a fixed length):

* ``token-mean``               Σ m·ℓ / Σ m
* ``token-sum``                Σ m·ℓ
* ``seq-mean-token-mean``      mean over sequences of (Σ_t m·ℓ / Σ_t m)
* ``seq-mean-token-sum``       mean over sequences of Σ_t m·ℓ
* ``seq-mean-token-sum-norm``  Σ m·ℓ / (B · L)   (Dr. GRPO, arXiv 2503.20783)

Data parallelism. The denominators are *global* counts (``global_num_tokens`` valid tokens,
``global_num_seqs`` valid sequences over all ranks) and the local result is multiplied by
``dp_size``, the factor by which the framework averages gradients across ranks. Then the
averaged gradient equals the gradient of the aggregated loss on the concatenated batch,
however the batch is sharded. This is veRL's ``agg_loss`` convention (same arguments:
``dp_size``, ``batch_num_tokens`` = global tokens, ``global_batch_size`` = global sequences,
``loss_scale_factor`` = L); with local counts and ``dp_size=1`` it is plain local aggregation.

Differences from veRL, on purpose: an empty batch or a zero count gives a loss of exactly 0
(veRL divides 0/0), and ``seq-mean-token-mean`` divides by the exact token count of a
sequence where veRL divides by count + 1e-8 (a relative difference below 1e-8).
"""

from __future__ import annotations

import torch

from stable_async._numerics import mask_count, masked_sum, weighted_sum

AGGREGATION_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)


def check_aggregation(mode: str, argument: str = "aggregation") -> str:
    """Validate an aggregation mode name, naming the argument in the error."""
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"{argument}: unknown aggregation mode {mode!r}; expected one of {list(AGGREGATION_MODES)}")
    return mode


def _denominator(
    local: torch.Tensor | None, global_count: float | None, dp_size: int, like: torch.Tensor | None = None
) -> torch.Tensor:
    """The count to divide by: the global one if given, else ``local`` (computed only when needed)."""
    if global_count is None:
        if dp_size != 1:
            raise ValueError(
                "global_num_tokens / global_num_seqs: required when dp_size > 1 "
                "(use PolicyBatch.with_global_counts(process_group))"
            )
        count = local
    else:
        ref = local if local is not None else like
        count = torch.as_tensor(float(global_count), dtype=ref.dtype, device=ref.device)
    return count


def _safe_divide(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """total / count, and 0 (with zero gradient) when the count is 0."""
    return torch.where(count > 0, total / count.clamp(min=1e-30), total * 0)


def aggregate(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    *,
    global_num_tokens: float | None = None,
    global_num_seqs: float | None = None,
    dp_size: int = 1,
    norm_length: float | None = None,
) -> torch.Tensor:
    """Aggregate a (B, T) per-token loss matrix into a scalar (see the module docstring).

    Args:
        loss_mat: (B, T) per-token losses. Values at masked positions are ignored, even inf/NaN.
        mask: (B, T) bool or 0/1.
        mode: one of `AGGREGATION_MODES`.
        global_num_tokens: valid tokens in the global minibatch (all ranks); default local.
        global_num_seqs: sequences with ≥ 1 valid token in the global minibatch; default local.
        dp_size: gradient-averaging factor across ranks (the world size under DDP/FSDP).
        norm_length: the constant L of ``seq-mean-token-sum-norm``; default T = ``loss_mat.shape[-1]``
            (veRL's default; pass the maximum response length to keep it constant across batches).

    Returns:
        A 0-dim tensor. Zero, with zero gradient, when nothing is valid.
    """
    check_aggregation(mode, "mode")
    if loss_mat.dim() != 2 or loss_mat.shape != mask.shape:
        raise ValueError(
            f"loss_mat / mask: expected two (B, T) tensors of the same shape, got "
            f"{tuple(loss_mat.shape)} and {tuple(mask.shape)}"
        )
    return _aggregate(loss_mat, mask.bool(), None, mode, global_num_tokens, global_num_seqs, dp_size, norm_length)


def aggregate_finite(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    maskf: torch.Tensor,
    mode: str,
    *,
    global_num_tokens: float | None = None,
    global_num_seqs: float | None = None,
    dp_size: int = 1,
    norm_length: float | None = None,
) -> torch.Tensor:
    """`aggregate` for a loss matrix that is finite at masked positions: sums weighted by the 0/1
    float mask ``maskf`` (= ``mask``) instead of selecting. Same value and gradient when that
    holds; a NaN/inf at a masked position makes the result non-finite, so check it (``finish``
    recomputes with `aggregate` when the loss is not finite)."""
    return _aggregate(loss_mat, mask, maskf, mode, global_num_tokens, global_num_seqs, dp_size, norm_length)


def _aggregate(
    loss_mat: torch.Tensor,
    m: torch.Tensor,
    weights: torch.Tensor | None,
    mode: str,
    global_num_tokens: float | None,
    global_num_seqs: float | None,
    dp_size: int,
    norm_length: float | None,
) -> torch.Tensor:
    def masked_total(dim: int | None = None) -> torch.Tensor:
        return masked_sum(loss_mat, m, dim) if weights is None else weighted_sum(loss_mat, weights, dim)

    if mode in ("token-mean", "token-sum"):
        total = masked_total()
        if mode == "token-sum":
            return total * dp_size if dp_size != 1 else total
        count = mask_count(m, loss_mat.dtype) if global_num_tokens is None else None
        loss = _safe_divide(total, _denominator(count, global_num_tokens, dp_size, loss_mat))
        return loss * dp_size if dp_size != 1 else loss

    seq_tokens = mask_count(m, loss_mat.dtype, dim=-1)
    seq_valid = seq_tokens > 0
    seq_sum = masked_total(dim=-1)
    seq_loss = seq_sum / seq_tokens.clamp(min=1.0) if mode == "seq-mean-token-mean" else seq_sum
    loss = aggregate_sequences(seq_loss, seq_valid, global_num_seqs=global_num_seqs, dp_size=dp_size)
    if mode == "seq-mean-token-sum-norm":
        length = float(max(loss_mat.shape[-1], 1)) if norm_length is None else float(norm_length)
        if length <= 0:
            raise ValueError(f"norm_length: expected a positive length, got {norm_length!r}")
        loss = loss / length
    return loss


def aggregate_sequences(
    seq_loss: torch.Tensor,
    seq_valid: torch.Tensor,
    *,
    global_num_seqs: float | None = None,
    dp_size: int = 1,
) -> torch.Tensor:
    """Mean of per-sequence losses over valid sequences, with the same DP convention."""
    total = masked_sum(seq_loss, seq_valid)
    count = mask_count(seq_valid.bool(), seq_loss.dtype) if global_num_seqs is None else None
    loss = _safe_divide(total, _denominator(count, global_num_seqs, dp_size, seq_loss))
    return loss * dp_size if dp_size != 1 else loss
