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


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ mask·values, with masked positions contributing exactly zero (even if they hold inf/NaN)."""
    zeroed = torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))
    return zeroed.sum() if dim is None else zeroed.sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ mask·values / Σ mask, and 0 where the mask is empty (never 0/0)."""
    count = mask.to(values.dtype).sum() if dim is None else mask.to(values.dtype).sum(dim=dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1.0)


def masked_max(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Largest valid value, 0 where nothing is valid."""
    if not bool(mask.any()):
        return torch.zeros((), dtype=values.dtype, device=values.device)
    return values[mask.bool()].max()


def masked_min(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Smallest valid value, 0 where nothing is valid."""
    if not bool(mask.any()):
        return torch.zeros((), dtype=values.dtype, device=values.device)
    return values[mask.bool()].min()


def sequence_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor, *, mean: bool) -> torch.Tensor:
    """Per-sequence Σ_t m·log r (``mean=False``) or its masked mean (``mean=True``), shape (B,)."""
    total = masked_sum(log_ratio, mask, dim=-1)
    if not mean:
        return total
    return total / mask.to(log_ratio.dtype).sum(dim=-1).clamp(min=1.0)
