"""veRL's real actor worker on a CPU, for tests (importable as ``verl_worker``; run as a script per scenario).

`build_worker` does what a veRL job does, on one CPU process: registers stable-async's CPU
platform in veRL's platform registry (``VERL_PLATFORM=cpu``), composes veRL's own Hydra config
``ppo_trainer`` with our documented overrides, runs veRL's ``validate_config``, opens a gloo
process group on 127.0.0.1 and builds ``verl.workers.engine_workers.ActorRolloutRefWorker(...,
role="actor")`` (the worker veRL 0.9.1's trainers use), then ``init_model()``. `rollout_batch`
builds a batch the way ``RayPPOTrainer._update_actor`` hands it to ``update_actor``: left-padded
prompts, right-padded responses, converted by veRL's ``left_right_2_no_padding``, with the
trainer's non-tensor keys.

Each scenario runs in its own process (veRL's platform and the process group are per process)
and writes a JSON summary: ``python verl_worker.py SCENARIO MODEL_DIR OUT.json``; tests start one
with `run_in_process` (also for ``verl_worker_v1.py``, whose scenarios reuse these helpers).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import sys
import time
from typing import Any

import torch

PROMPT_LEN = 3
RESPONSE_LEN = 5
BATCH = 4
VOCAB = 32
TOPK = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


SGD = [
    "actor_rollout_ref.actor.optim.optimizer=SGD",
    "actor_rollout_ref.actor.optim.weight_decay=0.0",
    "actor_rollout_ref.actor.optim.lr=0.1",
]
"""veRL's ``torch.optim.SGD`` (the update is lr · clipped gradient: parity of parameters is parity of gradients)."""


def worker_overrides(
    model_path: str, *, loss_mode: str = "vanilla", mini_batch: int = BATCH, extra: tuple[str, ...] = ()
) -> list[str]:
    """Our documented overrides for a one-process CPU actor (docs/integrations/verl.md), then ``extra``."""
    return [
        f"actor_rollout_ref.model.path={model_path}",
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "actor_rollout_ref.actor.strategy=fsdp2",
        "actor_rollout_ref.actor.use_torch_compile=false",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={mini_batch}",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.actor.clip_ratio_low=0.2",
        "actor_rollout_ref.actor.clip_ratio_high=0.28",
        "actor_rollout_ref.actor.optim.lr=0.01",
        f"actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode}",
        "actor_rollout_ref.actor.policy_loss._target_=stable_async.integrations.verl.SAPolicyLossConfig",
        "actor_rollout_ref.rollout.n=1",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
        f"data.train_batch_size={BATCH}",
        "trainer.n_gpus_per_node=1",
        *extra,
    ]


def compose(overrides: list[str]) -> Any:
    """veRL's ``ppo_trainer`` config with ``overrides``, checked by veRL's ``validate_config``."""
    import verl
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from verl.utils.config import validate_config

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        config = hydra_compose(config_name="ppo_trainer", overrides=overrides)
    validate_config(config, use_reference_policy=False, use_critic=False)
    return config


