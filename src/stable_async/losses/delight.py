"""Delightful Policy Gradient (arXiv 2603.14608, 2603.20521): gate each term by its delight.

With advantage A and surprisal ℓ = −log π_θ(a) under the *current* learner policy, the delight
is χ = A·ℓ and the gate is g = σ(χ/η):

    loss_t = −sg(g_t · A_t) · log π_θ(a_t),     g_t = σ(A_t · ℓ_t / η),   η = 1 (papers)

so ∇loss_t = −g_t·A_t·∇log π_θ(a_t). No behavior log-probs, ratios or old log-probs are needed,
which is why the gate survives arbitrarily stale or buggy actors. Limits (π = π_θ(a)):
- rare success (A > 0, π → 0): χ → +∞, g → 1 (full REINFORCE weight);
- rare failure (A < 0, π → 0): g = π^{|A|/η} / (1 + π^{|A|/η}) ≤ ½·π^{|A|/(2η)} (AM–GM on the
  denominator), hence ≤ π^{1/(2η)} whenever |A| ≥ 1 (e.g. ±1 rewards) — suppressed;
- common action (π → 1): ℓ → 0, g → ½, whatever A.

Options: ``level="token"`` (default, per-token surprisal) or ``"sequence"`` (ℓ_i = Σ_t m·ℓ_t,
the response's total surprisal, shared by its tokens; each token still uses its own A_t, which
is the sequence form for the usual per-sequence advantages). ``surprisal_clip`` c clamps ℓ to
[−c, c] before use (follow-up code clips to [−10, 10]; ℓ ≥ 0, so only the upper side acts).
`delight_gate` returns the detached gate alone, a per-token multiplier for any other loss.

Differences from the papers' code: the χ-whitening option seen in follow-up code is not
implemented; masked positions get gate 0 when a mask is given. Metrics (token means):
``delight/gate_mean``, ``delight/gate_pos_mean`` (A > 0), ``delight/gate_neg_mean`` (A < 0),
``actor/ppo_kl``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stable_async._numerics import compute_dtype, masked_mean
from stable_async.batch import PolicyBatch
from stable_async.checks import check_choice, check_mask, check_tensor
from stable_async.diagnostics import approx_kl
from stable_async.losses.base import LossConfig, LossOutput, check_positive, finish
from stable_async.registry import register_loss

LEVELS = ("token", "sequence")


def _check_settings(eta: float, level: str, surprisal_clip: float | None) -> None:
    check_positive("eta", eta)
    check_choice("level", level, LEVELS)
    if surprisal_clip is not None:
        check_positive("surprisal_clip", surprisal_clip)


@torch.no_grad()
def delight_gate(
    advantages: torch.Tensor,
    logprobs: torch.Tensor,
    eta: float = 1.0,
    level: str = "token",
    surprisal_clip: float | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The detached delight gate σ(A·(−log π_θ)/η), shaped like ``logprobs``.

    Args:
        advantages: (B, T), or (B,) per sequence (broadcast over T).
        logprobs: (B, T) log π_θ of the sampled tokens (the current policy; read detached).
        eta: temperature η > 0 (1 in the papers).
        level: ``"token"`` (per-token surprisal) or ``"sequence"`` (summed over the response).
        surprisal_clip: clamp the surprisal to [−c, c] before use (None: no clamp).
        mask: (B, T) response mask; required for ``level="sequence"``. Where given, masked
            positions are ignored and get gate 0.
    """
    _check_settings(eta, level, surprisal_clip)
    check_tensor("logprobs", logprobs, floating=True)
    where = "the device of logprobs"
    check_tensor("advantages", advantages, floating=True, device=logprobs.device, what=where)
    per_sequence = tuple(logprobs.shape[:-1]) if logprobs.dim() >= 1 else None
    if tuple(advantages.shape) not in (tuple(logprobs.shape), per_sequence):
        raise ValueError(
            f"advantages: expected shape {tuple(logprobs.shape)} (like logprobs) or {per_sequence} (one per "
            f"sequence), got {tuple(advantages.shape)}"
        )
    dtype = compute_dtype(advantages, logprobs)
    lp = logprobs.detach().to(dtype)
    adv = advantages.detach().to(dtype)
    if adv.dim() == lp.dim() - 1:
        adv = adv.unsqueeze(-1)
    valid = None if mask is None else check_mask("mask", mask, shape=tuple(lp.shape), device=lp.device, what=where)
    surprisal = -lp if valid is None else torch.where(valid, -lp, torch.zeros((), dtype=dtype, device=lp.device))
    if level == "sequence":
        if valid is None:
            raise ValueError("mask: required for level='sequence' (the surprisal is summed over the response)")
        surprisal = surprisal.sum(dim=-1, keepdim=True)
    if surprisal_clip is not None:
        surprisal = surprisal.clamp(min=-surprisal_clip, max=surprisal_clip)
    gate = torch.sigmoid(adv * surprisal / eta).expand(lp.shape)
    if valid is not None:
        gate = torch.where(valid, gate, torch.zeros((), dtype=dtype, device=lp.device))
    return gate


@dataclass(frozen=True)
class DelightConfig(LossConfig):
    """Delight settings (papers' defaults). See the module docstring."""

    eta: float = 1.0
    level: str = "token"
    surprisal_clip: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_settings(self.eta, self.level, self.surprisal_clip)


@register_loss("delight", config=DelightConfig)
def delight(batch: PolicyBatch, config: DelightConfig) -> LossOutput:
    """Delightful policy gradient (see module docstring)."""
    gate = delight_gate(
        batch.advantages, batch.logprobs, config.eta, config.level, config.surprisal_clip, mask=batch.mask
    )
    adv, mask = batch.advantages, batch.mask
    loss_mat = -(gate * adv).detach() * batch.logprobs
    metrics = {
        "delight/gate_mean": masked_mean(gate, mask),
        "delight/gate_pos_mean": masked_mean(gate, mask & (adv > 0)),
        "delight/gate_neg_mean": masked_mean(gate, mask & (adv < 0)),
        "actor/ppo_kl": approx_kl(batch.logprobs, batch.old_logprobs, batch.mask),
    }
    return finish(batch, config, loss_mat, metrics)
