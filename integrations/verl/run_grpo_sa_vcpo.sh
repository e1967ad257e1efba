#!/usr/bin/env bash
# GRPO with stable-async's VCPO loss, ESS-scaled LR and GAC (monitor) on veRL 0.9.1, FSDP2, one 8-GPU node.
# GAC compares each update_actor call (one rollout batch: 4 mini-batches of 64 x 8) with the previous one (no setting).
# Untested on GPU by the stable-async CI (only the config composition is checked on CPU:
# tests/trainers/test_verl_adapter.py). Prerequisites:
#   pip install "stable-async[verl]"   # registers loss modes sa_* in every veRL process (entry point)
#   data: veRL's GSM8K parquet files (python -m verl.examples.data_preprocess.gsm8k or your own)
# Override anything by appending hydra arguments: bash run_grpo_sa_vcpo.sh trainer.total_epochs=1
set -euo pipefail

MODEL=${MODEL:-Qwen/Qwen2.5-1.5B-Instruct}
DATA=${DATA:-$HOME/data/gsm8k}
NGPUS=${NGPUS:-8}
export STABLE_ASYNC_STRICT=${STABLE_ASYNC_STRICT:-1}   # a broken plugin aborts instead of logging

python3 -m verl.trainer.main_ppo \
    algorithm.adv_estimator=grpo \
    algorithm.use_kl_in_reward=false \
    algorithm.rollout_correction.rollout_is=sequence \
    algorithm.rollout_correction.rollout_is_threshold=8.0 \
    data.train_files="$DATA/train.parquet" \
    data.val_files="$DATA/test.parquet" \
    data.train_batch_size=256 \
    data.max_prompt_length=512 \
    data.max_response_length=1024 \
    actor_rollout_ref.model.path="$MODEL" \
    actor_rollout_ref.actor.strategy=fsdp2 \
    actor_rollout_ref.actor.ppo_mini_batch_size=64 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8 \
    actor_rollout_ref.actor.use_kl_loss=false \
    actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean \
    actor_rollout_ref.actor.policy_loss.loss_mode=sa_vcpo \
    actor_rollout_ref.actor.policy_loss._target_=stable_async.integrations.verl.SAPolicyLossConfig \
    '+actor_rollout_ref.actor.policy_loss.sa_kwargs={ratio_cap:8.0}' \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.optim.optimizer_impl=stable_async.integrations.verl \
    actor_rollout_ref.actor.optim.optimizer=StableAdamW \
    'actor_rollout_ref.actor.optim.override_optimizer_config={ess_rule:sqrt,gac:monitor}' \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.n=8 \
    actor_rollout_ref.rollout.calculate_log_probs=true \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=16 \
    actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.6 \
    actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=16 \
    trainer.n_gpus_per_node="$NGPUS" \
    trainer.nnodes=1 \
    trainer.logger='["console"]' \
    trainer.project_name=stable-async \
    trainer.experiment_name=grpo-sa-vcpo \
    trainer.total_epochs=15 \
    "$@"