def build_worker(overrides: list[str]) -> tuple[Any, Any]:
    """(worker after ``init_model()``, composed config) for a one-process CPU run."""
    os.environ.update(VERL_PLATFORM="cpu", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    import torch.distributed as dist

    import stable_async.integrations.verl  # noqa: F401  (the losses; `import verl` loads the plugin too)
    from stable_async.integrations import verl_cpu

    verl_cpu.register()
    config = compose(overrides)
    if not dist.is_initialized():
        verl_cpu.init_process_group()
    from verl.workers.engine_workers import ActorRolloutRefWorker

    worker = ActorRolloutRefWorker(config.actor_rollout_ref, role="actor")
    worker.init_model()
    return worker, config


def actor_config(config: Any, **changes: Any) -> Any:
    """The worker's ``ActorConfig`` (``omega_conf_to_dataclass`` of ``actor_rollout_ref.actor``) with changes."""
    from omegaconf import OmegaConf, open_dict
    from verl.utils.config import omega_conf_to_dataclass

    actor = OmegaConf.create(OmegaConf.to_container(config.actor_rollout_ref.actor, resolve=True))
    with open_dict(actor):
        for key, value in changes.items():
            OmegaConf.update(actor, key, value, force_add=True)
    return omega_conf_to_dataclass(actor)


def rollout_batch(
    seed: int,
    *,
    mini_batch: int = BATCH,
    epochs: int = 1,
    topk: bool = False,
    model: Any = None,
    version_base: int | None = None,
    current_param_version: int | None = None,
    shuffle: bool = False,
):
    """A rollout batch as ``RayPPOTrainer._update_actor`` passes it to ``update_actor`` (no-padding TensorDict).

    Random prompts/responses of random lengths; ``old_log_probs`` around log(1/V) (the untrained
    model's); ``rollout_log_probs`` = old + noise; advantages constant per sequence. ``topk``: ``rollout_topk_ids`` /
    ``rollout_topk_logprobs`` (B, T, K) from ``model`` (the rollout policy), the sampled token
    among the K, and ``distillation_use_topk=True`` so veRL's engine calls the logits processor.
    ``version_base``: veRL's per-trajectory ``min_global_steps`` / ``max_global_steps`` (non-tensor,
    as ``DataProto.to_tensordict`` stores the agent loop's), ``version_base`` + the response length,
    so a row's version tells which row it is. ``current_param_version``: that non-tensor key.
    """
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    g = torch.Generator().manual_seed(seed)
    B, P, T = BATCH, PROMPT_LEN, RESPONSE_LEN
    ids = torch.zeros(B, P + T, dtype=torch.long)
    attention = torch.zeros(B, P + T, dtype=torch.long)
    responses = torch.zeros(B, T, dtype=torch.long)
    response_mask = torch.zeros(B, T, dtype=torch.long)
    for i in range(B):
        p = int(torch.randint(1, P + 1, (1,), generator=g))
        r = T if i == 0 else int(torch.randint(1, T + 1, (1,), generator=g))
        ids[i, P - p : P] = torch.randint(3, VOCAB, (p,), generator=g)
        responses[i, :r] = torch.randint(3, VOCAB, (r,), generator=g)
        ids[i, P : P + r] = responses[i, :r]
        attention[i, P - p : P + r] = 1
        response_mask[i, :r] = 1
    mask = response_mask.float()
    old = (-math.log(VOCAB) + 0.3 * torch.randn(B, T, generator=g)) * mask  # the tiny model's π_θ ≈ uniform
    tensors = {
        "input_ids": ids,
        "attention_mask": attention,
        "position_ids": (attention.cumsum(-1) - 1).clamp(min=0),
        "prompts": ids[:, :P].clone(),
        "responses": responses,
        "response_mask": response_mask,
        "old_log_probs": old,
        "rollout_log_probs": (old + 0.2 * torch.randn(B, T, generator=g)) * mask,
        "advantages": (torch.randn(B, 1, generator=g) * mask).contiguous(),
    }
    if topk:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attention).logits[:, P - 1 : P + T - 1].float()
        logp = torch.log_softmax(logits, dim=-1)
        top = logp.topk(TOPK, dim=-1).indices
        has = (top == responses[..., None]).any(-1, keepdim=True)
        top = torch.cat([top[..., :-1], torch.where(has, top[..., -1:], responses[..., None])], dim=-1)
        tensors["rollout_topk_ids"] = top * response_mask[..., None]
        tensors["rollout_topk_logprobs"] = logp.gather(-1, top) * mask[..., None]
        tensors["rollout_log_probs"] = logp.gather(-1, responses[..., None])[..., 0] * mask
    if version_base is not None:
        from tensordict.tensorclass import NonTensorData, NonTensorStack

        versions = (version_base + response_mask.sum(-1)).tolist()
        for key in ("min_global_steps", "max_global_steps"):
            tensors[key] = NonTensorStack.from_list([NonTensorData(v) for v in versions])
    data = left_right_2_no_padding(tu.get_tensordict(tensor_dict=tensors, non_tensor_dict={}))
    if current_param_version is not None:
        tu.assign_non_tensor(data, current_param_version=current_param_version)
    return training_keys(data, mini_batch=mini_batch, epochs=epochs, topk=topk, shuffle=shuffle)


