"""Parity with the installed SkyRL's policy losses, in each of SkyRL's loss reductions.

SkyRL's pipeline for one mini-batch: ``apply_loss_reduction_to_advantages_minibatch`` scales the
advantages for ``trainer.algorithm.loss_reduction`` (token_mean, token_mean_legacy,
sequence_mean, seq_mean_token_sum_norm, prompt_mean), the worker splits the mini-batch into
micro-batches, calls the loss on each (it returns a masked sum) and backpropagates every one.
We run exactly that twice, once with SkyRL's built-in (``PolicyLossRegistry.get(<built-in>)``)
and once with ours (``PolicyLossRegistry.get("sa_<name>")``, the worker's own lookup), on fp64
random inputs, and compare the summed loss, its gradient w.r.t. the log-probs and
``clip_ratio``. For the reductions that have a stable-async aggregation mode we also compare
with our loss called directly on the unscaled advantages (``token_mean`` ↔ ``token-mean``,
``sequence_mean`` ↔ ``seq-mean-token-mean``, ``seq_mean_token_sum_norm`` ↔
``seq-mean-token-sum-norm`` with L = ``max_seq_len``).

Pairs (read from ``skyrl/backends/skyrl_train/utils/ppo_utils.py``): ppo ↔ regular; ppo with
``dual_clip = clip_ratio_c`` ↔ dual_clip; gspo_token ↔ gspo (SkyRL's is GSPO-token; our gspo
too with one advantage per sequence); cispo ↔ cispo; sapo ↔ sapo; dppo_binary_tv /
dppo_binary_kl ↔ dppo (binary_tv / binary_kl, μ = rollout log-probs); clip_cov ↔ clip_cov
(same global-RNG draw); kl_cov ↔ kl_cov.

Tolerances: SkyRL's ``safe_exp_delta`` exponentiates in float32 (regular, dual_clip, cispo,
dppo): rtol 1e-6. Everything else (gspo, sapo, clip_cov, kl_cov) is fp64 throughout: rtol 1e-10.
DPPO: our surrogate's value is −M·sg(r)·A·log π (the paper's and veRL's form) where SkyRL's is
−M·r·A; their gradients are the same, −M·r·A·∇log π, so for DPPO we compare gradients and
``clip_ratio``, and the value against that formula.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sa_testing import random_logprobs, random_mask
from skyrl_areal_loaders import load_skyrl, load_skyrl_adapter

pytestmark = pytest.mark.trainers

ppo_utils = load_skyrl()
skyrl_adapter = load_skyrl_adapter()
from skyrl.train.config import AlgorithmConfig  # noqa: E402

import stable_async as sa  # noqa: E402

B, T, MICRO = 8, 7, 4
PROMPTS = [(0, 2), (2, 5), (5, 8)]
REDUCTIONS = ("token_mean", "token_mean_legacy", "sequence_mean", "seq_mean_token_sum_norm", "prompt_mean")
NATIVE = {"token_mean": "token-mean", "sequence_mean": "seq-mean-token-mean", "seq_mean_token_sum_norm": None}
FP32_RATIO = {"regular", "dual_clip", "cispo", "dppo"}

# (ours, SkyRL built-in, SkyRL AlgorithmConfig overrides, sa_kwargs, per-sequence advantages)
CASES = [
    ("ppo", "regular", {"eps_clip_low": 0.2, "eps_clip_high": 0.28}, {}, False),
    ("ppo", "dual_clip", {"eps_clip_low": 0.2, "eps_clip_high": 0.28, "clip_ratio_c": 2.0}, {"dual_clip": 2.0}, False),
    ("gspo_token", "gspo", {"eps_clip_low": 0.02, "eps_clip_high": 0.03}, {}, False),
    ("gspo", "gspo", {"eps_clip_low": 0.02, "eps_clip_high": 0.03}, {}, True),
    ("cispo", "cispo", {"cispo": {"cispo_eps_clip_low": 0.1, "cispo_eps_clip_high": 0.15}}, {}, False),
    ("sapo", "sapo", {"sapo": {"tau_pos": 1.3, "tau_neg": 0.9}}, {}, False),
    ("dppo_binary_tv", "dppo", {"dppo": {"dppo_type": "binary_tv", "delta_low": 0.03, "delta_high": 0.04}}, {}, False),
    ("dppo_binary_kl", "dppo", {"dppo": {"dppo_type": "binary_kl", "delta_low": 0.01, "delta_high": 0.015}}, {}, False),
    ("clip_cov", "clip_cov", {"clip_cov": {"clip_ratio": 0.2, "clip_cov_lb": -50.0, "clip_cov_ub": 50.0}}, {}, False),
    ("kl_cov", "kl_cov", {"kl_cov": {"kl_cov_frac": 0.2, "ppo_kl_coef": 0.7}}, {}, False),
]


def algorithm_config(policy_loss_type: str, overrides: dict, loss_reduction: str, sa_kwargs: dict) -> object:
    nested = {}
    for key, value in overrides.items():
        if isinstance(value, dict):
            nested[key] = dataclasses.replace(getattr(AlgorithmConfig(), key), **value)
        else:
            nested[key] = value
    config = skyrl_adapter.SAAlgorithmConfig(
        policy_loss_type=policy_loss_type, loss_reduction=loss_reduction, max_seq_len=T, sa_kwargs=sa_kwargs, **nested
    )
    return config


def minibatch(seed: int, per_sequence: bool) -> dict:
    gen = torch.Generator().manual_seed(seed)
    lp = random_logprobs((B, T), gen, low=-2.5, high=-0.05)
    old = (lp + 0.2 * torch.randn(B, T, generator=gen, dtype=torch.float64)).clamp(max=-1e-3)
    rollout = (old + 0.2 * torch.randn(B, T, generator=gen, dtype=torch.float64)).clamp(max=-1e-3)
    adv = torch.randn(B, 1 if per_sequence else T, generator=gen, dtype=torch.float64).expand(B, T).clone()
    mask = random_mask(B, T, gen).to(torch.float64)
    return {"log_probs": lp, "old": old, "rollout": rollout, "advantages": adv, "mask": mask}


def run_skyrl_pipeline(loss_fn, data: dict, config, reduction: str, seed: int) -> tuple[float, torch.Tensor, list]:
    """SkyRL's mini-batch path: scale the advantages, then loss + backward per micro-batch."""
    scaled = ppo_utils.apply_loss_reduction_to_advantages_minibatch(
        data["advantages"], data["mask"], reduction, MICRO, T, prompt_boundaries=PROMPTS
    )
    lp = data["log_probs"].clone().requires_grad_(True)
    total, metrics = 0.0, []
    for start in range(0, B, MICRO):
        rows = slice(start, start + MICRO)
        torch.manual_seed(seed + start)  # clip_cov draws from the global generator
        loss, m = loss_fn(
            lp[rows], data["old"][rows], scaled[rows], config=config, loss_mask=data["mask"][rows],
            rollout_logprobs=data["rollout"][rows],
        )  # fmt: skip
        loss.backward()
        total += float(loss.detach())
        metrics.append(m)
    return total, lp.grad, metrics


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("ours", "theirs", "overrides", "sa_kwargs", "per_sequence"), CASES, ids=lambda v: str(v)[:14])
@pytest.mark.parametrize("seed", [0, 1])
def test_sa_loss_matches_skyrl_builtin(ours, theirs, overrides, sa_kwargs, per_sequence, reduction, seed):
    data = minibatch(seed, per_sequence)
    skyrl_config = algorithm_config(theirs, overrides, reduction, {})
    our_config = algorithm_config(f"sa_{ours}", overrides, reduction, sa_kwargs)
    registry = ppo_utils.PolicyLossRegistry
    ref_loss, ref_grad, ref_metrics = run_skyrl_pipeline(registry.get(theirs), data, skyrl_config, reduction, seed)
    loss, grad, metrics = run_skyrl_pipeline(registry.get(f"sa_{ours}"), data, our_config, reduction, seed)

    rtol = 1e-6 if theirs in FP32_RATIO else 1e-10
    torch.testing.assert_close(grad, ref_grad, rtol=rtol, atol=rtol * float(ref_grad.abs().max()))
    if theirs == "dppo":
        # value −M·sg(r)·A·log π: each token's gradient divided by its log π, summed
        lp = data["log_probs"]
        expected = float((grad * lp).sum())
        assert loss == pytest.approx(expected, rel=1e-9, abs=1e-12)
    else:
        assert loss == pytest.approx(ref_loss, rel=rtol, abs=1e-12)
    if theirs not in ("sapo", "kl_cov"):  # SkyRL reports a constant 0.0 for those two
        for mine, ref in zip(metrics, ref_metrics):
            assert mine["clip_ratio"] == pytest.approx(ref["clip_ratio"], rel=1e-6, abs=1e-12)  # SkyRL: float32 mean


