"""RolloutCorrection against hand-computed weights, masks and metrics."""

import math

import pytest
import torch

import stable_async as sa

LOG = math.log


def _batch(old_probs, rollout_probs, mask=None, logprobs=None):
    old = torch.tensor(old_probs, dtype=torch.float64).log()
    rollout = torch.tensor(rollout_probs, dtype=torch.float64).log()
    lp = old.clone() if logprobs is None else torch.tensor(logprobs, dtype=torch.float64).log()
    mask = torch.ones_like(old, dtype=torch.bool) if mask is None else torch.tensor(mask, dtype=torch.bool)
    return sa.PolicyBatch(
        logprobs=lp.requires_grad_(True),
        advantages=torch.ones(old.shape[0], dtype=torch.float64),
        mask=mask,
        old_logprobs=old,
        rollout_logprobs=rollout,
    )


# old / rollout ratios: row 0 = [2, 0.5, 4], row 1 = [1, 3, (masked) 10]
BATCH = _batch([[0.4, 0.1, 0.8], [0.3, 0.6, 0.5]], [[0.2, 0.2, 0.2], [0.3, 0.2, 0.05]], mask=[[1, 1, 1], [1, 1, 0]])
RATIOS = torch.tensor([[2.0, 0.5, 4.0], [1.0, 3.0, 0.0]], dtype=torch.float64)


def test_token_tis_truncates_from_above():
    result = sa.RolloutCorrection(high=2.5)(BATCH)
    assert torch.allclose(result.weights, torch.tensor([[2.0, 0.5, 2.5], [1.0, 2.5, 0.0]], dtype=torch.float64))
    assert result.metrics["rollout_corr/truncated_fraction"].item() == pytest.approx(2 / 5)
    assert result.metrics["rollout_corr/rollout_is_ratio_fraction_high"].item() == pytest.approx(2 / 5)
    assert not result.rejected.any()


def test_two_sided_truncation():
    result = sa.RolloutCorrection(low=0.8, high=2.5)(BATCH)
    assert torch.allclose(result.weights, torch.tensor([[2.0, 0.8, 2.5], [1.0, 2.5, 0.0]], dtype=torch.float64))
    assert result.metrics["rollout_corr/rollout_is_ratio_fraction_low"].item() == pytest.approx(1 / 5)


def test_token_mask_icepop():
    result = sa.icepop(low=0.6, high=3.5)(BATCH)
    assert torch.allclose(result.weights, torch.tensor([[2.0, 0.0, 0.0], [1.0, 3.0, 0.0]], dtype=torch.float64))
    assert result.rejected.tolist() == [[False, True, True], [False, False, False]]
    assert result.metrics["rollout_corr/rollout_rs_masked_fraction"].item() == pytest.approx(2 / 5)
    assert result.metrics["rollout_corr/rollout_rs_seq_masked_fraction"].item() == pytest.approx(1 / 2)
    assert torch.equal(result.keep, BATCH.mask)
    excluded = sa.icepop(low=0.6, high=3.5, exclude_rejected=True)(BATCH)
    assert torch.equal(excluded.keep, BATCH.mask & ~excluded.rejected)


