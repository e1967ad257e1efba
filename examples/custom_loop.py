"""A complete asynchronous RL loop in plain PyTorch with stable-async (CPU, well under 30 s).

What it simulates, top to bottom:

* a tiny causal transformer policy that writes sequences of LENGTH tokens from a vocabulary of
  VOCAB, one prompt token first; reward = the fraction of tokens equal to (previous token + 1)
  mod VOCAB, a task it has to learn;
* a rollout *engine* that is a snapshot of the policy from up to MAX_LAG optimizer steps ago
  (staleness), run with slightly perturbed logits (trainer / engine mismatch, as bf16 vLLM vs an
  fp32 trainer); it reports its own log-probs μ, as vLLM does;
* a rollout buffer of groups of GROUP samples per prompt, advantages = reward − group mean
  (`stable_async.baselines.rloo_baseline`);
* the update: π_old = the trainer's log-probs before the update (proximal policy), then
  MINI_STEPS gradient steps of PPO-clip with a token-level truncated-IS correction against μ,
  `stable_async.GradientAlignmentControl` between backward and step, and
  `stable_async.ESSScaledLR` scaling the step by the ESS of the minibatch.

``--kondo-price λ`` adds the Kondo gate (`stable_async.kondo_gate`): the π_old forward pass, run
without gradient anyway, scores each sequence's delight, and only the sequences the gate keeps
get a forward pass with gradient and a backward pass.

Run: python examples/custom_loop.py [--steps N] [--kondo-price λ]   (or SA_EXAMPLE_STEPS=N)
"""

from __future__ import annotations

import argparse
import collections
import copy
import os
import random
import time

import torch
from torch import nn

import stable_async as sa

VOCAB, LENGTH, PROMPTS, GROUP = 8, 8, 8, 4  # 8 prompts × 4 samples = 32 sequences per rollout batch
MAX_LAG, ENGINE_NOISE, MINI_STEPS = 3, 0.05, 2


