"""`StableAsyncGRPOTrainer` against TRL's own ``trl.experimental.async_grpo.AsyncGRPOTrainer`` (TRL 1.16).

TRL's trainer class, model loading, fused LM head, tree packing and collator run unchanged on CPU,
with two substitutions for GPU-only pieces, both in this module: the FA3 varlen kernel behind TRL's
``tree_fa3`` attention is replaced by the same computation in plain torch (`cpu_tree_attention`),
and ``get_peak_flops_per_device`` (which asks ``torch.cuda`` for the device name in the
constructor) returns None. The rollout worker and the weight transfer are TRL's injection points,
given no-op stand-ins; batches are built with TRL's ``TreeRow`` + ``DataCollatorForRollout``.

* With the default loss (``ppo``, TRL's ε, ``token-mean``): ``compute_loss`` returns TRL's loss and
  parameter gradients (fp64 model), and TRL's metrics under TRL's names equal TRL's.
* A rollout-anchored loss with ESS-LR and GAC takes optimizer steps through the Trainer's path.
"""

import pytest
import torch

from sa_testing import loglinear_alpha_mean, tiny_causal_lm
from trl_helpers import (
    NoRolloutWorker,
    NoWeightTransfer,
    assert_same_loss_and_grads,
    async_grpo_batch,
    async_grpo_samples,
    cpu_tree_attention,
)

pytestmark = pytest.mark.trainers
pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
async_module = pytest.importorskip("trl.experimental.async_grpo.async_grpo_trainer")

from stable_async.integrations.trl_async import StableAsyncGRPOTrainer, segments_to_rows  # noqa: E402

TRL_METRICS = ("ratio", "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
               "clip_ratio/low_min", "clip_ratio/high_max")  # fmt: skip


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny_causal_lm(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(autouse=True)
def _cpu(monkeypatch):
    from transformers import AttentionInterface

    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    monkeypatch.setattr(async_module, "get_peak_flops_per_device", lambda accelerator, dtype: None)
    monkeypatch.setattr(async_module, "register_tree_attention", lambda: None)
    AttentionInterface.register(async_module.TREE_ATTENTION, cpu_tree_attention)


def make(cls, tiny_model, tmp_path, samples=(), **kwargs):
    path, tokenizer = tiny_model
    args = async_module.AsyncGRPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], dtype="float32", max_steps=2,
        per_device_train_batch_size=2, token_budget=0, epsilon_high=0.28, learning_rate=1e-3, seed=0,
    )  # fmt: skip
    return cls(
        model=path,
        reward_funcs=[],
        args=args,
        train_dataset=datasets.Dataset.from_dict({"prompt": ["w1 w2"] * 4}),
        processing_class=tokenizer,
        rollout_worker=NoRolloutWorker(samples),
        weight_transfer=NoWeightTransfer(),
        **kwargs,
    )


def loss_and_grads(trainer, batch):
    trainer.model.double().train()
    trainer.current_gradient_accumulation_steps = 2
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    inputs = {k: v.double() if k in ("old_log_probs", "advantages") else v for k, v in batch.items()}
    loss = trainer.compute_loss(trainer.model, inputs)
    return loss.detach(), torch.autograd.grad(loss, params)


def test_segments_to_rows_lays_out_each_completion_in_order():
    seg = torch.tensor([0, 0, 0, 1, 2, 2])
    values = torch.arange(6.0, requires_grad=True)
    (rows, mask) = segments_to_rows(seg, values)
    assert rows.tolist() == [[0.0, 1.0, 2.0], [3.0, 0.0, 0.0], [4.0, 5.0, 0.0]]
    assert mask.tolist() == [[True, True, True], [True, False, False], [True, True, False]]
    (grad,) = torch.autograd.grad((rows * torch.arange(9.0).view(3, 3)).sum(), values)
    assert grad.tolist() == [0.0, 1.0, 2.0, 3.0, 6.0, 7.0]


def test_default_loss_matches_async_grpo_trainer(tiny_model, tmp_path):
    theirs = make(async_module.AsyncGRPOTrainer, tiny_model, tmp_path / "theirs")
    ours = make(StableAsyncGRPOTrainer, tiny_model, tmp_path / "ours")
    batch = async_grpo_batch(async_grpo_samples(seed=1))
    assert_same_loss_and_grads(loss_and_grads(ours, batch), loss_and_grads(theirs, batch))
    for name in TRL_METRICS:
        assert ours._metrics["train"][name][-1] == pytest.approx(theirs._metrics["train"][name][-1], rel=1e-6), name
    assert 0 < ours._metrics["train"]["clip_ratio/region_mean"][-1] < 1  # engine log-probs far from π_θ
    assert ours._step_trained_tokens == theirs._step_trained_tokens > 0