def training_keys(data: Any, *, mini_batch: int, epochs: int, topk: bool = False, shuffle: bool = False) -> Any:
    """``data`` with the trainer's non-tensor keys for ``update_actor`` (mini-batch split, epochs, shuffling)."""
    from verl.utils import tensordict_utils as tu

    tu.assign_non_tensor(
        data,
        calculate_entropy=False,
        distillation_use_topk=topk,
        distillation_only=False,
        global_batch_size=mini_batch,
        mini_batch_size=mini_batch,
        epochs=epochs,
        seed=42,
        dataloader_kwargs={"shuffle": shuffle},
        compute_loss=True,
        temperature=1.0,
    )
    return data


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 (DTensor) shard; a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def parameters(worker: Any) -> list[torch.Tensor]:
    """The actor's parameters (full tensors, fp32 copies), in a fixed order."""
    return [full_tensor(p).detach().float().clone() for _, p in sorted(worker.actor.engine.module.named_parameters())]


def observe_steps(optimizer: Any, before: Any = None) -> list[dict[str, Any]]:
    """Wraps ``optimizer.step``; the returned list gets each step's ``last_metrics`` (``before()`` runs first)."""
    records: list[dict[str, Any]] = []
    inner_step = optimizer.step

    def observed_step(*args: Any, **kwargs: Any) -> Any:
        if before is not None:
            before()
        result = inner_step(*args, **kwargs)
        records.append(dict(optimizer.last_metrics))
        return result

    optimizer.step = observed_step
    return records


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def update(worker: Any, data: Any) -> tuple[dict[str, Any], float]:
    """``worker.update_actor(data)``: (its metrics as plain floats / lists, seconds)."""
    from verl.utils import tensordict_utils as tu

    start = time.perf_counter()
    output = worker.update_actor(data)
    seconds = time.perf_counter() - start
    metrics = {}
    for key, value in tu.get(output, "metrics").items():
        values = value if isinstance(value, list) else [value]
        metrics[key] = [float(v) for v in values]
    return metrics, seconds


class LossSpy:
    """Records every call of the registered policy losses veRL's ``ppo_loss`` looks up (name, loss value)."""

    def __init__(self) -> None:
        from verl.trainer.ppo import core_algos

        self.calls: list[tuple[str, float, bool]] = []
        self.log_weights: list[torch.Tensor] = []  # per training call: λ_i = Σ_t m·(log π_θ − old) per sequence
        self._registry = core_algos.POLICY_LOSS_REGISTRY
        for name, fn in list(self._registry.items()):
            self._registry[name] = self._wrap(name, fn)

    def _wrap(self, name: str, fn: Any) -> Any:
        def spy(*args: Any, **kwargs: Any) -> Any:
            loss, metrics = fn(*args, **kwargs)
            log_prob, old, mask = kwargs["log_prob"], kwargs["old_log_prob"], kwargs["response_mask"].bool()
            self.calls.append((name, float(loss.detach()), bool(log_prob.requires_grad)))
            if log_prob.requires_grad:
                lam = ((log_prob.detach() - old) * mask).sum(-1).double()
                self.log_weights.append(lam[mask.any(-1)])
            return loss, metrics

        spy.__dict__.update(fn.__dict__)
        return spy

    def take(self) -> list[tuple[str, float, bool]]:
        calls, self.calls = self.calls, []
        return calls


