"""SkyRL adapter: every stable-async loss as a SkyRL policy loss ``sa_<name>``, ESS-LR/GAC at its optimizer step.

Translation only: SkyRL's tensors and ``AlgorithmConfig`` go into a `stable_async.PolicyBatch`
and a loss config; the core computes; metrics come back under SkyRL's names. Tested against
SkyRL 0.3.0 (``skyrl`` on the package index).

**Policy losses.** Importing this module registers ``sa_<name>`` for every name in
`stable_async.available_losses` in SkyRL's ``PolicyLossRegistry``, so
``trainer.algorithm.policy_loss_type=sa_vcpo`` selects it. Registration reaches SkyRL's Ray
workers the way SkyRL documents for custom losses: the driver registers before
``initialize_ray``, whose ``sync_registries()`` copies the registry into a named Ray actor that
every worker's ``PolicyLossRegistry.get`` reads (a registration after ``ray.init`` goes to the
actor directly). `main` is that driver: ``python -m skyrl.train.entrypoints.main_base
trainer.override_entrypoint=stable_async.integrations.skyrl ...`` imports this module, then runs
SkyRL's own ``validate_cfg`` / ``initialize_ray`` / ``skyrl_entrypoint``.

Each ``sa_<name>`` has SkyRL's signature ``fn(log_probs, old_log_probs, advantages, config,
loss_mask=None, rollout_logprobs=None) -> (loss, metrics)``:

* ``log_probs`` → ``logprobs``, ``old_log_probs`` → ``old_logprobs``, ``rollout_logprobs``
  (SkyRL's rollout-engine log-probs) → ``rollout_logprobs``, ``loss_mask`` → ``mask``;
* reduction: SkyRL scales the advantages per mini-batch for its ``loss_reduction`` before the
  loss (``apply_loss_reduction_to_advantages_minibatch``) and every built-in loss returns the
  masked *sum*; so the ``sa_`` losses aggregate with ``token-sum`` of the advantages they are
  given. Exact for every loss that is linear in the advantage; a loss that reads the advantage
  otherwise (``delight``'s gate σ(A·ℓ/η), the covariances of ``clip_cov`` / ``kl_cov``) sees the
  scaled advantage, as SkyRL's own ``clip_cov`` / ``kl_cov`` do. ``dp_size`` stays 1: SkyRL
  multiplies the loss by its DP size itself;
* ``config.off_policy_correction`` (SkyRL's TIS / sequence masks against the rollout log-probs):
  applied as a per-token weight and mask computed by SkyRL's own
  ``apply_off_policy_correction``, exactly where its built-ins apply it, unless the loss
  declares ``weights_by_rollout`` (it already weights by μ).

Hyperparameters (see `resolve_hyperparameters`): SkyRL's own fields where they mean the same
as for the corresponding SkyRL built-in (`SKYRL_FIELDS`), then ``trainer.algorithm.sa_kwargs``
(a dict; available with `SAAlgorithmConfig`, which `main` uses), which wins.

**ESS-scaled LR and GAC.** SkyRL 0.3.0 builds ``torch.optim.AdamW`` inside its FSDP strategy
(no injection point in the config) and steps it through ``strategy.optimizer_step(optimizer,
model, scheduler)``, which calls ``optimizer.step()`` and ``optimizer.zero_grad()``.
`install_stable_step` replaces a worker's ``optimizer`` by a wrapper whose ``step()`` is one
`stable_async.StableStep` (GAC, then the ESS-scaled step) fed by the
`stable_async.StepAccumulator` that the ``sa_`` losses of that process record into.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from skyrl.backends.skyrl_train.utils import ppo_utils
from skyrl.backends.skyrl_train.utils.off_policy_correction_utils import apply_off_policy_correction
from skyrl.train.config import AlgorithmConfig

import stable_async as sa
from stable_async.correction import CorrectionResult, RolloutCorrection
from stable_async.integrations._stable_step import ProcessAccumulator, StableOptimizerWrapper, install, uninstall

logger = logging.getLogger("stable_async.integrations.skyrl")

PREFIX = "sa_"
"""SkyRL policy-loss prefix: stable-async's ``vcpo`` is SkyRL's ``sa_vcpo``."""

_EPS = {"eps_low": "eps_clip_low", "eps_high": "eps_clip_high"}
_DELTA = {"delta_low": "dppo.delta_low", "delta_high": "dppo.delta_high"}
SKYRL_FIELDS: dict[str, dict[str, str]] = {
    "ppo": dict(_EPS),  # SkyRL regular
    "decoupled_ppo": dict(_EPS),
    "gspo": dict(_EPS),  # SkyRL gspo (GSPO-token)
    "gspo_token": dict(_EPS),
    "cispo": {"eps_low": "cispo.cispo_eps_clip_low", "eps_high": "cispo.cispo_eps_clip_high"},
    "sapo": {"tau_pos": "sapo.tau_pos", "tau_neg": "sapo.tau_neg"},
    "dppo_binary_tv": dict(_DELTA),  # SkyRL dppo, dppo_type=binary_tv
    "dppo_binary_kl": dict(_DELTA),  # SkyRL dppo, dppo_type=binary_kl
    "dppo_topk_tv": dict(_DELTA),
    "dppo_topk_kl": dict(_DELTA),
    "clip_cov": {
        **_EPS,
        "clip_cov_ratio": "clip_cov.clip_ratio",
        "clip_cov_lb": "clip_cov.clip_cov_lb",
        "clip_cov_ub": "clip_cov.clip_cov_ub",
    },
    "kl_cov": {"kl_cov_ratio": "kl_cov.kl_cov_frac", "ppo_kl_coef": "kl_cov.ppo_kl_coef"},
}
"""Our hyperparameter → the ``AlgorithmConfig`` field its SkyRL counterpart reads, per loss."""

SKYRL_FIXED: dict[str, dict[str, Any]] = {
    name: {"ratio_cap": None} for name in ("dppo_binary_tv", "dppo_binary_kl", "dppo_topk_tv", "dppo_topk_kl")
}
"""Settings SkyRL's counterpart fixes: its ``dppo`` does not truncate the ratio."""