def test_rollout_anchored_loss_with_ess_lr_and_gac_steps_through_the_trainer(tiny_model, tmp_path):
    import stable_async as sa

    trainer = make(StableAsyncGRPOTrainer, tiny_model, tmp_path, policy_loss="vcpo", ess_lr=True, gac=True)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's loop
    before = [p.detach().clone() for p in trainer.model.parameters()]
    for seed in (1, 2):
        batch = async_grpo_batch(async_grpo_samples(seed=seed))
        trainer.compute_loss(trainer.model, batch).backward()
        expected = trainer._sa_accumulator.reduce().sequence.ess_ratio
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
    metrics = trainer._metrics["train"]
    assert metrics["stable_async/vcpo/ess_ratio"][-1] == pytest.approx(expected) and expected < 1
    assert metrics["stable_async/vcpo/lr_scale"][-1] == pytest.approx(expected**0.5)
    assert "stable_async/gac/cos" in metrics and isinstance(trainer.optimizer, sa.ESSScaledLR)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, trainer.model.parameters()))


def test_trains_through_async_grpo_trainer_loop(tiny_model, tmp_path):
    """TRL's own loop: queue reader, staleness filter, batcher, collator, our loss, our optimizer step."""
    samples = [s for seed in range(4) for s in async_grpo_samples(seed=seed)]
    trainer = make(StableAsyncGRPOTrainer, tiny_model, tmp_path, samples, policy_loss="dppo_binary_tv", gac=True)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2
    for name in ("clip_ratio/region_mean", "stable_async/vcpo/ess_ratio", "stable_async/dppo/divergence_mean"):
        assert name in logged[-1], name
    assert "stable_async/gac/cos" in logged[-1] and trainer._sa_stepper.stable_step.gac.step == 2


# --------------------------------------------------------------------------- policy versions
def recorded_batches(trainer):
    """The list that gets each PolicyBatch the trainer's loss runs on (where its accumulator records it)."""
    seen = []
    record = trainer._sa_accumulator.record
    trainer._sa_accumulator.record = lambda b: seen.append(b) or record(b)
    return seen


def test_collated_versions_reach_the_loss_in_completion_order(tiny_model, tmp_path):
    """decoupled_ppo(proximal="loglinear") reads them: its α per completion from current − version, by hand."""
    from stable_async.integrations.trl_async_versions import VersionedCollator

    samples = async_grpo_samples(seed=3)
    for i, s in enumerate(samples):
        s["model_version"] = 7 - i % 4  # versions behind: 0, 1, 2, 3, 0, 1
    collator = VersionedCollator(0, num_processes=1, model_version_fn=lambda: 7)
    batch = async_grpo_batch(samples, collator=collator)
    assert batch["current_model_version"].tolist() == [7]
    assert batch["model_version"].tolist() == [[s["model_version"] for s in samples]]
    trainer = make(StableAsyncGRPOTrainer, tiny_model, tmp_path, policy_loss="decoupled_ppo",
                   loss_kwargs={"proximal": "loglinear"})  # fmt: skip
    seen = recorded_batches(trainer)
    trainer.current_gradient_accumulation_steps = 1
    trainer.compute_loss(trainer.model, batch)
    (b,) = seen
    assert b.current_version == 7
    assert b.versions[:, 0].tolist() == [s["model_version"] for s in samples]
    lengths = [int(s["completion_mask"].sum()) for s in samples]
    expected = loglinear_alpha_mean([s["model_version"] for s in samples], 7, lengths)  # by hand
    assert trainer._metrics["train"]["stable_async/actor/prox_alpha_mean"][-1] == pytest.approx(expected, rel=1e-6)


def test_without_versions_in_the_batch_none_are_passed(tiny_model, tmp_path):
    trainer = make(StableAsyncGRPOTrainer, tiny_model, tmp_path, policy_loss="decoupled_ppo",
                   loss_kwargs={"proximal": "loglinear"})  # fmt: skip
    trainer.current_gradient_accumulation_steps = 1
    with pytest.raises(ValueError, match="versions"):
        trainer.compute_loss(trainer.model, async_grpo_batch(async_grpo_samples(seed=3)))


def test_trl_loop_carries_each_samples_version_past_its_staleness_filter(tiny_model, tmp_path):
    """TRL's queue reader drops the samples staler than max_staleness; the others reach the loss with their version."""
    samples = [s for seed in range(4) for s in async_grpo_samples(seed=seed)]
    for i, s in enumerate(samples):
        s["model_version"] = 105 - (i % 7)  # after TRL's first sync (106): 1..7 behind; max_staleness=4 drops 5-7
    trainer = make(StableAsyncGRPOTrainer, tiny_model, tmp_path, samples, policy_loss="decoupled_ppo",
                   loss_kwargs={"proximal": "loglinear"})  # fmt: skip
    trainer.model_version = 105
    assert trainer.args.max_staleness == 4
    batches = recorded_batches(trainer)
    trainer.train()
    seen = [(b.versions[:, 0].tolist(), b.current_version) for b in batches]
    assert len(seen) == 2 and trainer.model_version == 108  # TRL syncs weights when training begins and per step
    current = seen[0][1]
    assert current == 106  # the trainer's version when the first micro-batch is collated
    kept = [s["model_version"] for s in samples if current - s["model_version"] <= 4]
    got = [v for versions, _ in seen for v in versions]
    assert sorted(got) == sorted(kept[: len(got)])  # the first kept samples, each with its own version
    assert len(kept) < len(samples) and all(c in (106, 107) for _, c in seen)
    assert all(c - v <= 4 for versions, c in seen for v in versions)
