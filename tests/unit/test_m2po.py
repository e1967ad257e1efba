"""M2PO: the second-moment mask against a brute-force Algorithm 1, hand-computed loss, DP invariance."""

from __future__ import annotations

import math
import random
import threading

import pytest
import torch

import stable_async as sa
from stable_async.losses import m2po as m2po_module
from stable_async.losses.m2po import M2POConfig, m2_keep_weights

F64 = torch.float64


def _grad(out, lp):
    (g,) = torch.autograd.grad(out.loss, lp)
    return g


def brute_force_removed(values: list[float], tau: float) -> list[float]:
    """The paper's Algorithm 1: while mean(remaining) > τ, remove argmax. Returns the removed values in order."""
    remaining = list(values)
    removed = []
    while remaining and sum(remaining) / len(remaining) > tau:
        j = max(range(len(remaining)), key=remaining.__getitem__)
        removed.append(remaining.pop(j))
    return removed


def _select(values, tau, mask=None):
    m = torch.tensor([values], dtype=F64)
    mask = torch.ones_like(m, dtype=torch.bool) if mask is None else mask
    return m2_keep_weights(m, mask, tau)


def test_hand_computed_loss_and_gradient():
    old = torch.full((1, 4), -1.0, dtype=F64)  # log-probs <= 0; only differences enter
    # m = (log μ − log π_old)² = [0.25, 0.01, 0, 0.04]: mean 0.075 > 0.04 → drop 0.25 → mean 0.0167 ≤ 0.04.
    mu = old + torch.tensor([[-0.5, -0.1, 0.0, 0.2]], dtype=F64)
    d = [0.3, -0.2, 0.1, 0.5]  # log π_θ − log π_old: no clipping, however large
    lp = (old + torch.tensor([d], dtype=F64)).requires_grad_(True)
    adv = [1.0, 2.0, -1.0, 1.0]
    batch = sa.PolicyBatch(
        logprobs=lp,
        advantages=torch.tensor([adv], dtype=F64),
        mask=torch.ones(1, 4, dtype=torch.bool),
        old_logprobs=old,
        rollout_logprobs=mu,
    )
    out = sa.get_loss("m2po")(batch)
    keep = [0.0, 1.0, 1.0, 1.0]
    r = [math.exp(x) for x in d]
    expected = sum(-k * ri * a for k, ri, a in zip(keep, r, adv, strict=True)) / 4  # masked token stays in /4
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    grad = [-k * ri * a / 4 for k, ri, a in zip(keep, r, adv, strict=True)]
    assert _grad(out, lp)[0].tolist() == pytest.approx(grad, rel=1e-12, abs=1e-15)
    assert out.metrics["actor/m2po_masked_fraction"] == pytest.approx(0.25)
    assert out.metrics["actor/m2po_m2_before"] == pytest.approx(0.075)
    assert out.metrics["actor/m2po_m2_after"] == pytest.approx(0.05 / 3)


def test_no_masking_when_every_m_is_below_tau():
    sel = _select([0.01, 0.04, 0.0, 0.03], 0.04)
    assert sel.weights.tolist() == [[1.0, 1.0, 1.0, 1.0]]
    assert sel.masked_fraction == 0.0


def test_stops_as_soon_as_mean_is_at_most_tau():
    # Dyadic values so the boundary is exact: after dropping 1.0 the mean of [0.5, 0] is 0.25 = τ → stop.
    sel = _select([0.5, 1.0, 0.0], 0.25)
    assert sel.weights.tolist() == [[1.0, 0.0, 1.0]]
    # With τ just below, 0.5 goes too.
    sel = _select([0.5, 1.0, 0.0], 0.2)
    assert sel.weights.tolist() == [[0.0, 0.0, 1.0]]


def test_masks_largest_first_even_if_a_smaller_removal_would_do():
    # Dropping 0.09 alone would reach mean 0.0325; Algorithm 1 drops the largest (0.1) first: mean 0.0325 too,
    # and it must not drop 0.09 as well.
    sel = _select([0.09, 0.1, 0.0, 0.04, 0.0], 0.04)
    assert sel.weights.tolist() == [[1.0, 0.0, 1.0, 1.0, 1.0]]


