"""Effective sample size: the formula, its limits, and extreme log-weights."""

import math

import pytest
import torch

import stable_async as sa


def direct_ess(weights):
    weights = [float(w) for w in weights]
    return sum(weights) ** 2 / sum(w * w for w in weights)


def test_equals_the_direct_formula_on_moderate_sequence_weights(gen):
    log_w = 0.3 * torch.randn(7, 5, generator=gen, dtype=torch.float64)
    mask = torch.rand(7, 5, generator=gen) > 0.2
    mask[2] = False  # a sequence with no valid token is not a sample
    seq_log_w = [(log_w[i][mask[i]]).sum().item() for i in range(7) if mask[i].any()]
    expected = direct_ess([math.exp(x) for x in seq_log_w])
    result = sa.effective_sample_size(log_w, mask, level="sequence")
    assert result.n == len(seq_log_w)
    assert result.ess == pytest.approx(expected, rel=1e-12)
    assert result.ess_ratio == pytest.approx(expected / len(seq_log_w), rel=1e-12)


def test_token_level_and_flat_input(gen):
    log_w = 0.5 * torch.randn(4, 6, generator=gen, dtype=torch.float64)
    mask = torch.rand(4, 6, generator=gen) > 0.3
    expected = direct_ess(torch.exp(log_w[mask]))
    assert sa.effective_sample_size(log_w, mask, level="token").ess == pytest.approx(expected, rel=1e-12)
    assert sa.effective_sample_size(log_w[mask]).ess == pytest.approx(expected, rel=1e-12)


def test_identical_policies_give_exactly_n():
    for n in (1, 3, 17, 1000):
        result = sa.effective_sample_size(torch.zeros(n, 5))
        assert result.ess == float(n) and result.ess_ratio == 1.0


@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_extreme_log_weights_stay_finite_and_in_range(gen, scale):
    log_w = scale * torch.rand(16, 8, generator=gen)
    for level in ("sequence", "token"):
        result = sa.effective_sample_size(log_w, level=level)
        assert math.isfinite(result.ess) and 1.0 <= result.ess <= result.n
        assert 0.0 < result.ess_ratio <= 1.0
    one_dominant = torch.tensor([1e4, 0.0, -1e4, 5.0])
    assert sa.effective_sample_size(one_dominant).ess == pytest.approx(1.0)


def test_empty_and_fully_masked_inputs():
    assert sa.effective_sample_size(torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.bool)).ess_ratio == 1.0
    assert sa.effective_sample_size(torch.zeros(0, 0)).n == 0.0


def test_clipped_variant_and_errors():
    log_w = torch.tensor([[3.0], [0.0]])
    clipped = sa.effective_sample_size(log_w, max_log_weight=math.log(2.0))
    assert clipped.ess == pytest.approx(direct_ess([2.0, 1.0]))
    with pytest.raises(ValueError, match=r"level: expected one of \['sequence', 'token'\]"):
        sa.effective_sample_size(log_w, level="batch")
    with pytest.raises(ValueError, match="log_weights: NaN/inf at a valid position"):
        sa.effective_sample_size(torch.tensor([[float("nan")]]))
    with pytest.raises(ValueError, match="mask: expected shape"):
        sa.effective_sample_size(torch.zeros(2, 3), torch.ones(2, 2))
