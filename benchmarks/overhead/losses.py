"""Loss forward+backward time and peak memory: stable-async against each trainer's own loss code.

Every pair runs on identical inputs (fp32 log-probs, as the trainers produce them; right-padded
masks with lengths in [T/2, T]; one advantage per sequence broadcast over its tokens) and is first
checked to give the same loss value and gradient. Each trainer gets its inputs in the form its own
update path hands its loss (veRL a bool response mask, OpenRLHF an int64 action mask, see
`reference_mask`; TRL an int completion mask and (B,) advantages), stable-async a bool mask, all
built outside the timed region. As a control, veRL's and OpenRLHF's references are also timed with a
float32 mask (the protocol of earlier rounds), interleaved in the same run: ``ratio_batch_float_ref``
is ``+batch`` against that float-mask reference, ``ref_float_ratio`` the float-mask reference's
time over the native one's.

Variants of ours:

* ``+batch``: ``PolicyBatch(...)`` construction with the default validation (finiteness of every
  value at a valid position), then the loss, then ``backward()``: what a user pays per micro-batch.
* ``+batch nocheck``: the same with ``check_finite=False``.
* ``prebuilt``: the loss and ``backward()`` on an already built batch (the loss's own cost).
* ``+batch compiled`` (``--compile``; ``ppo``, ``gspo``, ``gspo_token``): ``+batch`` with the
  loss's ``compile=True`` setting (the same readable surrogate through ``torch.compile``).

References (the trainer's code, called, never copied):

* veRL ``vanilla`` (dual clip c = 3), ``gspo``, ``cispo``, ``dppo_tv``, ``dppo_kl`` via
  ``core_algos.get_policy_loss_fn``; ours ``ppo(dual_clip=3)``, ``gspo_token``, ``cispo``,
  ``dppo_binary_tv/kl(anchor="old")``.
* OpenRLHF ``PolicyLoss`` (ppo, token-level); ours ``ppo``.
* TRL ``GRPOTrainer._compute_loss`` (``loss_type="dapo"``, TRL's default) on a tiny offline
  trainer whose ``_get_per_token_logps_and_entropies`` is replaced by a stub returning the fixed
  log-probs and entropies: TRL's own loss code (and its metric logging) on identical inputs;
  ours ``ppo`` with ``token-mean`` over ``global_num_tokens = num_items_in_batch``.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import interleaved, peak_memory

import stable_async as sa

TESTS = Path(__file__).resolve().parents[2] / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

SIZES = [(8, 512), (16, 1024), (64, 2048), (64, 4096)]
QUICK_SIZES = [(8, 512), (64, 2048)]
CASES = ["verl:vanilla", "verl:gspo", "verl:cispo", "verl:dppo_tv", "verl:dppo_kl", "openrlhf:PolicyLoss", "trl:dapo"]


@dataclass
class Inputs:
    lp: torch.Tensor  # (B, T) leaf, requires grad
    old: torch.Tensor
    adv_seq: torch.Tensor  # (B,)
    adv: torch.Tensor  # (B, T) contiguous
    mask: torch.Tensor  # bool
    maskf: torch.Tensor  # float32
    maski: torch.Tensor  # int64 (TRL)


def make_inputs(B: int, T: int, seed: int = 0) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    lp = -4.0 + 3.99 * torch.rand(B, T, generator=g)
    old = (lp + 0.3 * torch.randn(B, T, generator=g)).clamp(max=-1e-3)
    adv_seq = torch.randn(B, generator=g)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    return Inputs(
        lp=lp.requires_grad_(True),
        old=old,
        adv_seq=adv_seq,
        adv=adv_seq.unsqueeze(-1).expand(B, T).contiguous(),
        mask=mask,
        maskf=mask.float(),
        maski=mask.long(),
    )


# ----------------------------------------------------------------------------- references
_TRL: dict[str, Any] = {}


def _trl_trainer():
    """A tiny offline GRPOTrainer (as in tests/trainers/test_trl_parity.py), built once."""
    if "trainer" in _TRL:
        return _TRL["trainer"]
    import datasets
    import trl

    from sa_testing import tiny_causal_lm

    tmp = tempfile.mkdtemp(prefix="sa-bench-trl-")
    path, tokenizer = tiny_causal_lm(Path(tmp))
    args = trl.GRPOConfig(
        output_dir=tmp,
        use_cpu=True,
        bf16=False,
        report_to=[],
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=1,
        loss_type="dapo",
        epsilon_high=0.28,
    )
    trainer = trl.GRPOTrainer(
        model=path,
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        train_dataset=datasets.Dataset.from_dict({"prompt": ["w1 w2"] * 4}),
        processing_class=tokenizer,
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    _TRL["trainer"] = trainer
    return trainer


def _verl_config(**kwargs):
    from sa_testing import verl_actor_config

    return verl_actor_config(**kwargs)


MASK_FORMS = ("native", "float")


def reference_mask(framework: str, x: Inputs, form: str = "native") -> torch.Tensor:
    """The mask a trainer's loss receives. ``native``: as the trainer's own update path hands it
    over; veRL 0.9.1 bool (``workers/utils/losses.py``, ``ppo_loss`` casts ``response_mask`` with
    ``.to(bool)`` before calling the policy loss), OpenRLHF 0.11.2 int64 (``samples_generator.py``
    builds ``action_mask`` as ``zeros_like`` of its int64 attention mask and nothing casts it on
    the way to ``PolicyLoss``). ``float``: a float32 0/1 mask for both (the earlier protocol)."""
    if form not in MASK_FORMS:
        raise ValueError(f"reference mask form: expected one of {MASK_FORMS}, got {form!r}")
    if form == "float":
        return x.maskf
    return {"verl": x.mask, "openrlhf": x.maski}[framework]


def build_case(case: str, x: Inputs, mask_form: str = "native") -> tuple[Any, str, dict, dict]:
    """(reference callable returning its loss, our loss name, our loss kwargs, our PolicyBatch kwargs)."""
    B, T = x.lp.shape
    batch_kwargs = {"logprobs": x.lp, "advantages": x.adv, "mask": x.mask, "old_logprobs": x.old}
    framework, name = case.split(":")
    if framework == "verl":
        from verl.trainer.ppo import core_algos

        settings = {
            "vanilla": ({"clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0}, "ppo",
                        {"eps_low": 0.2, "eps_high": 0.28, "dual_clip": 3.0}, "token-mean"),
            "gspo": ({"clip_ratio_low": 3e-4, "clip_ratio_high": 4e-4}, "gspo_token",
                     {"eps_low": 3e-4, "eps_high": 4e-4}, "seq-mean-token-mean"),
            "cispo": ({"clip_ratio_low": 1.0, "clip_ratio_high": 4.0}, "cispo",
                      {"eps_low": 1.0, "eps_high": 4.0}, "token-mean"),
            "dppo_tv": ({"clip_ratio": 0.15, "clip_ratio_low": 0.15, "clip_ratio_high": 0.15, "clip_ratio_c": 10.0},
                        "dppo_binary_tv", {"anchor": "old", "delta_low": 0.15, "delta_high": 0.15, "ratio_cap": 10.0},
                        "token-mean"),
            "dppo_kl": ({"clip_ratio": 0.05, "clip_ratio_low": 0.05, "clip_ratio_high": 0.05, "clip_ratio_c": 10.0},
                        "dppo_binary_kl", {"anchor": "old", "delta_low": 0.05, "delta_high": 0.05, "ratio_cap": 10.0},
                        "token-mean"),
        }  # fmt: skip
        verl_kwargs, ours, ours_kwargs, mode = settings[name]
        config = _verl_config(**verl_kwargs)
        fn = core_algos.get_policy_loss_fn(name)
        response_mask = reference_mask("verl", x, mask_form)

        def reference():
            return fn(
                old_log_prob=x.old,
                log_prob=x.lp,
                advantages=x.adv,
                response_mask=response_mask,
                loss_agg_mode=mode,
                config=config,
            )[0]

        return reference, ours, {**ours_kwargs, "aggregation": mode}, batch_kwargs
    if framework == "openrlhf":
        from sa_testing import load_openrlhf_loss_module

        policy_loss = load_openrlhf_loss_module().PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28)
        action_mask = reference_mask("openrlhf", x, mask_form)

        def reference():
            return policy_loss(x.lp, x.old, x.adv, action_mask)[0]

        return reference, "ppo", {"eps_low": 0.2, "eps_high": 0.28}, batch_kwargs
    if framework == "trl":
        trainer = _trl_trainer()
        entropies = torch.full((B, T), 2.0)
        trainer._get_per_token_logps_and_entropies = lambda *a, **k: (x.lp, entropies, None)
        num_items = x.mask.sum()
        inputs = {
            "prompt_ids": torch.ones(B, 1, dtype=torch.long),
            "prompt_mask": torch.ones(B, 1, dtype=torch.long),
            "completion_ids": torch.ones(B, T, dtype=torch.long),
            "completion_mask": x.maski,
            "advantages": x.adv_seq,
            "old_per_token_logps": x.old,
            "num_items_in_batch": num_items,
        }
        scale = trainer.current_gradient_accumulation_steps / trainer.args.steps_per_generation
        tokens = float(num_items) / trainer.accelerator.num_processes * scale

        def reference():
            return trainer._compute_loss(trainer.model, inputs)

        args = trainer.args
        ours_kwargs = {"eps_low": args.epsilon, "eps_high": args.epsilon_high, "aggregation": "token-mean"}
        batch_kwargs = {**batch_kwargs, "advantages": x.adv_seq, "global_num_tokens": tokens}
        return reference, "ppo", ours_kwargs, batch_kwargs
    raise ValueError(case)


def _check_same(reference, loss_fn, batch_kwargs, x: Inputs, case: str) -> None:
    ref = reference()
    (g_ref,) = torch.autograd.grad(ref, x.lp)
    out = loss_fn(sa.PolicyBatch(**batch_kwargs)).loss
    (g_ours,) = torch.autograd.grad(out, x.lp)
    torch.testing.assert_close(out.detach(), ref.detach().float(), rtol=1e-4, atol=1e-6, msg=f"{case}: loss")
    torch.testing.assert_close(g_ours, g_ref.float(), rtol=1e-4, atol=1e-9, msg=f"{case}: gradient")


COMPILABLE = ("ppo", "gspo", "gspo_token")  # losses with a ``compile=True`` setting


def _variants(x: Inputs, reference, loss_fn, batch_kwargs: dict, compiled_fn=None, float_reference=None) -> dict:
    """The timed callables: the reference and our variants (see the module docstring)."""
    prebuilt = sa.PolicyBatch(**batch_kwargs)
    nocheck = {**batch_kwargs, "check_finite": False}

    def step(make_loss):
        def go():
            x.lp.grad = None
            make_loss().backward()

        return go

    variants = {
        "ref": step(reference),
        "+batch": step(lambda: loss_fn(sa.PolicyBatch(**batch_kwargs)).loss),
        "+batch nocheck": step(lambda: loss_fn(sa.PolicyBatch(**nocheck)).loss),
        "prebuilt": step(lambda: loss_fn(prebuilt).loss),
    }
    if compiled_fn is not None:
        variants["+batch compiled"] = step(lambda: compiled_fn(sa.PolicyBatch(**batch_kwargs)).loss)
    if float_reference is not None:
        variants["ref float mask"] = step(float_reference)
    return variants


def run(
    sizes=None,
    cases=None,
    repeats: int = 15,
    inner: int = 3,
    memory: bool = True,
    compile: bool = False,
    mask_form: str = "native",
) -> list[dict]:
    """One row per (case, size): ratios of our variants to the reference, and peak memory.

    ``compile=True`` adds a ``+batch compiled`` variant (``compile=True`` loss setting) for the
    losses that have one; its one-off compilation happens in the correctness check, untimed.
    ``mask_form`` is the form of the veRL / OpenRLHF references' mask (see `reference_mask`).
    """
    rows = []
    for B, T in sizes or SIZES:
        x = make_inputs(B, T)
        for case in cases or CASES:
            reference, name, loss_kwargs, batch_kwargs = build_case(case, x, mask_form)
            loss_fn = sa.get_loss(name, **loss_kwargs)
            _check_same(reference, loss_fn, batch_kwargs, x, case)
            compiled_fn = None
            if compile and name in COMPILABLE:
                compiled_fn = sa.get_loss(name, **loss_kwargs, compile=True)
                _check_same(reference, compiled_fn, batch_kwargs, x, case + " (compiled)")
            float_reference = None
            if case.split(":")[0] in ("verl", "openrlhf") and mask_form == "native":
                float_reference = build_case(case, x, "float")[0]
                _check_same(float_reference, loss_fn, batch_kwargs, x, case + " (float mask)")
            variants = _variants(x, reference, loss_fn, batch_kwargs, compiled_fn, float_reference)
            timing = interleaved(variants, "ref", repeats=repeats, inner=inner)
            row = {
                "case": case,
                "ours": name,
                "B": B,
                "T": T,
                "ref_ms": timing.seconds["ref"] * 1e3,
                "ratio_batch": timing.ratios["+batch"],
                "ratio_nocheck": timing.ratios["+batch nocheck"],
                "ratio_prebuilt": timing.ratios["prebuilt"],
                "spread_batch": timing.ratio_spread["+batch"],
                "ratio_compiled": timing.ratios.get("+batch compiled"),
                "ratio_batch_float_ref": timing.ratio("+batch", "ref float mask") if float_reference else None,
                "ref_float_ratio": timing.ratios.get("ref float mask"),
            }
            if memory:
                mem_ref = peak_memory(variants["ref"])
                mem_ours = peak_memory(variants["+batch"])
                row.update(mem_ref=mem_ref, mem_ours=mem_ours, mem_ratio=mem_ours / max(mem_ref, 1))
            x.lp.grad = None
            rows.append(row)
    return rows


def combine_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One row per (case, size) over several rounds of `run`: median ratios and the worst +batch ratio.

    A round is a whole pass over every case and size, so two rounds of the same pair are minutes
    apart: the worst round shows how far one run on a shared machine can drift.
    """
    import statistics

    combined = []
    for group in zip(*rounds):
        row = dict(group[0])  # memory is measured in the first round only (deterministic)
        for key in ("ref_ms", "ratio_batch", "ratio_nocheck", "ratio_prebuilt", "ratio_compiled",
                    "ratio_batch_float_ref", "ref_float_ratio"):  # fmt: skip
            if row.get(key) is not None:
                row[key] = statistics.median(g[key] for g in group)
        row["ratio_batch_worst"] = max(g["ratio_batch"] for g in group)
        if row.get("ratio_batch_float_ref") is not None:
            row["ratio_batch_float_ref_worst"] = max(g["ratio_batch_float_ref"] for g in group)
        row["rounds"] = [{k: g[k] for k in ("ref_ms", "ratio_batch", "ratio_nocheck", "ratio_prebuilt")} for g in group]
        combined.append(row)
    return combined
