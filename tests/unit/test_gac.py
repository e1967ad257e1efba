"""GradientAlignmentControl: exact cosine, projection algebra, skip/monitor, adaptive τ, memory modes, resume."""

from __future__ import annotations

import io
import math

import pytest
import torch

import stable_async as sa
from stable_async.optim.gac import GradientAlignmentControl, count_sketch

SHAPES = [(30, 20), (37,)]


def make_params(shapes=SHAPES, dtype=torch.float64):
    return [torch.zeros(s, dtype=dtype, requires_grad=True) for s in shapes]


def set_grads(params, flat):
    """Write a flat vector into the params' .grad (the params' flattened concatenation)."""
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].reshape(p.shape).to(p.dtype).clone()
        offset += n


def flat_grads(params):
    return torch.cat([p.grad.reshape(-1).to(torch.float64) for p in params])


def pair_with_cosine(n, cos, gen, scale_prev=1.7, scale=0.6):
    """(g_prev, g) in R^n with cos(g, g_prev) = cos exactly (up to fp64 rounding)."""
    q, _ = torch.linalg.qr(torch.randn(n, 2, generator=gen, dtype=torch.float64))
    u, v = q[:, 0], q[:, 1]
    return scale_prev * u, scale * (cos * u + math.sqrt(1.0 - cos * cos) * v)


def run_pair(gac, params, g_prev, g):
    set_grads(params, g_prev)
    first = gac.apply()
    set_grads(params, g)
    return first, gac.apply()


def n_params(shapes=SHAPES):
    return sum(math.prod(s) for s in shapes)


def test_exported():
    assert sa.GradientAlignmentControl is GradientAlignmentControl
    assert "GradientAlignmentControl" in sa.__all__


def test_first_step_passes_with_nan_cosine(gen):
    params = make_params()
    gac = GradientAlignmentControl(params)
    g = torch.randn(n_params(), generator=gen, dtype=torch.float64)
    set_grads(params, g)
    m = gac.apply()
    assert math.isnan(m["gac/cos"]) and math.isnan(m["gac/parallel_frac"])
    assert m["gac/action"] == 0.0 and m["gac/removed_frac"] == 0.0 and not gac.should_skip
    assert torch.equal(flat_grads(params), g)
    assert m["gac/grad_norm"] == pytest.approx(g.norm().item(), rel=1e-12)


@pytest.mark.parametrize("cos", [-0.95, -0.3, 0.0, 0.2, 0.5, 0.87, 0.999])
def test_reported_cosine_is_exact(gen, cos):
    params = make_params()
    gac = GradientAlignmentControl(params, mode="monitor")
    g_prev, g = pair_with_cosine(n_params(), cos, gen)
    _, m = run_pair(gac, params, g_prev, g)
    assert m["gac/cos"] == pytest.approx(cos, abs=1e-12)
    assert m["gac/parallel_frac"] == pytest.approx(cos * cos, abs=1e-12)
    assert m["gac/action"] == 0.0
    assert torch.equal(flat_grads(params), g)  # monitor never edits


@pytest.mark.parametrize("strength", [1.0, 0.7, 0.25])
def test_projection_removes_exactly_strength_of_parallel_component(gen, strength):
    params = make_params()
    gac = GradientAlignmentControl(params, mode="project", threshold=0.5, strength=strength)
    g_prev, g = pair_with_cosine(n_params(), 0.8, gen)
    _, m = run_pair(gac, params, g_prev, g)
    new = flat_grads(params)
    d = g_prev / g_prev.norm()
    assert m["gac/action"] == 1.0 and gac.last_action == "project" and not gac.should_skip
    assert torch.dot(new, d).item() == pytest.approx((1 - strength) * torch.dot(g, d).item(), abs=1e-12)
    ortho_old, ortho_new = g - torch.dot(g, d) * d, new - torch.dot(new, d) * d
    torch.testing.assert_close(ortho_new, ortho_old, rtol=0, atol=1e-13)
    assert m["gac/removed_frac"] == pytest.approx(strength**2 * 0.64, abs=1e-12)
    removed = (g - new).norm() ** 2 / g.norm() ** 2
    assert removed.item() == pytest.approx(m["gac/removed_frac"], abs=1e-12)


