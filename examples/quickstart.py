"""Quickstart: a plain PyTorch loop that trains on stale rollouts with a stable-async loss.

A toy contextual bandit: a linear softmax policy over 16 actions, 8 contexts, reward 1 for the
"right" action of each context. Rollouts come from a snapshot of the policy that is `LAG` steps
old, and the rollout engine reports its log-probs from a perturbed copy of the weights (engine
mismatch). PPO with a token-level TIS correction keeps learning; ESS/N shows how off-policy
the data is. Run: python examples/quickstart.py
"""

from __future__ import annotations

import copy

import torch

import stable_async as sa

torch.manual_seed(0)
CONTEXTS, ACTIONS, LAG, STEPS, SAMPLES = 8, 16, 4, 60, 32

policy = torch.nn.Linear(CONTEXTS, ACTIONS)
optimizer = torch.optim.Adam(policy.parameters(), lr=0.05)
loss_fn = sa.get_loss("ppo", eps_high=0.28, correction=sa.token_tis(high=2.0))
snapshots = [copy.deepcopy(policy)]
target = torch.randperm(ACTIONS)[:CONTEXTS]


def log_softmax(model: torch.nn.Module, contexts: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model(torch.nn.functional.one_hot(contexts, CONTEXTS).float()), dim=-1)


for step in range(STEPS):
    actor = snapshots[max(0, len(snapshots) - 1 - LAG)]  # the stale rollout policy
    contexts = torch.randint(CONTEXTS, (SAMPLES,))
    with torch.no_grad():
        engine_logits = log_softmax(actor, contexts) + 0.05 * torch.randn(SAMPLES, ACTIONS)  # engine mismatch
        actions = torch.distributions.Categorical(logits=engine_logits).sample()
        rollout_logprobs = torch.log_softmax(engine_logits, -1).gather(-1, actions[:, None])
        old_logprobs = log_softmax(actor, contexts).gather(-1, actions[:, None])
    rewards = (actions == target[contexts]).float()
    advantages = rewards - rewards.mean()

    logprobs = log_softmax(policy, contexts).gather(-1, actions[:, None])
    batch = sa.PolicyBatch(
        logprobs=logprobs,  # (B, T) with T = 1 token per "response"
        advantages=advantages,
        mask=torch.ones_like(logprobs, dtype=torch.bool),
        old_logprobs=old_logprobs,
        rollout_logprobs=rollout_logprobs,
    )
    out = loss_fn(batch)
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    snapshots.append(copy.deepcopy(policy))

    if step % 10 == 0 or step == STEPS - 1:
        ess = sa.effective_sample_size(logprobs.detach() - rollout_logprobs, level="sequence")
        with torch.no_grad():
            greedy = log_softmax(policy, torch.arange(CONTEXTS)).argmax(-1)
        accuracy = (greedy == target).float().mean().item()
        print(
            f"step {step:3d}  loss {out.loss.item():+.4f}  ESS/N {ess.ess_ratio:.3f}  "
            f"clipfrac {out.metrics['actor/pg_clipfrac']:.3f}  "
            f"IS mean {out.metrics['rollout_corr/rollout_is_mean']:.3f}  greedy accuracy {accuracy:.2f}"
        )
