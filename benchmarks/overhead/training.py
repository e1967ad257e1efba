"""GAC and ESS-LR overhead per training step, GAC memory per memory mode, sketch cosine error.

The benchmark transformer: a pre-LN GPT (``nn.TransformerEncoderLayer`` with a causal mask),
4 layers, d = 256, 4 heads, FFN 1024, vocabulary 8192, untied embedding and LM head
(7.4M parameters), trained on 8 × 256 tokens with stable-async's ``ppo`` loss on the sampled
tokens' log-probs and AdamW. One step = forward, ``PolicyBatch``, loss, backward, optimizer step.

Per repetition every variant runs one step, interleaved:

* ``base``: the step as above.
* ``gac full`` / ``gac bf16``: ``GradientAlignmentControl(mode="project", memory=...)``, ``apply()``
  between backward and step.
* ``gac sketch``: ``memory="sketch"`` (mode ``monitor``), the default budget, ``sketch_dim=8192`` and a small one.
* ``ess-lr``: ``effective_sample_size`` of the step's sequence log-weights, then
  ``ESSScaledLR(AdamW).step(ess_ratio)``.

GAC's (and ESS-LR's) own time is also timed directly inside each step (``apply()`` alone), which
is less noisy than the difference of two step times; both are reported as fractions of the
median ``base`` step of the same run.

Sketch accuracy: the cosine GAC estimates in sketch mode against the exact one, on (a) real
consecutive gradients of the benchmark transformer, and (b) pairs g₂ = c·g₁ + √(1−c²)·n built
from a real gradient g₁ with exact cosines c ∈ {0, 0.5, 0.9} (n: noise with g₁'s per-tensor
norms), over several hash seeds; the maximum absolute error is reported.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
from common import peak_memory
from torch import nn

import stable_async as sa


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 8192, d: int = 256, layers: int = 4, heads: int = 4, ctx: int = 256):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(ctx, d))
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(T)
        h = self.blocks(self.embed(ids) + self.pos[:T], mask=causal, is_causal=True)
        return self.head(self.norm(h))


class Setup:
    """Model, optimizer and one fixed batch; ``step(hook)`` runs one training step."""

    def __init__(self, B: int, T: int, vocab: int = 8192, d: int = 256, layers: int = 4, seed: int = 0):
        torch.manual_seed(seed)
        self.model = TinyGPT(vocab=vocab, d=d, layers=layers, ctx=T)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (B, T + 1), generator=g)
        self.adv = torch.randn(B, generator=g)
        lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
        self.mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
        self.noise = 0.05 * torch.randn(B, T, generator=g)
        self.loss = sa.get_loss("ppo")
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.param_bytes = sum(p.numel() * p.element_size() for p in self.params)
        self.n_params = sum(p.numel() for p in self.params)

    def backward(self) -> torch.Tensor:
        """Forward + loss + backward; returns the detached log-probs (for ESS)."""
        self.opt.zero_grad(set_to_none=True)
        logits = self.model(self.ids[:, :-1])
        lp = torch.log_softmax(logits.float(), -1).gather(-1, self.ids[:, 1:, None]).squeeze(-1)
        batch = sa.PolicyBatch(
            logprobs=lp,
            advantages=self.adv,
            mask=self.mask,
            old_logprobs=lp.detach() + self.noise,
            rollout_logprobs=lp.detach() - self.noise,
        )
        self.loss(batch).loss.backward()
        return batch

    def step(self, between=None, optimizer_step=None) -> float:
        """One training step; returns the seconds spent in ``between`` (the measured hook).

        ``optimizer_step(result of between)`` replaces ``opt.step()`` (e.g. the ESS-LR wrapper's step).
        """
        batch = self.backward()
        spent = 0.0
        if between is not None:
            t0 = time.perf_counter()
            extra = between(batch)
            spent = time.perf_counter() - t0
        else:
            extra = None
        if optimizer_step is not None:
            optimizer_step(extra)
        else:
            self.opt.step()
        return spent


def _state_bytes(gac: sa.GradientAlignmentControl) -> int:
    return sum(t.numel() * t.element_size() for t in gac.stored.reference if t is not None)


def _sketch_dim_for(setup: Setup, budget: float) -> int:
    """Largest power-of-two sketch_dim whose stored sketch is at most ``budget`` × parameter memory (fp32)."""
    dim = 1 << 16
    while dim > 16:
        stored = sum(min(p.numel(), dim) for p in setup.params) * 4
        if stored <= budget * setup.param_bytes:
            return dim
        dim //= 2
    return dim


def run(B: int = 8, T: int = 256, repeats: int = 6, layers: int = 4, d: int = 256, vocab: int = 8192) -> dict:
    setup = Setup(B, T, vocab=vocab, d=d, layers=layers)
    small_dim = _sketch_dim_for(setup, 0.01)
    gacs = {
        "gac full": sa.GradientAlignmentControl(setup.params, mode="project", memory="full"),
        "gac bf16": sa.GradientAlignmentControl(setup.params, mode="project", memory="bf16"),
        "gac sketch": sa.GradientAlignmentControl(setup.params, mode="monitor", memory="sketch"),
        "gac sketch 8192": sa.GradientAlignmentControl(setup.params, mode="monitor", memory="sketch", sketch_dim=8192),
        f"gac sketch {small_dim}": sa.GradientAlignmentControl(
            setup.params, mode="monitor", memory="sketch", sketch_dim=small_dim
        ),
    }
    ess_opt = sa.ESSScaledLR(setup.opt)

    def ess_between(batch):
        log_w = batch.logprobs.detach() - batch.rollout_logprobs
        return sa.effective_sample_size(log_w, batch.mask, level="sequence").ess_ratio

    variants = {"base": {}}
    for name, gac in gacs.items():
        variants[name] = {"between": lambda batch, gac=gac: gac.apply()}
    variants["ess-lr"] = {"between": ess_between, "optimizer_step": lambda r: ess_opt.step(r)}

    for spec in variants.values():  # warm-up; also fills every GAC's stored gradient
        setup.step(**spec)
    step_times: dict[str, list[float]] = {n: [] for n in variants}
    hook_times: dict[str, list[float]] = {n: [] for n in variants}
    names = list(variants)
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            hook_times[name].append(setup.step(**variants[name]))
            step_times[name].append(time.perf_counter() - t0)
    base = statistics.median(step_times["base"])
    out = {
        "B": B,
        "T": T,
        "layers": layers,
        "d": d,
        "vocab": vocab,
        "n_params": setup.n_params,
        "param_bytes": setup.param_bytes,
        "base_step_s": base,
        "small_sketch_dim": small_dim,
        "rows": [],
    }
    for name in names:
        if name == "base":
            continue
        paired = [a / b for a, b in zip(step_times[name], step_times["base"])]
        row = {
            "variant": name,
            "hook_frac": statistics.median(hook_times[name]) / base,
            "step_ratio": statistics.median(paired),
        }
        if name in gacs:
            gac = gacs[name]
            setup.backward()
            row["state_bytes"] = _state_bytes(gac)
            row["state_frac"] = row["state_bytes"] / setup.param_bytes
            row["apply_peak"] = peak_memory(gac.apply)
        out["rows"].append(row)
    out["sketch_error"] = sketch_error(setup, [None, 8192, small_dim])  # None: the default budget
    return out


def _cos_pair(params, g1, g2, **gac_kwargs) -> float:
    gac = sa.GradientAlignmentControl(params, mode="monitor", **gac_kwargs)
    for grads in (g1, g2):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        metrics = gac.apply()
    return metrics["gac/cos"]


def sketch_error(setup: Setup, dims: list[int], seeds: int = 3) -> dict:
    """Max |cos_sketch − cos_exact| per sketch_dim over real and synthetic gradient pairs."""
    params = setup.params
    setup.backward()
    g1 = [p.grad.clone() for p in params]
    setup.opt.step()
    setup.backward()
    pairs = [("real consecutive", g1, [p.grad.clone() for p in params])]
    gen = torch.Generator().manual_seed(1)
    for c in (0.0, 0.5, 0.9):
        g2 = []
        for g in g1:
            n = torch.randn(g.shape, generator=gen)
            n = n * (g.norm() / n.norm().clamp(min=1e-30))
            g2.append(c * g + math.sqrt(1 - c * c) * n)
        pairs.append((f"synthetic c={c}", g1, g2))
    out: dict = {"pairs": [], "max_error": {}}
    for label, a, b in pairs:
        exact = _cos_pair(params, a, b, memory="full")
        entry = {"pair": label, "exact": exact}
        for dim in dims:
            errs = [abs(_cos_pair(params, a, b, memory="sketch", sketch_dim=dim, seed=s) - exact) for s in range(seeds)]
            entry[dim] = max(errs)
            out["max_error"][dim] = max(out["max_error"].get(dim, 0.0), max(errs))
        out["pairs"].append(entry)
    for p in params:
        p.grad = None
    return out