def test_orthogonal_gradient_untouched(gen):
    params = make_params()
    gac = GradientAlignmentControl(params, mode="project", threshold=0.0)
    g_prev, g = pair_with_cosine(n_params(), 0.0, gen)
    g = g - torch.dot(g, g_prev) / torch.dot(g_prev, g_prev) * g_prev  # exactly ⟂ in fp64
    _, m = run_pair(gac, params, g_prev, g)
    assert m["gac/action"] == 0.0
    assert torch.equal(flat_grads(params), g)


def test_anti_aligned_untouched_when_one_sided(gen):
    g_prev, g = pair_with_cosine(n_params(), -0.9, gen)
    params = make_params()
    gac = GradientAlignmentControl(params, mode="project", threshold=-1.0)  # c > τ holds, ⟨g, d⟩ < 0
    _, m = run_pair(gac, params, g_prev, g)
    assert m["gac/action"] == 0.0 and torch.equal(flat_grads(params), g)
    params = make_params()
    gac = GradientAlignmentControl(params, mode="project", threshold=0.5, one_sided=False)
    _, m = run_pair(gac, params, g_prev, g)
    d = g_prev / g_prev.norm()
    assert m["gac/action"] == 1.0
    assert abs(torch.dot(flat_grads(params), d).item()) < 1e-12


def test_below_threshold_passes(gen):
    params = make_params()
    gac = GradientAlignmentControl(params, mode="project", threshold=0.5)
    g_prev, g = pair_with_cosine(n_params(), 0.45, gen)
    _, m = run_pair(gac, params, g_prev, g)
    assert m["gac/action"] == 0.0 and torch.equal(flat_grads(params), g)


def test_skip_zeroes_and_flags(gen):
    params = make_params()
    gac = GradientAlignmentControl(params, mode="skip", threshold=0.5)
    g_prev, g = pair_with_cosine(n_params(), 0.9, gen)
    _, m = run_pair(gac, params, g_prev, g)
    assert m["gac/action"] == 2.0 and gac.should_skip and gac.last_action == "skip"
    assert m["gac/removed_frac"] == 1.0
    assert all(torch.count_nonzero(p.grad) == 0 for p in params)
    set_grads(params, pair_with_cosine(n_params(), 0.1, gen)[1])
    assert gac.apply()["gac/action"] == 0.0 and not gac.should_skip


def test_project_mode_with_skip_threshold(gen):
    params = make_params()
    gac = GradientAlignmentControl(params, mode="project", threshold=0.5, skip_threshold=0.9)
    g_prev, g = pair_with_cosine(n_params(), 0.95, gen)
    assert run_pair(gac, params, g_prev, g)[1]["gac/action"] == 2.0
    params = make_params()
    gac = GradientAlignmentControl(params, mode="project", threshold=0.5, skip_threshold=0.9)
    g_prev, g = pair_with_cosine(n_params(), 0.7, gen)
    assert run_pair(gac, params, g_prev, g)[1]["gac/action"] == 1.0


def cosine_chain(n, cosines, gen):
    """Gradients g_0..g_T with cos(g_t, g_{t−1}) = cosines[t−1] exactly."""
    out = [torch.randn(n, generator=gen, dtype=torch.float64)]
    for c in cosines:
        prev = out[-1] / out[-1].norm()
        fresh = torch.randn(n, generator=gen, dtype=torch.float64)
        fresh = fresh - torch.dot(fresh, prev) * prev
        out.append(c * prev + math.sqrt(1 - c * c) * fresh / fresh.norm())
    return out