# --------------------------------------------------------------------------- scenarios
def scenario_losses(model_path: str) -> dict[str, Any]:
    """veRL's SGD; vanilla vs sa_ppo parity after each update (and a control); every sa_ loss through set_loss_fn."""
    from functools import partial

    from verl.workers.utils.losses import ppo_loss as verl_ppo_loss

    import stable_async as sa
    from stable_async.integrations import verl as adapter

    timings: dict[str, float] = {}
    start = time.perf_counter()
    worker, config = build_worker(worker_overrides(model_path, extra=tuple(SGD)))
    timings["build_and_init_model"] = time.perf_counter() - start
    spy = LossSpy()
    engine = worker.actor.engine
    out: dict[str, Any] = {"optimizer": type(engine.optimizer).__module__ + "." + type(engine.optimizer).__name__}
    initial = parameters(worker)

    def run(steps: int) -> tuple[list[list[torch.Tensor]], list[dict[str, Any]], list[Any]]:
        params, metrics, calls = [], [], []
        for step in range(steps):
            m, seconds = update(worker, rollout_batch(step))
            timings[f"update_{len(timings)}"] = seconds
            params.append(parameters(worker))
            metrics.append(m)
            calls.append(spy.take())
        return params, metrics, calls

    steps = 3
    vanilla_params, vanilla_metrics, vanilla_calls = run(steps)
    start = time.perf_counter()
    worker.actor.reset()  # veRL's own reset: rebuild the engine from the checkpoint on disk
    timings["reset"] = time.perf_counter() - start
    out["reset_restores_initial"] = max_diff(parameters(worker), initial)
    worker.set_loss_fn(partial(verl_ppo_loss, config=actor_config(config, **{"policy_loss.loss_mode": "sa_ppo"})))
    sa_params, sa_metrics, sa_calls = run(steps)
    # Control: sa_ppo with other clip bounds (0.1 / 0.2 instead of veRL's 0.2 / 0.28) must differ.
    worker.actor.reset()
    control = {"policy_loss.loss_mode": "sa_ppo", "policy_loss.sa_kwargs": {"eps_low": 0.1, "eps_high": 0.2}}
    worker.set_loss_fn(partial(verl_ppo_loss, config=actor_config(config, **control)))
    control_params, _, _ = run(steps)
    out["parity"] = {
        "control_param_diff": [max_diff(a, b) for a, b in zip(vanilla_params, control_params, strict=True)],
        "max_param_diff": [max_diff(a, b) for a, b in zip(vanilla_params, sa_params, strict=True)],
        "max_param_change": [max_diff(a, initial) for a in vanilla_params],
        "pg_loss": [[m["actor/pg_loss"] for m in ms] for ms in (vanilla_metrics, sa_metrics)],
        "calls": [sorted({c[0] for cs in calls for c in cs}) for calls in (vanilla_calls, sa_calls)],
    }

    losses: dict[str, Any] = {}
    reference_model = None
    for i, name in enumerate(sa.available_losses()):
        loss = sa.get_loss(name)
        topk = loss.needs_topk  # the registry says which losses read the rollout top-K
        # A loss that reads μ with neither an anchor setting nor π_old to fall back on (prime_rl) needs
        # veRL's rollout_log_probs, which only our ppo_loss (set_loss_fn) carries to it.
        fields = {f.name for f in dataclasses.fields(loss.config)}
        needs_mu = "rollout_logprobs" in loss.requires and not {"old_logprobs", "anchor"} & (loss.requires | fields)
        changes = {"policy_loss.loss_mode": f"{adapter.PREFIX}{name}"}
        loss_fn = adapter.ppo_loss if topk or needs_mu else verl_ppo_loss
        worker.set_loss_fn(partial(loss_fn, config=actor_config(config, **changes)))
        if topk and reference_model is None:
            from transformers import AutoModelForCausalLM

            reference_model = AutoModelForCausalLM.from_pretrained(model_path).eval()
        before = parameters(worker)
        metrics, seconds = update(worker, rollout_batch(100 + i, topk=topk, model=reference_model))
        timings[f"update_sa_{name}"] = seconds
        calls = spy.take()
        losses[name] = {
            "called": sorted({c[0] for c in calls}),
            "train_call_losses": [c[1] for c in calls if c[2]],
            "pg_loss": metrics.get("actor/pg_loss"),
            "metric_keys": sorted(metrics),
            "param_change": max_diff(parameters(worker), before),
            "finite": all(math.isfinite(v) for vs in metrics.values() for v in vs),
        }
    out["losses"] = losses
    out["timings"] = timings
    return out


