"""OpenRLHF adapter: a drop-in ``PolicyLoss``, a patch for Ray workers, and a DeepSpeed step hook.

Translation only: every number is computed by the stable-async core (`stable_async.get_loss`,
`stable_async.RolloutCorrection`, `stable_async.effective_sample_size`, `ESSScaledLR`,
`GradientAlignmentControl`); this module maps OpenRLHF's arguments and tensors to them and maps
the results back to OpenRLHF's 5-tuple. No OpenRLHF code is copied, and OpenRLHF / DeepSpeed are
imported only by `patch` and `attach_deepspeed` (the drop-in loss itself needs neither).

    from stable_async.integrations.openrlhf import PolicyLoss
    loss_fn = PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28, is_correction_level="token")
    loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio = loss_fn(
        log_probs, old_log_probs, advantages, action_mask=mask, rollout_log_probs=mu)

Mapping of OpenRLHF 0.11.2's ``openrlhf.models.loss.PolicyLoss`` (checked for every constructor
combination by tests/trainers/test_openrlhf_adapter.py):

================================  =============================================================
OpenRLHF                          stable-async
================================  =============================================================
``policy_loss_type="ppo"``        ``get_loss("ppo", eps_low, eps_high, dual_clip)``
``policy_loss_type="gspo"``       ``get_loss("gspo", ...)`` (aggregation forced per-sequence)
``token_level_loss`` True/False   ``aggregation="token-mean"`` / ``"seq-mean-token-mean"``
``batch_num_tokens``,             ``PolicyBatch(global_num_tokens, global_num_seqs, dp_size)``
``global_batch_size``, ``dp_size``
correction ``clip`` (token,       ``RolloutCorrection(level="token", mode="truncate", low, high)``
ratio gate)
correction ``mask``, level        ``RolloutCorrection(mode="mask", level="token"|"geometric",
``token`` / ``seq``, gate         statistic="ratio"|"binary_kl"|"binary_tv", weight="token",
``ratio`` / ``binary_kl`` / ``tv``  divergence_eps=1e-6 for the divergences)``
gspo with a correction level      gspo with ``old_logprobs := rollout_log_probs`` (OpenRLHF only
                                  swaps the GSPO ratio to π_θ/μ; no IS coefficient)
================================  =============================================================

Returned 5-tuple ``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)``:

* ``loss``: the core loss (``LossOutput.loss``).
* ``clip_ratio``: ``actor/pg_clipfrac`` (token mean); 0 for a loss that does not clip.
* ``ppo_kl``: `stable_async.diagnostics.approx_kl` against the *given* ``old_log_probs`` (token
  mean), also for gspo with a correction, as OpenRLHF does.
* ``vllm_kl``: ``rollout_corr/kl`` (token mean of log μ − log π_old); ``None`` when no
  correction is applied (OpenRLHF: ``is_correction_level="off"`` or ``policy_loss_type="gspo"``).
* ``is_filter_ratio``: ``None`` exactly when ``vllm_kl`` is. Truncation: ``truncated_fraction``;
  token mask: ``rollout_rs_masked_fraction`` (token means); sequence mask:
  ``rollout_rs_seq_masked_fraction`` re-expressed over *all* rows, since OpenRLHF averages over
  every row and counts a row without valid tokens as filtered (its gate statistic is 0/0).

Known, deliberate differences from OpenRLHF: its per-sample aggregation divides by
``count + 1e-8`` (ours by the count: relative 1e-8 / count); ``action_mask=None`` means "every
token valid" for both loss types (OpenRLHF's gspo fails on it); NaN/inf at a valid position raises
(`stable_async.PolicyBatch` validation) instead of propagating; an unknown ``policy_loss_type``
raises OpenRLHF's ``ValueError("Invalid policy loss type: ...")`` at construction, not at the
first forward; an invalid ``dual_clip`` raises an error that is both an ``AssertionError`` (as
OpenRLHF's ``assert``) and a ``ValueError``.

Our options (keyword-only, after OpenRLHF's arguments):

* ``policy_loss``: any registered loss name (`stable_async.available_losses`) or a ready
  `stable_async.Loss`; ``loss_kwargs`` are its hyperparameters (paper defaults otherwise).
  As in the TRL adapter, OpenRLHF's ``clip_eps_*``, ``dual_clip``, ``token_level_loss`` and
  ``policy_loss_type`` then are not read: the loss's own hyperparameters and aggregation apply
  (set ``aggregation`` in ``loss_kwargs``). The correction still applies (next item).
* ``correction``: ``None`` (default: translated from ``is_correction_*``), ``False`` (no
  correction), a `stable_async.RolloutCorrection`, or a dict of its arguments. OpenRLHF asks
  vLLM for log-probs only when ``is_correction_level != "off"``, so keep a level set when a
  loss or correction needs ``rollout_log_probs`` (and pass ``correction=False`` if you want
  the log-probs but no translated correction, e.g. for ``policy_loss="dppo_binary_tv"``).
* ``ess_lr``: ``True`` or a dict of `stable_async.ESSScaledLR` arguments: each forward records
  the per-token log-weights log π_θ − log μ (μ = ``rollout_log_probs``, else ``old_log_probs``)
  and `attach_deepspeed` scales the learning rate of the next optimizer step by the ESS of the
  whole step (all micro-batches, all data-parallel ranks).
* ``gac``: ``True`` or a dict of `stable_async.GradientAlignmentControl` arguments, applied by
  `attach_deepspeed` at the accumulation boundary.

``patch()`` swaps the class into ``openrlhf.trainer.ray.ppo_actor`` (and attaches the DeepSpeed
hook when ``ess_lr`` / ``gac`` is set); ``worker_setup`` is the Ray ``worker_process_setup_hook``
that does the same inside every worker, configured by the ``STABLE_ASYNC_OPENRLHF`` environment
variable that `runtime_env` writes. See docs/integrations/openrlhf.md.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

import stable_async as sa
from stable_async.diagnostics import approx_kl
from stable_async.integrations.openrlhf_translation import (
    DualClipError,
    as_float,
    build_loss,
    filter_fraction,
    resolve_correction,
    translated_correction,
    validate_openrlhf_arguments,
)
from stable_async.integrations.options import ess_lr_settings, gac_settings
from stable_async.integrations.stepping import SteppedOptimizer

__all__ = [
    "ENV_VAR",
    "DeepSpeedStepHook",
    "DualClipError",
    "OpenRLHFPatch",
    "PolicyLoss",
    "attach_deepspeed",
    "patch",
    "runtime_env",
    "unpatch",
    "worker_setup",
]

logger = logging.getLogger("stable_async.openrlhf")

ENV_VAR = "STABLE_ASYNC_OPENRLHF"
"""Environment variable holding the JSON options `worker_setup` passes to `patch`."""

WORKER_SETUP_HOOK = "stable_async.integrations.openrlhf.worker_setup"
_NO_SKIP = (
    "not stepping DeepSpeed's ZeRO / mixed-precision optimizer would leave its gradient buffers for the next step; "
    "use mode='project' or 'monitor'"
)


# ---------------------------------------------------------------------------------------------
# The drop-in loss
# ---------------------------------------------------------------------------------------------
class PolicyLoss(nn.Module):
    """OpenRLHF's ``PolicyLoss`` (same constructor, same ``forward``, same 5-tuple), computed by stable-async.

    Args:
        clip_eps_low, clip_eps_high, dual_clip, token_level_loss, policy_loss_type,
        is_correction_level, is_correction_mode, is_correction_gating, is_correction_threshold:
            OpenRLHF's arguments, defaults and validation (see the module docstring for the mapping).
        policy_loss: a registered loss name or a `stable_async.Loss` used instead of the
            translated ppo / gspo loss.
        loss_kwargs: hyperparameters of ``policy_loss`` (a name only).
        correction: ``None`` (translate ``is_correction_*``), ``False`` (none), a
            `stable_async.RolloutCorrection` or a dict of its arguments.
        ess_lr: ``True`` / a dict of `stable_async.ESSScaledLR` arguments, or ``None`` (off).
        gac: ``True`` / a dict of `stable_async.GradientAlignmentControl` arguments, or ``None``.

    Attributes:
        loss_fn: the `stable_async.Loss` called by ``forward``.
        last_metrics: the core metrics of the last forward (veRL-style names).
        step_hook: the `DeepSpeedStepHook` attached by `attach_deepspeed` / `patch`, if any.
    """

    def __init__(
        self,
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        dual_clip: float | None = None,
        token_level_loss: bool = True,
        policy_loss_type: str = "ppo",
        is_correction_level: str = "off",
        is_correction_mode: str = "mask",
        is_correction_gating: str = "ratio",
        is_correction_threshold: tuple[float, float] | list[float] = (0.5, 5.0),
        *,
        policy_loss: str | sa.Loss | None = None,
        loss_kwargs: Mapping[str, Any] | None = None,
        correction: Any = None,
        ess_lr: bool | Mapping[str, Any] | None = None,
        gac: bool | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        # OpenRLHF's attributes, under its names (some trainer code reads them).
        self.clip_eps_low = clip_eps_low
        self.clip_eps_high = clip_eps_high
        self.token_level_loss = token_level_loss
        self.dual_clip = dual_clip
        self.policy_loss_type = policy_loss_type
        self.is_correction_level = is_correction_level
        self.is_correction_mode = is_correction_mode
        self.is_correction_gating = is_correction_gating
        self.is_correction_threshold = is_correction_threshold
        validate_openrlhf_arguments(
            dual_clip, is_correction_level, is_correction_mode, is_correction_gating, is_correction_threshold
        )
        if policy_loss is None and policy_loss_type not in ("ppo", "gspo"):
            raise ValueError(f"Invalid policy loss type: {policy_loss_type}")
        if policy_loss_type == "gspo" and policy_loss is None:
            self.token_level_loss = False  # GSPO requires the per-sample mean (as OpenRLHF)

        translated = translated_correction(
            policy_loss_type, is_correction_level, is_correction_mode, is_correction_gating, is_correction_threshold
        )
        self.correction = resolve_correction(correction, translated)
        # gspo + correction in OpenRLHF: the GSPO ratio is taken against the rollout policy.
        self.old_from_rollout = (
            policy_loss is None and policy_loss_type == "gspo" and is_correction_level != "off" and correction is None
        )
        self.loss_fn = build_loss(
            policy_loss,
            dict(loss_kwargs or {}),
            loss_type=self.policy_loss_type,
            clip_eps_low=clip_eps_low,
            clip_eps_high=clip_eps_high,
            dual_clip=dual_clip,
            token_level_loss=self.token_level_loss,
            correction=self.correction,
        )
        self.ess_lr = ess_lr_settings(ess_lr)
        self.gac = gac_settings(gac, refused_modes=("skip",), reason=_NO_SKIP)
        self.last_metrics: dict[str, float] = {}
        self.step_hook: DeepSpeedStepHook | None = None
        #: This loss's micro-batches since its optimizer's last step (log π_θ − log μ, a fixed vector).
        self.accumulator = sa.StepAccumulator()

    # -- forward -------------------------------------------------------------------------------
    def forward(
        self,
        log_probs: torch.Tensor,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
        action_mask: torch.Tensor | None = None,
        rollout_log_probs: torch.Tensor | None = None,
        dp_size: int = 1,
        batch_num_tokens: float | None = None,
        global_batch_size: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """OpenRLHF's forward: returns ``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)``."""
        mask = torch.ones_like(log_probs, dtype=torch.bool) if action_mask is None else action_mask
        old = old_log_probs
        if self.old_from_rollout:
            if rollout_log_probs is None:
                raise ValueError(
                    "rollout_log_probs: required by policy_loss_type='gspo' with is_correction_level="
                    f"{self.is_correction_level!r} (the GSPO ratio is taken against the rollout policy)"
                )
            old = rollout_log_probs
        batch = sa.PolicyBatch(
            logprobs=log_probs,
            advantages=advantages,
            mask=mask,
            old_logprobs=old,
            rollout_logprobs=rollout_log_probs,
            global_num_tokens=as_float(batch_num_tokens),
            global_num_seqs=as_float(global_batch_size),
            dp_size=int(dp_size),
        )
        out = self.loss_fn(batch)
        self.last_metrics = out.metrics
        self.accumulator.record(batch)  # reduced and cleared by this loss's optimizer step

        metrics, device = out.metrics, out.loss.device
        clip_ratio = torch.tensor(metrics.get("actor/pg_clipfrac", 0.0), dtype=torch.float32, device=device)
        ppo_kl = approx_kl(batch.logprobs, old_log_probs.to(batch.dtype), batch.mask)
        if "rollout_corr/kl" not in metrics:
            return out.loss, clip_ratio, ppo_kl, None, None
        vllm_kl = torch.tensor(metrics["rollout_corr/kl"], dtype=batch.dtype, device=device)
        fraction = filter_fraction(self.correction, metrics, batch.mask)
        filtered = torch.tensor(fraction, dtype=torch.float32, device=device)
        return out.loss, clip_ratio, ppo_kl, vllm_kl, filtered

    def extra_repr(self) -> str:
        return f"loss_fn={self.loss_fn!r}, old_from_rollout={self.old_from_rollout}"


