"""Numeric helpers shared by every method: compute dtype, safe exponentials, masked reductions.

All arithmetic runs in fp32, or in fp64 when the inputs are fp64, whatever the input dtype.
Log-ratios are clamped to ``±LOG_RATIO_BOUND`` (20, as in veRL and OpenRLHF) before ``exp``.
"""

from __future__ import annotations

import torch

LOG_RATIO_BOUND = 20.0


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp64 if any given tensor is fp64, otherwise fp32."""
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def safe_exp(log_value: torch.Tensor, bound: float = LOG_RATIO_BOUND) -> torch.Tensor:
    """``exp(clamp(x, -bound, bound))``: the ratio of two log-probabilities without overflow."""
    return torch.exp(torch.clamp(log_value, min=-bound, max=bound))


def count_true(mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Number of True (nonzero) entries, as an integer tensor: exact, and no float copy of the mask."""
    dtype = torch.int32 if mask.numel() < 2**31 else torch.int64
    return mask.sum(dtype=dtype) if dim is None else mask.sum(dim=dim, dtype=dtype)


def weighted_sum(values: torch.Tensor, weights: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ weights·values for a 0/1 (float) mask ``weights``.

    Unlike `masked_sum`, a NaN/inf at a masked position poisons the sum (0·inf = NaN): use it for
    values known to be finite where masked, such as anything computed from `PolicyBatch` fields
    (the batch zeroes NaN/inf at masked positions), and check the result where that is not certain.
    """
    if dim is None:
        if values.is_contiguous() and weights.is_contiguous() and values.dtype == weights.dtype:
            return torch.dot(values.reshape(-1), weights.reshape(-1))
        return (values * weights).sum()
    return (values * weights).sum(dim=dim)


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ mask·values, with masked positions contributing exactly zero (even if they hold inf/NaN)."""
    zeroed = torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))
    return zeroed.sum() if dim is None else zeroed.sum(dim=dim)


def mask_count(mask: torch.Tensor, dtype: torch.dtype, dim: int | None = None) -> torch.Tensor:
    """Σ mask in ``dtype``; a bool mask is counted in integers (exact, no float copy of the mask)."""
    if mask.dtype == torch.bool:
        return count_true(mask, dim).to(dtype)
    return mask.to(dtype).sum() if dim is None else mask.to(dtype).sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ mask·values / Σ mask, and 0 where the mask is empty (never 0/0)."""
    return masked_sum(values, mask, dim) / mask_count(mask, values.dtype, dim).clamp(min=1.0)


def _masked_extreme(values: torch.Tensor, mask: torch.Tensor, largest: bool) -> torch.Tensor:
    m = mask.bool()
    if not values.dtype.is_floating_point or m.shape != values.shape:
        if not bool(m.any()):
            return torch.zeros((), dtype=values.dtype, device=values.device)
        return values[m].max() if largest else values[m].min()
    # A fill that never wins, one reduction, and no host sync (no boolean indexing, no ``if mask.any()``).
    fill = torch.full((), float("-inf") if largest else float("inf"), dtype=values.dtype, device=values.device)
    filled = torch.where(m, values, fill)
    if not filled.numel():
        return torch.zeros((), dtype=values.dtype, device=values.device)
    out = filled.max() if largest else filled.min()
    return torch.where(m.any(), out, torch.zeros((), dtype=values.dtype, device=values.device))


def masked_max(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Largest valid value, 0 where nothing is valid."""
    return _masked_extreme(values, mask, largest=True)


def masked_min(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Smallest valid value, 0 where nothing is valid."""
    return _masked_extreme(values, mask, largest=False)


def sequence_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor, *, mean: bool) -> torch.Tensor:
    """Per-sequence Σ_t m·log r (``mean=False``) or its masked mean (``mean=True``), shape (B,)."""
    total = masked_sum(log_ratio, mask, dim=-1)
    if not mean:
        return total
    return total / mask_count(mask, log_ratio.dtype, dim=-1).clamp(min=1.0)