def scenario_optimizer(model_path: str) -> dict[str, Any]:
    """StableAdamW (ESS-LR + GAC monitor) and sa_vcpo; 2 optimizer steps per update_actor (mini-batches of 2).

    Updates 1 and 2 through veRL's own ppo_loss (the config-only path; μ = old_log_probs), update
    3 through stable-async's ppo_loss (set_loss_fn); the stable-async hook on ``update_actor``
    starts a rollout batch for GAC at each call in both. Every optimizer step is observed
    (gradients as GAC sees them, after veRL's clipping, and the step's metrics) by wrapping the
    engine optimizer's ``step``.
    """
    from functools import partial

    import stable_async as sa
    from stable_async.integrations import verl as adapter

    options = "{ess_rule:sqrt,gac:monitor,gac_threshold:0.5}"
    extra = (
        "actor_rollout_ref.actor.optim.optimizer_impl=stable_async.integrations.verl",
        "actor_rollout_ref.actor.optim.optimizer=StableAdamW",
        f"actor_rollout_ref.actor.optim.override_optimizer_config={options}",
    )
    timings: dict[str, float] = {}
    start = time.perf_counter()
    worker, config = build_worker(worker_overrides(model_path, loss_mode="sa_vcpo", mini_batch=2, extra=extra))
    timings["build_and_init_model"] = time.perf_counter() - start
    spy = LossSpy()
    optimizer = worker.actor.engine.optimizer
    grads: list[torch.Tensor] = []

    def record_gradient() -> None:
        named = sorted(worker.actor.engine.module.named_parameters())
        grads.append(torch.cat([full_tensor(p.grad).reshape(-1).double() for _, p in named]))

    steps = observe_steps(optimizer, before=record_gradient)
    out: dict[str, Any] = {
        "optimizer": f"{type(optimizer).__module__}.{type(optimizer).__name__}",
        "inner": f"{type(optimizer.optimizer).__module__}.{type(optimizer.optimizer).__name__}",
        "gac_mode": optimizer.gac.mode if optimizer.gac is not None else None,
    }
    worker_metrics = []
    for update_index in range(3):
        if update_index == 2:
            worker.set_loss_fn(partial(adapter.ppo_loss, config=actor_config(config)))
        m, seconds = update(worker, rollout_batch(update_index, mini_batch=2))
        timings[f"update_{update_index}"] = seconds
        worker_metrics.append(sorted(m))
    log_weights = spy.log_weights[:2]  # update 1: 2 steps, 1 micro-batch each (mini-batch 2, micro 2)
    out["expected_ess_ratio"] = [
        sa.effective_sample_size(torch.cat(log_weights[i : i + 1])).ess_ratio for i in range(len(log_weights))
    ]
    out["calls_per_update"] = len(spy.calls)
    out["steps"] = steps
    dot = [[float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for b in grads] for a in grads]
    out["grad_cosines"] = dot
    out["worker_metric_keys"] = worker_metrics
    out["timings"] = timings
    return out


class NoCheckpointEngine:
    """veRL's checkpoint-engine protocol for ``update_weights``: takes the weights, sends them nowhere (no rollout)."""

    def __init__(self) -> None:
        self.sent: list[int | None] = []

    async def send_weights(self, weights: Any, global_steps: int | None = None) -> dict[str, float]:
        for _ in weights:
            pass
        self.sent.append(global_steps)
        return {}


class PolicyBatchSpy:
    """Records every training call's PolicyBatch where the adapter hands it to the optimizer (``verl_optim.record``).

    Per call: row versions, current version, response lengths (the mask's row sums), under the
    label of the last `begin`.
    """

    def __init__(self) -> None:
        from stable_async.integrations import verl_optim

        self.runs: list[dict[str, Any]] = []
        self._module = verl_optim
        self._record = verl_optim.record
        verl_optim.record = self._spy

    def begin(self, label: str) -> None:
        self.runs.append({"label": label, "calls": []})

    def _spy(self, batch: Any) -> None:
        self.runs[-1]["calls"].append(
            {
                "versions": None if batch.versions is None else batch.versions[:, 0].tolist(),
                "current": batch.current_version,
                "lengths": batch.mask.sum(-1).tolist(),
            }
        )
        self._record(batch)

    def restore(self) -> None:
        self._module.record = self._record


def scenario_versions(model_path: str) -> dict[str, Any]:
    """veRL's per-trajectory versions into PolicyBatch.versions, on the config-only path and through ppo_loss.

    Mini-batches of 2, 2 PPO epochs, shuffled: each row's version (100 + its response length)
    must stay with its row. Every training-call PolicyBatch is recorded (`PolicyBatchSpy`).
    """
    import asyncio
    from functools import partial

    from stable_async.integrations import verl as adapter

    worker, config = build_worker(worker_overrides(model_path, loss_mode="sa_ppo", mini_batch=2,
                                                   extra=("actor_rollout_ref.actor.ppo_epochs=2",)))  # fmt: skip
    spy = PolicyBatchSpy()
    out: dict[str, Any] = {}

    def run(label: str, data: Any) -> dict[str, Any]:
        spy.begin(label)
        metrics, _ = update(worker, data)
        return metrics

    run("config_only", rollout_batch(0, mini_batch=2, epochs=2, version_base=100, current_param_version=105,
                                     shuffle=True))  # fmt: skip
    run("no_versions", rollout_batch(1, mini_batch=2, epochs=2, current_param_version=105, shuffle=True))
    run("no_current", rollout_batch(2, mini_batch=2, epochs=2, version_base=100, shuffle=True))
    engine = NoCheckpointEngine()
    worker.checkpoint_engine = engine
    asyncio.run(worker.update_weights(global_steps=107, mode="no_checkpoint_engine"))
    out["sent"] = engine.sent
    run("after_weight_sync", rollout_batch(3, mini_batch=2, epochs=2, version_base=100, shuffle=True))
    changes = {"policy_loss.loss_mode": "sa_decoupled_ppo", "policy_loss.sa_kwargs": {"proximal": "loglinear"}}
    worker.set_loss_fn(partial(adapter.ppo_loss, config=actor_config(config, **changes)))
    metrics = run("loglinear_ppo_loss", rollout_batch(4, mini_batch=2, epochs=2, version_base=100,
                                                      current_param_version=106, shuffle=True))  # fmt: skip
    out["loglinear_alpha_mean"] = metrics.get("actor/prox_alpha_mean")
    out["runs"] = spy.runs
    return out


