"""The simulated asynchronous trainer: one run of one method at one lag and one seed.

It uses only the public `stable_async` API (`sa.PolicyBatch`, `sa.get_loss`, corrections,
`sa.effective_sample_size`, `sa.ESSScaledLR`, `sa.GradientAlignmentControl`,
`sa.baselines`, `sa.divergence`), exactly as a user's training loop would. One training step:

1. the engine samples a batch from a snapshot ``lag`` versions old (`engine.RolloutEngine`);
2. the trainer recomputes the batch's log-probs under its current weights (π_old), measures
   ESS/N of π_old against the engine's μ, and forms group-normalized advantages;
3. ``minibatches`` optimizer steps, each: loss → backward → GAC (monitor or act) → gradient
   clipping → optimizer step (ESS-scaled for VCPO);
4. the trainer publishes its weights to the engine (version + 1);
5. every ``eval_every`` steps: greedy success on held-out prompts, and the entropy.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

import stable_async as sa
from stable_async.bench.engine import Rollout, RolloutEngine
from stable_async.bench.methods import ADV_EPS, GRAD_CLIP, TOPK, Method, get_method
from stable_async.bench.model import ModelConfig, TinyTransformer, generate
from stable_async.bench.presets import BenchSettings
from stable_async.bench.tasks import Task

COLLAPSE_MIN_PEAK = 0.1  # a collapse needs a peak worth falling from


@dataclass(frozen=True)
class RunSpec:
    method: str
    lag: int
    seed: int
    settings: BenchSettings


def response_logits(policy: TinyTransformer, sequences: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """(B, H, V) logits that predict the response tokens of ``sequences`` (B, P + H)."""
    logits, _ = policy(sequences[:, :-1])
    return logits[:, prompt_len - 1 :]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def group_normalized(rewards: torch.Tensor, baseline: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """(R − b) / (std of R in the group + eps): GRPO's advantage with any baseline b."""
    groups = int(group_ids.max()) + 1
    std = rewards.view(groups, -1).std(dim=1, unbiased=False)[group_ids]
    return (rewards - baseline) / (std + ADV_EPS)


def advantages(method: Method, ro: Rollout, old_logprobs: torch.Tensor, old_logits: torch.Tensor) -> torch.Tensor:
    if method.baseline == "opob":  # VCPO: b* = Σ W R / Σ W, W = min(ρ, 8)² ‖g‖² (logit-gradient proxy)
        log_rho = (old_logprobs - ro.rollout_logprobs).sum(-1)
        sq_norms = sa.baselines.logit_grad_sq_norms(old_logits, ro.responses)
        b = sa.baselines.min_variance_baseline(
            ro.rewards, ro.group_ids, log_is_weights=log_rho, grad_sq_norms=sq_norms, ratio_cap=8.0
        )
    else:
        b = sa.baselines.group_mean_baseline(ro.rewards, ro.group_ids)
    return group_normalized(ro.rewards, b, ro.group_ids)


@torch.no_grad()
def evaluate(policy: TinyTransformer, task: Task, prompts: torch.Tensor) -> tuple[float, float]:
    """Greedy exact-match success on ``prompts``, and the mean token entropy along the greedy path."""
    responses, logits = generate(policy, prompts, task.length, greedy=True)
    success = task.token_correct(prompts, responses).all(dim=1).float().mean()
    logp = torch.log_softmax(logits, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1).mean()
    return float(success), float(entropy)


