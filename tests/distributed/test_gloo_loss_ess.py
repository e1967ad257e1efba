"""Two gloo processes on a sharded batch give the single-process ESS, loss and gradients.

Each rank holds part of the sequences (unequal parts, one with a fully masked row). The
log-probs depend on one shared parameter vector θ, as in data-parallel training; the ranks'
gradients w.r.t. θ are averaged as DDP / FSDP do, and must equal the gradient of the same loss
on the concatenated batch in one process. Same for the aggregated loss value and the ESS.
"""

import pytest
import torch

from gloo_workers import LOSS_B, LOSS_CASES, loss_results, loss_worker
from sa_testing import launch_gloo

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    path = tmp_path_factory.mktemp("gloo") / "rank0.pt"
    launch_gloo(loss_worker, 2, str(path))
    return torch.load(path)


@pytest.fixture(scope="module")
def single_process_results():
    return loss_results(slice(0, LOSS_B), distributed=False)


@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_loss_and_gradient_match_single_process(two_rank_results, single_process_results, case):
    assert torch.allclose(two_rank_results[case], single_process_results[case], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_ess_matches_single_process(two_rank_results, single_process_results, level):
    assert torch.allclose(two_rank_results[("ess", level)], single_process_results[("ess", level)], rtol=1e-12)
