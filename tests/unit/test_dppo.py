"""DPPO losses: hand-computed trust-region masks, gradients, anchors, top-K inputs and bad input.

Parity with veRL's ``dppo_tv`` / ``dppo_kl`` lives in tests/trainers/test_verl_dppo_parity.py.
"""

import math

import pytest
import torch

import stable_async as sa
from sa_testing import random_tensors
from stable_async import divergence as D
from stable_async.losses.dppo import DPPOConfig, DPPOKLConfig, trust_region_mask

# Six tokens, anchor q = 0.5 everywhere; (p, A) and whether DPPO drops the token (δ_TV = 0.15, δ_KL = 0.05).
#   p    A   p − q   binary KL(q‖p)                              pushed direction   dropped
#  0.7  +1   +0.2   ½ln(.5/.7) + ½ln(.5/.3) = 0.08718 > 0.05    up, rose           yes
#  0.6  +1   +0.1   ½ln(.5/.6) + ½ln(.5/.4) = 0.02041 < 0.05    up, rose           no (inside)
#  0.3  +1   −0.2   0.08718                                     up, fell           no (moving back)
#  0.3  −1   −0.2   0.08718                                     down, fell         yes
#  0.7  −1   +0.2   0.08718                                     down, rose         no (moving back)
#  0.4  −1   −0.1   0.02041                                     down, fell         no (inside)
HAND_P = [0.7, 0.6, 0.3, 0.3, 0.7, 0.4]
HAND_A = [1.0, 1.0, 1.0, -1.0, -1.0, -1.0]
HAND_DROPPED = [True, False, False, True, False, False]


def _hand_batch(**extra):
    lp = torch.tensor([HAND_P], dtype=torch.float64).log().requires_grad_(True)
    return lp, sa.PolicyBatch(
        logprobs=lp,
        advantages=torch.tensor([HAND_A], dtype=torch.float64),
        mask=torch.ones(1, 6, dtype=torch.bool),
        rollout_logprobs=torch.full((1, 6), math.log(0.5), dtype=torch.float64),
        **extra,
    )


def _mask(lp, lq, adv, divergence, delta):
    return trust_region_mask(lp, lq, adv > 0, divergence, delta, delta)


def test_mask_is_the_rule_written_out(gen):
    """The signed-divergence mask equals the rule as the paper states it, with ties p = q and A = 0."""
    lp = torch.log(torch.rand(6, 50, generator=gen, dtype=torch.float64))
    lq = torch.where(
        torch.rand(6, 50, generator=gen) < 0.2, lp, torch.log(torch.rand(6, 50, generator=gen, dtype=torch.float64))
    )
    adv = torch.randint(-1, 2, (6, 50), generator=gen).to(torch.float64)  # −1, 0, +1
    for divergence in (D.binary_tv(lp, lq), D.binary_kl(lp, lq)):
        for d_low, d_high in [(0.05, 0.05), (0.02, 0.3), (math.inf, 0.1)]:
            risen_too_far = (divergence > d_high) & (lp > lq)
            fallen_too_far = (divergence > d_low) & (lp < lq)
            expected = torch.where(adv > 0, risen_too_far, fallen_too_far)
            got = trust_region_mask(lp, lq, adv > 0, divergence, d_low, d_high)
            assert torch.equal(got, expected)
            assert expected.any() and not expected.all()  # the draw exercises both outcomes


