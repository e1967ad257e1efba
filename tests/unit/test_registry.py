"""Registry: lookup, construction, and errors that name the argument."""

from dataclasses import dataclass

import pytest
import torch

import stable_async as sa
from stable_async.losses.base import LossConfig, finish
from stable_async.losses.ppo import PPOConfig

CLASSICAL = {"ppo", "reinforce", "cispo", "gspo", "gspo_token", "sapo", "geo_mean"}


def test_classical_losses_are_registered():
    assert set(sa.available_losses()) >= CLASSICAL


def test_unknown_loss_lists_the_available_ones():
    with pytest.raises(KeyError, match=r"unknown loss 'ppo2'; available losses: \[.*'ppo'"):
        sa.get_loss("ppo2")


@pytest.mark.parametrize(
    ("name", "kwargs", "error", "pattern"),
    [
        ("ppo", {"epsilon": 0.2}, TypeError, "epsilon: not a hyperparameter of loss 'ppo'"),
        ("ppo", {"eps_low": -0.1}, ValueError, "eps_low: expected a finite number >= 0"),
        ("ppo", {"eps_high": float("nan")}, ValueError, "eps_high"),
        ("ppo", {"dual_clip": 0.5}, ValueError, "dual_clip: expected a value > 1"),
        ("ppo", {"ratio_cap": 0.0}, ValueError, "ratio_cap"),
        ("ppo", {"aggregation": "mean"}, ValueError, "aggregation: unknown aggregation mode 'mean'"),
        ("ppo", {"correction": "tis"}, TypeError, "correction: expected a stable_async.RolloutCorrection"),
        ("ppo", {"norm_length": -3}, ValueError, "norm_length"),
        ("sapo", {"tau_pos": 0.0}, ValueError, "tau_pos"),
        ("gspo", {"eps_low": -1.0}, ValueError, "eps_low"),
        ("cispo", {"eps_high": -1.0}, ValueError, "eps_high"),
        ("geo_mean", {"eps_low": -1.0}, ValueError, "eps_low"),
    ],
)
def test_invalid_hyperparameters(name, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        sa.get_loss(name, **kwargs)


def test_config_object_and_keywords_are_exclusive():
    loss = sa.get_loss("ppo", config=PPOConfig(eps_high=0.28))
    assert loss.config.eps_high == 0.28
    with pytest.raises(TypeError, match="either config= or keyword"):
        sa.get_loss("ppo", config=PPOConfig(), eps_low=0.1)
    with pytest.raises(TypeError, match="config: expected GSPOConfig"):
        sa.get_loss("gspo", config=PPOConfig())
    with pytest.raises(TypeError, match="batch: expected a stable_async.PolicyBatch"):
        sa.get_loss("ppo")({"logprobs": torch.zeros(1, 1)})


def test_user_loss_registration_and_duplicates():
    @dataclass(frozen=True)
    class ScaledConfig(LossConfig):
        scale: float = 2.0

    @sa.register_loss("test_scaled_reinforce", config=ScaledConfig)
    def scaled(batch, config):
        return finish(batch, config, -config.scale * batch.advantages * batch.logprobs, {})

    try:
        assert "test_scaled_reinforce" in sa.available_losses()
        lp = (-torch.rand(2, 3)).requires_grad_(True)
        batch = sa.PolicyBatch(logprobs=lp, advantages=torch.ones(2), mask=torch.ones(2, 3))
        out = sa.get_loss("test_scaled_reinforce", scale=3.0)(batch)
        assert out.loss.item() == pytest.approx(-3.0 * lp.mean().item())
        with pytest.raises(ValueError, match="already registered"):
            sa.register_loss("test_scaled_reinforce")(lambda b, c: None)
        with pytest.raises(TypeError, match="config: expected a dataclass type"):
            sa.register_loss("x", config=dict)
    finally:
        from stable_async import registry

        registry._REGISTRY.pop("test_scaled_reinforce", None)


# --------------------------------------------------------------------------- declarations

# What each shipped loss declares with its default settings, from the papers / reference code:
# VCPO and decoupled PPO multiply by a weight against μ, DPPO by sg(min(π_θ/μ, c)); only the
# top-K DPPO variants read top-K log-probs.
WEIGHTS_BY_ROLLOUT = {"vcpo", "decoupled_ppo", "dppo_binary_tv", "dppo_binary_kl", "dppo_topk_tv", "dppo_topk_kl"}
NEEDS_TOPK = {"dppo_topk_tv", "dppo_topk_kl"}
# Documented: without rollout_logprobs, μ := π_old (the loss then weights by 1).
FALLS_BACK_TO_OLD = {"vcpo", "decoupled_ppo", "m2po"}
VARIANTS = [
    ("vcpo", {"anchor": "old"}),
    ("decoupled_ppo", {"proximal": "loglinear"}),
    ("dppo_binary_kl", {"anchor": "old"}),
    ("dppo_topk_tv", {"anchor": "old", "weight_anchor": "rollout"}),
    ("ppo", {"correction": sa.RolloutCorrection(high=2.0)}),
]


def _batch_with_only(fields, gen):
    """A batch with logprobs, advantages, mask and exactly the given optional fields."""
    B, T, K = 3, 5, 2
    lp = (-torch.rand(B, T, generator=gen, dtype=torch.float64) - 0.1).requires_grad_(True)
    values = {
        "old_logprobs": lp.detach() - 0.1,
        "rollout_logprobs": lp.detach() + 0.1,
        "rewards": torch.rand(B, generator=gen, dtype=torch.float64),
        "group_ids": torch.zeros(B, dtype=torch.long),
        "versions": torch.tensor([3, 4, 5]),
        "current_version": 6,
        "topk_ids": torch.zeros(B, T, K, dtype=torch.long),
        "topk_logprobs": torch.full((B, T, K), -1.5, dtype=torch.float64),
        "current_topk_logprobs": torch.full((B, T, K), -1.2, dtype=torch.float64),
    }
    extra = {name: values[name] for name in fields}
    adv = torch.randn(B, generator=gen, dtype=torch.float64)
    return sa.PolicyBatch(logprobs=lp, advantages=adv, mask=torch.ones(B, T, dtype=torch.bool), **extra)


@pytest.mark.parametrize(("name", "kwargs"), [(n, {}) for n in sorted(CLASSICAL | WEIGHTS_BY_ROLLOUT)] + VARIANTS)
def test_declared_fields_are_enough_and_each_missing_one_is_named(name, kwargs, gen):
    loss = sa.get_loss(name, **kwargs)
    assert loss.requires <= sa.registry.BATCH_FIELDS - {"logprobs", "advantages", "mask"}
    out = loss(_batch_with_only(loss.requires, gen))
    assert out.loss.isfinite()
    for field in loss.requires - {"old_logprobs"}:  # old_logprobs defaults to sg(log π_θ)
        try:
            missing = _batch_with_only(loss.requires - {field}, gen)
            fallback = loss(missing)
        except ValueError as err:
            assert str(err).startswith(field), err
            continue
        assert field == "rollout_logprobs" and name in FALLS_BACK_TO_OLD, (name, field)
        as_old = loss(missing.replace(rollout_logprobs=missing.old_logprobs))
        assert fallback.loss.item() == pytest.approx(as_old.loss.item(), abs=1e-15)


def test_shipped_declarations():
    for name in sa.available_losses():
        if name.startswith("test_"):
            continue
        loss = sa.get_loss(name)
        assert loss.weights_by_rollout is (name in WEIGHTS_BY_ROLLOUT), name
        assert loss.needs_topk is (name in NEEDS_TOPK), name
    assert sa.get_loss("vcpo", anchor="old").weights_by_rollout is False
    assert sa.get_loss("dppo_binary_tv", weight_anchor="old").weights_by_rollout is False
    assert sa.get_loss("ppo", correction=sa.icepop()).requires == {"old_logprobs", "rollout_logprobs"}


def test_a_new_loss_is_seen_through_its_declarations():
    @sa.register_loss(
        "test_topk_reweighted",
        requires={"rollout_logprobs", "topk_logprobs", "current_topk_logprobs"},
        weights_by_rollout=True,
        needs_topk=True,
    )
    def topk_reweighted(batch, config):
        return finish(batch, config, -batch.advantages * batch.logprobs, {})

    @dataclass(frozen=True)
    class AnchorConfig(LossConfig):
        anchor: str = "rollout"

    @sa.register_loss(
        "test_anchored",
        config=AnchorConfig,
        requires=lambda c: {"rollout_logprobs" if c.anchor == "rollout" else "old_logprobs"},
        weights_by_rollout=lambda c: c.anchor == "rollout",
    )
    def anchored(batch, config):
        return finish(batch, config, -batch.advantages * batch.logprobs, {})

    try:
        loss = sa.get_loss("test_topk_reweighted")
        assert (loss.weights_by_rollout, loss.needs_topk) == (True, True)
        assert loss.requires == {"rollout_logprobs", "topk_logprobs", "current_topk_logprobs"}
        assert sa.loss_spec("test_topk_reweighted").fn is topk_reweighted
        default = sa.get_loss("test_anchored")
        assert (default.weights_by_rollout, default.needs_topk) == (True, False)
        old = sa.get_loss("test_anchored", anchor="old")
        assert (old.weights_by_rollout, old.requires) == (False, {"old_logprobs"})
    finally:
        from stable_async import registry

        registry._REGISTRY.pop("test_topk_reweighted", None)
        registry._REGISTRY.pop("test_anchored", None)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"requires": {"rollout_logprob"}}, ValueError, "requires: 'rollout_logprob' is not a PolicyBatch field"),
        ({"requires": "rollout_logprobs"}, TypeError, "requires: expected a set of PolicyBatch field names"),
        ({"weights_by_rollout": "yes"}, TypeError, "weights_by_rollout: expected True, False"),
        ({"needs_topk": 1}, TypeError, "needs_topk: expected True, False"),
        ({"overwrite": "no"}, TypeError, "overwrite: expected True or False"),
    ],
)
def test_bad_declarations_are_named(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        sa.register_loss("test_bad", **kwargs)


def test_a_callable_declaration_returning_a_non_bool_is_named():
    @sa.register_loss("test_bad_callable", weights_by_rollout=lambda c: "rollout")
    def bad(batch, config):
        return finish(batch, config, -batch.advantages * batch.logprobs, {})

    try:
        with pytest.raises(TypeError, match="weights_by_rollout: loss 'test_bad_callable' declared 'rollout'"):
            _ = sa.get_loss("test_bad_callable").weights_by_rollout
    finally:
        from stable_async import registry

        registry._REGISTRY.pop("test_bad_callable", None)
