"""`stable_async.baselines.optimal_token_baseline` against veRL 0.9.1's
``compute_optimal_token_baseline_advantage`` on random fp64 inputs.

veRL divides by Σ W + 1e-8 where we divide by Σ W: a relative difference of 1e-8 / Σ W (Σ W is
of order the step index times the group size here), hence ``rtol = 1e-7``; where a trajectory is
alone at a step, veRL's advantage is G·1e-8/(W + 1e-8) and ours 0, hence ``atol = 1e-7`` (returns
are of order 1).
"""

import numpy as np
import pytest
import torch

from stable_async.baselines import optimal_token_baseline

pytestmark = pytest.mark.trainers
core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")


def _inputs(seed, B=12, T=9, V=7):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[0] = T  # a group with a unique longest trajectory (handle_zero_tail)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64)
    logp_all = torch.log_softmax(logits, -1)
    ids = torch.randint(0, V, (B, T), generator=gen)
    logprobs = logp_all.gather(-1, ids[..., None])[..., 0]
    sum_pi_sq = logp_all.exp().square().sum(-1)
    rewards = torch.zeros(B, T, dtype=torch.float64)
    rewards[torch.arange(B), lengths - 1] = torch.randn(B, generator=gen, dtype=torch.float64)
    rewards += 0.1 * torch.randn(B, T, generator=gen, dtype=torch.float64) * mask  # some dense reward too
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3])  # group 3 has one member
    is_w = torch.rand(B, T, generator=gen, dtype=torch.float64) * 2.0
    return rewards, mask, logprobs, sum_pi_sq, groups, is_w


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("with_is", [False, True])
@pytest.mark.parametrize("zero_tail", [True, False])
def test_matches_verl(seed, with_is, zero_tail):
    rewards, mask, logprobs, sum_pi_sq, groups, is_w = _inputs(seed)
    ref_adv, ref_ret = core_algos.compute_optimal_token_baseline_advantage(
        token_level_rewards=rewards, response_mask=mask.double(), index=np.array(groups.tolist()),
        old_log_probs=logprobs, sum_pi_squared=sum_pi_sq, rollout_is_weights=is_w if with_is else None,
        handle_zero_tail=zero_tail,
    )  # fmt: skip
    ours = optimal_token_baseline(
        rewards, mask, logprobs, sum_pi_sq, groups, is_weights=is_w if with_is else None, handle_zero_tail=zero_tail
    )
    torch.testing.assert_close(ours.advantages, ref_adv, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(ours.returns, ref_ret * mask, rtol=1e-12, atol=1e-14)
    assert (ours.baselines[11] == 0).all()  # group of one
    if zero_tail:
        assert (ours.baselines[0, int(mask[1:4].sum(-1).max()) :] == 0).all()
