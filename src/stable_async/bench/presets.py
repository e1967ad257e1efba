"""Benchmark settings (task, budget, engine, warm start) and the presets: quick, full, sweep, tiny.

A preset is a list of blocks; every method in a block gets the same `BenchSettings`: the same
task, the same number of training steps, the same batch, warm start and engine. Method
hyperparameters live in `stable_async.bench.methods`, nowhere else. How the defaults were
calibrated (warm start, outcome reward, the shared lr, the budget) is in
``benchmarks/staleness/sweep.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from stable_async.bench.engine import OFFLINE, EngineSettings, Lag
from stable_async.bench.methods import LEARNING_RATE, METHODS, METHODS_2026, METHODS_GOVERNOR, TUNED_LR

SWEEP_LRS = (0.5 * LEARNING_RATE, LEARNING_RATE, 2 * LEARNING_RATE)


@dataclass(frozen=True)
class BenchSettings:
    task: str = "reversal"
    symbols: int = 8  # M
    length: int = 8  # H, response tokens
    reward: str = "outcome"  # "outcome" (0/1 exact answer) or "tokens" (fraction of correct positions)
    steps: int = 128  # training steps, one rollout batch each
    prompts_per_step: int = 8
    group_size: int = 8  # responses per prompt (GRPO group)
    minibatches: int = 1  # optimizer steps per epoch over the rollout batch
    epochs: int = 1  # passes over the rollout batch
    eval_every: int = 8
    eval_prompts: int = 128
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    sft_steps: int = 50  # warm start: supervised steps on imperfect demonstrations (warmstart.py)
    sft_lr: float = 2e-3
    sft_noise: float = 0.5  # fraction of demonstration tokens replaced by a random symbol
    sft_batch: int = 64
    lr: float | None = None  # None: each method's lr from methods.py; set to override (--set lr=...)
    lr_choice: str = "shared"  # "shared": methods.LEARNING_RATE; "tuned": the method's swept lr
    engine: EngineSettings = field(default_factory=lambda: EngineSettings(bf16_weights=True, logit_noise=0.1))


@dataclass(frozen=True)
class Block:
    """One grid: every (method, lag, seed) of one setting (task, reward, staleness model)."""

    settings: BenchSettings
    methods: tuple[str, ...]
    lags: tuple[Lag, ...]
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class Preset:
    name: str
    blocks: tuple[Block, ...]
    description: str = ""


PAPER_METHODS = ("vcpo", "gac", "delight", "dppo_binary_tv", "decoupled_ppo", "m2po")
# the grid of the committed results (governed rows: their own block, at the largest bound)
ALL_METHODS = tuple(m for m in METHODS if m not in METHODS_2026 and m not in METHODS_GOVERNOR)
REPORTED_SEEDS = (0, 1, 2)
SWEEP_SEEDS = (100, 101)  # the lr sweep's seeds: never reported

_REVERSAL = BenchSettings()
_COPY = replace(_REVERSAL, task="copy", length=16, reward="tokens")
_FULL_LAGS: tuple[Lag, ...] = (0, 4, 16, 32, OFFLINE)
_CORE = ("ppo", "ppo_tis", "vcpo")


def _staleness(settings: BenchSettings, model: str) -> BenchSettings:
    return replace(settings, engine=replace(settings.engine, staleness=model))


PRESETS: dict[str, Preset] = {
    "quick": Preset(
        "quick",
        (Block(_REVERSAL, ("ppo", "ppo_tis"), (0, 32, OFFLINE), (0, 1)),),
        "uncorrected PPO and PPO + token TIS on reversal at bounds 0 and 32 and offline, 2 seeds",
    ),
    "full": Preset(
        "full",
        (
            Block(_REVERSAL, ALL_METHODS, _FULL_LAGS, REPORTED_SEEDS),
            Block(_REVERSAL, tuple(f"{m}@tuned" for m in TUNED_LR), (0, 32), REPORTED_SEEDS),
            Block(_staleness(_REVERSAL, "fixed"), _CORE, (32,), REPORTED_SEEDS),
            Block(_staleness(_REVERSAL, "partial"), _CORE, (32,), REPORTED_SEEDS),
            Block(_COPY, _CORE, (0, 32, OFFLINE), REPORTED_SEEDS),
            # The staleness governor (max bound 32) next to the fixed bounds of the rows it governs.
            Block(_REVERSAL, METHODS_GOVERNOR, (32,), REPORTED_SEEDS),
        ),
        "every method on reversal (outcome reward, H = 8) at staleness bounds 0-32 and offline; the methods "
        "whose swept lr differs from the shared one at that lr; fixed and partial staleness at 32; three "
        "methods on copy (dense reward, H = 16)",
    ),
    # The lr sweep behind methods.TUNED_LR (benchmarks/staleness/sweep.md), on seeds never reported.
    "sweep": Preset(
        "sweep",
        (
            Block(
                _REVERSAL,
                tuple(f"{m}@lr={lr:g}" for m in ALL_METHODS for lr in SWEEP_LRS),
                (0, 16),
                SWEEP_SEEDS,
            ),
        ),
        "every method at each lr of SWEEP_LRS, lags 0 and 16, seeds 100 and 101",
    ),
    # A few seconds: for the tests and for trying the command out.
    "tiny": Preset(
        "tiny",
        (
            Block(
                replace(
                    _REVERSAL,
                    length=4,
                    steps=6,
                    prompts_per_step=4,
                    group_size=4,
                    eval_every=3,
                    eval_prompts=32,
                    sft_steps=2,
                ),
                ("ppo", "ppo_tis"),
                (0, 2, OFFLINE),
                (0,),
            ),
        ),
        "two methods, 6 steps: for the tests",
    ),
}

# The tiny preset also runs one governed row (a second block, same settings): about a second more.
_TINY = PRESETS["tiny"]
PRESETS["tiny"] = replace(
    _TINY, blocks=(*_TINY.blocks, Block(_TINY.blocks[0].settings, ("governor_ppo_tis",), (2,), (0,)))
)