@pytest.mark.parametrize("name", ["dppo_binary_tv", "dppo_binary_kl"])
def test_masked_fractions_split_by_rule(gen, name):
    """masked_frac_pos / _neg count the A > 0 / A ≤ 0 rule (A = 0 follows A ≤ 0) and add up to the
    masked fraction; counted here token by token."""
    t = random_tensors(gen, spread=1.5)
    adv = t["advantages"].clone()
    adv[:, ::3] = 0.0
    batch = sa.PolicyBatch(**{**t, "advantages": adv})
    out = sa.get_loss(name)(batch)
    lp, mu = batch.logprobs.detach(), batch.rollout_logprobs
    divergence = (D.binary_tv if name.endswith("tv") else D.binary_kl)(lp, mu)
    delta = 0.15 if name.endswith("tv") else 0.05
    dropped = _mask(lp, mu, batch.advantages, divergence, delta) & batch.mask
    n = int(batch.mask.sum())
    pos = int((dropped & (batch.advantages > 0)).sum()) / n
    neg = int((dropped & (batch.advantages <= 0)).sum()) / n
    assert int((dropped & (batch.advantages == 0)).sum()) > 0  # A = 0 tokens are masked too
    assert out.metrics["dppo/masked_frac_pos"] == pytest.approx(pos)
    assert out.metrics["dppo/masked_frac_neg"] == pytest.approx(neg)
    assert out.metrics["actor/pg_clipfrac"] == pytest.approx(pos + neg)
    valid = divergence[batch.mask]
    assert out.metrics["dppo/divergence_mean"] == pytest.approx(float(valid.mean()))
    assert out.metrics["dppo/divergence_max"] == pytest.approx(float(valid.max()))


@pytest.mark.parametrize("name", ["dppo_binary_tv", "dppo_binary_kl"])
def test_hand_computed_masks(name):
    lp, batch = _hand_batch()
    out = sa.get_loss(name, aggregation="token-sum")(batch)
    dropped = torch.tensor([HAND_DROPPED])
    assert torch.equal(out.per_token_loss == 0, dropped)
    assert out.metrics["actor/pg_clipfrac"] == pytest.approx(2 / 6)
    assert out.metrics["dppo/masked_frac_pos"] == pytest.approx(1 / 6)
    assert out.metrics["dppo/masked_frac_neg"] == pytest.approx(1 / 6)
    (grad,) = torch.autograd.grad(out.loss, lp)
    # kept tokens: d/dlog p of −sg(p/q)·A·log p = −(p/q)·A  (p/q ≤ 1.4 < c = 10)
    expected = [0.0 if d else -(p / 0.5) * a for p, a, d in zip(HAND_P, HAND_A, HAND_DROPPED)]
    assert torch.allclose(grad[0], torch.tensor(expected, dtype=torch.float64), atol=1e-14)


def test_hand_divergence_values():
    lp = torch.tensor(HAND_P, dtype=torch.float64).log()
    lq = torch.full((6,), math.log(0.5), dtype=torch.float64)
    far, near = 0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3), 0.5 * math.log(0.5 / 0.6) + 0.5 * math.log(1.25)
    assert far == pytest.approx(0.08718, abs=1e-5) and near == pytest.approx(0.02041, abs=1e-5)
    kl = D.binary_kl(lp, lq)
    assert torch.allclose(kl, torch.tensor([far, near, far, far, far, near], dtype=torch.float64), atol=1e-14)


def test_hand_topk_mask_catches_mass_moved_elsewhere():
    # Sampled token a: q_a = 0.5 -> p_a = 0.6 (binary TV 0.1, inside δ = 0.15);
    # other top-K token b: q_b = 0.3 -> p_b = 0.1; rest 0.2 -> 0.3.
    # Top-K TV = ½(0.1 + 0.2 + 0.1) = 0.2 > 0.15, and a rose: dropped for A > 0, kept for A < 0.
    lp = torch.tensor([[0.6, 0.6]], dtype=torch.float64).log().requires_grad_(True)
    batch = sa.PolicyBatch(
        logprobs=lp,
        advantages=torch.tensor([[1.0, -1.0]], dtype=torch.float64),
        mask=torch.ones(1, 2, dtype=torch.bool),
        rollout_logprobs=torch.full((1, 2), math.log(0.5), dtype=torch.float64),
        topk_ids=torch.tensor([[[3, 7], [3, 7]]]),
        topk_logprobs=torch.tensor([[[0.5, 0.3], [0.5, 0.3]]], dtype=torch.float64).log(),
        current_topk_logprobs=torch.tensor([[[0.6, 0.1], [0.6, 0.1]]], dtype=torch.float64).log(),
    )
    topk = sa.get_loss("dppo_topk_tv", aggregation="token-sum")(batch)
    binary = sa.get_loss("dppo_binary_tv", aggregation="token-sum")(batch)
    assert topk.per_token_loss[0, 0] == 0 and topk.per_token_loss[0, 1] != 0
    assert (binary.per_token_loss != 0).all()
    assert topk.metrics["dppo/divergence_max"] == pytest.approx(0.2)


