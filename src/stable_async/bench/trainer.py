"""The simulated asynchronous trainer: one run of one method at one lag, one staleness model, one seed.

It uses only the public `stable_async` API (`sa.PolicyBatch`, `sa.get_loss`, corrections,
`sa.effective_sample_size`, `sa.ESSScaledLR`, `sa.GradientAlignmentControl`, `sa.baselines`,
`sa.diagnostics`, `sa.divergence`), as a user's training loop would. One training step t:

1. the engine serves a batch under the staleness model (`engine.RolloutEngine`), each token
   tagged with the version that sampled it and its log μ;
2. the trainer recomputes the batch's log-probs on its current weights (π_old = π_θ at the
   time of use) and measures the drift: ESS/N of π_θ against μ at the sequence level
   (w_i = Π_t π_θ/μ) and the token level, and the mean per-token k3 KL of μ against π_θ;
   advantages (R − b)/(group std + ε), b the group mean or VCPO's OPOB;
3. ``epochs`` × ``minibatches`` optimizer steps (default 1 × 1: one step per rollout batch),
   each: loss → backward → the method's GAC, if any → gradient clipping → optimizer step
   (ESS-scaled for VCPO). The sum of the step's raw minibatch gradients is the step gradient;
4. the cosine between this step's gradient and the previous step's (one number per training
   step, each gradient from its own rollout batch), and, with several minibatches, the cosine
   between consecutive minibatch gradients of the same step (reported separately);
5. the trainer publishes its weights (version t + 1); every ``eval_every`` steps greedy
   success on held-out prompts, and the entropy.

A governed method (``Method.governor``) runs a `stable_async.StalenessGovernor` with
``max_bound`` = the lag: step t's batch is served under the bound k_t (versions in
[t − k_t, t]), and after the step the governor reads the drift measured in 2. (sequence and token
ESS/N, k3 mismatch KL) and the step cosine of 4. — all measured on step t's batch — and sets
k_{t+1}. So each bound is decided from the previous step's batch. ``trace_bound`` records k_t.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import functional_call, grad, vmap

import stable_async as sa
from stable_async.bench.engine import OFFLINE, Lag, Rollout, RolloutEngine
from stable_async.bench.methods import ADV_EPS, GRAD_CLIP, TOPK, Method, get_method
from stable_async.bench.model import ModelConfig, TinyTransformer, generate
from stable_async.bench.presets import BenchSettings
from stable_async.bench.tasks import Task
from stable_async.bench.warmstart import warm_started_policy

COLLAPSE_MIN_PEAK = 0.1  # a collapse needs a peak worth falling from


@dataclass(frozen=True)
class RunSpec:
    method: str
    lag: Lag  # an integer k, or "offline"
    seed: int
    settings: BenchSettings


def response_logits(policy: TinyTransformer, sequences: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """(B, H, V) logits that predict the response tokens of ``sequences`` (B, P + H)."""
    logits, _ = policy(sequences[:, :-1])
    return logits[:, prompt_len - 1 :]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def sequence_grad_sq_norms(policy: TinyTransformer, sequences: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Exact ‖∇_θ log π_θ(τ_i)‖² per sequence (B,), one per-sample gradient each (torch.func).

    The same numbers as `sa.baselines.per_sequence_grad_sq_norms` (one backward per sequence;
    the tests compare them), computed in one vectorized pass.
    """
    params = {k: v.detach() for k, v in policy.named_parameters()}

    def sequence_logprob(p: dict[str, torch.Tensor], seq: torch.Tensor) -> torch.Tensor:
        logits, _ = functional_call(policy, p, (seq[None, :-1],))
        return token_logprobs(logits[:, prompt_len - 1 :], seq[None, prompt_len:]).sum()

    grads = vmap(grad(sequence_logprob), in_dims=(None, 0))(params, sequences)
    return sum(g.pow(2).flatten(1).sum(1) for g in grads.values())


