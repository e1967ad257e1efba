"""veRL's real actor worker on a CPU: ``ActorRolloutRefWorker(role="actor")``, ``init_model()``, ``update_actor()``.

Each scenario of ``tests/verl_worker.py`` runs once, in its own process (veRL's platform and the
gloo process group are per process), on a tiny offline Qwen2 and veRL's own Hydra config; the
tests below read its JSON summary. TRL is installed in this environment, so every scenario also
shows that veRL's actor builds with TRL importable (the stable-async TRL shim).

* ``losses`` (veRL's SGD): vanilla, then ``sa_ppo`` through ``set_loss_fn``, 3 updates each from
  the same initial weights (veRL's ``reset``): equal parameters after every update; a control
  with other clip bounds differs. Then one update per ``sa_`` loss (top-K losses through our
  ``ppo_loss`` and veRL's logits-processor call): the worker called that registered loss, its
  ``actor/pg_loss`` is the sum of that loss over the micro-batches, the parameters moved.
* ``optimizer`` (``StableAdamW``, ESS-LR + GAC, ``sa_vcpo``): the engine's optimizer is ours;
  ``vcpo/*`` and ``gac/*`` metrics come back from the worker; GAC compares each step with the
  last gradient of the previous ``update_actor`` call, config only and through ``ppo_loss``.
* ``versions``: veRL's per-trajectory ``max_global_steps`` and the current version (the batch's
  ``current_param_version``, else the last ``update_weights``) reach every training call's
  ``PolicyBatch`` row by row; ``sa_decoupled_ppo(proximal="loglinear")`` runs on them.
* ``gac_sync``: default GAC on a synchronous run (batches sampled from the actor's weights)
  removes little of the gradient; the consecutive-step control removes more.
"""

from __future__ import annotations

import os

import pytest

import stable_async as sa
from sa_testing import tiny_causal_lm
from verl_worker import calls_by_label, loglinear_alpha_means, run_in_process

# One scenario process builds veRL's engine (12-80 s on shared cores): more than the default per-test timeout.
pytestmark = [pytest.mark.trainers, pytest.mark.slow, pytest.mark.timeout(900)]

pytest.importorskip("verl")

HERE = os.path.dirname(os.path.abspath(__file__))
HELPER = os.path.join(os.path.dirname(HERE), "verl_worker.py")
TIMEOUT_S = 600


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return tiny_causal_lm(tmp_path_factory.mktemp("verl-tiny"))[0]


def run_scenario(name: str, model_path: str, tmp_path_factory, *args: str) -> dict:
    return run_in_process(HELPER, name, model_path, tmp_path_factory.mktemp(f"verl-{name}"), *args, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def losses_run(model_path, tmp_path_factory):
    return run_scenario("losses", model_path, tmp_path_factory)


# --------------------------------------------------------------------------- parity with vanilla
def test_sa_ppo_and_vanilla_give_equal_parameters_after_every_update(losses_run):
    parity = losses_run["parity"]
    assert parity["calls"] == [["vanilla"], ["sa_ppo"]]  # each run used only its own loss
    assert losses_run["reset_restores_initial"] == 0.0
    change = min(parity["max_param_change"])
    assert change > 1e-3  # the updates move the parameters
    for diff in parity["max_param_diff"]:
        assert diff <= 1e-6 * max(1.0, change) + 1e-7  # fp32
    # The control (other clip bounds) moves the parameters differently: the comparison can fail.
    assert max(parity["control_param_diff"]) > 100 * max(max(parity["max_param_diff"]), 1e-6)
    for ours, theirs in zip(*parity["pg_loss"], strict=True):
        assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-7)


# --------------------------------------------------------------------------- every sa_ loss
@pytest.mark.parametrize("name", sa.available_losses())
def test_every_sa_loss_is_what_the_worker_runs(losses_run, name):
    run = losses_run["losses"][name]
    assert run["called"] == [f"sa_{name}"], run["called"]
    assert run["finite"]
    # veRL sums the micro-batch losses (global token counts): the logged pg_loss is our loss's.
    assert len(run["train_call_losses"]) == 2  # mini-batch of 4, micro-batches of 2
    assert run["pg_loss"][0] == pytest.approx(sum(run["train_call_losses"]), rel=1e-6, abs=1e-7)
    assert run["param_change"] > 1e-4


def test_the_worker_uses_verls_optimizer_when_not_told_otherwise(losses_run):
    assert losses_run["optimizer"] == "torch.optim.sgd.SGD"


# --------------------------------------------------------------------------- StableAdamW in the engine
@pytest.fixture(scope="module")
def optimizer_run(model_path, tmp_path_factory):
    return run_scenario("optimizer", model_path, tmp_path_factory)


