"""Table-driven bad input: every public function and class, each argument, bad values.

Each row calls the public API with one bad argument and checks the error type and that the
message names the argument (and so says what was expected). Issue 12's defects each have rows
that passed silently (or failed with a raw error) before: D3 global counts and ``dp_size``,
D5 NaN/inf hyperparameters, D6 strings and bools as flags and numbers, D8 errors that did not
name the argument (shapes, ids, devices, meta tensors), D9 one mask rule everywhere, log-probs > 0
and top-K masses > 1.
"""

from __future__ import annotations

import math

import pytest
import torch

import stable_async as sa
from stable_async import baselines, divergence
from stable_async.checks import ArgumentTypeError

F64 = torch.float64
NAN, INF = float("nan"), float("inf")
B, T, K, V = 3, 4, 2, 6


def lp(*shape, value=-1.0, device="cpu"):
    return torch.full(shape or (B, T), value, dtype=F64, device=device)


def mask(fill=True, *shape, device="cpu"):
    return torch.full(shape or (B, T), fill, dtype=torch.bool, device=device)


HALF_MASK = torch.full((B, T), 0.5, dtype=F64)  # D9: a 0.5 mask is rejected, never .bool()-ed
META_MASK = torch.ones(B, T, dtype=torch.bool, device="meta")  # D8: another device (no GPU needed)


def batch(**changes):
    topk = torch.log(torch.full((B, T, K), 0.3, dtype=F64))
    kwargs = dict(
        logprobs=lp().requires_grad_(True),
        advantages=torch.ones(B, dtype=F64),
        mask=mask(),
        old_logprobs=lp(value=-1.1),
        rollout_logprobs=lp(value=-1.2),
        rewards=torch.zeros(B, dtype=F64),
        group_ids=torch.arange(B),
        versions=torch.zeros(B, dtype=torch.long),
        current_version=1,
        topk_ids=torch.arange(K).expand(B, T, K).clone(),
        topk_logprobs=topk,
        current_topk_logprobs=topk.clone(),
    )
    kwargs.update(changes)
    return sa.PolicyBatch(**kwargs)


TYPE, VALUE = TypeError, ValueError
CASES: list[tuple[str, object, type, str]] = []


def case(case_id, fn, error, name):
    CASES.append((case_id, fn, error, name))


# ---------------------------------------------------------------------- PolicyBatch (D3, D6, D8, D9)
case("batch-logprobs-list", lambda: batch(logprobs=[[0.0]]), VALUE, "logprobs")
case("batch-logprobs-int", lambda: batch(logprobs=torch.zeros(B, T, dtype=torch.long)), VALUE, "logprobs")
case("batch-logprobs-3d", lambda: batch(logprobs=lp(B, T, 1)), VALUE, "logprobs")
case("batch-logprobs-meta-D8", lambda: batch(logprobs=lp(device="meta")), VALUE, "logprobs")
case("batch-logprobs-positive-D9", lambda: batch(logprobs=lp(value=0.5)), VALUE, "logprobs")
case("batch-old-positive-D9", lambda: batch(old_logprobs=lp(value=0.01)), VALUE, "old_logprobs")
case("batch-rollout-positive-D9", lambda: batch(rollout_logprobs=lp(value=3.0)), VALUE, "rollout_logprobs")
case("batch-advantages-shape", lambda: batch(advantages=torch.ones(B + 1, dtype=F64)), VALUE, "advantages")
case("batch-mask-half-D9", lambda: batch(mask=HALF_MASK), VALUE, "mask")
case("batch-mask-shape", lambda: batch(mask=mask(True, B, T + 1)), VALUE, "mask")
case("batch-mask-device-D8", lambda: batch(mask=META_MASK), VALUE, "mask")
case("batch-old-device-D8", lambda: batch(old_logprobs=lp(device="meta")), VALUE, "old_logprobs")
case("batch-rewards-nan", lambda: batch(rewards=torch.full((B,), NAN, dtype=F64)), VALUE, "rewards")
case("batch-group-ids-float", lambda: batch(group_ids=torch.zeros(B)), VALUE, "group_ids")
case("batch-versions-float-D6", lambda: batch(versions=torch.zeros(B)), VALUE, "versions")
case("batch-current-version-bool-D6", lambda: batch(current_version=True), VALUE, "current_version")
case("batch-current-version-float", lambda: batch(current_version=1.5), VALUE, "current_version")
case("batch-current-version-str", lambda: batch(current_version="3"), VALUE, "current_version")
case("batch-versions-without-current", lambda: batch(current_version=None), VALUE, "current_version")
case("batch-topk-ids-float", lambda: batch(topk_ids=torch.zeros(B, T, K)), VALUE, "topk_ids")
case("batch-topk-ids-negative-D8", lambda: batch(topk_ids=torch.full((B, T, K), -1)), VALUE, "topk_ids")
case("batch-topk-mass-above-1-D9", lambda: batch(topk_logprobs=lp(B, T, K, value=-0.1)), VALUE, "topk_logprobs")
case("batch-topk-positive-D9", lambda: batch(topk_logprobs=lp(B, T, K, value=0.2)), VALUE, "topk_logprobs")
case(
    "batch-current-topk-mass-D9",
    lambda: batch(current_topk_logprobs=lp(B, T, K, value=-0.05)),
    VALUE,
    "current_topk_logprobs",
)
case("batch-current-topk-K", lambda: batch(current_topk_logprobs=lp(B, T, K + 1, value=-3.0)), VALUE, "current_topk")
for bad, error in ((NAN, VALUE), (INF, VALUE), (-1.0, VALUE), (2.5, VALUE), ("12", TYPE), (True, TYPE), (2, VALUE)):
    # 2 < the 12 local valid tokens (D3: it scaled the loss ×6); NaN gave NaN gradients; inf gave 0.
    case(
        f"batch-global-num-tokens-{bad!r}-D3", lambda bad=bad: batch(global_num_tokens=bad), error, "global_num_tokens"
    )
