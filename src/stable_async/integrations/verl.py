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

**ESS-scaled LR and GAC** (`StableOptimizer`, `StableAdamW`) through veRL's
``optim.optimizer_impl`` injection; the ESS reaches the optimizer through `ESS_CHANNEL`, a
process-local accumulator (see `StepChannel`).

**Top-K** through `ppo_loss`: veRL's engine calls the loss function a second way, as a
logits processor ``loss_fn(student_logits=..., data=...)``, when the micro-batch carries
``distillation_use_topk=True``; `ppo_loss` then returns log π_θ at the rollout top-K ids.
See docs/integrations/verl.md for what veRL 0.9.1's trainer must set for that.
"""

from __future__ import annotations

import contextvars
import dataclasses
import importlib
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from verl.trainer.ppo import core_algos

import stable_async as sa
from stable_async._numerics import sequence_log_ratio
from stable_async.correction import CorrectionResult, RolloutCorrection
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
TOPK_LOSSES = frozenset({"dppo_topk_tv", "dppo_topk_kl"})
# Keys of sa_kwargs that cannot come from the command line.
_FORBIDDEN_KWARGS = {
    "correction": "use veRL's algorithm.rollout_correction.* (its rollout_is_weights are applied by every sa_ loss)",
    "process_group": "not settable from the veRL config",
}


# --------------------------------------------------------------------------- config
def _sa_policy_loss_config_class() -> type:
    from verl.workers.config.actor import PolicyLossConfig

    @dataclass
    class SAPolicyLossConfig(PolicyLossConfig):
        """veRL's ``PolicyLossConfig`` plus ``sa_kwargs``: stable-async hyperparameters for ``sa_<name>`` losses.

        Select it with
        ``actor_rollout_ref.actor.policy_loss._target_=stable_async.integrations.verl.SAPolicyLossConfig``
        and set ``+actor_rollout_ref.actor.policy_loss.sa_kwargs={eta:0.5}`` (veRL's own class
        rejects unknown keys). Every other field is veRL's.
        """

        sa_kwargs: dict = field(default_factory=dict)

    SAPolicyLossConfig.__module__ = __name__
    SAPolicyLossConfig.__qualname__ = "SAPolicyLossConfig"
    return SAPolicyLossConfig


_LAZY: dict[str, Any] = {}


def __getattr__(name: str) -> Any:
    # SAPolicyLossConfig is built on first access (hydra's _target_ lookup does a getattr), so the
    # plugin does not import verl.workers.config while `import verl` runs.
    if name == "SAPolicyLossConfig":
        if name not in _LAZY:
            _LAZY[name] = _sa_policy_loss_config_class()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain Python (dict / list), other values unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, DictConfig | ListConfig):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with veRL
        pass
    return value


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
            raise ValueError(f"policy_loss.sa_kwargs.{key}: not supported in veRL; {why}")
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


# --------------------------------------------------------------------------- ESS channel
class StepChannel:
    """Process-local link from the ``sa_`` losses (per micro-batch) to `StableOptimizer` (per step).

    Design. The ESS of VCPO is a statistic of the whole optimizer step (all micro-batches, all
    data-parallel ranks), but veRL calls the loss once per micro-batch and the optimizer once per
    mini-batch, in the same worker process. So each ``sa_`` loss call, while a consumer is
    registered (`enable`, done by `StableOptimizer` with ESS-LR on) and the loss is differentiable
    (a training pass), appends the per-sequence log-weights λ_i = Σ_t m·(log π_θ − log μ) of its
    valid sequences (B floats, detached; μ as in the module docstring). At ``step()`` the optimizer
    drains them and calls `stable_async.effective_sample_size` on the concatenation with the default
    process group: one max- and one sum-all-reduce, so the ESS is that of the global mini-batch.
    ``zero_grad()`` clears the channel (veRL zeroes gradients before each mini-batch and on a
    non-finite gradient norm, when it skips ``step()``).

    Assumptions: the loss and the optimizer run in one process and one thread (veRL's FSDP and
    Megatron workers); every rank calls ``step()`` (a collective); sequences duplicated across
    ranks (sequence/tensor parallel replicas) are duplicated uniformly, which leaves ESS/N
    unchanged; a rank without loss calls (e.g. a non-last pipeline stage) contributes nothing.

    The optimizer's metrics of the last step (``vcpo/*``, ``gac/*``) are published here too and
    returned with the next loss call's metrics (one step late), since veRL only logs what the
    loss function returns.
    """

    def __init__(self) -> None:
        self.enabled = False
        self._log_weights: list[torch.Tensor] = []
        self.last_metrics: dict[str, float] = {}

    def enable(self) -> None:
        self.enabled = True

    def clear(self) -> None:
        self._log_weights.clear()

    def __len__(self) -> int:
        return sum(int(t.numel()) for t in self._log_weights)

    def record(self, batch: sa.PolicyBatch) -> None:
        """Append the per-sequence log-weights of a micro-batch (no-op unless enabled)."""
        if not self.enabled:
            return
        behavior = batch.behavior_logprobs
        lam = sequence_log_ratio(batch.logprobs.detach() - behavior, batch.mask, mean=False)
        self._log_weights.append(lam[batch.mask.any(dim=-1)].detach())

    def ess(self, device: torch.device | None = None, process_group: Any = None) -> sa.ESSResult:
        """Drain the channel: the ESS over everything recorded since the last drain, on all ranks."""
        parts, self._log_weights = self._log_weights, []
        lam = torch.cat([p.to(torch.float64) for p in parts]) if parts else torch.zeros(0, dtype=torch.float64)
        if device is not None:
            lam = lam.to(device)
        return sa.effective_sample_size(lam, process_group=process_group)

    def publish(self, metrics: Mapping[str, float]) -> None:
        self.last_metrics = dict(metrics)


ESS_CHANNEL = StepChannel()
"""The one channel of this process (see `StepChannel`)."""


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
    if name in TOPK_LOSSES and extras.get("current_topk_logprobs") is None:
        raise ValueError(
            f"current_topk_logprobs: {PREFIX}{name} needs π_θ at the rollout top-K ids, which only "
            "stable_async.integrations.verl.ppo_loss provides (install it with set_loss_fn, store "
            f"{TOPK_IDS_KEY!r}/{TOPK_LOGPROBS_KEY!r} in the batch, run with distillation_use_topk=True "
            "and use_fused_kernels=False; see docs/integrations/verl.md)"
        )
    hyperparameters = resolve_hyperparameters(name, config, loss_agg_mode, has_rollout_logprobs=rollout is not None)
    loss = _build_loss(name, hyperparameters)
    info = _plain(_get(config, "global_batch_info")) or {}
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
    )
    loss_config = loss.config
    if rollout_is_weights is not None:
        loss_config = dataclasses.replace(loss_config, correction=PrecomputedWeights(weights=rollout_is_weights))
    out = loss.fn(batch, loss_config)
    if log_prob.requires_grad:
        ESS_CHANNEL.record(batch)
    metrics: dict[str, Any] = {k: v for k, v in out.metrics.items() if k != "actor/pg_loss"}  # veRL sets it
    metrics.update(ESS_CHANNEL.last_metrics)
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


# --------------------------------------------------------------------------- optimizer
def _optimizer_class(inner: str | type) -> type:
    if isinstance(inner, type):
        return inner
    if not isinstance(inner, str) or "." not in inner:
        raise ValueError(f"inner: expected 'module.Class' (e.g. 'torch.optim.AdamW') or a class, got {inner!r}")
    module, _, cls = inner.rpartition(".")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"inner: cannot import optimizer {inner!r}: {exc}") from exc


class StableOptimizer(sa.ESSScaledLR):
    """An optimizer for veRL's ``optim.optimizer_impl`` injection: GAC, then an ESS-scaled step.

    ``step()``: (1) if ``gac`` is set, `stable_async.GradientAlignmentControl.apply` on the
    (clipped) gradients — FSDP2 DTensor shards are detected (``sharded=None``) and reduced with one
    all-reduce; in skip mode a flagged step does not call the inner optimizer; (2) if ``ess_lr``,
    the ESS ratio of the step from `ESS_CHANNEL` and one inner step at ``lr · s(ESS/N)``
    (`stable_async.ESSScaledLR`; the schedule's LR is restored after the step).

    Args:
        params: what veRL's ``build_optimizer`` passes (``module.parameters()``) or param groups.
        lr: learning rate (veRL passes ``optim.lr``); other veRL kwargs (``weight_decay``,
            ``betas``) and unknown keys of ``override_optimizer_config`` go to the inner optimizer.
        inner: the wrapped optimizer, ``"module.Class"`` or a class (default ``torch.optim.AdamW``).
        ess_lr: scale the LR by the ESS (default True).
        ess_rule, ess_base_ratio, ess_min_scale, ess_on_missing: `ESSScaledLR`'s ``rule``,
            ``base_ratio``, ``min_scale``, ``on_missing`` (``"base"``: full LR when no ``sa_``
            loss recorded anything this step).
        gac: None (off, default) or a GAC mode: ``"project"``, ``"skip"``, ``"monitor"``.
        gac_threshold, gac_strength, gac_memory: GAC's ``threshold``, ``strength``, ``memory``.
        gac_kwargs: further `GradientAlignmentControl` keyword arguments (e.g. ``adaptive``).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        *,
        inner: str | type = "torch.optim.AdamW",
        ess_lr: bool = True,
        ess_rule: str = "sqrt",
        ess_base_ratio: float = 1.0,
        ess_min_scale: float = 0.0,
        ess_on_missing: str = "base",
        gac: str | None = None,
        gac_threshold: float = 0.5,
        gac_strength: float = 1.0,
        gac_memory: str = "full",
        gac_kwargs: Mapping[str, Any] | None = None,
        **inner_kwargs: Any,
    ) -> None:
        params = list(params)
        if not params:
            raise ValueError("params: the optimizer got no parameters")
        optimizer = _optimizer_class(inner)(params, lr=lr, **inner_kwargs)
        super().__init__(
            optimizer, rule=ess_rule, base_ratio=ess_base_ratio, min_scale=ess_min_scale, on_missing=ess_on_missing
        )
        self.ess_lr = bool(ess_lr)
        self.gac: sa.GradientAlignmentControl | None = None
        if gac is not None:
            tensors = [p for group in optimizer.param_groups for p in group["params"]]
            self.gac = sa.GradientAlignmentControl(
                tensors,
                mode=gac,
                threshold=gac_threshold,
                strength=gac_strength,
                memory=gac_memory,
                **dict(_plain(gac_kwargs) or {}),
            )
        self.last_ess: sa.ESSResult | None = None
        if self.ess_lr:
            ESS_CHANNEL.enable()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients and clear `ESS_CHANNEL` (a new mini-batch starts)."""
        ESS_CHANNEL.clear()
        super().zero_grad(set_to_none=set_to_none)

    def _device(self) -> torch.device:
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                local = p.to_local() if hasattr(p, "to_local") else p
                return local.device
        return torch.device("cpu")

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """GAC (if on), then one inner step at the ESS-scaled LR (if on); metrics in ``last_metrics``."""
        metrics: dict[str, float] = {}
        if self.gac is not None:
            metrics.update(self.gac.apply())
            if self.gac.should_skip:
                ESS_CHANNEL.clear()
                self.last_metrics = metrics
                ESS_CHANNEL.publish(metrics)
                return None
        if self.ess_lr:
            ess = ESS_CHANNEL.ess(self._device())
            self.last_ess = ess
            result = super().step(ess.ess_ratio if ess.n > 0 else None, closure)
            metrics.update(self.last_metrics)
            metrics["vcpo/ess_num_seqs"] = ess.n
        else:
            ESS_CHANNEL.clear()
            result = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        self.last_metrics = {k: float(v) for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}
        ESS_CHANNEL.publish(self.last_metrics)
        return result

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The inner optimizer's state, the ESS wrapper's, and GAC's (under ``"stable_async_gac"``)."""
        state = super().state_dict()
        if self.gac is not None:
            state["stable_async_gac"] = self.gac.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        state = dict(state_dict)
        gac_state = state.pop("stable_async_gac", None)
        super().load_state_dict(state)
        if gac_state is not None and self.gac is not None:
            self.gac.load_state_dict(gac_state)


class StableAdamW(StableOptimizer):
    """`StableOptimizer` around ``torch.optim.AdamW``; its name contains "adam", so veRL passes ``betas``.

    ``actor_rollout_ref.actor.optim.optimizer_impl=stable_async.integrations.verl``
    ``actor_rollout_ref.actor.optim.optimizer=StableAdamW``
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, **kwargs: Any) -> None:
        if "inner" in kwargs:
            raise TypeError("inner: StableAdamW always wraps torch.optim.AdamW; use StableOptimizer for another one")
        super().__init__(params, lr, inner="torch.optim.AdamW", **kwargs)


__all__ = [
    "CURRENT_TOPK_PREFIX",
    "ESS_CHANNEL",
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
    "StepChannel",
    "StrictPluginFailure",
    "compute_policy_loss",
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