# ----------------------------------------------------------------------------- the policy
class TinyCausalLM(nn.Module):
    """Embedding + one causal self-attention block + a language-model head."""

    def __init__(self, vocab: int = VOCAB, width: int = 32, max_len: int = LENGTH + 1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(0.02 * torch.randn(max_len, width))
        self.block = nn.TransformerEncoderLayer(width, nhead=2, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, L, V) logits
        L = tokens.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(L)
        return self.head(self.block(self.embed(tokens) + self.position[:L], src_mask=causal, is_causal=True))


def token_logprobs(model: nn.Module, sequences: torch.Tensor) -> torch.Tensor:
    """log π(a_t | a_<t) of the response tokens: (B, 1 + T) sequences -> (B, T)."""
    logits = model(sequences[:, :-1])
    return torch.log_softmax(logits, -1).gather(-1, sequences[:, 1:, None])[..., 0]


# ----------------------------------------------------------------------------- the rollout engine
@torch.no_grad()
def generate(engine: nn.Module, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample LENGTH tokens; return the sequences and the engine's own log-probs μ (B, T)."""
    sequences, logprobs = prompts[:, None], []
    for _ in range(LENGTH):
        logits = engine(sequences)[:, -1]
        logits = logits + ENGINE_NOISE * torch.randn_like(logits)  # engine numerics ≠ trainer numerics
        dist = torch.distributions.Categorical(logits=logits)
        token = dist.sample()
        logprobs.append(dist.log_prob(token))
        sequences = torch.cat([sequences, token[:, None]], dim=1)
    return sequences, torch.stack(logprobs, dim=1)


def reward(sequences: torch.Tensor) -> torch.Tensor:
    """Fraction of tokens that continue the count: a_t = a_{t−1} + 1 (mod VOCAB)."""
    return (sequences[:, 1:] == (sequences[:, :-1] + 1) % VOCAB).float().mean(-1)


# ----------------------------------------------------------------------------- training
def main(steps: int = 40, seed: int = 0, log_every: int = 5, kondo_price: float | None = None) -> dict[str, float]:
    torch.manual_seed(seed)
    random.seed(seed)
    policy = TinyCausalLM()
    optimizer = sa.ESSScaledLR(torch.optim.AdamW(policy.parameters(), lr=3e-3), rule="sqrt")
    gac = sa.GradientAlignmentControl(policy.parameters(), mode="project", threshold=0.5)
    loss_fn = sa.get_loss(
        "ppo", eps_low=0.2, eps_high=0.28, aggregation="token-mean", correction=sa.token_tis(high=2.0)
    )
    snapshots = collections.deque([copy.deepcopy(policy)], maxlen=MAX_LAG + 1)  # older weights the engine runs
    start, first_reward, metrics = time.time(), None, {}

    for step in range(steps):
        # 1. Rollouts from a stale engine (a snapshot up to MAX_LAG steps old).
        lag = random.randrange(len(snapshots))
        engine = snapshots[-1 - lag]
        prompts = torch.randint(VOCAB, (PROMPTS,)).repeat_interleave(GROUP)
        sequences, rollout_logprobs = generate(engine, prompts)
        rewards = reward(sequences)
        group_ids = torch.arange(PROMPTS).repeat_interleave(GROUP)
        advantages = rewards - sa.baselines.rloo_baseline(rewards, group_ids)  # (B,), broadcast over tokens
        mask = torch.ones_like(rollout_logprobs, dtype=torch.bool)
        with torch.no_grad():
            old_logprobs = token_logprobs(policy, sequences)  # π_old: the trainer before this update
        rows = torch.arange(len(sequences))
        if kondo_price is not None:  # only the sequences worth a backward pass, scored on π_old
            rows = sa.kondo_gate(advantages, old_logprobs, mask, price=kondo_price).indices

        # 2. A few gradient steps on the batch: loss + correction, GAC, ESS-scaled learning rate.
        for _ in range(MINI_STEPS):
            batch = sa.PolicyBatch(
                logprobs=token_logprobs(policy, sequences[rows]),
                advantages=advantages[rows],
                mask=mask[rows],
                old_logprobs=old_logprobs[rows],
                rollout_logprobs=rollout_logprobs[rows],
            )
            out = loss_fn(batch)
            optimizer.zero_grad()
            out.loss.backward()
            gac_metrics = gac.apply()  # after backward, before the step; edits .grad in place
            ess = sa.effective_sample_size(batch.logprobs.detach() - batch.rollout_logprobs, batch.mask)  # π_θ/μ
            optimizer.step(ess)  # lr · sqrt(ESS/N) for this step only
        snapshots.append(copy.deepcopy(policy))

        metrics = {
            "reward": float(rewards.mean()),
            "lag": float(lag),
            "loss": out.metrics["actor/pg_loss"],
            "clipfrac": out.metrics["actor/pg_clipfrac"],
            "mismatch_kl": out.metrics["rollout_corr/kl"],
            "ess_ratio": ess.ess_ratio,
            "lr_scale": optimizer.last_metrics["vcpo/lr_scale"],
            "gac_cos": gac_metrics["gac/cos"],
            "gac_action": gac.last_action,
            "kondo_skipped": 1.0 - len(rows) / len(sequences),
        }
        first_reward = metrics["reward"] if first_reward is None else first_reward
        if step % log_every == 0 or step == steps - 1:
            print(
                f"step {step:3d}  reward {metrics['reward']:.3f}  lag {lag}  loss {metrics['loss']:+.4f}  "
                f"clip {metrics['clipfrac']:.3f}  kl(μ‖π_old) {metrics['mismatch_kl']:+.4f}  "
                f"ESS/N {metrics['ess_ratio']:.3f}  lr×{metrics['lr_scale']:.3f}  "
                f"gac cos {metrics['gac_cos']:+.3f} ({metrics['gac_action']})"
            )
    print(f"done: {steps} steps in {time.time() - start:.1f}s, reward {first_reward:.3f} -> {metrics['reward']:.3f}")
    if kondo_price is not None:
        print(f"kondo gate: {metrics['kondo_skipped']:.0%} of the last batch's backward passes skipped")
    return metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=int(os.environ.get("SA_EXAMPLE_STEPS", 40)))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kondo-price", type=float, default=None, help="Kondo gate price λ (default: no gate)")
    torch.set_num_threads(1)  # a model this small runs fastest on one thread
    main(**vars(parser.parse_args()))
