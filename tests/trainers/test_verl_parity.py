"""Parity with the installed veRL: our losses, aggregation and rollout correction vs veRL's own code.

Each test feeds the same fp64 random inputs (right-padded masks, one fully masked row where veRL
tolerates it) to the veRL function (called as the reference, never copied) and to the equivalent
stable-async setup, and compares the loss value, its gradient w.r.t. ``log_prob``
(``torch.autograd.grad``) and, where we have an equivalent, the metrics.

Tolerances. Exact means ``rtol = 1e-10``. veRL's ``seq-mean-token-mean`` divides a sequence's
token sum by ``count + 1e-8`` (and ``geo_mean`` its exponent and advantage mean, and every metric
``verl_F.masked_mean`` its count), where we divide by the exact count: each per-sequence term
differs by a relative 1e-8 / count ≤ 1e-8 (deliberate, documented in ``stable_async.aggregate``).
Those comparisons use ``rtol = 2e-8`` per element (gradients, metrics) and, for a loss that is a
mean of per-sequence terms of both signs (cancellation), ``atol = 2e-8 · mean |term|``.
veRL's clip fractions are float32 token means, as ours: compared at ``rtol = 1e-6``.
"""

from __future__ import annotations

import math

import pytest
import torch

import stable_async as sa
from sa_testing import random_tensors, verl_actor_config
from stable_async.diagnostics import approx_kl

pytestmark = pytest.mark.trainers

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
rollout_corr = pytest.importorskip("verl.trainer.ppo.rollout_corr_helper")

EXACT = {"rtol": 1e-10, "atol": 1e-13}
PLUS_EPS = {"rtol": 2e-8, "atol": 1e-13}  # veRL's count + 1e-8 (see the module docstring)
FRACTION = {"rtol": 1e-6, "atol": 1e-7}  # float32 token fractions
SEEDS = [0, 1, 2]
MODES = list(sa.AGGREGATION_MODES)


def tol(mode: str) -> dict:
    return PLUS_EPS if mode == "seq-mean-token-mean" else EXACT


def inputs(seed: int, *, B: int = 7, T: int = 11, spread: float = 0.3, empty_row: bool = True) -> dict:
    """fp64 random tensors; row 2 fully masked when ``empty_row`` (veRL excludes it from seq means)."""
    t = random_tensors(torch.Generator().manual_seed(seed), B=B, T=T, spread=spread)
    if empty_row:
        t["mask"][2] = False
    return t


def grad(loss: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, leaf, retain_graph=True)
    return g


def assert_close(ours, theirs, **tolerance) -> None:
    torch.testing.assert_close(
        torch.as_tensor(ours, dtype=torch.float64), torch.as_tensor(theirs, dtype=torch.float64), **tolerance
    )


def verl_loss(name: str, t: dict, mode: str, config, *, old=None, mask=None, advantages=None, weights=None):
    fn = core_algos.get_policy_loss_fn(name)
    return fn(
        old_log_prob=t["old_logprobs"] if old is None else old,
        log_prob=t["logprobs"],
        advantages=t["advantages"] if advantages is None else advantages,
        response_mask=(t["mask"] if mask is None else mask).to(torch.float64),
        loss_agg_mode=mode,
        config=config,
        rollout_is_weights=weights,
    )


def ours(name: str, t: dict, *, batch_kwargs=None, **config):
    batch = sa.PolicyBatch(**{**t, **(batch_kwargs or {})})
    return sa.get_loss(name, **config)(batch)


def compare(
    out, theirs, t, tolerance, metrics=("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"), scale=None
):
    """Loss, gradient w.r.t. ``t["logprobs"]`` and metrics.

    ``scale`` bounds |per-sequence term| for the PLUS_EPS atol (default: the largest per-sequence
    token mean of |ℓ|).
    """
    loss, their_metrics = theirs
    lp = t["logprobs"]
    loss_tolerance = dict(tolerance)
    if tolerance is PLUS_EPS:
        if scale is None:
            m = t["mask"].double()
            scale = float(((out.per_token_loss.abs() * m).sum(-1) / m.sum(-1).clamp(min=1)).max())
        loss_tolerance["atol"] = 2e-8 * scale
    assert_close(out.loss, loss, **loss_tolerance)
    assert_close(grad(out.loss, lp), grad(loss, lp), **tolerance)
    for key in metrics:
        # veRL's metrics are verl_F.masked_mean: Σ / (count + 1e-8).
        assert_close(out.metrics[key], their_metrics[key], **(FRACTION if "clipfrac" in key else PLUS_EPS))