def _topk_batch(gen, B=4, T=6, V=12, K=4, spread=0.8):
    """A batch built from real logits: rollout top-K (sampled token forced in), π_θ via gather_topk_logprobs."""
    rollout_logits = 2.0 * torch.randn(B, T, V, generator=gen, dtype=torch.float64)
    logits = (rollout_logits + spread * torch.randn(B, T, V, generator=gen, dtype=torch.float64)).requires_grad_(True)
    log_mu = torch.log_softmax(rollout_logits, -1)
    sampled = torch.multinomial(log_mu.exp().reshape(-1, V), 1, generator=gen).reshape(B, T, 1)
    ids = torch.topk(log_mu, K, dim=-1).indices
    ids = torch.where((ids == sampled).any(-1, keepdim=True), ids, torch.cat([ids[..., :-1], sampled], -1))
    batch = sa.PolicyBatch(
        logprobs=D.gather_topk_logprobs(logits, sampled)[..., 0],
        advantages=torch.randn(B, T, generator=gen, dtype=torch.float64),
        mask=torch.ones(B, T, dtype=torch.bool),
        rollout_logprobs=log_mu.gather(-1, sampled)[..., 0],
        topk_ids=ids,
        topk_logprobs=log_mu.gather(-1, ids),
        current_topk_logprobs=D.gather_topk_logprobs(logits, ids),
    )
    return logits, batch


@pytest.mark.parametrize("kind", ["tv", "kl"])
def test_topk_loss_from_logits(gen, kind):
    logits, batch = _topk_batch(gen)
    out = sa.get_loss(f"dppo_topk_{kind}", aggregation="token-sum")(batch)
    div = (D.topk_tv if kind == "tv" else D.topk_kl)(batch.current_topk_logprobs, batch.topk_logprobs)
    delta = 0.15 if kind == "tv" else 0.05
    dropped = _mask(batch.logprobs, batch.rollout_logprobs, batch.advantages, div, delta)
    assert 0 < int(dropped.sum()) < dropped.numel()  # the example exercises both outcomes
    assert torch.equal(out.per_token_loss == 0, dropped)
    # The divergence is detached: the logits' gradient is the kept tokens' policy gradient only.
    (g,) = torch.autograd.grad(out.loss, logits, retain_graph=True)
    weight = (batch.logprobs - batch.rollout_logprobs).exp().clamp(max=10.0).detach()
    surrogate = (-(~dropped).double() * weight * batch.advantages * batch.logprobs).sum()
    (g_ref,) = torch.autograd.grad(surrogate, logits)
    assert torch.allclose(g, g_ref, atol=1e-12)


def test_topk_mask_contains_binary_mask(gen):
    """binary ≤ top-K with the same δ and direction rule: every token binary drops, top-K drops too."""
    for _ in range(5):
        _, batch = _topk_batch(gen, B=8, T=8)
        lp, lq, adv = batch.logprobs.detach(), batch.rollout_logprobs, batch.advantages
        for binary, topk, delta in [(D.binary_tv, D.topk_tv, 0.15), (D.binary_kl, D.topk_kl, 0.05)]:
            b = _mask(lp, lq, adv, binary(lp, lq), delta)
            t = _mask(lp, lq, adv, topk(batch.current_topk_logprobs, batch.topk_logprobs), delta)
            assert not (b & ~t).any()


