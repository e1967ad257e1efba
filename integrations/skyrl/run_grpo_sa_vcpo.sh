#!/usr/bin/env bash
# GRPO with stable-async's VCPO loss in SkyRL 0.3.0 (FSDP + vLLM: GPUs needed).
# SkyRL's own entry point imports the adapter (trainer.override_entrypoint), which registers every
# stable-async loss as sa_<name>; the policy_loss_type value alone then selects it in every worker.
# Append your usual SkyRL flags (model, data, placement, batch sizes); "$@" is passed through.
set -euo pipefail

LOSS="${LOSS:-sa_vcpo}"

python -m skyrl.train.entrypoints.main_base \
  trainer.override_entrypoint=stable_async.integrations.skyrl \
  trainer.algorithm.policy_loss_type="${LOSS}" \
  trainer.algorithm.loss_reduction=sequence_mean \
  trainer.algorithm.use_kl_loss=false \
  "trainer.algorithm.sa_kwargs={ratio_cap: 8.0}" \
  trainer.fully_async.max_staleness_steps=4 \
  "$@"
