"""``clip_cov`` and ``kl_cov`` against veRL 0.9.1's registered policy losses, fp64, values and gradients.

veRL's Clip-Cov draws its tokens with ``torch.randperm`` on the global CPU generator; both sides
run after the same ``torch.manual_seed``, so they draw the same tokens (the test also checks that
some were drawn, and that another seed draws others). veRL's Clip-Cov means divide by N + 1e-8
(ours by N); on these inputs no covariance lies within that of a bound.
"""

import pytest
import torch

import stable_async as sa
from sa_testing import random_tensors, verl_actor_config

pytestmark = pytest.mark.trainers
core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")

EXACT = {"rtol": 1e-10, "atol": 1e-13}


def _inputs(seed, B=6, T=40):
    t = random_tensors(torch.Generator().manual_seed(seed), B=B, T=T, spread=0.3)
    t["advantages"] = 3.0 * t["advantages"]  # covariances above lb = 1 for some tokens
    t["mask"][1] = False
    return t


def _verl(name, t, mode, seed, **policy_loss):
    from verl.workers.config.actor import PolicyLossConfig

    config = verl_actor_config(policy_loss=PolicyLossConfig(loss_mode=name, **policy_loss))
    torch.manual_seed(seed)
    loss, metrics = core_algos.get_policy_loss_fn(name)(
        old_log_prob=t["old_logprobs"], log_prob=t["logprobs"], advantages=t["advantages"],
        response_mask=t["mask"].to(torch.float64), loss_agg_mode=mode, config=config,
    )  # fmt: skip
    return loss, metrics


def _ours(name, t, seed, **config):
    torch.manual_seed(seed)
    return sa.get_loss(name, **config)(sa.PolicyBatch(**t))


def _grad(loss, leaf):
    return torch.autograd.grad(loss, leaf, retain_graph=True)[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("ratio", [0.02, 0.2, 2e-4])
def test_clip_cov_matches_verl(seed, mode, ratio):
    t = _inputs(seed)
    ref, metrics = _verl("clip_cov", t, mode, seed + 10, clip_cov_ratio=ratio)
    out = _ours("clip_cov", t, seed + 10, aggregation=mode, clip_cov_ratio=ratio)
    assert out.metrics["actor/pg_clipfrac"] > 0  # some tokens drawn
    torch.testing.assert_close(out.loss, ref, **EXACT)
    torch.testing.assert_close(_grad(out.loss, t["logprobs"]), _grad(ref, t["logprobs"]), **EXACT)
    assert out.metrics["actor/pg_clipfrac"] == pytest.approx(metrics["actor/pg_clipfrac"], rel=1e-6)
    assert out.metrics["actor/ppo_kl"] == pytest.approx(metrics["actor/ppo_kl"], rel=1e-7)


def test_clip_cov_selection_is_random_and_seeded():
    t = _inputs(0)
    a = _ours("clip_cov", t, 1, clip_cov_ratio=0.02).per_token_loss
    b = _ours("clip_cov", t, 1, clip_cov_ratio=0.02).per_token_loss
    c = _ours("clip_cov", t, 2, clip_cov_ratio=0.02).per_token_loss
    assert torch.equal(a, b) and not torch.equal(a, c)
    gen = torch.Generator().manual_seed(5)
    d = sa.get_loss("clip_cov", clip_cov_ratio=0.02, generator=gen)(sa.PolicyBatch(**t)).per_token_loss
    torch.manual_seed(5)
    assert torch.equal(d, _ours("clip_cov", t, 5, clip_cov_ratio=0.02).per_token_loss)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize(("ratio", "coef"), [(0.05, 0.1), (2e-4, 1.0), (0.3, 0.5)])
def test_kl_cov_matches_verl(seed, mode, ratio, coef):
    t = _inputs(seed)
    ref, metrics = _verl("kl_cov", t, mode, 0, kl_cov_ratio=ratio, ppo_kl_coef=coef)
    out = _ours("kl_cov", t, 0, aggregation=mode, kl_cov_ratio=ratio, ppo_kl_coef=coef)
    torch.testing.assert_close(out.loss, ref, **EXACT)
    torch.testing.assert_close(_grad(out.loss, t["logprobs"]), _grad(ref, t["logprobs"]), **EXACT)
    assert out.metrics["actor/ppo_kl"] == pytest.approx(metrics["actor/ppo_kl"], rel=1e-7)


def test_defaults_are_verls():
    config = verl_actor_config()
    clip, kl = sa.loss_config_class("clip_cov")(), sa.loss_config_class("kl_cov")()
    pl = config.policy_loss
    assert (clip.clip_cov_ratio, clip.clip_cov_lb, clip.clip_cov_ub) == (
        pl.clip_cov_ratio,
        pl.clip_cov_lb,
        pl.clip_cov_ub,
    )
    assert (clip.eps_low, clip.eps_high) == (config.clip_ratio_low, config.clip_ratio_high)
    assert (kl.kl_cov_ratio, kl.ppo_kl_coef) == (pl.kl_cov_ratio, pl.ppo_kl_coef)
