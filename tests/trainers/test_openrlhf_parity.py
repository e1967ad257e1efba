"""Parity with the installed OpenRLHF ``PolicyLoss``: every constructor combination it accepts.

For each combination of ``policy_loss_type`` (ppo / gspo) × ``dual_clip`` (None / 3) ×
``token_level_loss`` × ``is_correction_level`` (off / token / seq) × ``is_correction_mode``
(mask / clip) × ``is_correction_gating`` (ratio / binary_kl / tv) that its constructor accepts,
we build the equivalent stable-async loss + `RolloutCorrection` and compare, on fp64 random
inputs, the loss value, its gradient w.r.t. ``log_probs`` and the four metrics.

Mapping (read from ``openrlhf/models/loss.py``):

* ``token_level_loss=True`` ↔ aggregation ``token-mean``; ``False`` (and always for gspo) ↔
  ``seq-mean-token-mean``. Global counts ``batch_num_tokens`` / ``global_batch_size`` /
  ``dp_size`` ↔ ``PolicyBatch(global_num_tokens, global_num_seqs, dp_size)``.
* ppo + correction: the IS ratio is π_old/μ (our ``numerator="old"``).
  - clip mode (token, ratio gate) ↔ ``mode="truncate", low, high`` (a two-sided clamp);
  - mask mode ↔ ``mode="mask"`` with ``weight="token"`` (survivors keep the per-token ratio);
    the seq level gates the geometric-mean ratio or the plain mean of a divergence ↔ our
    ``level="geometric"``; ``binary_kl`` / ``tv`` ↔ ``statistic="binary_kl"`` / ``"binary_tv"``
    with ``divergence_eps=1e-6`` (OpenRLHF clamps both probabilities to [1e-6, 1 − 1e-6]).
* gspo + correction: OpenRLHF only replaces the GSPO ratio by π_θ/μ (no IS coefficient) ↔ our
  ``gspo`` on a batch with ``old_logprobs := rollout_logprobs``; its dual clip ↔ our
  ``GSPOConfig.dual_clip``.
* metrics: ``clip_ratio`` ↔ ``actor/pg_clipfrac``; ``ppo_kl`` ↔ ``actor/ppo_kl`` (for gspo with
  a correction OpenRLHF still measures it against the real old policy: compared with
  ``approx_kl(log_probs, old)``); ``vllm_kl`` ↔ ``rollout_corr/kl``; ``is_filter_ratio`` ↔
  ``rollout_rs_masked_fraction`` (token mask), ``truncated_fraction`` (token clip),
  ``rollout_rs_seq_masked_fraction`` (seq mask; OpenRLHF averages over every row and counts a
  fully masked row as filtered, its statistic being 0/0 = NaN: compared accordingly).

Tolerances: exact is ``rtol = 1e-10``. OpenRLHF's per-sample mode divides by ``count + 1e-8``
where we divide by the count (deliberate, see ``stable_async.aggregate``): per element a relative
1e-8 / count, and for the loss (a mean of per-sequence terms of both signs) an absolute
``2e-8 · max |per-sequence term|``. Fractions are float32 means: ``rtol = 1e-6``.
"""

from __future__ import annotations

import pytest
import torch

import stable_async as sa
from openrlhf_cases import CLIP_EPS, accepted_combinations, combo_id
from sa_testing import load_openrlhf_loss_module, random_logprobs, random_mask
from stable_async.diagnostics import approx_kl

pytestmark = pytest.mark.trainers

loss_module = load_openrlhf_loss_module()
PolicyLoss = loss_module.PolicyLoss

EXACT = {"rtol": 1e-10, "atol": 1e-13}
PLUS_EPS = {"rtol": 2e-8, "atol": 1e-13}
FRACTION = {"rtol": 1e-6, "atol": 1e-7}
STATISTIC = {"ratio": "ratio", "binary_kl": "binary_kl", "tv": "binary_tv"}


