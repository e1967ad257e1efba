"""The AReaL adapter through AReaL's own actor: ``use_loss`` makes ``PPOActor._ppo_update`` bind our
loss with its config's arguments; versions, rejection sampling and the optimizer-step wrapper."""

from __future__ import annotations

import types

import pytest
import torch

from skyrl_areal_loaders import load_areal_actor, load_areal_adapter

pytestmark = pytest.mark.trainers

areal_actor = load_areal_actor()
areal_adapter = load_areal_adapter()
from areal.api.cli_args import PPOActorConfig, RejectionSamplingConfig  # noqa: E402
from areal.utils import stats_tracker  # noqa: E402

import stable_async as sa  # noqa: E402

B, T = 4, 6


class RecordingEngine:
    """Stands in for AReaL's TrainEngine: ``train_batch`` runs the bound loss on the micro-batch."""

    def __init__(self, logprobs: torch.Tensor) -> None:
        self.logprobs = logprobs
        self.losses: list[tuple[torch.Tensor, object, dict]] = []

    def get_version(self) -> int:
        return 3

    def train(self) -> None:
        pass

    def train_batch(self, mb, loss_fn, loss_weight_fn):
        rows = mb["loss_mask"].shape[0]
        lp = self.logprobs[:rows].clone().requires_grad_(True)
        self.losses.append((loss_fn(lp, torch.zeros_like(lp), mb), loss_fn, mb))
        return {}


def actor_data(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "attention_mask": torch.ones(B, T, dtype=torch.bool),
        "loss_mask": torch.ones(B, T),
        "rewards": torch.randn(B, generator=gen),
        "advantages": torch.randn(B, T, generator=gen),
        "kl_rewards": torch.zeros(B, T),
        "tot_rewards": torch.zeros(B, T),
        "logprobs": -torch.rand(B, T, generator=gen) - 0.1,
        "prox_logp": -torch.rand(B, T, generator=gen) - 0.1,
        "versions": torch.full((B, T), 2),
        "input_ids": torch.zeros(B, T, dtype=torch.long),
    }


def test_use_loss_replaces_grpo_loss_fn_in_ppo_update():
    config = PPOActorConfig(
        experiment_name="t", trial_name="t", path="", eps_clip=0.15, c_clip=2.0, ppo_n_minibatches=1
    )
    data = actor_data(0)
    engine = RecordingEngine(-torch.rand(B, T, generator=torch.Generator().manual_seed(9)) - 0.1)
    actor = areal_actor.PPOActor(config, engine)
    try:
        areal_adapter.use_loss("ppo", eps_high=0.3)
        actor._ppo_update(dict(data))
    finally:
        areal_adapter.restore()
        stats_tracker.export_all(reset=True)
    ((loss, bound, mb),) = engine.losses
    assert bound.func.__name__ == "sa_ppo"
    assert bound.keywords["eps_clip"] == 0.15 and bound.keywords["current_version"] == 3  # AReaL's own binding
    lp = engine.logprobs[:B]
    expected = sa.get_loss("ppo", eps_low=0.15, eps_high=0.3, dual_clip=2.0)(
        sa.PolicyBatch(lp, mb["advantages"], mb["loss_mask"], old_logprobs=mb["prox_logp"])
    )
    assert float(loss) == pytest.approx(float(expected.loss), rel=1e-6)
    assert areal_actor.grpo_loss_fn.__name__ == "grpo_loss_fn"  # restored


def test_versions_and_proximal_reach_the_batch():
    data = actor_data(1)
    lp = -torch.rand(B, T, dtype=torch.float32) - 0.1
    batch = areal_adapter.policy_batch(lp, data, None, {"current_version": 3})
    assert torch.equal(batch.versions, data["versions"]) and batch.current_version == 3
    torch.testing.assert_close(batch.old_logprobs, data["prox_logp"])
    torch.testing.assert_close(batch.rollout_logprobs, data["logprobs"])


def test_loglinear_with_a_recomputed_proximal_uses_it():
    """AReaL uses ``prox_logp`` when it is there, whatever ``prox_logp_method`` says: so do we."""
    data = actor_data(3)
    kwargs = {"prox_logp_method": "loglinear", "current_version": 3, "eps_clip": 0.2}
    assert (
        areal_adapter.resolve_hyperparameters("decoupled_ppo", kwargs, {}, has_proximal=False)["proximal"]
        == "loglinear"
    )
    assert "proximal" not in areal_adapter.resolve_hyperparameters("decoupled_ppo", kwargs, {}, has_proximal=True)
    lp = -torch.rand(B, T, generator=torch.Generator().manual_seed(4)) - 0.1
    ours = areal_adapter.make_loss_fn("decoupled_ppo")(lp, torch.zeros_like(lp), data, **kwargs)
    stats_tracker.export_all(reset=True)
    expected = sa.get_loss("decoupled_ppo", eps_low=0.2, eps_high=0.2)(
        sa.PolicyBatch(lp, data["advantages"], data["loss_mask"], data["prox_logp"], data["logprobs"])
    )
    assert float(ours) == pytest.approx(float(expected.loss), rel=1e-6)


def test_packed_rows():
    values = torch.arange(1.0, 8.0)
    cu = torch.tensor([0, 3, 4, 7])
    rows = areal_adapter.padded_rows(values, cu)
    assert rows.tolist() == [[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [5.0, 6.0, 7.0]]
    with pytest.raises(ValueError, match="cu_seqlens"):
        areal_adapter.padded_rows(values, None)


@pytest.mark.parametrize(
    "rs",
    [
        dict(level="sequence", action="mask", metric="ratio", upper=2.0),
        dict(level="token", action="mask", metric="kl_k3", upper=2.0),
        dict(level="token", action="mask", metric="ratio", upper=2.0, lower=0.5),
    ],
)
def test_rejection_sampling_forms_without_a_counterpart_fail(rs):
    with pytest.raises(ValueError, match="rejection_sampling"):
        areal_adapter.resolve_hyperparameters(
            "decoupled_ppo", {"rejection_sampling": RejectionSamplingConfig(**rs)}, {}
        )


def test_unknown_loss_name_lists_ours():
    with pytest.raises(KeyError, match="available losses"):
        areal_adapter.use_loss("not_a_loss")
    assert areal_actor.grpo_loss_fn.__name__ == "grpo_loss_fn"


def test_stable_step_at_arealss_optimizer_calls():
    """AReaL's FSDPEngine.train_batch: zero_grad, loss per micro-batch, optimizer.step()."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, T)
    engine = types.SimpleNamespace(optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3))
    wrapped = areal_adapter.install_stable_step(engine)
    loss_fn = areal_adapter.make_loss_fn("vcpo")
    data = actor_data(2)
    try:
        engine.optimizer.zero_grad()
        for micro in (slice(0, 2), slice(2, 4)):
            lp = torch.nn.functional.logsigmoid(model(torch.randn(2, 3)))
            mb = {k: v[micro] for k, v in data.items()}
            loss_fn(lp, torch.zeros_like(lp), mb, current_version=3).backward()
        engine.optimizer.step()
    finally:
        areal_adapter.uninstall()
        stats_tracker.export_all(reset=True)
    assert wrapped.last_metrics["vcpo/ess_num_seqs"] == B
    assert 0 < wrapped.last_metrics["vcpo/lr_scale"] <= 1