for bad, error in ((NAN, VALUE), (INF, VALUE), (-1.0, VALUE), (0.5, VALUE), (True, TYPE), (1, VALUE)):
    case(f"batch-global-num-seqs-{bad!r}-D3", lambda bad=bad: batch(global_num_seqs=bad), error, "global_num_seqs")
for bad, error in ((0, VALUE), (-2, VALUE), (NAN, VALUE), (1.5, VALUE), (True, TYPE), ("2", TYPE)):
    case(f"batch-dp-size-{bad!r}-D3", lambda bad=bad: batch(dp_size=bad), error, "dp_size")
case("batch-check-finite-str-D6", lambda: batch(check_finite="no"), VALUE, "check_finite")
case("batch-check-finite-int-D6", lambda: batch(check_finite=1), VALUE, "check_finite")
case("batch-counts-from-mask-str", lambda: batch(global_counts_from_mask="yes"), VALUE, "global_counts_from_mask")

# ---------------------------------------------------------------------- aggregate (D3, D5, D8, D9)
LOSS = torch.ones(B, T, dtype=F64)
case("aggregate-mode", lambda: sa.aggregate(LOSS, mask(), "mean"), VALUE, "mode")
case("aggregate-loss-int", lambda: sa.aggregate(torch.ones(B, T, dtype=torch.long), mask()), TYPE, "loss_mat")
case("aggregate-mask-list", lambda: sa.aggregate(LOSS, [[1]]), TYPE, "mask")
case("aggregate-mask-half-D9", lambda: sa.aggregate(LOSS, HALF_MASK), VALUE, "mask")
case("aggregate-mask-two-D9", lambda: sa.aggregate(LOSS, 2 * mask().to(F64)), VALUE, "mask")
case("aggregate-mask-device-D8", lambda: sa.aggregate(LOSS, META_MASK), VALUE, "mask")
case("aggregate-loss-meta-D8", lambda: sa.aggregate(LOSS.to("meta"), META_MASK), VALUE, "loss_mat")
for bad, error in ((NAN, VALUE), (INF, VALUE), (0, VALUE), (2, VALUE), (-1, VALUE), (True, TYPE)):
    case(
        f"aggregate-global-num-tokens-{bad!r}-D3",
        lambda bad=bad: sa.aggregate(LOSS, mask(), global_num_tokens=bad),
        error,
        "global_num_tokens",
    )
