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

import dataclasses
import importlib
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import stable_async as sa
from stable_async.diagnostics import approx_kl
from stable_async.integrations.options import ess_lr_settings, gac_settings

__all__ = [
    "ENV_VAR",
    "DeepSpeedStepHook",
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
_STATISTIC = {"ratio": "ratio", "binary_kl": "binary_kl", "tv": "binary_tv"}
_OPENRLHF_DIVERGENCE_EPS = 1e-6  # OpenRLHF clamps both probabilities to [1e-6, 1 - 1e-6]
_NO_SKIP = (
    "not stepping DeepSpeed's ZeRO / mixed-precision optimizer would leave its gradient buffers for the next step; "
    "use mode='project' or 'monitor'"
)


class DualClipError(ValueError, AssertionError):
    """``dual_clip <= 1``: OpenRLHF raises it with ``assert``; this error is caught by both."""


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
        _validate_openrlhf_arguments(
            dual_clip, is_correction_level, is_correction_mode, is_correction_gating, is_correction_threshold
        )
        if policy_loss is None and policy_loss_type not in ("ppo", "gspo"):
            raise ValueError(f"Invalid policy loss type: {policy_loss_type}")
        if policy_loss_type == "gspo" and policy_loss is None:
            self.token_level_loss = False  # GSPO requires the per-sample mean (as OpenRLHF)

        self.correction = self._resolve_correction(correction)
        # gspo + correction in OpenRLHF: the GSPO ratio is taken against the rollout policy.
        self.old_from_rollout = (
            policy_loss is None and policy_loss_type == "gspo" and is_correction_level != "off" and correction is None
        )
        self.loss_fn = self._build_loss(policy_loss, dict(loss_kwargs or {}))
        self.ess_lr = ess_lr_settings(ess_lr)
        self.gac = gac_settings(gac, refused_modes=("skip",), reason=_NO_SKIP)
        self.last_metrics: dict[str, float] = {}
        self.step_hook: DeepSpeedStepHook | None = None
        self._ess_inputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    # -- construction helpers ------------------------------------------------------------------
    def _resolve_correction(self, correction: Any) -> sa.RolloutCorrection | None:
        if correction is None:
            return self._translated_correction()
        if correction is False:
            return None
        if isinstance(correction, sa.RolloutCorrection):
            return correction
        if isinstance(correction, Mapping):
            try:
                return sa.RolloutCorrection(**correction)
            except (TypeError, ValueError) as err:
                raise type(err)(f"correction: {err}") from err
        raise TypeError(
            f"correction: expected None, False, a RolloutCorrection or a dict, got {type(correction).__name__}"
        )

    def _translated_correction(self) -> sa.RolloutCorrection | None:
        level = self.is_correction_level
        if level == "off" or self.policy_loss_type == "gspo":
            return None  # gspo: handled by old_from_rollout, no IS coefficient
        low, high = self.is_correction_threshold
        try:
            if self.is_correction_mode == "clip":
                return sa.RolloutCorrection(level="token", mode="truncate", low=low, high=high)
            statistic = _STATISTIC[self.is_correction_gating]
            return sa.RolloutCorrection(
                level="token" if level == "token" else "geometric",
                mode="mask",
                low=low,
                high=high,
                statistic=statistic,
                weight="token",
                divergence_eps=0.0 if statistic == "ratio" else _OPENRLHF_DIVERGENCE_EPS,
            )
        except ValueError as err:
            raise ValueError(f"is_correction_threshold: {err}") from err

    def _build_loss(self, policy_loss: str | sa.Loss | None, loss_kwargs: dict[str, Any]) -> sa.Loss:
        aggregation = "token-mean" if self.token_level_loss else "seq-mean-token-mean"
        if policy_loss is None:
            if loss_kwargs:
                raise TypeError("loss_kwargs: only used with policy_loss= (the translated loss takes OpenRLHF's)")
            config: dict[str, Any] = {
                "eps_low": self.clip_eps_low,
                "eps_high": self.clip_eps_high,
                "dual_clip": self.dual_clip,
                "aggregation": aggregation,
            }
            if self.correction is not None:
                config["correction"] = self.correction
            return sa.get_loss(self.policy_loss_type, **config)
        if isinstance(policy_loss, sa.Loss):
            if loss_kwargs:
                raise TypeError("loss_kwargs: pass hyperparameters to get_loss() when policy_loss is a Loss object")
            return policy_loss
        if not isinstance(policy_loss, str):
            raise TypeError(f"policy_loss: expected a loss name or a stable_async.Loss, got {type(policy_loss)}")
        fields = {f.name for f in dataclasses.fields(sa.loss_config_class(policy_loss)) if f.init}
        config = {}
        if "correction" in fields and self.correction is not None:
            config["correction"] = self.correction
        config.update(loss_kwargs)
        return sa.get_loss(policy_loss, **config)

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
            global_num_tokens=_as_float(batch_num_tokens),
            global_num_seqs=_as_float(global_batch_size),
            dp_size=int(dp_size),
        )
        out = self.loss_fn(batch)
        self.last_metrics = out.metrics
        if self.ess_lr is not None:
            self._ess_inputs.append((batch.logprobs.detach() - batch.behavior_logprobs.detach(), batch.mask))

        metrics, device = out.metrics, out.loss.device
        clip_ratio = torch.tensor(metrics.get("actor/pg_clipfrac", 0.0), dtype=torch.float32, device=device)
        ppo_kl = approx_kl(batch.logprobs, old_log_probs.to(batch.dtype), batch.mask)
        if "rollout_corr/kl" not in metrics:
            return out.loss, clip_ratio, ppo_kl, None, None
        vllm_kl = torch.tensor(metrics["rollout_corr/kl"], dtype=batch.dtype, device=device)
        filtered = torch.tensor(self._filter_fraction(metrics, batch), dtype=torch.float32, device=device)
        return out.loss, clip_ratio, ppo_kl, vllm_kl, filtered

    def _filter_fraction(self, metrics: Mapping[str, float], batch: sa.PolicyBatch) -> float:
        """OpenRLHF's ``is_filter_ratio`` from the correction's metrics (see the module docstring)."""
        correction = self.correction
        if correction is None:
            return metrics.get("rollout_corr/rollout_rs_masked_fraction", 0.0)
        if correction.mode == "truncate":
            return metrics["rollout_corr/truncated_fraction"]
        if correction.level == "token":
            return metrics["rollout_corr/rollout_rs_masked_fraction"]
        # Per sequence: OpenRLHF's denominator is every row, and a row without tokens is "filtered".
        rows, valid = batch.mask.shape[0], int(batch.mask.any(dim=-1).sum())
        if rows == 0:
            return 0.0
        return (metrics["rollout_corr/rollout_rs_seq_masked_fraction"] * valid + (rows - valid)) / rows

    # -- ESS for the learning rate -------------------------------------------------------------
    def pop_ess(self, process_group: Any = None) -> sa.ESSResult | None:
        """ESS of the sequence weights π_θ/μ of every forward since the last call, over all ranks.

        Called by `DeepSpeedStepHook` at the optimizer step (every rank calls it, so the
        all-reduce inside `stable_async.effective_sample_size` matches). ``None`` if nothing was
        recorded (``ess_lr`` off, or no forward since the last step).
        """
        inputs, self._ess_inputs = self._ess_inputs, []
        if not inputs:
            return None
        width = max(w.shape[-1] for w, _ in inputs)
        log_w = torch.cat([F.pad(w, (0, width - w.shape[-1])) for w, _ in inputs])
        mask = torch.cat([F.pad(m, (0, width - m.shape[-1])) for _, m in inputs])
        return sa.effective_sample_size(log_w, mask, level="sequence", process_group=process_group)

    def extra_repr(self) -> str:
        return f"loss_fn={self.loss_fn!r}, old_from_rollout={self.old_from_rollout}"


