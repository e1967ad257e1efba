"""Workers for the 2-process gloo test of StalenessGovernor.update_from (see sa_testing.launch_gloo)."""

from __future__ import annotations

import torch

import stable_async as sa

STEPS = 12
ROWS, WIDTH = 8, 6
# Per step, the spread of the log-weights: in band, drifting out and back (ESS/N and k3 KL move).
SPREADS = [0.05, 0.1, 0.05, 0.6, 0.05, 0.05, 0.1, 0.05, 1.5, 0.3, 0.05, 0.05]
# At step 6 only rank 0's rows (0-2) drift: one rank alone would decide otherwise than both together.
HEAD_SPREAD = {6: 1.2}
# Micro-batches (rows, width) of each rank: unequal rows and widths, rank 0 records one less.
SHARDS = [[(slice(0, 3), 6)], [(slice(3, 5), 4), (slice(5, 8), 6)]]


def step_data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    log_w = SPREADS[step] * torch.randn(ROWS, WIDTH, generator=gen, dtype=torch.float64)
    log_w[:3] *= HEAD_SPREAD.get(step, SPREADS[step]) / SPREADS[step]
    mask = torch.arange(WIDTH)[None, :] < torch.randint(1, WIDTH + 1, (ROWS,), generator=gen)[:, None]
    return log_w, mask


def decisions(micro_batches: list[tuple[slice, int]]) -> torch.Tensor:
    """Per step: the bound, lr scale and in-band flag after update_from on these micro-batches."""
    gov = sa.StalenessGovernor(max_bound=8, initial_bound=4, patience=1, token_ess_floor=0.95)
    acc = sa.StepAccumulator()
    out = []
    for step in range(STEPS):
        log_w, mask = step_data(step)
        for rows, width in micro_batches:
            acc.record_log_weights(log_w[rows, :width], mask[rows, :width])
        gov.update_from(acc)
        acc.clear()
        m = gov.metrics()
        out.append([m["governor/bound"], m["governor/lr_scale"], m["governor/in_band"], m["governor/ess_ratio"]])
    return torch.tensor(out, dtype=torch.float64)


def worker(rank, world_size, path):
    out = decisions(SHARDS[rank])
    torch.save(out, f"{path}.{rank}")
