"""Staleness models, the offline control, the cost model and the per-step gradient cosine."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import stable_async as sa
from stable_async.bench import trainer as trainer_module
from stable_async.bench.costmodel import CostModel, asynchronous_times, synchronous_times
from stable_async.bench.engine import EngineSettings, RolloutEngine
from stable_async.bench.model import ModelConfig, TinyTransformer
from stable_async.bench.presets import PRESETS
from stable_async.bench.tasks import Task
from stable_async.bench.trainer import RunSpec, Trainer, flat_cosine, sequence_grad_sq_norms, token_logprobs

TASK = Task("reversal", 4, 6)
CFG = ModelConfig(TASK.vocab, TASK.seq_len, d_model=16, n_heads=2, n_layers=1)
TINY = PRESETS["tiny"].blocks[0].settings


def _policies(n: int) -> list[TinyTransformer]:
    out = []
    for v in range(n):
        torch.manual_seed(100 + v)  # a visibly different policy per version
        out.append(TinyTransformer(CFG))
    return out


def _engine(**kw) -> RolloutEngine:
    return RolloutEngine(CFG, TASK, EngineSettings(**kw), seed=0)


def _serve(engine: RolloutEngine, policies: list[TinyTransformer], steps: int, groups: int = 8, size: int = 2):
    """Publish versions 0..steps-1 and yield one batch after each publication."""
    for t in range(steps):
        engine.publish(policies[t], t)
        prompts = TASK.sample_prompts(groups, torch.Generator().manual_seed(t))
        yield t, engine.rollout(prompts, size)


def _engine_logprobs(engine: RolloutEngine, version: int, sequences: torch.Tensor) -> torch.Tensor:
    """log μ_version of every response token, recomputed from the engine's stored copy (no noise)."""
    model = TinyTransformer(CFG)
    model.load_state_dict(engine.snapshots[version])
    logits, _ = model(sequences[:, :-1])
    return token_logprobs(logits[:, TASK.prompt_len - 1 :], sequences[:, TASK.prompt_len :])


def test_bounded_versions_lie_in_the_window_and_mix():
    k = 3
    engine = _engine(lag=k, staleness="bounded", actors=4)
    seen = set()
    for t, ro in _serve(engine, _policies(12), 12):
        lo = max(0, t - k)
        assert ro.versions.min() >= lo and ro.versions.max() <= t
        assert (ro.versions == ro.versions[:, :1]).all()  # one version per sequence
        assert (ro.versions.view(8, 2, -1) == ro.versions.view(8, 2, -1)[:, :1]).all()  # per group
        seen.update(ro.versions[:, 0].tolist())
        if t >= k:
            assert len(engine.snapshots) == k + 1  # only the usable versions are kept
    assert len(seen) > 8  # the whole window is used, not only its ends
    assert any(len(set(ro.versions[:, 0].tolist())) > 1 for _, ro in _serve(_engine(lag=k), _policies(8), 8))


def test_fixed_staleness_serves_exactly_k_old():
    served = _serve(_engine(lag=2, staleness="fixed"), _policies(6), 6)
    assert [int(ro.versions.unique()) for _, ro in served] == [0, 0, 0, 1, 2, 3]


@pytest.mark.parametrize("staleness", ["bounded", "partial"])
def test_behavior_logprobs_come_from_the_version_that_sampled_each_token(staleness):
    engine = _engine(lag=4, staleness=staleness, bf16_weights=False)
    switched = 0
    for t, ro in _serve(engine, _policies(10), 10):
        assert (ro.versions.min() >= max(0, t - 4)) and ro.versions.max() <= t
        assert (ro.versions.diff(dim=1) >= 0).all()  # a sequence only moves to newer weights
        switched += int((ro.versions[:, 0] != ro.versions[:, -1]).sum())
        expected = torch.zeros_like(ro.rollout_logprobs)
        for v in ro.versions.unique().tolist():
            expected = torch.where(ro.versions == v, _engine_logprobs(engine, v, ro.sequences), expected)
        torch.testing.assert_close(ro.rollout_logprobs, expected, atol=1e-5, rtol=0)
    assert (switched > 0) == (staleness == "partial")


def test_offline_control_never_refreshes():
    engine = _engine(lag="offline", bf16_weights=False)
    policies = _policies(6)
    for _, ro in _serve(engine, policies, 6):
        assert (ro.versions == 0).all() and list(engine.snapshots) == [0]
        torch.testing.assert_close(ro.rollout_logprobs, _engine_logprobs(engine, 0, ro.sequences), atol=1e-5, rtol=0)
    fresh = TinyTransformer(CFG)
    fresh.load_state_dict(engine.snapshots[0])
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), policies[0].state_dict().values()))
    record = trainer_module.run(RunSpec("ppo", "offline", 0, TINY))
    assert record["trace_staleness"] == [float(t) for t in range(TINY.steps)]  # always version 0


