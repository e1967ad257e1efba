"""The method table: every stabilizer the benchmark compares, configured as its authors run it.

A `Method` says which registered loss to build (`stable_async.get_loss`) with which settings,
what the loss receives as ``old_logprobs``, how advantages are formed, and which optimizer-side
wrappers are on. This file is the only place hyperparameters live; each row's comment names
the upstream file (or paper section) it follows. Every method takes one optimizer step per
rollout batch unless the preset says otherwise (BenchSettings.minibatches / epochs).

``old`` (what the loss sees as π_old):

* ``"recomputed"``: the trainer's log-probs at the start of the step (veRL's default
  "recompute old_log_prob"). μ reaches the loss only through ``rollout_logprobs``, i.e. only
  if a correction or the loss itself reads it. Uncorrected PPO with this setting is the
  "naive async" baseline: its ratio starts at 1 on stale data.
* ``"rollout"``: bypass mode, π_old := μ, the engine's log-probs.
* ``"current"``: π_old := sg(π_θ), the log-probs of the forward pass being differentiated
  (VCPO's reference: the ratio is 1 by construction and the sequence IS weight does the work).

``governor``: the row's staleness bound is not fixed: a `stable_async.StalenessGovernor` with
these settings (``max_bound`` = the run's lag) sets each step's bound from the drift the trainer
measured on the previous step's batch; ``base`` names the fixed-bound row with the same loss it
is compared with (``governor_<base>`` rows).

Learning rates. ``LEARNING_RATE`` is shared by every method (the lr of the headline tables);
``TUNED_LR`` holds each method's best lr from the sweep in ``benchmarks/staleness/sweep.md``
(seed 100, never reported), used by the ``*@tuned`` rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

import stable_async as sa

LEARNING_RATE = 5e-3  # shared by every method (presets docstring: how it was calibrated)
ADAM_BETAS = (0.9, 0.999)
GRAD_CLIP = 1.0  # max global gradient norm: veRL's actor.grad_clip, AReaL's gradient_clipping, VCPO's scripts
ADV_EPS = 1e-6  # advantage = (R − b) / (group std + eps)
TOPK = 4  # ids per position the engine reports for DPPO top-K (of a vocabulary of M + 1)

# Each method's best lr on the sweep seeds (benchmarks/staleness/sweep-lr.md, from
# `stable-async bench --preset sweep` and benchmarks/staleness/pick_lr.py); a method missing
# here (dppo_binary_tv, delight, vcpo) had the shared lr as its best.
TUNED_LR: dict[str, float] = {
    name: 2.5e-3
    for name in (
        "ppo",
        "ppo_tis",
        "icepop",
        "gspo",
        "cispo",
        "decoupled_ppo",
        "m2po",
        "dppo_topk_tv",
        "gac",
        "dppo_tv_recompute",
    )
}


@dataclass(frozen=True)
class Method:
    name: str
    loss: str  # a name from stable_async.available_losses()
    loss_kwargs: Mapping[str, Any] = field(default_factory=dict)
    old: str = "recomputed"  # "recomputed", "rollout" (bypass) or "current"; see the module docstring
    baseline: str = "group"  # "group": the group mean (GRPO); "opob": VCPO's off-policy optimal baseline
    ess_lr: bool = False  # wrap the optimizer in sa.ESSScaledLR (sqrt rule, base ratio 1)
    gac: Mapping[str, Any] | None = None  # sa.GradientAlignmentControl settings acting on each optimizer step
    topk: bool = False  # the loss needs the engine's top-K log-probs
    lr: float | None = None  # None: LEARNING_RATE
    governor: Mapping[str, Any] | None = None  # sa.StalenessGovernor settings (max_bound = the lag); None: fixed bound
    base: str | None = None  # a governed row: the fixed-bound row it governs (same loss, same lr)
    summary: str = ""

    def build_loss(self) -> sa.Loss:
        return sa.get_loss(self.loss, **self.loss_kwargs)

    def learning_rate(self) -> float:
        return LEARNING_RATE if self.lr is None else self.lr

    def build_optimizer(self, params: Any, lr: float | None = None) -> torch.optim.Optimizer:
        adam = torch.optim.Adam(params, lr=self.learning_rate() if lr is None else lr, betas=ADAM_BETAS)
        return sa.ESSScaledLR(adam) if self.ess_lr else adam  # rule="sqrt", base_ratio=1: VCPO's scripts

    def build_gac(self, params: Any) -> sa.GradientAlignmentControl | None:
        return None if self.gac is None else sa.GradientAlignmentControl(params, **self.gac)

    def build_governor(self, max_bound: int) -> sa.StalenessGovernor | None:
        return None if self.governor is None else sa.StalenessGovernor(max_bound=max_bound, **self.governor)


def _dppo_recompute_available() -> bool:
    """Whether the library's DPPO config separates the trust-region anchor from the weight anchor."""
    config = sa.get_loss("dppo_binary_tv").config
    return any(f.name == "weight_anchor" for f in dataclasses.fields(config))


