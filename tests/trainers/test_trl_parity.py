"""TRL's GRPO loss types and vLLM importance-sampling modes, reproduced by stable-async.

The reference is TRL's own code on the same tensors: ``GRPOTrainer._compute_loss`` for the
loss and ``_generate_and_score_completions`` for the IS ratio. Rollouts come from a
``rollout_func`` that returns fixed completions and "engine" log-probs, and the trainer is told
it uses vLLM (with a no-op weight sync), so TRL computes its IS ratio itself. The model is a
tiny offline Qwen2 in float64; its fused LM head returns fp32 log-probs, so TRL's
loss runs in fp32 and the comparison tolerance is fp32's (rtol 1e-6), not fp64's.

Mapping (TRL → stable-async):
* grpo    → ``ppo``, aggregation ``seq-mean-token-mean``
* bnpo    → ``ppo``, ``token-mean`` (local count)
* dr_grpo → ``ppo``, ``seq-mean-token-sum-norm`` with ``norm_length = max_completion_length`` and
  ``global_num_seqs = B`` (TRL divides by every row, masked or not)
* dapo    → ``ppo``, ``token-mean`` with ``global_num_tokens = num_items_in_batch``
* cispo   → ``cispo`` with ``eps_low = 1`` (no lower bound) and ``eps_high = epsilon_high − 1``
  (TRL's ``epsilon_high`` is the absolute weight cap for cispo), aggregated like dapo
* ``delta`` (two-sided clipping) → ``ratio_cap``
* vLLM IS ``{token,sequence}_{truncate,mask}`` → ``RolloutCorrection(level, mode, low=clip_min,
  high=clip_max)`` on old = ``old_per_token_logps``, rollout = ``sampling_per_token_logps``.
"""

import pytest
import torch

import stable_async as sa
from sa_testing import tiny_causal_lm
from trl_helpers import assert_same_loss_and_grads as _assert_same

pytestmark = pytest.mark.trainers
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

PROMPTS = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10"]
GROUP = 4
MAX_COMPLETION = 6


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny_causal_lm(tmp_path_factory.mktemp("tiny"))


def _rollout_func(tokenizer, seed):
    gen = torch.Generator().manual_seed(seed)

    def rollout(prompts, trainer):
        completions, logprobs = [], []
        for _ in prompts:
            n = int(torch.randint(1, MAX_COMPLETION + 1, (1,), generator=gen))
            completions.append([int(x) for x in torch.randint(3, 32, (n,), generator=gen)])
            logprobs.append([float(x) for x in -3.0 - 0.5 * torch.randn(n, generator=gen)])
        return {
            "prompt_ids": [tokenizer(p)["input_ids"] for p in prompts],
            "completion_ids": completions,
            "logprobs": logprobs,
        }

    return rollout


def _trainer(tiny_model, tmp_path, seed=0, **config):
    path, tokenizer = tiny_model
    dataset = datasets.Dataset.from_dict({"prompt": PROMPTS * 2})

    def reward(completions, **kwargs):
        return [float(len(c) % 3) for c in completions]

    args = trl.GRPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to=[],
        per_device_train_batch_size=GROUP * 2,
        num_generations=GROUP,
        max_completion_length=MAX_COMPLETION,
        max_steps=1,
        **config,
    )
    trainer = trl.GRPOTrainer(  # rollout_func is experimental in TRL 1.16; the warning is expected
        model=path,
        reward_funcs=reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        rollout_func=_rollout_func(tokenizer, seed),
    )
    trainer.model.double()
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    # Pretend the completions came from vLLM so that TRL computes its own IS ratio.
    trainer.use_vllm = True
    trainer.vllm_importance_sampling_correction = True
    trainer._last_loaded_step = trainer.state.global_step
    trainer.vllm_generation = type("NoSync", (), {"sync_weights": lambda self: None})()
    return trainer


def _inputs(trainer, n_rows=GROUP * 2):
    rows = [{"prompt": PROMPTS[i % len(PROMPTS)]} for i in range(n_rows)]
    inputs = trainer._generate_and_score_completions(rows)
    gen = torch.Generator().manual_seed(3)
    # Stale old log-probs so that ratios leave the clip range.
    old = inputs["old_per_token_logps"]
    inputs["old_per_token_logps"] = old + 0.3 * torch.randn(old.shape, generator=gen, dtype=old.dtype)
    inputs["advantages"] = torch.randn(inputs["advantages"].shape, generator=gen)
    return inputs


def _current_logprobs(trainer, inputs):
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    logps, _, _ = trainer._get_per_token_logps_and_entropies(
        trainer.model, input_ids, attention, inputs["completion_ids"].size(1), compute_entropy=True
    )
    return logps


def _params(trainer):
    return [p for p in trainer.model.parameters() if p.requires_grad]


