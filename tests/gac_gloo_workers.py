"""Worker for tests/distributed/test_gac_gloo.py (a module on sys.path, so spawned children can import it)."""

from __future__ import annotations

import math
import os
from datetime import timedelta

import torch

from stable_async.optim.gac import GradientAlignmentControl

WORLD = 2
SHAPES = [(12, 10), (25,)]
STEPS = 6
KWARGS = {"mode": "project", "threshold": 0.2, "strength": 0.7, "skip_threshold": 0.95}
ADAPTIVE = {"mode": "project", "threshold": 0.3, "adaptive": True, "adaptive_k": 0.5, "keep": "regulated"}
TIMEOUT = 60.0


def grad_sequence():
    """Correlated full gradients (one flat vector per parameter per step), the same on every process."""
    gen = torch.Generator().manual_seed(11)
    base = [torch.randn(math.prod(s), generator=gen, dtype=torch.float64) for s in SHAPES]
    return [[0.9 * b + torch.randn(b.numel(), generator=gen, dtype=torch.float64) for b in base] for _ in range(STEPS)]


def initial_params():
    gen = torch.Generator().manual_seed(5)
    return [torch.randn(math.prod(s), generator=gen, dtype=torch.float64) for s in SHAPES]


def shard(flat: torch.Tensor, rank: int) -> torch.Tensor:
    return torch.tensor_split(flat, WORLD)[rank]  # uneven splits allowed (25 → 13 + 12)


def run(params, grads_per_step, kwargs, to_local=lambda g: g):
    """SGD where GAC edits every step's gradient; returns the metrics of every step."""
    gac = GradientAlignmentControl(params, **kwargs)
    history = []
    for grads in grads_per_step:
        for p, g in zip(params, grads, strict=True):
            p.grad = to_local(g).clone()
        history.append(gac.apply())
        if not gac.should_skip:
            with torch.no_grad():
                for p in params:
                    p.add_(p.grad, alpha=-0.1)
    return history


def reference(kwargs):
    params = [p.clone().requires_grad_(True) for p in initial_params()]
    history = run(params, grad_sequence(), kwargs)
    return history, [p.detach() for p in params]


def worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=30)
    )
    try:
        results = {}
        steps = grad_sequence()
        for name, kwargs in (("sharded", KWARGS), ("sharded_adaptive", ADAPTIVE)):
            params = [shard(p, rank).clone().requires_grad_(True) for p in initial_params()]
            local_steps = [[shard(g, rank) for g in grads] for grads in steps]
            history = run(params, local_steps, {**kwargs, "sharded": True})
            results[name] = (history, [p.detach() for p in params])
        params = [p.clone().requires_grad_(True) for p in initial_params()]
        results["replicated"] = (run(params, steps, KWARGS), [p.detach() for p in params])  # sharded=None → False
        params = [p.clone().requires_grad_(True) for p in initial_params()]
        results["replicated_summed"] = (run(params, steps, {**KWARGS, "sharded": True}), None)

        from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD,))
        placements = [[Shard(0)], [Replicate()]]  # one FSDP-sharded parameter, one replicated one
        params = [
            torch.nn.Parameter(distribute_tensor(p.clone(), mesh, pl))
            for p, pl in zip(initial_params(), placements, strict=True)
        ]
        dsteps = [[distribute_tensor(g, mesh, pl) for g, pl in zip(grads, placements, strict=True)] for grads in steps]
        history = run(params, dsteps, KWARGS)  # sharded auto-detected from the DTensor parameters
        results["dtensor"] = (history, [p.detach().full_tensor() for p in params])

        params = [shard(p, rank).clone().requires_grad_(True) for p in initial_params()]
        local_steps = [[shard(g, rank) for g in grads] for grads in steps]
        sketch = {"mode": "skip", "threshold": 0.4, "memory": "sketch", "sketch_dim": 16, "sharded": True}
        results["sketch"] = (run(params, local_steps, sketch), None)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
