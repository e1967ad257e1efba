"""Helpers for tests that drive TRL's real GRPOTrainer on a tiny offline model (importable as ``trl_helpers``).

Rollouts come from a ``rollout_func`` returning random completions and "engine" log-probs, so no
generation backend is needed; with ``topk=K`` the engine is a lagged policy (the initial weights),
which also reports its top-K ids and log-probs per token (the keys the top-K losses read).
``pretend_vllm`` makes TRL believe those completions came from vLLM (with a no-op weight sync), so
TRL computes its old log-probs and its IS ratio itself.
"""

from __future__ import annotations

import torch

PROMPTS = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10"]
GROUP = 4
MAX_COMPLETION = 6


def stub_rollout_func(tokenizer, seed=0, nan_every=0, topk=0, model_path=None):
    """A ``rollout_func``: random completions (1..MAX_COMPLETION tokens) and log-probs around −3.

    ``nan_every=k`` > 0 reports every k-th token's log-prob as None (vLLM's "unscored").
    ``topk=K`` > 0: the log-probs come from a lagged policy (the model at ``model_path``, i.e. the
    initial weights), which also returns ``topk_ids`` / ``topk_logprobs``: its K most likely ids
    per token, the sampled token forced in, and its log-probs at them.
    """
    gen = torch.Generator().manual_seed(seed)
    counter = [0]
    lagged = []

    def lagged_topk(prompt_ids, completion):
        if not lagged:
            from transformers import AutoModelForCausalLM

            lagged.append(AutoModelForCausalLM.from_pretrained(model_path).eval())
        ids = torch.tensor([prompt_ids + completion])
        with torch.no_grad():
            logits = lagged[0](input_ids=ids).logits[0, len(prompt_ids) - 1 : -1]
        logp = torch.log_softmax(logits.float(), dim=-1)
        top = logp.topk(topk, dim=-1).indices
        sampled = torch.tensor(completion)
        forced = torch.where((top == sampled[:, None]).any(-1, keepdim=True), top[:, -1:], sampled[:, None])
        top = torch.cat([top[:, :-1], forced], dim=-1)
        return logp.gather(-1, sampled[:, None])[:, 0].tolist(), top.tolist(), logp.gather(-1, top).tolist()

    def rollout(prompts, trainer):
        prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
        completions, logprobs, topk_ids, topk_logprobs = [], [], [], []
        for ids in prompt_ids:
            n = int(torch.randint(1, MAX_COMPLETION + 1, (1,), generator=gen))
            completions.append([int(x) for x in torch.randint(3, 32, (n,), generator=gen)])
            values = (-3.0 - 0.5 * torch.randn(n, generator=gen)).tolist()
            if topk:
                values, top_ids, top_lps = lagged_topk(ids, completions[-1])
                topk_ids.append(top_ids)
                topk_logprobs.append(top_lps)
            lps = []
            for x in values:
                counter[0] += 1
                lps.append(None if nan_every and counter[0] % nan_every == 0 else float(x))
            logprobs.append(lps)
        out = {"prompt_ids": prompt_ids, "completion_ids": completions, "logprobs": logprobs}
        if topk:
            out.update(topk_ids=topk_ids, topk_logprobs=topk_logprobs)
        return out

    return rollout


def length_reward(completions, **kwargs):
    return [float(len(c) % 3) for c in completions]


def grpo_config(tmp_path, **overrides):
    import trl

    settings = {
        "output_dir": str(tmp_path),
        "use_cpu": True,
        "bf16": False,
        "report_to": [],
        "per_device_train_batch_size": GROUP,
        "num_generations": GROUP,
        "max_completion_length": MAX_COMPLETION,
        "max_steps": 3,
        "logging_steps": 1,
        "save_strategy": "no",
        "learning_rate": 1e-3,
        "seed": 0,
        "optim": "sgd",  # fused AdamW's first call costs ~0.5 s per trainer on CPU
        "disable_tqdm": True,
    }
    settings.update(overrides)
    return trl.GRPOConfig(**settings)