case(
    "aggregate-global-num-seqs-below-local-D3",
    lambda: sa.aggregate(LOSS, mask(), "seq-mean-token-mean", global_num_seqs=1),
    VALUE,
    "global_num_seqs",
)
for bad, error in ((-2, VALUE), (0, VALUE), (NAN, VALUE), (1.5, VALUE), (True, TYPE)):
    case(f"aggregate-dp-size-{bad!r}-D3", lambda bad=bad: sa.aggregate(LOSS, mask(), dp_size=bad), error, "dp_size")
for bad, error in ((NAN, VALUE), (INF, VALUE), ("4", TYPE), (0, VALUE), (-3.0, VALUE), (True, TYPE)):
    case(
        f"aggregate-norm-length-{bad!r}-D5-D8",
        lambda bad=bad: sa.aggregate(LOSS, mask(), "seq-mean-token-sum-norm", norm_length=bad),
        error,
        "norm_length",
    )

# ---------------------------------------------------------------------- effective_sample_size (D5, D8, D9)
LW = torch.zeros(B, T, dtype=F64)
case("ess-log-weights-list", lambda: sa.effective_sample_size([0.0]), TYPE, "log_weights")
case("ess-log-weights-int", lambda: sa.effective_sample_size(torch.zeros(B, T, dtype=torch.long)), TYPE, "log_weights")
case("ess-log-weights-3d", lambda: sa.effective_sample_size(torch.zeros(B, T, 2)), VALUE, "log_weights")
case("ess-log-weights-meta-D8", lambda: sa.effective_sample_size(LW.to("meta")), VALUE, "log_weights")
case("ess-mask-half-D9", lambda: sa.effective_sample_size(LW, HALF_MASK), VALUE, "mask")
case("ess-mask-shape", lambda: sa.effective_sample_size(LW, mask(True, B, T + 1)), VALUE, "mask")
case("ess-mask-device-D8", lambda: sa.effective_sample_size(LW, META_MASK), VALUE, "mask")
case("ess-level", lambda: sa.effective_sample_size(LW, level="batch"), VALUE, "level")
for bad, error in ((NAN, VALUE), (INF, VALUE), ("1", TYPE), (True, TYPE)):
    # D5: max_log_weight=nan gave ESS 0 with ess_ratio 1 (full lr under ESS-LR).
    case(
        f"ess-max-log-weight-{bad!r}-D5",
        lambda bad=bad: sa.effective_sample_size(LW, max_log_weight=bad),
        error,
        "max_log_weight",
    )
case("ess-result-metrics-prefix-D6", lambda: sa.ESSResult(1.0, 1.0, 1.0).metrics(prefix=None), TYPE, "prefix")

# ---------------------------------------------------------------------- RolloutCorrection (D5, D6)
for field, bad, error in (
    ("level", "batch", VALUE),
    ("mode", "clip", VALUE),
    ("statistic", "kl", VALUE),
    ("numerator", "new", VALUE),
    ("weight", "all", VALUE),
    ("exclude_rejected", "false", TYPE),  # D6: "false" is truthy: it excluded
    ("exclude_rejected", 1, TYPE),
    ("prefix", None, TYPE),  # D6
    ("prefix", 3, TYPE),
    ("high", NAN, VALUE),
    ("high", INF, VALUE),
    ("high", True, TYPE),
    ("high", "2", TYPE),
    ("high", -1.0, VALUE),
    ("low", NAN, VALUE),
    ("divergence_eps", 0.5, VALUE),
    ("divergence_eps", -0.1, VALUE),
    ("divergence_eps", NAN, VALUE),
    ("divergence_eps", True, TYPE),
):
    case(f"correction-{field}-{bad!r}", lambda f=field, b=bad: sa.RolloutCorrection(**{f: b}), error, field)
case("correction-low-above-high", lambda: sa.RolloutCorrection(low=3.0, high=2.0), VALUE, "low")
case("icepop-low-bool", lambda: sa.icepop(low=True), TYPE, "low")
case("token-tis-high-str", lambda: sa.token_tis(high="2"), TYPE, "high")
case("sequence-mask-exclude-str", lambda: sa.sequence_mask(exclude_rejected="no"), TYPE, "exclude_rejected")

