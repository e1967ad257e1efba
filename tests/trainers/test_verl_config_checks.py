"""Misconfiguration of stable-async's veRL settings fails when veRL builds its config, naming the key.

Each case composes veRL's own ``ppo_trainer`` config with the override a user would type and runs
veRL's ``validate_config`` (what ``main_ppo`` does on the driver, before Ray starts a worker);
the loss-config cases also fail in ``omega_conf_to_dataclass`` (what each worker does). A valid
variant of every case passes, so each check is shown to be the one that fires.
"""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.trainers
pytest.importorskip("verl")

from stable_async.integrations import verl as adapter  # noqa: E402

TARGET = "actor_rollout_ref.actor.policy_loss._target_=stable_async.integrations.verl.SAPolicyLossConfig"
STABLE_ADAMW = [
    "actor_rollout_ref.actor.optim.optimizer_impl=stable_async.integrations.verl",
    "actor_rollout_ref.actor.optim.optimizer=StableAdamW",
]


def compose(overrides: list[str]):
    import verl
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    base = [
        "actor_rollout_ref.actor.strategy=fsdp2",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=1",
        "trainer.n_gpus_per_node=1",
        "data.train_batch_size=256",
    ]
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return hydra_compose(config_name="ppo_trainer", overrides=base + overrides)


def validate(overrides: list[str]) -> None:
    from verl.utils.config import validate_config

    validate_config(compose(overrides), use_reference_policy=False, use_critic=False)


PL = "actor_rollout_ref.actor.policy_loss"
OPT = "actor_rollout_ref.actor.optim.override_optimizer_config="


def loss(mode: str, sa_kwargs: str | None = None) -> list[str]:
    """``loss_mode=mode`` (+ our config class and ``sa_kwargs`` when given)."""
    return [f"{PL}.loss_mode={mode}", *([TARGET, f"+{PL}.sa_kwargs={sa_kwargs}"] if sa_kwargs else [])]


def adamw(options: str) -> list[str]:
    return [*STABLE_ADAMW, OPT + options]


BYPASS = "algorithm.rollout_correction.bypass_mode=true"
SEQ_IS = "algorithm.rollout_correction.rollout_is=sequence"
ALLOW = [TARGET, f"+{PL}.allow_rollout_correction=true"]

# (bad overrides, the key the message must name, a good variant of the same overrides)
CASES = {
    "unknown sa_ loss": (
        loss("sa_vcpoo"), r"policy_loss\.loss_mode: 'sa_vcpoo' is not a stable-async loss; did you mean 'sa_vcpo'",
        loss("sa_vcpo"),
    ),
    "unknown sa_kwargs key": (
        loss("sa_vcpo", "{ratio_cap:8.0,bogus:1}"), r"policy_loss\.sa_kwargs\.bogus: not a hyperparameter of sa_vcpo",
        loss("sa_vcpo", "{ratio_cap:8.0}"),
    ),
    "bad sa_kwargs value": (
        loss("sa_vcpo", "{ratio_cap:-1.0}"), r"policy_loss\.sa_kwargs\.ratio_cap: expected a finite number > 0",
        loss("sa_vcpo", "{ratio_cap:1.0}"),
    ),
    "sa_kwargs with a veRL loss": (
        [TARGET, f"+{PL}.sa_kwargs={{eps_low:0.1}}"], r"policy_loss\.sa_kwargs: only read by sa_ loss modes",
        loss("sa_ppo", "{eps_low:0.1}"),
    ),
    "optimizer key typo": (
        adamw("{gac:project,gac_treshold:0.5}"),
        r"override_optimizer_config\.gac_treshold: not an option of StableAdamW .*did you mean 'gac_threshold'",
        adamw("{gac:project,gac_threshold:0.5}"),
    ),
    "optimizer bad GAC mode": (
        adamw("{gac:projct}"), r"override_optimizer_config\.gac: ", adamw("{gac:project}"),
    ),
    "optimizer bad GAC threshold": (
        adamw("{gac:project,gac_threshold:abc}"), r"override_optimizer_config\.gac_threshold: ",
        adamw("{gac:project,gac_threshold:0.3}"),
    ),
    "optimizer bad ESS rule": (
        adamw("{ess_rule:cubic}"), r"override_optimizer_config\.ess_rule: ", adamw("{ess_rule:linear}"),
    ),
    "optimizer bad rollout-batch steps": (
        adamw("{gac:project,gac_rollout_batch_steps:0}"),
        r"override_optimizer_config\.gac_rollout_batch_steps: expected an integer >= 1",
        adamw("{gac:project,gac_rollout_batch_steps:4}"),
    ),
    "bypass mode with a loss that weights by the rollout policy": (
        [*loss("sa_decoupled_ppo"), BYPASS],
        r"rollout_correction\.bypass_mode=true: sa_decoupled_ppo already weights by the rollout policy",
        [*loss("sa_decoupled_ppo"), BYPASS, *ALLOW],
    ),
    "rollout IS with a loss anchored at the rollout policy": (
        [*loss("sa_vcpo", "{anchor:rollout}"), SEQ_IS],
        r"rollout_correction\.rollout_is=sequence: sa_vcpo already weights by the rollout policy",
        [*loss("sa_vcpo", "{anchor:old}"), SEQ_IS],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_misconfiguration_fails_at_config_construction_naming_the_key(case):
    bad, message, good = CASES[case]
    with pytest.raises((ValueError, TypeError, Exception), match=message):
        validate(bad)
    validate(good)  # the same overrides, fixed: the check that fired is the one for this key


@pytest.mark.parametrize("case", ["unknown sa_loss", "unknown sa_kwargs key", "bad sa_kwargs value"])
def test_loss_config_cases_also_fail_where_each_worker_builds_its_config(case):
    from verl.utils.config import omega_conf_to_dataclass

    bad, message, good = CASES[case.replace("sa_loss", "sa_ loss")]
    if TARGET not in bad:
        bad = [*bad, TARGET]
    with pytest.raises(Exception, match=message):
        omega_conf_to_dataclass(compose(bad).actor_rollout_ref.actor)
    omega_conf_to_dataclass(compose([*good, TARGET] if TARGET not in good else good).actor_rollout_ref.actor)


def test_rollout_is_with_a_loss_weighting_by_rollout_logprobs_fails_at_the_loss_call_too():
    import torch

    from sa_testing import verl_actor_config

    B, T = 3, 4
    lp = (-torch.rand(B, T, dtype=torch.float64)).requires_grad_()
    old = lp.detach() - 0.1
    args = (old, lp, torch.randn(B, T, dtype=torch.float64), torch.ones(B, T, dtype=torch.bool))
    weights = torch.ones(B, T, dtype=torch.float64)
    cls = adapter.SAPolicyLossConfig
    config = verl_actor_config(policy_loss=cls(loss_mode="sa_decoupled_ppo"))
    with pytest.raises(ValueError, match="allow_rollout_correction"):
        adapter.compute_policy_loss("decoupled_ppo", *args, "token-mean", config, weights)
    allowed = verl_actor_config(policy_loss=cls(loss_mode="sa_decoupled_ppo", allow_rollout_correction=True))
    loss, _ = adapter.compute_policy_loss("decoupled_ppo", *args, "token-mean", allowed, weights)
    assert torch.isfinite(loss)


def test_the_checks_are_installed_in_verls_validate_config():
    from verl.utils import config as verl_config

    assert getattr(verl_config.validate_config, "_stable_async_checks", False)
    assert adapter.install_config_checks()  # idempotent
    assert not getattr(verl_config.validate_config.__wrapped__, "_stable_async_checks", False)