def test_adaptive_threshold_follows_ema(gen):
    cosines = [0.30, 0.34, 0.31, 0.33, 0.32, 0.30, 0.9, 0.3]
    params = make_params()
    k, beta = 1.5, 0.8
    gac = GradientAlignmentControl(
        params, mode="project", threshold=0.6, adaptive=True, adaptive_k=k, adaptive_momentum=beta
    )
    seen: list[float] = []
    taus, actions = [], []
    for step, g in enumerate(cosine_chain(n_params(), cosines, gen)):
        set_grads(params, g)
        m = gac.apply()
        if len(seen) < 2:
            expected_tau = 0.6  # the fixed threshold until two cosines have been observed
        else:
            w = [(1 - beta) * beta ** (len(seen) - 1 - j) for j in range(len(seen))]
            debias = 1 - beta ** len(seen)
            mean = sum(wi * c for wi, c in zip(w, seen, strict=True)) / debias
            sq = sum(wi * c * c for wi, c in zip(w, seen, strict=True)) / debias
            expected_tau = mean + k * math.sqrt(max(sq - mean * mean, 0.0))
        assert m["gac/threshold"] == pytest.approx(expected_tau, abs=1e-12)
        taus.append(m["gac/threshold"])
        actions.append(m["gac/action"])
        if step > 0:
            assert m["gac/cos"] == pytest.approx(cosines[step - 1], abs=1e-12)
            assert m["gac/action"] == float(m["gac/cos"] > expected_tau)
            seen.append(m["gac/cos"])
    # τ moved down to the steady level (~0.3 + 1.5·std) and only the spike (0.9, step 7) was projected
    assert 0.32 < taus[7] < 0.4
    assert actions == [0.0] * 7 + [1.0, 0.0]
    assert taus[8] > taus[7]  # the spike entered the statistics
    assert GradientAlignmentControl(make_params(), mode="monitor", adaptive=True).current_threshold() == 0.5


def test_bf16_memory_cosine_error_small(gen):
    shapes = [(100, 100)]
    for cos in (-0.5, 0.1, 0.6, 0.95):
        params = make_params(shapes, dtype=torch.float32)
        gac = GradientAlignmentControl(params, mode="monitor", memory="bf16")
        g_prev, g = pair_with_cosine(n_params(shapes), cos, gen)
        _, m = run_pair(gac, params, g_prev, g)
        assert abs(m["gac/cos"] - cos) < 5e-3
    params = make_params(shapes, dtype=torch.float32)
    gac = GradientAlignmentControl(params, memory="bf16", threshold=0.5)
    g_prev, g = pair_with_cosine(n_params(shapes), 0.8, gen)
    run_pair(gac, params, g_prev, g)
    d = g_prev / g_prev.norm()
    assert abs(torch.dot(flat_grads(params), d).item()) < 5e-3 * g.norm().item()


def test_sketch_memory_cosine_error_within_005(gen):
    shapes = [(256, 384), (1696,), (7, 11)]  # ≈100k parameters; the small ones are stored exactly
    n = n_params(shapes)
    assert n > 99_000
    for seed, cos in enumerate([-0.8, -0.3, 0.0, 0.3, 0.6, 0.95]):
        params = make_params(shapes, dtype=torch.float32)
        gac = GradientAlignmentControl(params, mode="monitor", memory="sketch", seed=seed, sketch_dim=8192)
        g_prev, g = pair_with_cosine(n, cos, gen)
        _, m = run_pair(gac, params, g_prev, g)
        assert abs(m["gac/cos"] - cos) <= 0.05, (cos, m["gac/cos"])
        assert m["gac/grad_norm"] == pytest.approx(g.norm().item(), rel=1e-5)  # the norm is exact
    assert (
        gac.stored.reference[0].numel() == 8192
        and gac.stored.reference[1].numel() == 1696
        and gac.stored.reference[2].numel() == 77
    )


def test_default_sketch_budget_within_1pct_and_cosine_error_within_005(gen):
    """The default budget (max(1024, numel/256) per tensor) stores < 1 % of a model whose parameters sit
    in large tensors, and still estimates the cosine within 0.05."""
    shapes = [(1024, 1536), (1536, 512), (1536,), (512,), (7, 11)]  # ≈2.4M parameters
    n = n_params(shapes)
    for seed, cos in enumerate([-0.8, 0.0, 0.5, 0.95]):
        params = make_params(shapes, dtype=torch.float32)
        gac = GradientAlignmentControl(params, mode="monitor", memory="sketch", seed=seed)
        g_prev, g = pair_with_cosine(n, cos, gen)
        _, m = run_pair(gac, params, g_prev, g)
        assert abs(m["gac/cos"] - cos) <= 0.05, (cos, m["gac/cos"])
    stored = sum(t.numel() for t in gac.stored.reference)
    assert stored <= 0.01 * n, stored / n
    assert [t.numel() for t in gac.stored.reference] == [6144, 3072, 1024, 512, 77] == gac.sketch_dims