def _check_against_brute_force(values, tau):
    sel = _select(values, tau)
    w = sel.weights[0].tolist()
    removed = brute_force_removed(values, tau)
    k = len(removed)
    assert sum(1 - x for x in w) == pytest.approx(k, abs=1e-12)
    kept_sum = sum(x * v for x, v in zip(w, values, strict=True))
    assert kept_sum == pytest.approx(sum(values) - sum(removed), abs=1e-12)
    if k:
        cut = min(removed)
        for x, v in zip(w, values, strict=True):
            if v > cut:
                assert x == 0.0
            elif v < cut:
                assert x == 1.0
    else:
        assert w == [1.0] * len(values)
    if len(set(values)) == len(values):  # no ties: the mask is 0/1 and equals Algorithm 1's exactly
        expected = [0.0 if v in removed else 1.0 for v in values]
        assert w == expected


def test_brute_force_random_small_inputs():
    rng = random.Random(0)
    for _ in range(120):
        n = rng.randint(1, 7)
        values = [
            rng.choice([0.0, 0.01, 0.03, 0.05, 0.2]) if rng.random() < 0.3 else rng.random() ** 3 for _ in range(n)
        ]
        tau = rng.choice([0.0, 0.01, 0.04, 0.1, 0.3])
        _check_against_brute_force(values, tau)


def test_every_removal_order_of_ties_gives_the_same_kept_totals():
    # Ties at the cut: [0, 0, 0.1, 0.1], τ = 0.04 → exactly one 0.1 must go; either one is a valid
    # largest-first order, so each gets the weight 1/2 and the totals match every order.
    sel = _select([0.0, 0.1, 0.0, 0.1], 0.04)
    assert sel.weights[0].tolist() == pytest.approx([1.0, 0.5, 1.0, 0.5])
    assert sel.kept == pytest.approx(3.0)
    assert sel.m2_after == pytest.approx(0.1 / 3)


def test_all_tokens_masked_is_finite_with_zero_gradient():
    old = torch.full((2, 3), -1.0, dtype=F64)
    lp = (old + 0.1).requires_grad_(True)
    batch = sa.PolicyBatch(
        logprobs=lp,
        advantages=torch.ones(2, 3, dtype=F64),
        mask=torch.ones(2, 3, dtype=torch.bool),
        old_logprobs=old,
        rollout_logprobs=old - 1.0,  # every m = 1 > τ
    )
    out = sa.get_loss("m2po")(batch)
    assert out.loss.item() == 0.0
    g = _grad(out, lp)
    assert torch.isfinite(g).all() and (g == 0).all()
    assert out.metrics["actor/m2po_masked_fraction"] == 1.0
    assert out.metrics["actor/m2po_m2_after"] == 0.0


def test_empty_mask_is_finite_with_zero_loss():
    old = torch.zeros(1, 3, dtype=F64)
    lp = old.clone().requires_grad_(True)
    batch = sa.PolicyBatch(
        logprobs=lp,
        advantages=torch.ones(1, 3, dtype=F64),
        mask=torch.zeros(1, 3, dtype=torch.bool),
        old_logprobs=old,
        rollout_logprobs=old - 1.0,
    )
    out = sa.get_loss("m2po")(batch)
    assert out.loss.item() == 0.0 and (_grad(out, lp) == 0).all()
    assert out.metrics["actor/m2po_masked_fraction"] == 0.0


def test_padding_is_ignored_by_the_selection():
    mask = torch.tensor([[True, True, False, True]])
    # The padded 5.0 must neither be counted nor change the cut.
    sel = _select([0.01, 0.2, 5.0, 0.0], 0.04, mask=mask)
    assert sel.weights.tolist() == [[1.0, 0.0, 0.0, 1.0]]
    assert sel.n == 3


def test_numerator_current_uses_the_current_policy(tensors):
    t = dict(tensors)
    t["old_logprobs"] = t["rollout_logprobs"].clone()  # bypass: π_old = μ → "old" never masks
    batch = sa.PolicyBatch(**t)
    assert sa.get_loss("m2po")(batch).metrics["actor/m2po_masked_fraction"] == 0.0
    out = sa.get_loss("m2po", numerator="current")(batch)
    m = (t["rollout_logprobs"] - t["logprobs"].detach()) ** 2
    expected = m2_keep_weights(m, batch.mask, 0.04)
    assert out.metrics["actor/m2po_masked_fraction"] == pytest.approx(expected.masked_fraction)
    assert expected.masked_fraction > 0


def test_unclipped_ratio_times_advantage(tensors):
    # τ large → nothing masked → exactly −mean(r·A), the unclipped surrogate.
    batch = sa.PolicyBatch(**tensors)
    out = sa.get_loss("m2po", m2_threshold=1e9)(batch)
    r = torch.exp(tensors["logprobs"] - tensors["old_logprobs"])
    m = tensors["mask"]
    expected = -(r * tensors["advantages"])[m].sum() / m.sum()
    torch.testing.assert_close(out.loss, expected, rtol=1e-13, atol=1e-15)