METRIC_NAMES = {"actor/pg_clipfrac": "clip_ratio"}
"""Our metric → SkyRL's (logged as ``loss_metrics/<name>``); others lose the ``actor/`` prefix."""

_FORBIDDEN_KWARGS = {
    "correction": "use SkyRL's trainer.algorithm.off_policy_correction (applied by every sa_ loss)",
    "process_group": "not settable from the SkyRL config",
    "aggregation": "SkyRL reduces through trainer.algorithm.loss_reduction (pre-scaled advantages)",
}


# --------------------------------------------------------------------------- config
@dataclass
class SAAlgorithmConfig(AlgorithmConfig):
    """SkyRL's ``AlgorithmConfig`` plus ``sa_kwargs``: stable-async hyperparameters of ``sa_<name>``.

    SkyRL rejects unknown keys; `main` parses the command line with this class (SkyRL's
    ``make_config(algorithm_cls=SAAlgorithmConfig)``), so ``trainer.algorithm.sa_kwargs={eta:0.5}``
    works. Every other field is SkyRL's.
    """

    sa_kwargs: dict = field(default_factory=dict)


def _path(config: Any, dotted: str) -> Any:
    value = config
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, Mapping) else getattr(value, key, None)
        if value is None:
            return None
    return value


def sa_kwargs_of(config: Any) -> dict[str, Any]:
    """The ``sa_kwargs`` dict of a SkyRL ``AlgorithmConfig`` (``{}`` when absent)."""
    raw = _path(config, "sa_kwargs")
    if raw is None:
        return {}
    if hasattr(raw, "items") and not isinstance(raw, Mapping):  # an OmegaConf DictConfig
        from omegaconf import OmegaConf

        raw = OmegaConf.to_container(raw, resolve=True)
    if not isinstance(raw, Mapping):
        raise TypeError(f"trainer.algorithm.sa_kwargs: expected a dict, got {type(raw).__name__}")
    kwargs = {str(k): v for k, v in raw.items()}
    for key, why in _FORBIDDEN_KWARGS.items():
        if key in kwargs:
            raise ValueError(f"trainer.algorithm.sa_kwargs.{key}: not supported in SkyRL; {why}")
    return kwargs


