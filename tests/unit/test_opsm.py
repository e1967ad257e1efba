"""OPSM (`sa.opsm`) and correction chains: hand-computed masks, composition, validation, edge cases."""

import math

import pytest
import torch

import stable_async as sa


def _batch(lp, adv, mask=None, old=None, mu=None, **kw):
    lp = torch.tensor(lp, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(lp.shape, dtype=torch.bool) if mask is None else torch.tensor(mask)
    old, mu = (None if x is None else torch.tensor(x, dtype=torch.float64) for x in (old, mu))
    adv = torch.tensor(adv, dtype=torch.float64)
    return sa.PolicyBatch(logprobs=lp, advantages=adv, mask=mask, old_logprobs=old, rollout_logprobs=mu, **kw)


def test_hand_computed_mask():
    # Sequence KLs (mean of log μ − log π_θ over valid tokens): 0.6, 0.6, 0.1, 0.6 (one token masked).
    lp = [[-1.0, -2.0], [-1.0, -2.0], [-1.0, -2.0], [-1.0, -2.0]]
    mu = [[-0.4, -1.4], [-0.4, -1.4], [-0.9, -1.9], [-0.4, 5.0]]
    mask = [[True, True], [True, True], [True, True], [True, False]]
    batch = _batch(lp, [-1.0, 1.0, -1.0, -0.5], mask=mask, mu=mu)
    result = sa.opsm(0.5)(batch)
    expected = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(result.weights, expected)
    assert result.rejected.tolist() == [[True, True], [False, False], [False, False], [True, False]]
    assert result.keep.tolist() == mask  # masked tokens still count in the denominator
    assert result.metrics["opsm/seq_masked_fraction"] == pytest.approx(0.5)
    assert float(result.metrics["opsm/masked_fraction"]) == pytest.approx(3 / 7)
    torch.testing.assert_close(sa.opsm(0.5).sequence_kl(batch), torch.tensor([0.6, 0.6, 0.1, 0.6], dtype=torch.float64))


def test_boundary_zero_advantage_and_behavior_choice():
    lp, old, mu = [[-1.0]], [[-0.5]], [[0.0]]
    at = _batch(lp, [-1.0], mu=[[-0.5]])
    assert float(sa.opsm(0.5)(at).weights) == 1.0  # D = δ is kept
    assert float(sa.opsm(0.5)(_batch(lp, [0.0], mu=mu)).weights) == 1.0  # A = 0 is kept
    both = _batch(lp, [-1.0], old=old, mu=mu)
    assert float(sa.opsm(0.6, behavior="auto")(both).weights) == 0.0  # D = 1 against μ
    assert float(sa.opsm(0.6, behavior="old")(both).weights) == 1.0  # D = 0.5 against π_old
    assert float(sa.opsm(0.4, behavior="auto")(_batch(lp, [-1.0], old=old)).weights) == 0.0  # fallback: π_old
    with pytest.raises(ValueError, match="rollout_logprobs"):
        sa.opsm(0.4, behavior="rollout")(_batch(lp, [-1.0], old=old))


def test_masked_sequences_get_zero_gradient_and_count_in_the_denominator():
    batch = _batch([[-1.0, -1.0], [-1.0, -1.0]], [-1.0, -1.0], mu=[[0.0, 0.0], [-1.0, -1.0]])
    out = sa.get_loss("reinforce", correction=sa.opsm(0.5))(batch)
    (grad,) = torch.autograd.grad(out.loss, batch.logprobs)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0], [0.25, 0.25]], dtype=torch.float64))


def test_chain_multiplies_weights_and_merges_metrics():
    gen = torch.Generator().manual_seed(0)
    lp = -torch.rand(6, 5, generator=gen, dtype=torch.float64)
    mu = (lp + 0.8 * torch.randn(6, 5, generator=gen, dtype=torch.float64)).clamp(max=0.0)
    adv, mask = torch.randn(6, generator=gen), torch.ones(6, 5, dtype=torch.bool)
    batch = sa.PolicyBatch(logprobs=lp.requires_grad_(), advantages=adv, mask=mask, rollout_logprobs=mu)
    tis, seq_mask = sa.token_tis(1.5), sa.opsm(0.2)
    chained = sa.CorrectionChain((tis, seq_mask))
    a, b, c = tis(batch), seq_mask(batch), chained(batch)
    torch.testing.assert_close(c.weights, a.weights * b.weights)
    assert torch.equal(c.rejected, a.rejected | b.rejected)
    assert set(c.metrics) == set(a.metrics) | set(b.metrics)
    config = sa.get_loss("ppo", correction=[tis, seq_mask]).config
    assert isinstance(config.correction, sa.CorrectionChain) and config.correction.corrections == (tis, seq_mask)
    assert sa.CorrectionChain((chained, tis.__class__(prefix="b/"))).corrections[:2] == (tis, seq_mask)  # flattened
    ours = sa.get_loss("ppo", correction=(tis, seq_mask))(batch).loss
    ref = sa.get_loss("ppo", correction=(seq_mask, tis))(batch).loss
    torch.testing.assert_close(ours, ref)  # order does not matter


def test_chain_and_opsm_validation():
    with pytest.raises(ValueError, match="metric"):
        batch = _batch([[-1.0]], [1.0], mu=[[-1.0]])
        sa.CorrectionChain((sa.token_tis(), sa.icepop()))(batch)
    with pytest.raises(TypeError, match="correction"):
        sa.get_loss("ppo", correction="tis")
    with pytest.raises(TypeError, match="correction"):
        sa.get_loss("ppo", correction=(sa.token_tis(), 3))
    with pytest.raises(ValueError, match="corrections"):
        sa.CorrectionChain(())
    for bad in (0.0, -1.0, math.inf, math.nan, True, "0.5", None):
        with pytest.raises(ValueError, match="threshold"):
            sa.opsm(bad)
    with pytest.raises(ValueError, match="behavior"):
        sa.opsm(0.5, behavior="current")


def test_extreme_log_ratios_bf16_and_empty_batches():
    lp = torch.tensor([[-1e4, -2.0], [-3.0, -1.0]], dtype=torch.bfloat16, requires_grad=True)  # log-ratios ∓1e4
    mu = torch.tensor([[0.0, -1e4], [-3.0, -1.0]], dtype=torch.bfloat16)
    batch = sa.PolicyBatch(
        logprobs=lp, advantages=torch.tensor([-1.0, 1.0]), mask=torch.ones(2, 2), rollout_logprobs=mu
    )
    out = sa.get_loss("ppo", correction=sa.opsm(0.5))(batch)
    assert all(math.isfinite(v) for v in out.metrics.values())
    out.loss.backward()
    assert torch.isfinite(lp.grad).all()
    empty = sa.PolicyBatch(logprobs=torch.zeros(2, 3, requires_grad=True), advantages=torch.tensor([-1.0, -1.0]),
                           mask=torch.zeros(2, 3), rollout_logprobs=torch.zeros(2, 3))  # fmt: skip
    out = sa.get_loss("ppo", correction=sa.opsm(0.5))(empty)
    assert out.loss.item() == 0.0 and out.metrics["opsm/seq_masked_fraction"] == 0.0