def test_cost_model_hand_computed():
    # 2 slots, batches of 2 sequences of 2 tokens (1 time unit each), 3 units per training step.
    model = CostModel(batch=2, slots=2, token_time=1.0, train_time=3.0)
    lengths = [2] * 40
    # Synchronous: generate (2) then train (3): a step every 5.
    assert synchronous_times(model, 4, lengths) == [5.0, 10.0, 15.0, 20.0]
    # k = 1: batch 1 is generated during step 0 (2 → 4); the trainer becomes the bottleneck, a
    # step every 3: 2 + 3 = 5, 8, 11, 14.
    assert asynchronous_times(model, 4, 1, lengths) == [5.0, 8.0, 11.0, 14.0]
    assert asynchronous_times(model, 4, 0, lengths) == synchronous_times(model, 4, lengths)
    # One long sequence: sync waits for it in its batch; async (k = 1) lets the other slot run on.
    model = CostModel(batch=2, slots=2, token_time=1.0, train_time=1.0)
    lengths = [1, 5, 1, 1, 1, 1, 1, 1, 1, 1]
    assert synchronous_times(model, 2, lengths) == [6.0, 8.0]
    # async: s0 ends 1, s2 (starts 1) ends 2: batch 0 = the first two to finish, step 0 trains
    # 2 → 3; s3 starts at 2 (the 4th start, the cap (0 + 1 + 1)·2) and ends 3; at 3 the version
    # is 1, so s4 starts and ends 4: batch 1 = {s3, s4}, step 1 trains 4 → 5. s1 is still running.
    assert asynchronous_times(model, 2, 1, lengths) == [3.0, 5.0]


def test_per_step_cosine_uses_one_gradient_per_training_step(monkeypatch):
    monkeypatch.setattr(trainer_module, "GRAD_CLIP", 1e12)  # the optimizer sees the raw minibatch gradients
    settings = dataclasses.replace(TINY, minibatches=2, steps=4, reward="tokens")  # dense: no zero gradient
    tr = Trainer(RunSpec("ppo", 1, 0, settings))
    seen_minibatch, seen_step = [], []
    real_step = tr.optimizer.step

    def spy_step(*args, **kwargs):
        seen_minibatch.append([p.grad.detach().clone() for p in tr.params])
        return real_step(*args, **kwargs)

    real_observe = tr.step_cosine.observe

    def spy_observe(step_grads):
        seen_step.append([g.clone() for g in step_grads])
        return real_observe(step_grads)

    monkeypatch.setattr(tr.optimizer, "step", spy_step)
    monkeypatch.setattr(tr.step_cosine, "observe", spy_observe)
    record = tr.run()
    assert len(seen_step) == settings.steps and len(seen_minibatch) == 2 * settings.steps
    for t, step_grads in enumerate(seen_step):  # the step gradient is the sum of its minibatch gradients
        for g, a, b in zip(step_grads, seen_minibatch[2 * t], seen_minibatch[2 * t + 1]):
            torch.testing.assert_close(g, a + b)
    cos = record["trace_grad_cos"]
    assert math.isnan(cos[0]) and all(math.isfinite(c) for c in cos[1:])
    for t in range(1, settings.steps):
        assert cos[t] == pytest.approx(flat_cosine(seen_step[t], seen_step[t - 1]), abs=1e-6)
    within = record["trace_within_batch_cos"]
    for t in range(settings.steps):
        assert within[t] == pytest.approx(flat_cosine(seen_minibatch[2 * t + 1], seen_minibatch[2 * t]), abs=1e-6)


def test_exact_sequence_grad_norms_match_the_library():
    policy = TinyTransformer(CFG)
    seqs = torch.cat([TASK.sample_prompts(5, torch.Generator().manual_seed(0)), torch.randint(4, (5, 6))], dim=1)
    logits, _ = policy(seqs[:, :-1])
    logprobs = token_logprobs(logits[:, TASK.prompt_len - 1 :], seqs[:, TASK.prompt_len :])
    expected = sa.baselines.per_sequence_grad_sq_norms(logprobs, policy.parameters())
    torch.testing.assert_close(sequence_grad_sq_norms(policy, seqs, TASK.prompt_len), expected, rtol=1e-4, atol=1e-6)


def _nucleus_logprobs(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Brute force: keep each id whose strictly more probable ids hold < top_p of the mass, renormalize."""
    p = torch.softmax(logits.double(), dim=-1)
    ahead = (p.unsqueeze(-1) * (p.unsqueeze(-1) > p.unsqueeze(-2))).sum(-2)  # mass of the more probable ids
    kept = torch.where(ahead < top_p, p, torch.zeros_like(p))
    return torch.log(kept / kept.sum(-1, keepdim=True))


def test_top_p_engine_samples_and_reports_its_truncated_distribution():
    top_p = 0.6
    engine = _engine(lag=0, bf16_weights=False, top_p=top_p)
    for _, ro in _serve(engine, _policies(3), 3):
        model = TinyTransformer(CFG)
        model.load_state_dict(engine.snapshots[int(ro.versions.max())])
        logits, _ = model(ro.sequences[:, :-1])
        logits = logits[:, TASK.prompt_len - 1 :]
        expected = _nucleus_logprobs(logits, top_p).gather(-1, ro.responses.unsqueeze(-1)).squeeze(-1)
        assert torch.isfinite(expected).all()  # every sampled token lies in the top-p set
        torch.testing.assert_close(ro.rollout_logprobs.double(), expected, atol=1e-5, rtol=0)
        full = token_logprobs(logits, ro.responses)
        assert (ro.rollout_logprobs >= full - 1e-6).all()  # renormalized: μ ≥ the full softmax


def test_top_p_setting_is_validated():
    for bad in (0.0, 1.5, True, "0.9"):
        with pytest.raises(ValueError, match="top_p"):
            EngineSettings(top_p=bad)
