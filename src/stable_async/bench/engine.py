"""The rollout engine: stale weight snapshots under a staleness model, engine mismatch, frictions.

Versions. The trainer publishes its weights after every training step (version v = steps
done; version 0 is the warm-started initial model). When the trainer holds version t and asks
for a batch with staleness bound k, the engine serves it from the snapshots it kept, under one
of three staleness models (``staleness``):

* ``fixed``: every sequence from version max(0, t − k) (every batch exactly k versions old);
* ``bounded`` (default): the batch's prompt groups are split over ``actors`` actors, and each
  actor's share comes from a version drawn uniformly in [max(0, t − k), t], as a pool of
  actors whose head may run at most k versions ahead (AReaL ``max_head_offpolicyness``, veRL
  fully-async ``staleness_threshold``, SkyRL ``max_staleness_steps``). A group's responses
  come from one actor, hence one version; the versions of a batch are mixed;
* ``partial`` (in-flight weight updates, PipelineRL / AReaL partial rollouts): an actor's share
  starts on a version a drawn as in ``bounded``; at a random token s ∈ [1, H − 1] its generation is
  interrupted and resumed on a version b drawn uniformly in [a, t] (the prefix is re-read by
  the new weights, as AReaL's interrupt-and-resume does). Tokens before s carry version a and
  μ_a's log-probs, tokens from s on version b and μ_b's.

``lag="offline"`` is the control: every batch from version 0, never refreshed.

Governed runs (`stable_async.StalenessGovernor`): ``lag`` is the largest bound, the snapshots
kept, and each batch is served under that step's bound k_t ≤ ``lag`` (``rollout(..., bound=k_t)``):
the same three models with k = k_t, so a batch's versions lie in [max(0, t − k_t), t].

Every sampled token's version is recorded (``Rollout.versions``, (B, H)); the trainer passes
them to the losses as ``PolicyBatch.versions``.

Engine mismatch. Like a vLLM/SGLang engine next to an FSDP trainer, the engine does not run
the trainer's exact numerics: it holds a bf16-rounded copy of each snapshot and its logits carry
a small Gaussian noise (``logit_noise``). It samples from, and reports the log-probs of, *its
own* distribution μ, so the trainer's recomputation of the same version differs from μ.
With ``top_p`` set the engine samples from its top-p set, renormalized, and reports μ under that
truncated distribution (`stable_async.sampling_logprobs`, vLLM's order of operations), as vLLM does;
the trainer still recomputes the full softmax, so the drift metrics show the bias TRL issue #6789
describes (every ratio scaled by the kept mass).

Frictions (the Delightful PG paper's; off unless set): a fraction ``buggy_fraction`` of the
sequences sampled at temperature ``buggy_temperature`` while the engine reports the
temperature-1 log-probs; a fraction ``reward_corruption`` of the rewards replaced by U[0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import stable_async as sa
from stable_async.bench.model import ModelConfig, TinyTransformer, generate
from stable_async.bench.tasks import Task

STALENESS_MODELS = ("fixed", "bounded", "partial")
OFFLINE = "offline"
Lag = int | str  # an integer k ≥ 0, or "offline"


def filtered_logprobs(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """(B, V) log-probs of every id under the top-p distribution the engine samples from (−inf
    outside its kept set), by `stable_async.sampling_logprobs` — the same function a trainer uses
    to recompute comparable log-probs. The vocabulary is tiny, so every id is evaluated."""
    B, V = logits.shape
    ids = torch.arange(V, device=logits.device).expand(B, V)
    return sa.sampling_logprobs(logits.unsqueeze(1).expand(B, V, V), ids, top_p=top_p)


@dataclass(frozen=True)
class EngineSettings:
    lag: Lag = 0
    staleness: str = "bounded"
    actors: int = 4  # bounded / partial: the prompt groups of a batch are split over this many actors
    bf16_weights: bool = True  # the engine's copy of the weights is rounded to bf16
    logit_noise: float = 0.0  # std of the Gaussian noise on the engine's logits
    topk: int = 0  # also report the top-K ids and log-probs of μ (DPPO top-K); 0: off
    buggy_fraction: float = 0.0  # fraction of sequences from a buggy actor
    buggy_temperature: float = 2.0
    reward_corruption: float = 0.0  # fraction of rewards replaced by uniform noise
    top_p: float | None = None  # nucleus sampling: the engine samples from, and reports μ of, its top-p set

    def __post_init__(self) -> None:
        if self.staleness not in STALENESS_MODELS:
            raise ValueError(f"staleness: expected one of {list(STALENESS_MODELS)}, got {self.staleness!r}")
        if self.lag != OFFLINE and (isinstance(self.lag, bool) or not isinstance(self.lag, int) or self.lag < 0):
            raise ValueError(f"lag: expected an integer >= 0 or {OFFLINE!r}, got {self.lag!r}")
        if self.top_p is not None and (
            isinstance(self.top_p, bool) or not isinstance(self.top_p, float | int) or not 0 < self.top_p <= 1
        ):
            raise ValueError(f"top_p: expected a number in (0, 1] or None, got {self.top_p!r}")


@dataclass
class Rollout:
    """One training step's data, as the engine reports it. B = prompts × group size."""

    prompts: torch.Tensor  # (B, P) prompt tokens, separator included
    responses: torch.Tensor  # (B, H) sampled tokens
    rewards: torch.Tensor  # (B,) as reported (possibly corrupted)
    group_ids: torch.Tensor  # (B,) prompt index
    rollout_logprobs: torch.Tensor  # (B, H) log μ of each sampled token, from the version that sampled it
    versions: torch.Tensor  # (B, H) the policy version that sampled each token
    topk_ids: torch.Tensor | None = None  # (B, H, K) μ's top-K ids, the sampled token forced in
    topk_logprobs: torch.Tensor | None = None  # (B, H, K) log μ at topk_ids

    @property
    def sequences(self) -> torch.Tensor:
        return torch.cat([self.prompts, self.responses], dim=1)