def test_count_sketch_inner_product_unbiased(gen):
    a, b = (
        torch.randn(20_000, generator=gen, dtype=torch.float64),
        torch.randn(20_000, generator=gen, dtype=torch.float64),
    )
    b = b + a
    est = [torch.dot(count_sketch(a, 256, s), count_sketch(b, 256, s)).item() for s in range(200)]
    exact = torch.dot(a, b).item()
    se = math.sqrt((a.norm() ** 2 * b.norm() ** 2 + exact**2).item() / 256 / 200)
    assert abs(sum(est) / len(est) - exact) < 4 * se


def test_sketch_skip(gen):
    shapes = [(200, 300)]
    params = make_params(shapes, dtype=torch.float32)
    gac = GradientAlignmentControl(params, mode="skip", threshold=0.8, memory="sketch")
    g_prev, g = pair_with_cosine(n_params(shapes), 0.97, gen)
    _, m = run_pair(gac, params, g_prev, g)
    assert m["gac/action"] == 2.0 and gac.should_skip


def test_keep_regulated_stores_projected_gradient(gen):
    n = n_params()
    g_prev, g = pair_with_cosine(n, 0.8, gen)
    g3 = torch.randn(n, generator=gen, dtype=torch.float64)
    for keep in ("raw", "regulated"):
        params = make_params()
        gac = GradientAlignmentControl(params, mode="project", threshold=0.5, keep=keep)
        run_pair(gac, params, g_prev, g)
        stored = flat_grads(params) if keep == "regulated" else g
        set_grads(params, g3)
        m = gac.apply()
        expected = torch.dot(g3, stored) / (g3.norm() * stored.norm())
        assert m["gac/cos"] == pytest.approx(expected.item(), abs=1e-12)


def test_none_and_zero_gradients(gen):
    params = make_params()
    gac = GradientAlignmentControl(params, mode="project", threshold=0.1)
    g_prev, g = pair_with_cosine(n_params(), 0.9, gen)
    set_grads(params, g_prev)
    gac.apply()
    set_grads(params, torch.zeros(n_params(), dtype=torch.float64))
    m = gac.apply()  # zero gradient: no direction, cosine undefined, not stored
    assert math.isnan(m["gac/cos"]) and m["gac/action"] == 0.0
    set_grads(params, g)
    params[1].grad = None  # left out of g_t and g_{t−1}
    m = gac.apply()
    n0 = params[0].numel()
    a, b = g[:n0], g_prev[:n0]
    assert m["gac/cos"] == pytest.approx((torch.dot(a, b) / (a.norm() * b.norm())).item(), abs=1e-12)
    assert params[1].grad is None
    assert abs(torch.dot(params[0].grad.reshape(-1), b).item()) < 1e-12


def test_bf16_grads_full_memory(gen):
    params = make_params(dtype=torch.bfloat16)
    gac = GradientAlignmentControl(params, threshold=0.5)
    g_prev, g = pair_with_cosine(n_params(), 0.8, gen)
    _, m = run_pair(gac, params, g_prev, g)
    assert abs(m["gac/cos"] - 0.8) < 1e-2 and m["gac/action"] == 1.0
    assert all(p.grad.dtype == torch.bfloat16 for p in params)
    assert gac.stored.reference[0].dtype == torch.float32


def test_param_groups_and_duplicates():
    a, b = make_params()
    gac = GradientAlignmentControl([{"params": [a, b]}, {"params": a}])
    assert len(gac.params) == 2


