"""A few StableGRPOTrainer steps on a tiny offline model, on CPU, in seconds.

    HF_HUB_OFFLINE=1 python integrations/trl/train_tiny_offline.py [--loss dppo_binary_tv] [--steps 6]

No download: the tokenizer is a word-level vocabulary and the model a 2-layer Qwen2 built from a
config. Rollouts come from a ``rollout_func`` that samples from a *stale copy* of the policy
(refreshed every ``--lag`` steps) and reports that copy's log-probs, as an asynchronous engine
would; TRL passes them on as ``sampling_per_token_logps`` and the adapter uses them as the
rollout policy μ. The run prints the stable-async metrics of every step.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from trl import GRPOConfig

from stable_async.integrations.trl import StableGRPOTrainer

WORDS = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(29)]


def tiny_model(directory: str) -> tuple[str, PreTrainedTokenizerFast]:
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        tie_word_embeddings=True,
    )
    path = os.path.join(directory, "tiny-qwen2")
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, tokenizer


def stale_rollout_func(tokenizer: PreTrainedTokenizerFast, max_new_tokens: int, lag: int):
    """Sample from a copy of the policy refreshed every ``lag`` optimizer steps; report its log-probs."""
    state: dict = {"engine": None, "version": -(10**9)}

    @torch.no_grad()
    def rollout(prompts: list[str], trainer: StableGRPOTrainer) -> dict:
        step = trainer.state.global_step
        if step - state["version"] >= lag:  # "weight sync" of the asynchronous engine
            state["engine"] = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.model)).eval()
            state["version"] = step
        engine = state["engine"]
        prompt_ids, completion_ids, logprobs = [], [], []
        for prompt in prompts:
            ids = tokenizer(prompt)["input_ids"]
            out = engine.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=True,
                max_new_tokens=max_new_tokens,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
            new = out.sequences[0, len(ids) :].tolist()
            scores = torch.stack(out.scores)[:, 0].log_softmax(-1)
            prompt_ids.append(ids)
            completion_ids.append(new)
            logprobs.append([float(scores[t, tok]) for t, tok in enumerate(new)])
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs}

    return rollout


PROMPTS = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10"]


def tiny_grpo_config(output_dir: str, steps: int, **overrides) -> GRPOConfig:
    """The CPU settings of these recipes: 2 groups of 4 completions of up to 8 tokens per step."""
    settings = {
        "output_dir": output_dir,
        "use_cpu": True,
        "bf16": False,
        "report_to": [],
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "max_completion_length": 8,
        "max_steps": steps,
        "logging_steps": 1,
        "save_strategy": "no",
        "learning_rate": 1e-3,
        "disable_tqdm": True,
        "seed": 0,
    }
    return GRPOConfig(**{**settings, **overrides})


def reward_short_even(completions: list[str], **kwargs) -> list[float]:
    """A toy reward: completions whose word count is even score 1."""
    return [float(len(c.split()) % 2 == 0) for c in completions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", default="dppo_binary_tv", help="a stable-async loss name")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--lag", type=int, default=2, help="optimizer steps between engine weight syncs")
    parser.add_argument("--no-ess-lr", action="store_true")
    parser.add_argument("--no-gac", action="store_true")
    opts = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path, tokenizer = tiny_model(tmp)
        args = tiny_grpo_config(os.path.join(tmp, "out"), opts.steps)
        trainer = StableGRPOTrainer(
            model=path,
            reward_funcs=reward_short_even,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": PROMPTS * 8}),
            processing_class=tokenizer,
            rollout_func=stale_rollout_func(tokenizer, args.max_completion_length, opts.lag),
            policy_loss=opts.loss,
            ess_lr=not opts.no_ess_lr,
            gac=False if opts.no_gac else {"mode": "project", "threshold": 0.5},
        )
        trainer.train()

    shown = ("loss", "reward", "stable_async/vcpo/ess_ratio", "stable_async/vcpo/lr_scale", "stable_async/gac/cos")
    print(f"\n{'step':>4}  " + "  ".join(f"{name.removeprefix('stable_async/'):>14}" for name in shown))
    for record in trainer.state.log_history:
        if "loss" in record:
            cells = [f"{record[name]:14.4f}" if name in record else f"{'-':>14}" for name in shown]
            print(f"{record['step']:>4}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
