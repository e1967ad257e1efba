"""GAC when TRL reuses each rollout batch for several optimizer steps (``num_iterations=2``).

    HF_HUB_OFFLINE=1 python integrations/trl/gac_num_iterations.py [--steps 40] [--json]

Three measurements, in one run, with GAC's default settings (``gac=True``: project, τ = 0.5, λ = 1):

1. ``rule``: a synchronous `StableGRPOTrainer` run (TRL's own generation from the current
   policy, ``num_iterations=2``, one micro-batch per optimizer step, so every rollout batch is
   used by 2 optimizer steps). The adapter tells GAC where each rollout batch begins, and GAC
   compares each step with the last gradient of the *previous* rollout batch.
2. ``control``: the same run, the same seed, with that call disabled (GAC compares consecutive
   steps, the two steps of one rollout batch with each other: the behaviour before the rule).
3. ``stale``: a synthetic sequence of rollout-batch gradients through the adapter's
   `SteppedOptimizer`, each batch aligned with the previous one (cosine 0.9 on average), each
   used for 2 steps: the stale-aligned signal GAC targets must still be projected.

Printed per measurement: the mean over steps with a defined cosine of ``gac/removed_frac`` (the
fraction of the squared gradient norm removed, λ²c²), of the gradient-norm fraction removed
(1 − ‖g'‖/‖g‖ = 1 − sqrt(1 − c²) when projected, λ = 1), and the fraction of steps projected.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch
from datasets import Dataset
from transformers.trainer_callback import PrinterCallback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_tiny_offline import PROMPTS, tiny_grpo_config, tiny_model

import stable_async as sa
from stable_async.integrations.stepping import SteppedOptimizer
from stable_async.integrations.trl import StableGRPOTrainer

PROJECT = 1.0  # gac/action of a projected step


def summary(records: list[dict[str, float]]) -> dict[str, float]:
    """Means over the steps whose cosine is defined (every step after the first)."""
    rows = [r for r in records if "gac/cos" in r]
    removed = [r["gac/removed_frac"] for r in rows]
    norm = [1.0 - math.sqrt(max(1.0 - f, 0.0)) for f in removed]
    return {
        "steps": len(rows),
        "mean_removed_frac": sum(removed) / len(rows),
        "mean_norm_removed": sum(norm) / len(rows),
        "projected_frac": sum(r["gac/action"] == PROJECT for r in rows) / len(rows),
        "mean_cos": sum(r["gac/cos"] for r in rows) / len(rows),
    }


def reward_even_words(completions: list[str], **kwargs) -> list[float]:
    """A toy reward with spread within each group: the share of words w<i> with an even i."""
    scores = []
    for text in completions:
        words = [w for w in text.split() if w[1:].isdigit()]
        scores.append(sum(int(w[1:]) % 2 == 0 for w in words) / max(len(words), 1))
    return scores


def trl_run(path: str, tokenizer, out: str, steps: int, control: bool) -> dict[str, float]:
    trainer = StableGRPOTrainer(
        model=path,
        reward_funcs=reward_even_words,
        args=tiny_grpo_config(out, steps, num_iterations=2, learning_rate=1e-4),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS * 64}),
        processing_class=tokenizer,
        gac=True,
    )
    trainer.remove_callback(PrinterCallback)
    records: list[dict[str, float]] = []
    trainer.create_optimizer()
    stepper = trainer._sa_stepper
    log = stepper.on_metrics
    stepper.on_metrics = lambda metrics: (records.append(dict(metrics)), log(metrics))
    if control:
        stepper.new_rollout_batch = lambda: None
    trainer.train()
    return summary(records)


def stale_sequence(batches: int, seed: int = 0) -> dict[str, float]:
    """Rollout-batch gradients g_k = 0.9·g_{k−1}/‖g_{k−1}‖ + sqrt(1 − 0.9²)·u_k, 2 steps per batch."""
    gen = torch.Generator().manual_seed(seed)
    dim = 256
    param = torch.nn.Parameter(torch.zeros(dim, dtype=torch.float64))
    stepper = SteppedOptimizer(torch.optim.SGD([param], lr=0.0), sa.StepAccumulator(), gac={})
    records: list[dict[str, float]] = []
    stepper.on_metrics = records.append
    direction = torch.randn(dim, generator=gen, dtype=torch.float64)
    direction /= direction.norm()
    for _ in range(batches):
        fresh = torch.randn(dim, generator=gen, dtype=torch.float64)
        fresh -= (fresh @ direction) * direction
        direction = 0.9 * direction + math.sqrt(1 - 0.81) * fresh / fresh.norm()
        stepper.new_rollout_batch()
        for _ in range(2):  # two minibatches of the batch: the batch gradient plus a little noise
            param.grad = direction + 0.05 * torch.randn(dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)
            stepper.accumulator.record_log_weights(torch.zeros(1, 1))  # on-policy: ESS/N = 1
            stepper.step()
    return summary(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps of each TRL run")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path, tokenizer = tiny_model(tmp)
        results = {
            "rule": trl_run(path, tokenizer, os.path.join(tmp, "rule"), opts.steps, control=False),
            "control": trl_run(path, tokenizer, os.path.join(tmp, "control"), opts.steps, control=True),
            "stale": stale_sequence(opts.steps // 2),
        }
    if opts.json:
        print(json.dumps(results))
        return
    print(f"{'':10}{'steps':>6}{'removed_frac':>14}{'norm_removed':>14}{'projected':>11}{'mean_cos':>10}")
    for name, r in results.items():
        print(
            f"{name:10}{r['steps']:>6}{r['mean_removed_frac']:>14.4f}{r['mean_norm_removed']:>14.4f}"
            f"{r['projected_frac']:>11.3f}{r['mean_cos']:>10.4f}"
        )


if __name__ == "__main__":
    main()