class _ThreadGroup:
    """Simulated all-reduce across threads (one thread per "rank") for the sharding test."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots: list[torch.Tensor | None] = [None] * world
        self.local = threading.local()

    def _reduce(self, tensor: torch.Tensor, op) -> torch.Tensor:
        self.slots[self.local.rank] = tensor.detach().clone()
        self.barrier.wait()
        out = self.slots[0].clone()
        for other in self.slots[1:]:
            out = op(out, other)
        self.barrier.wait()
        return out

    def sum(self, tensor, process_group=None):
        return self._reduce(tensor, torch.add)

    def max(self, tensor, process_group=None):
        return self._reduce(tensor, torch.maximum)


def test_global_selection_is_independent_of_sharding(monkeypatch, gen):
    from sa_testing import random_tensors

    t = random_tensors(gen, B=8, T=7, spread=0.35)
    full = sa.PolicyBatch(**t)
    loss_fn = sa.get_loss("m2po")
    reference = loss_fn(full)
    (ref_grad,) = torch.autograd.grad(reference.loss, t["logprobs"])
    assert 0 < reference.metrics["actor/m2po_masked_fraction"] < 1

    world = 2
    group = _ThreadGroup(world)
    monkeypatch.setattr(m2po_module, "all_reduce_sum", group.sum)
    monkeypatch.setattr(m2po_module, "all_reduce_max", group.max)
    shards = [slice(0, 3), slice(3, 8)]  # uneven shards
    n_global = float(t["mask"].sum())
    results: list = [None] * world

    def run(rank: int) -> None:
        group.local.rank = rank
        s = shards[rank]
        lp = t["logprobs"].detach()[s].clone().requires_grad_(True)
        part = {k: (v[s] if k != "logprobs" else lp) for k, v in t.items()}
        batch = sa.PolicyBatch(**part, global_num_tokens=n_global, dp_size=world)
        out = loss_fn(batch)
        (grad,) = torch.autograd.grad(out.loss, lp)
        results[rank] = (out, grad)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    # DDP averages gradients over ranks: the mean of the shard gradients equals the full-batch gradient.
    grads = torch.cat([results[r][1] for r in range(world)]) / world
    torch.testing.assert_close(grads, ref_grad, rtol=1e-12, atol=1e-15)
    for r in range(world):
        for key in ("actor/m2po_masked_fraction", "actor/m2po_m2_before", "actor/m2po_m2_after"):
            assert results[r][0].metrics[key] == pytest.approx(reference.metrics[key], rel=1e-12)


def test_local_scope_does_not_reduce(monkeypatch, tensors):
    def boom(*args, **kwargs):
        raise AssertionError("local scope must not all-reduce")

    monkeypatch.setattr(m2po_module, "all_reduce_sum", boom)
    monkeypatch.setattr(m2po_module, "all_reduce_max", boom)
    out = sa.get_loss("m2po", scope="local")(sa.PolicyBatch(**tensors))
    assert torch.isfinite(out.loss)


def test_fp32_input_runs(gen):
    from sa_testing import random_tensors

    t = random_tensors(gen, dtype=torch.float32)
    out = sa.get_loss("m2po")(sa.PolicyBatch(**t))
    assert out.loss.dtype == torch.float32
    assert torch.isfinite(_grad(out, t["logprobs"])).all()


def test_large_inputs_select_exactly(gen):
    # Many tokens with a heavy tail: the search must land on Algorithm 1's count exactly.
    m = (torch.randn(64, 128, generator=gen, dtype=F64) * 0.3) ** 2
    mask = torch.rand(64, 128, generator=gen) < 0.9
    sel = m2_keep_weights(m, mask, 0.04)
    # Algorithm 1 keeps the longest ascending prefix whose mean is ≤ τ (prefix means never decrease).
    total, keep = 0.0, 0
    for i, v in enumerate(sorted(m[mask].tolist())):
        if (total + v) / (i + 1) > 0.04:
            break
        total, keep = total + v, i + 1
    assert 0 < keep < int(mask.sum())
    assert sel.kept == keep
    assert set(sel.weights[mask].unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"m2_threshold": -0.1}, "m2_threshold"),
        ({"m2_threshold": float("inf")}, "m2_threshold"),
        ({"numerator": "rollout"}, "numerator"),
        ({"scope": "rank"}, "scope"),
        ({"aggregation": "mean"}, "aggregation"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        sa.get_loss("m2po", **kwargs)
    with pytest.raises(ValueError, match=name):
        M2POConfig(**kwargs)