def make_trainer(
    trainer_cls, tiny_model, tmp_path, *, seed=0, vllm=False, nan_every=0, topk=0, trainer_kwargs=None, **config
):
    """A ``trainer_cls`` (GRPOTrainer or StableGRPOTrainer) on the tiny model with a stub rollout_func
    (``topk=K``: it also returns a lagged policy's top-K, see `stub_rollout_func`)."""
    import datasets

    path, tokenizer = tiny_model
    trainer = trainer_cls(
        model=path,
        reward_funcs=length_reward,
        args=grpo_config(tmp_path, **config),
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS * 2}),
        processing_class=tokenizer,
        rollout_func=stub_rollout_func(tokenizer, seed, nan_every=nan_every, topk=topk, model_path=path),
        **(trainer_kwargs or {}),
    )
    if vllm:
        pretend_vllm(trainer)
    return trainer


def pretend_vllm(trainer):
    """Make TRL treat the rollout_func's log-probs as vLLM's: it computes old log-probs and its IS ratio."""
    trainer.use_vllm = True
    trainer.vllm_importance_sampling_correction = True
    trainer._last_loaded_step = trainer.state.global_step
    trainer.vllm_generation = type("NoSync", (), {"sync_weights": lambda self: None})()


def assert_same_loss_and_grads(ours, theirs):
    """(loss, grads) pairs equal at fp32 tolerance (TRL's fused LM head returns fp32 log-probs)."""
    torch.testing.assert_close(ours[0], theirs[0].to(ours[0].dtype), rtol=1e-6, atol=1e-9)
    for mine, ref in zip(ours[1], theirs[1], strict=True):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


