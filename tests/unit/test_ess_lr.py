"""ESSScaledLR: the LR used is schedule × scale, the schedule never sees the scale, exact resume."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch

import stable_async as sa
from stable_async.optim.ess_lr import ess_lr_scale

ESS_SEQUENCE = [0.25, 1.0, 0.04, 0.5, 0.81, 0.3, 0.0, 0.9, 0.6, 0.1]


def warmup_cosine(step: int, warmup: int = 3, total: int = 10) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_param(seed: int = 0, n: int = 5) -> torch.nn.Parameter:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64))


def set_grad(p: torch.Tensor, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


# ---------------------------------------------------------------------- scale values
@pytest.mark.parametrize(
    ("ratio", "rule", "base", "min_scale", "expected"),
    [
        (0.25, "sqrt", 1.0, 0.0, 0.5),
        (0.25, "linear", 1.0, 0.0, 0.25),
        (0.25, "sqrt", 0.5, 0.0, math.sqrt(0.5)),
        (0.25, "linear", 0.5, 0.0, 0.5),
        (0.8, "sqrt", 0.5, 0.0, 1.0),
        (0.8, "linear", 0.5, 0.0, 1.0),
        (1.0, "sqrt", 1.0, 0.0, 1.0),
        (0.0, "sqrt", 1.0, 0.0, 0.0),
        (0.01, "sqrt", 1.0, 0.3, 0.3),
        (0.01, "linear", 1.0, 0.0, 0.01),
        (0.64, "sqrt", 1.0, 0.0, 0.8),
    ],
)
def test_scale_rules_hand_computed(ratio, rule, base, min_scale, expected):
    assert ess_lr_scale(ratio, rule, base, min_scale) == pytest.approx(expected, rel=1e-15, abs=0)
    opt = sa.ESSScaledLR(torch.optim.SGD([make_param()], lr=1.0), rule=rule, base_ratio=base, min_scale=min_scale)
    assert opt.scale_for(ratio) == pytest.approx(expected, rel=1e-15, abs=0)


# ---------------------------------------------------------------------- composition with schedulers
@pytest.mark.parametrize("rule", ["sqrt", "linear"])
@pytest.mark.parametrize("scheduler_on", ["wrapper", "inner"])
def test_sgd_lr_used_is_schedule_times_scale(rule, scheduler_on):
    p = make_param()
    inner = torch.optim.SGD([p], lr=0.1)
    opt = sa.ESSScaledLR(inner, rule=rule)
    sched = torch.optim.lr_scheduler.LambdaLR(opt if scheduler_on == "wrapper" else inner, warmup_cosine)
    for step, ratio in enumerate(ESS_SEQUENCE):
        set_grad(p, step)
        schedule_lr = 0.1 * warmup_cosine(step)
        assert inner.param_groups[0]["lr"] == schedule_lr
        scale = math.sqrt(ratio) if rule == "sqrt" else ratio
        before = p.detach().clone()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "scheduler.step() before optimizer.step()" warning
            opt.step(ratio)
            sched.step()
        expected = before.add(p.grad, alpha=-(schedule_lr * scale))
        assert torch.equal(p.detach(), expected)
        assert opt.last_metrics["vcpo/lr_scale"] == scale
        assert opt.last_metrics["vcpo/ess_ratio"] == ratio
        assert opt.last_metrics["vcpo/lr"] == schedule_lr * scale
        # The scheduler's view is untouched: after sched.step() the LR is the next schedule value.
        assert sched.get_last_lr()[0] == 0.1 * warmup_cosine(step + 1)


def test_chainable_scheduler_unaffected():
    """StepLR/ExponentialLR compute from the current group['lr']: the exact restore keeps them on track."""
    p, q = make_param(), make_param()
    opt = sa.ESSScaledLR(torch.optim.SGD([p], lr=0.5))
    plain = torch.optim.SGD([q], lr=0.5)
    s1 = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    s2 = torch.optim.lr_scheduler.ExponentialLR(plain, gamma=0.9)
    for step, ratio in enumerate(ESS_SEQUENCE):
        set_grad(p, step)
        set_grad(q, step)
        opt.step(ratio)
        plain.step()
        s1.step()
        s2.step()
        assert opt.param_groups[0]["lr"] == plain.param_groups[0]["lr"]


class RecordingAdam(torch.optim.Adam):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen_lrs: list[list[float]] = []

    def step(self, closure=None):
        self.seen_lrs.append([g["lr"] for g in self.param_groups])
        return super().step(closure)


def test_adam_lr_seen_inside_step_and_update_matches_manual():
    p, q = make_param(), make_param()
    inner = RecordingAdam([{"params": [p], "lr": 1e-2}, {"params": [make_param(1)], "lr": 3e-3}])
    opt = sa.ESSScaledLR(inner)  # sqrt
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine)
    manual = torch.optim.Adam([q], lr=1e-2)
    for step, ratio in enumerate(ESS_SEQUENCE):
        set_grad(p, step)
        set_grad(q, step)
        for group in inner.param_groups[1:]:
            for extra in group["params"]:
                set_grad(extra, step)
        schedule = [1e-2 * warmup_cosine(step), 3e-3 * warmup_cosine(step)]
        opt.step(torch.tensor(ratio, dtype=torch.float64))  # a 0-dim tensor is accepted
        assert inner.seen_lrs[-1] == [lr * math.sqrt(ratio) for lr in schedule]
        assert [g["lr"] for g in inner.param_groups] == schedule
        # The same Adam update computed by hand-setting the LR on a plain Adam.
        manual.param_groups[0]["lr"] = schedule[0] * math.sqrt(ratio)
        manual.step()
        assert torch.equal(p.detach(), q.detach())
        sched.step()


# ---------------------------------------------------------------------- inputs
def test_accepts_ess_result_and_rejects_bad_ratios():
    opt = sa.ESSScaledLR(torch.optim.SGD([make_param()], lr=1.0))
    lw = torch.tensor([[0.0, 0.1], [0.3, -0.2], [1.0, 0.0]], dtype=torch.float64)
    ess = sa.effective_sample_size(lw)
    opt.step(ess)
    assert opt.last_scale == pytest.approx(math.sqrt(ess.ess_ratio))
    for bad in (float("nan"), -0.1, float("inf"), 37.2):
        with pytest.raises(ValueError, match="ess_ratio"):
            opt.step(bad)
    with pytest.raises(ValueError, match="ess_ratio"):
        opt.step(torch.tensor([0.5, 0.5]))
    with pytest.raises(TypeError, match="ess_ratio"):
        opt.step(True)
    with pytest.raises(TypeError, match="ess_ratio"):
        opt.step("0.5")
    opt.step(1.0 + 1e-9)  # rounding above 1 is tolerated and clipped
    assert opt.last_scale == 1.0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"rule": "cubic"}, "rule"),
        ({"base_ratio": 0.0}, "base_ratio"),
        ({"base_ratio": -1.0}, "base_ratio"),
        ({"base_ratio": float("nan")}, "base_ratio"),
        ({"base_ratio": float("inf")}, "base_ratio"),
        ({"min_scale": 1.5}, "min_scale"),
        ({"min_scale": -0.1}, "min_scale"),
        ({"on_missing": "ignore"}, "on_missing"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        sa.ESSScaledLR(torch.optim.SGD([make_param()], lr=1.0), **kwargs)


def test_bad_optimizer():
    with pytest.raises(TypeError, match="optimizer"):
        sa.ESSScaledLR(object())
    opt = sa.ESSScaledLR(torch.optim.SGD([make_param()], lr=1.0))
    with pytest.raises(TypeError, match="optimizer"):
        sa.ESSScaledLR(opt)


# ---------------------------------------------------------------------- missing ESS
def test_missing_base_warns_once_and_steps_unscaled():
    p = make_param()
    opt = sa.ESSScaledLR(torch.optim.SGD([p], lr=0.1))
    set_grad(p, 0)
    before = p.detach().clone()
    with pytest.warns(UserWarning, match="no ess_ratio"):
        opt.step()
    assert torch.equal(p.detach(), before.add(p.grad, alpha=-0.1))
    assert opt.last_metrics["vcpo/ess_missing"] == 1.0
    assert "vcpo/ess_ratio" not in opt.last_metrics
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # second time: silent


def test_missing_skip_zero_raise():
    p = make_param()
    skip = sa.ESSScaledLR(torch.optim.Adam([p], lr=0.1), on_missing="skip")
    set_grad(p, 0)
    before = p.detach().clone()
    assert skip.step() is None
    assert torch.equal(p.detach(), before)
    assert len(skip.state) == 0  # the inner optimizer was not called
    assert skip.last_metrics["vcpo/lr_scale"] == 0.0

    zero = sa.ESSScaledLR(torch.optim.Adam([p], lr=0.1), on_missing="zero")
    zero.step()
    assert torch.equal(p.detach(), before)
    assert int(zero.state[p]["step"]) == 1  # the reference's η = 0: moments advance
    assert zero.param_groups[0]["lr"] == 0.1

    strict = sa.ESSScaledLR(torch.optim.Adam([p], lr=0.1), on_missing="raise")
    with pytest.raises(ValueError, match="ess_ratio"):
        strict.step()


def test_staged_ess_ratio_is_used_once():
    p = make_param()
    opt = sa.ESSScaledLR(torch.optim.SGD([p], lr=0.1), on_missing="raise")
    opt.set_ess_ratio(0.25)
    set_grad(p, 0)
    opt.step()
    assert opt.last_scale == 0.5
    with pytest.raises(ValueError, match="ess_ratio"):
        opt.step()


def test_lr_restored_when_step_raises_and_closure_positional():
    p = make_param()
    opt = sa.ESSScaledLR(torch.optim.SGD([p], lr=0.1))
    set_grad(p, 0)

    def bad_closure():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(0.25, bad_closure)
    assert opt.param_groups[0]["lr"] == 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert opt.step(lambda: 3.0) == 3.0  # step(closure) like a torch optimizer


# ---------------------------------------------------------------------- checkpointing
def _train(steps: range, model, opt, sched):
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x = torch.randn(4, 3, generator=g, dtype=torch.float64)
        loss = (model(x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step(ESS_SEQUENCE[step])
        sched.step()


def _build():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    opt = sa.ESSScaledLR(torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=0.01))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine)
    return model, opt, sched


def test_resume_is_exact():
    n, k = len(ESS_SEQUENCE), 4
    model, opt, sched = _build()
    _train(range(n), model, opt, sched)

    model_a, opt_a, sched_a = _build()
    _train(range(k), model_a, opt_a, sched_a)
    buffer = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict(), "sched": sched_a.state_dict()}, buffer)
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)

    model_b, opt_b, sched_b = _build()
    model_b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    sched_b.load_state_dict(ckpt["sched"])
    assert opt_b.num_steps == k
    assert opt_b.last_scale == opt_a.last_scale
    _train(range(k, n), model_b, opt_b, sched_b)
    for a, b in zip(model.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(a, b)
    assert opt_b.num_steps == n


def test_state_dict_interoperates_with_plain_optimizer():
    p = make_param()
    opt = sa.ESSScaledLR(torch.optim.Adam([p], lr=0.1))
    set_grad(p, 0)
    opt.step(0.5)
    plain = torch.optim.Adam([p], lr=0.1)
    plain.load_state_dict(opt.state_dict())  # the extra key is ignored
    assert int(plain.state[p]["step"]) == 1
    fresh = sa.ESSScaledLR(torch.optim.Adam([p], lr=0.1))
    fresh.load_state_dict(plain.state_dict())  # a plain checkpoint loads; counters stay at 0
    assert fresh.num_steps == 0 and int(fresh.state[p]["step"]) == 1
    other = sa.ESSScaledLR(torch.optim.Adam([p], lr=0.1), rule="linear")
    with pytest.warns(UserWarning, match="rule"):
        other.load_state_dict(opt.state_dict())
    assert other.rule == "linear"


# ---------------------------------------------------------------------- D7: a real torch.optim.Optimizer
def test_d7_is_an_optimizer_that_lr_schedulers_accept():
    """D7: ESSScaledLR stays a torch.optim.Optimizer subclass (LambdaLR checks isinstance)."""
    opt = sa.ESSScaledLR(torch.optim.SGD([make_param()], lr=1.0))
    assert isinstance(opt, torch.optim.Optimizer)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    opt.step(1.0)
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.5


def test_d7_step_pre_and_post_hooks_run_around_each_step():
    """D7: register_step_pre_hook / register_step_post_hook raised AttributeError on the old wrapper."""
    p = make_param()
    opt = sa.ESSScaledLR(torch.optim.SGD([p], lr=1.0))
    seen = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(("pre", o is opt, o.param_groups[0]["lr"])))
    post = opt.register_step_post_hook(lambda o, args, kwargs: seen.append(("post", args[1:], kwargs)))
    set_grad(p, 0)
    opt.step(0.25)
    assert seen == [("pre", True, 1.0), ("post", (0.25,), {})]
    pre.remove()
    post.remove()
    opt.step(0.25)
    assert len(seen) == 2


def test_d7_step_pre_hook_may_replace_the_arguments():
    p = make_param()
    opt = sa.ESSScaledLR(torch.optim.SGD([p], lr=1.0))
    opt.register_step_pre_hook(lambda o, args, kwargs: ((o, 0.25), {}))
    set_grad(p, 0)
    opt.step(1.0)
    assert opt.last_scale == 0.5


def test_d7_state_dict_hooks():
    opt = sa.ESSScaledLR(torch.optim.SGD([make_param()], lr=1.0))
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    state = opt.state_dict()
    assert seen == ["pre"] and state["extra"] == 1 and "ess_scaled_lr" in state


def test_d7_load_state_dict_hooks():
    source = sa.ESSScaledLR(torch.optim.SGD([make_param()], lr=1.0))
    source.step(0.25)
    state = source.state_dict()
    target = sa.ESSScaledLR(torch.optim.SGD([make_param()], lr=1.0))
    seen = []

    def pre(o, sd):
        seen.append("pre")
        return {**sd, "ess_scaled_lr": {**sd["ess_scaled_lr"], "num_steps": 41}}

    target.register_load_state_dict_pre_hook(pre)
    target.register_load_state_dict_post_hook(lambda o: seen.append(("post", o.num_steps)))
    target.load_state_dict(state)
    assert seen == ["pre", ("post", 41)]


def test_d7_zero_grad_and_hooks_survive_pickling():
    p = make_param()
    opt = sa.ESSScaledLR(torch.optim.SGD([p], lr=1.0))
    set_grad(p, 0)
    opt.zero_grad()
    assert p.grad is None
    set_grad(p, 1)
    opt.zero_grad(set_to_none=False)
    assert torch.equal(p.grad, torch.zeros_like(p))
    buffer = io.BytesIO()
    torch.save(opt, buffer)
    buffer.seek(0)
    clone = torch.load(buffer, weights_only=False)
    clone.register_step_post_hook(lambda *a: None)
    clone.step(1.0)
