"""Tasks with a verifiable reward: token reversal and copying.

A prompt holds H symbols from a vocabulary of M, then a separator (id M). The response is H tokens.

* ``reversal``: the prompt backwards (the Delightful PG paper's task). Output position i reads
  input position H − 1 − i: the distance between what is read and what is written changes
  with i.
* ``copy``: the prompt as it is. A different shape: every output position reads the input at
  the same distance behind it (H + 1 tokens), the pattern of an induction/copy head.

Rewards:

* ``tokens``: the fraction of correct positions (dense; every position gets credit on its own).
* ``outcome``: 1 for the exact answer, 0 otherwise (a verifier's binary reward, as in math RL).

Success: the exact answer (`trainer.evaluate` measures it on sampled and on greedy answers).
Demonstrations for the warm start (`warmstart`) are the exact
answers with each token replaced, with probability ``noise``, by a uniformly random symbol.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TASKS = ("reversal", "copy")
REWARDS = ("tokens", "outcome")


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
        return self.length + 1  # H symbols, separator

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.length

    def sample_prompts(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, prompt_len) random prompts ending with the separator."""
        symbols = torch.randint(self.symbols, (n, self.length), generator=generator)
        return torch.cat([symbols, torch.full((n, 1), self.symbols)], dim=1)

    def targets(self, prompts: torch.Tensor) -> torch.Tensor:
        symbols = prompts[:, : self.length]
        return symbols.flip(1) if self.name == "reversal" else symbols

    def token_correct(self, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        """(n, H) bool: response position equals the target."""
        return responses == self.targets(prompts)

    def reward(self, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        """(n,) in [0, 1]: the fraction of correct positions, or 1 for the exact answer."""
        correct = self.token_correct(prompts, responses)
        if self.reward_kind == "outcome":
            return correct.all(dim=1).float()
        return correct.float().mean(dim=1)

    def demonstrations(self, prompts: torch.Tensor, noise: float, generator: torch.Generator) -> torch.Tensor:
        """(n, H) imperfect demonstrations: each target token replaced by a random symbol w.p. ``noise``."""
        targets = self.targets(prompts)
        wrong = torch.rand(targets.shape, generator=generator) < noise
        random = torch.randint(self.symbols, targets.shape, generator=generator)
        return torch.where(wrong, random, targets)