# ---------------------------------------------------------------------------------------------
# DeepSpeed: ESS-scaled LR and GAC at the accumulation boundary
# ---------------------------------------------------------------------------------------------
class _StepShim:
    """The DeepSpeed optimizer seen by `SteppedOptimizer`: its ``param_groups``, and its original ``step``
    preceded by ``before`` (writing GAC's edited gradients back through DeepSpeed)."""

    def __init__(self, optimizer: Any, step: Any, before: Any) -> None:
        self._optimizer, self._step, self._before = optimizer, step, before

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self._optimizer.param_groups

    def step(self, closure: Any = None) -> Any:
        self._before()
        return self._step() if closure is None else self._step(closure)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class DeepSpeedStepHook:
    """Runs GAC and the ESS-scaled learning rate inside a DeepSpeed engine's optimizer step.

    DeepSpeed calls ``engine.optimizer.step()`` once per optimizer step, inside ``engine.step()``
    at the gradient-accumulation boundary, after the gradients are reduced across data-parallel
    ranks. This hook replaces that bound method on the optimizer instance (`detach` restores it)
    by a `stable_async.StableStep` fed by the loss's own `stable_async.StepAccumulator`:

    1. GAC: the gradient of every trainable parameter is read with
       ``deepspeed.utils.safe_get_full_grad`` (all ZeRO stages), handed to
       `stable_async.GradientAlignmentControl` (on every rank the full gradient, so no extra
       collective), and written back with ``safe_set_full_grad`` when GAC edited it.
    2. ESS-LR: the accumulator (every forward of the loss since the last step) is reduced across
       data-parallel ranks, and DeepSpeed's step runs at the learning rate scaled by
       `stable_async.ESSScaledLR`'s rule, then the rate is restored (the engine's LR scheduler steps
       afterwards, as usual). Without ``ess_lr`` the ESS is still reported, the rate is not scaled.
    3. The accumulator is cleared; `new_rollout_batch` (called by `patch` at each
       ``ppo_train``, i.e. each replay buffer) makes GAC compare across rollout batches.

    Args:
        engine: a ``deepspeed.DeepSpeedEngine`` (or any object with ``.optimizer.step`` and
            ``.module``: OpenRLHF's ``Actor.model``).
        policy_loss: the `PolicyLoss` whose accumulator drives the ESS (its ``ess_lr`` and ``gac``
            settings are the defaults of the two arguments below).
        ess_lr: `ESSScaledLR` arguments (``True`` for defaults), or ``None``.
        gac: `GradientAlignmentControl` arguments (``True`` for defaults), or ``None``. ``mode="skip"``
            is refused: not stepping DeepSpeed's ZeRO / mixed-precision optimizer would leave its
            gradient buffers for the next step.
        process_group: the data-parallel group of the ESS all-reduce (default: the default group).

    Attributes:
        last_metrics: ``vcpo/*`` and ``gac/*`` metrics of the last step (OpenRLHF does not log them).
    """

    def __init__(
        self,
        engine: Any,
        policy_loss: PolicyLoss | None = None,
        ess_lr: bool | Mapping[str, Any] | None = None,
        gac: bool | Mapping[str, Any] | None = None,
        process_group: Any = None,
    ) -> None:
        optimizer = getattr(engine, "optimizer", None)
        if optimizer is None or not callable(getattr(optimizer, "step", None)):
            raise TypeError(f"engine: expected a DeepSpeed engine with .optimizer.step, got {type(engine).__name__}")
        ess_settings = ess_lr_settings(ess_lr) if ess_lr is not None else getattr(policy_loss, "ess_lr", None)
        gac_options = (
            gac_settings(gac, refused_modes=("skip",), reason=_NO_SKIP)
            if gac is not None
            else getattr(policy_loss, "gac", None)
        )
        if ess_settings is not None and not isinstance(policy_loss, PolicyLoss):
            raise ValueError("policy_loss: ess_lr needs the PolicyLoss that records the log-weights")
        self.engine, self.optimizer, self.policy_loss = engine, optimizer, policy_loss
        self.process_group = process_group
        self.had_instance_step = "step" in vars(optimizer)
        self.original_step = optimizer.step
        if isinstance(policy_loss, PolicyLoss):
            accumulator = policy_loss.accumulator
            if process_group is not None:
                accumulator.process_group = process_group
        else:
            accumulator = sa.StepAccumulator(process_group)
        self.stepper = SteppedOptimizer(
            _StepShim(optimizer, self.original_step, self._write_back),
            accumulator,
            ess_lr=ess_settings,
            measure_ess=isinstance(policy_loss, PolicyLoss),
        )
        self.gac_settings = gac_options
        self.params = [p for p in engine.module.parameters() if p.requires_grad] if gac_options is not None else []
        self._proxies: list[torch.Tensor] = []
        self._grads: list[torch.Tensor | None] = []
        self.last_metrics: dict[str, float] = {}
        optimizer.step = self.step
        if policy_loss is not None:
            policy_loss.step_hook = self

    @property
    def gac(self) -> sa.GradientAlignmentControl | None:
        return self.stepper.gac

    @property
    def ess_lr(self) -> SteppedOptimizer:
        return self.stepper

    def new_rollout_batch(self) -> None:
        """A new replay buffer starts: GAC compares its steps with the previous buffer's last gradient."""
        self.stepper.new_rollout_batch()

    def step(self, closure: Any = None) -> Any:
        """The replacement of ``engine.optimizer.step``."""
        if self.gac_settings is not None:
            self._load_gradients(self.gac_settings)
        try:
            result = self.stepper.step(closure)
        finally:
            for proxy in self._proxies:
                proxy.grad = None
            self._grads = []
        self.last_metrics = dict(self.stepper.stable_step.last_metrics)
        return result

    def _load_gradients(self, gac_settings: dict[str, Any]) -> None:
        from deepspeed.utils import safe_get_full_grad

        self._grads = [safe_get_full_grad(p) for p in self.params]
        if self.stepper.gac is None:
            # Zero-stride stand-ins shaped like the full gradients: GAC reads and edits proxy.grad.
            for p, g in zip(self.params, self._grads, strict=True):
                like = g if g is not None else p
                self._proxies.append(torch.zeros((), dtype=like.dtype, device=like.device).expand(_full_shape(p, g)))
            settings = {"sharded": False, **gac_settings}
            self.stepper.stable_step.gac = sa.GradientAlignmentControl(self._proxies, **settings)
        for proxy, g in zip(self._proxies, self._grads, strict=True):
            proxy.grad = g

    def _write_back(self) -> None:
        """After GAC, before DeepSpeed's step: hand edited gradients back to DeepSpeed."""
        gac = self.stepper.gac
        if gac is None or gac.last_action == "pass":
            return
        from deepspeed.utils import safe_set_full_grad

        for p, proxy, g in zip(self.params, self._proxies, self._grads, strict=True):
            if g is not None and g is not p.grad:  # p.grad itself was edited in place
                safe_set_full_grad(p, proxy.grad)

    def detach(self) -> None:
        """Restore the optimizer's original ``step``."""
        if self.had_instance_step:
            self.optimizer.step = self.original_step
        else:
            vars(self.optimizer).pop("step", None)
        if self.policy_loss is not None and self.policy_loss.step_hook is self:
            self.policy_loss.step_hook = None

    def state_dict(self) -> dict[str, Any]:
        """GAC's and the ESS wrapper's state (save it next to DeepSpeed's checkpoint)."""
        return {
            "gac": None if self.gac is None else self.gac.state_dict(),
            "ess_lr": self.stepper.state_dict(),
        }


