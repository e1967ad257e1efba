"""The warm start: a short supervised phase on imperfect demonstrations, like a pretrained model.

RL post-training starts from a model that already does the task sometimes. The benchmark's
initial policy is a fresh transformer trained for ``sft_steps`` Adam steps (lr ``sft_lr``) of
next-token cross-entropy on demonstrations whose tokens are each replaced by a random symbol
with probability ``sft_noise`` (`Task.demonstrations`): it ends partly right, with the
entropy of its noisy teacher, and RL has to sharpen it. The result depends only on the task,
the model size, these settings and the seed, so it is computed once per process and reused.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from stable_async.bench.model import ModelConfig, TinyTransformer
from stable_async.bench.tasks import Task


@functools.lru_cache(maxsize=8)
def _warm_weights(
    task: Task, cfg: ModelConfig, steps: int, lr: float, noise: float, batch: int, seed: int
) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)  # the initial weights
    policy = TinyTransformer(cfg)
    gen = torch.Generator().manual_seed(7_919 * seed + 11)
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    P = task.prompt_len
    for _ in range(steps):
        prompts = task.sample_prompts(batch, gen)
        demos = task.demonstrations(prompts, noise, gen)
        logits, _ = policy(torch.cat([prompts, demos], dim=1)[:, :-1])
        loss = F.cross_entropy(logits[:, P - 1 :].reshape(-1, cfg.vocab), demos.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in policy.state_dict().items()}


def warm_started_policy(
    task: Task, cfg: ModelConfig, steps: int, lr: float, noise: float, batch: int, seed: int
) -> TinyTransformer:
    """A fresh policy (initial weights from ``seed``) after the supervised phase; ``steps = 0``: none."""
    policy = TinyTransformer(cfg)
    policy.load_state_dict(_warm_weights(task, cfg, steps, lr, noise, batch, seed))
    return policy
