"""Tasks with a verifiable reward: token reversal and sorting.

A prompt is H tokens from a vocabulary of M symbols followed by a separator token (id M); the
response is H tokens. The target of ``reversal`` is the prompt backwards (the Delightful PG
paper's task); the target of ``sorting`` is the prompt in ascending order (a different shape:
every output position depends on the whole multiset, not on one input position).

Reward (partial credit, 1 = the exact answer):

* ``tokens`` (default): the fraction of correct positions: dense, every position gets credit
  on its own (all-or-nothing reward at this size is too sparse to learn even synchronously).
* ``prefix``: the length of the correct prefix / H. Credit for position i needs positions
  1..i right, so the answer is discovered position by position from the policy's own
  improving samples. Much harsher under staleness (see benchmarks/staleness/sweep.md).

Success: the exact answer. A random policy is exactly right with probability (M+1)^-H.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TASKS = ("reversal", "sorting")
REWARDS = ("prefix", "tokens")


@dataclass(frozen=True)
class Task:
    name: str
    symbols: int  # M
    length: int  # H
    reward_kind: str = "tokens"

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise ValueError(f"task: expected one of {list(TASKS)}, got {self.name!r}")
        if self.reward_kind not in REWARDS:
            raise ValueError(f"reward: expected one of {list(REWARDS)}, got {self.reward_kind!r}")

    @property
    def vocab(self) -> int:
        return self.symbols + 1  # the M symbols and the separator

    @property
    def prompt_len(self) -> int:
        return self.length + 1  # H symbols and the separator

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.length

    def sample_prompts(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, H + 1) random prompts ending with the separator."""
        symbols = torch.randint(self.symbols, (n, self.length), generator=generator)
        return torch.cat([symbols, torch.full((n, 1), self.symbols)], dim=1)

    def targets(self, prompts: torch.Tensor) -> torch.Tensor:
        symbols = prompts[:, : self.length]
        return symbols.flip(1) if self.name == "reversal" else symbols.sort(dim=1).values

    def token_correct(self, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        """(n, H) bool: response position equals the target."""
        return responses == self.targets(prompts)

    def reward(self, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        """(n,) partial credit in [0, 1] (see the module docstring)."""
        correct = self.token_correct(prompts, responses).float()
        if self.reward_kind == "prefix":
            correct = correct.cumprod(dim=1)  # 1 up to the first mistake, 0 after
        return correct.mean(dim=1)
