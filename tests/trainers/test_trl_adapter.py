"""`StableGRPOTrainer` against the real TRL ``GRPOTrainer`` (no mock of TRL).

* It trains 3 steps with every registered loss, with ESS-LR and GAC on, on a tiny offline Qwen2
  whose rollouts come from a stub ``rollout_func`` (TRL is told they come from vLLM, so it
  computes old log-probs and its IS ratio; every 5th engine log-prob is "unscored"). For the
  top-K losses the stub also returns a lagged policy's ``topk_ids`` / ``topk_logprobs``; without
  them a top-K loss fails with a message naming the missing keys.
* With the default loss (the equivalent of ``loss_type``) the loss that ``_compute_loss``
  returns, and the parameter gradients, equal ``GRPOTrainer``'s on the same inputs, with
  gradient accumulation 2 (TRL's GA scaling) and with TRL's vLLM IS correction.
* LoRA: only adapter parameters enter GAC and the ESS-LR wrapper.
"""

import math
import types

import pytest
import torch

import stable_async as sa
from sa_testing import tiny_causal_lm
from trl_helpers import assert_same_loss_and_grads as _assert_same
from trl_helpers import grpo_config, length_reward, make_trainer, pretend_vllm

pytestmark = pytest.mark.trainers
trl = pytest.importorskip("trl")
pytest.importorskip("datasets")

from stable_async.integrations.trl import (  # noqa: E402
    TOPK_IDS_KEY,
    TOPK_LOGPROBS_KEY,
    StableGRPOTrainer,
)