# ---------------------------------------------------------------------- loss configs (D5, D6, D9)
COMMON = [
    ("aggregation", "mean", VALUE),
    ("aggregation", 3, TYPE),
    ("norm_length", NAN, VALUE),
    ("norm_length", INF, VALUE),
    ("norm_length", "4", TYPE),
    ("norm_length", 0, VALUE),
    ("correction", "tis", TYPE),
]
CLIP = [
    ("eps_low", 1.5, VALUE),  # D9: a negative lower clip bound 1 − 1.5
    ("eps_low", True, TYPE),  # D6
    ("eps_low", NAN, VALUE),
    ("eps_low", "0.2", TYPE),
    ("eps_high", -0.1, VALUE),
    ("eps_high", INF, VALUE),
    ("dual_clip", True, TYPE),  # D6
    ("dual_clip", "3", TYPE),  # D8: it was a raw "'>' not supported"
    ("dual_clip", 0.5, VALUE),
    ("dual_clip", NAN, VALUE),
]
PER_LOSS = {
    "ppo": [
        *CLIP,
        ("ratio_cap", 0, VALUE),
        ("ratio_cap", NAN, VALUE),
        ("ratio_cap", True, TYPE),
        ("compile", "yes", TYPE),
    ],
    "gspo": [*CLIP, ("compile", 1, TYPE)],
    "gspo_token": CLIP,
    "decoupled_ppo": [
        *CLIP,
        ("behavior_cap", 1.0, VALUE),
        ("behavior_cap", True, TYPE),
        ("behavior_cap", NAN, VALUE),
        ("behavior_cap_mode", "clip", VALUE),
        ("proximal", "exact", VALUE),
    ],
    "cispo": [("eps_low", -1.0, VALUE), ("eps_high", NAN, VALUE), ("eps_high", True, TYPE)],
    "geo_mean": [("eps_low", INF, VALUE), ("eps_high", "0.4", TYPE)],
    "sapo": [("tau_pos", 0, VALUE), ("tau_neg", NAN, VALUE), ("tau_pos", True, TYPE)],
    "m2po": [
        ("m2_threshold", NAN, VALUE),
        ("m2_threshold", -1, VALUE),
        ("m2_threshold", True, TYPE),
        ("numerator", "current!", VALUE),
        ("scope", "world", VALUE),
    ],
    "dppo_binary_tv": [
        ("delta_low", 0, VALUE),
        ("delta_high", NAN, VALUE),
        ("delta_low", True, TYPE),
        ("delta_high", "0.1", TYPE),
        ("anchor", "new", VALUE),
        ("ratio_cap", -1, VALUE),
    ],
    "dppo_topk_kl": [("delta_low", -0.1, VALUE), ("ratio_cap", True, TYPE)],
    "vcpo": [("ratio_cap", 0, VALUE), ("ratio_cap", INF, VALUE), ("anchor", "behavior", VALUE)],
    "delight": [
        ("eta", 0, VALUE),
        ("eta", NAN, VALUE),
        ("eta", True, TYPE),
        ("level", "batch", VALUE),
        ("surprisal_clip", 0, VALUE),
        ("surprisal_clip", NAN, VALUE),
    ],
}
for loss_name in sa.available_losses():
    for field, bad, error in COMMON + PER_LOSS.get(loss_name, []):
        case(
            f"loss-{loss_name}-{field}-{bad!r}",
            lambda n=loss_name, f=field, b=bad: sa.get_loss(n, **{f: b}),
            error,
            field,
        )

# ---------------------------------------------------------------------- delight_gate (D8, D9)
ADV = torch.ones(B, T, dtype=F64)
case("delight-gate-shape-D8", lambda: sa.delight_gate(torch.ones(B, T + 1, dtype=F64), lp()), VALUE, "advantages")
case("delight-gate-mask-half-D9", lambda: sa.delight_gate(ADV, lp(), mask=HALF_MASK), VALUE, "mask")
case("delight-gate-mask-device-D8", lambda: sa.delight_gate(ADV, lp(), mask=META_MASK), VALUE, "mask")
case("delight-gate-logprobs-meta-D8", lambda: sa.delight_gate(ADV.to("meta"), lp(device="meta")), VALUE, "logprobs")
case("delight-gate-eta-bool", lambda: sa.delight_gate(ADV, lp(), eta=True), TYPE, "eta")
case("delight-gate-level", lambda: sa.delight_gate(ADV, lp(), level="batch"), VALUE, "level")

