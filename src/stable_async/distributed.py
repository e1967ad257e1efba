"""The only place stable-async talks to `torch.distributed`.

Every cross-rank reduction in the library goes through these helpers, each a no-op without
an initialized process group, so a single-process run and a data-parallel run share one code
path. Like torchmetrics' per-state ``dist_reduce_fx``, each statistic declares how it reduces:
sums (`all_reduce_sum`) or maxima (`all_reduce_max`), never an average of averages.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def is_distributed(process_group: Any = None) -> bool:
    """True when a default process group exists (``process_group`` may further restrict it)."""
    return dist.is_available() and dist.is_initialized()


def world_size(process_group: Any = None) -> int:
    """Number of ranks in ``process_group`` (1 without distributed)."""
    if not is_distributed(process_group):
        return 1
    return dist.get_world_size(group=process_group)


def all_reduce_sum(tensor: torch.Tensor, process_group: Any = None) -> torch.Tensor:
    """Σ over ranks (returns a new tensor; the input is not modified)."""
    out = tensor.detach().clone()
    if is_distributed(process_group):
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=process_group)
    return out


def all_reduce_max(tensor: torch.Tensor, process_group: Any = None) -> torch.Tensor:
    """max over ranks (returns a new tensor)."""
    out = tensor.detach().clone()
    if is_distributed(process_group):
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=process_group)
    return out


def rank(process_group: Any = None) -> int:
    """This process's rank in ``process_group`` (0 without distributed)."""
    if not is_distributed(process_group):
        return 0
    return dist.get_rank(group=process_group)