def test_the_engine_steps_stable_adamw_with_ess_lr(optimizer_run):
    assert optimizer_run["optimizer"] == "stable_async.integrations.verl_optim.StableAdamW"
    assert optimizer_run["inner"] == "torch.optim.adamw.AdamW"
    assert optimizer_run["gac_mode"] == "monitor"
    steps = optimizer_run["steps"]
    assert len(steps) == 6  # 3 update_actor calls × 2 mini-batches
    # Update 1 (veRL's ppo_loss, μ = old_log_probs): the ESS of each step's sequences, and lr·sqrt(ESS/N).
    for step, expected in zip(steps[:2], optimizer_run["expected_ess_ratio"], strict=False):
        assert 0 < expected < 1
        assert step["vcpo/ess_ratio"] == pytest.approx(expected, rel=1e-6)
        assert step["vcpo/lr_scale"] == pytest.approx(expected**0.5, rel=1e-6)
    for keys in optimizer_run["worker_metric_keys"]:  # the worker's own output carries our metrics
        assert {"vcpo/ess_ratio", "vcpo/lr_scale", "vcpo/ess_num_seqs", "gac/grad_norm", "gac/action"} <= set(keys)
    assert "gac/cos" in optimizer_run["worker_metric_keys"][1]


def test_gac_compares_each_mini_batch_with_the_previous_rollout_batch(optimizer_run):
    """Config only (updates 1-2, veRL's ppo_loss) and through stable-async's ppo_loss (update 3), no setting.

    The hook on veRL's update_actor starts a rollout batch per call: both steps of a call compare
    with the last gradient of the previous call, never with each other.
    """
    steps, cos = optimizer_run["steps"], optimizer_run["grad_cosines"]
    assert "gac/cos" not in steps[0] and "gac/cos" not in steps[1]  # the first rollout batch has nothing before it
    for i, reference in ((2, 1), (3, 1), (4, 3), (5, 3)):  # last gradient of the previous update_actor
        assert steps[i]["gac/cos"] == pytest.approx(cos[i][reference], rel=1e-5, abs=1e-6)
    assert abs(cos[3][2] - cos[3][1]) > 1e-3  # the same-batch neighbour would give another value
    assert abs(cos[5][4] - cos[5][3]) > 1e-3


# --------------------------------------------------------------------------- policy versions
@pytest.fixture(scope="module")
def versions_run(model_path, tmp_path_factory):
    return run_scenario("versions", model_path, tmp_path_factory)


def test_each_rows_version_reaches_the_loss_with_its_row(versions_run):
    """veRL's max_global_steps (100 + response length here) per row, through shuffled mini-batches and 2 epochs."""
    runs = calls_by_label(versions_run)
    for label, current in (("config_only", 105), ("after_weight_sync", 107), ("loglinear_ppo_loss", 106)):
        calls = runs[label]
        assert len(calls) == 4, label  # 2 epochs × 2 mini-batches × 1 micro-batch
        for call in calls:
            assert call["current"] == current, label
            assert call["versions"] == [100 + n for n in call["lengths"]], label


def test_current_version_is_the_batchs_or_the_last_weight_sync(versions_run):
    runs = calls_by_label(versions_run)
    assert versions_run["sent"] == [107]  # update_weights(global_steps=107) went through veRL's own method
    assert all(c["versions"] is None and c["current"] is None for c in runs["no_current"])  # before any sync
    assert all(c["versions"] is None and c["current"] is None for c in runs["no_versions"])


def test_a_loss_that_reads_versions_runs_on_them(versions_run):
    """sa_decoupled_ppo(proximal="loglinear"): α = clamp((v − 1 − v_μ)/(v − v_μ), 0, 1), token mean per micro-batch."""
    expected = loglinear_alpha_means(calls_by_label(versions_run)["loglinear_ppo_loss"])
    assert versions_run["loglinear_alpha_mean"] == pytest.approx(expected, rel=1e-6)
    assert max(expected) > 0.1  # stale rows: the approximation moved the proximal policy


# --------------------------------------------------------------------------- GAC on a synchronous run
@pytest.fixture(scope="module")
def gac_sync_run(model_path, tmp_path_factory):
    return run_scenario("gac_sync", model_path, tmp_path_factory, "3")  # 3 update_actor calls per run


def test_gac_removes_little_of_a_synchronous_runs_gradient_by_default(gac_sync_run):
    """Default GAC (project, τ = 0.5), no setting: < 10% of the gradient norm removed on average, both splits.

    Control: every step its own rollout batch (gac_rollout_batch_steps=1). With the batch reused
    over 2 PPO epochs it compares a step with the step before on the same samples and projects.
    """
    for setting in ("distinct_mini_batches", "batch_reused"):
        rule = gac_sync_run[setting]["rule"]
        assert rule["steps_with_cos"] > 0 and rule["mean_norm_removed"] < 0.10, (setting, rule)
    reused = gac_sync_run["batch_reused"]
    assert reused["control"]["projected_frac"] > 0
    assert reused["control"]["mean_norm_removed"] > reused["rule"]["mean_norm_removed"] + 0.05