class RolloutEngine:
    def __init__(self, model_config: ModelConfig, task: Task, settings: EngineSettings, seed: int) -> None:
        self.task, self.settings = task, settings
        self.model = TinyTransformer(model_config).eval()
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}
        self.current = -1  # the newest published version
        self.gen = torch.Generator().manual_seed(seed)

    @property
    def offline(self) -> bool:
        return self.settings.lag == OFFLINE

    def publish(self, policy: torch.nn.Module, version: int) -> None:
        """Store a snapshot of the trainer's weights (the engine's reduced-precision copy).

        Keeps the versions a later batch may still use, [version − k, version]; the offline
        control keeps version 0 only and ignores every later publication.
        """
        self.current = version
        if self.offline and self.snapshots:
            return
        dtype = torch.bfloat16 if self.settings.bf16_weights else torch.float32
        self.snapshots[version] = {k: v.detach().to(dtype).to(torch.float32) for k, v in policy.state_dict().items()}
        if not self.offline:
            oldest = version - int(self.settings.lag)
            for old in [v for v in self.snapshots if v < oldest]:
                del self.snapshots[old]

    def _draw(self, low: int, high: int, n: int) -> torch.Tensor:
        return torch.randint(low, high + 1, (n,), generator=self.gen)

    def _bound(self, bound: int | None) -> int:
        """This batch's staleness bound: ``lag``, or a governed bound in [0, lag] (offline: unused, 0)."""
        if bound is None:
            return 0 if self.offline else int(self.settings.lag)
        lag = self.settings.lag
        if self.offline or isinstance(bound, bool) or not isinstance(bound, int) or not 0 <= bound <= int(lag):
            raise ValueError(f"bound: expected an int in [0, lag = {self.settings.lag}], got {bound!r}")
        return bound

    def schedule(self, groups: int, bound: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per group: the start version a, the resume version b and the switch token s (b = a: no switch).

        ``bound``: this batch's staleness bound k_t ≤ ``lag`` (a governed run); None: ``lag``.
        """
        s, t, H = self.settings, self.current, self.task.length
        k = self._bound(bound)
        n = min(s.actors, groups)
        actor = torch.arange(groups) * n // groups  # contiguous shares of the groups
        if self.offline:
            a = torch.zeros(n, dtype=torch.long)
        else:
            oldest = max(0, t - k)
            a = torch.full((n,), oldest) if s.staleness == "fixed" else self._draw(oldest, t, n)
        b, switch = a.clone(), torch.full((n,), H)
        if s.staleness == "partial" and not self.offline and H > 1:
            b = torch.stack([self._draw(int(v), t, 1)[0] for v in a])
            switch = self._draw(1, H - 1, n)
        return a[actor], b[actor], switch[actor]

    def _sample(
        self, version: int, prefix: torch.Tensor, n_new: int, temperature: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample n_new tokens after ``prefix`` from the engine's copy of ``version``; returns (tokens, μ logits)."""
        self.model.load_state_dict(self.snapshots[version])
        noise = self.settings.logit_noise

        top_p = self.settings.top_p

        def engine_logits(logits: torch.Tensor) -> torch.Tensor:
            if noise > 0:
                logits = logits + noise * torch.randn(logits.shape, generator=self.gen)
            logits = logits / temperature
            if top_p is not None:  # the engine's truncated, renormalized distribution (vLLM's order)
                logits = filtered_logprobs(logits, top_p)
            return logits

        tokens, used = generate(self.model, prefix, n_new, self.gen, logits_hook=engine_logits)
        return tokens, used * temperature.unsqueeze(-1)  # what the engine reports: temperature 1

    def rollout(self, prompts: torch.Tensor, group_size: int, bound: int | None = None) -> Rollout:
        """Sample ``group_size`` responses for each prompt under the staleness model (bound: `schedule`)."""
        s, H = self.settings, self.task.length
        n_groups = prompts.shape[0]
        a, b, switch = self.schedule(n_groups, bound)
        prompts = prompts.repeat_interleave(group_size, dim=0)
        B = prompts.shape[0]
        group_ids = torch.arange(B) // group_size
        buggy = torch.rand(B, generator=self.gen) < s.buggy_fraction
        temperature = torch.where(buggy, s.buggy_temperature, 1.0).unsqueeze(-1)

        responses = torch.zeros(B, H, dtype=torch.long)
        logits = torch.zeros(B, H, self.task.vocab)
        versions = torch.zeros(B, H, dtype=torch.long)
        plan = torch.stack([a, b, switch], dim=1)
        for key in torch.unique(plan, dim=0).tolist():  # one engine call per distinct (a, b, s)
            rows = (plan[group_ids] == torch.tensor(key)).all(dim=1).nonzero().squeeze(1)
            va, vb, cut = key
            head, head_logits = self._sample(va, prompts[rows], cut, temperature[rows])
            parts, part_logits = [head], [head_logits]
            if cut < H:
                tail, tail_logits = self._sample(vb, torch.cat([prompts[rows], head], 1), H - cut, temperature[rows])
                parts.append(tail)
                part_logits.append(tail_logits)
            responses[rows] = torch.cat(parts, dim=1)
            logits[rows] = torch.cat(part_logits, dim=1)
            versions[rows, :cut], versions[rows, cut:] = va, vb

        logp = torch.log_softmax(logits, dim=-1)
        rollout_logprobs = logp.gather(-1, responses.unsqueeze(-1)).squeeze(-1)
        rewards = self.task.reward(prompts, responses)
        corrupt = torch.rand(B, generator=self.gen) < s.reward_corruption
        rewards = torch.where(corrupt, torch.rand(B, generator=self.gen), rewards)

        topk_ids = topk_logprobs = None
        if s.topk > 0:
            topk_ids = logp.topk(s.topk, dim=-1).indices
            sampled_in = (topk_ids == responses.unsqueeze(-1)).any(-1, keepdim=True)
            last = torch.where(sampled_in, topk_ids[..., -1:], responses.unsqueeze(-1))
            topk_ids = torch.cat([topk_ids[..., :-1], last], dim=-1)  # the sampled token forced in
            topk_logprobs = logp.gather(-1, topk_ids)
        return Rollout(prompts, responses, rewards, group_ids, rollout_logprobs, versions, topk_ids, topk_logprobs)
