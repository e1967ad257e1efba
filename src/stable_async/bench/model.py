"""A tiny causal transformer (pure PyTorch) and its KV-cached sampler.

The policy of the benchmark: token embedding + learned positions, pre-LayerNorm blocks of
multi-head causal self-attention and a GELU MLP, and a linear head over the vocabulary.
`TinyTransformer.forward` scores whole sequences (the trainer's pass); `generate` samples
(or decodes greedily) with a key/value cache, one new token per step (the rollout engine's pass).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # one (keys, values) pair per layer, (B, heads, t, d_head)


@dataclass(frozen=True)
class ModelConfig:
    vocab: int
    max_len: int
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """softmax(q kᵀ / √d) v, with a causal mask when the queries are the keys' own positions.

    Written out rather than ``F.scaled_dot_product_attention`` so that ``torch.func.vmap`` (the
    exact per-sequence gradients of VCPO's baseline) has a batching rule for every op.
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        L = q.shape[-2]
        future = torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(), nn.Linear(4 * cfg.d_model, cfg.d_model)
        )

    def forward(
        self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        B, L, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=-1)
        q, k, v = (t.view(B, L, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))
        if past is not None:  # decoding: the new position attends to every cached one, no mask needed
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        attn = attention(q, k, v, causal=past is None)
        x = x + self.proj(attn.transpose(1, 2).reshape(B, L, D))
        x = x + self.mlp(self.ln2(x))
        return x, (k, v)


class TinyTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab)

    def forward(self, tokens: torch.Tensor, past: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        """Logits (B, L, V) for ``tokens`` (B, L) placed after the ``past`` positions, and the new cache."""
        start = 0 if past is None else past[0][0].shape[2]
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        x = self.tok(tokens) + self.pos(positions)
        cache: KVCache = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, None if past is None else past[i])
            cache.append(kv)
        return self.head(self.ln_f(x)), cache


LogitsHook = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def generate(
    model: TinyTransformer,
    prompts: torch.Tensor,
    n_new: int,
    generator: torch.Generator | None = None,
    greedy: bool = False,
    logits_hook: LogitsHook | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``n_new`` tokens after ``prompts`` (B, P) with a KV cache.

    ``logits_hook`` edits each step's logits before sampling (the engine uses it to add noise).
    Returns the new tokens (B, n_new) and the logits they were drawn from (B, n_new, V), after the hook.
    """
    logits, cache = model(prompts)
    last = logits[:, -1]
    tokens, used = [], []
    for i in range(n_new):
        if logits_hook is not None:
            last = logits_hook(last)
        if greedy:
            nxt = last.argmax(-1)
        else:
            nxt = torch.multinomial(torch.softmax(last, dim=-1), 1, generator=generator).squeeze(-1)
        tokens.append(nxt)
        used.append(last)
        if i + 1 < n_new:
            logits, cache = model(nxt.unsqueeze(-1), cache)
            last = logits[:, -1]
    return torch.stack(tokens, dim=1), torch.stack(used, dim=1)
