"""veRL 0.9.1's ``trainer.v1`` (TransferQueue) batches through the real actor worker: policy versions per row.

``trainer.v1`` keeps each trajectory's ``min_global_steps`` / ``max_global_steps`` inside the
sample's ``extra_fields`` and calls ``update_actor`` with a TransferQueue ``KVBatchMeta``, which
veRL's ``register`` decorator turns into a TensorDict below the stable-async hook. Each transport
of ``tests/verl_worker_v1.py`` runs once, in its own process, on veRL's real
``ActorRolloutRefWorker`` (CPU platform, tiny Qwen2, ``sa_ppo``, mini-batches of 2, 2 shuffled
epochs, the batch reordered before it reaches the worker):

* ``tensordict``: the TensorDict veRL's ``tqbridge`` produces for those samples (veRL's
  ``list_of_dict_to_tensordict``, ``extra_info`` as non-tensor fields), no TransferQueue needed;
* ``transferqueue``: TransferQueue itself on a local Ray instance; ``update_actor`` receives the
  ``KVBatchMeta`` and veRL's own ``tqbridge`` fetches the data (skipped without ``transfer_queue``).

Row identity: sample i's ``max_global_steps`` is its response length (2..5, all different);
odd samples are partial rollouts with ``min_global_steps`` one lower, so reading ``min`` or
another row's version fails the check.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from sa_testing import tiny_causal_lm
from verl_worker import calls_by_label, loglinear_alpha_means, run_in_process

pytestmark = [pytest.mark.trainers, pytest.mark.slow, pytest.mark.timeout(600)]

pytest.importorskip("verl")

HELPER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "verl_worker_v1.py")
WEIGHTS_SYNC, EXTRA_INFO_CURRENT = 6, 9  # as in verl_worker_v1.py; the scenario reports them too
CALLS = 4  # 2 epochs × 2 mini-batches × 1 micro-batch


@pytest.fixture(scope="module", params=["tensordict", "transferqueue"])
def v1_run(request, tmp_path_factory):
    if request.param == "transferqueue" and importlib.util.find_spec("transfer_queue") is None:
        pytest.skip("transfer_queue (TransferQueue, veRL's trainer.v1 store) is not installed")
    model = tiny_causal_lm(tmp_path_factory.mktemp("verl-v1-tiny"))[0]
    out = tmp_path_factory.mktemp(f"verl-v1-{request.param}")
    result = run_in_process(HELPER, f"v1_{request.param}", model, out, timeout=540)
    if "skipped" in result:  # Ray's node did not start on this machine (not the code under test)
        pytest.skip(result["skipped"])
    return result


def test_the_batch_reaches_the_worker_as_trainer_v1_hands_it(v1_run):
    expected_type = "KVBatchMeta" if v1_run["transport"] == "transferqueue" else "TensorDict"
    assert set(v1_run["input_types"]) == {expected_type}
    assert v1_run["registered_under_hook"]  # veRL's register (and its tqbridge) runs below the stable-async hook
    assert v1_run["expected"] == {"version_base": 0, "weights_sync": WEIGHTS_SYNC, "extra_info": EXTRA_INFO_CURRENT}
    assert v1_run["sent"] == [WEIGHTS_SYNC]  # update_weights(global_steps=6) went through veRL's own method


def test_each_rows_max_global_steps_reaches_the_loss_with_its_row(v1_run):
    runs = calls_by_label(v1_run)
    for label, current in (
        ("after_weight_sync", WEIGHTS_SYNC),  # the last update_weights
        ("current_in_extra_info", EXTRA_INFO_CURRENT),  # the batch's current_param_version wins
        ("loglinear_ppo_loss", WEIGHTS_SYNC),
    ):
        calls = runs[label]
        assert len(calls) == CALLS, label
        for call in calls:
            assert call["current"] == current, label
            assert call["versions"] == call["lengths"], label  # max_global_steps = the row's response length
        seen = sorted(n for call in calls for n in call["lengths"])
        assert seen == sorted([2, 3, 4, 5] * 2), label  # every row, once per epoch


def test_no_versions_without_a_current_version_or_a_stamp(v1_run):
    runs = calls_by_label(v1_run)
    for label in ("no_sync_yet", "server_without_versions"):
        assert len(runs[label]) == CALLS
        assert all(c["versions"] is None and c["current"] is None for c in runs[label]), label


def test_a_loss_that_reads_versions_runs_on_them(v1_run):
    """sa_decoupled_ppo(proximal="loglinear"): α = clamp((v − 1 − v_μ)/(v − v_μ), 0, 1), token mean per micro-batch."""
    expected = loglinear_alpha_means(calls_by_label(v1_run)["loglinear_ppo_loss"])
    assert v1_run["loglinear_alpha_mean"] == pytest.approx(expected, rel=1e-6)
    assert max(expected) > 0.1 and min(expected) < max(expected)  # stale rows, and the micro-batches differ