def _full_shape(param: torch.Tensor, grad: torch.Tensor | None) -> torch.Size:
    if grad is not None:
        return grad.shape
    return getattr(param, "ds_shape", param.shape)  # ZeRO-3 parameters are partitioned


def attach_deepspeed(
    engine: Any,
    policy_loss: PolicyLoss | None = None,
    *,
    ess_lr: bool | Mapping[str, Any] | None = None,
    gac: bool | Mapping[str, Any] | None = None,
    process_group: Any = None,
) -> DeepSpeedStepHook:
    """Install a `DeepSpeedStepHook` on ``engine`` (see there); returns it (``.detach()`` undoes it)."""
    return DeepSpeedStepHook(engine, policy_loss, ess_lr=ess_lr, gac=gac, process_group=process_group)


# ---------------------------------------------------------------------------------------------
# Patching OpenRLHF's Ray actor
# ---------------------------------------------------------------------------------------------
PPO_ACTOR_MODULE = "openrlhf.trainer.ray.ppo_actor"


class OpenRLHFPatch:
    """An applied `patch`: ``undo()`` (or leaving the ``with`` block) restores OpenRLHF."""

    def __init__(self, module: Any, loss_class: type, originals: dict[str, Any]) -> None:
        self.module, self.loss_class = module, loss_class
        self._originals = originals
        self.active = True

    def undo(self) -> None:
        """Restore ``ppo_actor.PolicyLoss`` and ``ActorPPOTrainer.__init__`` / ``ppo_train``; idempotent."""
        global _ACTIVE
        if not self.active:
            return
        self.module.PolicyLoss = self._originals["PolicyLoss"]
        self.module.ActorPPOTrainer.__init__ = self._originals["__init__"]
        self.module.ActorPPOTrainer.ppo_train = self._originals["ppo_train"]
        self.active = False
        if _ACTIVE is self:
            _ACTIVE = None

    def __enter__(self) -> OpenRLHFPatch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.undo()