def resolve_hyperparameters(name: str, config: Any, *, has_rollout_logprobs: bool = False) -> dict[str, Any]:
    """Keyword arguments for ``sa.get_loss(name, ...)`` from a SkyRL ``AlgorithmConfig``.

    Order (later wins): ``aggregation="token-sum"`` (SkyRL's contract, see the module
    docstring); the SkyRL fields of `SKYRL_FIELDS`; the settings of `SKYRL_FIXED`;
    ``anchor="old"`` for a loss with an ``anchor`` when no rollout log-probs reach it (SkyRL's
    ``dppo`` then anchors at ``old_log_probs`` too); ``config.sa_kwargs``.
    """
    fields = {f.name for f in dataclasses.fields(sa.loss_config_class(name)) if f.init}
    out: dict[str, Any] = {"aggregation": "token-sum"} if "aggregation" in fields else {}
    for ours, theirs in SKYRL_FIELDS.get(name, {}).items():
        value = _path(config, theirs)
        if value is not None and ours in fields:
            out[ours] = float(value)
    out.update(SKYRL_FIXED.get(name, {}))
    if "anchor" in fields and not has_rollout_logprobs:
        out["anchor"] = "old"
    out.update(sa_kwargs_of(config))
    return out


# --------------------------------------------------------------------------- off-policy correction
def _correction_configured(off_policy: Any) -> bool:
    if off_policy is None:
        return False
    keys = (
        "tis_ratio_type",
        "sequence_mask_metric",
        "outlier_token_is_threshold_low",
        "outlier_token_is_threshold_high",
        "token_mask_is_threshold_low",
        "token_mask_is_threshold_high",
    )
    return any(_path(off_policy, key) is not None for key in keys)


@dataclass(frozen=True)
class SkyRLOffPolicyCorrection(RolloutCorrection):
    """SkyRL's ``off_policy_correction`` as a stable-async correction (no math here).

    `__call__` runs SkyRL's ``apply_off_policy_correction`` on a loss matrix of ones: what comes
    back is SkyRL's per-token TIS weight (1 where it applies none) and its updated loss mask,
    which `stable_async.losses.base.finish` then applies to the loss matrix exactly as SkyRL's
    built-ins multiply their loss and reduce with the new mask. Metrics: SkyRL's own.
    """

    off_policy: Any = field(default=None, compare=False, repr=False)

    def __call__(self, batch: sa.PolicyBatch) -> CorrectionResult:
        ones = torch.ones_like(batch.logprobs, dtype=batch.dtype).detach()
        weights, mask, metrics = apply_off_policy_correction(
            ones, batch.old_logprobs, batch.rollout_logprobs, batch.maskf, self.off_policy
        )
        keep = batch.mask & (mask > 0)
        weights = torch.where(keep, weights.detach().to(batch.dtype), torch.zeros_like(ones))
        return CorrectionResult(weights=weights, keep=keep, rejected=batch.mask & ~keep, metrics=dict(metrics))


# --------------------------------------------------------------------------- loss functions
@functools.lru_cache(maxsize=256)
def _cached_loss(name: str, key: tuple) -> sa.Loss:
    return sa.get_loss(name, **dict(key))


