"""TRL's asynchronous GRPO (``trl.experimental.async_grpo``) with a stable-async loss: `StableAsyncGRPOTrainer`.

    from stable_async.integrations.trl_async import StableAsyncGRPOTrainer
    trainer = StableAsyncGRPOTrainer(model=..., reward_funcs=..., args=AsyncGRPOConfig(...),
                                     policy_loss="dppo_binary_tv", ess_lr=True, gac=True)

The same class swap as `StableGRPOTrainer`, on ``AsyncGRPOTrainer.compute_loss`` (TRL 1.16): TRL's
tree-packed forward, then TRL's flat selection of trained tokens laid out as a (completions ×
tokens) `PolicyBatch`:

* ``old_log_probs``: the generator's (vLLM's) log-probs of each trained token. AsyncGRPO has no
  separate π_old: they are both π_old and the rollout policy μ (its ratio is π_θ/μ).
* ``advantages``: one per completion, repeated per token (``segment_id`` says which completion).
* Denominators: TRL divides the micro-batch's token sum by ``global_n_tokens / world_size`` and by
  the gradient-accumulation steps; the same is ``global_num_tokens = global_n_tokens · GA`` with
  ``dp_size = world_size`` (TRL's built-in loss = our ``ppo`` with ``aggregation="token-mean"``,
  the default here, with ε from ``epsilon`` / ``epsilon_high``).
* ``versions`` / ``current_version``: each completion's ``model_version`` (the number of weight
  syncs before the weights that generated it) and the trainer's ``model_version``, carried from
  TRL's queue reader into the collated batch by `stable_async.integrations.trl_async_versions`
  (TRL itself drops them after its ``max_staleness`` filter), so ``current_version − versions``
  is TRL's ``sample/staleness``. Losses that read versions (``decoupled_ppo`` with
  ``proximal="loglinear"``) run here.

TRL's metrics are kept under TRL's names (``ratio``, ``kl``, ``entropy``,
``clip_ratio/{low_mean,high_mean,region_mean,low_min,high_max}``; ε from the loss when it has
``eps_low`` / ``eps_high``), ours under ``stable_async/``; ESS-LR and GAC run through the same
`SteppedOptimizer` as `StableGRPOTrainer` (one `StepAccumulator` per trainer).

AsyncGRPO generates continuously and syncs weights every ``weight_sync_steps``: each optimizer
step trains on fresh samples, so there is no rollout batch reused over several steps and GAC
compares consecutive steps (no ``new_rollout_batch`` call is needed).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from typing import Any

import torch
from trl.experimental.async_grpo import AsyncGRPOTrainer

from stable_async.batch import PolicyBatch
from stable_async.integrations.options import correction_option, ess_lr_settings, gac_settings
from stable_async.integrations.stepping import SteppedOptimizer
from stable_async.integrations.trl_async_versions import carrying_versions, versions_of
from stable_async.integrations.trl_translation import clip_flags, metric_name
from stable_async.optim.accumulator import StepAccumulator
from stable_async.registry import Loss, get_loss

__all__ = ["StableAsyncGRPOTrainer", "segments_to_rows"]


def segments_to_rows(segment_id: torch.Tensor, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """TRL's flat per-token values (M,) as (S, L) rows, one per completion, plus the (S, L) bool mask.

    ``segment_id`` numbers the completion of each entry; the entries of one completion are
    contiguous and in token order (``TreeRow.pack``). The layout is differentiable (``index_put``).
    """
    count = segment_id.numel()
    rows = int(segment_id.max()) + 1 if count else 0
    lengths = torch.bincount(segment_id, minlength=rows)
    starts = torch.cumsum(lengths, 0) - lengths
    position = torch.arange(count, device=segment_id.device) - starts[segment_id]
    width = int(lengths.max()) if count else 0
    index = (segment_id, position)
    mask = torch.zeros(rows, width, dtype=torch.bool, device=segment_id.device).index_put(
        index, torch.ones(count, dtype=torch.bool, device=segment_id.device)
    )
    return (*(v.new_zeros(rows, width).index_put(index, v) for v in values), mask)


class StableAsyncGRPOTrainer(AsyncGRPOTrainer):
    """``AsyncGRPOTrainer`` with a stable-async policy loss, correction, ESS-scaled LR and GAC.

    Every ``AsyncGRPOTrainer`` argument is accepted; the extra keyword arguments are those of
    `stable_async.integrations.trl.StableGRPOTrainer`: ``policy_loss`` (default: ``ppo`` with TRL's
    ε and ``token-mean``, i.e. TRL's own loss), ``loss_kwargs``, ``correction`` (a correction on μ,
    or None / False: none; AsyncGRPO itself applies none), ``ess_lr``, ``gac``.
    """

    def __init__(
        self,
        *args: Any,
        policy_loss: str | Loss | None = None,
        loss_kwargs: Mapping[str, Any] | None = None,
        correction: Any = None,
        ess_lr: bool | Mapping[str, Any] | None = None,
        gac: bool | Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._sa_correction = correction_option(correction)
        self._sa_ess_lr_settings = ess_lr_settings(ess_lr)
        self._sa_gac_settings = gac_settings(gac)
        super().__init__(*args, **kwargs)
        self._sa_loss = self._sa_build_loss(policy_loss, dict(loss_kwargs or {}))
        self._sa_accumulator = StepAccumulator()
        self._sa_stepper: SteppedOptimizer | None = None

    def _sa_build_loss(self, policy_loss: str | Loss | None, loss_kwargs: dict[str, Any]) -> Loss:
        if isinstance(policy_loss, Loss):
            if loss_kwargs:
                raise TypeError("loss_kwargs: pass hyperparameters in get_loss(...) when policy_loss is a Loss object")
            loss = policy_loss
        elif policy_loss is None:
            settings = {"eps_low": self.epsilon_low, "eps_high": self.epsilon_high, "aggregation": "token-mean"}
            loss = get_loss("ppo", **{**settings, **loss_kwargs})
        elif isinstance(policy_loss, str):
            loss = get_loss(policy_loss, **loss_kwargs)
        else:
            raise TypeError(f"policy_loss: expected a loss name, a stable_async.Loss or None, got {policy_loss!r}")
        if loss.needs_topk:
            raise ValueError(
                f"policy_loss: {loss.name!r} needs top-K log-probs, which AsyncGRPO's batch does not carry"
            )
        if self._sa_correction not in (None, False):
            if loss.config.correction is not None:
                raise ValueError("correction: the policy_loss already has a correction in its config; pass it once")
            loss = get_loss(loss.name, config=dataclasses.replace(loss.config, correction=self._sa_correction))
        return loss

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        """TRL's optimizer, wrapped so that each ``step()`` is our `StableStep` (see `SteppedOptimizer`)."""
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        if not isinstance(optimizer, SteppedOptimizer):
            self._sa_stepper = SteppedOptimizer(
                optimizer,
                self._sa_accumulator,
                ess_lr=self._sa_ess_lr_settings,
                gac=self._sa_gac_settings,
                on_metrics=self._sa_log,
            )
            self.optimizer = optimizer = self._sa_stepper
        return optimizer

    def get_train_dataloader(self) -> Any:
        """TRL's dataloader, its queue reader and collator also carrying the policy versions."""
        with carrying_versions(lambda: self.model_version):
            return super().get_train_dataloader()

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch=None):
        """TRL's tree-packed forward; our loss on the trained tokens laid out per completion."""
        log_probs, entropy, aux_loss = self._sa_forward(model, inputs)
        selected = inputs["token_index"] >= 0
        old = inputs["old_log_probs"][selected]
        logps, old_rows, adv_rows, mask = segments_to_rows(
            inputs["segment_id"][selected], log_probs, old.to(log_probs.dtype), inputs["advantages"][selected]
        )
        steps = self.current_gradient_accumulation_steps
        world = self.accelerator.num_processes
        versions, current = versions_of(inputs, mask.shape[0])
        batch = PolicyBatch(
            logprobs=logps,
            advantages=adv_rows,
            mask=mask,
            old_logprobs=old_rows,
            rollout_logprobs=old_rows,
            global_num_tokens=max(float(inputs["global_n_tokens"][0]), float(world)) * steps,
            global_num_seqs=float(mask.shape[0] * world * steps),
            dp_size=world,
            versions=versions.to(mask.device) if versions is not None else None,
            current_version=current,
        )
        out = self._sa_loss(batch)
        loss = out.loss
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / steps
        self._sa_accumulator.record(batch)
        self._sa_log_trl_metrics(batch, entropy)
        self._sa_log(out.metrics)
        self._sa_account(inputs)
        return loss

    def _sa_forward(self, model: Any, inputs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """TRL's packed forward (AsyncGRPOTrainer.compute_loss, TRL 1.16): trained tokens' log-probs, entropy."""
        mask_bool = inputs["attention_mask"].bool()
        selected = inputs["token_index"] >= 0
        tree = {
            key: inputs[key][inputs[key] >= 0] for key in ("tree_kv_index", "tree_cu_seqlens_q", "tree_cu_seqlens_k")
        }
        tree["tree_max_seqlen_q"], tree["tree_max_seqlen_k"] = inputs["tree_max_seqlens"][0].tolist()
        start = time.time()
        outputs = model(
            input_ids=inputs["input_ids"][mask_bool].unsqueeze(0),
            position_ids=inputs["position_ids"][mask_bool].unsqueeze(0),
            shift_labels=inputs["shift_labels"][mask_bool].unsqueeze(0),
            fused_lm_head=True,
            **({"output_router_logits": True} if self.aux_loss_enabled else {}),
            **tree,
        )
        token_index = inputs["token_index"][selected]
        self._last_forward_time_s = time.time() - start
        aux = outputs.aux_loss if self.aux_loss_enabled else None
        return outputs.log_probs.flatten()[token_index], outputs.entropy.flatten()[token_index], aux

    def _sa_log_trl_metrics(self, batch: PolicyBatch, entropy: torch.Tensor) -> None:
        """TRL's ``ratio``, ``kl``, ``entropy`` and ``clip_ratio/*`` (token means over all ranks), as TRL forms them."""
        config = self._sa_loss.config
        has_eps = hasattr(config, "eps_low") and hasattr(config, "eps_high")
        with torch.no_grad():
            log_ratio = batch.logprobs.detach() - batch.old_logprobs
            low, high = clip_flags(
                log_ratio,
                batch.advantages[:, 0] if batch.advantages.dim() == 2 else batch.advantages,
                batch.mask,
                eps_low=config.eps_low if has_eps else self.epsilon_low,
                eps_high=config.eps_high if has_eps else self.epsilon_high,
                level="token",
            )
            m = batch.mask
            ratio = torch.exp(log_ratio)
            sums = torch.stack(
                [
                    (ratio * m).sum(),
                    ((ratio - 1 - log_ratio) * m).sum(),
                    entropy.detach().float().sum(),
                    (low & m).sum(),
                    (high & m).sum(),
                    ((low | high) & m).sum(),
                    m.sum(),
                ]
            ).to(torch.float64)
            sums = self.accelerator.reduce(sums, reduction="sum").tolist()
            count = max(sums[-1], 1.0)
            sink = self._metrics["train"]
            for name, total in zip(("ratio", "kl", "entropy"), sums[:3], strict=True):
                sink[name].append(total / count)
            for name, total in zip(("low_mean", "high_mean", "region_mean"), sums[3:6], strict=True):
                sink[f"clip_ratio/{name}"].append(total / count)
            lengths = m.sum(-1).clamp(min=1)
            for name, flags, reduce in (("low_min", low, torch.min), ("high_max", high, torch.max)):
                per_seq = (flags & m).sum(-1) / lengths  # every completion has a trained token
                local = reduce(per_seq) if per_seq.numel() else per_seq.new_tensor(math.nan)
                sink[f"clip_ratio/{name}"].append(reduce(self.accelerator.gather(local.reshape(1))).item())

    def _sa_account(self, inputs: Mapping[str, Any]) -> None:
        """TRL's per-step accounting (flushed by ``_log_step_metrics``)."""
        forward_tokens, mean_len = float(inputs["global_n_forward_tokens"][0]), float(inputs["mean_seq_len"][0])
        self._step_forward_tokens += forward_tokens
        self._step_trained_tokens += float(inputs["global_n_tokens"][0])
        self._step_seq_len_weighted += mean_len * forward_tokens
        self._step_samples += forward_tokens / mean_len
        self._step_forward_s += self._last_forward_time_s

    def _sa_log(self, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            translated = metric_name(name)
            if translated is not None and not math.isnan(float(value)):
                self._metrics["train"][translated].append(float(value))
