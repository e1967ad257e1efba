"""stable-async: stabilizers for asynchronous (off-policy, stale-rollout) RL post-training of LLMs.

    import stable_async as sa
    batch = sa.PolicyBatch(logprobs=lp, advantages=adv, mask=mask, rollout_logprobs=mu)
    out = sa.get_loss("ppo", eps_high=0.28, correction=sa.RolloutCorrection(high=2.0))(batch)
    out.loss.backward()

Public API only; every name below is documented in docs/ and re-exported from its module.
"""

from importlib import metadata as _metadata

from stable_async import baselines, checks, divergence, losses, registry  # noqa: F401  (losses: registers every loss)
from stable_async.admission import admission_mask
from stable_async.aggregate import AGGREGATION_MODES, aggregate
from stable_async.batch import BatchValidationError, PolicyBatch
from stable_async.correction import CorrectionResult, RolloutCorrection, icepop, sequence_mask, token_tis
from stable_async.correction_chain import CorrectionChain
from stable_async.diagnostics import ESSResult, effective_sample_size
from stable_async.governor import StalenessGovernor
from stable_async.kondo import KondoSelection, kondo_gate
from stable_async.losses.base import LossConfig, LossOutput
from stable_async.losses.delight import delight_gate
from stable_async.opsm import OffPolicySequenceMask, opsm
from stable_async.optim.accumulator import StepAccumulator, StepStatistics
from stable_async.optim.ess_lr import ESSScaledLR
from stable_async.optim.gac import GradientAlignmentControl
from stable_async.optim.step import StableStep
from stable_async.registry import (
    Loss,
    LossSpec,
    available_losses,
    get_loss,
    loss_config_class,
    loss_spec,
    register_loss,
)
from stable_async.sampling import sampling_logprobs

try:  # the version is written once, in pyproject.toml
    __version__ = _metadata.version("stable-async")
except _metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "AGGREGATION_MODES",
    "BatchValidationError",
    "CorrectionChain",
    "CorrectionResult",
    "ESSResult",
    "ESSScaledLR",
    "GradientAlignmentControl",
    "KondoSelection",
    "Loss",
    "LossConfig",
    "LossOutput",
    "LossSpec",
    "OffPolicySequenceMask",
    "PolicyBatch",
    "RolloutCorrection",
    "StableStep",
    "StalenessGovernor",
    "StepAccumulator",
    "StepStatistics",
    "__version__",
    "admission_mask",
    "aggregate",
    "available_losses",
    "baselines",
    "checks",
    "delight_gate",
    "divergence",
    "effective_sample_size",
    "get_loss",
    "icepop",
    "kondo_gate",
    "loss_config_class",
    "loss_spec",
    "opsm",
    "register_loss",
    "sampling_logprobs",
    "sequence_mask",
    "token_tis",
]