def _trl_loss_and_grads(trainer, inputs):
    loss = trainer._compute_loss(trainer.model, inputs)
    return loss.detach(), torch.autograd.grad(loss, _params(trainer))


def _our_loss_and_grads(trainer, inputs, loss_name, with_is=None, **kwargs):
    logps = _current_logprobs(trainer, inputs)
    mask = inputs["completion_mask"].bool()
    batch = sa.PolicyBatch(
        logprobs=logps,
        advantages=inputs["advantages"],
        mask=mask,
        old_logprobs=inputs["old_per_token_logps"],
        rollout_logprobs=torch.where(mask, inputs["sampling_per_token_logps"].double(), 0.0),
        global_num_tokens=kwargs.pop("global_num_tokens", None),
        global_num_seqs=kwargs.pop("global_num_seqs", None),
    )
    loss = sa.get_loss(loss_name, correction=with_is, **kwargs)(batch).loss
    return loss.detach(), torch.autograd.grad(loss, _params(trainer))


def _ppo_settings(trainer, loss_type, inputs):
    args = trainer.args
    eps_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    common = {"eps_low": args.epsilon, "eps_high": eps_high, "ratio_cap": args.delta}
    if loss_type == "grpo":
        return "ppo", {**common, "aggregation": "seq-mean-token-mean"}
    if loss_type == "bnpo":
        return "ppo", {**common, "aggregation": "token-mean"}
    if loss_type == "dr_grpo":
        rows = inputs["completion_mask"].shape[0]
        return "ppo", {
            **common,
            "aggregation": "seq-mean-token-sum-norm",
            "norm_length": args.max_completion_length,
            "global_num_seqs": rows,
        }
    tokens = float(inputs["num_items_in_batch"])
    if loss_type == "dapo":
        return "ppo", {**common, "aggregation": "token-mean", "global_num_tokens": tokens}
    return "cispo", {
        "eps_low": 1.0,
        "eps_high": args.epsilon_high - 1.0,
        "aggregation": "token-mean",
        "global_num_tokens": tokens,
    }


@pytest.mark.parametrize(
    ("loss_type", "extra"),
    [
        ("grpo", {}),
        ("bnpo", {"epsilon_high": 0.28}),
        ("dr_grpo", {}),
        ("dapo", {"epsilon_high": 0.28}),
        ("dapo", {"delta": 1.5}),
        ("cispo", {"epsilon_high": 1.2}),
    ],
)
def test_loss_types_match_trl(tiny_model, tmp_path, loss_type, extra):
    trainer = _trainer(tiny_model, tmp_path, loss_type=loss_type, **extra)
    inputs = _inputs(trainer)
    trainer.vllm_importance_sampling_correction = False  # compare the loss alone
    name, settings = _ppo_settings(trainer, loss_type, inputs)
    _assert_same(_our_loss_and_grads(trainer, inputs, name, **settings), _trl_loss_and_grads(trainer, inputs))


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize("clip_min", [None, 0.5])
def test_vllm_importance_sampling_modes_match_trl(tiny_model, tmp_path, mode, clip_min):
    clip_max = 3.0 if mode.startswith("token") else 20.0
    trainer = _trainer(
        tiny_model,
        tmp_path,
        loss_type="dapo",
        vllm_importance_sampling_mode=mode,
        vllm_importance_sampling_clip_max=clip_max,
        vllm_importance_sampling_clip_min=clip_min,
    )
    inputs = _inputs(trainer)
    level, how = mode.split("_")
    correction = sa.RolloutCorrection(level=level, mode=how, low=clip_min, high=clip_max)

    # The weights themselves (TRL recomputes old log-probs before the IS ratio; use its values).
    mask = inputs["completion_mask"].bool()
    old = _current_logprobs(trainer, inputs).detach()
    batch = sa.PolicyBatch(
        logprobs=old,
        advantages=inputs["advantages"],
        mask=mask,
        old_logprobs=old,
        rollout_logprobs=torch.where(mask, inputs["sampling_per_token_logps"].double(), 0.0),
    )
    theirs = inputs["importance_sampling_ratio"].expand_as(mask).double()
    ours = correction(batch).weights
    torch.testing.assert_close(ours[mask], theirs[mask], rtol=1e-6, atol=1e-9)  # TRL's ratio is built in fp32
    assert (ours[mask] == 0).any() or how == "truncate" or clip_min is None

    # And the loss with the correction applied, against TRL's loss (same fp32 IS ratio inside).
    inputs["old_per_token_logps"] = old
    inputs["importance_sampling_ratio"] = theirs.double() if level == "token" else theirs[:, :1].double()
    name, settings = _ppo_settings(trainer, "dapo", inputs)
    ours_loss = _our_loss_and_grads(trainer, inputs, name, with_is=correction, **settings)
    theirs_loss = _trl_loss_and_grads(trainer, inputs)
    _assert_same(ours_loss, theirs_loss)
