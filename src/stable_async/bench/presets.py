"""Benchmark settings (task, budget, engine mismatch) and the two presets, ``quick`` and ``full``.

Every method in a grid gets the same `BenchSettings`: the same task, the same number of
training steps, the same batch and the same engine. Method hyperparameters live in
`stable_async.bench.methods`, nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stable_async.bench.engine import EngineSettings


@dataclass(frozen=True)
class BenchSettings:
    task: str = "reversal"
    symbols: int = 8  # M
    length: int = 8  # H
    reward: str = "tokens"  # partial credit: "prefix" (correct prefix length) or "tokens" (see tasks.py)
    steps: int = 150  # training steps (one rollout batch each)
    prompts_per_step: int = 16
    group_size: int = 8  # responses per prompt (GRPO group)
    minibatches: int = 2  # optimizer steps per training step (each on 1/minibatches of the batch)
    eval_every: int = 10
    eval_prompts: int = 256
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    head_scale: float = 3.0  # > 1: a confident initial policy whose samples cover little, like a pretrained model
    lr: float | None = None  # None: methods.LEARNING_RATE; set only to sweep it (--set lr=...)
    engine: EngineSettings = field(default_factory=lambda: EngineSettings(bf16_weights=True, logit_noise=0.1))


@dataclass(frozen=True)
class Preset:
    name: str
    methods: tuple[str, ...]
    lags: tuple[int, ...]
    seeds: tuple[int, ...]
    settings: BenchSettings
    tasks: tuple[str, ...] = ("reversal",)


ALL_METHODS = (
    "ppo",
    "ppo_tis",
    "icepop",
    "gspo",
    "cispo",
    "decoupled_ppo",
    "m2po",
    "dppo_binary_tv",
    "dppo_topk_tv",
    "delight",
    "vcpo",
    "gac",
    "delight_tis",
)

PRESETS: dict[str, Preset] = {
    "quick": Preset(
        name="quick",
        methods=("ppo", "ppo_tis", "delight_tis"),
        lags=(0, 8, 32),  # BENCHMARK.md says {0, 8}; at lr 1.5e-3 lag 8 separates only by AUC, 32 by final
        seeds=(0, 1),
        settings=BenchSettings(),
    ),
    "full": Preset(
        name="full",
        methods=ALL_METHODS,
        lags=(0, 2, 8, 32, 128),
        seeds=(0, 1, 2),
        settings=BenchSettings(),
    ),
    # A few seconds: for the tests and for trying the command out.
    "tiny": Preset(
        name="tiny",
        methods=("ppo", "ppo_tis"),
        lags=(0, 2),
        seeds=(0,),
        settings=BenchSettings(steps=6, prompts_per_step=4, group_size=4, eval_every=3, eval_prompts=32),
    ),
}