def inputs(seed: int, *, B: int = 7, T: int = 10, spread: float = 0.5, empty_row: bool = True) -> dict:
    """fp64 random tensors with right-padded masks, row 2 fully masked, and three tokens whose
    probabilities are at or within 1e-6 of 1 (where OpenRLHF's probability clamp matters)."""
    g = torch.Generator().manual_seed(seed)
    lp = random_logprobs((B, T), g)
    old = (lp + spread * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp(max=-1e-3)
    rollout = (old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp(max=-1e-3)
    mask = random_mask(B, T, g)  # every row has ≥ 1 token, so column 0 is valid
    # π_old = 1 exactly vs μ = 1 − 1e-4: an exact binary KL is infinite, OpenRLHF's clamped one is not.
    lp[0, 0], old[0, 0], rollout[0, 0] = -1e-3, 0.0, -1e-4
    lp[1, 0], old[1, 0], rollout[1, 0] = -1e-3, -1e-9, -1e-7
    lp[3, 0], old[3, 0], rollout[3, 0] = -1e-3, -1e-7, 0.0
    if empty_row:
        mask[2] = False
    return {
        "logprobs": lp.requires_grad_(True),
        "old_logprobs": old,
        "rollout_logprobs": rollout,
        "advantages": torch.randn(B, T, generator=g, dtype=torch.float64),
        "mask": mask,
    }


def assert_close(ours, theirs, **tolerance) -> None:
    torch.testing.assert_close(
        torch.as_tensor(ours, dtype=torch.float64), torch.as_tensor(theirs, dtype=torch.float64), **tolerance
    )


def grad(loss: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, leaf, retain_graph=True)
    return g


COMBINATIONS = accepted_combinations(PolicyLoss)


def equivalent(kwargs: dict, t: dict) -> tuple[str, dict, dict]:
    """(loss name, config kwargs, batch overrides) of the stable-async equivalent."""
    loss_type, level = kwargs["policy_loss_type"], kwargs["is_correction_level"]
    config = {"eps_low": kwargs["clip_eps_low"], "eps_high": kwargs["clip_eps_high"], "dual_clip": kwargs["dual_clip"]}
    batch = {}
    if loss_type == "gspo":
        config["aggregation"] = "seq-mean-token-mean"
        if level != "off":
            batch["old_logprobs"] = t["rollout_logprobs"]
        return "gspo", config, batch
    config["aggregation"] = "token-mean" if kwargs["token_level_loss"] else "seq-mean-token-mean"
    if level == "off":
        return "ppo", config, batch
    low, high = kwargs["is_correction_threshold"]
    if kwargs["is_correction_mode"] == "clip":
        config["correction"] = sa.RolloutCorrection(level="token", mode="truncate", low=low, high=high)
    else:
        statistic = STATISTIC[kwargs["is_correction_gating"]]
        config["correction"] = sa.RolloutCorrection(
            level="token" if level == "token" else "geometric",
            mode="mask",
            low=low,
            high=high,
            statistic=statistic,
            weight="token",
            divergence_eps=0.0 if statistic == "ratio" else 1e-6,
        )
    return "ppo", config, batch


CASES = {"s0-local": (0, False, True), "s1-global": (1, True, True), "s2-no-empty-row": (2, False, False)}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kwargs", COMBINATIONS, ids=combo_id)
def test_policy_loss_combination(kwargs, case):
    seed, dp, empty_row = CASES[case]
    t = inputs(seed, empty_row=empty_row)
    mask, lp = t["mask"], t["logprobs"]
    counts = {}
    if dp:
        counts = {"dp_size": 4, "batch_num_tokens": float(mask.sum() * 3 + 2), "global_batch_size": 3 * 6 + 1.0}
    loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio = PolicyLoss(**kwargs)(
        lp, t["old_logprobs"], t["advantages"], mask.double(), rollout_log_probs=t["rollout_logprobs"], **counts
    )

    name, config, overrides = equivalent(kwargs, t)
    batch = sa.PolicyBatch(
        **{**t, **overrides},
        global_num_tokens=counts.get("batch_num_tokens"),
        global_num_seqs=counts.get("global_batch_size"),
        dp_size=counts.get("dp_size", 1),
    )
    out = sa.get_loss(name, **config)(batch)

    per_sample = config["aggregation"] == "seq-mean-token-mean"
    tolerance = dict(PLUS_EPS if per_sample else EXACT)
    grad_tolerance = dict(tolerance)
    if per_sample:
        m = mask.double()
        tolerance["atol"] = 2e-8 * float(((out.per_token_loss.abs() * m).sum(-1) / m.sum(-1).clamp(min=1)).max())
    assert_close(out.loss, loss, **tolerance)
    assert_close(grad(out.loss, lp), grad(loss, lp), **grad_tolerance)

    m = out.metrics
    assert_close(m["actor/pg_clipfrac"], clip_ratio, **FRACTION)
    kl_old = approx_kl(lp, t["old_logprobs"], mask)
    assert_close(kl_old, ppo_kl, **EXACT)
    if "old_logprobs" not in overrides:
        assert_close(m["actor/ppo_kl"], ppo_kl, **EXACT)

    corrected = kwargs["policy_loss_type"] == "ppo" and kwargs["is_correction_level"] != "off"
    if not corrected:
        assert vllm_kl is None and is_filter_ratio is None
        return
    assert_close(m["rollout_corr/kl"], vllm_kl, **EXACT)
    if kwargs["is_correction_mode"] == "clip":
        ours_filtered = m["rollout_corr/truncated_fraction"]
    elif kwargs["is_correction_level"] == "token":
        ours_filtered = m["rollout_corr/rollout_rs_masked_fraction"]
    else:
        B, n_valid = mask.shape[0], int(mask.any(-1).sum())
        ours_filtered = (m["rollout_corr/rollout_rs_seq_masked_fraction"] * n_valid + (B - n_valid)) / B
    assert_close(ours_filtered, is_filter_ratio, **FRACTION)


def test_combinations_cover_the_constructor():
    # 2 (type) × 2 (dual) × 2 (token_level) × [off: 2 modes × 3 gatings, of which clip+divergence
    # is rejected → 4; token: mask × 3 + clip × ratio = 4; seq: mask × 3 = 3] = 8 × 11.
    assert len(COMBINATIONS) == 88


@pytest.mark.parametrize("gating", ["ratio", "binary_kl", "tv"])
@pytest.mark.parametrize("level", ["token", "seq"])
def test_gates_filter_something(level, gating):
    # The thresholds are chosen so that every gate rejects some units and keeps others.
    t = inputs(0)
    kwargs = next(
        k
        for k in COMBINATIONS
        if k["policy_loss_type"] == "ppo"
        and k["is_correction_level"] == level
        and k["is_correction_mode"] == "mask"
        and k["is_correction_gating"] == gating
    )
    *_, is_filter_ratio = PolicyLoss(**kwargs)(
        t["logprobs"], t["old_logprobs"], t["advantages"], t["mask"].double(), rollout_log_probs=t["rollout_logprobs"]
    )
    assert 0.0 < float(is_filter_ratio) < 0.9


def test_exact_binary_kl_would_reject_a_certain_token():
    # Why divergence_eps exists: with π_old = 1 exactly (token [0, 0]) the exact binary KL is
    # infinite; OpenRLHF's clamped one is ~4e-4 and keeps the token.
    t = inputs(0)
    batch = sa.PolicyBatch(**t)
    exact = sa.RolloutCorrection(mode="mask", low=0.0, high=0.05, statistic="binary_kl")(batch)
    clamped = sa.RolloutCorrection(mode="mask", low=0.0, high=0.05, statistic="binary_kl", divergence_eps=1e-6)(batch)
    assert bool(exact.rejected[0, 0]) and not bool(clamped.rejected[0, 0])


def wide_inputs(seed: int) -> dict:
    """Sequences shifted as a whole by ±1.5 nats, so that PPO and GSPO ratios exceed the dual clip."""
    t = inputs(seed, empty_row=True)
    B = t["mask"].shape[0]
    shift = torch.tensor([1.5, -1.5, 0.0] * B, dtype=torch.float64)[:B].unsqueeze(-1)
    # log π − log π_old moves by +shift; the lower side moves down, so every log-prob stays <= 0.
    t["old_logprobs"] = t["old_logprobs"] - shift.clamp(min=0)
    t["rollout_logprobs"] = t["rollout_logprobs"] - shift.clamp(min=0)
    t["logprobs"] = (t["logprobs"].detach() + shift.clamp(max=0)).requires_grad_(True)
    return t


@pytest.mark.parametrize("level", ["off", "token"])
@pytest.mark.parametrize("loss_type", ["ppo", "gspo"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dual_clip_active(seed, loss_type, level):
    t = wide_inputs(seed)
    kwargs = dict(
        clip_eps_low=CLIP_EPS[loss_type][0],
        clip_eps_high=CLIP_EPS[loss_type][1],
        dual_clip=3.0,
        token_level_loss=False,
        policy_loss_type=loss_type,
        is_correction_level=level,
        is_correction_mode="mask",
        is_correction_gating="ratio",
        is_correction_threshold=(0.5, 2.0),
    )
    loss, clip_ratio, *_ = PolicyLoss(**kwargs)(
        t["logprobs"], t["old_logprobs"], t["advantages"], t["mask"].double(), rollout_log_probs=t["rollout_logprobs"]
    )
    name, config, overrides = equivalent(kwargs, t)
    out = sa.get_loss(name, **config)(sa.PolicyBatch(**{**t, **overrides}))
    assert out.metrics["actor/pg_clipfrac_lower"] > 0, "the dual clip should be active on these inputs"
    m = t["mask"].double()
    scale = float(((out.per_token_loss.abs() * m).sum(-1) / m.sum(-1).clamp(min=1)).max())
    assert_close(out.loss, loss, rtol=2e-8, atol=2e-8 * scale)
    assert_close(grad(out.loss, t["logprobs"]), grad(loss, t["logprobs"]), **PLUS_EPS)
    assert_close(out.metrics["actor/pg_clipfrac"], clip_ratio, **FRACTION)