_ROWS = [
    # veRL core_algos.compute_policy_loss_vanilla, clip 0.2, π_old recomputed, μ ignored.
    Method("ppo", "ppo", summary="uncorrected PPO-clip, ε = 0.2 (naive async: π_old recomputed, μ ignored)"),
    # veRL trainer/ppo/rollout_corr_helper.py, rollout_is="token", threshold 2 (Yao et al. 2025).
    Method(
        "ppo_tis",
        "ppo",
        {"correction": sa.token_tis(high=2.0)},
        summary="PPO + token TIS min(π_old/μ, 2) (veRL rollout_is=token, threshold 2)",
    ),
    # IcePop (arXiv 2510.18855): token mask outside [0.5, 5], veRL rollout_rs="token" bounds.
    Method(
        "icepop",
        "ppo",
        {"correction": sa.icepop(low=0.5, high=5.0)},
        summary="PPO + IcePop: token π_old/μ kept only in [0.5, 5] (arXiv 2510.18855)",
    ),
    # GSPO (arXiv 2507.18071) §4: ε = 3e-4 / 4e-4, sequence ratio; against μ (bypass).
    Method("gspo", "gspo", old="rollout", summary="GSPO, ε = 3e-4 / 4e-4 (paper), sequence ratio against μ"),
    # CISPO (MiniMax-M1, arXiv 2506.13585): weight min(r, 5) (TRL's recommended epsilon_high), against μ.
    Method("cispo", "cispo", old="rollout", summary="CISPO, weight min(π_θ/μ, 5) (MiniMax-M1; TRL cap)"),
    # AReaL areal/utils/functional.py ppo_actor_loss_fn with examples/math/gsm8k_grpo.yaml:
    # use_decoupled_loss, recompute_logprob, eps_clip 0.4, behav_imp_weight_cap 5, ppo_n_minibatches 1.
    Method(
        "decoupled_ppo",
        "decoupled_ppo",
        {"eps_low": 0.4, "eps_high": 0.4, "behavior_cap": 5.0},
        summary="decoupled PPO (AReaL gsm8k_grpo.yaml): clip 0.4 vs recomputed π_old, π_old/μ masked above 5",
    ),
    # M2PO (arXiv 2510.01161) Algorithm 1: τ = 0.04, second moment of log(π_θ/μ), ratio vs μ, no clip.
    Method(
        "m2po",
        "m2po",
        {"numerator": "current"},
        old="rollout",
        summary="M2PO, τ = 0.04 (paper Alg. 1): drop tokens until mean (log π_θ/μ)² ≤ τ, ratio vs μ, no clip",
    ),
    # DPPO (arXiv 2602.04879; sail-sg/Stable-RL): binary TV, δ = 0.15, anchor μ (its default mode).
    Method("dppo_binary_tv", "dppo_binary_tv", summary="DPPO binary TV, δ = 0.15, trust region and weight vs μ"),
    Method("dppo_topk_tv", "dppo_topk_tv", topk=True, summary=f"DPPO top-{TOPK} TV, δ = 0.15, anchor μ (paper)"),
    # Delightful PG (arXiv 2603.14608) §3: η = 1, surprisal of the current learner; no behavior log-probs.
    Method("delight", "delight", summary="Delightful PG, η = 1 (paper): gate σ(A·ℓ/η), no behavior log-probs"),
    # mit-han-lab/vcpo recipe/fully_async_policy/shell/vcpo/math/vcpo_k=16.sh with
    # verl/workers/actor/megatron_actor.py: veRL vanilla loss with clip_ratio_low 1, clip_ratio_high
    # and clip_ratio_c 1e9 and π_old = the current log-probs detached (ratio ≡ 1, clipping inert),
    # rollout_is="sequence" threshold 8, seq-mean-token-mean, one step per batch, ESS sqrt scaling
    # (base ratio 1, unclipped weights), OPOB group scope, use_is_weights, exact per-trajectory norms.
    Method(
        "vcpo",
        "vcpo",
        old="current",
        baseline="opob",
        ess_lr=True,
        summary="VCPO (mit-han-lab/vcpo): sequence-IS REINFORCE min(ρ, 8) + ESS-sqrt LR + OPOB, exact norms",
    ),
    # GAC as the library implements it (docs/gac.md): projection of the previous step's gradient
    # when the cosine exceeds τ = 0.5, λ = 1, acting on each optimizer step of uncorrected PPO.
    Method(
        "gac",
        "ppo",
        gac={"mode": "project", "threshold": 0.5, "strength": 1.0},
        summary="uncorrected PPO + GAC projection, τ = 0.5, λ = 1 (library defaults)",
    ),
]
# The 2026 methods: in the method table (`--methods vespo,...`), not yet in the full preset's grid.
_ROWS_2026 = [
    # TRL 1.16 grpo_trainer.py, loss_type="vespo" (arXiv 2602.10693), grpo_config.py defaults
    # (k_pos 2, λ_pos 3, k_neg 3, λ_neg 2); the sequence ratio against μ, as for an async run.
    Method("vespo", "vespo", old="rollout", summary="VESPO (TRL defaults): Gamma-shaped weight of the ratio vs μ"),
    # TRL 1.16 loss_type="luspo" (arXiv 2602.05261): length-unbiased GSPO, ε = 0.2, against μ.
    Method("luspo", "luspo", old="rollout", summary="LUSPO (TRL defaults): length-unbiased GSPO vs μ, ε = 0.2"),
    # veRL 0.9.1 core_algos.py compute_policy_loss_clip_cov, policy_loss defaults (ratio 2e-4, bounds 1 / 5).
    Method("clip_cov", "clip_cov", summary="Clip-Cov (veRL defaults): no gradient on high-covariance tokens"),
    # veRL 0.9.1 core_algos.py compute_policy_loss_kl_cov (kl_cov_ratio 2e-4, ppo_kl_coef 0.1).
    Method("kl_cov", "kl_cov", summary="KL-Cov (veRL defaults): KL penalty on high-covariance tokens"),
    # prime-rl src/prime_rl/trainer/rl/loss.py default_loss_fn (docs/losses/prime_rl page: commit read).
    Method("prime_rl", "prime_rl", summary="prime-rl default: DPPO binary-TV mask + squared log-ratio KL to μ"),
    # DeepSeek-V3.2 OPSM (arXiv 2512.02556) as TRL's off_policy_mask_threshold, δ = 0.5 (TRL's docs),
    # composed with the token TIS row above.
    Method(
        "ppo_tis_opsm",
        "ppo",
        {"correction": (sa.token_tis(high=2.0), sa.opsm(threshold=0.5))},
        summary="PPO + token TIS + OPSM δ = 0.5 (negative-advantage sequences with KL to μ > δ masked)",
    ),
]
if _dppo_recompute_available():
    # DPPO's *_recompute modes (arXiv 2602.04879 §4; sail-sg/Stable-RL): trust region around the
    # recomputed π_old, weight min(π_θ/μ, 10) against the behavior policy.
    _ROWS.append(
        Method(
            "dppo_tv_recompute",
            "dppo_binary_tv",
            {"anchor": "old", "weight_anchor": "rollout"},
            summary="DPPO binary TV *_recompute: trust region vs recomputed π_old, weight min(π_θ/μ, 10)",
        )
    )

