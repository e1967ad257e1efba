"""`StableOptimizer` in veRL's call order: each optimizer its own records, metrics and rollout batches.

veRL's engines run one step as ``zero_grad()`` → the micro-batches' ``sa_`` loss calls and
``backward()`` → ``step()``. Here two models, each with its own `StableOptimizer`, are stepped in
that order in one process (as two colocated veRL engines would be), with the registered
``sa_vcpo`` called exactly as veRL's ``ppo_loss`` calls it.
"""

from __future__ import annotations

import gc
import math

import pytest
import torch

import stable_async as sa
from sa_testing import verl_actor_config

pytestmark = pytest.mark.trainers
core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")

from stable_async.integrations import verl as adapter  # noqa: E402
from stable_async.integrations import verl_optim  # noqa: E402

B, T, H = 4, 3, 5
# Keys the optimizer's step adds to the next loss call's metrics (the loss's own vcpo/* are others).
OPTIMIZER_METRICS = ("vcpo/lr_scale", "vcpo/lr", "vcpo/ess_ratio", "vcpo/ess_missing", "vcpo/ess_num_seqs", "vcpo/ess")


class Policy(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.head = torch.nn.Linear(H, T, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.head(x), dim=-1)


def micro_batches(seed: int, stale: float):
    """Two micro-batches of (x, old log-probs, advantages, mask); ``stale`` spreads old away from π_θ."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * B, H, generator=g, dtype=torch.float64)
    noise = stale * torch.randn(2 * B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(2 * B, T, generator=g, dtype=torch.float64)
    mask = torch.ones(2 * B, T, dtype=torch.bool)
    return [(x[rows], noise[rows], adv[rows], mask[rows]) for rows in (slice(0, B), slice(B, 2 * B))]


def loss_calls(model, batches, config):
    """The registered ``sa_vcpo`` on each micro-batch + backward; returns (λ of all sequences, last metrics)."""
    fn = core_algos.get_policy_loss_fn("sa_vcpo")
    lams, metrics = [], {}
    for x, noise, adv, mask in batches:
        lp = model(x)
        old = (lp.detach() + noise).clamp(max=-1e-3)  # log-probs stay <= 0
        loss, metrics = fn(old, lp, adv, mask, "token-mean", config, None)
        (loss / len(batches)).backward()
        lams.append((lp.detach() - old).sum(-1))
    return torch.cat(lams), metrics


def make(model, **kwargs):
    return adapter.StableOptimizer(model.parameters(), lr=0.1, inner="torch.optim.SGD", **kwargs)


@pytest.fixture
def config():
    return verl_actor_config()


def test_two_models_each_step_with_their_own_ess_and_metrics(config):
    a, b = Policy(0), Policy(1)
    opt_a, opt_b = make(a), make(b)
    for step in range(2):
        opt_a.zero_grad()
        _, metrics_a = loss_calls(a, micro_batches(step, stale=0.0), config)  # on-policy: ESS/N = 1
        opt_a.step()
        opt_b.zero_grad()
        lam_b, metrics_b = loss_calls(b, micro_batches(10 + step, stale=1.5), config)  # stale: ESS/N < 1
        opt_b.step()
        expected_b = sa.effective_sample_size(lam_b)
        assert opt_a.last_metrics["vcpo/ess_ratio"] == pytest.approx(1.0, abs=1e-12)
        assert opt_a.last_metrics["vcpo/lr_scale"] == pytest.approx(1.0, abs=1e-12)
        assert expected_b.ess_ratio < 0.9
        assert opt_b.last_metrics["vcpo/ess_ratio"] == pytest.approx(expected_b.ess_ratio, rel=1e-10)
        assert opt_b.last_metrics["vcpo/ess_num_seqs"] == 2 * B  # only B's own sequences
        if step == 1:  # the metrics a loss call returns are its own optimizer's previous step
            assert metrics_a["vcpo/lr_scale"] == pytest.approx(1.0, abs=1e-12)
            assert metrics_b["vcpo/lr_scale"] < 0.95


def test_zero_grad_of_one_optimizer_keeps_the_others_records(config):
    a, b = Policy(0), Policy(1)
    opt_a, opt_b = make(a), make(b)
    opt_a.zero_grad()
    lam_a, _ = loss_calls(a, micro_batches(0, stale=1.0), config)
    opt_b.zero_grad()  # another model's step opens: A's records stay with A
    assert opt_a.accumulator.num_records == 2 and opt_b.accumulator.num_records == 0
    plain = adapter.StableOptimizer(Policy(2).parameters(), lr=0.1, inner="torch.optim.SGD", ess_lr=False)
    plain.step()  # an ESS-LR-free optimizer's step does not touch A's records either
    opt_a.step()
    assert opt_a.last_metrics["vcpo/ess_ratio"] == pytest.approx(sa.effective_sample_size(lam_a).ess_ratio, rel=1e-10)
    assert opt_a.accumulator.num_records == 0


def test_no_optimizer_alive_no_records_and_no_stale_metrics(config):
    a = Policy(0)
    opt = make(a)
    opt.zero_grad()
    loss_calls(a, micro_batches(0, stale=1.0), config)
    opt.step()
    opt.zero_grad()
    _, metrics = loss_calls(a, micro_batches(1, stale=1.0), config)
    assert set(OPTIMIZER_METRICS) <= set(metrics)  # with an optimizer, its metrics do ride along
    del opt
    gc.collect()
    assert verl_optim.open_step() is None
    step_keys = set(OPTIMIZER_METRICS)
    for i in range(100):  # 200 loss calls with no optimizer: nothing kept, no optimizer metrics
        _, metrics = loss_calls(a, micro_batches(i, stale=1.0), config)
        assert not step_keys & set(metrics) and not any(k.startswith("gac/") for k in metrics)
    assert verl_optim.open_step() is None


def _flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("how", ["hook", "steps", "steps_override_the_hook"])
def test_gac_compares_with_the_last_gradient_of_the_previous_rollout_batch(config, how):
    """Two rollout batches of two mini-batch steps: no comparison inside batch 1; batch 2 vs batch 1's last."""
    model = Policy(0)
    extra = {"gac_rollout_batch_steps": 2} if how.startswith("steps") else {}
    opt = make(model, gac="monitor", ess_lr=False, **extra)
    grads, cosines = [], []
    for batch in range(2):
        if how == "hook":  # what the stable-async hook on veRL's update_actor calls at each call
            opt.rollout_batch_begins()
        for mini in range(2):
            if how == "steps_override_the_hook":  # ignored: the explicit N decides alone
                opt.rollout_batch_begins()
            opt.zero_grad()
            loss_calls(model, micro_batches(10 * batch + mini, stale=0.3), config)
            grads.append(_flat_grad(model).clone())
            opt.step()
            cosines.append(opt.last_metrics.get("gac/cos", math.nan))
    assert math.isnan(cosines[0]) and math.isnan(cosines[1])  # mini-batches of batch 1 are never compared
    for i in (2, 3):  # both steps of batch 2 against batch 1's last gradient
        expected = float(torch.nn.functional.cosine_similarity(grads[i], grads[1], dim=0))
        assert cosines[i] == pytest.approx(expected, rel=1e-9)


def test_without_rollout_batches_gac_compares_consecutive_steps(config):
    model = Policy(0)
    opt = make(model, gac="monitor", ess_lr=False)
    grads, cosines = [], []
    for step in range(3):
        opt.zero_grad()
        loss_calls(model, micro_batches(step, stale=0.3), config)
        grads.append(_flat_grad(model).clone())
        opt.step()
        cosines.append(opt.last_metrics.get("gac/cos", math.nan))
    expected = float(torch.nn.functional.cosine_similarity(grads[2], grads[1], dim=0))
    assert cosines[2] == pytest.approx(expected, rel=1e-9)