TRL_CLIP_METRICS = (
    "clip_ratio/low_mean",
    "clip_ratio/low_min",
    "clip_ratio/high_mean",
    "clip_ratio/high_max",
    "clip_ratio/region_mean",
)
OUR_METRICS = (
    *TRL_CLIP_METRICS,
    "stable_async/vcpo/ess_ratio",
    "stable_async/rollout_logprobs_source",
    "stable_async/rollout_logprobs_unscored_frac",
    "stable_async/trl_is_applied",
    "stable_async/vcpo/lr_scale",
    "stable_async/gac/grad_norm",
    "entropy",
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny_causal_lm(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")


# ---------------------------------------------------------------------------- training
@pytest.mark.parametrize("loss_name", sa.available_losses())
def test_every_loss_trains_with_ess_lr_and_gac(tiny_model, tmp_path, loss_name):
    kwargs = {"policy_loss": loss_name, "ess_lr": True, "gac": True}
    topk = 4 if loss_name.startswith("dppo_topk") else 0
    trainer = make_trainer(
        StableGRPOTrainer, tiny_model, tmp_path, vllm=True, nan_every=5, topk=topk, trainer_kwargs=kwargs
    )
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert len(steps) == 3 and all(math.isfinite(h["loss"]) for h in steps)
    for name in OUR_METRICS:
        assert name in steps[-1], name
    assert steps[-1]["stable_async/rollout_logprobs_source"] == 1.0
    assert steps[-1]["stable_async/rollout_logprobs_unscored_frac"] > 0
    assert 0 < steps[-1]["stable_async/vcpo/ess_ratio"] <= 1
    assert "stable_async/gac/cos" in steps[-1]  # defined from the second step on
    assert isinstance(trainer._sa_ess_lr, sa.ESSScaledLR) and trainer._sa_ess_lr.num_steps == 3
    moved = any(not torch.equal(a, b.detach()) for a, b in zip(before, trainer.model.parameters()))
    assert moved or loss_name == "m2po"  # m2po may mask every token of a tiny stale batch
    # The IS rule: losses that weight by μ themselves never get TRL's ratio on top.
    reweights = loss_name in {"decoupled_ppo", "vcpo", "prime_rl"} or loss_name.startswith("dppo_")
    assert steps[-1]["stable_async/trl_is_applied"] == (0.0 if reweights else 1.0)
    if topk:  # the top-K divergence was computed from the rollout's top-K and the current policy
        assert steps[-1]["stable_async/dppo/divergence_mean"] > 0
    if loss_name == "ppo":  # our clip fraction under our name, beside TRL's
        assert "stable_async/actor/ppo_kl" in steps[-1] and "stable_async/actor/pg_clipfrac" in steps[-1]
        assert "stable_async/rollout_corr/rollout_is_mean" in steps[-1]  # TRL's IS mode, translated
        assert "stable_async/actor/pg_loss" not in steps[-1]  # the Trainer logs `loss` itself


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_topk_fields_reach_the_loss_padded_and_current_topk_matches(tiny_model, tmp_path, temperature):
    trainer = make_trainer(
        StableGRPOTrainer,
        tiny_model,
        tmp_path,
        max_steps=1,
        topk=3,
        temperature=temperature,
        trainer_kwargs={"policy_loss": "dppo_topk_tv"},
    )
    trainer.model.train()
    inputs = trainer._generate_and_score_completions([{"prompt": "w1 w2"}] * 4)
    ids, lps, mask = inputs[TOPK_IDS_KEY], inputs[TOPK_LOGPROBS_KEY], inputs["completion_mask"].bool()
    assert ids.shape == lps.shape == (*mask.shape, 3) and ids.dtype == torch.long
    # The sampled token is among the top-K, and its log-prob is the sampler's.
    at_sampled = ids == inputs["completion_ids"][..., None]
    assert at_sampled.any(-1)[mask].all()
    sampled_lp = (lps * at_sampled).sum(-1)
    scored = mask & ~torch.isnan(inputs["sampling_per_token_logps"])
    torch.testing.assert_close(sampled_lp[scored], inputs["sampling_per_token_logps"][scored])
    assert (ids[~mask] == 0).all() and (lps[~mask] == 0).all()
    # The current policy at the top-K ids (extra forward, divided by the temperature) agrees with
    # TRL's fused-head log-probs.
    ids_all = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    fields = trainer._sa_current_topk(trainer.model, inputs, ids_all, attention)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids_all, attention, mask.shape[1])
    current = (fields["current_topk_logprobs"] * at_sampled).sum(-1)
    torch.testing.assert_close(current[mask], logps[mask], rtol=1e-4, atol=1e-5)


def test_topk_loss_without_topk_fields_names_the_missing_keys(tiny_model, tmp_path):
    trainer = make_trainer(
        StableGRPOTrainer, tiny_model, tmp_path, max_steps=1, trainer_kwargs={"policy_loss": "dppo_topk_kl"}
    )
    with pytest.raises(ValueError, match=r"lack \['topk_ids', 'topk_logprobs'\]"):
        trainer.train()


def test_topk_loss_without_rollout_func_fails_at_construction(tiny_model, tmp_path):
    datasets = pytest.importorskip("datasets")
    path, tokenizer = tiny_model
    with pytest.raises(ValueError, match="rollout_func that returns"):
        StableGRPOTrainer(
            model=path,
            reward_funcs=length_reward,
            args=grpo_config(tmp_path),
            train_dataset=datasets.Dataset.from_dict({"prompt": ["w1"] * 4}),
            processing_class=tokenizer,
            policy_loss="dppo_topk_tv",
        )


def test_without_sampler_logprobs_old_logprobs_stand_in(tiny_model, tmp_path):
    trainer = make_trainer(StableGRPOTrainer, tiny_model, tmp_path, max_steps=1, trainer_kwargs={"policy_loss": "vcpo"})
    trainer.model.train()
    trainer.create_optimizer()
    inputs = trainer._generate_and_score_completions([{"prompt": "w1 w2"}] * 4)
    inputs.pop("sampling_per_token_logps")  # what TRL holds with transformers generation (no vLLM)
    trainer._compute_loss(trainer.model, inputs).backward()
    assert trainer._metrics["train"]["stable_async/rollout_logprobs_source"][-1] == 0.0
    trainer.optimizer.step()  # without ess_lr the ESS is measured, the LR is not scaled
    assert trainer._metrics["train"]["stable_async/vcpo/ess_ratio"][-1] == pytest.approx(1.0)
    assert trainer._metrics["train"]["stable_async/vcpo/lr_scale"][-1] == 1.0


def test_two_trainers_in_one_process_step_with_their_own_ess(tiny_model, tmp_path):
    """Interleaved micro-batches of two trainers: each step reduces its own records only."""
    options = {"trainer_kwargs": {"ess_lr": True}}
    trainers = {
        "on_policy": make_trainer(StableGRPOTrainer, tiny_model, tmp_path / "a", **options),
        "stale": make_trainer(StableGRPOTrainer, tiny_model, tmp_path / "b", vllm=True, **options),
    }
    batches = {}
    for name, trainer in trainers.items():
        trainer.model.train()
        trainer.create_optimizer()
        batches[name] = trainer._generate_and_score_completions([{"prompt": "w1 w2"}] * 4)
    batches["on_policy"].pop("sampling_per_token_logps")  # μ = π_θ: ESS/N = 1
    inputs = batches["stale"]
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad():
        logps, _, _ = trainers["stale"]._get_per_token_logps_and_entropies(
            trainers["stale"].model, ids, attention, inputs["completion_ids"].size(1)
        )
    mu = torch.where(torch.isnan(inputs["sampling_per_token_logps"]), logps, inputs["sampling_per_token_logps"])
    expected = sa.effective_sample_size(logps - mu, inputs["completion_mask"].bool()).ess_ratio
    assert expected < 0.99
    for _ in range(3):  # gradient accumulation, the two trainers' micro-batches interleaved
        for name, trainer in trainers.items():
            trainer._compute_loss(trainer.model, dict(batches[name])).backward()
    for trainer in trainers.values():
        trainer.optimizer.step()
    logged = {name: t._metrics["train"]["stable_async/vcpo/ess_ratio"] for name, t in trainers.items()}
    assert logged["on_policy"] == [pytest.approx(1.0)]  # one step, one value: nothing of the other trainer
    assert logged["stale"] == [pytest.approx(expected, rel=1e-5)]
    assert trainers["stale"]._metrics["train"]["stable_async/vcpo/ess_missing"] == [0.0]
    # Bounded memory: the accumulator is a fixed vector, whatever the number of micro-batches.
    acc = trainers["stale"]._sa_accumulator
    for _ in range(20):
        trainers["stale"]._compute_loss(trainers["stale"].model, dict(inputs))
    assert acc.num_records == 20 and acc.state.numel() == len(sa.optim.accumulator.STATISTICS)


def test_lora_only_adapter_params_in_gac_and_ess_lr(tiny_model, tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = make_trainer(
        StableGRPOTrainer,
        tiny_model,
        tmp_path,
        vllm=True,
        trainer_kwargs={"peft_config": config, "policy_loss": "dppo_binary_tv", "ess_lr": True, "gac": True},
    )
    trainer.train()
    lora = {id(p) for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad == (id(p) in lora) for p in trainer.model.parameters())
    assert {id(p) for p in trainer._sa_gac.params} == lora
    in_optimizer = {id(p) for group in trainer._sa_ess_lr.param_groups for p in group["params"]}
    assert in_optimizer == lora
    assert trainer._sa_ess_lr.num_steps == 3 and trainer._sa_gac.step == 3


# ---------------------------------------------------------------------------- parity with GRPOTrainer
def _pair(tiny_model, tmp_path, vllm_is=False, **config):
    """A GRPOTrainer and a StableGRPOTrainer on the same weights, GA = 2, and one shared input batch."""
    pair = []
    for cls in (trl.GRPOTrainer, StableGRPOTrainer):
        trainer = make_trainer(cls, tiny_model, tmp_path / cls.__name__, gradient_accumulation_steps=2, **config)
        pretend_vllm(trainer)
        trainer.vllm_importance_sampling_correction = vllm_is
        trainer.model.double()
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 2
        pair.append(trainer)
    theirs, ours = pair
    pretend_vllm(theirs)  # old log-probs and the IS ratio are always computed for the shared inputs
    inputs = theirs._generate_and_score_completions([{"prompt": p} for p in ["w1 w2 w3", "w4 w5"] for _ in range(4)])
    theirs.vllm_importance_sampling_correction = vllm_is
    gen = torch.Generator().manual_seed(3)
    old = inputs["old_per_token_logps"]  # stale, so that ratios leave the clip range
    inputs["old_per_token_logps"] = old + 0.3 * torch.randn(old.shape, generator=gen, dtype=old.dtype)
    inputs["advantages"] = torch.randn(inputs["advantages"].shape, generator=gen)
    return theirs, ours, inputs


def _loss_and_grads(trainer, inputs):
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    loss = trainer.compute_loss(trainer.model, dict(inputs))
    return loss.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize(
    ("loss_type", "extra"),
    [
        ("grpo", {}),
        ("bnpo", {"epsilon_high": 0.28}),
        ("dr_grpo", {}),
        ("dapo", {"epsilon_high": 0.28}),
        ("dapo", {"delta": 1.5}),
        ("cispo", {"epsilon_high": 1.2}),
        ("sapo", {}),
        ("grpo", {"importance_sampling_level": "sequence", "epsilon": 3e-3, "epsilon_high": 4e-3}),
    ],
)
def test_default_loss_matches_grpo_trainer(tiny_model, tmp_path, loss_type, extra):
    theirs, ours, inputs = _pair(tiny_model, tmp_path, loss_type=loss_type, **extra)
    _assert_same(_loss_and_grads(ours, inputs), _loss_and_grads(theirs, inputs))
    # TRL's clip metrics, under TRL's names, equal TRL's on the same inputs (cispo: TRL logs only
    # the upper clip, as cispo_clip_ratio; sapo: none).
    logged = {name: ours._metrics["train"][name][-1] for name in TRL_CLIP_METRICS}
    if loss_type == "cispo":
        assert logged["clip_ratio/high_mean"] == pytest.approx(theirs._metrics["train"]["cispo_clip_ratio"][-1])
    elif loss_type != "sapo":
        assert logged == pytest.approx({name: theirs._metrics["train"][name][-1] for name in TRL_CLIP_METRICS})
    assert 0 < logged["clip_ratio/region_mean"] < 1  # the stale old log-probs leave the clip range somewhere


@pytest.mark.parametrize("mode", ["sequence_mask", "token_truncate"])
def test_vllm_is_correction_matches_grpo_trainer(tiny_model, tmp_path, mode):
    clip = {"vllm_importance_sampling_clip_max": 20.0 if mode.startswith("sequence") else 3.0}
    theirs, ours, inputs = _pair(
        tiny_model, tmp_path, vllm_is=True, loss_type="dapo", vllm_importance_sampling_mode=mode, **clip
    )
    # TRL builds its ratio from the old log-probs of generation time; use those (not the stale ones).
    inputs["old_per_token_logps"] = inputs["old_per_token_logps"].detach() * 0 + _fresh_old(theirs, inputs)
    expected = _loss_and_grads(theirs, inputs)
    _assert_same(_loss_and_grads(ours, inputs), expected)
    assert ours._metrics["train"]["stable_async/trl_is_applied"][-1] == 1.0

    # The same correction passed explicitly replaces TRL's ratio: still equal, so not applied twice.
    level, how = mode.split("_")
    explicit = make_trainer(
        StableGRPOTrainer,
        tiny_model,
        tmp_path / "explicit",
        gradient_accumulation_steps=2,
        loss_type="dapo",
        trainer_kwargs={"correction": sa.RolloutCorrection(level=level, mode=how, high=clip[next(iter(clip))])},
    )
    pretend_vllm(explicit)
    explicit.model.double()
    explicit.model.train()
    explicit.current_gradient_accumulation_steps = 2
    _assert_same(_loss_and_grads(explicit, inputs), expected)
    assert explicit._metrics["train"]["stable_async/trl_is_applied"][-1] == 0.0


def _fresh_old(trainer, inputs):
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, attention, inputs["completion_ids"].size(1)
        )
    mask = inputs["completion_mask"].bool()
    # Recompute TRL's IS ratio from these, exactly as _generate_and_score_completions does.
    diff = torch.nan_to_num((logps - inputs["sampling_per_token_logps"]) * mask, nan=0.0)
    if trainer.vllm_importance_sampling_mode.startswith("sequence"):
        ratio = torch.exp(diff.sum(-1, keepdim=True))
        ratio = ratio.masked_fill(ratio > trainer.vllm_importance_sampling_clip_max, 0.0)
    else:
        ratio = torch.exp(diff).clamp(max=trainer.vllm_importance_sampling_clip_max)
    inputs["importance_sampling_ratio"] = ratio
    return logps


def test_a_loss_registered_with_declarations_needs_no_adapter_edit(tiny_model, tmp_path, monkeypatch):
    """The IS rule reads the registry: a new loss declaring weights_by_rollout never gets TRL's ratio too."""
    from stable_async import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # restored after the test
    spec = sa.loss_spec("reinforce")
    for name, weights in (("my_reweighting", True), ("my_plain", False)):
        sa.register_loss(name, config=spec.config, weights_by_rollout=weights)(spec.fn)
        ours = make_trainer(
            StableGRPOTrainer, tiny_model, tmp_path / name, vllm=True, trainer_kwargs={"policy_loss": name}
        )
        ours.model.train()
        inputs = ours._generate_and_score_completions([{"prompt": "w1 w2"}] * 4)
        ours.compute_loss(ours.model, inputs)
        assert ours._metrics["train"]["stable_async/trl_is_applied"][-1] == float(not weights)


@pytest.mark.parametrize(("loss_type", "vllm_is"), [("dapo", False), ("grpo", True)])
def test_off_policy_mask_threshold_is_translated_to_opsm(tiny_model, tmp_path, loss_type, vllm_is):
    """TRL's off_policy_mask_threshold becomes sa.opsm(threshold), composed with TRL's IS mode."""
    theirs, ours, inputs = _pair(
        tiny_model, tmp_path, vllm_is=vllm_is, loss_type=loss_type, off_policy_mask_threshold=0.45
    )
    if vllm_is:
        inputs["old_per_token_logps"] = inputs["old_per_token_logps"].detach() * 0 + _fresh_old(theirs, inputs)
    _assert_same(_loss_and_grads(ours, inputs), _loss_and_grads(theirs, inputs))
    masked = ours._metrics["train"]["stable_async/opsm/masked_fraction"][-1]
    assert 0 < masked < 1  # some negative-advantage sequences are beyond δ, some are not
    assert ours._metrics["train"]["stable_async/trl_is_applied"][-1] == float(vllm_is)


@pytest.mark.parametrize("bias_correction", [True, False])
def test_kl_term_matches_grpo_trainer(tiny_model, tmp_path, bias_correction):
    theirs, ours, inputs = _pair(
        tiny_model, tmp_path, loss_type="grpo", beta=0.1, use_bias_correction_kl=bias_correction
    )
    gen = torch.Generator().manual_seed(5)
    ref = inputs["ref_per_token_logps"]
    inputs["ref_per_token_logps"] = ref + 0.2 * torch.randn(ref.shape, generator=gen, dtype=ref.dtype)
    _assert_same(_loss_and_grads(ours, inputs), _loss_and_grads(theirs, inputs))


# ---------------------------------------------------------------------------- errors and DeepSpeed hook
@pytest.mark.parametrize(
    ("kwargs", "config", "match"),
    [
        ({"policy_loss": "nope"}, {}, "unknown loss"),
        ({"correction": True}, {}, "correction"),
        ({"ess_lr": "yes"}, {}, "ess_lr"),
        ({"gac": {"mode": "bogus"}}, {}, "^gac: .*mode"),
        ({"gac": {"treshold": 0.5}}, {}, "^gac: unknown key 'treshold'"),
        ({"gac": {"memory": "sketch"}}, {}, "^gac: .*memory='sketch'"),
        ({"gac": {"strength": True}}, {}, "^gac: .*strength"),
        ({"ess_lr": {"rule": "cubic"}}, {}, "^ess_lr: .*rule"),
        ({"ess_lr": {"on_misisng": "skip"}}, {}, "^ess_lr: unknown key 'on_misisng'"),
        ({}, {"loss_type": "vespo"}, "policy_loss"),
        ({}, {"top_entropy_quantile": 0.5}, "top_entropy_quantile"),
        ({"correction": "icepop"}, {}, "^correction:"),
    ],
)
def test_clear_errors(tiny_model, tmp_path, kwargs, config, match):
    with pytest.raises((ValueError, TypeError, KeyError), match=match):
        make_trainer(StableGRPOTrainer, tiny_model, tmp_path, trainer_kwargs=kwargs, **config)


def test_deepspeed_hook_runs_gac_and_ess_lr_inside_the_engine_step(tiny_model, tmp_path):
    """The hook on a DeepSpeed-like engine (``engine.optimizer.optimizer`` is the torch optimizer)."""
    trainer = make_trainer(
        StableGRPOTrainer, tiny_model, tmp_path, trainer_kwargs={"ess_lr": True, "gac": {"mode": "monitor"}}
    )
    param = torch.nn.Parameter(torch.ones(3))
    sgd = torch.optim.SGD([param], lr=1.0)
    engine = types.SimpleNamespace(optimizer=types.SimpleNamespace(optimizer=sgd), zero_optimization_stage=lambda: 2)
    trainer.install_deepspeed_hooks(engine)
    assert trainer._sa_ds_hooked
    # What _compute_loss records: four sequences, one carrying all the weight (ESS = 1 of N = 4).
    log_w = torch.tensor([[0.0], [-60.0], [-60.0], [-60.0]])
    trainer._sa_accumulator.record_log_weights(log_w)
    param.grad = torch.ones(3)
    sgd.step()  # DeepSpeed calls this inside engine.step()
    torch.testing.assert_close(param.detach(), torch.full((3,), 0.5))  # lr 1.0 · sqrt(ESS/N = 0.25)
    assert sgd.param_groups[0]["lr"] == 1.0
    assert trainer._metrics["train"]["stable_async/gac/grad_norm"][-1] == pytest.approx(math.sqrt(3))
    assert trainer._metrics["train"]["stable_async/vcpo/lr_scale"][-1] == pytest.approx(0.5)
    assert trainer._sa_accumulator.num_records == 0  # cleared by its own step


def test_gac_skip_cancels_the_trainer_step(tiny_model, tmp_path):
    gac = {"mode": "skip", "threshold": -1.0}  # every step after the first is "aligned"
    trainer = make_trainer(
        StableGRPOTrainer, tiny_model, tmp_path, vllm=True, trainer_kwargs={"ess_lr": True, "gac": gac}
    )
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h]
    skipped = [h["step"] for h in steps if h["stable_async/gac/action"] == 2.0]
    assert skipped and trainer._sa_gac.step == 3  # a step whose gradient is 0 (equal rewards) passes
    assert trainer._sa_ess_lr.num_steps == 3 - len(skipped)  # skipped steps never reached the optimizer
    assert all("stable_async/vcpo/lr_scale" not in h for h in steps if h["step"] in skipped)
