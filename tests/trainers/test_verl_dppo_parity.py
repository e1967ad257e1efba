"""`dppo_binary_tv` / `dppo_binary_kl` against veRL's registered ``dppo_tv`` / ``dppo_kl``.

veRL anchors both the ratio and the divergence at ``old_log_prob``, so we compare with
``anchor="old"``, and its ``clip_ratio_c`` is our ``ratio_cap``. fp64 inputs; values, gradients
and the three shared metrics must agree. veRL's binary KL adds 1e-8 inside one log, so its mask
can differ from ours only for tokens whose KL lies within ~1e-8 of δ: the test asserts that the
random inputs stay 1e-6 away from the bound, so any mismatch is a real one.
"""

import pytest
import torch

import stable_async as sa
from sa_testing import random_tensors, verl_actor_config

pytestmark = pytest.mark.trainers

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")

SETTINGS = [  # (delta_low, delta_high, ratio_cap)
    (0.15, 0.15, 20.0),
    (0.10, 0.25, 3.0),
    (0.05, 0.05, 10.0),
]
MODES = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def _verl_kl(lp, old):
    p, q = lp.exp(), old.exp()
    return q * (old - lp) + (1 - q) * torch.log((1.0 - q + 1e-8) / (1.0 - p + 1e-8))


@pytest.mark.parametrize("ours, theirs", [("dppo_binary_tv", "dppo_tv"), ("dppo_binary_kl", "dppo_kl")])
@pytest.mark.parametrize("delta_low, delta_high, ratio_cap", SETTINGS)
@pytest.mark.parametrize("mode", MODES)
def test_matches_verl(gen, ours, theirs, delta_low, delta_high, ratio_cap, mode):
    t = random_tensors(gen, B=8, T=12, spread=0.8)
    lp, old, adv, mask = t["logprobs"], t["old_logprobs"], t["advantages"], t["mask"]
    if ours == "dppo_binary_kl":
        kl = _verl_kl(lp.detach(), old)
        assert ((kl - delta_low).abs() > 1e-6).all() and ((kl - delta_high).abs() > 1e-6).all()

    batch = sa.PolicyBatch(**t)
    out = sa.get_loss(ours, aggregation=mode, anchor="old", delta_low=delta_low, delta_high=delta_high,
                      ratio_cap=ratio_cap)(batch)  # fmt: skip
    (grad,) = torch.autograd.grad(out.loss, lp)

    config = verl_actor_config(
        clip_ratio=delta_high, clip_ratio_low=delta_low, clip_ratio_high=delta_high, clip_ratio_c=ratio_cap
    )
    ref_loss, ref_metrics = core_algos.get_policy_loss_fn(theirs)(
        old_log_prob=old, log_prob=lp, advantages=adv, response_mask=mask.double(), loss_agg_mode=mode, config=config
    )
    (ref_grad,) = torch.autograd.grad(ref_loss, lp)

    assert out.metrics["actor/pg_clipfrac"] > 0  # the trust region is exercised
    assert out.loss.item() == pytest.approx(ref_loss.item(), rel=1e-7, abs=1e-12)
    assert torch.allclose(grad, ref_grad, rtol=1e-7, atol=1e-12)
    for key in ("actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl"):
        assert out.metrics[key] == pytest.approx(ref_metrics[key], rel=1e-6, abs=1e-7), key


def test_default_ratio_cap_differs_from_verl_on_purpose():
    """Ours is the paper code's c = 10. veRL's dppo_* fall back to 20 only when the config has no
    ``clip_ratio_c``; an ActorConfig always has one (3.0, shared with dual-clip PPO), so 3.0 is what
    veRL applies unless it is overridden (its DPPO example script sets 10000, i.e. off)."""
    assert sa.get_loss("dppo_binary_tv").config.ratio_cap == 10.0
    assert verl_actor_config().get("clip_ratio_c", 20.0) == 3.0