def test_sequence_and_geometric_levels():
    seq = [2.0 * 0.5 * 4.0, 1.0 * 3.0]  # products over valid tokens
    geo = [seq[0] ** (1 / 3), seq[1] ** (1 / 2)]
    truncated = sa.RolloutCorrection(level="sequence", high=3.5)(BATCH).weights
    assert torch.allclose(truncated[0], torch.full((3,), 3.5, dtype=torch.float64))
    assert torch.allclose(truncated[1, :2], torch.full((2,), 3.0, dtype=torch.float64))
    geometric = sa.RolloutCorrection(level="geometric", high=10.0)(BATCH).weights
    assert torch.allclose(geometric[0], torch.full((3,), geo[0], dtype=torch.float64))
    masked = sa.sequence_mask(high=3.5)(BATCH)
    assert masked.rejected.tolist() == [[True, True, True], [False, False, False]]
    assert torch.allclose(masked.weights[1, :2], torch.full((2,), 3.0, dtype=torch.float64))
    token_carried = sa.sequence_mask(high=3.5, weight="token")(BATCH).weights
    assert torch.allclose(token_carried, torch.tensor([[0.0, 0.0, 0.0], [1.0, 3.0, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize(
    ("statistic", "per_token"),
    [
        ("k1", lambda r: -LOG(r)),
        ("k2", lambda r: 0.5 * LOG(r) ** 2),
        ("k3", lambda r: r - 1 - LOG(r)),
    ],
)
def test_divergence_gates(statistic, per_token):
    high = 0.3
    result = sa.RolloutCorrection(mode="mask", statistic=statistic, low=-0.3 if statistic == "k1" else None, high=high)(
        BATCH
    )
    for i, j in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]:
        value = per_token(RATIOS[i, j].item())
        keep = value <= high and (statistic != "k1" or value >= -0.3)
        assert bool(result.rejected[i, j]) == (not keep)
        assert result.weights[i, j].item() == (1.0 if keep else 0.0)  # a divergence gate carries weight 1
    assert "rollout_corr/rollout_is_ratio_fraction_high" not in result.metrics  # high is not a ratio bound here


def test_binary_gates_use_probabilities():
    # p = old probs, q = rollout probs for row 0: |p - q| = 0.2, 0.1, 0.6
    tv = sa.RolloutCorrection(mode="mask", statistic="binary_tv", high=0.15)(BATCH)
    assert tv.rejected[0].tolist() == [True, False, True]
    kl = sa.RolloutCorrection(mode="mask", statistic="binary_kl", high=0.05)(BATCH)
    p, q = 0.1, 0.2
    expected = q * LOG(q / p) + (1 - q) * LOG((1 - q) / (1 - p))
    assert bool(kl.rejected[0, 1]) == (expected > 0.05)


def test_numerator_current_uses_the_learner():
    batch = _batch([[0.5]], [[0.25]], logprobs=[[0.75]])
    assert sa.RolloutCorrection(high=10.0)(batch).weights.item() == pytest.approx(2.0)
    assert sa.RolloutCorrection(high=10.0, numerator="current")(batch).weights.item() == pytest.approx(3.0)


def test_weights_are_detached_and_multiply_the_loss():
    out_plain = sa.get_loss("reinforce", aggregation="token-sum")(BATCH)
    out_corr = sa.get_loss("reinforce", aggregation="token-sum", correction=sa.RolloutCorrection(high=2.5))(BATCH)
    weights = sa.RolloutCorrection(high=2.5)(BATCH).weights
    assert not weights.requires_grad
    (g_plain,) = torch.autograd.grad(out_plain.loss, BATCH.logprobs)
    (g_corr,) = torch.autograd.grad(out_corr.loss, BATCH.logprobs)
    assert torch.allclose(g_corr, g_plain * weights)


def test_mismatch_kl_metrics():
    result = sa.RolloutCorrection()(BATCH)
    valid = RATIOS[BATCH.mask]
    k1 = (-valid.log()).mean().item()
    k3 = (valid - 1 - valid.log()).mean().item()
    assert result.metrics["rollout_corr/kl"].item() == pytest.approx(k1)
    assert result.metrics["rollout_corr/k3_kl"].item() == pytest.approx(k3)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"level": "batch"}, "level: expected one of"),
        ({"mode": "clip"}, "mode: expected one of"),
        ({"statistic": "kl"}, "statistic: expected one of"),
        ({"numerator": "rollout"}, "numerator: expected one of"),
        ({"weight": "ratio"}, "weight: expected one of"),
        ({"low": None, "high": None}, "at least one bound"),
        ({"low": 3.0, "high": 2.0}, "expected low <= high"),
        ({"high": -1.0}, "high: expected a finite number >= 0"),
        ({"high": float("inf")}, "high: expected a finite number"),
        ({"statistic": "k3"}, "statistic: mode='truncate' clamps the ratio itself"),
    ],
)
def test_invalid_settings(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        sa.RolloutCorrection(**kwargs)


def test_missing_rollout_logprobs():
    batch = sa.PolicyBatch(logprobs=-torch.rand(1, 2), advantages=torch.ones(1), mask=torch.ones(1, 2))
    with pytest.raises(ValueError, match="rollout_logprobs: RolloutCorrection needs"):
        sa.RolloutCorrection()(batch)


# ---------------------------------------------------------------------- D1: exclude_rejected with global counts
def test_d1_exclude_rejected_hand_computed_with_global_counts():
    """D1: with_global_counts() counted the tokens before rejection, so exclude_rejected switched off.

    icepop(low=0.6, high=3.5) rejects tokens (0, 1) and (0, 2) of BATCH; REINFORCE with A = 1 has
    per-token loss −log π: the token mean over the 3 kept tokens is (−log 0.4 − log 0.3 − log 0.6) / 3.
    """
    correction = sa.icepop(low=0.6, high=3.5, weight="none", exclude_rejected=True)
    expected = -(LOG(0.4) + LOG(0.3) + LOG(0.6)) / 3
    loss_fn = sa.get_loss("reinforce", correction=correction)
    assert loss_fn(BATCH).loss.item() == pytest.approx(expected, rel=1e-14)
    assert loss_fn(BATCH.with_global_counts()).loss.item() == pytest.approx(expected, rel=1e-14)


def test_d1_issue_example_local_equals_global_counts():
    """D1, the issue's case: ppo + icepop(0.8, 1.25, exclude_rejected=True) gave −0.396 locally and
    −0.277 (the exclude_rejected=False value) with with_global_counts()."""
    from gloo_workers import LOSS_B, loss_batch, loss_data

    data, theta = loss_data()
    batch = loss_batch({k: v[slice(0, LOSS_B)] for k, v in data.items()}, theta)
    on = sa.get_loss("ppo", correction=sa.icepop(low=0.8, high=1.25, exclude_rejected=True))
    off = sa.get_loss("ppo", correction=sa.icepop(low=0.8, high=1.25))
    local, counted = on(batch).loss.item(), on(batch.with_global_counts()).loss.item()
    assert counted == pytest.approx(local, rel=1e-12)
    assert abs(local - off(batch).loss.item()) > 1e-3  # the exclusion changes the loss here


@pytest.mark.parametrize("correction", ["icepop_excluded", "seq_mask_excluded"])
def test_d1_every_loss_and_aggregation_local_equals_global_counts(correction):
    """D1 for every registered loss × aggregation: one process, with and without with_global_counts()."""
    from gloo_workers import LOSS_B, _correction, loss_batch, loss_data

    data, theta0 = loss_data()
    rows = {k: v[slice(0, LOSS_B)] for k, v in data.items()}
    for name in sa.available_losses():
        for aggregation in sa.AGGREGATION_MODES:
            loss_fn = sa.get_loss(name, aggregation=aggregation, correction=_correction(correction))
            results = []
            for counted in (False, True):
                theta = theta0.clone().requires_grad_(True)
                batch = loss_batch(rows, theta)
                loss = loss_fn(batch.with_global_counts() if counted else batch).loss
                results.append(torch.cat([loss.detach().reshape(1), torch.autograd.grad(loss, theta)[0]]))
            torch.testing.assert_close(results[1], results[0], rtol=1e-12, atol=1e-14, msg=f"{name} {aggregation}")


def test_d1_directly_given_counts_are_taken_as_kept_counts():
    """Counts given directly (a trainer's) are the counts of the units that count: used as given."""
    correction = sa.icepop(low=0.6, high=3.5, weight="none", exclude_rejected=True)
    batch = BATCH.replace(global_num_tokens=5.0)  # 5 valid tokens, 3 kept: the caller says 5
    kept_total = -(LOG(0.4) + LOG(0.3) + LOG(0.6))
    assert sa.get_loss("reinforce", correction=correction)(batch).loss.item() == pytest.approx(kept_total / 5)