def policy_rollout_batch(
    policy: Any, seed: int, *, prompts: int = 2, n: int = 4, mini_batch: int = 2, epochs: int = 1
) -> Any:
    """A synchronous rollout batch: ``n`` responses per prompt sampled from ``policy`` (the actor's current weights).

    ``old_log_probs`` = ``rollout_log_probs`` = the policy's log-probs of the sampled tokens;
    reward = the fraction of response tokens in the lower half of the vocabulary, advantages
    normalized per prompt group (GRPO). Every prompt has ``PROMPT_LEN`` tokens, every response
    ``RESPONSE_LEN``.
    """
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    g = torch.Generator().manual_seed(seed)
    P, T = PROMPT_LEN, RESPONSE_LEN
    prompt = torch.randint(3, VOCAB, (prompts, P), generator=g).repeat_interleave(n, dim=0)
    torch.manual_seed(seed)
    with torch.no_grad():
        ids = policy.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0,
                              max_new_tokens=T, min_new_tokens=T, pad_token_id=0, eos_token_id=None)  # fmt: skip
        logp = torch.log_softmax(policy(input_ids=ids).logits[:, P - 1 : P + T - 1].float(), dim=-1)
    responses = ids[:, P:]
    old = logp.gather(-1, responses[..., None])[..., 0]
    reward = (responses < VOCAB // 2).float().mean(-1).view(prompts, n)
    advantages = ((reward - reward.mean(-1, keepdim=True)) / (reward.std(-1, keepdim=True) + 1e-6)).view(-1, 1)
    mask = torch.ones_like(responses)
    tensors = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "position_ids": torch.arange(P + T).expand_as(ids).contiguous(),
        "prompts": prompt,
        "responses": responses,
        "response_mask": mask,
        "old_log_probs": old,
        "rollout_log_probs": old.clone(),
        "advantages": (advantages * mask).contiguous(),
    }
    data = left_right_2_no_padding(tu.get_tensordict(tensor_dict=tensors, non_tensor_dict={}))
    return training_keys(data, mini_batch=mini_batch, epochs=epochs)


GAC_SYNC_UPDATES = 8
GAC_SYNC_SETTINGS = {"distinct_mini_batches": (2, 1), "batch_reused": (8, 2)}
"""(mini-batch size, PPO epochs) per update_actor call on a batch of 8: 4 steps on 4 different mini-batches,
or 2 steps on the whole batch (veRL's ``ppo_epochs=2`` with one mini-batch: TRL's ``num_iterations=2``)."""


