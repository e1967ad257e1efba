"""StepAccumulator and StableStep: one object per optimizer, bounded memory, the step's ESS exactly.

Issue 12 D2: the veRL adapter kept one process-global ESS channel (two models interfered, one
optimizer's zero_grad erased another's records, records grew without an optimizer alive). These
tests pin the core replacement: everything lives on the accumulator / step instance.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import stable_async as sa
from sa_testing import random_mask
from stable_async.optim import accumulator as accumulator_module
from stable_async.optim import step as step_module
from stable_async.optim.accumulator import STATISTICS


def micro_batches(gen, widths=(5, 9, 3), B=4, scale=0.7):
    """(log_weights, mask) pairs of different widths, one with a fully masked row."""
    out = []
    for i, T in enumerate(widths):
        lw = scale * torch.randn(B, T, generator=gen, dtype=torch.float64)
        mask = random_mask(B, T, gen)
        if i == 1:
            mask[2] = False
        out.append((lw, mask))
    return out


def concatenated(pieces):
    width = max(lw.shape[1] for lw, _ in pieces)
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
    return torch.cat([pad(lw) for lw, _ in pieces]), torch.cat([pad(m) for _, m in pieces])


# ---------------------------------------------------------------------- statistics
@pytest.mark.parametrize("scale", [0.7, 30.0, 1e4])
def test_step_ess_equals_ess_of_the_concatenated_micro_batches(gen, scale):
    pieces = micro_batches(gen, scale=scale)
    acc = sa.StepAccumulator()
    for lw, mask in pieces:
        acc.record_log_weights(lw, mask)
    stats = acc.reduce()
    log_w, mask = concatenated(pieces)
    for level, got in (("sequence", stats.sequence), ("token", stats.token)):
        ref = sa.effective_sample_size(log_w, mask, level=level)
        assert got.n == ref.n
        assert got.ess == pytest.approx(ref.ess, rel=1e-10)
        assert got.ess_ratio == pytest.approx(ref.ess_ratio, rel=1e-10)
    assert stats.num_records == len(pieces)


def test_mismatch_statistics_hand_formulas(gen):
    pieces = micro_batches(gen)
    acc = sa.StepAccumulator()
    for lw, mask in pieces:
        acc.record_log_weights(lw, mask)
    stats = acc.reduce()
    values = torch.cat([lw[m] for lw, m in pieces])
    assert stats.mismatch_kl == pytest.approx(float((-values).mean()), rel=1e-12)
    k3 = torch.exp(values) - 1 - values
    assert stats.mismatch_k3_kl == pytest.approx(float(k3.mean()), rel=1e-12)
    assert stats.log_ratio_max == float(values.max())
    assert stats.log_ratio_min == float(values.min())
    metrics = stats.metrics()
    assert metrics["vcpo/ess_num_seqs"] == stats.sequence.n
    assert metrics["vcpo/ess"] == stats.sequence.ess
    assert metrics["vcpo/token_ess_ratio"] == stats.token.ess_ratio


def test_hand_computed_two_sequence_ess():
    # λ = (log 1, log 3): ESS = (1 + 3)² / (1 + 9) = 1.6, N = 2.
    acc = sa.StepAccumulator()
    acc.record_log_weights(torch.tensor([[0.0, 0.0]], dtype=torch.float64), torch.tensor([[True, False]]))
    acc.record_log_weights(torch.tensor([[math.log(3.0)]], dtype=torch.float64))
    stats = acc.reduce()
    assert stats.sequence.n == 2
    assert stats.sequence.ess == pytest.approx(1.6, rel=1e-14)
    assert stats.sequence.ess_ratio == pytest.approx(0.8, rel=1e-14)


def test_record_of_a_policy_batch_uses_the_behavior_logprobs(tensors):
    batch = sa.PolicyBatch(**tensors)
    acc = sa.StepAccumulator()
    acc.record(batch)
    ref = sa.effective_sample_size(batch.logprobs.detach() - batch.rollout_logprobs, batch.mask)
    assert acc.reduce().sequence.ess == pytest.approx(ref.ess, rel=1e-12)


def test_nothing_recorded_gives_n_zero():
    stats = sa.StepAccumulator().reduce()
    assert (stats.sequence.n, stats.sequence.ess_ratio, stats.token.n) == (0.0, 1.0, 0.0)
    assert math.isnan(stats.mismatch_kl)
    assert stats.metrics() == {"vcpo/ess_num_seqs": 0.0, "vcpo/ess_num_tokens": 0.0}


def test_nonfinite_log_weight_raises_at_reduce_and_masked_one_is_ignored():
    acc = sa.StepAccumulator()
    lw = torch.tensor([[0.1, float("nan")]], dtype=torch.float64)
    acc.record_log_weights(lw, torch.tensor([[True, False]]))
    assert acc.reduce().token.n == 1
    acc.record_log_weights(lw)
    with pytest.raises(ValueError, match="log_weights: 1 NaN/inf"):
        acc.reduce()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"log_weights": torch.zeros(2, 3), "mask": torch.full((2, 3), 0.5)}, ValueError, "mask: expected bool or 0/1"),
        ({"log_weights": torch.zeros(2, 3), "mask": torch.ones(2, 4, dtype=torch.bool)}, ValueError, "mask"),
        ({"log_weights": torch.zeros(3)}, ValueError, "log_weights: expected a \\(B, T\\)"),
        ({"log_weights": torch.zeros(2, 3, dtype=torch.long)}, TypeError, "log_weights: expected a floating"),
        ({"log_weights": torch.zeros(2, 3, device="meta")}, ValueError, "log_weights: .*meta"),
        (
            {"log_weights": torch.zeros(2, 3), "mask": torch.ones(2, 3, dtype=torch.bool, device="meta")},
            ValueError,
            "mask: expected device cpu",
        ),
    ],
)
def test_record_log_weights_rejects_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        sa.StepAccumulator().record_log_weights(**kwargs)


def test_record_rejects_a_non_batch():
    with pytest.raises(TypeError, match="batch: expected a stable_async.PolicyBatch"):
        sa.StepAccumulator().record(torch.zeros(2, 2))


def test_every_statistic_declares_a_known_reduction():
    assert {s.reduction for s in STATISTICS} <= set(accumulator_module.REDUCTIONS)
    assert len({s.name for s in STATISTICS}) == len(STATISTICS)


def test_memory_is_bounded_without_any_optimizer(gen):
    """D2: 200 recorded micro-batches with no optimizer alive keep a fixed vector, no list."""
    acc = sa.StepAccumulator()
    lw, mask = micro_batches(gen)[0]
    for _ in range(200):
        acc.record_log_weights(lw, mask)
    assert acc.state.numel() == len(STATISTICS)
    assert acc.num_records == 200
    assert sum(isinstance(v, list | dict) for v in vars(acc).values()) == 0
    acc.clear()
    assert acc.state is None and acc.num_records == 0


def test_no_module_level_state_changes():
    """The accumulator and step modules hold constants only: using them changes nothing there."""
    before = {m: dict(vars(m)) for m in (accumulator_module, step_module)}
    acc = sa.StepAccumulator()
    acc.record_log_weights(torch.randn(2, 3, dtype=torch.float64))
    p = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    p.grad = torch.ones(2, dtype=torch.float64)
    sa.StableStep(torch.optim.SGD([p], lr=0.1), acc)()
    for module, snapshot in before.items():
        assert dict(vars(module)).keys() == snapshot.keys()
        assert all(vars(module)[k] is v for k, v in snapshot.items())


# ---------------------------------------------------------------------- StableStep
def model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2).double()
    return model, torch.optim.SGD(model.parameters(), lr=0.5)


def fill_grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


def test_stable_step_scales_the_lr_by_the_step_ess(gen):
    model, opt = model_and_optimizer()
    reference = copy.deepcopy(model)
    acc = sa.StepAccumulator()
    step = sa.StableStep(opt, acc)
    pieces = micro_batches(gen)
    for lw, mask in pieces:
        acc.record_log_weights(lw, mask)
    fill_grads(model, 1)
    fill_grads(reference, 1)
    metrics = step()
    log_w, mask = concatenated(pieces)
    ratio = sa.effective_sample_size(log_w, mask).ess_ratio
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.5 * math.sqrt(ratio) * p.grad
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert metrics["vcpo/ess_ratio"] == pytest.approx(ratio, rel=1e-10)
    assert metrics["vcpo/lr_scale"] == pytest.approx(math.sqrt(ratio), rel=1e-10)
    assert metrics["vcpo/ess_missing"] == 0.0
    assert opt.param_groups[0]["lr"] == 0.5  # restored
    assert acc.num_records == 0 and step.stepped


def test_two_models_never_see_each_others_records_or_metrics(gen):
    """D2: model A (on-policy) and model B (off-policy) in one process, each with its own step."""
    model_a, opt_a = model_and_optimizer(0)
    model_b, opt_b = model_and_optimizer(1)
    acc_a, acc_b = sa.StepAccumulator(), sa.StepAccumulator()
    step_a, step_b = sa.StableStep(opt_a, acc_a), sa.StableStep(opt_b, acc_b)
    acc_a.record_log_weights(torch.zeros(4, 5, dtype=torch.float64))  # on-policy: ESS/N = 1
    lw, mask = micro_batches(gen, scale=2.0)[0]
    acc_b.record_log_weights(lw, mask)
    step_a.zero_grad()  # A's zero_grad must not touch B's records
    acc_a.record_log_weights(torch.zeros(4, 5, dtype=torch.float64))
    assert acc_b.num_records == 1
    fill_grads(model_a, 2)
    fill_grads(model_b, 3)
    metrics_a = step_a()
    assert metrics_a["vcpo/lr_scale"] == 1.0 and metrics_a["vcpo/ess_num_seqs"] == 4
    assert acc_b.num_records == 1  # A's step did not drain B
    metrics_b = step_b()
    expected = math.sqrt(sa.effective_sample_size(lw, mask).ess_ratio)
    assert metrics_b["vcpo/lr_scale"] == pytest.approx(expected, rel=1e-10)
    assert metrics_b["vcpo/ess_missing"] == 0.0
    assert step_a.last_metrics == metrics_a  # B's step published nothing into A


def test_plain_step_with_ess_lr_off_clears_only_its_own_accumulator():
    model_a, opt_a = model_and_optimizer(0)
    _, opt_b = model_and_optimizer(1)
    acc_a, acc_b = sa.StepAccumulator(), sa.StepAccumulator()
    step_a = sa.StableStep(opt_a, acc_a, ess_lr=False)
    sa.StableStep(opt_b, acc_b)
    acc_a.record_log_weights(torch.zeros(1, 2, dtype=torch.float64))
    acc_b.record_log_weights(torch.zeros(1, 2, dtype=torch.float64))
    fill_grads(model_a, 0)
    assert step_a() == {}
    assert acc_a.num_records == 0 and acc_b.num_records == 1


def test_gac_skip_does_not_step_and_clears_the_accumulator():
    model, opt = model_and_optimizer()
    gac = sa.GradientAlignmentControl(model.parameters(), mode="skip", threshold=0.5)
    acc = sa.StepAccumulator()
    step = sa.StableStep(opt, acc, gac=gac)
    fill_grads(model, 5)
    acc.record_log_weights(torch.zeros(2, 2, dtype=torch.float64))
    first = step()  # no previous gradient: GAC passes
    assert first["gac/action"] == 0.0 and "gac/cos" not in first  # NaN cos left out
    before = [p.detach().clone() for p in model.parameters()]
    fill_grads(model, 5)  # the same gradient again: cos = 1 > 0.5, skip
    acc.record_log_weights(torch.zeros(2, 2, dtype=torch.float64))
    metrics = step()
    assert metrics["gac/action"] == 2.0 and not step.stepped
    assert not any(k.startswith("vcpo/") for k in metrics)
    assert acc.num_records == 0
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("missing", [None, "zero", "skip", "raise"])
def test_missing_ess_follows_the_documented_rule(missing):
    model, opt = model_and_optimizer()
    before = [p.detach().clone() for p in model.parameters()]
    kwargs = {} if missing is None else {"missing": missing}
    step = sa.StableStep(opt, sa.StepAccumulator(), **kwargs)
    fill_grads(model, 7)
    if missing == "raise":
        with pytest.raises(ValueError, match="ess_ratio"):
            step()
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = step()
    assert metrics["vcpo/ess_missing"] == 1.0 and "vcpo/ess_ratio" not in metrics
    moved = any(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    if missing is None:  # the default "base": the unscaled schedule LR, warned once
        assert metrics["vcpo/lr_scale"] == 1.0 and moved
        assert any("no ess_ratio" in str(w.message) for w in caught)
    else:
        assert metrics["vcpo/lr_scale"] == 0.0 and not moved
        assert step.stepped == (missing == "zero")


def test_an_ess_scaled_lr_is_used_as_given_and_settings_conflict_raises():
    _, opt = model_and_optimizer()
    scaled = sa.ESSScaledLR(opt, rule="linear")
    step = sa.StableStep(scaled, sa.StepAccumulator())
    assert step.scaled is scaled and step.optimizer is opt
    with pytest.raises(ValueError, match="rule: optimizer is already an ESSScaledLR"):
        sa.StableStep(scaled, sa.StepAccumulator(), rule="sqrt")


def test_a_subclass_whose_step_delegates_does_not_recurse_and_runs_hooks_once():
    class Delegating(sa.ESSScaledLR):
        def __init__(self, optimizer):
            super().__init__(optimizer)
            self.accumulator = sa.StepAccumulator()
            self.stable_step = sa.StableStep(self, self.accumulator)

        def step(self, closure=None):
            self.stable_step(closure)

    model, opt = model_and_optimizer()
    wrapped = Delegating(opt)
    calls = []
    wrapped.register_step_pre_hook(lambda *a: calls.append("pre"))
    wrapped.register_step_post_hook(lambda *a: calls.append("post"))
    wrapped.accumulator.record_log_weights(torch.zeros(2, 3, dtype=torch.float64))
    fill_grads(model, 0)
    wrapped.step()
    assert calls == ["pre", "post"]
    assert wrapped.stable_step.last_metrics["vcpo/lr_scale"] == 1.0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"ess_lr": "false"}, TypeError, "ess_lr: expected True or False"),
        ({"accumulator": object()}, TypeError, "accumulator: expected a stable_async.StepAccumulator"),
        ({"gac": "project"}, TypeError, "gac: expected"),
        ({"rule": "cube"}, ValueError, "rule"),
        ({"missing": "never"}, ValueError, "on_missing"),
    ],
)
def test_stable_step_rejects_bad_arguments(kwargs, error, match):
    _, opt = model_and_optimizer()
    with pytest.raises(error, match=match):
        sa.StableStep(opt, **kwargs)
