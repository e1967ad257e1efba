"""Test helpers (importable as ``sa_testing``): random policy tensors, CPU loaders for the trainers."""

from __future__ import annotations

import os

import pytest
import torch


def random_logprobs(shape, generator, dtype=torch.float64, low=-4.0, high=-0.01):
    """Log-probabilities of sampled tokens, uniform in [low, high] (so probabilities < 1)."""
    return (low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)).to(dtype)


def random_mask(B, T, generator, min_len=1):
    """Right-padded response mask with random lengths in [min_len, T]."""
    lengths = torch.randint(min_len, T + 1, (B,), generator=generator)
    return torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)


def random_tensors(generator, B=6, T=9, spread=0.3, dtype=torch.float64):
    """Random policy tensors: logprobs (leaf, requires grad), old, rollout, advantages (B, T), mask."""
    lp = random_logprobs((B, T), generator, dtype=dtype)
    noise = lambda: spread * torch.randn(B, T, generator=generator, dtype=torch.float64).to(dtype)  # noqa: E731
    old = (lp + noise()).clamp(max=-1e-3)
    rollout = (old + noise()).clamp(max=-1e-3)
    return {
        "logprobs": lp.clone().requires_grad_(True),
        "old_logprobs": old,
        "rollout_logprobs": rollout,
        "advantages": torch.randn(B, T, generator=generator, dtype=torch.float64).to(dtype),
        "mask": random_mask(B, T, generator),
    }


def load_openrlhf_loss_module():
    """Import ``openrlhf.models.loss`` on CPU without ``openrlhf.models/__init__`` (it needs flash_attn).

    The same trick OpenRLHF's own tests/test_loss_aggregation.py uses: register a bare package
    object for ``openrlhf.models`` whose ``__path__`` is the real folder.
    """
    import importlib
    import sys
    import types

    openrlhf = pytest.importorskip("openrlhf")
    if "openrlhf.models.loss" in sys.modules:
        return sys.modules["openrlhf.models.loss"]
    if "openrlhf.models" not in sys.modules:
        package = types.ModuleType("openrlhf.models")
        package.__path__ = [os.path.join(os.path.dirname(openrlhf.__file__), "models")]
        sys.modules["openrlhf.models"] = package
    return importlib.import_module("openrlhf.models.loss")


def verl_actor_config(**overrides):
    """A veRL ``ActorConfig`` for calling veRL's registered policy losses directly."""
    pytest.importorskip("verl")
    from verl.workers.config.actor import ActorConfig

    settings = {"strategy": "fsdp", "rollout_n": 1, "ppo_micro_batch_size_per_gpu": 1}
    settings.update(overrides)
    return ActorConfig(**settings)


def full_batch_kwargs(generator, B=5, T=7, K=4, dtype=torch.float64, spread=0.3, log_ratio_scale=None):
    """Every PolicyBatch field filled (rollout, top-K, versions, rewards), so that any loss can run.

    ``log_ratio_scale`` (e.g. 1e4) replaces the small perturbations between the current, old and
    rollout log-probs by huge ones, for overflow tests.
    """
    t = random_tensors(generator, B=B, T=T, spread=spread, dtype=dtype)
    if log_ratio_scale is not None:
        # Log-ratios of ±scale between valid log-probs (<= 0): where a sign is +, the other policy
        # is scale lower; where it is −, log π_θ itself is scale lower.
        lp = t["logprobs"].detach()
        up = lambda: torch.randint(0, 2, (B, T), generator=generator).bool()  # noqa: E731
        old_up, rollout_up = up(), up()
        current = torch.where(old_up, lp, lp - log_ratio_scale)
        t["logprobs"] = current.clone().requires_grad_(True)
        t["old_logprobs"] = torch.where(old_up, lp - log_ratio_scale, lp)
        t["rollout_logprobs"] = torch.where(rollout_up, current - log_ratio_scale, current + log_ratio_scale).clamp(
            max=-1e-3
        )
    # Top-K of the rollout policy: K distinct ids in a vocabulary of 3K, with log-probs that sum below 1.
    vocab = 3 * K
    ids = torch.stack([torch.randperm(vocab, generator=generator)[:K] for _ in range(B * T)]).reshape(B, T, K)
    probs = torch.softmax(torch.randn(B, T, K + 1, generator=generator, dtype=torch.float64), -1)[..., :K]
    current = torch.softmax(torch.randn(B, T, K + 1, generator=generator, dtype=torch.float64), -1)[..., :K]
    t["topk_ids"] = ids
    t["topk_logprobs"] = probs.log().to(dtype)
    t["current_topk_logprobs"] = current.log().to(dtype).requires_grad_(True)
    t["rewards"] = torch.randint(0, 2, (B,), generator=generator).to(dtype)
    t["group_ids"] = torch.arange(B) // 2
    t["versions"] = torch.randint(0, 4, (B,), generator=generator)
    t["current_version"] = 4
    return t


def free_port():
    """A free TCP port on the loopback interface."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_gloo(worker, world_size, *args):
    """Run ``worker(rank, world_size, *args)`` in ``world_size`` spawned processes with gloo initialized.

    ``worker`` must be importable by name from a module on sys.path (e.g. ``gloo_workers``): test
    modules under --import-mode=importlib are not importable in the children.
    """
    import torch.multiprocessing as mp

    mp.start_processes(
        _gloo_entry, args=(worker, world_size, free_port(), args), nprocs=world_size, join=True, start_method="spawn"
    )


def _gloo_entry(rank, worker, world_size, port, args):
    import datetime

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        worker(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def tiny_causal_lm(directory, vocab=None, seed=0):
    """An offline tiny Qwen2 model and a WordLevel tokenizer saved to ``directory``.

    Returns ``(model_path, tokenizer)``. No download: the tokenizer is built from a word list,
    the model from a config (2 layers, hidden 32).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    words = vocab or ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(29)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(words),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(config)
    path = os.path.join(str(directory), "tiny-qwen2")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, tokenizer


def loglinear_alpha_mean(versions, current, lengths):
    """By hand: the token mean of ``decoupled_ppo(proximal="loglinear")``'s α over rows of ``lengths`` tokens.

    α = clamp((v − 1 − v_μ)/(v − v_μ), 0, 1) per row, v = ``current``, v_μ the row's version.
    """
    gaps = [current - v for v in versions]
    alpha = [max(g - 1, 0) / g if g > 0 else 0.0 for g in gaps]
    return sum(a * n for a, n in zip(alpha, lengths, strict=True)) / sum(lengths)