def test_gradient_formula_and_ratio_cap(gen):
    t = random_tensors(gen, spread=1.5)
    batch = sa.PolicyBatch(**t)
    out = sa.get_loss("dppo_binary_tv", ratio_cap=2.0)(batch)
    (grad,) = torch.autograd.grad(out.loss, t["logprobs"])
    lp, mu = batch.logprobs.detach(), batch.rollout_logprobs
    dropped = _mask(lp, mu, batch.advantages, D.binary_tv(lp, mu), 0.15)
    ratio = (lp - mu).exp()
    assert (ratio[batch.mask & ~dropped] > 2.0).any()  # the cap is exercised
    expected = -(~dropped & batch.mask).double() * ratio.clamp(max=2.0) * batch.advantages / batch.mask.sum()
    assert torch.allclose(grad, expected, atol=1e-14)
    capped = (ratio > 2.0) & ~dropped
    assert out.metrics["actor/pg_clipfrac_lower"] == pytest.approx(capped[batch.mask].double().mean().item())
    # ratio_cap=None: the untruncated ratio.
    out = sa.get_loss("dppo_binary_tv", ratio_cap=None)(batch)
    (grad,) = torch.autograd.grad(out.loss, t["logprobs"])
    assert torch.allclose(
        grad, -(~dropped & batch.mask).double() * ratio * batch.advantages / batch.mask.sum(), atol=1e-14
    )


@pytest.mark.parametrize("name", ["dppo_binary_tv", "dppo_binary_kl"])
def test_anchor_old_is_rollout_anchor_on_old_logprobs(gen, name):
    t = random_tensors(gen)
    old = sa.get_loss(name, anchor="old")(sa.PolicyBatch(**t))
    swapped = dict(t, rollout_logprobs=t["old_logprobs"], old_logprobs=t["rollout_logprobs"])
    rollout = sa.get_loss(name, anchor="rollout")(sa.PolicyBatch(**swapped))
    assert old.loss.item() == pytest.approx(rollout.loss.item(), abs=1e-15)
    assert old.metrics == pytest.approx(rollout.metrics)


def test_defaults():
    assert (DPPOConfig().delta_low, DPPOConfig().delta_high) == (0.15, 0.15)
    assert (DPPOKLConfig().delta_low, DPPOKLConfig().delta_high) == (0.05, 0.05)
    for name, delta in [
        ("dppo_binary_tv", 0.15),
        ("dppo_topk_tv", 0.15),
        ("dppo_binary_kl", 0.05),
        ("dppo_topk_kl", 0.05),
    ]:
        cfg = sa.get_loss(name).config
        assert (cfg.delta_low, cfg.delta_high, cfg.anchor, cfg.ratio_cap) == (delta, delta, "rollout", 10.0)


def test_asymmetric_deltas_and_disabled_side():
    _, batch = _hand_batch()
    out = sa.get_loss("dppo_binary_tv", delta_high=0.25, aggregation="token-sum")(batch)
    assert torch.equal(out.per_token_loss[0] == 0, torch.tensor([False, False, False, True, False, False]))
    out = sa.get_loss("dppo_binary_tv", delta_low=math.inf, aggregation="token-sum")(batch)
    assert torch.equal(out.per_token_loss[0] == 0, torch.tensor([True, False, False, False, False, False]))


def test_missing_fields_are_named(gen):
    t = random_tensors(gen)
    batch = sa.PolicyBatch(**t)
    for name in ("dppo_topk_tv", "dppo_topk_kl"):
        with pytest.raises(ValueError, match="topk_logprobs: required by " + name):
            sa.get_loss(name)(batch)
    B, T = t["logprobs"].shape
    partial = sa.PolicyBatch(**t, topk_logprobs=torch.full((B, T, 2), -1.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="current_topk_logprobs: required by dppo_topk_kl"):
        sa.get_loss("dppo_topk_kl")(partial)
    no_rollout = sa.PolicyBatch(**{k: v for k, v in t.items() if k != "rollout_logprobs"})
    with pytest.raises(ValueError, match="rollout_logprobs: required by dppo_binary_kl"):
        sa.get_loss("dppo_binary_kl")(no_rollout)
    assert sa.get_loss("dppo_binary_kl", anchor="old")(no_rollout).loss.isfinite()


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"delta_low": 0.0}, "delta_low"),
        ({"delta_high": -0.1}, "delta_high"),
        ({"delta_high": float("nan")}, "delta_high"),
        ({"delta_low": "0.1"}, "delta_low"),
        ({"anchor": "behavior"}, "anchor"),
        ({"weight_anchor": "mu"}, "weight_anchor"),
        ({"ratio_cap": 0.0}, "ratio_cap"),
        ({"aggregation": "mean"}, "aggregation"),
    ],
)
def test_invalid_settings_are_named(kwargs, argument):
    for name in ("dppo_binary_tv", "dppo_topk_kl"):
        with pytest.raises(ValueError, match=argument):
            sa.get_loss(name, **kwargs)