def train(gac, params, grads, start=0, stop=None):
    """SGD on a fixed gradient sequence; the gradients are edited by GAC before each step."""
    for g in grads[start:stop]:
        set_grads(params, g)
        gac.apply()
        if not gac.should_skip:
            with torch.no_grad():
                for p in params:
                    p.add_(p.grad, alpha=-0.1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "project", "threshold": 0.2, "strength": 0.8},
        {"mode": "project", "threshold": 0.2, "memory": "bf16", "keep": "regulated", "skip_threshold": 0.7},
        {"mode": "project", "adaptive": True, "adaptive_k": 0.5, "threshold": 0.3},
        {"mode": "skip", "memory": "sketch", "threshold": 0.4, "sketch_dim": 64, "adaptive": True, "adaptive_k": 0.3},
    ],
)
def test_resume_matches_uninterrupted(gen, kwargs):
    n = n_params()
    base = torch.randn(n, generator=gen, dtype=torch.float64)
    grads = [base * 0.8 + torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(10)]
    ref_params = make_params()
    ref = GradientAlignmentControl(ref_params, **kwargs)
    train(ref, ref_params, grads)
    params = make_params()
    first = GradientAlignmentControl(params, **kwargs)
    train(first, params, grads, stop=5)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = GradientAlignmentControl(params, **kwargs)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.step == 5
    train(resumed, params, grads, start=5)
    for p, q in zip(params, ref_params, strict=True):
        assert torch.equal(p, q) and torch.equal(p.grad, q.grad)
    assert resumed.last_metrics == pytest.approx(ref.last_metrics, nan_ok=True)
    assert ref.state_dict()["adaptive"] == resumed.state_dict()["adaptive"]


