"""Numerical robustness of every registered loss, with and without corrections.

bf16 inputs, fully masked rows, an all-zero mask, -inf log-probs at masked positions and
log-ratios of ±1e4 must give finite losses, and zero gradient wherever nothing is valid.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stable_async as sa
from sa_testing import full_batch_kwargs

CORRECTIONS = {
    "none": None,
    "token_tis": sa.token_tis(),
    "icepop": sa.icepop(),
    "seq_mask": sa.sequence_mask(),
    "geo_k3": sa.RolloutCorrection(level="geometric", mode="mask", statistic="k3", high=0.5),
}


def _losses():
    return sa.available_losses()


def _grads(out, kwargs):
    leaves = [kwargs["logprobs"], kwargs["current_topk_logprobs"]]
    grads = torch.autograd.grad(out.loss, leaves, allow_unused=True)
    return [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]


@pytest.mark.parametrize("correction", list(CORRECTIONS))
@pytest.mark.parametrize("name", _losses())
def test_fully_masked_rows_and_minus_inf_padding(gen, name, correction):
    kwargs = full_batch_kwargs(gen)
    kwargs["mask"][1] = False
    padded = ~kwargs["mask"]
    for key in ("logprobs", "old_logprobs", "rollout_logprobs"):
        kwargs[key] = torch.where(padded, torch.tensor(float("-inf"), dtype=torch.float64), kwargs[key].detach())
    kwargs["logprobs"].requires_grad_(True)
    out = sa.get_loss(name, correction=CORRECTIONS[correction])(sa.PolicyBatch(**kwargs))
    grad, _ = _grads(out, kwargs)
    assert torch.isfinite(out.loss)
    assert torch.isfinite(grad).all()
    assert torch.equal(grad[padded], torch.zeros_like(grad[padded]))
    assert all(v == v for v in out.metrics.values()), out.metrics  # no NaN metric


@pytest.mark.parametrize("correction", list(CORRECTIONS))
@pytest.mark.parametrize("name", _losses())
def test_all_zero_mask_gives_zero_loss_and_zero_gradient(gen, name, correction):
    kwargs = full_batch_kwargs(gen)
    kwargs["mask"] = torch.zeros_like(kwargs["mask"])
    out = sa.get_loss(name, correction=CORRECTIONS[correction])(sa.PolicyBatch(**kwargs))
    grad, topk_grad = _grads(out, kwargs)
    assert out.loss.item() == 0.0
    assert not grad.any() and not topk_grad.any()


@pytest.mark.parametrize("name", _losses())
def test_empty_batch(name):
    kwargs = {
        "logprobs": torch.zeros(0, 0, requires_grad=True),
        "advantages": torch.zeros(0),
        "mask": torch.zeros(0, 0),
    }
    kwargs["rollout_logprobs"] = torch.zeros(0, 0)
    kwargs.update(
        topk_ids=torch.zeros(0, 0, 2, dtype=torch.long),
        topk_logprobs=torch.zeros(0, 0, 2),
        current_topk_logprobs=torch.zeros(0, 0, 2),
    )
    out = sa.get_loss(name)(sa.PolicyBatch(**kwargs))
    assert out.loss.item() == 0.0


@pytest.mark.parametrize("correction", list(CORRECTIONS))
@pytest.mark.parametrize("name", _losses())
def test_huge_log_ratios_stay_finite(gen, name, correction):
    kwargs = full_batch_kwargs(gen, log_ratio_scale=1e4)
    out = sa.get_loss(name, correction=CORRECTIONS[correction])(sa.PolicyBatch(**kwargs))
    grad, topk_grad = _grads(out, kwargs)
    assert torch.isfinite(out.loss)
    assert torch.isfinite(grad).all() and torch.isfinite(topk_grad).all()


@pytest.mark.parametrize("name", _losses())
def test_bf16_inputs_compute_in_fp32_and_match(gen, name):
    kwargs = full_batch_kwargs(gen, dtype=torch.bfloat16)
    out_bf16 = sa.get_loss(name, correction=sa.token_tis())(sa.PolicyBatch(**kwargs))
    grad_bf16, _ = _grads(out_bf16, kwargs)
    as_fp32 = {
        k: (v.detach().float().requires_grad_(v.requires_grad) if torch.is_tensor(v) and v.is_floating_point() else v)
        for k, v in kwargs.items()
    }
    out_fp32 = sa.get_loss(name, correction=sa.token_tis())(sa.PolicyBatch(**as_fp32))
    grad_fp32, _ = _grads(out_fp32, as_fp32)
    assert out_bf16.loss.dtype == torch.float32
    assert torch.allclose(out_bf16.loss, out_fp32.loss, rtol=1e-6, atol=1e-7)
    assert torch.allclose(grad_bf16.float(), grad_fp32, rtol=1e-2, atol=1e-3)  # grad is cast back to bf16


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**31 - 1),
    B=st.integers(1, 5),
    T=st.integers(1, 6),
    spread=st.sampled_from([0.0, 0.1, 3.0, 50.0]),
    aggregation=st.sampled_from(sa.AGGREGATION_MODES),
    correction=st.sampled_from(list(CORRECTIONS)),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_property_no_nan_or_inf_in_any_loss_or_gradient(seed, B, T, spread, aggregation, correction, dtype):
    gen = torch.Generator().manual_seed(seed)
    for name in _losses():
        kwargs = full_batch_kwargs(gen, B=B, T=T, spread=spread, dtype=dtype)
        out = sa.get_loss(name, aggregation=aggregation, correction=CORRECTIONS[correction])(sa.PolicyBatch(**kwargs))
        grad, topk_grad = _grads(out, kwargs)
        assert torch.isfinite(out.loss), name
        assert torch.isfinite(grad).all() and torch.isfinite(topk_grad).all(), name
