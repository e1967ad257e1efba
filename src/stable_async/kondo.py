"""The Kondo gate (Osband, "Does This Gradient Spark Joy?", arXiv 2603.20526): pay for a sample's
backward pass only when its delight is worth the price.

Delight is the Delightful Policy Gradient's signal (arXiv 2603.14608; `stable_async.delight_gate`),
advantage times surprisal, here per sequence, since a backward pass is saved per sequence:

    χ_i = Σ_t m_t · A_{i,t} · (−log π_θ(a_t))        (= A_i · Σ_t −log π_θ(a_t) for one A per sequence)

and the gate draws G_i ~ Bernoulli(σ((χ_i − λ)/η)), λ the compute price, η a temperature. At
λ = 0, P(G_i = 1) = σ(χ_i/η) is exactly DG's weight, so the gated plain policy gradient
G_i·A_i·∇log π has DG's expectation while most samples skip their backward pass: rare
successes (A > 0, high surprisal) are almost always kept, rare failures and confirmations of what
the policy already does are mostly skipped. Raising λ skips more.

Use (the trainer's side, before the backward): score every sequence with a forward pass without
gradient (cheap: no activations kept), call `kondo_gate`, then run the forward with gradient and
the backward on ``selection.indices`` only (examples/custom_loop.py ``--kondo-price``;
benchmarks/kondo measures the time saved).

Options: ``price`` λ (default 0); ``eta`` η (default 1, DG's); ``rate`` ρ in (0, 1]: set λ per
batch to the (1 − ρ)-quantile of χ over the valid sequences instead of a fixed price (a target
backward rate; with ``stochastic=False`` exactly the ⌈ρ·n⌉ sequences of largest χ are kept);
``stochastic=False``: keep iff χ_i > λ (the η → 0 limit) instead of drawing G. Draws use
``generator`` (default: the global generator of the delight's device). A sequence without a
valid token is never kept. Under data parallelism each rank gates its own sequences (the price
from ``rate`` is per rank).

What is reconstructed: the paper's gate G ~ Ber(σ((χ − λ)/η)) and the price/rate trade-off are
from its text; its exact price schedule was not available to us, so ``rate`` (a per-batch
quantile) is our choice of how to hit a target rate. Which loss the kept sequences train on is
the trainer's choice (plain REINFORCE gives DG's expectation at λ = 0, as above).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from stable_async._numerics import compute_dtype, masked_sum
from stable_async.checks import check_flag, check_number, check_optional_number


@dataclass
class KondoSelection:
    """What `kondo_gate` decided.

    Attributes:
        keep: (B,) bool, the sequences whose backward pass is paid for.
        indices: (K,) int64, ``keep.nonzero()``: index the batch with it.
        probabilities: (B,) the gate probabilities σ((χ − λ)/η) (0/1 with ``stochastic=False``).
        delight: (B,) χ_i (0 for a sequence without a valid token).
        price: the λ used.
        valid: (B,) bool, the sequences with a valid token (the only candidates).
    """

    keep: torch.Tensor
    indices: torch.Tensor
    probabilities: torch.Tensor
    delight: torch.Tensor
    price: float
    valid: torch.Tensor

    @property
    def skipped_fraction(self) -> float:
        """Fraction of the sequences with a valid token whose backward pass is skipped."""
        n_valid = int(self.valid.sum())
        return 0.0 if n_valid == 0 else 1.0 - int(self.keep.sum()) / n_valid


def sequence_delight(advantages: torch.Tensor, logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """χ_i = Σ_t m·A_t·(−log π_t), shape (B,), detached, fp32/fp64."""
    dtype = compute_dtype(advantages, logprobs)
    lp = logprobs.detach().to(dtype)
    adv = advantages.detach().to(dtype)
    if adv.dim() == lp.dim() - 1:
        adv = adv.unsqueeze(-1)
    return masked_sum(adv.expand_as(lp) * -lp, mask.bool(), dim=-1)


@torch.no_grad()
def kondo_gate(
    advantages: torch.Tensor,
    logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    price: float = 0.0,
    eta: float = 1.0,
    rate: float | None = None,
    stochastic: bool = True,
    generator: torch.Generator | None = None,
) -> KondoSelection:
    """Choose the sequences worth a backward pass (see module docstring).

    Args:
        advantages: (B, T), or (B,) per sequence.
        logprobs: (B, T) log π_θ of the sampled tokens from a forward pass (read detached).
        mask: (B, T) valid tokens.
        price: λ, a finite number (ignored when ``rate`` is given).
        eta: η > 0.
        rate: target fraction of sequences kept, in (0, 1], or None for the fixed ``price``.
        stochastic: draw G ~ Bernoulli (True) or keep iff χ > λ (False).
        generator: random generator for the draws.
    """
    if not isinstance(logprobs, torch.Tensor) or logprobs.dim() != 2:
        raise ValueError(f"logprobs: expected a (B, T) tensor, got {getattr(logprobs, 'shape', logprobs)!r}")
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(logprobs.shape):
        raise ValueError(f"mask: expected shape {tuple(logprobs.shape)} like logprobs")
    if not isinstance(advantages, torch.Tensor) or tuple(advantages.shape) not in (
        tuple(logprobs.shape),
        tuple(logprobs.shape[:1]),
    ):
        raise ValueError(f"advantages: expected shape {tuple(logprobs.shape)} or ({logprobs.shape[0]},)")
    check_number("price", price)
    check_number("eta", eta, low=0.0, low_open=True)
    check_optional_number("rate", rate, low=0.0, high=1.0, low_open=True)
    check_flag("stochastic", stochastic)
    valid = mask.bool().any(dim=-1)
    delight = sequence_delight(advantages, logprobs, mask)
    if not bool(torch.isfinite(delight[valid]).all()):
        raise ValueError("advantages / logprobs: the delight is not finite at a valid sequence")
    n_valid = int(valid.sum())
    if rate is not None and n_valid:
        if not stochastic:
            keep = torch.zeros_like(valid)
            scores = torch.where(valid, delight, torch.full_like(delight, -math.inf))
            keep[scores.topk(math.ceil(rate * n_valid)).indices] = True
            probabilities = keep.to(delight.dtype)
            price = float(delight[keep].min())
            return _selection(keep & valid, probabilities, delight, price, valid)
        price = float(torch.quantile(delight[valid], 1.0 - rate))
    if stochastic:
        probabilities = torch.sigmoid((delight - price) / eta)
        draws = torch.rand(delight.shape, generator=generator, dtype=delight.dtype, device=delight.device)
        keep = draws < probabilities
    else:
        keep = delight > price
        probabilities = keep.to(delight.dtype)
    return _selection(keep & valid, torch.where(valid, probabilities, 0.0), delight, float(price), valid)


def _selection(
    keep: torch.Tensor, probabilities: torch.Tensor, delight: torch.Tensor, price: float, valid: torch.Tensor
) -> KondoSelection:
    return KondoSelection(keep, keep.nonzero()[:, 0], probabilities, delight, price, valid)