# ---------------------------------------------------------------------- divergence (D5, D8)
P, Q = lp(), lp(value=-2.0)
for bad, error in ((-1.0, VALUE), (0.7, VALUE), (0.5, VALUE), (NAN, VALUE), (True, TYPE), ("0.1", TYPE)):
    # D5: eps=0.7 returned 0 where the KL is 2.04.
    case(f"binary-kl-eps-{bad!r}-D5", lambda bad=bad: divergence.binary_kl(P, Q, eps=bad), error, "eps")
TOPK = torch.log(torch.full((B, T, K), 0.2, dtype=F64))
case("topk-tv-shape", lambda: divergence.topk_tv(TOPK, TOPK[..., :1]), VALUE, "topk_logprobs")
case("topk-kl-device-D8", lambda: divergence.topk_kl(TOPK, TOPK.to("meta")), VALUE, "rollout_topk_logprobs")
LOGITS = torch.zeros(B, T, V, dtype=F64)
case(
    "gather-ids-too-large-D8",
    lambda: divergence.gather_topk_logprobs(LOGITS, torch.full((B, T, K), V)),
    VALUE,
    "topk_ids",
)
case(
    "gather-ids-negative-D8",
    lambda: divergence.gather_topk_logprobs(LOGITS, torch.full((B, T, K), -1)),
    VALUE,
    "topk_ids",
)
case("gather-ids-float", lambda: divergence.gather_topk_logprobs(LOGITS, torch.zeros(B, T, K)), VALUE, "topk_ids")
case(
    "gather-ids-device-D8",
    lambda: divergence.gather_topk_logprobs(LOGITS, torch.zeros(B, T, K, dtype=torch.long, device="meta")),
    VALUE,
    "topk_ids",
)
for bad, error in ((0, VALUE), (True, TYPE), (1.5, TYPE)):
    case(
        f"gather-chunk-rows-{bad!r}",
        lambda bad=bad: divergence.gather_topk_logprobs(LOGITS, torch.zeros(B, T, K, dtype=torch.long), chunk_rows=bad),
        error,
        "chunk_rows",
    )

# ---------------------------------------------------------------------- baselines (D5, D6, D8, D9)
R = torch.tensor([1.0, 0.0, 1.0], dtype=F64)
G = torch.tensor([0, 0, 1])
SQ = torch.ones(B, dtype=F64)
case("group-mean-rewards-int", lambda: baselines.group_mean_baseline(torch.ones(B, dtype=torch.long)), TYPE, "rewards")
case("rloo-group-ids-float", lambda: baselines.rloo_baseline(R, torch.zeros(B)), TYPE, "group_ids")
case("opob-mode", lambda: baselines.min_variance_baseline(R, G, mode="best", grad_sq_norms=SQ), VALUE, "mode")
case("opob-scope", lambda: baselines.min_variance_baseline(R, G, scope="world", grad_sq_norms=SQ), VALUE, "scope")
for bad, error in ((NAN, VALUE), (0, VALUE), (True, TYPE), ("8", TYPE)):
    case(
        f"opob-ratio-cap-{bad!r}-D5",
        lambda bad=bad: baselines.min_variance_baseline(R, G, grad_sq_norms=SQ, ratio_cap=bad),
        error,
        "ratio_cap",
    )
case(
    "opob-length-normalized-str-D6",
    lambda: baselines.min_variance_baseline(R, G, grad_sq_norms=SQ, length_normalized="yes"),
    TYPE,
    "length_normalized",
)
case("opob-grad-sq-negative", lambda: baselines.min_variance_baseline(R, G, grad_sq_norms=-SQ), VALUE, "grad_sq_norms")
case("length-grad-mask-half-D9", lambda: baselines.length_grad_sq_norms(HALF_MASK), VALUE, "mask")
case("length-grad-mask-1d", lambda: baselines.length_grad_sq_norms(torch.ones(B, dtype=torch.bool)), VALUE, "mask")
case(
    "logit-grad-mask-half-D9",
    lambda: baselines.logit_grad_sq_norms(LOGITS, torch.zeros(B, T, dtype=torch.long), HALF_MASK),
    VALUE,
    "mask",
)
case(
    "logit-grad-ids-range-D8",
    lambda: baselines.logit_grad_sq_norms(LOGITS, torch.full((B, T), V)),
    VALUE,
    "token_ids",
)
case(
    "per-seq-grad-mask-half-D9",
    lambda: baselines.per_sequence_grad_sq_norms(
        lp().requires_grad_(True), [torch.zeros(1, requires_grad=True)], HALF_MASK
    ),
    VALUE,
    "mask",
)