def group_normalized(rewards: torch.Tensor, baseline: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """(R − b) / (std of R in the group + eps): GRPO's advantage with any baseline b."""
    groups = int(group_ids.max()) + 1
    std = rewards.view(groups, -1).std(dim=1, unbiased=False)[group_ids]
    return (rewards - baseline) / (std + ADV_EPS)


@torch.no_grad()
def evaluate(policy: TinyTransformer, task: Task, prompts: torch.Tensor, seed: int) -> tuple[float, float, float]:
    """Exact-match success of temperature-1 samples (pass@1) and of greedy answers on ``prompts``,
    and the mean token entropy along the sampled answers. ``seed`` fixes the samples."""
    sampled, logits = generate(policy, prompts, task.length, torch.Generator().manual_seed(seed))
    greedy, _ = generate(policy, prompts, task.length, greedy=True)
    logp = torch.log_softmax(logits, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1).mean()
    exact = [float(task.token_correct(prompts, r).all(dim=1).float().mean()) for r in (sampled, greedy)]
    return exact[0], exact[1], float(entropy)


def flat_cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    dot = sum(float((x * y).sum()) for x, y in zip(a, b))
    na = math.sqrt(sum(float(x.pow(2).sum()) for x in a))
    nb = math.sqrt(sum(float(y.pow(2).sum()) for y in b))
    return dot / (na * nb) if na > 0 and nb > 0 else math.nan


class StepCosine:
    """cos(g_t, g_{t−1}) between full step gradients, measured by the library's GAC in monitor mode.

    ``observe(step_grads)`` is called once per training step with the sum of that step's raw
    minibatch gradients; the monitor sees them as the gradients of shadow tensors.
    """

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.shadow = [torch.zeros_like(p) for p in params]
        self.monitor = sa.GradientAlignmentControl(self.shadow, mode="monitor")

    def observe(self, step_grads: list[torch.Tensor]) -> float:
        for s, g in zip(self.shadow, step_grads):
            s.grad = g
        return self.monitor.apply()["gac/cos"]


class Trainer:
    def __init__(self, spec: RunSpec) -> None:
        s, self.spec = spec.settings, spec
        self.method: Method = get_method(spec.method)
        self.task = Task(s.task, s.symbols, s.length, s.reward)
        cfg = ModelConfig(self.task.vocab, self.task.seq_len, s.d_model, s.n_heads, s.n_layers)
        self.policy = warm_started_policy(self.task, cfg, s.sft_steps, s.sft_lr, s.sft_noise, s.sft_batch, spec.seed)
        engine = dataclasses.replace(s.engine, lag=spec.lag, topk=TOPK if self.method.topk else 0)
        self.engine = RolloutEngine(cfg, self.task, engine, seed=1_000_003 * spec.seed + 1)
        self.gen = torch.Generator().manual_seed(1_000_003 * spec.seed + 2)  # prompts and minibatch order
        self.eval_prompts = self.task.sample_prompts(s.eval_prompts, torch.Generator().manual_seed(-1 - spec.seed))
        self.loss_fn = self.method.build_loss()
        self.params: list[torch.Tensor] = list(self.policy.parameters())
        self.optimizer = self.method.build_optimizer(self.params, s.lr)
        self.gac = self.method.build_gac(self.params)
        self.step_cosine = StepCosine(self.params)
        if self.method.governor is not None and isinstance(spec.lag, str):
            raise ValueError(f"lag: a governed method ({spec.method}) needs an integer bound, got {spec.lag!r}")
        self.governor = self.method.build_governor(int(spec.lag)) if self.method.governor is not None else None
        self.version = 0
        self.nonfinite = 0

    def advantages(self, ro: Rollout, old_logprobs: torch.Tensor) -> torch.Tensor:
        if self.method.baseline == "opob":
            # VCPO's reference: W = min(ρ, 8)² ρ² ‖∇ log π(τ)‖² with exact per-trajectory norms, group scope.
            sq_norms = sequence_grad_sq_norms(self.policy, ro.sequences, self.task.prompt_len)
            b = sa.baselines.min_variance_baseline(
                ro.rewards,
                ro.group_ids,
                log_is_weights=(old_logprobs - ro.rollout_logprobs).sum(-1),
                grad_sq_norms=sq_norms,
                mode="reference_code",
                ratio_cap=8.0,
            )
        else:
            b = sa.baselines.group_mean_baseline(ro.rewards, ro.group_ids)
        return group_normalized(ro.rewards, b, ro.group_ids)

    def _batch(self, ro: Rollout, idx: torch.Tensor, adv: torch.Tensor, old: torch.Tensor) -> sa.PolicyBatch:
        logits = response_logits(self.policy, ro.sequences[idx], self.task.prompt_len)
        logprobs = token_logprobs(logits, ro.responses[idx])
        extra: dict[str, Any] = {}
        if self.method.topk:
            assert ro.topk_ids is not None and ro.topk_logprobs is not None
            extra = {
                "topk_ids": ro.topk_ids[idx],
                "topk_logprobs": ro.topk_logprobs[idx],
                "current_topk_logprobs": sa.divergence.gather_topk_logprobs(logits, ro.topk_ids[idx]),
            }
        old_for_loss = {"recomputed": old[idx], "rollout": ro.rollout_logprobs[idx], "current": None}[self.method.old]
        return sa.PolicyBatch(
            logprobs=logprobs,
            advantages=adv[idx],
            mask=torch.ones_like(logprobs, dtype=torch.bool),
            old_logprobs=old_for_loss,
            rollout_logprobs=ro.rollout_logprobs[idx],
            versions=ro.versions[idx],
            current_version=self.version,
            **extra,
        )

    def step(self) -> dict[str, float]:
        s = self.spec.settings
        prompts = self.task.sample_prompts(s.prompts_per_step, self.gen)
        bound = None if self.governor is None else self.governor.bound  # decided on the previous step's batch
        ro = self.engine.rollout(prompts, s.group_size, bound=bound)
        mask = torch.ones_like(ro.responses, dtype=torch.bool)
        with torch.no_grad():  # the trainer's recomputation: π_θ at the time of use
            old_logprobs = token_logprobs(
                response_logits(self.policy, ro.sequences, self.task.prompt_len), ro.responses
            )
        log_w = old_logprobs - ro.rollout_logprobs
        drift = {
            "ess_ratio": sa.effective_sample_size(log_w, mask, level="sequence").ess_ratio,
            "token_ess_ratio": sa.effective_sample_size(log_w, mask, level="token").ess_ratio,
            "mismatch_kl": float(
                sa.diagnostics.mismatch_kl(old_logprobs, ro.rollout_logprobs, mask)["rollout_corr/k3_kl"]
            ),
            "staleness": float(self.version - ro.versions.float().mean()),
        }
        adv = self.advantages(ro, old_logprobs)

        step_grads = [torch.zeros_like(p) for p in self.params]
        previous_minibatch: list[torch.Tensor] | None = None
        within = []
        for _ in range(s.epochs):
            order = torch.randperm(ro.responses.shape[0], generator=self.gen)
            for idx in order.chunk(s.minibatches):
                batch = self._batch(ro, idx, adv, old_logprobs)
                loss = self.loss_fn(batch).loss
                if not torch.isfinite(loss):
                    self.nonfinite += 1  # skip the update: a non-finite loss counts as a collapse
                    continue
                self.optimizer.zero_grad()
                loss.backward()
                raw = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in self.params]
                for acc, g in zip(step_grads, raw):
                    acc.add_(g)
                if previous_minibatch is not None:
                    within.append(flat_cosine(raw, previous_minibatch))
                previous_minibatch = raw
                if self.gac is not None:
                    self.gac.apply()
                    if self.gac.should_skip:
                        continue
                torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP)
                if isinstance(self.optimizer, sa.ESSScaledLR):  # method.ess_lr: ESS/N, current weights vs μ
                    log_w = batch.logprobs.detach() - batch.require("rollout_logprobs", "ESS-LR")
                    self.optimizer.step(sa.effective_sample_size(log_w, batch.mask))  # sequence level
                else:
                    self.optimizer.step()
        out = {
            **drift,
            "grad_cos": self.step_cosine.observe(step_grads),
            "within_batch_cos": statistics.fmean(within) if within else math.nan,
            "reward": float(ro.rewards.mean()),
        }
        if self.governor is not None and bound is not None:
            out["bound"] = bound
            self.governor.update(
                ess_ratio=drift["ess_ratio"],
                token_ess_ratio=drift["token_ess_ratio"],
                mismatch_kl=drift["mismatch_kl"],
                grad_cos=None if math.isnan(out["grad_cos"]) else out["grad_cos"],  # none at the first step
            )
        return out

    def run(self) -> dict[str, Any]:
        s = self.spec.settings
        start, cpu_start = time.perf_counter(), time.process_time()
        traces: dict[str, list[float]] = {}
        evals: dict[str, list[float]] = {"eval_steps": [], "success": [], "greedy_success": [], "entropy": []}

        def record(step: int) -> None:
            values = evaluate(self.policy, self.task, self.eval_prompts, seed=1_000_003 * self.spec.seed + step)
            for key, value in zip(evals, (step, *values)):
                evals[key].append(value)

        record(0)
        self.engine.publish(self.policy, version=0)
        for step in range(1, s.steps + 1):
            for key, value in self.step().items():
                traces.setdefault(key, []).append(value)
            self.version = step
            self.engine.publish(self.policy, version=step)
            if step % s.eval_every == 0 or step == s.steps:
                record(step)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        return summarize(self.spec, evals, traces, self.nonfinite, wall, cpu)


