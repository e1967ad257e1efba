"""The SkyRL adapter through SkyRL's own code: registry lookup from a parsed config, unknown names,
the Ray registry actor that carries the losses to the workers, and the optimizer-step wrapper."""

from __future__ import annotations

import math
import os
import types

import pytest
import torch

import skyrl_areal_loaders
from sa_testing import random_logprobs, random_mask
from skyrl_areal_loaders import load_skyrl, load_skyrl_adapter

pytestmark = pytest.mark.trainers

ppo_utils = load_skyrl()
skyrl_adapter = load_skyrl_adapter()
from skyrl.train.config.config import make_config  # noqa: E402

import stable_async as sa  # noqa: E402

Registry = ppo_utils.PolicyLossRegistry


def parsed_config(*overrides: str):
    """A SkyRL config parsed the way SkyRL's entry point parses the command line (with ``sa_kwargs``)."""
    return make_config(algorithm_cls=skyrl_adapter.SAAlgorithmConfig).from_cli_overrides(list(overrides))


def test_every_loss_is_registered_by_name():
    available = Registry.list_available()
    for name in sa.available_losses():
        fn = Registry.get(f"sa_{name}")
        assert f"sa_{name}" in available
        assert fn is getattr(skyrl_adapter, f"sa_{name}")  # a module attribute: pickled by reference
    assert skyrl_adapter.register_all() == skyrl_adapter.registered_names()  # idempotent


def test_config_value_selects_our_loss_with_its_settings():
    cfg = parsed_config(
        "trainer.algorithm.policy_loss_type=sa_vcpo",
        "trainer.algorithm.sa_kwargs={ratio_cap: 1.05}",
        "trainer.algorithm.loss_reduction=sequence_mean",
    )
    algorithm = cfg.trainer.algorithm
    fn = Registry.get(algorithm.policy_loss_type)  # the lookup SkyRL's PolicyWorkerBase makes
    assert fn is skyrl_adapter.sa_vcpo
    gen = torch.Generator().manual_seed(5)
    lp = random_logprobs((4, 6), gen).requires_grad_(True)
    old = lp.detach() - 0.1
    rollout = lp.detach() + 0.3 * torch.randn(4, 6, generator=gen, dtype=torch.float64)
    adv = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    mask = random_mask(4, 6, gen).to(torch.float64)
    loss, metrics = fn(lp, old, adv, config=algorithm, loss_mask=mask, rollout_logprobs=rollout)
    expected = sa.get_loss("vcpo", ratio_cap=1.05, aggregation="token-sum")(
        sa.PolicyBatch(lp, adv, mask, old_logprobs=old, rollout_logprobs=rollout)
    )
    assert float(loss) == pytest.approx(float(expected.loss), rel=1e-12)
    assert float(loss) != pytest.approx(
        float(sa.get_loss("vcpo", aggregation="token-sum")(sa.PolicyBatch(lp, adv, mask, old, rollout)).loss)
    )  # the sa_kwargs value reached the loss
    assert "actor/pg_loss" not in metrics and all(not k.startswith("actor/") for k in metrics)


def test_skyrl_fields_reach_our_hyperparameters():
    cfg = parsed_config(
        "trainer.algorithm.eps_clip_low=0.11",
        "trainer.algorithm.eps_clip_high=0.13",
        "trainer.algorithm.cispo.cispo_eps_clip_high=2.5",
        "trainer.algorithm.sapo.tau_neg=0.7",
        "trainer.algorithm.dppo.delta_high=0.09",
        "trainer.algorithm.kl_cov.kl_cov_frac=0.3",
        "trainer.algorithm.clip_cov.clip_cov_ub=7.0",
    ).trainer.algorithm
    resolve = skyrl_adapter.resolve_hyperparameters
    assert resolve("ppo", cfg) == {"aggregation": "token-sum", "eps_low": 0.11, "eps_high": 0.13}
    assert resolve("cispo", cfg)["eps_high"] == 2.5
    assert resolve("sapo", cfg)["tau_neg"] == 0.7
    assert resolve("dppo_binary_tv", cfg) | {} == {
        "aggregation": "token-sum",
        "delta_low": 0.2,
        "delta_high": 0.09,
        "ratio_cap": None,
        "anchor": "old",
    }
    assert resolve("dppo_binary_tv", cfg, has_rollout_logprobs=True).get("anchor") is None
    assert resolve("kl_cov", cfg)["kl_cov_ratio"] == 0.3
    assert resolve("clip_cov", cfg)["clip_cov_ub"] == 7.0


