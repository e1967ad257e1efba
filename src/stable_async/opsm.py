"""Off-policy sequence masking (OPSM, DeepSeek-V3.2, arXiv 2512.02556, Eq. 9): drop the
negative-advantage sequences that have drifted too far from the policy that sampled them.

For sequence i with valid tokens t (mask m) and advantage A_{i,t}:

    D_i     = (1/|o_i|) Σ_t m·(log μ(a_t) − log π_θ(a_t))      (sequence mean of the k1 KL estimate)
    M_{i,t} = 0  if A_{i,t} < 0 and D_i > δ,   1 otherwise

and M multiplies the per-token loss (a detached 0/1 weight; masked tokens keep counting in the
aggregation denominator). A sequence the model has already moved away from, and that the update
pushes further down, is the one whose gradient is least trustworthy; positive-advantage sequences
are always kept.

Semantics are TRL's ``off_policy_mask_threshold`` (``GRPOTrainer.get_off_policy_mask``, TRL 1.16):

* π_θ is the *current* policy (``batch.logprobs``, detached), not π_old: the KL measures the drift
  from the gradient steps taken since sampling as well as the engine mismatch.
* μ is the behavior policy: ``behavior="auto"`` (default) takes ``rollout_logprobs`` when the batch
  has them and ``old_logprobs`` otherwise, exactly as TRL falls back from
  ``sampling_per_token_logps`` to ``old_per_token_logps``; ``"rollout"`` requires them, ``"old"``
  always uses π_old.
* "Negative" is strict: a token with A = 0 is kept (TRL keeps ``A >= 0``); with per-token
  advantages the sign is read per token, as in TRL.
* The test is D_i ≤ δ to keep (a sequence exactly at δ is kept).

TRL replaces a NaN log-prob difference (a token vLLM could not score) by 0; a `PolicyBatch`
refuses NaN at valid positions, so mask such tokens out instead. OPSM composes with any loss and
with a `RolloutCorrection` (pass both: ``correction=(sa.sequence_mask(3.0), sa.opsm(0.5))``, see
`stable_async.correction_chain`). slime's ``--use-opsm`` implements the same rule.

Metrics (``opsm/``): ``masked_fraction`` (valid tokens zeroed), ``seq_masked_fraction``
(sequences with a zeroed token, over sequences with a valid token), ``seq_kl_mean`` / ``seq_kl_max``
(D_i over those sequences).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stable_async._numerics import masked_max, masked_mean, sequence_log_ratio
from stable_async.batch import BatchValidationError, PolicyBatch
from stable_async.checks import check_choice, check_number, check_str
from stable_async.correction import CorrectionResult
from stable_async.diagnostics import fraction

BEHAVIORS = ("auto", "rollout", "old")


@dataclass(frozen=True)
class OffPolicySequenceMask:
    """OPSM: zero the negative-advantage sequences whose mean KL(μ ‖ π_θ) estimate exceeds δ.

    Attributes:
        threshold: δ, a finite number > 0 (DeepSeek-V3.2 and TRL give no default; TRL's docs
            suggest 0.5).
        behavior: which log-probs are μ: ``"auto"`` (rollout if present, else old; TRL),
            ``"rollout"`` or ``"old"``.
        prefix: metric name prefix.
    """

    threshold: float
    behavior: str = "auto"
    prefix: str = "opsm/"

    @property
    def exclude_rejected(self) -> bool:
        """Always False: masked tokens keep counting in the denominators, as in TRL."""
        return False

    def __post_init__(self) -> None:
        check_number("threshold", self.threshold, low=0.0, low_open=True)
        check_choice("behavior", self.behavior, BEHAVIORS)
        check_str("prefix", self.prefix)

    def behavior_logprobs(self, batch: PolicyBatch) -> torch.Tensor:
        """log μ as chosen by ``behavior``."""
        if self.behavior == "old" or (self.behavior == "auto" and batch.rollout_logprobs is None):
            return batch.old_logprobs
        if batch.rollout_logprobs is None:
            raise BatchValidationError(
                "rollout_logprobs: required by opsm(behavior='rollout'); pass the engine's log-probs, or "
                "behavior='auto' / 'old' to measure the drift from old_logprobs"
            )
        return batch.rollout_logprobs

    def sequence_kl(self, batch: PolicyBatch) -> torch.Tensor:
        """D_i, shape (B,): the masked mean of log μ − log π_θ over each sequence (0 for an empty one)."""
        return sequence_log_ratio(self.behavior_logprobs(batch) - batch.logprobs.detach(), batch.mask, mean=True)

    def __call__(self, batch: PolicyBatch) -> CorrectionResult:
        mask = batch.mask
        seq_kl = self.sequence_kl(batch)
        dropped = (batch.advantages < 0) & (seq_kl > self.threshold).unsqueeze(-1) & mask
        weights = (mask & ~dropped).to(batch.dtype)
        seq_valid = mask.any(dim=-1)
        p = self.prefix
        metrics = {
            f"{p}masked_fraction": fraction(dropped, mask),
            f"{p}seq_masked_fraction": masked_mean(dropped.any(dim=-1).to(batch.dtype), seq_valid),
            f"{p}seq_kl_mean": masked_mean(seq_kl, seq_valid),
            f"{p}seq_kl_max": masked_max(seq_kl, seq_valid),
        }
        return CorrectionResult(weights=weights, keep=mask, rejected=dropped, metrics=metrics)


def opsm(threshold: float, behavior: str = "auto", **kwargs: str) -> OffPolicySequenceMask:
    """Off-policy sequence masking with TRL's ``off_policy_mask_threshold`` semantics (see module docstring)."""
    return OffPolicySequenceMask(threshold=threshold, behavior=behavior, **kwargs)
