"""LUSPO (Length-Unbiased Sequence Policy Optimization, arXiv 2602.05261): GSPO with each sequence's
loss scaled by its length.

With the GSPO sequence ratio s_i = exp(Σ_t m·(log π_θ − log π_old) / Σ_t m) (gradient through s_i):

    ℓ_i = max(−min(s_i, c)·A_i, −clip(s_i, 1−ε_low, 1+ε_high)·A_i)
    L   = (1/B) Σ_i |o_i|·ℓ_i                                  (``seq-mean-token-sum``)

GSPO averages ℓ_i over sequences, so a short answer weighs as much as a long one and the update
favours short ones; weighting by |o_i| removes that length bias. With per-token advantages the
per-token terms are summed over each sequence.

Defaults: TRL 1.16's ``loss_type="luspo"`` with ``importance_sampling_level="sequence"`` (TRL
warns for any other level): ε_low = ε_high = 0.2 (TRL's ``epsilon``; ``epsilon_high`` defaults
to it), ``ratio_cap`` c = TRL's ``delta`` (off), aggregation ``seq-mean-token-sum``. TRL divides
by every row of the micro-batch, an empty one too: pass ``global_num_seqs=B`` to match it on
batches with empty rows. TRL's ``luspo`` with its default token level is PPO with
``seq-mean-token-sum`` (``get_loss("ppo", aggregation="seq-mean-token-sum")``).

Metrics: ``actor/pg_clipfrac`` (token fraction clipped), ``actor/ppo_kl``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stable_async._numerics import LOG_RATIO_BOUND, sequence_log_ratio
from stable_async.batch import PolicyBatch
from stable_async.checks import check_number, check_optional_number
from stable_async.diagnostics import approx_kl, fraction
from stable_async.losses.base import LossConfig, LossOutput, finish
from stable_async.losses.ppo import clipped_surrogate
from stable_async.registry import register_loss


@dataclass(frozen=True)
class LUSPOConfig(LossConfig):
    """LUSPO settings (TRL 1.16 defaults)."""

    aggregation: str = "seq-mean-token-sum"
    eps_low: float = 0.2
    eps_high: float = 0.2
    ratio_cap: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("eps_low", self.eps_low, low=0.0)
        check_number("eps_high", self.eps_high, low=0.0)
        check_optional_number("ratio_cap", self.ratio_cap, low=0.0, low_open=True)


@register_loss("luspo", config=LUSPOConfig, requires={"old_logprobs"})
def luspo(batch: PolicyBatch, config: LUSPOConfig) -> LossOutput:
    """LUSPO (see module docstring)."""
    log_s = sequence_log_ratio(batch.logprobs - batch.old_logprobs, batch.mask, mean=True)
    ratio = torch.exp(log_s.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)).unsqueeze(-1).expand_as(batch.logprobs)
    loss_mat, clipped, _ = clipped_surrogate(
        ratio, batch.advantages, config.eps_low, config.eps_high, ratio_cap=config.ratio_cap
    )
    metrics = {
        "actor/pg_clipfrac": fraction(clipped, batch.mask),
        "actor/ppo_kl": approx_kl(batch.logprobs, batch.old_logprobs, batch.mask),
    }
    return finish(batch, config, loss_mat, metrics)
