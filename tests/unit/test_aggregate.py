"""Aggregation modes against hand-computed values, and data-parallel sharding invariance."""

import pytest
import torch

from stable_async.aggregate import AGGREGATION_MODES, aggregate

LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0], [7.0, 8.0, 9.0]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("token-mean", (1 + 2 + 3 + 4 + 5) / 5),
        ("token-sum", 15.0),
        ("seq-mean-token-mean", ((1 + 2 + 3) / 3 + (4 + 5) / 2) / 2),
        ("seq-mean-token-sum", (6 + 9) / 2),
        ("seq-mean-token-sum-norm", (6 + 9) / (2 * 3)),
    ],
)
def test_hand_computed(mode, expected):
    assert aggregate(LOSS, MASK, mode).item() == pytest.approx(expected, rel=1e-15)


def test_norm_length_is_the_constant_denominator():
    assert aggregate(LOSS, MASK, "seq-mean-token-sum-norm", norm_length=10).item() == pytest.approx(15 / 20)


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_masked_values_are_ignored_even_if_nonfinite(mode):
    poisoned = LOSS.clone()
    poisoned[2, :] = float("nan")
    poisoned[1, 2] = float("inf")
    assert aggregate(poisoned, MASK, mode).item() == aggregate(LOSS, MASK, mode).item()


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_nothing_valid_gives_zero_and_zero_gradient(mode):
    loss = torch.randn(3, 4, requires_grad=True)
    out = aggregate(loss, torch.zeros(3, 4, dtype=torch.bool), mode)
    out.backward()
    assert out.item() == 0.0 and torch.equal(loss.grad, torch.zeros(3, 4))
    empty = torch.zeros(0, 0, requires_grad=True)
    assert aggregate(empty, torch.zeros(0, 0, dtype=torch.bool), mode).item() == 0.0


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_sharded_gradient_equals_full_batch_gradient(mode):
    gen = torch.Generator().manual_seed(0)
    loss = torch.randn(8, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(8, 5, generator=gen) > 0.3
    mask[3] = False
    full = aggregate(loss, mask, mode)
    (full_grad,) = torch.autograd.grad(full, loss)
    tokens, seqs = float(mask.sum()), float(mask.any(-1).sum())
    shards = [slice(0, 3), slice(3, 8)]  # uneven shards, one holding a fully masked row
    # DDP / FSDP average gradients over ranks: the mean of the shard losses is what is differentiated.
    parts = [
        aggregate(loss[s], mask[s], mode, global_num_tokens=tokens, global_num_seqs=seqs, dp_size=2) for s in shards
    ]
    averaged = sum(parts) / 2
    (sharded_grad,) = torch.autograd.grad(averaged, loss)
    assert averaged.item() == pytest.approx(full.item(), rel=1e-12)
    assert torch.allclose(sharded_grad, full_grad, rtol=1e-12, atol=1e-15)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="mode: unknown aggregation mode 'mean'"):
        aggregate(LOSS, MASK, "mean")
    with pytest.raises(ValueError, match="loss_mat / mask"):
        aggregate(LOSS, MASK[:, :2], "token-mean")
    with pytest.raises(ValueError, match="global_num_tokens / global_num_seqs: required when dp_size > 1"):
        aggregate(LOSS, MASK, "token-mean", dp_size=2)
    with pytest.raises(ValueError, match="norm_length"):
        aggregate(LOSS, MASK, "seq-mean-token-sum-norm", norm_length=0)