def test_correction_composes(gen):
    t = random_tensors(gen)
    batch = sa.PolicyBatch(**t)
    plain = sa.get_loss("dppo_binary_tv", aggregation="token-sum")(batch)
    corr = sa.RolloutCorrection(high=1.2)
    corrected = sa.get_loss("dppo_binary_tv", aggregation="token-sum", correction=corr)(batch)
    w = corr(batch).weights
    assert corrected.loss.item() == pytest.approx((plain.per_token_loss * w)[batch.mask].sum().item(), abs=1e-12)
    assert any(k.startswith("rollout_corr/") for k in corrected.metrics)


@pytest.mark.parametrize("delta", [0.15, 0.05])
def test_recompute_mode_gates_with_old_and_weights_with_rollout(gen, delta):
    """anchor='old', weight_anchor='rollout' is the paper code's ``dppo_binary_tv_recompute``:
    mask (p − p_old) > δ_high if A > 0, (p − p_old) < −δ_low otherwise, weight min(p/μ, c),
    written out here in probability space (not through `trust_region_mask`)."""
    t = random_tensors(gen, spread=1.0)
    batch = sa.PolicyBatch(**t)
    out = sa.get_loss("dppo_binary_tv", anchor="old", weight_anchor="rollout", delta_low=delta, delta_high=delta,
                      ratio_cap=2.0, aggregation="token-sum")(batch)  # fmt: skip
    (grad,) = torch.autograd.grad(out.loss, t["logprobs"])
    lp = t["logprobs"].detach()
    diff = lp.exp() - t["old_logprobs"].exp()
    invalid = torch.where(t["advantages"] > 0, diff > delta, diff < -delta)
    weight = (lp - t["rollout_logprobs"]).exp().clamp(max=2.0)
    valid = (~invalid & t["mask"]).double()
    assert 0 < invalid[t["mask"]].double().mean() < 1 and ((lp - t["rollout_logprobs"]).exp() > 2.0).any()
    assert torch.allclose(grad, -valid * weight * t["advantages"], atol=1e-14)
    assert out.loss.item() == pytest.approx((-valid * weight * t["advantages"] * lp).sum().item(), abs=1e-12)
    assert out.metrics["actor/pg_clipfrac"] == pytest.approx(invalid[t["mask"]].double().mean().item())
    assert out.metrics["actor/ppo_kl"] == pytest.approx((t["rollout_logprobs"] - lp)[t["mask"]].mean().item())


@pytest.mark.parametrize("name", ["dppo_binary_tv", "dppo_binary_kl", "dppo_topk_tv"])
@pytest.mark.parametrize("anchor", ["rollout", "old"])
def test_weight_anchor_none_is_the_trust_region_anchor(gen, name, anchor):
    t = random_tensors(gen, spread=1.0)
    B, T = t["logprobs"].shape
    topk = {"topk_logprobs": torch.full((B, T, 2), -1.5, dtype=torch.float64),
            "current_topk_logprobs": torch.full((B, T, 2), -1.0, dtype=torch.float64)}  # fmt: skip
    batch = sa.PolicyBatch(**t, **(topk if "topk" in name else {}))
    default = sa.get_loss(name, anchor=anchor)(batch)
    explicit = sa.get_loss(name, anchor=anchor, weight_anchor=anchor)(batch)
    other = sa.get_loss(name, anchor=anchor, weight_anchor="old" if anchor == "rollout" else "rollout")(batch)
    assert torch.equal(default.per_token_loss, explicit.per_token_loss) and default.metrics == explicit.metrics
    assert not torch.equal(default.per_token_loss, other.per_token_loss)
    assert sa.get_loss(name, anchor=anchor).weights_by_rollout is (anchor == "rollout")
    assert sa.get_loss(name, anchor=anchor, weight_anchor="rollout").weights_by_rollout is True
    assert sa.get_loss(name, anchor="rollout", weight_anchor="old").weights_by_rollout is False