@pytest.mark.parametrize("reduction", sorted(NATIVE))
@pytest.mark.parametrize(
    ("ours", "theirs", "overrides", "sa_kwargs", "per_sequence"), CASES[:6], ids=lambda v: str(v)[:14]
)
def test_our_aggregation_matches_skyrl_reduction(ours, theirs, overrides, sa_kwargs, per_sequence, reduction):
    """Our loss on the unscaled advantages, one call for the whole mini-batch, with the matching mode."""
    data = minibatch(7, per_sequence)
    skyrl_config = algorithm_config(theirs, overrides, reduction, {})
    ref_loss, ref_grad, _ = run_skyrl_pipeline(
        ppo_utils.PolicyLossRegistry.get(theirs), data, skyrl_config, reduction, 0
    )
    hyperparameters = {
        k: v for k, v in skyrl_adapter.resolve_hyperparameters(ours, skyrl_config).items() if k != "aggregation"
    }
    mode = NATIVE[reduction]
    extra = {"aggregation": mode} if mode else {"aggregation": "seq-mean-token-sum-norm", "norm_length": float(T)}
    loss_fn = sa.get_loss(ours, **hyperparameters, **sa_kwargs, **extra)
    lp = data["log_probs"].clone().requires_grad_(True)
    batch = sa.PolicyBatch(lp, data["advantages"], data["mask"], old_logprobs=data["old"])
    out = loss_fn(batch)
    out.loss.backward()
    rtol = 1e-6 if theirs in FP32_RATIO else 1e-10
    assert float(out.loss.detach()) == pytest.approx(ref_loss, rel=rtol, abs=1e-12)
    torch.testing.assert_close(lp.grad, ref_grad, rtol=rtol, atol=rtol * float(ref_grad.abs().max()))