# ---------------------------------------------------------------------- optimizer side
def sgd():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)


for field, bad, error in (
    ("rule", "cube", VALUE),
    ("base_ratio", NAN, VALUE),
    ("base_ratio", 0, VALUE),
    ("base_ratio", True, VALUE),
    ("min_scale", NAN, VALUE),
    ("min_scale", 2.0, VALUE),
    ("min_scale", True, VALUE),
    ("on_missing", "never", VALUE),
):
    case(f"ess-lr-{field}-{bad!r}", lambda f=field, b=bad: sa.ESSScaledLR(sgd(), **{f: b}), error, field)
for bad, error in ((NAN, VALUE), (1.5, VALUE), (-0.1, VALUE), (True, TYPE), ("0.5", TYPE)):
    case(f"ess-lr-step-{bad!r}", lambda bad=bad: sa.ESSScaledLR(sgd()).step(bad), error, "ess_ratio")
case("ess-lr-optimizer", lambda: sa.ESSScaledLR(object()), TYPE, "optimizer")
case("accumulator-mask-half-D9", lambda: sa.StepAccumulator().record_log_weights(LW, HALF_MASK), VALUE, "mask")
case("accumulator-mask-device-D8", lambda: sa.StepAccumulator().record_log_weights(LW, META_MASK), VALUE, "mask")
case("accumulator-record-tensor", lambda: sa.StepAccumulator().record(LW), TYPE, "batch")
case("stable-step-ess-lr-str-D6", lambda: sa.StableStep(sgd(), ess_lr="false"), TYPE, "ess_lr")
case("stable-step-accumulator", lambda: sa.StableStep(sgd(), accumulator=[]), TYPE, "accumulator")
case("stable-step-missing", lambda: sa.StableStep(sgd(), missing="never"), VALUE, "on_missing")


@pytest.mark.parametrize(("fn", "error", "name"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_naming_the_argument(fn, error, name):
    with pytest.raises(error) as info:
        fn()
    assert name in str(info.value), f"the message does not name {name!r}: {info.value}"


def test_case_ids_are_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))


def test_type_errors_are_also_value_errors():
    """A wrong type is a TypeError; code catching ValueError for any bad argument still catches it."""
    assert issubclass(ArgumentTypeError, TypeError) and issubclass(ArgumentTypeError, ValueError)


# ---------------------------------------------------------------------- the values that stay valid
def test_valid_edge_values_are_accepted():
    """The checks are not stricter than the math: boundary values that mean something still pass."""
    b = batch(global_num_tokens=12.0, global_num_seqs=3, dp_size=2.0)  # integral floats are counts
    assert b.dp_size == 2 and isinstance(b.dp_size, int)
    empty = batch(mask=mask(False), global_num_tokens=0, global_num_seqs=0)  # nothing valid anywhere
    assert sa.get_loss("ppo")(empty).loss.item() == 0.0
    batch(logprobs=lp(value=5e-4).requires_grad_(True))  # within the fp32/fp64 tolerance of log p <= 0
    batch(logprobs=lp(value=0.1).to(torch.bfloat16).requires_grad_(True))  # within the bf16 tolerance
    batch(mask=mask().to(F64))  # 0/1 floats are a mask
    sa.get_loss("dppo_binary_tv", delta_low=math.inf)  # inf switches one side of the trust region off
    sa.get_loss("ppo", eps_low=0.0, dual_clip=1.5)
    sa.RolloutCorrection(mode="mask", statistic="k1", low=-0.5, high=0.5)  # a divergence bound may be negative
    divergence.binary_kl(P, Q, eps=0.49)
    sa.effective_sample_size(LW, max_log_weight=math.log(8.0))


def test_masked_positions_may_hold_anything():
    """Positive or NaN values where the mask is 0 (padding) are not log-probs and are not checked."""
    m = mask()
    m[:, -1] = False
    padded = lp()
    padded[:, -1] = 7.0
    topk = torch.log(torch.full((B, T, K), 0.3, dtype=F64))
    topk[:, -1] = float("nan")
    out = sa.get_loss("dppo_topk_tv")(batch(mask=m, old_logprobs=padded, topk_logprobs=topk))
    assert math.isfinite(out.metrics["actor/pg_loss"])