def _validate_openrlhf_arguments(dual_clip: float | None, level: str, mode: str, gating: str, threshold: Any) -> None:
    """OpenRLHF's constructor checks, in its order and with its messages."""
    if dual_clip is not None and not dual_clip > 1.0:
        raise DualClipError(f"dual_clip must be > 1.0, got {dual_clip}")
    if level not in {"off", "token", "seq"}:
        raise ValueError(f"is_correction_level must be off/token/seq, got {level}")
    if mode not in {"mask", "clip"}:
        raise ValueError(f"is_correction_mode must be mask/clip, got {mode}")
    if gating not in {"ratio", "binary_kl", "tv"}:
        raise ValueError(f"is_correction_gating must be ratio/binary_kl/tv, got {gating}")
    if mode == "clip" and (level == "seq" or gating != "ratio"):
        raise ValueError("is_correction_mode=clip requires is_correction_level=token and is_correction_gating=ratio")
    if gating != "ratio" and level != "off" and threshold[0] > 0:
        raise ValueError(f"is_correction_gating={gating} takes an upper bound only (a single delta)")


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


# ---------------------------------------------------------------------------------------------
# DeepSpeed: ESS-scaled LR and GAC at the accumulation boundary
# ---------------------------------------------------------------------------------------------
class _StepShim:
    """The DeepSpeed optimizer seen by `ESSScaledLR`: its ``param_groups``, and its original ``step``."""

    def __init__(self, optimizer: Any, step: Any) -> None:
        self._optimizer, self._step = optimizer, step

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self._optimizer.param_groups

    def step(self, closure: Any = None) -> Any:
        return self._step() if closure is None else self._step(closure)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class DeepSpeedStepHook:
    """Runs GAC and the ESS-scaled learning rate inside a DeepSpeed engine's optimizer step.

    DeepSpeed calls ``engine.optimizer.step()`` once per optimizer step, inside ``engine.step()``
    at the gradient-accumulation boundary, after the gradients are reduced across data-parallel
    ranks. This hook replaces that bound method on the optimizer instance (`detach` restores it):

    1. GAC: the gradient of every trainable parameter is read with
       ``deepspeed.utils.safe_get_full_grad`` (all ZeRO stages), handed to
       `stable_async.GradientAlignmentControl` (on every rank the full gradient, so no extra
       collective), and written back with ``safe_set_full_grad`` when GAC edited it.
    2. ESS-LR: ``policy_loss.pop_ess()`` gives the ESS of the step's micro-batches (one
       all-reduce), and `stable_async.ESSScaledLR` runs DeepSpeed's step at the scaled learning
       rate, then restores it (the engine's LR scheduler steps afterwards, as usual).

    Args:
        engine: a ``deepspeed.DeepSpeedEngine`` (or any object with ``.optimizer.step`` and
            ``.module``: OpenRLHF's ``Actor.model``).
        policy_loss: the `PolicyLoss` whose ESS drives the learning rate (its ``ess_lr`` and ``gac``
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
        shim = _StepShim(optimizer, self.original_step)
        self.ess_lr = None if ess_settings is None else sa.ESSScaledLR(shim, **ess_settings)
        self.gac_settings = gac_options
        self.gac: sa.GradientAlignmentControl | None = None
        self.params = [p for p in engine.module.parameters() if p.requires_grad] if gac_options is not None else []
        self._proxies: list[torch.Tensor] = []
        self.last_metrics: dict[str, float] = {}
        optimizer.step = self.step
        if policy_loss is not None:
            policy_loss.step_hook = self

    def step(self, *args: Any, **kwargs: Any) -> Any:
        """The replacement of ``engine.optimizer.step``."""
        metrics: dict[str, float] = {}
        if self.gac_settings is not None:
            metrics.update(self._apply_gac())
        if self.ess_lr is None:
            result = self.original_step(*args, **kwargs)
        else:
            assert self.policy_loss is not None
            result = self.ess_lr.step(self.policy_loss.pop_ess(self.process_group))
            metrics.update(self.ess_lr.last_metrics)
        self.last_metrics = metrics
        return result

    def _apply_gac(self) -> dict[str, float]:
        from deepspeed.utils import safe_get_full_grad, safe_set_full_grad

        grads = [safe_get_full_grad(p) for p in self.params]
        if self.gac is None:
            # Zero-stride stand-ins shaped like the full gradients: GAC reads and edits proxy.grad.
            for p, g in zip(self.params, grads, strict=True):
                like = g if g is not None else p
                self._proxies.append(torch.zeros((), dtype=like.dtype, device=like.device).expand(_full_shape(p, g)))
            settings = {"sharded": False, **self.gac_settings}
            self.gac = sa.GradientAlignmentControl(self._proxies, **settings)
        for proxy, g in zip(self._proxies, grads, strict=True):
            proxy.grad = g
        metrics = self.gac.apply()
        if self.gac.last_action != "pass":
            for p, proxy, g in zip(self.params, self._proxies, grads, strict=True):
                if g is not None and g is not p.grad:  # p.grad itself was edited in place
                    safe_set_full_grad(p, proxy.grad)
        for proxy in self._proxies:
            proxy.grad = None
        return metrics

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
            "ess_lr": None if self.ess_lr is None else self.ess_lr.state_dict(),
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

    def __init__(self, module: Any, loss_class: type, original_loss: Any, original_init: Any) -> None:
        self.module, self.loss_class = module, loss_class
        self._original_loss, self._original_init = original_loss, original_init
        self.active = True

    def undo(self) -> None:
        """Restore ``ppo_actor.PolicyLoss`` and ``ActorPPOTrainer.__init__``; idempotent."""
        global _ACTIVE
        if not self.active:
            return
        self.module.PolicyLoss = self._original_loss
        self.module.ActorPPOTrainer.__init__ = self._original_init
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
    wrapped to call `attach_deepspeed` on the actor's DeepSpeed engine. Patching again replaces the
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
    module = importlib.import_module(PPO_ACTOR_MODULE)
    if _ACTIVE is not None:
        _ACTIVE.undo()

    class PatchedPolicyLoss(PolicyLoss):
        """`PolicyLoss` with the options given to `patch` bound (OpenRLHF passes only its own)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**options, **kwargs})

    original_init = module.ActorPPOTrainer.__init__

    def __init__(trainer: Any, *args: Any, **kwargs: Any) -> None:
        original_init(trainer, *args, **kwargs)
        loss = getattr(trainer, "actor_loss_fn", None)
        if isinstance(loss, PolicyLoss) and (loss.ess_lr is not None or loss.gac is not None):
            attach_deepspeed(trainer.actor.model, loss)

    original_loss = module.PolicyLoss
    module.PolicyLoss = PatchedPolicyLoss
    module.ActorPPOTrainer.__init__ = __init__
    _ACTIVE = OpenRLHFPatch(module, PatchedPolicyLoss, original_loss, original_init)
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