def test_weight_anchor_needs_its_field(gen):
    t = random_tensors(gen)
    no_rollout = sa.PolicyBatch(**{k: v for k, v in t.items() if k != "rollout_logprobs"})
    loss = sa.get_loss("dppo_binary_kl", anchor="old", weight_anchor="rollout")
    assert loss.requires == {"old_logprobs", "rollout_logprobs"}
    with pytest.raises(ValueError, match="rollout_logprobs: required by dppo_binary_kl with anchor='old', weight_"):
        loss(no_rollout)
    with pytest.raises(ValueError, match="weight_anchor: expected one of"):
        sa.get_loss("dppo_binary_kl", weight_anchor="behavior")


def _binary_kl_exact(lp: float, lq: float) -> float:
    """KL(q ‖ p) over {token, rest} with 80 significant digits (mpmath), from the log-probabilities."""
    import mpmath

    with mpmath.workdps(80):
        lp_m, lq_m = mpmath.mpf(lp), mpmath.mpf(lq)
        q = mpmath.exp(lq_m)
        one_minus_p, one_minus_q = -mpmath.expm1(lp_m), -mpmath.expm1(lq_m)
        head = q * (lq_m - lp_m)
        if one_minus_q == 0:
            return float(head)
        if one_minus_p == 0:
            return math.inf
        return float(max(head + one_minus_q * (mpmath.log(one_minus_q) - mpmath.log(one_minus_p)), 0))


def test_binary_kl_against_high_precision():
    """Relative error against an 80-digit evaluation, including p ≈ q (where the two tails nearly
    cancel), p or q within 1e-12 of 1, tiny probabilities, and p = 1 (infinite) or q = 1 (tail 0)."""
    gen = torch.Generator().manual_seed(11)
    edges = [0.0, -1e-300, -1e-12, -1e-7, -0.6931471805599453, -0.69, -0.7, -1e-3, -0.1, -5.0, -20.0, -80.0]
    pairs = [(a, b) for a in edges for b in edges]
    for _ in range(400):
        lq = -6.0 * float(torch.rand(1, generator=gen))
        pairs.append((min(lq + 0.3 * float(torch.randn(1, generator=gen)), 0.0), lq))
        lq = -1e-3 * float(torch.rand(1, generator=gen))
        pairs.append((min(lq * (1 + 1e-3 * float(torch.randn(1, generator=gen))), 0.0), lq))
    lp = torch.tensor([a for a, _ in pairs], dtype=torch.float64)
    lq = torch.tensor([b for _, b in pairs], dtype=torch.float64)
    exact = torch.tensor([_binary_kl_exact(a, b) for a, b in pairs], dtype=torch.float64)
    got = D.binary_kl(lp, lq)
    assert torch.equal(torch.isinf(got), torch.isinf(exact)) and not got.isnan().any()
    finite = torch.isfinite(exact)
    err = (got - exact).abs()[finite]
    scale = exact.abs()[finite]
    # A few ulp of the head term q·|log q − log p| bound what fp64 can resolve in the difference.
    head = (lq.exp() * (lq - lp).abs())[finite]
    assert (err <= 1e-12 * scale + 1e-15 * head + 1e-300).all(), err.max()
    assert D.binary_kl(torch.tensor([0.0]), torch.tensor([-0.5])).item() == math.inf  # p = 1 > q
    assert D.binary_kl(torch.tensor([-0.5]), torch.tensor([0.0])).item() == pytest.approx(0.5)  # q = 1: head only


def test_binary_kl_gradient_matches_autograd_of_the_textbook_form():
    lp = torch.tensor([-0.2, -1.5, -3.0], dtype=torch.float64, requires_grad=True)
    lq = torch.tensor([-0.5, -1.0, -2.0], dtype=torch.float64)
    (grad,) = torch.autograd.grad(D.binary_kl(lp, lq).sum(), lp)
    p, q = lp.detach().exp(), lq.exp()
    # d/dlog p of q(log q − log p) + (1 − q)(log(1 − q) − log(1 − p)) = −q + (1 − q)·p/(1 − p)
    torch.testing.assert_close(grad, -q + (1 - q) * p / (1 - p), rtol=1e-12, atol=0.0)
