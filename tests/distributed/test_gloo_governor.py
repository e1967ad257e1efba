"""Two gloo processes, each recording its own micro-batches into a StepAccumulator, take through
`StalenessGovernor.update_from` the decisions of one process that recorded every micro-batch."""

import itertools

import pytest
import torch

from governor_gloo_workers import SHARDS, decisions, worker
from sa_testing import launch_gloo

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    path = tmp_path_factory.mktemp("gloo_governor") / "decisions"
    launch_gloo(worker, 2, str(path))
    ranks = [torch.load(f"{path}.{rank}") for rank in range(2)]
    single = decisions([mb for rank in SHARDS for mb in rank])
    return ranks, single


def test_both_ranks_take_the_decisions_of_one_process(results):
    ranks, single = results
    for two in ranks:
        torch.testing.assert_close(two, single, rtol=1e-12, atol=1e-14)


def test_the_case_is_not_trivial(results):
    _, single = results
    bounds = single[:, 0].tolist()
    assert any(b < a for a, b in itertools.pairwise(bounds)) and any(b > a for a, b in itertools.pairwise(bounds))
    assert (single[:, 2] == 0).any() and (single[:, 1] < 1).any()  # alarms fired, an lr scale below 1
    # one rank alone would decide otherwise: its ESS is not the global one
    alone = decisions(SHARDS[1])
    assert alone[:, 0].tolist() != bounds