# The staleness governor (docs/governor.md) on the corrections that keep the most at large bounds;
# the lr and every loss setting are the governed row's. Its settings were chosen on seeds 100 and
# 101 (never reported) with the reversal settings of the previous warm start (60 supervised steps,
# noise 0.3; benchmarks/staleness/sweep.md), governor_ppo_tis at bound <= 32,
# among three: the library's defaults (final success 0.97 / 0.89), ess_floor 0.8 (0.92 / 0.98), and
# these (0.98 / 1.00; fixed ppo_tis at k = 4: 0.96 / 0.97, at k = 0: 1.00 / 0.99), e.g.
# `stable-async bench --preset quick --methods governor_ppo_tis --lags 32 --seeds 100,101
# --set sft_steps=60 --set sft_noise=0.3`.
GOVERNOR_SETTINGS: Mapping[str, Any] = {"ess_floor": 0.8, "kl_ceiling": 0.05, "patience": 4}
GOVERNED = ("ppo_tis", "vcpo")


def _governed(row: Method) -> Method:
    return dataclasses.replace(
        row,
        name=f"governor_{row.name}",
        governor=GOVERNOR_SETTINGS,
        base=row.name,
        summary=f"{row.name} under sa.StalenessGovernor (AIMD: ESS/N < 0.8, KL > 0.05 or cos < -0.2 halve k; k ≤ lag)",
    )


_BY_NAME = {m.name: m for m in _ROWS + _ROWS_2026}
_ROWS_GOVERNOR = [_governed(_BY_NAME[name]) for name in GOVERNED]

METHODS: dict[str, Method] = {m.name: m for m in _ROWS + _ROWS_2026 + _ROWS_GOVERNOR}
METHODS_2026: tuple[str, ...] = tuple(m.name for m in _ROWS_2026)
METHODS_GOVERNOR: tuple[str, ...] = tuple(m.name for m in _ROWS_GOVERNOR)

TUNED_SUFFIX = "@tuned"


def get_method(name: str) -> Method:
    """A method by name; ``<name>@tuned``: at its swept lr (``TUNED_LR``); ``<name>@lr=X``: at lr X."""
    base, _, suffix = name.partition("@")
    method = METHODS.get(base)
    lr: float | None = None
    if method is not None and suffix == TUNED_SUFFIX[1:]:
        lr = TUNED_LR.get(method.base or base, LEARNING_RATE)  # a governed row: its base row's lr
    elif method is not None and suffix.startswith("lr="):
        try:
            lr = float(suffix[3:])
        except ValueError:
            method = None
        if lr is not None and not (lr > 0 and lr < 1):
            method = None
    elif suffix:
        method = None
    if method is None:
        raise ValueError(f"method: unknown {name!r}; expected one of {list(METHODS)}, optionally + '@tuned' or '@lr=X'")
    return method if lr is None else dataclasses.replace(method, name=name, lr=lr)