@pytest.mark.parametrize("tis", ["token", "sequence"])
def test_sa_loss_applies_skyrl_off_policy_correction(tis):
    """SkyRL's TIS / masks (``off_policy_correction``) reach the sa_ loss exactly as its built-in applies them."""
    off = dataclasses.replace(
        AlgorithmConfig().off_policy_correction,
        tis_ratio_type=tis,
        token_tis_ratio_clip_high=1.1,
        sequence_tis_ratio_clip_high=1.2,
        token_mask_is_threshold_low=0.8,
    )
    data = minibatch(3, False)
    ref_config = skyrl_adapter.SAAlgorithmConfig(policy_loss_type="regular", off_policy_correction=off)
    our_config = skyrl_adapter.SAAlgorithmConfig(policy_loss_type="sa_ppo", off_policy_correction=off)
    registry = ppo_utils.PolicyLossRegistry
    ref_loss, ref_grad, ref_metrics = run_skyrl_pipeline(registry.get("regular"), data, ref_config, "token_mean", 0)
    loss, grad, metrics = run_skyrl_pipeline(registry.get("sa_ppo"), data, our_config, "token_mean", 0)
    plain_loss, _, _ = run_skyrl_pipeline(
        registry.get("sa_ppo"), data, skyrl_adapter.SAAlgorithmConfig(policy_loss_type="sa_ppo"), "token_mean", 0
    )
    assert loss != pytest.approx(plain_loss, rel=1e-3)  # the correction acts
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-9)
    for mine, ref in zip(metrics, ref_metrics):
        for key, value in ref.items():
            assert mine[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key