def _median(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan


def _fixed_bound(lag: Lag) -> float | None:
    return None if lag == OFFLINE else float(lag)


def summarize(
    spec: RunSpec,
    evals: dict[str, list[float]],
    traces: dict[str, list[float]],
    nonfinite: int,
    wall: float,
    cpu: float,
) -> dict[str, Any]:
    """One results.json record (docs/benchmark.md lists every field). Evaluation 0 is the warm start."""
    success, entropy = evals["success"], evals["entropy"]
    trained = success[1:]
    tail = max(1, math.ceil(0.1 * len(trained)))  # "final" = mean of the last 10% of evaluations
    final, peak = statistics.fmean(trained[-tail:]), max(trained)
    fell = peak >= COLLAPSE_MIN_PEAK and final < 0.5 * peak
    reason = "non-finite loss" if nonfinite else ("fell below half its peak" if fell else "")
    s = spec.settings
    return {
        "method": spec.method,
        "task": s.task,
        "reward": s.reward,
        "length": s.length,
        "lag": spec.lag,
        "staleness": s.engine.staleness if spec.lag != OFFLINE else OFFLINE,
        "engine_staleness": s.engine.staleness,
        "seed": spec.seed,
        "lr": get_method(spec.method).learning_rate() if s.lr is None else s.lr,
        "initial_success": success[0],
        "final_success": final,
        "final_greedy_success": statistics.fmean(evals["greedy_success"][1:][-tail:]),
        "auc": statistics.fmean(trained),
        "peak_success": peak,
        "collapsed": bool(reason),
        "collapse_reason": reason,
        "final_entropy": statistics.fmean(entropy[-tail:]),
        "median_ess_ratio": _median(traces["ess_ratio"]),
        "median_token_ess_ratio": _median(traces["token_ess_ratio"]),
        "median_mismatch_kl": _median(traces["mismatch_kl"]),
        "median_grad_cos": _median(traces["grad_cos"]),
        "median_within_batch_cos": _median(traces["within_batch_cos"]),
        "mean_staleness": statistics.fmean(traces["staleness"]),
        "mean_bound": statistics.fmean(traces["bound"]) if "bound" in traces else _fixed_bound(spec.lag),
        "sim_time_to_90": None,  # filled in by report.annotate (needs the synchronous cells)
        "nonfinite_losses": nonfinite,
        "wall_time_s": wall,
        "cpu_time_s": cpu,
        "steps": s.steps,
        **evals,
        **{f"trace_{k}": v for k, v in traces.items()},
    }


def run(spec: RunSpec) -> dict[str, Any]:
    """Run one (method, lag, seed) on one thread; deterministic for a given spec."""
    torch.set_num_threads(1)
    return Trainer(spec).run()