def trl_compute_loss_fp64(logprobs, inputs, *, loss_type, entropies=None, **settings):
    """TRL's real ``GRPOTrainer._compute_loss`` on given fp64 log-probs, without a model.

    ``_compute_loss`` reads its log-probs from ``self._get_per_token_logps_and_entropies``; here
    ``self`` is a stand-in holding TRL's defaults (``GRPOConfig``'s fields), the settings passed,
    and a single-process accelerator, and that method returns ``logprobs`` (the leaf whose
    gradient the caller takes). Everything else runs TRL's own code, in fp64. ``inputs`` needs
    ``completion_mask``, ``advantages`` and whichever of ``old_per_token_logps``,
    ``sampling_per_token_logps``, ``importance_sampling_ratio``, ``num_items_in_batch`` the
    settings read. Settings: ``GRPOConfig`` field names, plus ``use_vllm`` /
    ``vllm_importance_sampling_correction`` (trainer attributes).
    """
    import collections
    import dataclasses
    import types

    import trl

    defaults = {f.name: f.default for f in dataclasses.fields(trl.GRPOConfig) if f.default is not dataclasses.MISSING}
    args = types.SimpleNamespace(**{**defaults, "steps_per_generation": 1, **settings})
    accelerator = types.SimpleNamespace(
        num_processes=1,
        gather=lambda x: x,
        gather_for_metrics=lambda x: x,
        reduce=lambda x, reduction="sum": x,
        sync_gradients=True,
    )
    mask = inputs["completion_mask"]
    ent = torch.zeros_like(logprobs) if entropies is None else entropies

    class Stand(trl.GRPOTrainer):
        def __init__(self):  # no model, no trainer state: only what _compute_loss reads
            pass

        def _get_per_token_logps_and_entropies(self, *unused, **unused_kw):
            return logprobs, ent, None

    stand = Stand()
    epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    vars(stand).update(
        args=args,
        loss_type=loss_type,
        beta=args.beta,
        epsilon_low=args.epsilon,
        epsilon_high=epsilon_high,
        importance_sampling_level=args.importance_sampling_level,
        off_policy_mask_threshold=args.off_policy_mask_threshold,
        top_entropy_quantile=args.top_entropy_quantile,
        use_vllm=settings.get("use_vllm", False),
        vllm_importance_sampling_correction=settings.get("vllm_importance_sampling_correction", False),
        model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        accelerator=accelerator,
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
    )
    B = mask.shape[0]
    full = {
        "prompt_ids": torch.ones(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.ones_like(mask, dtype=torch.long),
        **inputs,
    }
    loss = trl.GRPOTrainer._compute_loss(stand, None, full)
    return loss, stand._metrics["train"]


def trl_inputs(mask, advantages, old, sampling=None, is_ratio=None):
    """The ``inputs`` dict `trl_compute_loss_fp64` reads (the optional keys only when given)."""
    inputs = {
        "completion_mask": mask.long(),
        "advantages": advantages,
        "old_per_token_logps": old,
        "num_items_in_batch": mask.sum().double(),
    }
    if sampling is not None:
        inputs["sampling_per_token_logps"] = sampling
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
    return inputs


# ---------------------------------------------------------------------------------------------
# TRL's experimental AsyncGRPOTrainer on CPU
# ---------------------------------------------------------------------------------------------
def cpu_tree_attention(module, query, key, value, attention_mask, *, tree_kv_index, tree_cu_seqlens_q,
                       tree_cu_seqlens_k, tree_max_seqlen_q, tree_max_seqlen_k, scaling=None, **kwargs):  # fmt: skip
    """TRL's ``tree_attention`` (packing.py) with its FA3 kernel call written out in plain torch.

    Segment i's queries (rows cu_q[i]:cu_q[i+1]) attend to its keys ``key[kv_index[cu_k[i]:cu_k[i+1]]]``,
    causally aligned at the end (query j of Lq sees keys 0..Lk−Lq+j), as ``flash_attn_varlen_func(causal=True)``.
    """
    q, k, v = (x.transpose(1, 2)[0] for x in (query, key, value))  # (N, H, D)
    k, v = k.index_select(0, tree_kv_index), v.index_select(0, tree_kv_index)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    out = torch.zeros_like(q)
    for i in range(tree_cu_seqlens_q.numel() - 1):
        qs, qe = int(tree_cu_seqlens_q[i]), int(tree_cu_seqlens_q[i + 1])
        ks, ke = int(tree_cu_seqlens_k[i]), int(tree_cu_seqlens_k[i + 1])
        scores = torch.einsum("qhd,khd->hqk", q[qs:qe], k[ks:ke]) * scale
        lq, lk = qe - qs, ke - ks
        allowed = torch.arange(lk)[None, :] <= (lk - lq + torch.arange(lq))[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[qs:qe] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[ks:ke])
    return out.unsqueeze(0), None


class NoRolloutWorker:
    """AsyncGRPO's ``rollout_worker`` protocol: a queue holding ready ``RolloutSample``s, no generation."""

    def __init__(self, samples=()):
        import queue

        from trl.experimental.async_grpo.async_rollout_worker import RolloutSample

        self.rollout_buffer, self.metrics_queue = queue.Queue(), queue.Queue()
        for s in samples:
            self.rollout_buffer.put(
                RolloutSample(prompt="", completion="", input_ids=s["input_ids"].numpy(),
                              completion_mask=s["completion_mask"].numpy(), old_log_probs=s["old_log_probs"].numpy(),
                              advantage=s["advantage"], model_version=s.get("model_version", 0),
                              group_id=s["group_id"], metrics={})
            )  # fmt: skip

    def start(self):
        pass

    def stop(self):
        pass

    def update_model_version(self, version):
        pass

    def check_health(self, stale_after_s):
        pass


class NoWeightTransfer:
    """AsyncGRPO's ``weight_transfer`` protocol as a no-op (TRL's docs: "a no-op stub in tests")."""

    def init_weight_transfer(self):
        pass

    def pause(self):
        pass

    def send_weights(self, iterator):
        pass

    def resume(self):
        pass

    def destroy(self):
        pass


def async_grpo_batch(samples, pad_token_id=0, collator=None):
    """One micro-batch as AsyncGRPO's collator (or ``collator``) builds it: the samples packed into one ``TreeRow``."""
    from trl.experimental.async_grpo.async_grpo_trainer import DataCollatorForRollout
    from trl.experimental.async_grpo.packing import TreeRow

    row = TreeRow()
    for sample in samples:
        row.add(sample)
    return (collator or DataCollatorForRollout(pad_token_id, num_processes=1))([[row]])


def async_grpo_samples(seed=0, prompts=((3, 4, 5), (6, 7)), group=3, vocab=32):
    """Rollout samples (prompt + completion ids, completion mask, engine log-probs, advantage) for the collator."""
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for g, prompt in enumerate(prompts):
        for _ in range(group):
            n = int(torch.randint(2, MAX_COMPLETION + 1, (1,), generator=gen))
            ids = torch.tensor([*prompt, *torch.randint(3, vocab, (n,), generator=gen).tolist()])
            mask = torch.tensor([0] * len(prompt) + [1] * n)
            logps = torch.where(mask.bool(), -3.0 - 0.6 * torch.randn(len(ids), generator=gen), 0.0)
            advantage = float(torch.randn((), generator=gen))
            samples.append({"input_ids": ids, "completion_mask": mask, "old_log_probs": logps,
                            "advantage": advantage, "group_id": g, "metrics": {}})  # fmt: skip
    return samples
