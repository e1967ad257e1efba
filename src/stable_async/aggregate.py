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

import math
from typing import Any

import torch

from stable_async._numerics import count_true, mask_count, masked_sum, weighted_sum
from stable_async.checks import check_mask, check_number, check_tensor

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


def check_dp_size(dp_size: Any) -> int:
    """``dp_size`` as an int: an integer >= 1 (``2.0`` is fine; a bool, NaN, 1.5 or 0 are not)."""
    return int(check_number("dp_size", dp_size, low=1, integer=True, expected="a positive integer"))


def check_global_count(name: str, value: Any, local_count: float | None = None) -> float | None:
    """None, or a global count as a float: a finite number >= 0, and >= ``local_count`` (the
    count of this rank alone, which the global one includes).

    Not required to be an integer: a trainer's normalizer in place of a count, such as TRL's
    ``num_items_in_batch · GA / steps_per_generation``, can be fractional.
    """
    if value is None:
        return None
    count = check_number(name, value, low=0, expected="a count >= 0 (a finite number)")
    if local_count is not None and count < local_count:
        raise ValueError(
            f"{name}: expected a global count >= the local count {local_count:g} (it includes this rank's), "
            f"got {value!r}"
        )
    return count


def check_norm_length(norm_length: Any) -> float | None:
    """None, or the constant L of ``seq-mean-token-sum-norm``: a finite number > 0."""
    return None if norm_length is None else check_number("norm_length", norm_length, low=0, low_open=True)


def _denominator(mask: torch.Tensor, global_count: float | None, dp_size: int, like: torch.Tensor) -> torch.Tensor:
    """The count to divide by, in the dtype of ``like``: the global one if given, else Σ ``mask``."""
    if global_count is None:
        if dp_size != 1:
            raise ValueError(
                "global_num_tokens / global_num_seqs: required when dp_size > 1 "
                "(use PolicyBatch.with_global_counts(process_group))"
            )
        return mask_count(mask, like.dtype)
    return torch.as_tensor(float(global_count), dtype=like.dtype, device=like.device)


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
    check_tensor("loss_mat", loss_mat, floating=True)
    check_tensor("mask", mask)
    if loss_mat.dim() != 2 or loss_mat.shape != mask.shape:
        raise ValueError(
            f"loss_mat / mask: expected two (B, T) tensors of the same shape, got "
            f"{tuple(loss_mat.shape)} and {tuple(mask.shape)}"
        )
    m = check_mask("mask", mask, device=loss_mat.device, what="the device of loss_mat")
    dp_size = check_dp_size(dp_size)
    norm_length = check_norm_length(norm_length)
    if global_num_tokens is not None or global_num_seqs is not None:
        local = torch.stack([count_true(m), count_true(m.any(dim=-1))]).tolist()
        global_num_tokens = check_global_count("global_num_tokens", global_num_tokens, local[0])
        global_num_seqs = check_global_count("global_num_seqs", global_num_seqs, local[1])
    return _aggregate(loss_mat, m, None, mode, global_num_tokens, global_num_seqs, dp_size, norm_length)


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
        loss = _safe_divide(total, _denominator(m, global_num_tokens, dp_size, loss_mat))
        return loss * dp_size if dp_size != 1 else loss

    seq_tokens = mask_count(m, loss_mat.dtype, dim=-1)
    seq_valid = seq_tokens > 0
    seq_sum = masked_total(dim=-1)
    seq_loss = seq_sum / seq_tokens.clamp(min=1.0) if mode == "seq-mean-token-mean" else seq_sum
    loss = aggregate_sequences(seq_loss, seq_valid, global_num_seqs=global_num_seqs, dp_size=dp_size)
    if mode == "seq-mean-token-sum-norm":
        length = float(max(loss_mat.shape[-1], 1)) if norm_length is None else float(norm_length)
        if not (math.isfinite(length) and length > 0):
            raise ValueError(f"norm_length: expected a finite number > 0, got {norm_length!r}")
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
    if isinstance(seq_valid, torch.Tensor) and seq_valid.dtype != torch.bool:
        seq_valid = check_mask("seq_valid", seq_valid)
    total = masked_sum(seq_loss, seq_valid)
    loss = _safe_divide(total, _denominator(seq_valid, global_num_seqs, dp_size, seq_loss))
    return loss * dp_size if dp_size != 1 else loss
