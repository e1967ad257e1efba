"""Two gloo processes, each with its own micro-batches, give the StepAccumulator statistics and the
StableStep update of one process that recorded every micro-batch (issue 12, item 1)."""

import pytest
import torch

from gloo_workers import STEP_MICRO_BATCHES, step_results, step_worker
from sa_testing import launch_gloo

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    path = tmp_path_factory.mktemp("gloo_step") / "rank0.pt"
    launch_gloo(step_worker, 2, str(path))
    single = step_results([mb for rank in STEP_MICRO_BATCHES for mb in rank], distributed=False)
    return torch.load(path), single


def test_step_statistics_and_update_match_one_process(results):
    two, one = results
    assert two.keys() == one.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-12, atol=1e-14, msg=key)


def test_the_case_is_not_trivial(results):
    _, one = results
    assert 1 / 7 < float(one["vcpo/ess_ratio"]) < 0.9
    assert float(one["vcpo/ess_num_seqs"]) == 7  # 9 rows recorded, the fully masked row twice