def scenario_gac_sync(model_path: str, updates: int = GAC_SYNC_UPDATES) -> dict[str, Any]:
    """GAC's default settings (project, τ = 0.5, λ = 1) on a synchronous run through veRL's real worker.

    ``sa_ppo``, ``StableAdamW`` with ``gac: project`` and nothing else set; each update_actor call
    gets a batch of 8 sampled from the actor's current weights (`policy_rollout_batch`), split as
    each of `GAC_SYNC_SETTINGS` says. Per setting, two runs from the same weights (veRL's
    ``reset``) and seeds: ``rule``, the default (a rollout batch per update_actor call, from the
    stable-async hook), and ``control``, ``gac_rollout_batch_steps=1`` (every step its own batch:
    GAC compares consecutive steps, also those on the same rollout batch). Per run, over the steps
    with a cosine: the mean ``gac/removed_frac`` (squared-norm fraction removed), the mean
    gradient-norm fraction removed (1 − sqrt(1 − removed_frac)), the fraction of steps projected,
    the mean cosine.
    """
    from transformers import AutoModelForCausalLM

    extra = (
        "actor_rollout_ref.actor.optim.optimizer_impl=stable_async.integrations.verl",
        "actor_rollout_ref.actor.optim.optimizer=StableAdamW",
        "actor_rollout_ref.actor.optim.override_optimizer_config={gac:project}",
        "actor_rollout_ref.actor.optim.lr=0.003",
    )
    worker, _ = build_worker(worker_overrides(model_path, loss_mode="sa_ppo", mini_batch=2, extra=extra))
    policy = AutoModelForCausalLM.from_pretrained(model_path).eval()
    out: dict[str, Any] = {"updates": updates}
    for setting, (mini_batch, epochs) in GAC_SYNC_SETTINGS.items():
        out[setting] = {"steps_per_update": 8 // mini_batch * epochs}
        for label in ("rule", "control"):
            worker.actor.reset()
            optimizer = worker.actor.engine.optimizer
            if label == "control":
                optimizer.gac_rollout_batch_steps = 1  # what override_optimizer_config={gac_rollout_batch_steps:1} sets
                optimizer.new_rollout_batch()
            records = observe_steps(optimizer)
            for u in range(updates):
                current = worker.actor.engine.module.named_parameters()
                policy.load_state_dict({name: full_tensor(p).detach() for name, p in current}, strict=False)
                update(worker, policy_rollout_batch(policy, 1000 + u, mini_batch=mini_batch, epochs=epochs))
            rows = [r for r in records if "gac/cos" in r]
            removed = [r["gac/removed_frac"] for r in rows]
            out[setting][label] = {
                "steps": len(records),
                "steps_with_cos": len(rows),
                "mean_removed_frac": sum(removed) / len(rows),
                "mean_norm_removed": sum(1.0 - math.sqrt(max(1.0 - f, 0.0)) for f in removed) / len(rows),
                "projected_frac": sum(r["gac/action"] == 1.0 for r in rows) / len(rows),
                "mean_cos": sum(r["gac/cos"] for r in rows) / len(rows),
            }
    return out


SCENARIOS = {
    "losses": scenario_losses,
    "optimizer": scenario_optimizer,
    "versions": scenario_versions,
    "gac_sync": scenario_gac_sync,
}


def calls_by_label(result: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """A scenario's `PolicyBatchSpy` runs: label → its recorded training calls."""
    return {run["label"]: run["calls"] for run in result["runs"]}


def loglinear_alpha_means(calls: list[dict[str, Any]]) -> list[float]:
    """By hand, per training call: the token mean of ``sa_decoupled_ppo(proximal="loglinear")``'s α.

    `sa_testing.loglinear_alpha_mean` of the call's recorded versions v_μ, current version v and
    response lengths (`PolicyBatchSpy`).
    """
    from sa_testing import loglinear_alpha_mean

    return [loglinear_alpha_mean(call["versions"], call["current"], call["lengths"]) for call in calls]


def run_in_process(script: str, scenario: str, model_path: str, out_dir: Any, *args: str, timeout: float) -> Any:
    """``python script scenario model_path out_dir/result.json *args`` in a fresh process; its JSON summary.

    The process gets this checkout's ``src`` and ``tests`` first on ``PYTHONPATH``, offline Hugging Face, one thread.
    """
    import subprocess

    import stable_async

    out = os.path.join(str(out_dir), "result.json")
    src = os.path.dirname(os.path.dirname(os.path.abspath(stable_async.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([src, os.path.dirname(os.path.abspath(__file__)), env.get("PYTHONPATH", "")])
    env.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TRL_EXPERIMENTAL_SILENCE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, script, scenario, model_path, out, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"scenario {scenario!r} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    with open(out) as f:
        return json.load(f)


def main(argv: list[str], scenarios: dict[str, Any] | None = None) -> None:
    """``SCENARIO MODEL_DIR OUT.json [UPDATES]``; MODEL_DIR ``tiny``: build the tiny offline model in a temp dir."""
    scenario, model_path, out_path, *rest = argv
    torch.set_num_threads(1)
    if model_path == "tiny":
        import tempfile

        from sa_testing import tiny_causal_lm

        model_path = tiny_causal_lm(tempfile.mkdtemp(prefix="verl-tiny-"))[0]
    kwargs = {"updates": int(rest[0])} if rest else {}
    result = (scenarios or SCENARIOS)[scenario](model_path, **kwargs)
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1:])