_ACTIVE: OpenRLHFPatch | None = None


def patch(
    *,
    policy_loss: str | None = None,
    loss_kwargs: Mapping[str, Any] | None = None,
    correction: Any = None,
    ess_lr: bool | Mapping[str, Any] | None = None,
    gac: bool | Mapping[str, Any] | None = None,
) -> OpenRLHFPatch:
    """Make OpenRLHF's Ray PPO actor build our `PolicyLoss` (with these options) in this process.

    Sets ``openrlhf.trainer.ray.ppo_actor.PolicyLoss`` to a subclass of `PolicyLoss` whose extra
    options are bound, so ``ActorPPOTrainer.__init__`` builds it from OpenRLHF's command-line
    arguments as before. When ``ess_lr`` or ``gac`` is set, ``ActorPPOTrainer.__init__`` is also
    wrapped to call `attach_deepspeed` on the actor's DeepSpeed engine, and
    ``ActorPPOTrainer.ppo_train`` (one call per replay buffer, then ``max_epochs`` passes of
    optimizer steps over it) tells GAC that a new rollout batch begins. Patching again replaces the
    previous patch. Returns an `OpenRLHFPatch` (a context manager; ``undo()`` or `unpatch`).

    The patch must run in the Ray worker that hosts the actor: use `runtime_env` /
    `worker_setup` (or call ``patch()`` in the driver too, where it is harmless).
    """
    global _ACTIVE
    options: dict[str, Any] = {
        "policy_loss": policy_loss,
        "loss_kwargs": dict(loss_kwargs or {}),
        "correction": correction,
        "ess_lr": ess_lr,
        "gac": gac,
    }
    PolicyLoss(**options)  # validate the options here, not in the worker
    module: Any = importlib.import_module(PPO_ACTOR_MODULE)  # OpenRLHF's, untyped
    if _ACTIVE is not None:
        _ACTIVE.undo()

    class PatchedPolicyLoss(PolicyLoss):
        """`PolicyLoss` with the options given to `patch` bound (OpenRLHF passes only its own)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**options, **kwargs})

    trainer_class = module.ActorPPOTrainer
    originals = {
        "PolicyLoss": module.PolicyLoss,
        "__init__": trainer_class.__init__,
        "ppo_train": trainer_class.ppo_train,
    }

    def __init__(trainer: Any, *args: Any, **kwargs: Any) -> None:
        originals["__init__"](trainer, *args, **kwargs)
        loss = getattr(trainer, "actor_loss_fn", None)
        if isinstance(loss, PolicyLoss) and (loss.ess_lr is not None or loss.gac is not None):
            attach_deepspeed(trainer.actor.model, loss)

    def ppo_train(trainer: Any, *args: Any, **kwargs: Any) -> Any:
        # One call per replay buffer (its max_epochs × minibatch steps follow): a new rollout batch for GAC.
        loss = getattr(trainer, "actor_loss_fn", None)
        if isinstance(loss, PolicyLoss) and loss.step_hook is not None:
            loss.step_hook.new_rollout_batch()
        return originals["ppo_train"](trainer, *args, **kwargs)

    module.PolicyLoss = PatchedPolicyLoss
    trainer_class.__init__ = __init__
    trainer_class.ppo_train = ppo_train
    _ACTIVE = OpenRLHFPatch(module, PatchedPolicyLoss, originals)
    logger.info("stable-async: patched %s.PolicyLoss (%s)", PPO_ACTOR_MODULE, options)
    return _ACTIVE


def unpatch() -> None:
    """Undo the active `patch`, if any."""
    if _ACTIVE is not None:
        _ACTIVE.undo()


def runtime_env(base: Mapping[str, Any] | None = None, **options: Any) -> dict[str, Any]:
    """A Ray ``runtime_env`` that applies ``patch(**options)`` in every worker process.

    ``options`` are `patch`'s (JSON-serializable: a correction as a dict of
    `stable_async.RolloutCorrection` arguments). ``base`` is merged (its ``env_vars`` kept).
    Use it with ``ray.init(runtime_env=...)`` before OpenRLHF's ``train(args)``, or dump it for
    ``ray job submit --runtime-env-json``. The options are validated here.
    """
    unknown = sorted(set(options) - {"policy_loss", "loss_kwargs", "correction", "ess_lr", "gac"})
    if unknown:
        raise TypeError(f"{unknown[0]}: not an option of stable_async.integrations.openrlhf.patch")
    PolicyLoss(**options)
    env = dict(base or {})
    env_vars = dict(env.get("env_vars", {}))
    env_vars[ENV_VAR] = json.dumps(options)
    env["env_vars"] = env_vars
    env["worker_process_setup_hook"] = WORKER_SETUP_HOOK
    return env


def worker_setup() -> None:
    """Ray ``worker_process_setup_hook``: ``patch(**json.loads($STABLE_ASYNC_OPENRLHF))`` in this worker."""
    raw = os.environ.get(ENV_VAR, "")
    options = json.loads(raw) if raw else {}
    if not isinstance(options, dict):
        raise ValueError(f"{ENV_VAR}: expected a JSON object of patch() options, got {raw!r}")
    patch(**options)