def _build_loss(name: str, hyperparameters: dict[str, Any]) -> sa.Loss:
    try:
        key = tuple(sorted(hyperparameters.items()))
        hash(key)
    except TypeError:
        return sa.get_loss(name, **hyperparameters)
    return _cached_loss(name, key)


def skyrl_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """Our metric names → SkyRL's: `METRIC_NAMES`, else without ``actor/``; ``actor/pg_loss`` dropped
    (SkyRL logs ``policy_loss`` itself)."""
    out = {}
    for key, value in metrics.items():
        if key == "actor/pg_loss":
            continue
        out[METRIC_NAMES.get(key, key.removeprefix("actor/"))] = float(value)
    return out


def compute_policy_loss(
    name: str,
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    config: Any,
    loss_mask: torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The body of every ``sa_<name>``: SkyRL's arguments → `PolicyBatch` → our loss → SkyRL's output."""
    if loss_mask is None:
        loss_mask = torch.ones_like(log_probs, dtype=torch.bool)
    hyperparameters = resolve_hyperparameters(name, config, has_rollout_logprobs=rollout_logprobs is not None)
    off_policy = _path(config, "off_policy_correction")
    probe = _build_loss(name, hyperparameters)
    if rollout_logprobs is not None and _correction_configured(off_policy) and not probe.weights_by_rollout:
        # Built per call: the correction holds SkyRL's config object, which is not part of its hash.
        loss_fn = sa.get_loss(name, **hyperparameters, correction=SkyRLOffPolicyCorrection(off_policy=off_policy))
    else:
        loss_fn = probe
    batch = sa.PolicyBatch(
        logprobs=log_probs,
        advantages=advantages,
        mask=loss_mask,
        old_logprobs=old_log_probs,
        rollout_logprobs=rollout_logprobs,
    )
    out = loss_fn(batch)
    accumulator = ProcessAccumulator.current
    if accumulator is not None and out.loss.requires_grad:
        accumulator.record(batch)
    return out.loss, skyrl_metrics(out.metrics)


def make_policy_loss_fn(name: str) -> Callable[..., tuple[torch.Tensor, dict[str, float]]]:
    """A SkyRL-signature policy loss for the stable-async loss ``name``."""
    sa.loss_config_class(name)  # unknown names fail here, with the list of ours

    def policy_loss_fn(
        log_probs: torch.Tensor,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
        config: Any,
        loss_mask: torch.Tensor | None = None,
        rollout_logprobs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return compute_policy_loss(name, log_probs, old_log_probs, advantages, config, loss_mask, rollout_logprobs)

    policy_loss_fn.__name__ = policy_loss_fn.__qualname__ = f"{PREFIX}{name}"
    policy_loss_fn.__module__ = __name__
    policy_loss_fn.__doc__ = f"stable-async loss {name!r} for SkyRL (see stable_async.integrations.skyrl)."
    policy_loss_fn._stable_async_loss = name  # type: ignore[attr-defined]
    return policy_loss_fn


def registered_names() -> list[str]:
    """SkyRL's ``policy_loss_type`` of every stable-async loss: ``sa_<name>``."""
    return [f"{PREFIX}{name}" for name in sa.available_losses()]


def policy_loss(name: str) -> Callable[..., Any]:
    """The ``sa_`` function SkyRL resolves ``name`` to (``sa_<ours>``); an unknown ``sa_`` name lists ours."""
    if not isinstance(name, str) or not name.startswith(PREFIX):
        raise ValueError(f"policy_loss_type: expected 'sa_<name>', got {name!r}")
    ours = name[len(PREFIX) :]
    if ours not in sa.available_losses():
        raise ValueError(
            f"trainer.algorithm.policy_loss_type: unknown stable-async loss {name!r}; "
            f"stable-async losses: {registered_names()}"
        )
    # A module attribute ``sa_<name>``: cloudpickle sends it to SkyRL's registry actor by reference.
    fn = globals().get(name)
    if fn is None:
        fn = globals()[name] = make_policy_loss_fn(ours)
    return fn


def register_all() -> list[str]:
    """Register ``sa_<name>`` in SkyRL's ``PolicyLossRegistry`` for every stable-async loss; idempotent.

    A name already registered by stable-async is left as is (SkyRL raises on a second
    registration); a name taken by someone else is left alone with a warning.

    Returns:
        the ``sa_`` names registered (now or before) by stable-async.
    """
    registry = ppo_utils.PolicyLossRegistry
    done = []
    for key in registered_names():
        current = registry._functions.get(key)
        if current is None:
            registry.register(key, policy_loss(key))
        elif getattr(current, "_stable_async_loss", None) != key[len(PREFIX) :]:
            logger.warning("stable-async: SkyRL policy loss %r is taken by %r; not replacing it", key, current)
            continue
        done.append(key)
    return done


def check_policy_loss_type(config: Any) -> None:
    """Raise, listing our losses, when ``trainer.algorithm.policy_loss_type`` is an unknown ``sa_`` name."""
    name = _path(config, "trainer.algorithm.policy_loss_type")
    if name is None:
        name = _path(config, "policy_loss_type")
    if isinstance(name, str) and name.startswith(PREFIX):
        policy_loss(name)


# --------------------------------------------------------------------------- optimizer step
def install_stable_step(
    worker: Any,
    *,
    gac: sa.GradientAlignmentControl | Mapping[str, Any] | None = None,
    ess_lr: bool = True,
    **ess_settings: Any,
) -> StableOptimizerWrapper:
    """Wrap ``worker.optimizer`` (SkyRL's AdamW) so that SkyRL's ``optimizer_step`` runs a `stable_async.StableStep`.

    Call it in a SkyRL policy worker after ``init_model`` (e.g. in a subclass's ``init_model``);
    the ``sa_`` losses of that process then record into the step's accumulator.

    Args:
        worker: an object with an ``optimizer`` attribute (SkyRL's policy worker).
        gac: a `stable_async.GradientAlignmentControl`, its keyword arguments (a dict), or None.
        ess_lr: scale the LR by the step's ESS (VCPO).
        **ess_settings: `stable_async.StableStep`'s ``rule``, ``base_ratio``, ``min_scale``, ``missing``.
    """
    return install(worker, gac=gac, ess_lr=ess_lr, **ess_settings)


# --------------------------------------------------------------------------- driver
def main(argv: list[str] | None = None) -> None:
    """SkyRL's ``main_base`` driver with the ``sa_`` losses registered and `SAAlgorithmConfig` parsed.

    ``python -m skyrl.train.entrypoints.main_base trainer.override_entrypoint=stable_async.integrations.skyrl
    trainer.algorithm.policy_loss_type=sa_vcpo ...``
    """
    import ray
    from skyrl.train.config.config import make_config
    from skyrl.train.entrypoints.main_base import skyrl_entrypoint
    from skyrl.train.utils.utils import initialize_ray, validate_cfg

    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("trainer.override_entrypoint=")]
    cfg = make_config(algorithm_cls=SAAlgorithmConfig).from_cli_overrides(args)
    check_policy_loss_type(cfg)
    validate_cfg(cfg)
    initialize_ray(cfg)
    ray.get(skyrl_entrypoint.remote(cfg))


__all__ = [
    "METRIC_NAMES",
    "PREFIX",
    "SKYRL_FIELDS",
    "SKYRL_FIXED",
    "SAAlgorithmConfig",
    "SkyRLOffPolicyCorrection",
    "StableOptimizerWrapper",
    "check_policy_loss_type",
    "compute_policy_loss",
    "install_stable_step",
    "main",
    "make_policy_loss_fn",
    "policy_loss",
    "register_all",
    "registered_names",
    "resolve_hyperparameters",
    "sa_kwargs_of",
    "skyrl_metrics",
    "uninstall",
]

register_all()
