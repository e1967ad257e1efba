#!/usr/bin/env bash
# OpenRLHF PPO/GRPO (Ray + vLLM + DeepSpeed) with stable-async's DPPO-Binary-TV loss, the
# ESS-scaled learning rate and gradient alignment control. For a GPU cluster: 8 GPUs, one node.
# Adjust the model, data and GPU counts; every OpenRLHF flag after `--` is OpenRLHF's own.
# Requires: pip install stable-async openrlhf[vllm] (OpenRLHF 0.11.2 was the version checked).
set -euo pipefail
cd "$(dirname "$0")"

python train_ppo_ray_sa.py \
  --sa.policy_loss dppo_binary_tv \
  --sa.loss_kwargs '{"delta_low": 0.15, "delta_high": 0.15}' \
  --sa.correction none \
  --sa.ess_lr '{"rule": "sqrt"}' \
  --sa.gac '{"mode": "project", "threshold": 0.5, "memory": "bf16"}' \
  -- \
  --ref.num_nodes 1 --ref.num_gpus_per_node 8 \
  --actor.num_nodes 1 --actor.num_gpus_per_node 8 \
  --vllm.num_engines 4 --vllm.tensor_parallel_size 2 \
  --train.colocate_all --train.async_enable \
  --actor.model_name_or_path "${MODEL:-Qwen/Qwen2.5-1.5B-Instruct}" \
  --data.prompt_dataset "${DATA:-OpenRLHF/prompt-collection-v0.1}" \
  --algo.advantage.estimator group_norm \
  --algo.advantage.is_correction_level token \
  --actor.loss_agg_mode token-mean \
  --ds.zero_stage 2 \
  "$@"
