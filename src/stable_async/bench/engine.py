"""The rollout engine: stale weight snapshots, engine mismatch and optional frictions.

Asynchrony. The trainer publishes its weights after every training step (version v = step + 1;
version 0 is the initial model). The engine keeps the last ``lag + 1`` snapshots and samples
step t's rollouts from the oldest one, version max(0, t − lag): with ``lag = 0`` rollouts come
from the current weights (synchronous training).

Engine mismatch. Like a vLLM/SGLang engine next to an FSDP trainer, the engine does not run
the trainer's exact numerics: it holds a reduced-precision copy of each snapshot (weights
rounded to bf16) and its logits carry a small Gaussian noise (``logit_noise``). It samples
from, and reports the log-probs of, *its own* distribution μ. The trainer's recomputation of
the same snapshot gives different log-probs, so correction methods have real work to do even
at lag 0.

Frictions (the Delightful PG paper's; off unless set):

* buggy actors: a fraction of the sequences is sampled at temperature ``buggy_temperature``
  (a misconfigured sampler) while the engine still reports the temperature-1 log-probs;
* reward corruption: a fraction of the rewards is replaced by a uniform random value in [0, 1].
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from stable_async.bench.model import ModelConfig, TinyTransformer, generate
from stable_async.bench.tasks import Task


@dataclass(frozen=True)
class EngineSettings:
    lag: int = 0
    bf16_weights: bool = True  # the engine's copy of the weights is rounded to bf16
    logit_noise: float = 0.0  # std of the Gaussian noise on the engine's logits
    topk: int = 0  # also report the top-K ids and log-probs of μ (DPPO top-K); 0: off
    buggy_fraction: float = 0.0  # fraction of sequences from a buggy actor
    buggy_temperature: float = 2.0
    reward_corruption: float = 0.0  # fraction of rewards replaced by uniform noise


@dataclass
class Rollout:
    """One training step's data, as the engine reports it. B = prompts × group size."""

    prompts: torch.Tensor  # (B, P) prompt tokens, separator included
    responses: torch.Tensor  # (B, H) sampled tokens
    rewards: torch.Tensor  # (B,) as reported (possibly corrupted)
    group_ids: torch.Tensor  # (B,) prompt index
    rollout_logprobs: torch.Tensor  # (B, H) log μ of the sampled tokens
    version: int  # the policy version that produced the rollouts
    topk_ids: torch.Tensor | None = None  # (B, H, K) μ's top-K ids, the sampled token forced in
    topk_logprobs: torch.Tensor | None = None  # (B, H, K) log μ at topk_ids

    @property
    def sequences(self) -> torch.Tensor:
        return torch.cat([self.prompts, self.responses], dim=1)


class RolloutEngine:
    def __init__(self, model_config: ModelConfig, task: Task, settings: EngineSettings, seed: int) -> None:
        self.task, self.settings = task, settings
        self.model = TinyTransformer(model_config).eval()
        self.snapshots: deque[tuple[int, dict[str, torch.Tensor]]] = deque(maxlen=settings.lag + 1)
        self.gen = torch.Generator().manual_seed(seed)

    def publish(self, policy: torch.nn.Module, version: int) -> None:
        """Store a snapshot of the trainer's weights (as the engine's reduced-precision copy)."""
        dtype = torch.bfloat16 if self.settings.bf16_weights else torch.float32
        weights = {k: v.detach().to(dtype).to(torch.float32).clone() for k, v in policy.state_dict().items()}
        self.snapshots.append((version, weights))

    def rollout(self, prompts: torch.Tensor, group_size: int) -> Rollout:
        """Sample ``group_size`` responses for each prompt from the oldest kept snapshot."""
        s, H = self.settings, self.task.length
        version, weights = self.snapshots[0]
        self.model.load_state_dict(weights)
        prompts = prompts.repeat_interleave(group_size, dim=0)
        B = prompts.shape[0]
        group_ids = torch.arange(B) // group_size
        buggy = torch.rand(B, generator=self.gen) < s.buggy_fraction
        temperature = torch.where(buggy, s.buggy_temperature, 1.0).unsqueeze(-1)

        def engine_logits(logits: torch.Tensor) -> torch.Tensor:
            if s.logit_noise > 0:
                logits = logits + s.logit_noise * torch.randn(logits.shape, generator=self.gen)
            return logits / temperature

        responses, used = generate(self.model, prompts, H, self.gen, logits_hook=engine_logits)
        logp = torch.log_softmax(used * temperature.unsqueeze(-1), dim=-1)  # what the engine reports: T = 1
        rollout_logprobs = logp.gather(-1, responses.unsqueeze(-1)).squeeze(-1)

        rewards = self.task.reward(prompts, responses)
        corrupt = torch.rand(B, generator=self.gen) < s.reward_corruption
        rewards = torch.where(corrupt, torch.rand(B, generator=self.gen), rewards)

        topk_ids = topk_logprobs = None
        if s.topk > 0:
            topk_ids = logp.topk(s.topk, dim=-1).indices
            sampled_in = (topk_ids == responses.unsqueeze(-1)).any(-1, keepdim=True)
            last = torch.where(sampled_in, topk_ids[..., -1:], responses.unsqueeze(-1))
            topk_ids = torch.cat([topk_ids[..., :-1], last], dim=-1)  # the sampled token forced in
            topk_logprobs = logp.gather(-1, topk_ids)
        return Rollout(prompts, responses, rewards, group_ids, rollout_logprobs, version, topk_ids, topk_logprobs)