def global_info(t: dict, dp: bool) -> tuple[dict, dict]:
    """(veRL ``global_batch_info``, our PolicyBatch kwargs) with the same global numbers."""
    if not dp:
        return {}, {}
    tokens = int(t["mask"].sum()) * 3 + 5
    seqs = int(t["mask"].any(-1).sum()) * 3 + 1
    verl = {"dp_size": 4, "batch_num_tokens": tokens, "global_batch_size": seqs}
    return verl, {"dp_size": 4, "global_num_tokens": tokens, "global_num_seqs": seqs}


# --------------------------------------------------------------------------- aggregation
@pytest.mark.parametrize("dp", [False, True], ids=["local", "global"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", SEEDS)
def test_aggregation_matches_agg_loss(seed, mode, dp):
    g = torch.Generator().manual_seed(100 + seed)
    t = inputs(seed)
    loss_mat = torch.randn(t["mask"].shape, generator=g, dtype=torch.float64).requires_grad_(True)
    mask = t["mask"]
    kwargs = {}
    if dp:
        kwargs = {"dp_size": 4, "batch_num_tokens": int(mask.sum()) * 4 - 3, "global_batch_size": 4 * 6 + 1}
    theirs = core_algos.agg_loss(loss_mat, mask.to(torch.float64), mode, **kwargs)
    ours_ = sa.aggregate(
        loss_mat,
        mask,
        mode,
        global_num_tokens=kwargs.get("batch_num_tokens"),
        global_num_seqs=kwargs.get("global_batch_size"),
        dp_size=kwargs.get("dp_size", 1),
    )
    assert_close(ours_, theirs, **tol(mode))
    assert_close(grad(ours_, loss_mat), grad(theirs, loss_mat), **tol(mode))


@pytest.mark.parametrize("seed", SEEDS)
def test_seq_mean_token_sum_norm_constant_matches_loss_scale_factor(seed):
    t = inputs(seed)
    loss_mat = t["logprobs"] * 1.5
    theirs = core_algos.agg_loss(loss_mat, t["mask"].double(), "seq-mean-token-sum-norm", loss_scale_factor=64)
    ours_ = sa.aggregate(loss_mat, t["mask"], "seq-mean-token-sum-norm", norm_length=64)
    assert_close(ours_, theirs, **EXACT)
    assert_close(grad(ours_, t["logprobs"]), grad(theirs, t["logprobs"]), **EXACT)


# --------------------------------------------------------------------------- PPO
@pytest.mark.parametrize("dp", [False, True], ids=["local", "global"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", SEEDS)
def test_ppo_matches_vanilla(seed, mode, dp):
    # spread 1.0: |log r| > log 3 happens, so the dual clip (c = 3) is exercised.
    t = inputs(seed, spread=1.0)
    verl_info, batch_kwargs = global_info(t, dp)
    config = verl_actor_config(clip_ratio_low=0.15, clip_ratio_high=0.28, clip_ratio_c=3.0, global_batch_info=verl_info)
    theirs = verl_loss("vanilla", t, mode, config)
    out = ours("ppo", t, batch_kwargs=batch_kwargs, aggregation=mode, eps_low=0.15, eps_high=0.28, dual_clip=3.0)
    compare(out, theirs, t, tol(mode))
    assert out.metrics["actor/pg_clipfrac"] > 0


def test_ppo_dual_clip_is_exercised():
    hits = [ours("ppo", inputs(s, spread=1.0), dual_clip=3.0).metrics["actor/pg_clipfrac_lower"] for s in SEEDS]
    assert all(h > 0 for h in hits), hits


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("seed", SEEDS)
def test_ppo_with_tis_weights_matches_vanilla(seed, level):
    # veRL's trainer path: weights from π_old / μ (our numerator="old"), passed as rollout_is_weights.
    t = inputs(seed)
    mask = t["mask"].double()
    weights, _ = rollout_corr.compute_rollout_correction_weights(
        t["old_logprobs"] - t["rollout_logprobs"], mask, rollout_is=level, rollout_is_threshold=1.5
    )
    config = verl_actor_config(clip_ratio_low=0.2, clip_ratio_high=0.28)
    theirs = verl_loss("vanilla", t, "token-mean", config, weights=weights)
    correction = sa.RolloutCorrection(level=level, mode="truncate", high=1.5)
    out = ours("ppo", t, eps_low=0.2, eps_high=0.28, dual_clip=3.0, correction=correction)
    compare(out, theirs, t, EXACT)


# --------------------------------------------------------------------------- GSPO
@pytest.mark.parametrize("dp", [False, True], ids=["local", "global"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", SEEDS)
def test_gspo_token_matches_verl_gspo(seed, mode, dp):
    # Per-token advantages (gspo_token allows them); ε wide enough that some sequences are clipped
    # and some are not. veRL clamps the token log-ratio at +10, we at ±20: not reached here.
    t = inputs(seed)
    verl_info, batch_kwargs = global_info(t, dp)
    config = verl_actor_config(clip_ratio_low=0.05, clip_ratio_high=0.08, global_batch_info=verl_info)
    theirs = verl_loss("gspo", t, mode, config)
    out = ours("gspo_token", t, batch_kwargs=batch_kwargs, aggregation=mode, eps_low=0.05, eps_high=0.08)
    compare(out, theirs, t, tol(mode))
    assert 0 < out.metrics["actor/pg_clipfrac"] < 1


@pytest.mark.parametrize("seed", SEEDS)
def test_gspo_sequence_matches_verl_gspo_with_sequence_advantages(seed):
    # With one advantage per sequence and seq-mean-token-mean, the gradient through s_i (ours)
    # and the GSPO-token form (veRL) agree in value and gradient.
    t = inputs(seed)
    seq_adv = torch.randn(t["mask"].shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    t["advantages"] = seq_adv
    config = verl_actor_config(clip_ratio_low=0.05, clip_ratio_high=0.08)
    theirs = verl_loss(
        "gspo", t, "seq-mean-token-mean", config, advantages=seq_adv.unsqueeze(-1).expand_as(t["logprobs"])
    )
    out = ours("gspo", t, aggregation="seq-mean-token-mean", eps_low=0.05, eps_high=0.08)
    compare(out, theirs, t, PLUS_EPS)


# --------------------------------------------------------------------------- CISPO, SAPO, GMPO
@pytest.mark.parametrize("eps", [(1.0, 4.0), (0.2, 0.28)], ids=["default", "two-sided"])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("seed", SEEDS)
def test_cispo_matches_verl(seed, mode, eps):
    t = inputs(seed, spread=0.6)
    config = verl_actor_config(clip_ratio_low=eps[0], clip_ratio_high=eps[1])
    theirs = verl_loss("cispo", t, mode, config)
    out = ours("cispo", t, aggregation=mode, eps_low=eps[0], eps_high=eps[1])
    # veRL reports pg_clipfrac_lower = 0 always; ours is the fraction below 1 − ε_low (not compared).
    compare(out, theirs, t, tol(mode), metrics=("actor/pg_clipfrac", "actor/ppo_kl"))


@pytest.mark.parametrize("taus", [(1.0, 1.05), (2.0, 3.5)])
@pytest.mark.parametrize("seed", SEEDS)
def test_sapo_matches_verl(seed, taus):
    t = inputs(seed, spread=0.6)
    config = verl_actor_config(tau_pos=taus[0], tau_neg=taus[1])
    # veRL forces seq-mean-token-mean for sapo whatever loss_agg_mode says.
    theirs = verl_loss("sapo", t, "token-mean", config)
    out = ours("sapo", t, tau_pos=taus[0], tau_neg=taus[1])
    compare(out, theirs, t, PLUS_EPS, metrics=("actor/ppo_kl",))


@pytest.mark.parametrize("per_token_adv", [False, True], ids=["seq-adv", "token-adv"])
@pytest.mark.parametrize("seed", SEEDS)
def test_geo_mean_matches_verl(seed, per_token_adv):
    # ε are log-space bounds; veRL reads them from clip_ratio_low/high. No fully masked row here:
    # veRL averages over all rows (see the next test).
    t = inputs(seed, spread=0.6, empty_row=False)
    if not per_token_adv:
        t["advantages"] = t["advantages"][:, :1].expand_as(t["logprobs"]).clone()
    config = verl_actor_config(clip_ratio_low=0.2, clip_ratio_high=0.3)
    theirs = verl_loss("geo_mean", t, "token-mean", config)
    out = ours("geo_mean", t, eps_low=0.2, eps_high=0.3)
    # Per-sequence terms |Ā_i·R_i| ≤ max|A|·e^0.3.
    compare(out, theirs, t, PLUS_EPS, scale=float(t["advantages"].abs().max()) * 1.35)
    assert out.metrics["actor/pg_clipfrac"] > 0 and out.metrics["actor/pg_clipfrac_lower"] > 0


@pytest.mark.parametrize("seed", SEEDS)
def test_geo_mean_fully_masked_row_and_tis_weights(seed):
    # Deliberate difference: veRL's torch.mean counts a fully masked row (its loss is 0) in the
    # denominator, we average over valid sequences only: ours · n_valid / B == veRL's.
    # TIS weights: veRL reduces them by exp(mean log(w + 1e-10)), we by exp(mean log w): relative
    # 1e-10 / w with w ≥ e^-1.5 here, inside PLUS_EPS.
    t = inputs(seed, spread=0.3)
    B, n_valid = t["mask"].shape[0], int(t["mask"].any(-1).sum())
    weights, _ = rollout_corr.compute_rollout_correction_weights(
        t["old_logprobs"] - t["rollout_logprobs"], t["mask"].double(), rollout_is="token", rollout_is_threshold=1.2
    )
    config = verl_actor_config(clip_ratio_low=0.2, clip_ratio_high=0.3)
    loss, metrics = verl_loss("geo_mean", t, "token-mean", config, weights=weights)
    out = ours("geo_mean", t, eps_low=0.2, eps_high=0.3, correction=sa.RolloutCorrection(high=1.2))
    scaled = out.loss * n_valid / B
    assert_close(scaled, loss, rtol=2e-8, atol=2e-8 * 1.35 * 1.2 * float(t["advantages"].abs().max()))
    assert_close(grad(scaled, t["logprobs"]), grad(loss, t["logprobs"]), **PLUS_EPS)
    assert_close(out.metrics["actor/ppo_kl"], metrics["actor/ppo_kl"], **PLUS_EPS)


# --------------------------------------------------------------------------- REINFORCE
@pytest.mark.parametrize("mode", ["seq-mean-token-sum", "token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("seed", SEEDS)
def test_reinforce_matches_verl_without_weights(seed, mode):
    # veRL's reinforce receives the rollout log-probs (bypass mode: π_old = μ); its ppo_kl is
    # mean(log μ − log π_θ), our actor/ppo_kl with old_logprobs := rollout_logprobs.
    t = inputs(seed)
    config = verl_actor_config()
    theirs = core_algos.compute_policy_loss_reinforce(
        t["rollout_logprobs"], t["logprobs"], t["advantages"], t["mask"].double(), mode, config
    )
    out = ours("reinforce", t, batch_kwargs={"old_logprobs": t["rollout_logprobs"]}, aggregation=mode)
    compare(out, theirs, t, tol(mode), metrics=("actor/ppo_kl",))


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("mode", ["seq-mean-token-sum", "token-mean"])
@pytest.mark.parametrize("seed", SEEDS)
def test_reinforce_with_is_weights_matches_verl(seed, mode, level):
    # Equivalent setup: veRL's bypass mode computes the IS weights with old_log_prob := log_prob
    # (current policy, detached), i.e. w = min(π_θ/μ, C); that is our RolloutCorrection with
    # numerator="current" and the same truncation. We pass veRL's precomputed weights to its
    # reinforce loss, and separately run the full bypass_mode loss, which does the same inside.
    t = inputs(seed)
    C = 1.5 if level == "token" else 2.0
    weights, _ = rollout_corr.compute_rollout_correction_weights(
        (t["logprobs"] - t["rollout_logprobs"]).detach(), t["mask"].double(), rollout_is=level, rollout_is_threshold=C
    )
    config = verl_actor_config()
    theirs = core_algos.compute_policy_loss_reinforce(
        t["rollout_logprobs"], t["logprobs"], t["advantages"], t["mask"].double(), mode, config, weights
    )
    correction = sa.RolloutCorrection(level=level, mode="truncate", high=C, numerator="current")
    out = ours(
        "reinforce", t, batch_kwargs={"old_logprobs": t["rollout_logprobs"]}, aggregation=mode, correction=correction
    )
    compare(out, theirs, t, EXACT, metrics=("actor/ppo_kl",))
    assert_close(
        out.metrics["rollout_corr/rollout_is_mean"], theirs[0].new_tensor(float(weights[t["mask"]].mean())), **EXACT
    )

    from verl.trainer.config.algorithm import RolloutCorrectionConfig
    from verl.workers.config.actor import PolicyLossConfig

    rc = RolloutCorrectionConfig(rollout_is=level, rollout_is_threshold=C, loss_type="reinforce", bypass_mode=True)
    bypass_config = verl_actor_config(policy_loss=PolicyLossConfig(loss_mode="bypass_mode", rollout_correction=rc))
    bypass = verl_loss("bypass_mode", t, mode, bypass_config, old=t["rollout_logprobs"])
    compare(out, bypass, t, EXACT, metrics=("actor/ppo_kl", "rollout_corr/kl"))


@pytest.mark.parametrize("seed", SEEDS)
def test_reinforce_bypass_rejection_matches_exclude_rejected(seed):
    # veRL's bypass mode with rejection only (token_k1 on π_θ/μ): rejected tokens leave the loss
    # mask. Ours: a k1 gate on the current policy, weight "none", exclude_rejected=True.
    from verl.trainer.config.algorithm import RolloutCorrectionConfig
    from verl.workers.config.actor import PolicyLossConfig

    t = inputs(seed)
    rc = RolloutCorrectionConfig(
        rollout_is=None, rollout_rs="token_k1", rollout_rs_threshold="0.75_1.2", loss_type="reinforce", bypass_mode=True
    )
    config = verl_actor_config(policy_loss=PolicyLossConfig(loss_mode="bypass_mode", rollout_correction=rc))
    theirs = verl_loss("bypass_mode", t, "token-mean", config, old=t["rollout_logprobs"])
    correction = sa.RolloutCorrection(
        mode="mask",
        statistic="k1",
        low=math.log(0.75),
        high=math.log(1.2),
        numerator="current",
        weight="none",
        exclude_rejected=True,
    )
    out = ours("reinforce", t, batch_kwargs={"old_logprobs": t["rollout_logprobs"]}, correction=correction)
    # veRL's actor metrics are then over the surviving tokens; ours over every valid token (ppo_kl
    # recomputed on the survivors to compare).
    compare(out, theirs, t, EXACT, metrics=())
    keep = t["mask"] & ~correction(sa.PolicyBatch(**{**t, "old_logprobs": t["rollout_logprobs"]})).rejected
    kl = approx_kl(t["logprobs"], t["rollout_logprobs"], keep)
    assert_close(kl, theirs[1]["actor/ppo_kl"], **PLUS_EPS)
    assert_close(
        out.metrics["rollout_corr/rollout_rs_masked_fraction"],
        theirs[1]["rollout_corr/rollout_rs_masked_fraction"],
        **FRACTION,
    )
    assert 0 < out.metrics["rollout_corr/rollout_rs_masked_fraction"] < 1


# --------------------------------------------------------------------------- IS weights
IS_CASES = {
    # name: (veRL rollout_is, rollout_is_threshold, our RolloutCorrection)
    "token-tis": ("token", 1.2, sa.RolloutCorrection(level="token", mode="truncate", high=1.2)),
    "seq-tis": ("sequence", 2.0, sa.RolloutCorrection(level="sequence", mode="truncate", high=2.0)),
    "token-icepop": ("token", "0.8_1.25", sa.RolloutCorrection(level="token", mode="mask", low=0.8, high=1.25)),
    "seq-icepop": ("sequence", "0.5_2.0", sa.RolloutCorrection(level="sequence", mode="mask", low=0.5, high=2.0)),
}


@pytest.mark.parametrize("case", list(IS_CASES))
@pytest.mark.parametrize("seed", SEEDS)
def test_correction_weights_match_verl(seed, case):
    level, threshold, correction = IS_CASES[case]
    t = inputs(seed)
    mask = t["mask"]
    weights, metrics = rollout_corr.compute_rollout_correction_weights(
        t["old_logprobs"] - t["rollout_logprobs"], mask.double(), rollout_is=level, rollout_is_threshold=threshold
    )
    result = correction(sa.PolicyBatch(**t))
    assert_close(result.weights, weights, **EXACT)
    if correction.mode == "mask":
        assert torch.equal(result.rejected, (weights == 0) & mask)
        assert 0 < int(result.rejected.sum()) < int(mask.sum())
    else:
        assert not result.rejected.any()
    m = result.metrics
    assert_close(m["rollout_corr/rollout_is_mean"], metrics["rollout_is_mean"], **PLUS_EPS)
    # veRL's ESS divides by (mean + 1e-8): a relative difference of order 2e-8 / mean.
    assert_close(m["rollout_corr/rollout_is_eff_sample_size"], metrics["rollout_is_eff_sample_size"], rtol=1e-7, atol=0)
    if level == "token":
        # Sequence-level max/min/fractions are computed differently on purpose (veRL: over raw
        # log-ratios of every row, fully masked ones included; ours: applied weights, valid rows).
        for key in ("max", "min", "std", "ratio_fraction_high"):
            assert_close(m[f"rollout_corr/rollout_is_{key}"], metrics[f"rollout_is_{key}"], **FRACTION)
        if correction.low is not None:
            assert_close(
                m["rollout_corr/rollout_is_ratio_fraction_low"], metrics["rollout_is_ratio_fraction_low"], **FRACTION
            )
    off = rollout_corr.compute_offpolicy_metrics(t["old_logprobs"], t["rollout_logprobs"], mask.double())
    assert_close(m["rollout_corr/kl"], off["kl"], rtol=1e-8, atol=1e-12)  # veRL: masked_mean with +1e-8
    assert_close(m["rollout_corr/k3_kl"], off["k3_kl"], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("loss_name", ["vanilla", "cispo"])
@pytest.mark.parametrize("case", list(IS_CASES))
@pytest.mark.parametrize("seed", SEEDS)
def test_correction_weights_effect_on_loss(seed, case, loss_name):
    level, threshold, correction = IS_CASES[case]
    t = inputs(seed)
    weights, _ = rollout_corr.compute_rollout_correction_weights(
        t["old_logprobs"] - t["rollout_logprobs"], t["mask"].double(), rollout_is=level, rollout_is_threshold=threshold
    )
    config = verl_actor_config(clip_ratio_low=0.2, clip_ratio_high=0.28)
    theirs = verl_loss(loss_name, t, "seq-mean-token-sum", config, weights=weights)
    name, extra = ("ppo", {"dual_clip": 3.0}) if loss_name == "vanilla" else ("cispo", {})
    out = ours(name, t, aggregation="seq-mean-token-sum", eps_low=0.2, eps_high=0.28, correction=correction, **extra)
    compare(out, theirs, t, EXACT, metrics=("actor/pg_clipfrac", "actor/ppo_kl"))


# --------------------------------------------------------------------------- rejection sampling
RS_CASES = {
    # veRL option: (threshold spec, our RolloutCorrection gating the same statistic)
    # k1 = log μ − log π_old = −log w: veRL's "lo_hi" are bounds on the *ratio* μ/π_old, i.e.
    # log lo ≤ k1 ≤ log hi; equivalently w = π_old/μ ∈ [1/hi, 1/lo] (see the ratio case below).
    "token_k1": ("0.75_1.2", dict(level="token", statistic="k1", low=math.log(0.75), high=math.log(1.2))),
    "token_k2": (0.02, dict(level="token", statistic="k2", high=0.02)),
    "token_k3": (0.02, dict(level="token", statistic="k3", high=0.02)),
    "seq_sum_k1": ("0.6_1.6", dict(level="sequence", statistic="k1", low=math.log(0.6), high=math.log(1.6))),
    "seq_sum_k2": (0.2, dict(level="sequence", statistic="k2", high=0.2)),
    "seq_sum_k3": (0.2, dict(level="sequence", statistic="k3", high=0.2)),
    "seq_mean_k1": ("0.87_1.1", dict(level="geometric", statistic="k1", low=math.log(0.87), high=math.log(1.1))),
    "seq_mean_k2": (0.04, dict(level="geometric", statistic="k2", high=0.04)),
    "seq_mean_k3": (0.04, dict(level="geometric", statistic="k3", high=0.04)),
}


@pytest.mark.parametrize("option", list(RS_CASES))
@pytest.mark.parametrize("seed", SEEDS)
def test_rejection_mask_matches_verl(seed, option):
    threshold, settings = RS_CASES[option]
    t = inputs(seed)
    mask = t["mask"]
    new_mask, metrics = rollout_corr.compute_rollout_rejection_mask(
        t["old_logprobs"] - t["rollout_logprobs"], mask.double(), rollout_rs=option, rollout_rs_threshold=threshold
    )
    their_rejected = mask & (new_mask == 0)
    result = sa.RolloutCorrection(mode="mask", **settings)(sa.PolicyBatch(**t))
    assert torch.equal(result.rejected, their_rejected)
    assert torch.equal(result.rejected, (result.weights == 0) & mask)
    assert 0 < int(their_rejected.sum()) < int(mask.sum()), "threshold should reject some tokens, not all"
    assert_close(
        result.metrics["rollout_corr/rollout_rs_masked_fraction"], metrics["rollout_rs_masked_fraction"], **FRACTION
    )
    # veRL's seq fraction averages over every row (a fully masked row counts as kept); ours over
    # sequences with a valid token.
    B, n_valid = mask.shape[0], int(mask.any(-1).sum())
    assert_close(
        result.metrics["rollout_corr/rollout_rs_seq_masked_fraction"] * n_valid / B,
        metrics["rollout_rs_seq_masked_fraction"],
        **FRACTION,
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_token_k1_bounds_as_ratio_bounds(seed):
    # The same token_k1 filter written as a ratio gate: k1 ∈ [log lo, log hi] ⇔ π_old/μ ∈ [1/hi, 1/lo].
    t = inputs(seed)
    new_mask, _ = rollout_corr.compute_rollout_rejection_mask(
        t["old_logprobs"] - t["rollout_logprobs"],
        t["mask"].double(),
        rollout_rs="token_k1",
        rollout_rs_threshold="0.7_1.2",
    )
    result = sa.RolloutCorrection(mode="mask", low=1 / 1.2, high=1 / 0.7)(sa.PolicyBatch(**t))
    assert torch.equal(result.rejected, t["mask"] & (new_mask == 0))


@pytest.mark.parametrize("option", ["token_k1", "seq_sum_k3", "seq_mean_k1"])
@pytest.mark.parametrize("seed", SEEDS)
def test_rejection_effect_on_loss(seed, option):
    # veRL applies rejection by shrinking response_mask (rejected tokens leave the denominator):
    # our exclude_rejected=True with weight "none".
    threshold, settings = RS_CASES[option]
    t = inputs(seed)
    new_mask, _ = rollout_corr.compute_rollout_rejection_mask(
        t["old_logprobs"] - t["rollout_logprobs"], t["mask"].double(), rollout_rs=option, rollout_rs_threshold=threshold
    )
    config = verl_actor_config(clip_ratio_low=0.2, clip_ratio_high=0.28)
    theirs = verl_loss("vanilla", t, "token-mean", config, mask=new_mask)
    correction = sa.RolloutCorrection(mode="mask", weight="none", exclude_rejected=True, **settings)
    out = ours("ppo", t, eps_low=0.2, eps_high=0.28, dual_clip=3.0, correction=correction)
    # Loss and gradient only: veRL's clip-fraction / KL metrics are then over the surviving tokens.
    compare(out, theirs, t, EXACT, metrics=())
