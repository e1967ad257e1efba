"""`kondo_gate`: the delight, the gate's probability against DG's weight (Monte Carlo), the price,
the target rate, validation."""

import math

import pytest
import torch

import stable_async as sa


def _case(seed=0, B=12, T=5):
    gen = torch.Generator().manual_seed(seed)
    lp = -3.0 * torch.rand(B, T, generator=gen, dtype=torch.float64)
    adv = torch.randn(B, generator=gen, dtype=torch.float64)
    mask = torch.rand(B, T, generator=gen) > 0.2
    mask[0] = False  # no valid token: never kept
    return adv, lp, mask


def test_delight_by_hand_and_per_token_advantages():
    lp = torch.log(torch.tensor([[0.5, 0.25], [0.1, 1.0]], dtype=torch.float64))
    mask = torch.tensor([[True, True], [True, False]])
    sel = sa.kondo_gate(torch.tensor([2.0, -1.0]), lp, mask, stochastic=False)
    torch.testing.assert_close(sel.delight, torch.tensor([2.0 * math.log(8.0), -math.log(10.0)], dtype=torch.float64))
    assert sel.keep.tolist() == [True, False] and sel.indices.tolist() == [0] and sel.skipped_fraction == 0.5
    per_token = torch.tensor([[1.0, 3.0], [-1.0, 5.0]])
    sel = sa.kondo_gate(per_token, lp, mask, stochastic=False)
    assert sel.delight[0].item() == pytest.approx(math.log(2.0) + 3.0 * math.log(4.0))


def test_gate_frequency_is_dg_weight_at_zero_price():
    adv, lp, mask = _case()
    gen = torch.Generator().manual_seed(1)
    draws = 8000
    kept = sum(sa.kondo_gate(adv, lp, mask, eta=1.5, generator=gen).keep.double() for _ in range(draws)) / draws
    # DG's sequence-level gate σ(A·ℓ_i/η) (stable_async.delight_gate) is the keep probability.
    dg = sa.delight_gate(adv, lp, eta=1.5, level="sequence", mask=mask).amax(-1)  # one value per sequence
    valid = mask.any(-1)
    torch.testing.assert_close(kept[valid], dg[valid].double(), atol=4 * math.sqrt(0.25 / draws), rtol=0)
    assert kept[0] == 0  # the empty row


def test_price_and_rate():
    adv, lp, mask = _case(2)
    valid = mask.any(-1)
    low = sa.kondo_gate(adv, lp, mask, price=-1e9, stochastic=False)
    assert low.keep.tolist() == valid.tolist()
    high = sa.kondo_gate(adv, lp, mask, price=5.0, stochastic=False)
    assert high.keep.tolist() == ((high.delight > 5.0) & valid).tolist()
    gen = torch.Generator().manual_seed(0)
    frac = [sa.kondo_gate(adv, lp, mask, price=p, generator=gen).skipped_fraction for p in (-5.0, 0.0, 5.0)]
    assert frac[0] < frac[1] < frac[2]
    top = sa.kondo_gate(adv, lp, mask, rate=0.25, stochastic=False)
    n = int(valid.sum())
    assert int(top.keep.sum()) == math.ceil(0.25 * n)
    assert top.delight[top.keep].min() >= top.delight[valid & ~top.keep].max()
    assert top.price == pytest.approx(float(top.delight[top.keep].min()))
    soft = sa.kondo_gate(adv, lp, mask, rate=0.25, eta=1e-6, generator=gen)  # η → 0: the quantile threshold
    assert soft.price == pytest.approx(float(torch.quantile(top.delight[valid], 0.75)))
    assert int(soft.keep.sum()) == int((soft.delight[valid] > soft.price).sum())


def test_validation_and_empty():
    adv, lp, mask = _case()
    for kwargs, name in [
        ({"price": math.nan}, "price"),
        ({"price": True}, "price"),
        ({"eta": 0.0}, "eta"),
        ({"rate": 0.0}, "rate"),
        ({"rate": 1.5}, "rate"),
        ({"stochastic": 1}, "stochastic"),
    ]:
        with pytest.raises(ValueError, match=name):
            sa.kondo_gate(adv, lp, mask, **kwargs)
    with pytest.raises(ValueError, match="mask"):
        sa.kondo_gate(adv, lp, mask[:, :2])
    with pytest.raises(ValueError, match="advantages"):
        sa.kondo_gate(adv[:3], lp, mask)
    with pytest.raises(ValueError, match="not finite"):
        sa.kondo_gate(adv, torch.where(mask, -math.inf, lp), mask)
    empty = sa.kondo_gate(torch.ones(2), torch.zeros(2, 3), torch.zeros(2, 3), rate=0.5)
    assert empty.indices.numel() == 0 and empty.skipped_fraction == 0.0


def test_custom_loop_example_with_the_gate():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[2] / "examples" / "custom_loop.py"
    spec = importlib.util.spec_from_file_location("custom_loop_kondo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    gated = module.main(steps=3, kondo_price=1.0, log_every=10)
    plain = module.main(steps=3, log_every=10)
    assert 0.0 < gated["kondo_skipped"] < 1.0 and plain["kondo_skipped"] == 0.0


def test_benchmark_smoke():
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "kondo" / "run.py"), "--quick", "--repeats", "2"],
        capture_output=True, text=True, env=env, timeout=300, check=True,
    ).stdout  # fmt: skip
    rows = [line for line in out.splitlines() if line.startswith("| kondo")]
    assert len(rows) == 3 and "| kondo rate 0.25 | 75.0% |" in out  # 16 sequences, the top 4 kept
