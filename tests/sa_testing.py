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