class Trainer:
    def __init__(self, spec: RunSpec) -> None:
        s, self.spec = spec.settings, spec
        self.method = get_method(spec.method)
        self.task = Task(s.task, s.symbols, s.length, s.reward)
        cfg = ModelConfig(self.task.vocab, self.task.seq_len, s.d_model, s.n_heads, s.n_layers, s.head_scale)
        torch.manual_seed(spec.seed)  # the initial weights
        self.policy = TinyTransformer(cfg)
        engine = dataclasses.replace(s.engine, lag=spec.lag, topk=TOPK if self.method.topk else 0)
        self.engine = RolloutEngine(cfg, self.task, engine, seed=1_000_003 * spec.seed + 1)
        self.gen = torch.Generator().manual_seed(1_000_003 * spec.seed + 2)  # prompts and minibatch order
        self.eval_prompts = self.task.sample_prompts(s.eval_prompts, torch.Generator().manual_seed(-1 - spec.seed))
        self.loss_fn = self.method.build_loss()
        self.optimizer = self.method.build_optimizer(self.policy.parameters(), s.lr)
        self.gac = self.method.build_gac(list(self.policy.parameters()))
        self.nonfinite = 0

    def step(self) -> dict[str, float]:
        s, method = self.spec.settings, self.method
        prompts = self.task.sample_prompts(s.prompts_per_step, self.gen)
        ro = self.engine.rollout(prompts, s.group_size)
        sequences, P = ro.sequences, self.task.prompt_len
        mask = torch.ones_like(ro.responses, dtype=torch.bool)

        with torch.no_grad():  # the trainer's recomputation: π_old = the current weights
            old_logits = response_logits(self.policy, sequences, P)
            old_logprobs = token_logprobs(old_logits, ro.responses)
        ess = sa.effective_sample_size(old_logprobs - ro.rollout_logprobs, mask)
        adv = advantages(method, ro, old_logprobs, old_logits)
        old_for_loss = old_logprobs if method.old == "recomputed" else ro.rollout_logprobs

        cosines = []
        order = torch.randperm(sequences.shape[0], generator=self.gen)
        for idx in order.chunk(s.minibatches):
            logits = response_logits(self.policy, sequences[idx], P)
            logprobs = token_logprobs(logits, ro.responses[idx])
            topk = {}
            if method.topk:
                assert ro.topk_ids is not None
                topk = {
                    "topk_ids": ro.topk_ids[idx],
                    "topk_logprobs": ro.topk_logprobs[idx],
                    "current_topk_logprobs": sa.divergence.gather_topk_logprobs(logits, ro.topk_ids[idx]),
                }
            batch = sa.PolicyBatch(
                logprobs=logprobs,
                advantages=adv[idx],
                mask=mask[idx],
                old_logprobs=old_for_loss[idx],
                rollout_logprobs=ro.rollout_logprobs[idx],
                **topk,
            )
            loss = self.loss_fn(batch).loss
            if not torch.isfinite(loss):
                self.nonfinite += 1  # skip the update: a non-finite loss counts as a collapse
                continue
            self.optimizer.zero_grad()
            loss.backward()
            gac_metrics = self.gac.apply()
            if not math.isnan(gac_metrics["gac/cos"]):
                cosines.append(gac_metrics["gac/cos"])
            if self.gac.should_skip:
                continue
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), GRAD_CLIP)
            if method.ess_lr:  # ESS of this optimizer minibatch, current weights vs μ
                self.optimizer.step(sa.effective_sample_size(logprobs.detach() - batch.rollout_logprobs, batch.mask))
            else:
                self.optimizer.step()
        return {
            "ess_ratio": ess.ess_ratio,
            "grad_cos": statistics.fmean(cosines) if cosines else math.nan,
            "reward": float(ro.rewards.mean()),
        }

    def run(self) -> dict[str, Any]:
        s = self.spec.settings
        start, cpu_start = time.perf_counter(), time.process_time()
        traces: dict[str, list[float]] = {"ess_ratio": [], "grad_cos": [], "reward": []}
        eval_steps, success, entropy = [], [], []
        self.engine.publish(self.policy, version=0)
        for step in range(1, s.steps + 1):
            for key, value in self.step().items():
                traces[key].append(value)
            self.engine.publish(self.policy, version=step)
            if step % s.eval_every == 0 or step == s.steps:
                ok, ent = evaluate(self.policy, self.task, self.eval_prompts)
                eval_steps.append(step)
                success.append(ok)
                entropy.append(ent)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        return summarize(self.spec, eval_steps, success, entropy, traces, self.nonfinite, wall, cpu)


def summarize(
    spec: RunSpec,
    eval_steps: list[int],
    success: list[float],
    entropy: list[float],
    traces: dict[str, list[float]],
    nonfinite: int,
    wall: float,
    cpu: float,
) -> dict[str, Any]:
    """One results.json record (see docs/benchmark.md for every field)."""
    tail = max(1, math.ceil(0.1 * len(success)))  # "final" = mean of the last 10% of evaluations
    final, peak = statistics.fmean(success[-tail:]), max(success)
    fell = peak >= COLLAPSE_MIN_PEAK and final < 0.5 * peak
    reason = "non-finite loss" if nonfinite else ("fell below half its peak" if fell else "")
    finite_cos = [c for c in traces["grad_cos"] if not math.isnan(c)]
    return {
        "method": spec.method,
        "task": spec.settings.task,
        "lag": spec.lag,
        "seed": spec.seed,
        "final_success": final,
        "auc": statistics.fmean(success),
        "peak_success": peak,
        "collapsed": bool(reason),
        "collapse_reason": reason,
        "final_entropy": statistics.fmean(entropy[-tail:]),
        "median_ess_ratio": statistics.median(traces["ess_ratio"]),
        "median_grad_cos": statistics.median(finite_cos) if finite_cos else math.nan,
        "nonfinite_losses": nonfinite,
        "wall_time_s": wall,
        "cpu_time_s": cpu,
        "steps": spec.settings.steps,
        "eval_steps": eval_steps,
        "success": success,
        "entropy": entropy,
        **{f"trace_{k}": v for k, v in traces.items()},
    }


def run(spec: RunSpec) -> dict[str, Any]:
    """Run one (method, lag, seed) on one thread; deterministic for a given spec."""
    torch.set_num_threads(1)
    return Trainer(spec).run()
