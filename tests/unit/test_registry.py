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
