"""``vespo`` and ``luspo`` against TRL's ``_compute_loss`` with those loss types, fp64, values and gradients.

The reference is TRL's own ``GRPOTrainer._compute_loss`` on the same fp64 log-probs
(`trl_compute_loss_fp64`). VESPO with TRL's vLLM correction: TRL folds its token IS ratio (an
input of ``_compute_loss``, formed while scoring) into the Gamma weight; the test forms that
ratio with TRL's formula for ``token_truncate`` / ``token_mask``.
"""

import dataclasses
import types

import pytest
import torch

import stable_async as sa
from trl_helpers import trl_compute_loss_fp64, trl_inputs

pytestmark = pytest.mark.trainers
trl = pytest.importorskip("trl")

B, T = 8, 6


def _case(seed, per_token_adv=False, spread=0.15):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=gen) > 0.2
    mask[:, 0] = True
    lp = (-0.3 - 2.0 * torch.rand(B, T, generator=gen, dtype=torch.float64)).requires_grad_()
    old = (lp.detach() + spread * torch.randn(B, T, generator=gen, dtype=torch.float64)).clamp(max=0.0)
    mu = torch.where(mask, old + 0.4 * torch.randn(B, T, generator=gen, dtype=torch.float64), 0.0).clamp(max=0.0)
    adv = torch.randn((B, T) if per_token_adv else (B,), generator=gen, dtype=torch.float64)
    return lp, old, mu, adv, mask


def _grad(loss, lp):
    return torch.autograd.grad(loss, lp)[0]


def _assert_same(ours, ref, lp):
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(_grad(ours, lp), _grad(ref, lp), rtol=1e-11, atol=1e-14)


VESPO_SETTINGS = [
    {},
    {"vespo_k_pos": 1.0, "vespo_lambda_pos": 0.5, "vespo_k_neg": 4.0, "vespo_lambda_neg": 5.0},
]


@pytest.mark.parametrize("settings", VESPO_SETTINGS)
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_vespo_matches_trl(settings, per_token_adv):
    lp, old, _, adv, mask = _case(0, per_token_adv)
    inputs = trl_inputs(mask, adv, old)
    ref, metrics = trl_compute_loss_fp64(lp, inputs, loss_type="vespo", **settings)
    ours_settings = {key.removeprefix("vespo_"): value for key, value in settings.items()}
    batch = sa.PolicyBatch(
        logprobs=lp, advantages=adv, mask=mask, old_logprobs=old, global_num_tokens=float(mask.sum())
    )
    out = sa.get_loss("vespo", **ours_settings)(batch)
    _assert_same(out.loss, ref, lp)
    if per_token_adv:  # TRL's metric is then the token mean of φ
        assert out.metrics["vespo/phi_mean"] == pytest.approx(metrics["vespo/phi_seq_mean"][0], rel=1e-12)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask"])
@pytest.mark.parametrize("opsm", [None, 0.05])
def test_vespo_with_trl_vllm_correction_and_opsm_matches_trl(mode, opsm):
    lp, old, mu, adv, mask = _case(1, spread=0.05)
    clip_min, clip_max = 0.5, 1.6
    # TRL's token IS ratio (``_generate_and_score_completions``): exp((old − μ)·m), clamped or masked.
    ratio = torch.exp((old - mu) * mask)
    if mode == "token_truncate":
        ratio = ratio.clamp(min=clip_min, max=clip_max)
    else:
        ratio = ratio.masked_fill((ratio < clip_min) | (ratio > clip_max), 0.0)
    inputs = trl_inputs(mask, adv, old, mu, ratio)
    ref, _ = trl_compute_loss_fp64(
        lp, inputs, loss_type="vespo", use_vllm=True, vllm_importance_sampling_correction=True,
        off_policy_mask_threshold=opsm,
    )  # fmt: skip
    level_mode = "truncate" if mode == "token_truncate" else "mask"
    correction = sa.RolloutCorrection(level="token", mode=level_mode, low=clip_min, high=clip_max)
    if opsm is not None:
        correction = (correction, sa.opsm(opsm))
    batch = sa.PolicyBatch(
        logprobs=lp, advantages=adv, mask=mask, old_logprobs=old, rollout_logprobs=mu,
        global_num_tokens=float(mask.sum()),
    )  # fmt: skip
    out = sa.get_loss("vespo", correction=correction)(batch)
    if mode == "token_mask":
        assert out.metrics["rollout_corr/rollout_rs_masked_fraction"] > 0
    if opsm is not None:
        assert 0 < out.metrics["opsm/seq_masked_fraction"] < 1
    _assert_same(out.loss, ref, lp)


@pytest.mark.parametrize("settings", [{}, {"epsilon": 0.1, "epsilon_high": 0.3}, {"epsilon": 0.05, "delta": 1.05}])
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_luspo_matches_trl(settings, per_token_adv):
    lp, old, _, adv, mask = _case(2, per_token_adv, spread=0.3)
    old = old + torch.linspace(-0.4, 0.4, B, dtype=torch.float64)[:, None]  # sequence ratios beyond 1 ± ε
    inputs = trl_inputs(mask, adv, old)
    ref, _ = trl_compute_loss_fp64(lp, inputs, loss_type="luspo", importance_sampling_level="sequence", **settings)
    eps = settings.get("epsilon", 0.2)
    ours = {"eps_low": eps, "eps_high": settings.get("epsilon_high") or eps, "ratio_cap": settings.get("delta")}
    batch = sa.PolicyBatch(logprobs=lp, advantages=adv, mask=mask, old_logprobs=old)
    out = sa.get_loss("luspo", **ours)(batch)
    assert 0 < out.metrics["actor/pg_clipfrac"] < 1
    _assert_same(out.loss, ref, lp)


def test_defaults_are_trls():
    defaults = {f.name: f.default for f in dataclasses.fields(trl.GRPOConfig)}
    args = types.SimpleNamespace(**defaults)
    vespo = sa.loss_config_class("vespo")()
    assert (vespo.k_pos, vespo.lambda_pos, vespo.k_neg, vespo.lambda_neg) == (
        args.vespo_k_pos, args.vespo_lambda_pos, args.vespo_k_neg, args.vespo_lambda_neg,
    )  # fmt: skip
    luspo = sa.loss_config_class("luspo")()
    assert (luspo.eps_low, luspo.eps_high, luspo.ratio_cap) == (args.epsilon, args.epsilon, args.delta)
    assert args.epsilon_high is None  # TRL's epsilon_high falls back to epsilon