@pytest.mark.parametrize("key", ["correction", "aggregation", "process_group"])
def test_sa_kwargs_rejects_what_skyrl_sets_itself(key):
    cfg = skyrl_adapter.SAAlgorithmConfig(sa_kwargs={key: 1})
    with pytest.raises(ValueError, match=f"sa_kwargs.{key}"):
        skyrl_adapter.resolve_hyperparameters("ppo", cfg)


def test_unknown_sa_name_lists_ours():
    with pytest.raises(ValueError) as info:  # SkyRL's own lookup (worker and validate_cfg)
        Registry.get("sa_not_a_loss")
    for name in skyrl_adapter.registered_names():
        assert repr(name) in str(info.value)
    cfg = parsed_config("trainer.algorithm.policy_loss_type=sa_not_a_loss")
    with pytest.raises(ValueError, match=r"unknown stable-async loss 'sa_not_a_loss'; stable-async losses: \[") as ours:
        skyrl_adapter.check_policy_loss_type(cfg)
    assert "'regular'" not in str(ours.value)  # ours only
    skyrl_adapter.check_policy_loss_type(parsed_config("trainer.algorithm.policy_loss_type=regular"))


@pytest.mark.slow
def test_registration_reaches_ray_workers_through_skyrls_registry_actor():
    ray = pytest.importorskip("ray")
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = os.path.dirname(os.path.dirname(sa.__file__))
    pythonpath = os.pathsep.join([src, tests_dir, os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=1, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    try:
        ppo_utils.sync_registries()  # what SkyRL's initialize_ray does after ray.init
        module, name, loss, pid = ray.get(
            ray.remote(skyrl_areal_loaders.skyrl_worker_lookup).remote("sa_ppo"), timeout=300
        )
    finally:
        ray.shutdown()
        Registry._ray_actor, Registry._synced_to_actor = None, False
    lp = torch.linspace(-2.0, -0.5, 6, dtype=torch.float64).reshape(2, 3)
    expected = sa.get_loss("ppo", aggregation="token-sum")(
        sa.PolicyBatch(lp, torch.ones_like(lp), torch.ones_like(lp), lp - 0.1)
    )
    assert pid != os.getpid()
    assert (module, name) == ("stable_async.integrations.skyrl", "sa_ppo")
    assert loss == pytest.approx(float(expected.loss), rel=1e-12)


def test_stable_step_at_skyrls_optimizer_calls():
    """``install_stable_step``: the sa_ loss records each micro-batch; SkyRL's step calls run the ESS-scaled step."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4, dtype=torch.float64)
    reference = torch.nn.Linear(3, 4, dtype=torch.float64)
    reference.load_state_dict(model.state_dict())
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64)
    rollout = -1.5 + 0.5 * torch.randn(2, 5, 4, generator=gen, dtype=torch.float64)
    adv = torch.randn(2, 5, 4, generator=gen, dtype=torch.float64)
    config = skyrl_adapter.SAAlgorithmConfig(policy_loss_type="sa_vcpo")

    def micro_batches(net):
        for micro in range(2):
            lp = torch.nn.functional.logsigmoid(net(x[micro])).T  # (4, 5): 4 sequences, 5 tokens
            loss, _ = skyrl_adapter.sa_vcpo(
                lp, lp.detach(), adv[micro].T, config, torch.ones_like(lp), rollout[micro].T
            )
            loss.backward()
            yield (lp.detach() - rollout[micro].T).sum(-1)

    list(micro_batches(reference))  # gradients of the reference, before anything is installed
    worker = types.SimpleNamespace(optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2))
    wrapped = skyrl_adapter.install_stable_step(worker, rule="sqrt")
    assert skyrl_adapter.install_stable_step(worker) is wrapped
    try:
        lam = list(micro_batches(model))
        # SkyRL's FSDPStrategy.optimizer_step: clip, optimizer.step(), optimizer.zero_grad()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        worker.optimizer.step()
        worker.optimizer.zero_grad()
    finally:
        skyrl_adapter.uninstall()
    metrics = wrapped.last_metrics
    ess = sa.effective_sample_size(torch.cat(lam))
    assert metrics["vcpo/ess"] == pytest.approx(ess.ess, rel=1e-9)
    assert metrics["vcpo/ess_num_seqs"] == 8
    assert metrics["vcpo/lr_scale"] == pytest.approx(math.sqrt(ess.ess_ratio), rel=1e-9)
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    ref_opt.param_groups[0]["lr"] = 1e-2 * metrics["vcpo/lr_scale"]
    ref_opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert worker.optimizer.param_groups[0]["lr"] == 1e-2  # the schedule's LR is restored
    assert model.weight.grad is None
