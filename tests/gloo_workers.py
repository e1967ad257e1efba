"""Workers for the multi-process gloo tests (importable by spawned children; see sa_testing.launch_gloo)."""

from __future__ import annotations

import torch
import torch.distributed as dist

import stable_async as sa

# --------------------------------------------------------------------------- losses and ESS
LOSS_B, LOSS_T, LOSS_D, LOSS_K = 7, 6, 3, 3
LOSS_SHARDS = [slice(0, 3), slice(3, 7)]
CORRECTIONS = (None, "tis", "seq_mask", "icepop_excluded", "seq_mask_excluded")
# Clip-Cov / KL-Cov pick their tokens per call (per rank and micro-batch), as veRL does and as
# docs/losses/cov.md states: their loss depends on the sharding by design, so they are not here.
PER_CALL_SELECTION = ("clip_cov", "kl_cov")
LOSS_CASES = [
    (name, aggregation, correction)
    for name in sa.available_losses()
    if name not in PER_CALL_SELECTION
    for aggregation in sa.AGGREGATION_MODES
    for correction in CORRECTIONS
]


def correction_for(key):
    """Corrections; the ``_excluded`` ones reject units with ``exclude_rejected=True`` (issue 12, D1)."""
    return {
        None: None,
        "tis": sa.token_tis(),
        "seq_mask": sa.sequence_mask(high=1.5),
        "icepop_excluded": sa.icepop(low=0.85, high=1.2, exclude_rejected=True),
        "seq_mask_excluded": sa.sequence_mask(high=1.5, exclude_rejected=True),
    }[key]


def loss_data():
    """A batch whose log-probs depend on a shared parameter θ: base + features @ θ (top-K too)."""
    gen = torch.Generator().manual_seed(7)
    B, T, D, K = LOSS_B, LOSS_T, LOSS_D, LOSS_K
    data = {
        "base": -1.0 - torch.rand(B, T, generator=gen, dtype=torch.float64),
        "features": 0.1 * torch.randn(B, T, D, generator=gen, dtype=torch.float64),
    }
    data["old"] = (data["base"] + 0.2 * torch.randn(B, T, generator=gen, dtype=torch.float64)).clamp(max=-0.05)
    data["rollout"] = (data["old"] + 0.2 * torch.randn(B, T, generator=gen, dtype=torch.float64)).clamp(max=-0.05)
    data["advantages"] = torch.randn(B, generator=gen, dtype=torch.float64)
    mask = torch.arange(T)[None, :] < torch.randint(1, T + 1, (B,), generator=gen)[:, None]
    mask[1] = False
    data["mask"] = mask
    # Top-K: K of K + 1 outcomes (the last is "the rest"), so every mass is below 1.
    data["topk_base"] = torch.randn(B, T, K + 1, generator=gen, dtype=torch.float64)
    data["topk_features"] = 0.1 * torch.randn(B, T, K + 1, D, generator=gen, dtype=torch.float64)
    rollout_topk = data["topk_base"] + 0.3 * torch.randn(B, T, K + 1, generator=gen, dtype=torch.float64)
    data["topk_logprobs"] = torch.log_softmax(rollout_topk, -1)[..., :K]
    data["topk_ids"] = torch.arange(K).expand(B, T, K).clone()
    data["versions"] = torch.randint(0, 3, (B,), generator=gen)
    theta = 0.3 * torch.randn(D, generator=gen, dtype=torch.float64)
    return data, theta


def loss_batch(d, theta):
    """The PolicyBatch of the rows in ``d`` at parameter θ (every field any loss needs)."""
    current_topk = torch.log_softmax(d["topk_base"] + d["topk_features"] @ theta, -1)[..., :LOSS_K]
    return sa.PolicyBatch(
        logprobs=d["base"] + d["features"] @ theta,
        advantages=d["advantages"],
        mask=d["mask"],
        old_logprobs=d["old"],
        rollout_logprobs=d["rollout"],
        topk_ids=d["topk_ids"],
        topk_logprobs=d["topk_logprobs"],
        current_topk_logprobs=current_topk,
        versions=d["versions"],
        current_version=3,
    )


def loss_results(rows, distributed, global_counts=None):
    """Loss value and d loss / d θ for every case, and the ESS, on the given rows.

    ``global_counts`` (default: ``distributed``) fills the counts with `with_global_counts`.
    """
    data, theta0 = loss_data()
    d = {k: v[rows] for k, v in data.items()}
    out = {}
    for name, aggregation, correction in LOSS_CASES:
        theta = theta0.clone().requires_grad_(True)
        batch = loss_batch(d, theta)
        if distributed if global_counts is None else global_counts:
            batch = batch.with_global_counts()
        loss = sa.get_loss(name, aggregation=aggregation, correction=correction_for(correction))(batch).loss
        (grad,) = torch.autograd.grad(loss, theta)
        out[(name, aggregation, correction)] = torch.cat([loss.detach().reshape(1), grad])
    log_w = (d["base"] + d["features"] @ theta0) - d["rollout"]
    for level in ("sequence", "token"):
        result = sa.effective_sample_size(log_w, d["mask"], level=level)
        out[("ess", level)] = torch.tensor([result.ess, result.ess_ratio, result.n], dtype=torch.float64)
    return out


def loss_worker(rank, world_size, path):
    out = loss_results(LOSS_SHARDS[rank], distributed=True)
    for key, value in out.items():
        if key[0] != "ess":
            dist.all_reduce(value, op=dist.ReduceOp.SUM)  # DDP / FSDP average gradients over ranks
            out[key] = value / world_size
    if rank == 0:
        torch.save(out, path)


# --------------------------------------------------------------------------- step accumulator
# Micro-batches of each rank: (rows, width). Unequal rows, widths and counts; rank 1's second
# micro-batch has a fully masked row (row 1 of `loss_data`); rank 0 records one micro-batch less.
STEP_MICRO_BATCHES = [[(slice(0, 1), 4), (slice(1, 3), 6)], [(slice(3, 5), 5), (slice(5, 7), 6), (slice(0, 2), 3)]]


def step_results(micro_batches, distributed):
    """StepAccumulator statistics and the parameters after one StableStep, for these micro-batches."""
    data, theta = loss_data()
    log_w = (data["base"] + data["features"] @ theta) - data["rollout"]
    acc = sa.StepAccumulator()
    for rows, width in micro_batches:
        acc.record_log_weights(3.0 * log_w[rows, :width], data["mask"][rows, :width])
    param = torch.nn.Parameter(torch.arange(4, dtype=torch.float64))
    param.grad = torch.full((4,), 0.5, dtype=torch.float64)  # the DP-averaged gradient, equal on every rank
    step = sa.StableStep(torch.optim.SGD([param], lr=1.0), acc, rule="linear")
    stats = acc.reduce()
    metrics = step()
    out = {key: torch.tensor(value, dtype=torch.float64) for key, value in metrics.items()}
    out["token_ess"] = torch.tensor(stats.token.ess, dtype=torch.float64)
    out["param"] = param.detach().clone()
    return out


def step_worker(rank, world_size, path):
    out = step_results(STEP_MICRO_BATCHES[rank], distributed=True)
    if rank == 0:
        torch.save(out, path)
