"""veRL adapter: every stable-async loss as a veRL policy loss ``sa_<name>``, an optimizer wrapper, a ``ppo_loss``.

Translation only: veRL's tensors and config go into a `stable_async.PolicyBatch` and a loss
config; the core computes; metrics come back under veRL's names. Tested against veRL 0.9.1.

**Policy losses.** `register_all` (run by the ``verl.plugins`` entry point on ``import verl``, in
every Ray worker) registers ``sa_<name>`` for every name in `stable_async.available_losses`, so
``actor_rollout_ref.actor.policy_loss.loss_mode=sa_vcpo`` is enough. Each is a veRL-signature
function ``fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
rollout_is_weights) -> (loss, metrics)``:

* ``log_prob`` → ``logprobs``, ``old_log_prob`` → ``old_logprobs``, ``advantages``, ``response_mask``;
* ``config.global_batch_info`` (``dp_size``, ``batch_num_tokens``, ``global_batch_size``, set by
  veRL's ``ppo_loss`` per micro-batch) → ``dp_size`` / ``global_num_tokens`` / ``global_num_seqs``;
* ``rollout_is_weights`` (veRL's own rollout correction, ``algorithm.rollout_correction.*``) →
  a per-token multiplier of the loss matrix, as veRL's built-in losses apply it (for ``geo_mean``,
  reduced per sequence by their geometric mean, as veRL's ``geo_mean`` does).

Hyperparameters (see `resolve_hyperparameters`): veRL's own fields where they mean the same as
for the corresponding veRL built-in (``clip_ratio_low/high/c``, ``tau_pos/neg``,
``loss_agg_mode``, ``loss_scale_factor``), then ``policy_loss.sa_kwargs`` (a dict, accepted by
veRL's config validation through `SAPolicyLossConfig`), which wins.

**Behavior policy.** veRL's policy-loss functions do not receive the rollout log-probs, so in a
registered ``sa_<name>`` called by veRL's own ``ppo_loss`` the behavior policy μ is veRL's
``old_log_prob`` (exact in veRL's bypass mode; otherwise veRL's ``rollout_is_weights`` carry
π_old/μ). Losses with an ``anchor`` setting then default to ``anchor="old"`` (like veRL's
``dppo_tv``). `ppo_loss` (installed with veRL's ``set_loss_fn``) additionally passes
``rollout_log_probs`` and the rollout top-K to the loss.

**ESS-scaled LR and GAC** (`StableOptimizer`, `StableAdamW`, from
`stable_async.integrations.verl_optim`) through veRL's ``optim.optimizer_impl`` injection; each
``sa_`` loss call records into the `stable_async.StepAccumulator` of the optimizer whose step is
open (see `stable_async.integrations.verl_optim`).

**Config checks.** `SAPolicyLossConfig` checks the loss mode and ``sa_kwargs`` when veRL builds
it; `check_config` (run inside veRL's ``validate_config`` once this module is imported) checks
those, the optimizer options and rollout correction with a loss that weights by μ.

**Rollout batches and policy versions** (`stable_async.integrations.verl_worker_hooks`, installed
with the losses): each ``update_actor`` call of veRL's actor worker starts a rollout batch for
GAC, and the batch's per-trajectory ``max_global_steps`` with the current version reach every
``sa_`` loss as ``versions`` / ``current_version``.

**Top-K** through `ppo_loss`: veRL's engine calls the loss function a second way, as a
logits processor ``loss_fn(student_logits=..., data=...)``, when the micro-batch carries
``distillation_use_topk=True``; `ppo_loss` then returns log π_θ at the rollout top-K ids.
See docs/integrations/verl.md for what veRL 0.9.1's trainer must set for that.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from verl.trainer.ppo import core_algos

import stable_async as sa
from stable_async.correction import CorrectionResult, RolloutCorrection
from stable_async.integrations import verl_optim, verl_worker_hooks
from stable_async.integrations.verl_optim import StableAdamW, StableOptimizer
from stable_async.integrations.verl_optim import to_plain as _plain
from stable_async.integrations.verl_strict import STRICT_ENV, StrictPluginFailure, strict_mode

logger = logging.getLogger("stable_async.integrations.verl")

PREFIX = "sa_"
"""veRL loss-mode prefix: stable-async's ``vcpo`` is veRL's ``sa_vcpo``."""

# Rollout-side keys `ppo_loss` reads from the micro-batch TensorDict: (B, T_response, K), aligned
# with ``responses`` / ``rollout_log_probs`` (right-padded, one row per sequence).
TOPK_IDS_KEY = "rollout_topk_ids"
TOPK_LOGPROBS_KEY = "rollout_topk_logprobs"
ROLLOUT_LOGPROBS_KEY = "rollout_log_probs"
# Per-token outputs of the logits-processor call (one key per top-K slot k).
CURRENT_TOPK_PREFIX = "sa_current_topk_logprob_"

# veRL field -> our hyperparameter, per loss, where the veRL built-in of the same family reads it.
_CLIP = {"eps_low": "clip_ratio_low", "eps_high": "clip_ratio_high"}
_DELTA = {"delta_low": "clip_ratio_low", "delta_high": "clip_ratio_high", "ratio_cap": "clip_ratio_c"}
VERL_FIELDS: dict[str, dict[str, str]] = {
    "ppo": {**_CLIP, "dual_clip": "clip_ratio_c"},  # veRL vanilla
    "decoupled_ppo": {**_CLIP, "dual_clip": "clip_ratio_c"},
    "gspo": dict(_CLIP),  # veRL gspo
    "gspo_token": dict(_CLIP),
    "cispo": dict(_CLIP),  # veRL cispo
    "geo_mean": dict(_CLIP),  # veRL geo_mean (log-space bounds)
    "sapo": {"tau_pos": "tau_pos", "tau_neg": "tau_neg"},  # veRL sapo
    "dppo_binary_tv": dict(_DELTA),  # veRL dppo_tv
    "dppo_binary_kl": dict(_DELTA),  # veRL dppo_kl
    "dppo_topk_tv": dict(_DELTA),
    "dppo_topk_kl": dict(_DELTA),
}
# veRL ignores loss_agg_mode for these (sapo: seq-mean-token-mean; geo_mean: a sequence mean).
NO_AGG_MODE = frozenset({"sapo", "geo_mean"})
# Keys of sa_kwargs that cannot come from the command line.
_FORBIDDEN_KWARGS = {
    "correction": "use veRL's algorithm.rollout_correction.* (its rollout_is_weights are applied by every sa_ loss)",
    "process_group": "not settable from the veRL config",
}


# --------------------------------------------------------------------------- config
POLICY_LOSS_KEY = "actor_rollout_ref.actor.policy_loss"
ALLOW_KEY = "allow_rollout_correction"
"""``policy_loss.allow_rollout_correction``: the explicit opt-in for veRL's rollout correction with a loss
that already weights by the rollout policy (see `check_rollout_correction`)."""


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_loss_mode(loss_mode: Any) -> str | None:
    """The loss of ``loss_mode`` (``"sa_vcpo"`` → ``"vcpo"``); None for a veRL loss; an unknown ``sa_`` name fails."""
    if not isinstance(loss_mode, str):
        raise TypeError(f"{POLICY_LOSS_KEY}.loss_mode: expected a string, got {type(loss_mode).__name__}")
    if not loss_mode.startswith(PREFIX):
        return None
    name = loss_mode[len(PREFIX) :]
    known = sa.available_losses()
    if name not in known:
        modes = [f"{PREFIX}{n}" for n in known]
        raise ValueError(
            f"{POLICY_LOSS_KEY}.loss_mode: {loss_mode!r} is not a stable-async loss{_suggest(loss_mode, modes)} "
            f"(the sa_ losses: {', '.join(modes)})"
        )
    return name


def check_sa_kwargs(name: str | None, sa_kwargs: Any, *, rewritten_by_bypass: bool = False) -> dict[str, Any]:
    """Every ``sa_kwargs`` key and value checked against loss ``name``'s config; errors name the key.

    ``rewritten_by_bypass``: veRL's ``apply_bypass_mode`` replaced the loss mode by
    ``bypass_mode`` in the driver's config; the leftover ``sa_kwargs`` are then not an error.
    """
    where = f"{POLICY_LOSS_KEY}.sa_kwargs"
    kwargs = _plain(sa_kwargs) if sa_kwargs is not None else {}
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"{where}: expected a dict, got {type(kwargs).__name__}")
    kwargs = {str(k): _plain(v) for k, v in kwargs.items()}
    if name is None:
        if kwargs and not rewritten_by_bypass:
            raise ValueError(f"{where}: only read by sa_ loss modes; loss_mode is a veRL loss, remove {sorted(kwargs)}")
        return kwargs
    for key, why in _FORBIDDEN_KWARGS.items():
        if key in kwargs:
            raise ValueError(f"{where}.{key}: not supported in veRL; {why}")
    fields = sorted(f.name for f in dataclasses.fields(sa.loss_config_class(name)) if f.init and f.name != "correction")
    for key in kwargs:
        if key not in fields:
            raise ValueError(f"{where}.{key}: not a hyperparameter of {PREFIX}{name}{_suggest(key, fields)} ({fields})")
    try:
        sa.get_loss(name, **kwargs)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{where}.{exc}") from exc
    return kwargs


def _sa_policy_loss_config_class() -> type:
    from verl.workers.config.actor import PolicyLossConfig

    @dataclass
    class SAPolicyLossConfig(PolicyLossConfig):
        """veRL's ``PolicyLossConfig`` plus ``sa_kwargs`` and ``allow_rollout_correction``, checked when built.

        Select it with
        ``actor_rollout_ref.actor.policy_loss._target_=stable_async.integrations.verl.SAPolicyLossConfig``
        and set ``+actor_rollout_ref.actor.policy_loss.sa_kwargs={eta:0.5}`` (veRL's own class
        rejects unknown keys). Every other field is veRL's. When veRL builds it
        (``omega_conf_to_dataclass``, in the driver's ``validate_config`` and in every worker), an
        unknown ``sa_`` loss mode and every ``sa_kwargs`` key and value are checked, with an error
        naming the key. ``allow_rollout_correction`` (default false) is the explicit opt-in of
        `check_rollout_correction`.
        """

        sa_kwargs: dict = field(default_factory=dict)
        allow_rollout_correction: bool = False

        def __post_init__(self) -> None:
            parent = getattr(super(), "__post_init__", None)
            if parent is not None:
                parent()
            name = check_loss_mode(self.loss_mode)
            check_sa_kwargs(name, self.sa_kwargs, rewritten_by_bypass=self.loss_mode == "bypass_mode")
            if not isinstance(self.allow_rollout_correction, bool):
                raise TypeError(
                    f"{POLICY_LOSS_KEY}.{ALLOW_KEY}: expected true or false, got {self.allow_rollout_correction!r}"
                )

    SAPolicyLossConfig.__module__ = __name__
    SAPolicyLossConfig.__qualname__ = "SAPolicyLossConfig"
    return SAPolicyLossConfig


def _allows_rollout_correction(config: Any) -> bool:
    policy_loss = _get(config, "policy_loss")
    return bool(_get(policy_loss, ALLOW_KEY, False)) if policy_loss is not None else False


_LAZY: dict[str, Any] = {}


def __getattr__(name: str) -> Any:
    # SAPolicyLossConfig is built on first access (hydra's _target_ lookup does a getattr), so the
    # plugin does not import verl.workers.config while `import verl` runs.
    if name == "SAPolicyLossConfig":
        if name not in _LAZY:
            _LAZY[name] = _sa_policy_loss_config_class()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _get(config: Any, key: str, default: Any = None) -> Any:
    getter = getattr(config, "get", None)
    if callable(getter):
        return getter(key, default)
    return getattr(config, key, default)


def sa_kwargs_of(config: Any) -> dict[str, Any]:
    """The ``policy_loss.sa_kwargs`` dict of a veRL ``ActorConfig`` (``{}`` when absent)."""
    policy_loss = _get(config, "policy_loss")
    raw = _plain(_get(policy_loss, "sa_kwargs", None)) if policy_loss is not None else None
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise TypeError(f"policy_loss.sa_kwargs: expected a dict, got {type(raw).__name__}")
    kwargs = {str(k): _plain(v) for k, v in raw.items()}
    for key, why in _FORBIDDEN_KWARGS.items():
        if key in kwargs:
            raise ValueError(f"{POLICY_LOSS_KEY}.sa_kwargs.{key}: not supported in veRL; {why}")
    return kwargs


def resolve_hyperparameters(
    name: str, config: Any, loss_agg_mode: str | None = None, *, has_rollout_logprobs: bool = False
) -> dict[str, Any]:
    """Keyword arguments for ``sa.get_loss(name, ...)`` from a veRL ``ActorConfig``.

    Order (later wins):

    1. ``aggregation`` ← ``loss_agg_mode`` (the argument veRL passes, else ``config.loss_agg_mode``),
       except for ``sapo`` / ``geo_mean`` (veRL ignores it for those too);
       ``norm_length`` ← ``config.loss_scale_factor`` when set.
    2. Per-loss veRL fields (`VERL_FIELDS`): ``clip_ratio_low/high`` (``None`` → ``clip_ratio``,
       as veRL reads them) → ``eps_low/high`` or ``delta_low/high``; ``clip_ratio_c`` →
       ``dual_clip`` (ppo, decoupled_ppo) or ``ratio_cap`` (dppo_*); ``tau_pos/neg`` (sapo).
    3. ``anchor="old"`` for a loss with an ``anchor`` setting when no rollout log-probs reach it.
    4. ``policy_loss.sa_kwargs``: any field of the loss's config class.
    """
    fields = {f.name for f in dataclasses.fields(sa.loss_config_class(name)) if f.init}
    out: dict[str, Any] = {}
    if "aggregation" in fields and name not in NO_AGG_MODE:
        mode = loss_agg_mode if loss_agg_mode is not None else _get(config, "loss_agg_mode")
        if mode is not None:
            out["aggregation"] = mode
    scale = _get(config, "loss_scale_factor")
    if scale is not None and "norm_length" in fields:
        out["norm_length"] = float(scale)
    clip = _get(config, "clip_ratio", 0.2)
    for ours, theirs in VERL_FIELDS.get(name, {}).items():
        value = _get(config, theirs)
        if value is None and theirs in ("clip_ratio_low", "clip_ratio_high"):
            value = clip
        if value is not None and ours in fields:
            out[ours] = float(value)
    if "anchor" in fields and not has_rollout_logprobs:
        out["anchor"] = "old"
    out.update(sa_kwargs_of(config))
    return out


# --------------------------------------------------------------------------- whole-config checks
OPTIMIZER_MODULES = ("stable_async.integrations.verl", "stable_async.integrations.verl_optim")
OPTIM_KEY = "actor_rollout_ref.actor.optim"


def check_rollout_correction(actor: Any, rollout_correction: Any) -> None:
    """Refuse veRL's rollout correction with an ``sa_`` loss that already weights by the rollout policy μ.

    ``actor`` is ``actor_rollout_ref.actor`` (a DictConfig or veRL's ``ActorConfig``),
    ``rollout_correction`` is ``algorithm.rollout_correction``. ``rollout_is`` multiplies the loss
    by veRL's π_old/μ weights, and ``bypass_mode=true`` makes veRL's ``old_log_probs`` the rollout
    log-probs. A loss whose registry entry says ``weights_by_rollout`` for the settings it runs
    with (as `resolve_hyperparameters` builds them for a registered ``sa_`` loss: e.g. decoupled
    PPO, or DPPO / VCPO with ``sa_kwargs`` anchoring them at the rollout policy) corrects for μ
    itself: together they correct twice, unless ``policy_loss.allow_rollout_correction=true``.
    """
    policy_loss = _get(actor, "policy_loss")
    name = check_loss_mode(_get(policy_loss, "loss_mode", "vanilla"))
    if name is None or rollout_correction is None or bool(_get(policy_loss, ALLOW_KEY, False)):
        return
    bypass = bool(_get(rollout_correction, "bypass_mode", False))
    rollout_is = _get(rollout_correction, "rollout_is", None)
    if not bypass and rollout_is is None:
        return
    check_sa_kwargs(name, _get(policy_loss, "sa_kwargs", None))
    loss = sa.get_loss(name, **resolve_hyperparameters(name, actor))
    if loss.weights_by_rollout:
        which = "bypass_mode=true" if bypass else f"rollout_is={rollout_is}"
        raise ValueError(
            f"algorithm.rollout_correction.{which}: {PREFIX}{name} already weights by the rollout policy "
            f"(registry: weights_by_rollout), so the correction would apply twice. Unset it, or set "
            f"{POLICY_LOSS_KEY}.{ALLOW_KEY}=true (with policy_loss._target_="
            f"stable_async.integrations.verl.SAPolicyLossConfig)"
        )


def check_optimizer(optim: Any) -> None:
    """``optim.override_optimizer_config`` of `StableOptimizer` / `StableAdamW`, checked as the worker will build it."""
    if _get(optim, "optimizer_impl") not in OPTIMIZER_MODULES:
        return
    name = _get(optim, "optimizer")
    if name not in ("StableOptimizer", "StableAdamW"):
        return
    options = _plain(_get(optim, "override_optimizer_config")) or {}
    veRL_kwargs: dict[str, Any] = {"weight_decay": _get(optim, "weight_decay", 0.0)}
    if "adam" in name.lower():
        veRL_kwargs["betas"] = tuple(_plain(_get(optim, "betas", (0.9, 0.999))))
    try:
        verl_optim.check_options(name, {**veRL_kwargs, **options}, lr=float(_get(optim, "lr", 1e-3)))
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{OPTIM_KEY}.override_optimizer_config.{exc}") from exc


def check_config(config: Any) -> None:
    """Every stable-async setting of a composed veRL config (the driver's), with errors naming the key.

    The ``sa_`` loss mode and its ``sa_kwargs`` (`check_loss_mode`, `check_sa_kwargs`), the
    optimizer options (`check_optimizer`), and rollout correction with a loss that weights by μ
    (`check_rollout_correction`). Run by veRL's ``validate_config`` once the stable-async plugin
    is loaded (see `install_config_checks`).
    """
    actor = _get(_get(config, "actor_rollout_ref"), "actor")
    if actor is None:
        return
    policy_loss = _get(actor, "policy_loss")
    loss_mode = _get(policy_loss, "loss_mode", "vanilla")
    name = check_loss_mode(loss_mode)
    sa_kwargs = _get(policy_loss, "sa_kwargs", None)
    check_sa_kwargs(name, sa_kwargs)
    check_optimizer(_get(actor, "optim"))
    check_rollout_correction(actor, _get(_get(config, "algorithm"), "rollout_correction"))


def install_config_checks() -> bool:
    """Run `check_config` first inside veRL's ``verl.utils.config.validate_config``; idempotent.

    veRL's trainers (``main_ppo``, one-step-off-policy, ...) call ``validate_config`` on the
    driver before Ray starts any worker, so a misconfiguration fails there, not after model
    loading and the first rollout. Only stable-async settings are checked; veRL's own checks run
    unchanged after ours.
    """
    from verl.utils import config as verl_config

    current = verl_config.validate_config
    if getattr(current, "_stable_async_checks", False):
        return True

    def validate_config(config: Any, use_reference_policy: bool, use_critic: bool) -> None:
        check_config(config)
        return current(config, use_reference_policy, use_critic)

    validate_config.__doc__ = current.__doc__
    validate_config.__wrapped__ = current  # type: ignore[attr-defined]
    validate_config._stable_async_checks = True  # type: ignore[attr-defined]
    verl_config.validate_config = validate_config
    import verl.utils

    verl.utils.validate_config = validate_config
    return True


# --------------------------------------------------------------------------- correction weights
@dataclass(frozen=True)
class PrecomputedWeights(RolloutCorrection):
    """veRL's ``rollout_is_weights`` as a stable-async correction: a fixed per-token multiplier.

    No math: `finish` multiplies the loss matrix by ``weights`` (masked positions 0), exactly as
    veRL's built-ins multiply ``pg_losses`` by ``rollout_is_weights``. No metrics: veRL logs its
    own ``rollout_corr/*``.
    """

    weights: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def __call__(self, batch: sa.PolicyBatch) -> CorrectionResult:
        w = self.weights
        if not isinstance(w, torch.Tensor) or tuple(w.shape) != tuple(batch.mask.shape):
            shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"rollout_is_weights: expected shape {tuple(batch.mask.shape)}, got {shape}")
        w = w.detach().to(device=batch.mask.device, dtype=batch.dtype)
        weights = torch.where(batch.mask, w, torch.zeros_like(w))
        return CorrectionResult(weights=weights, keep=batch.mask, rejected=torch.zeros_like(batch.mask))


# --------------------------------------------------------------------------- loss functions
# Extra tensors that `ppo_loss` hands to the registered function for the duration of one call.
_EXTRAS: contextvars.ContextVar[dict[str, torch.Tensor] | None] = contextvars.ContextVar(
    "stable_async_verl_extras", default=None
)
_LOSS_CACHE: dict[Any, sa.Loss] = {}


def _count(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.item()
    return float(value)


def _build_loss(name: str, hyperparameters: dict[str, Any]) -> sa.Loss:
    try:
        key: Any = (name, tuple(sorted((k, repr(v)) for k, v in hyperparameters.items())))
        hash(key)
    except TypeError:
        return sa.get_loss(name, **hyperparameters)
    loss = _LOSS_CACHE.get(key)
    if loss is None:
        loss = _LOSS_CACHE[key] = sa.get_loss(name, **hyperparameters)
    return loss


def compute_policy_loss(
    name: str,
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str | None = None,
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run stable-async loss ``name`` on veRL's policy-loss arguments; returns veRL's ``(loss, metrics)``."""
    if config is None:
        raise ValueError(f"config: {PREFIX}{name} needs veRL's ActorConfig (veRL's ppo_loss passes it)")
    extras = _EXTRAS.get() or {}
    rollout = extras.get("rollout_logprobs")
    hyperparameters = resolve_hyperparameters(name, config, loss_agg_mode, has_rollout_logprobs=rollout is not None)
    loss = _build_loss(name, hyperparameters)
    if loss.needs_topk and extras.get("current_topk_logprobs") is None:
        raise ValueError(
            f"current_topk_logprobs: {PREFIX}{name} needs π_θ at the rollout top-K ids, which only "
            "stable_async.integrations.verl.ppo_loss provides (install it with set_loss_fn, store "
            f"{TOPK_IDS_KEY!r}/{TOPK_LOGPROBS_KEY!r} in the batch, run with distillation_use_topk=True "
            "and use_fused_kernels=False; see docs/integrations/verl.md)"
        )
    if rollout_is_weights is not None and loss.weights_by_rollout and not _allows_rollout_correction(config):
        raise ValueError(
            f"{PREFIX}{name} already weights by the rollout policy and veRL passed rollout_is_weights "
            "(algorithm.rollout_correction.rollout_is): the correction would be applied twice. Unset "
            "rollout_is, or set actor_rollout_ref.actor.policy_loss.allow_rollout_correction=true"
        )
    info = _plain(_get(config, "global_batch_info")) or {}
    versions, current = verl_worker_hooks.loss_versions()
    batch = sa.PolicyBatch(
        logprobs=log_prob,
        advantages=advantages,
        mask=response_mask,
        old_logprobs=old_log_prob,
        rollout_logprobs=rollout,
        topk_ids=extras.get("topk_ids"),
        topk_logprobs=extras.get("topk_logprobs"),
        current_topk_logprobs=extras.get("current_topk_logprobs"),
        global_num_tokens=_count(info.get("batch_num_tokens")),
        global_num_seqs=_count(info.get("global_batch_size")),
        dp_size=int(_count(info.get("dp_size")) or 1),
        versions=versions.to(log_prob.device) if versions is not None else None,
        current_version=current,
    )
    loss_config = loss.config
    if rollout_is_weights is not None:
        loss_config = dataclasses.replace(loss_config, correction=PrecomputedWeights(weights=rollout_is_weights))
    out = loss.fn(batch, loss_config)
    if log_prob.requires_grad:
        verl_optim.record(batch)  # into the optimizer whose step is open (see verl_optim)
    metrics: dict[str, Any] = {k: v for k, v in out.metrics.items() if k != "actor/pg_loss"}  # veRL sets it
    metrics.update(verl_optim.last_step_metrics())
    return out.loss, metrics


def make_policy_loss_fn(name: str) -> Callable[..., tuple[torch.Tensor, dict[str, Any]]]:
    """A veRL policy-loss function (veRL's signature) running stable-async loss ``name``."""
    sa.loss_config_class(name)  # KeyError naming the loss if it is unknown

    def policy_loss_fn(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_is_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        return compute_policy_loss(
            name, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights
        )

    policy_loss_fn.__name__ = policy_loss_fn.__qualname__ = f"{PREFIX}{name}"
    policy_loss_fn.__doc__ = f"stable-async loss {name!r} for veRL (see stable_async.integrations.verl)."
    policy_loss_fn._stable_async_loss = name  # type: ignore[attr-defined]
    return policy_loss_fn


def registered_names() -> list[str]:
    """The veRL loss modes of every stable-async loss: ``sa_<name>``."""
    return [f"{PREFIX}{name}" for name in sa.available_losses()]


def register_all() -> list[str]:
    """Register ``sa_<name>`` in veRL's policy-loss registry for every stable-async loss; idempotent.

    A name already registered by stable-async is left as is; a name taken by someone else is left
    alone with a warning. A loss whose registration fails is logged at ERROR level (veRL's plugin
    loader would only log at debug level) and, under ``STABLE_ASYNC_STRICT=1``, raises
    `StrictPluginFailure` after the others are registered.

    Returns:
        the ``sa_`` names registered (now or before) by stable-async.
    """
    done, failed = [], []
    for name in sa.available_losses():
        key = f"{PREFIX}{name}"
        try:
            current = core_algos.POLICY_LOSS_REGISTRY.get(key)
            if current is not None:
                if getattr(current, "_stable_async_loss", None) != name:
                    logger.warning("stable-async: veRL loss mode %r is taken by %r; not replacing it", key, current)
                    continue
            else:
                core_algos.register_policy_loss(key)(make_policy_loss_fn(name))
            done.append(key)
        except Exception as exc:
            failed.append(key)
            logger.error("stable-async: failed to register veRL loss mode %r: %s: %s", key, type(exc).__name__, exc)
    if failed and strict_mode():
        raise StrictPluginFailure(f"stable-async: failed to register veRL loss modes {failed} ({STRICT_ENV}=1)")
    return done


# --------------------------------------------------------------------------- ppo_loss (set_loss_fn)
def _padded(data: Any, key: str) -> torch.Tensor:
    return data.select(key).to_padded_tensor()[key]


def _extras(model_output: Mapping[str, Any], data: Any) -> dict[str, torch.Tensor]:
    from verl.workers.utils.padding import no_padding_2_padding

    keys = set(data.keys())
    extras: dict[str, torch.Tensor] = {}
    if ROLLOUT_LOGPROBS_KEY in keys:
        extras["rollout_logprobs"] = _padded(data, ROLLOUT_LOGPROBS_KEY)
    if TOPK_IDS_KEY in keys and TOPK_LOGPROBS_KEY in keys:
        extras["topk_ids"] = _padded(data, TOPK_IDS_KEY)
        extras["topk_logprobs"] = _padded(data, TOPK_LOGPROBS_KEY)
        K = extras["topk_ids"].shape[-1]
        slots = [f"{CURRENT_TOPK_PREFIX}{k}" for k in range(K)]
        if all(s in model_output for s in slots):
            extras["current_topk_logprobs"] = torch.stack(
                [no_padding_2_padding(model_output[s], data) for s in slots], dim=-1
            )
    return extras


def topk_logits_processor(data: Any, student_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """log π_θ at the rollout top-K ids, from the engine's logits: one (1, N) tensor per slot k.

    ``student_logits`` is (1, N, V) over the micro-batch's packed tokens (prompt and response,
    temperature applied), position i predicting token i + 1. The rollout ids (B, T, K) are
    placed at the packed positions of the response tokens with veRL's own ``no_padding_2_padding``
    (applied to the packed index), so the alignment is veRL's. Under Ulysses sequence
    parallelism they are sliced like veRL's top-K distillation does (untested).
    """
    from verl.utils.ulysses import get_ulysses_sequence_parallel_world_size, slice_input_tensor
    from verl.workers.utils.padding import no_padding_2_padding

    if TOPK_IDS_KEY not in data.keys():  # noqa: SIM118 (TensorDict)
        return {}
    ids = _padded(data, TOPK_IDS_KEY)
    mask = _padded(data, "response_mask").bool()
    keys = set(data.keys())
    if "input_ids" in keys and data["input_ids"].is_nested:
        n = int(data["input_ids"].values().shape[0])
    elif "attention_mask" in keys:
        n = int(data["attention_mask"].sum())
    else:
        raise ValueError("data: expected nested 'input_ids' or an 'attention_mask' to count the packed tokens")
    device = student_logits.device
    position = no_padding_2_padding(torch.arange(n, device=device), data)  # (B, T) packed index
    packed = torch.zeros(n, ids.shape[-1], dtype=torch.long, device=device)
    packed[position[mask.to(device)]] = ids.to(device)[mask.to(device)].long()
    packed = packed.unsqueeze(0)
    if get_ulysses_sequence_parallel_world_size() > 1:
        packed = slice_input_tensor(packed, dim=1)
    if packed.shape[:2] != student_logits.shape[:2]:
        raise ValueError(
            f"student_logits: expected leading shape {tuple(packed.shape[:2])} (packed tokens), "
            f"got {tuple(student_logits.shape)}"
        )
    current = sa.divergence.gather_topk_logprobs(student_logits, packed)
    return {f"{CURRENT_TOPK_PREFIX}{k}": current[..., k] for k in range(current.shape[-1])}


def ppo_loss(
    config: Any,
    model_output: Mapping[str, Any] | None = None,
    data: Any = None,
    dp_group: Any = None,
    *,
    student_logits: torch.Tensor | None = None,
    data_format: str = "thd",
) -> Any:
    """Drop-in for veRL's ``verl.workers.utils.losses.ppo_loss`` that also feeds the rollout data to ``sa_`` losses.

    Install it in the actor workers with veRL's ``set_loss_fn``, e.g. from the driver after
    ``trainer.init_workers()``::

        actor_cfg = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
        trainer.actor_rollout_wg.set_loss_fn(functools.partial(ppo_loss, config=actor_cfg))

    Called two ways by veRL's engine:

    * ``loss_fn(model_output=..., data=..., dp_group=...)``: veRL's own ``ppo_loss`` (entropy,
      KL loss, metric aggregation unchanged), with these micro-batch keys passed on to the
      ``sa_`` loss for this call: ``rollout_log_probs`` (B, T) → ``rollout_logprobs``;
      ``rollout_topk_ids`` (B, T, K) int and ``rollout_topk_logprobs`` (B, T, K) → ``topk_ids`` /
      ``topk_logprobs``; and, if the logits processor ran, ``current_topk_logprobs``.
    * ``loss_fn(student_logits=..., data=...)`` (logits processor; only when the micro-batch has
      ``distillation_use_topk=True``): returns `topk_logits_processor`'s per-token tensors.
    """
    if student_logits is not None:
        return topk_logits_processor(data, student_logits)
    from verl.workers.utils import losses as verl_losses

    if model_output is None or data is None:
        raise ValueError("model_output / data: both are required unless called as a logits processor")
    token = _EXTRAS.set(_extras(model_output, data))
    try:
        return verl_losses.ppo_loss(config, model_output, data, dp_group)
    finally:
        _EXTRAS.reset(token)


__all__ = [
    "ALLOW_KEY",
    "CURRENT_TOPK_PREFIX",
    "PREFIX",
    "ROLLOUT_LOGPROBS_KEY",
    "STRICT_ENV",
    "TOPK_IDS_KEY",
    "TOPK_LOGPROBS_KEY",
    "VERL_FIELDS",
    "PrecomputedWeights",
    "SAPolicyLossConfig",  # noqa: F822 (built lazily by the module __getattr__)
    "StableAdamW",
    "StableOptimizer",
    "StrictPluginFailure",
    "check_config",
    "check_loss_mode",
    "check_optimizer",
    "check_rollout_correction",
    "check_sa_kwargs",
    "compute_policy_loss",
    "install_config_checks",
    "make_policy_loss_fn",
    "ppo_loss",
    "register_all",
    "registered_names",
    "resolve_hyperparameters",
    "sa_kwargs_of",
    "strict_mode",
]

# Importing the adapter directly (without `import verl` first) also registers the losses.
register_all()
install_config_checks()
verl_worker_hooks.install()