def test_load_state_dict_layout_mismatch(gen):
    params = make_params()
    gac = GradientAlignmentControl(params)
    set_grads(params, torch.randn(n_params(), generator=gen, dtype=torch.float64))
    gac.apply()
    state = gac.state_dict()
    other = GradientAlignmentControl(make_params([(5, 5), (3,)]))
    with pytest.raises(ValueError, match="strict=False"):
        other.load_state_dict(state)
    with pytest.warns(UserWarning, match="dropping"):
        other.load_state_dict(state, strict=False)
    assert other.step == 1 and not other.stored.has_reference
    with pytest.raises(ValueError, match="memory"):
        GradientAlignmentControl(params, memory="bf16").load_state_dict(state)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"mode": "clip"}, "mode"),
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"threshold": "0.5"}, "threshold"),
        ({"strength": -0.1}, "strength"),
        ({"strength": 2.0}, "strength"),
        ({"memory": "fp8"}, "memory"),
        ({"keep": "old"}, "keep"),
        ({"skip_threshold": 2.0}, "skip_threshold"),
        ({"adaptive_k": -1.0}, "adaptive_k"),
        ({"adaptive_momentum": 1.0}, "adaptive_momentum"),
        ({"sketch_dim": 0}, "sketch_dim"),
        ({"seed": 1.5}, "seed"),
        ({"sharded": "yes"}, "sharded"),
        ({"adaptive": "false"}, "adaptive"),
        ({"adaptive": 1}, "adaptive"),
        ({"one_sided": "no"}, "one_sided"),
        ({"strength": True}, "strength"),
        ({"adaptive_k": "2"}, "adaptive_k"),
        ({"memory": "sketch", "mode": "project"}, "memory='sketch'"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        GradientAlignmentControl(make_params(), **kwargs)


def test_bad_params():
    with pytest.raises(ValueError, match="params"):
        GradientAlignmentControl([])
    with pytest.raises(ValueError, match="params"):
        GradientAlignmentControl(torch.zeros(3))
    with pytest.raises(ValueError, match="params"):
        GradientAlignmentControl([1.0])


def test_state_dict_snapshot_survives_further_steps(gen):
    """state_dict() returns references; GAC never edits them in place, so the snapshot stays valid."""
    n = n_params()
    grads = [torch.randn(n, generator=gen, dtype=torch.float64) + 1.0 for _ in range(6)]
    params = make_params()
    gac = GradientAlignmentControl(params, threshold=0.1, strength=0.5)
    train(gac, params, grads, stop=3)
    snapshot, saved_params = gac.state_dict(), [p.detach().clone() for p in params]
    train(gac, params, grads, start=3)  # the original keeps going
    resumed_params = [p.clone().requires_grad_(True) for p in saved_params]
    resumed = GradientAlignmentControl(resumed_params, threshold=0.1, strength=0.5)
    resumed.load_state_dict(snapshot)
    train(resumed, resumed_params, grads, start=3)
    for p, q in zip(resumed_params, params, strict=True):
        assert torch.equal(p, q)


# --------------------------------------------------------------------------- rollout batches


def exact_cos(a, b):
    return (torch.dot(a, b) / (a.norm() * b.norm())).item()


def test_minibatches_of_one_rollout_batch_are_not_compared_with_each_other(gen):
    """Minibatch gradients of one rollout batch are aligned by construction (cos ≈ 0.999 here);
    each is compared with the previous batch's last gradient (⟂ to them), so nothing is projected."""
    n = n_params()
    previous, shared = pair_with_cosine(n, 0.0, gen)
    minibatches = [shared + 0.001 * torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(3)]
    assert min(exact_cos(minibatches[0], m) for m in minibatches[1:]) > 0.99
    params = make_params()
    gac = GradientAlignmentControl(params, mode="project", threshold=0.5)
    gac.new_rollout_batch()
    set_grads(params, previous)
    gac.apply()
    gac.new_rollout_batch()
    for g in minibatches:
        set_grads(params, g)
        m = gac.apply()
        assert m["gac/cos"] == pytest.approx(exact_cos(g, previous), abs=1e-12) and abs(m["gac/cos"]) < 0.2
        assert m["gac/action"] == 0.0 and torch.equal(flat_grads(params), g)
    # The control: without rollout batches the second minibatch is compared with the first and cut.
    params = make_params()
    plain = GradientAlignmentControl(params, mode="project", threshold=0.5)
    for g in (previous, *minibatches[:2]):
        set_grads(params, g)
        m = plain.apply()
    assert m["gac/cos"] == pytest.approx(exact_cos(minibatches[1], minibatches[0]), abs=1e-12)
    assert m["gac/action"] == 1.0


def test_stale_aligned_rollout_batches_are_still_projected(gen):
    """Each rollout batch's gradients align at cos 0.9 with the previous batch's last raw gradient r:
    every step is projected, g ← g − ⟨g, r⟩ r / ‖r‖², against r, not against its own minibatches."""
    n = n_params()
    params = make_params()
    gac = GradientAlignmentControl(params, mode="project", threshold=0.5)
    last = torch.randn(n, generator=gen, dtype=torch.float64)
    gac.new_rollout_batch()
    set_grads(params, last)
    gac.apply()
    for _ in range(4):
        gac.new_rollout_batch()
        for _ in range(3):
            fresh = torch.randn(n, generator=gen, dtype=torch.float64)
            fresh = fresh - torch.dot(fresh, last) / torch.dot(last, last) * last
            g = 0.9 * last / last.norm() + math.sqrt(1 - 0.81) * fresh / fresh.norm()
            set_grads(params, g)
            m = gac.apply()
            assert m["gac/cos"] == pytest.approx(0.9, abs=1e-12) and m["gac/action"] == 1.0
            expected = g - torch.dot(g, last) / torch.dot(last, last) * last
            assert torch.allclose(flat_grads(params), expected, atol=1e-13)
        last = g  # the raw gradient of the batch's last step is the next reference


def test_reference_is_the_last_gradient_of_the_previous_batch(gen):
    n = n_params()
    first, second, current = (torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(3))
    params = make_params()
    gac = GradientAlignmentControl(params, mode="monitor")
    gac.new_rollout_batch()
    for g in (first, second):
        set_grads(params, g)
        m = gac.apply()
    assert math.isnan(m["gac/cos"])  # no previous rollout batch yet
    gac.new_rollout_batch()
    set_grads(params, current)
    assert gac.apply()["gac/cos"] == pytest.approx(exact_cos(current, second), abs=1e-12)
    gac.new_rollout_batch()
    gac.new_rollout_batch()  # an empty batch keeps the reference
    set_grads(params, first)
    assert gac.apply()["gac/cos"] == pytest.approx(exact_cos(first, current), abs=1e-12)


@pytest.mark.parametrize("stop", [4, 6])  # mid-batch, and at the end of a batch (before the next call)
def test_resume_with_rollout_batches_matches_uninterrupted(gen, stop):
    n = n_params()
    base = torch.randn(n, generator=gen, dtype=torch.float64)
    grads = [base * 0.8 + torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(12)]
    kwargs = {"mode": "project", "threshold": 0.2, "adaptive": True, "adaptive_k": 0.5}

    def run(gac, params, start, end):
        for k in range(start, end):
            if k % 3 == 0:
                gac.new_rollout_batch()
            train(gac, params, grads, start=k, stop=k + 1)

    ref_params = make_params()
    ref = GradientAlignmentControl(ref_params, **kwargs)
    run(ref, ref_params, 0, 12)
    params = make_params()
    first = GradientAlignmentControl(params, **kwargs)
    run(first, params, 0, stop)
    assert first.state_dict()["rollout_batch"]["enabled"] and first.state_dict()["rollout_batch"]["pending"]
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = GradientAlignmentControl(params, **kwargs)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    run(resumed, params, stop, 12)
    for p, q in zip(params, ref_params, strict=True):
        assert torch.equal(p, q) and torch.equal(p.grad, q.grad)
    assert resumed.last_metrics == ref.last_metrics


def test_checkpoint_without_rollout_batch_state_loads_as_not_in_use(gen):
    params = make_params()
    gac = GradientAlignmentControl(params)
    set_grads(params, torch.randn(n_params(), generator=gen, dtype=torch.float64))
    gac.apply()
    state = {k: v for k, v in gac.state_dict().items() if k != "rollout_batch"}
    other = GradientAlignmentControl(make_params())
    other.new_rollout_batch()
    other.load_state_dict(state)
    assert other.stored.has_reference and not other.stored.by_rollout_batch


# --------------------------------------------------------------------------- the functional core


def test_decide_covers_every_mode():
    from stable_async.optim.gac import decide

    assert decide(math.nan, 1.0, 0.5, "project") == "pass"
    assert decide(0.9, 1.0, 0.5, "monitor") == "pass"
    assert decide(0.6, 1.0, 0.5, "project") == "project"
    assert decide(0.6, -1.0, 0.5, "project") == "pass"  # one-sided: ⟨g, d⟩ ≤ 0 is never cut
    assert decide(-0.6, -1.0, 0.5, "project", one_sided=False) == "project"
    assert decide(0.6, 1.0, 0.5, "skip") == "skip" and decide(0.6, 1.0, 0.5, "skip", skip_threshold=0.7) == "pass"
    assert decide(0.8, 1.0, 0.5, "project", skip_threshold=0.7) == "skip"


def test_statistics_and_threshold_are_the_bias_corrected_ema():
    from stable_async.optim.gac import GACStatistics, adaptive_threshold

    stats = GACStatistics()
    assert adaptive_threshold(stats.observe(0.3, 0.9), 0.5, 2.0, 0.9) == 0.5  # fewer than two observed
    for c in (0.2, 0.4):
        stats = stats.observe(c, 0.9)
    w = [0.1 * 0.9, 0.1]  # EMA weights of 0.2 and 0.4, debiased by 1 − 0.9²
    mean = (w[0] * 0.2 + w[1] * 0.4) / (1 - 0.81)
    sq = (w[0] * 0.04 + w[1] * 0.16) / (1 - 0.81)
    assert adaptive_threshold(stats, 0.5, 2.0, 0.9) == pytest.approx(mean + 2 * math.sqrt(sq - mean * mean), abs=1e-15)


def test_alignment_sums_and_projection_alone(gen):
    from stable_async.optim.gac import alignment_sums, cosine, project_

    a, b, r1 = (torch.randn(k, generator=gen, dtype=torch.float64) for k in (5, 3, 5))
    sums = alignment_sums([a, b], [1.0, 0.5], [r1, None], torch.device("cpu")).tolist()
    assert sums == pytest.approx([torch.dot(a, r1).item(), (a @ a + 0.5 * b @ b).item(), (r1 @ r1).item()], rel=1e-14)
    assert math.isnan(cosine(1.0, 0.0, 1.0)) and math.isnan(cosine(math.inf, 1.0, 1.0))
    g = [a.clone(), b.clone()]
    project_(g, [r1, None], 0.25)
    assert torch.equal(g[0], a - 0.25 * r1) and torch.equal(g[1], b)
