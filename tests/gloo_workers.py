"""Workers for the multi-process gloo tests (importable by spawned children; see sa_testing.launch_gloo)."""

from __future__ import annotations

import torch
import torch.distributed as dist

import stable_async as sa

# --------------------------------------------------------------------------- losses and ESS
LOSS_B, LOSS_T, LOSS_D = 7, 6, 3
LOSS_SHARDS = [slice(0, 3), slice(3, 7)]
LOSS_CASES = [
    (name, aggregation, correction)
    for name in ("ppo", "reinforce", "cispo", "gspo", "gspo_token", "sapo", "geo_mean")
    for aggregation in sa.AGGREGATION_MODES
    for correction in (None, "tis", "seq_mask")
]


def _correction(key):
    return {None: None, "tis": sa.token_tis(), "seq_mask": sa.sequence_mask(high=1.5)}[key]


def loss_data():
    """A batch whose log-probs depend on a shared parameter θ: base + features @ θ."""
    gen = torch.Generator().manual_seed(7)
    B, T, D = LOSS_B, LOSS_T, LOSS_D
    data = {
        "base": -1.0 - torch.rand(B, T, generator=gen, dtype=torch.float64),
        "features": 0.1 * torch.randn(B, T, D, generator=gen, dtype=torch.float64),
    }
    data["old"] = data["base"] + 0.2 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    data["rollout"] = data["old"] + 0.2 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    data["advantages"] = torch.randn(B, generator=gen, dtype=torch.float64)
    mask = torch.arange(T)[None, :] < torch.randint(1, T + 1, (B,), generator=gen)[:, None]
    mask[1] = False
    data["mask"] = mask
    theta = 0.3 * torch.randn(D, generator=gen, dtype=torch.float64)
    return data, theta


def loss_results(rows, distributed):
    """Loss value and d loss / d θ for every case, and the ESS, on the given rows."""
    data, theta0 = loss_data()
    d = {k: v[rows] for k, v in data.items()}
    out = {}
    for name, aggregation, correction in LOSS_CASES:
        theta = theta0.clone().requires_grad_(True)
        batch = sa.PolicyBatch(
            logprobs=d["base"] + d["features"] @ theta,
            advantages=d["advantages"],
            mask=d["mask"],
            old_logprobs=d["old"],
            rollout_logprobs=d["rollout"],
        )
        if distributed:
            batch = batch.with_global_counts()
        loss = sa.get_loss(name, aggregation=aggregation, correction=_correction(correction))(batch).loss
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
    keys = ("vcpo/ess_ratio", "vcpo/lr_scale", "vcpo/ess", "vcpo/ess_num_seqs", "vcpo/token_ess_ratio")
    keys += ("vcpo/ess_num_tokens", "vcpo/mismatch_kl", "vcpo/mismatch_k3_kl", "vcpo/log_ratio_max")
    out = {key: torch.tensor(metrics[key], dtype=torch.float64) for key in (*keys, "vcpo/log_ratio_min")}
    out["token_ess"] = torch.tensor(stats.token.ess, dtype=torch.float64)
    out["param"] = param.detach().clone()
    return out


def step_worker(rank, world_size, path):
    out = step_results(STEP_MICRO_BATCHES[rank], distributed=True)
    if rank == 0:
        torch.save(out, path)
