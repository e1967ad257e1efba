"""TRL adapter: `StableGRPOTrainer`, a drop-in `trl.GRPOTrainer` with a stable-async loss.

    from stable_async.integrations.trl import StableGRPOTrainer
    trainer = StableGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...),
                                policy_loss="dppo_binary_tv", ess_lr=True, gac=True)

A translation layer only: TRL's tensors go into a `stable_async.PolicyBatch`, the core computes
the loss, ESS, IS weights and gradient control, and the metrics go back through TRL's own
``self._metrics[mode][name]`` lists (so they reach ``state.log_history`` and every reporter).

What is translated (details and rationale: docs/integrations/trl.md):

* Current log-probs: TRL's own ``_get_per_token_logps_and_entropies`` (same forward, same fused
  LM head), so the loss sees exactly the numbers TRL's loss would.
* Mask: ``completion_mask`` (× ``tool_mask`` when present), as TRL.
* Old log-probs: ``old_per_token_logps``, else ``per_token_logps.detach()`` (TRL's rule).
* Rollout log-probs: ``sampling_per_token_logps`` (vLLM or a ``rollout_func``). Tokens the engine
  could not score (NaN) take the old log-prob (w = 1, TRL's own neutral value); their share is
  logged as ``stable_async/rollout_logprobs_unscored_frac``. Without sampler log-probs the old
  log-probs stand in, and ``stable_async/rollout_logprobs_source`` is 0 (1 = from the sampler).
* Gradient accumulation: TRL's loss is already scaled for GA (``loss_is_scaled_for_ga``). The
  adapter reproduces that with global counts: ``dp_size`` = number of processes, and the
  denominators count the whole optimizer step over all ranks: ``global_num_tokens`` =
  ``num_items_in_batch · GA / steps_per_generation`` (TRL's ``dapo`` normalizer) and
  ``global_num_seqs`` = rows per micro-batch · GA · processes (TRL's ``grpo`` divides by every
  row, masked or not). ``token_normalizer="local"`` uses the micro-batch's own token count · GA ·
  processes instead (TRL's ``bnpo``). So the summed, rank-averaged gradient of a step is the
  gradient of the loss aggregated over the step's whole batch.
* vLLM importance sampling (the IS weight is never applied twice):
  1. ``correction=RolloutCorrection(...)`` (or a ``policy_loss`` whose config has one): ours is
     applied inside the loss and TRL's ``importance_sampling_ratio`` is ignored;
  2. ``correction=False``: no behavior weight at all;
  3. default (``None``): if TRL has its vLLM IS correction on, its mode is translated to the
     equivalent `RolloutCorrection` (``{token,sequence}_{truncate,mask}`` with
     ``vllm_importance_sampling_clip_min/max``) — unless the loss already reweights by the rollout
     policy μ (``decoupled_ppo``, ``vcpo``, the ``dppo_*`` losses with ``anchor="rollout"``), in
     which case TRL's ratio is dropped. ``stable_async/trl_is_applied`` says which happened.
* KL to the reference (β ≠ 0): ``β · k3(ref, π_θ)`` per token (TRL's estimator,
  `stable_async.divergence.k3`), times TRL's ratio π_θ/π_old when ``use_bias_correction_kl``
  (TRL's default; token or sequence level as ``importance_sampling_level``), aggregated like the
  policy loss and added to it, as TRL does.
* MoE router aux loss: added with TRL's scaling.

* Top-K losses (``dppo_topk_tv`` / ``dppo_topk_kl``): TRL keeps only the sampled token's
  log-prob, so the rollout policy's top-K must come from a ``rollout_func`` returning, besides
  TRL's keys, ``topk_ids`` and ``topk_logprobs`` (`TOPK_IDS_KEY`, `TOPK_LOGPROBS_KEY`): per
  completion, per token, K ids and the sampler's log-probs at them (the sampled token included).
  They are padded to (B, T, K) next to ``completion_ids``. The current policy at those ids takes
  one extra forward per micro-batch that materializes the completion logits (TRL's fused LM head
  returns only the sampled token's log-prob), divided by TRL's ``temperature``, under
  ``torch.no_grad`` (the top-K divergence only gates the trust region; the gradient flows through
  TRL's own log-probs), then `stable_async.divergence.gather_topk_logprobs`. Text-only models.

* ``off_policy_mask_threshold``: `stable_async.opsm` with that δ, composed with the correction above.

Not supported (``ValueError`` naming the setting at construction): ``top_entropy_quantile < 1``,
the entropy bonus (``entropy_coef`` / adaptive entropy), and the top-K losses without a
``rollout_func`` (TRL's own generation never returns top-K).

ESS, ESS-scaled LR and GAC: each training micro-batch is recorded into the trainer's own
`stable_async.StepAccumulator`; ``create_optimizer`` wraps TRL's optimizer so that the Trainer's
``optimizer.step()`` is a `stable_async.StableStep` (after clipping: GAC, a possible skip, the
accumulator reduced over all ranks, the ESS-scaled step; see `stable_async.integrations.stepping`).
Each new generation is a new rollout batch for GAC (``num_iterations`` and buffered generation
reuse one batch for several steps). Under DeepSpeed the step happens inside
``accelerator.backward``, so the same step runs in the DeepSpeed engine's torch optimizer instead
(`StableGRPOTrainer.install_deepspeed_hooks`, installed automatically at ``on_train_begin``).
TRL's metric names are kept where TRL logs the quantity (``clip_ratio/*``, ``entropy``, ``kl``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from transformers import TrainerCallback
from trl import GRPOTrainer

from stable_async.aggregate import aggregate
from stable_async.batch import PolicyBatch
from stable_async.correction import RolloutCorrection
from stable_async.distributed import world_size
from stable_async.divergence import gather_topk_logprobs, k3
from stable_async.integrations.options import correction_option, ess_lr_settings, gac_settings
from stable_async.integrations.stepping import SteppedOptimizer
from stable_async.integrations.trl_translation import (
    PREFIX,
    TOPK_IDS_KEY,
    TOPK_KEYS,
    TOPK_LOGPROBS_KEY,
    clip_flags,
    metric_name,
    pad_topk,
    step_denominators,
    trl_equivalent_loss,
    trl_is_correction,
)
from stable_async.opsm import opsm
from stable_async.optim.accumulator import StepAccumulator
from stable_async.optim.gac import GradientAlignmentControl
from stable_async.registry import Loss, get_loss

__all__ = ["TOPK_IDS_KEY", "TOPK_LOGPROBS_KEY", "StableGRPOTrainer", "trl_equivalent_loss"]

_FORWARD_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


class _StepHook:
    """Stands in for an optimizer inside `SteppedOptimizer`: its ``param_groups`` and its original ``step``."""

    def __init__(self, optimizer: Any, step: Callable[..., Any]) -> None:
        self._optimizer = optimizer
        self.step = step

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self._optimizer.param_groups

    def state_dict(self) -> dict[str, Any]:
        return self._optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._optimizer.load_state_dict(state)


class StableAsyncCallback(TrainerCallback):
    """Installs the DeepSpeed step hook at ``on_train_begin`` (without DeepSpeed, the optimizer is wrapped)."""

    def __init__(self, trainer: StableGRPOTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer.is_deepspeed_enabled and not self.trainer._sa_ds_hooked:
            self.trainer.install_deepspeed_hooks()


class StableGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` with a stable-async policy loss, rollout correction, ESS-scaled LR and GAC.

    Every ``GRPOTrainer`` argument is accepted unchanged; the extra keyword arguments are:

    Args:
        policy_loss: a registered loss name (``stable_async.available_losses()``) or a `Loss` from
            ``get_loss``. Default: the loss equivalent to ``args.loss_type`` (see
            `trl_equivalent_loss`), which reproduces ``GRPOTrainer``'s loss and gradients. When given,
            TRL's ``loss_type``, ``epsilon*``, ``delta`` and ``importance_sampling_level`` are not used
            (pass the loss's own hyperparameters in ``loss_kwargs``).
        loss_kwargs: hyperparameters of ``policy_loss`` (with a name only), e.g. ``{"delta_high": 0.1,
            "aggregation": "seq-mean-token-mean"}``.
        correction: a correction on the sampler's log-probs (a `RolloutCorrection`, ``sa.opsm(...)`` or a
            tuple of them; replaces TRL's vLLM IS ratio), ``False`` (no behavior weight), or ``None`` (TRL's
            vLLM IS mode, translated, unless the loss already reweights by μ). TRL's
            ``off_policy_mask_threshold`` adds ``sa.opsm(threshold)`` to whichever applies. See the module
            docstring.
        ess_lr: ``True`` or a dict of `ESSScaledLR` keyword arguments (``rule``, ``base_ratio``,
            ``min_scale``, ``on_missing``) to scale each step's LR by the step's sequence-level ESS.
        gac: ``True`` or a dict of `GradientAlignmentControl` keyword arguments (``mode``,
            ``threshold``, ``strength``, ``memory``, ...). Only trainable parameters enter (LoRA
            adapters only, with a PEFT ``peft_config``).
        token_normalizer: ``"global"`` (token denominators count the whole optimizer step over all
            ranks, TRL's ``dapo``) or ``"local"`` (the micro-batch's count, TRL's ``bnpo``). Default:
            ``"local"`` for the default loss with ``loss_type="bnpo"``, else ``"global"``.
    """

    def __init__(
        self,
        *args: Any,
        policy_loss: str | Loss | None = None,
        loss_kwargs: Mapping[str, Any] | None = None,
        correction: Any = None,
        ess_lr: bool | Mapping[str, Any] | None = None,
        gac: bool | Mapping[str, Any] | None = None,
        token_normalizer: str | None = None,
        **kwargs: Any,
    ) -> None:
        # Our options first: a typo fails before TRL loads the model.
        self._sa_correction = correction_option(correction)
        self._sa_ess_lr_settings = ess_lr_settings(ess_lr)
        self._sa_gac_settings = gac_settings(gac)
        if token_normalizer not in (None, "global", "local"):
            raise ValueError(f"token_normalizer: expected 'global' or 'local', got {token_normalizer!r}")
        super().__init__(*args, **kwargs)
        self._sa_loss, normalizer = self._sa_build_loss(policy_loss, loss_kwargs)
        if self._sa_correction not in (None, False) and self._sa_loss.config.correction is not None:
            raise ValueError("correction: the policy_loss already has a correction in its config; pass it once")
        self._sa_token_normalizer = token_normalizer or normalizer
        self._check_supported()
        self._sa_accumulator = StepAccumulator()  # this trainer's micro-batches of the current step
        self._sa_stepper: SteppedOptimizer | None = None
        self._sa_ds_hooked = False
        self._sa_loss_cache: dict[Any, tuple[Loss, float]] = {}
        self._sa_topk_rollout: tuple[list[Any], Any, Any] | None = None
        self.add_callback(StableAsyncCallback(self))

    # ------------------------------------------------------------------ construction
    def _sa_build_loss(self, policy_loss: str | Loss | None, loss_kwargs: Mapping[str, Any] | None) -> tuple[Loss, str]:
        if policy_loss is None:
            name, settings, normalizer = trl_equivalent_loss(self.args)
            settings.update(loss_kwargs or {})
            loss = get_loss(name, **settings)
        elif isinstance(policy_loss, Loss):
            if loss_kwargs:
                raise TypeError("loss_kwargs: pass hyperparameters in get_loss(...) when policy_loss is a Loss object")
            loss, normalizer = policy_loss, "global"
        elif isinstance(policy_loss, str):
            loss, normalizer = get_loss(policy_loss, **dict(loss_kwargs or {})), "global"
        else:
            raise TypeError(f"policy_loss: expected a loss name, a stable_async.Loss or None, got {policy_loss!r}")
        if loss.needs_topk and self.rollout_func is None:
            raise ValueError(
                f"policy_loss: {loss.name!r} needs the rollout policy's top-K log-probs at every token, which TRL's "
                "own generation does not keep (only the sampled token's log-prob); pass a rollout_func that returns "
                f"{list(TOPK_KEYS)}, or use 'dppo_binary_tv' / 'dppo_binary_kl' (see docs/integrations/trl.md)"
            )
        return loss, normalizer

    def _check_supported(self) -> None:
        if self.top_entropy_quantile < 1.0:
            raise ValueError("top_entropy_quantile: < 1 is not supported by StableGRPOTrainer; set it to 1.0")
        if self._entropy_bonus_enabled:
            raise ValueError("entropy_coef: the entropy bonus is not supported by StableGRPOTrainer; set it to 0")

    @property
    def _sa_gac(self) -> GradientAlignmentControl | None:
        return None if self._sa_stepper is None else self._sa_stepper.gac

    @property
    def _sa_ess_lr(self) -> SteppedOptimizer | None:
        return self._sa_stepper

    def _sa_wrap(self, optimizer: Any, sharded: Callable[[], bool] | None = None) -> SteppedOptimizer:
        self._sa_stepper = SteppedOptimizer(
            optimizer,
            self._sa_accumulator,
            ess_lr=self._sa_ess_lr_settings,
            gac=self._sa_gac_settings,
            on_metrics=lambda metrics: self._sa_log(metrics, "train", gather=False),
            sharded=sharded,
        )
        return self._sa_stepper

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        """TRL's optimizer, wrapped so that each ``step()`` is our `StableStep` (GAC, skip, ESS-scaled LR).

        GAC sees the optimizer's parameters (the trainable ones: LoRA adapters only with PEFT).
        """
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        if not isinstance(optimizer, SteppedOptimizer):
            optimizer = self._sa_wrap(optimizer)
            self.optimizer = optimizer
        return optimizer

    def install_deepspeed_hooks(self, engine: Any = None) -> None:
        """Run GAC and the ESS-scaled step inside the DeepSpeed engine's optimizer step.

        Under DeepSpeed, ``accelerate.backward`` runs ``engine.step()`` at the last micro-batch, so the
        Trainer's own ``optimizer.step()`` comes too late. DeepSpeed steps a *torch* optimizer
        (``engine.optimizer.optimizer`` for ZeRO / bf16 wrappers, else ``engine.optimizer``): there the
        gradients are reduced, unscaled and clipped, and under ZeRO each rank holds a disjoint fp32
        partition (GAC then all-reduces its sums: ``sharded=True``). When that optimizer is the one
        ``create_optimizer`` wrapped, it already steps through `StableStep`; otherwise its ``step`` is
        replaced by one. Called automatically at ``on_train_begin`` when DeepSpeed is enabled. Untested
        against a real DeepSpeed engine (no GPU in CI); the hook itself is tested on a plain torch optimizer.
        """
        engine = engine if engine is not None else self.model_wrapped
        outer = engine.optimizer
        base = getattr(outer, "optimizer", outer)
        stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else 0

        def sharded() -> bool:
            return stage >= 1 and world_size() > 1

        if isinstance(base, SteppedOptimizer):
            base.sharded = sharded
        else:
            stepper = self._sa_wrap(_StepHook(base, base.step), sharded=sharded)
            base.step = stepper.step
        self._sa_ds_hooked = True

    # ------------------------------------------------------------------ the rollout's top-K
    def _generate(self, prompts: list) -> Any:
        """TRL's ``_generate``; also keeps a ``rollout_func``'s top-K fields for the loss inputs.

        TRL merges a ``rollout_func``'s extra fields into the reward functions' inputs only (they
        still get them); the top-K ones are padded into the batch by
        `_generate_and_score_completions`.
        """
        result = super()._generate(prompts)
        extra = result[5] or {}
        if any(key in extra for key in TOPK_KEYS):
            self._sa_topk_rollout = (result[1], extra.get(TOPK_IDS_KEY), extra.get(TOPK_LOGPROBS_KEY))
        return result

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """A new rollout batch (GAC is told): TRL's batch, plus ``topk_ids`` (B, T, K) int64 /
        ``topk_logprobs`` (B, T, K) fp32 when the ``rollout_func`` returned them (padding positions:
        id 0, log-prob 0; masked by the loss)."""
        self._sa_topk_rollout = None
        if self.model.training and self._sa_stepper is not None:
            self._sa_stepper.new_rollout_batch()  # TRL reuses it num_iterations × steps_per_generation / GA steps
        output = super()._generate_and_score_completions(inputs)
        stash, self._sa_topk_rollout = self._sa_topk_rollout, None
        if stash is not None:
            output.update(pad_topk(*stash, output["completion_ids"]))
        return output

    def _sa_current_topk(
        self, model: Any, inputs: Mapping[str, Any], input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The batch's top-K fields: the rollout's, and log π_θ at the same ids from one extra forward.

        TRL's fused LM head returns only the sampled token's log-prob, so this forward materializes
        the completion positions' logits (B, T, V), divided by ``temperature`` as TRL's head does. It
        runs under ``no_grad``: the top-K divergence only decides which tokens the trust region
        masks (the gradient goes through TRL's own log-probs).
        """
        missing = [key for key in TOPK_KEYS if inputs.get(key) is None]
        if missing:
            raise ValueError(
                f"policy_loss: {self._sa_loss.name!r} needs the rollout policy's top-K at every completion token, "
                f"but the inputs lack {missing}: the rollout_func must return {list(TOPK_KEYS)} (per completion, "
                "per token, K token ids and the sampler's log-probs at them, the sampled token included); see "
                "docs/integrations/trl.md"
            )
        if inputs.get("pixel_values") is not None:
            raise ValueError(f"policy_loss: {self._sa_loss.name!r} is supported for text-only models in TRL")
        ids = inputs[TOPK_IDS_KEY]
        length = ids.shape[1]
        with torch.no_grad(), self.accelerator.autocast():
            logits = model(
                input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=length + 1, use_cache=False
            ).logits[:, -length - 1 : -1]
            if self.temperature != 1.0:
                logits = logits.div_(self.temperature)  # in place: no second (B, T, V) tensor
            current = gather_topk_logprobs(logits, ids)
        return {"topk_ids": ids, "topk_logprobs": inputs[TOPK_LOGPROBS_KEY], "current_topk_logprobs": current}

    # ------------------------------------------------------------------ the loss
    def _sa_loss_for(self, trl_is_on: bool) -> tuple[Loss, float]:
        """The loss with the corrections chosen by the IS rule (+ OPSM), and whether TRL's IS mode was translated."""
        key = (trl_is_on, self.vllm_importance_sampling_mode if trl_is_on else None)
        if key in self._sa_loss_cache:
            return self._sa_loss_cache[key]
        loss = self._sa_loss
        correction = loss.config.correction
        translated = 0.0
        if self._sa_correction is not None and self._sa_correction is not False:
            correction = self._sa_correction
        elif self._sa_correction is None and correction is None and trl_is_on and not loss.weights_by_rollout:
            correction, translated = self._sa_trl_is_correction(), 1.0  # TRL's IS mode, translated
        if self.off_policy_mask_threshold is not None:  # TRL's OPSM, composed with the correction
            mask = opsm(self.off_policy_mask_threshold)
            correction = mask if correction is None else (correction, mask)
        if correction is not loss.config.correction:
            loss = get_loss(loss.name, config=dataclasses.replace(loss.config, correction=correction))
        self._sa_loss_cache[key] = (loss, translated)
        return loss, translated

    def _sa_trl_is_correction(self) -> RolloutCorrection:
        return trl_is_correction(
            self.vllm_importance_sampling_mode,
            self.vllm_importance_sampling_clip_min,
            self.vllm_importance_sampling_clip_max,
        )

    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        """TRL's loss hook: TRL's forward and batch, our loss, TRL's metric sink."""
        mode = "train" if self.model.training else "eval"
        completion_mask = inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            inputs["completion_ids"].size(1),
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **{key: inputs.get(key) for key in _FORWARD_KEYS},
        )
        metrics: dict[str, float] = {}
        batch = self._sa_policy_batch(inputs, logps, mask, mode, metrics)
        if self._sa_loss.needs_topk:
            topk = self._sa_current_topk(model, inputs, input_ids, attention_mask)
            batch = batch.replace(**topk)
        loss_fn, translated = self._sa_loss_for(bool(self.use_vllm and self.vllm_importance_sampling_correction))
        out = loss_fn(batch)
        metrics[PREFIX + "trl_is_applied"] = translated
        metrics.update(out.metrics)
        loss = out.loss
        if self.beta != 0.0:
            loss = loss + self._sa_kl_term(inputs, batch, loss_fn, mask, mode)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / self._sa_accumulation(mode)
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        self._metrics[mode]["entropy"].append(self._global_masked_mean(entropies, batch.mask))
        self._sa_log_clip_ratios(batch, inputs["advantages"], loss_fn, mode)
        if mode == "train":  # the step's ESS is reduced by this trainer's optimizer step
            self._sa_accumulator.record(batch)
        self._sa_log(metrics, mode, gather=True)
        return loss

    def _sa_accumulation(self, mode: str) -> int:
        """Micro-batches in this optimizer step (set by the Trainer; the last step of an epoch may be shorter)."""
        if mode != "train":
            return 1
        return getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)

    def _sa_policy_batch(
        self, inputs: Mapping[str, Any], logps: torch.Tensor, mask: torch.Tensor, mode: str, metrics: dict[str, float]
    ) -> PolicyBatch:
        """TRL's tensors as a `PolicyBatch` (old / rollout log-probs by TRL's rules, GA-scaled global counts)."""
        valid = mask.bool()
        old = inputs.get("old_per_token_logps")
        old = logps.detach() if old is None else old
        sampling = inputs.get("sampling_per_token_logps")
        if sampling is not None:
            unscored = torch.isnan(sampling)
            rollout = torch.where(unscored, old.to(sampling.dtype), sampling)
            scored_frac = float((unscored & valid).sum()) / max(float(valid.sum()), 1.0)
            metrics[PREFIX + "rollout_logprobs_unscored_frac"] = scored_frac
        else:
            rollout = old
        metrics[PREFIX + "rollout_logprobs_source"] = float(sampling is not None)
        processes = self.accelerator.num_processes
        tokens, seqs = step_denominators(
            normalizer=self._sa_token_normalizer,
            num_items_in_batch=float(inputs["num_items_in_batch"]),
            valid_tokens=float(valid.sum()),
            rows=valid.shape[0],
            accumulation=self._sa_accumulation(mode),
            steps_per_generation=self.args.steps_per_generation,
            processes=processes,
            training=mode == "train",
        )
        return PolicyBatch(
            logprobs=logps,
            advantages=inputs["advantages"],
            mask=valid,
            old_logprobs=old,
            rollout_logprobs=rollout,
            global_num_tokens=tokens,
            global_num_seqs=seqs,
            dp_size=processes,
        )

    def _sa_kl_term(
        self, inputs: Mapping[str, Any], batch: PolicyBatch, loss_fn: Loss, mask: torch.Tensor, mode: str
    ) -> torch.Tensor:
        """β · k3(ref, π_θ) per token (× TRL's π_θ/π_old with ``use_bias_correction_kl``), aggregated like the loss."""
        per_token_kl = k3(inputs["ref_per_token_logps"], batch.logprobs)
        if self.args.use_bias_correction_kl:  # TRL's own KL weighting (its default), reproduced as TRL does it
            log_ratio = batch.logprobs - batch.old_logprobs
            if self.importance_sampling_level == "sequence":
                log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
            per_token_kl = per_token_kl * torch.exp(log_ratio)
        self._metrics[mode]["kl"].append(self._global_masked_mean(per_token_kl.detach(), batch.mask))
        return self.beta * aggregate(
            per_token_kl,
            batch.mask,
            loss_fn.config.aggregation,
            global_num_tokens=batch.global_num_tokens,
            global_num_seqs=batch.global_num_seqs,
            dp_size=batch.dp_size,
            norm_length=loss_fn.config.norm_length,
        )

    # ------------------------------------------------------------------ metrics
    def _sa_log_clip_ratios(self, batch: PolicyBatch, advantages: torch.Tensor, loss_fn: Loss, mode: str) -> None:
        """TRL's ``clip_ratio/{low_mean,low_min,high_mean,high_max,region_mean}``, reduced as TRL reduces them.

        The ratio is TRL's (π_θ/π_old at ``importance_sampling_level``); ε and the cap are the loss's own
        (``eps_low``, ``eps_high``, ``ratio_cap``) when its config has them, else TRL's ``epsilon*`` / ``delta``.
        """
        config = loss_fn.config
        has_eps = hasattr(config, "eps_low") and hasattr(config, "eps_high")
        low, high = clip_flags(
            batch.logprobs.detach() - batch.old_logprobs,
            advantages,
            batch.mask,
            eps_low=config.eps_low if has_eps else self.epsilon_low,
            eps_high=config.eps_high if has_eps else self.epsilon_high,
            level=self.importance_sampling_level,
            ratio_cap=getattr(config, "ratio_cap", None) if has_eps else self.args.delta,
        )
        per_row = low.shape[1] == 1
        mask = torch.ones_like(low) if per_row else batch.mask
        sink = self._metrics[mode]
        for name, flags in (("low_mean", low), ("high_mean", high), ("region_mean", low | high)):
            sink[f"clip_ratio/{name}"].append(self._global_masked_mean(flags.float(), mask))
        for name, flags, reduce in (("low_min", low, torch.min), ("high_max", high, torch.max)):
            per_seq = flags.float().squeeze(1) if per_row else (flags * mask).sum(-1) / mask.sum(-1)
            gathered = self.accelerator.gather(per_seq)
            finite = gathered[~torch.isnan(gathered)]
            sink[f"clip_ratio/{name}"].append(reduce(finite).item() if finite.numel() else math.nan)

    def _global_masked_mean(self, x: torch.Tensor, mask: torch.Tensor) -> float:
        totals = torch.stack([(x * mask).sum(), mask.sum().to(x.dtype)])
        totals = self.accelerator.reduce(totals, reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    def _sa_log(self, metrics: Mapping[str, float], mode: str, gather: bool) -> None:
        """Append metrics to TRL's ``self._metrics[mode]`` under translated names (rank mean if ``gather``)."""
        names, values = [], []
        for name, value in metrics.items():
            translated = metric_name(name)
            if translated is not None:
                names.append(translated)
                values.append(float(value))
        if not names:
            return
        if gather and self.accelerator.num_processes > 1:
            local = torch.tensor([values], dtype=torch.float32, device=self.accelerator.device)
            values = self.accelerator.gather(local).nanmean(0).tolist()
        for name, value in zip(names, values, strict=True):
            if not math.isnan(value):  # e.g. gac/cos at the first step; TRL's log() would average a NaN in
                self._metrics[mode][name].append(value)
