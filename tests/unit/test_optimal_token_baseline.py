"""`optimal_token_baseline`: a hand-computed group, the fallbacks, validation."""

import math

import pytest
import torch

from stable_async.baselines import optimal_token_baseline


def test_hand_computed_two_trajectories():
    # Two trajectories of two tokens, outcome rewards 1 and 0; p = (0.5, 0.25 | 0.5, 0.5), Σπ² = 0.5.
    mask = torch.ones(2, 2, dtype=torch.bool)
    rewards = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    logprobs = torch.log(torch.tensor([[0.5, 0.25], [0.5, 0.5]], dtype=torch.float64))
    spp = torch.full((2, 2), 0.5, dtype=torch.float64)
    out = optimal_token_baseline(rewards, mask, logprobs, spp, torch.tensor([7, 7]))
    # w = 1 − 2p + 0.5: (0.5, 1.0 | 0.5, 0.5); W = (0.5, 1.5 | 0.5, 1.0); G = (1, 1 | 0, 0).
    b = torch.tensor([0.5 / 1.0, 1.5 / 2.5], dtype=torch.float64)
    torch.testing.assert_close(out.baselines, b.expand(2, 2))
    torch.testing.assert_close(out.advantages, torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=torch.float64) - b)
    # IS weights ρ² scale w: ρ = 2 on the first trajectory's second token.
    is_w = torch.tensor([[1.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
    out = optimal_token_baseline(rewards, mask, logprobs, spp, is_weights=is_w)
    assert out.baselines[0, 1].item() == pytest.approx(4.5 / 5.5)


def test_zero_tail_group_of_one_and_deterministic_policy():
    mask = torch.tensor([[True, True, True], [True, False, False], [True, True, False]])
    rewards = torch.tensor([[0.0, 0.0, 2.0], [1.0, 0.0, 0.0], [0.0, 3.0, 0.0]], dtype=torch.float64)
    logprobs = torch.full((3, 3), math.log(0.5), dtype=torch.float64)
    spp = torch.full((3, 3), 0.5, dtype=torch.float64)
    out = optimal_token_baseline(rewards, mask, logprobs, spp, torch.tensor([0, 0, 1]))
    assert out.baselines[0, 1:].tolist() == [0.0, 0.0]  # beyond the second longest (length 1)
    assert out.baselines[0, 0] != 0
    torch.testing.assert_close(out.advantages[2], rewards[2].flip(-1).cumsum(-1).flip(-1) * mask[2])  # alone
    kept = optimal_token_baseline(rewards, mask, logprobs, spp, torch.tensor([0, 0, 1]), handle_zero_tail=False)
    assert kept.baselines[0, 1] == pytest.approx(2.0)  # only trajectory 0 is valid at t = 1: b = G
    # p = 1, Σπ² = 1: w = 0 everywhere; the baseline falls back to the mean return (veRL: 0).
    det = optimal_token_baseline(rewards[:2], mask[:2], torch.zeros(2, 3), torch.ones(2, 3), handle_zero_tail=False)
    assert det.baselines[0, 0].item() == pytest.approx((2.0 + 1.0) / 2)
    assert torch.isfinite(det.advantages).all()


def test_validation():
    ok = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="mask"):
        optimal_token_baseline(ok, torch.ones(2, 4), ok, ok)
    with pytest.raises(ValueError, match="token_rewards"):
        optimal_token_baseline(torch.zeros(3), torch.ones(3), torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        optimal_token_baseline(torch.full((2, 3), math.nan), torch.ones(2, 3), ok, ok)
    with pytest.raises(TypeError, match="group_ids"):
        optimal_token_baseline(ok, torch.ones(2, 3), ok, ok, torch.zeros(2))
