"""The method table: every stabilizer the benchmark compares, and every hyperparameter it uses.

A `Method` says which registered loss to build (`stable_async.get_loss`) with which settings,
what the loss receives as ``old_logprobs``, how advantages are formed, and which optimizer-side
wrappers are on. This file is the only place hyperparameters live; each value is a paper's
default or comes from the sweep in ``benchmarks/staleness/sweep.md`` (on seeds that are never
reported), as its comment says.

``old`` (what the loss sees as π_old):

* ``"recomputed"``: the trainer's log-probs at the start of the step (veRL's default
  "recompute old_log_prob"). The stale behavior policy μ reaches the loss only through
  ``rollout_logprobs``, i.e. only if a correction or the loss itself reads it. Uncorrected PPO
  with this setting is the "naive async" baseline: its ratio starts at 1 on stale data.
* ``"rollout"``: bypass mode, π_old := μ, the engine's log-probs. The loss's own trust region
  (GSPO's sequence clip, CISPO's weight clip, M2PO's second-moment mask) faces the staleness.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

import stable_async as sa

# Shared by every method. BENCHMARK.md calibrates with 3e-3; with the confident initial policy
# (presets.head_scale = 3) 3e-3 kills every method at lag 8, 1.5e-3 keeps lag 0 at 1.0 (sweep.md).
LEARNING_RATE = 1.5e-3
ADAM_BETAS = (0.9, 0.999)
GRAD_CLIP = 1.0  # max global gradient norm, as veRL's default actor.grad_clip
ADV_EPS = 1e-6  # advantage = (R − b) / (group std + eps)


@dataclass(frozen=True)
class Method:
    name: str
    loss: str  # a name from stable_async.available_losses()
    loss_kwargs: Mapping[str, Any] = field(default_factory=dict)
    old: str = "recomputed"  # or "rollout" (bypass); see the module docstring
    baseline: str = "group"  # "group": the group mean (GRPO); "opob": VCPO's off-policy optimal baseline
    ess_lr: bool = False  # wrap the optimizer in sa.ESSScaledLR
    gac: Mapping[str, Any] | None = None  # sa.GradientAlignmentControl settings, None: off (monitor only)
    topk: bool = False  # the loss needs the engine's top-K log-probs
    summary: str = ""

    def build_loss(self) -> sa.Loss:
        return sa.get_loss(self.loss, **self.loss_kwargs)

    def build_optimizer(self, params: Any, lr: float | None = None) -> torch.optim.Optimizer:
        adam = torch.optim.Adam(params, lr=LEARNING_RATE if lr is None else lr, betas=ADAM_BETAS)
        return sa.ESSScaledLR(adam) if self.ess_lr else adam  # rule="sqrt", base_ratio=1: the paper's

    def build_gac(self, params: Any) -> sa.GradientAlignmentControl:
        # Every method runs GAC in monitor mode: it is how the gradient-cosine trace is measured.
        return sa.GradientAlignmentControl(params, **(self.gac or {"mode": "monitor"}))


TOPK = 4  # ids per position the engine reports for DPPO top-K (of a vocabulary of M + 1)

METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("ppo", "ppo", summary="uncorrected PPO-clip, ε = 0.2 (naive async: π_old recomputed, μ ignored)"),
        Method(
            "ppo_tis",
            "ppo",
            {"correction": sa.token_tis(high=2.0)},
            summary="PPO + token TIS min(π_old/μ, 2) (Yao et al. 2025)",
        ),
        Method(
            "icepop",
            "ppo",
            {"correction": sa.icepop(low=0.5, high=5.0)},
            summary="PPO + IcePop: token π_old/μ kept only in [0.5, 5] (arXiv 2510.18855)",
        ),
        Method("gspo", "gspo", old="rollout", summary="GSPO, ε = 3e-4 / 4e-4 (paper), sequence ratio against μ"),
        Method("cispo", "cispo", old="rollout", summary="CISPO, weight min(π_θ/μ, 5) (MiniMax-M1)"),
        Method(
            "decoupled_ppo",
            "decoupled_ppo",
            {"behavior_cap": 5.0},
            summary="decoupled PPO (AReaL): clip vs recomputed π_old, weight π_old/μ masked above 5 (AReaL docs)",
        ),
        Method(
            "m2po",
            "m2po",
            {"numerator": "current"},
            old="rollout",
            summary="M2PO, τ = 0.04 (paper): drop tokens until mean (log π_θ/μ)² ≤ τ, ratio vs μ, no clip",
        ),
        Method("dppo_binary_tv", "dppo_binary_tv", summary="DPPO binary TV, δ = 0.15, anchor μ (paper)"),
        Method(
            "dppo_topk_tv",
            "dppo_topk_tv",
            topk=True,
            summary=f"DPPO top-{TOPK} TV, δ = 0.15, anchor μ (paper)",
        ),
        Method("delight", "delight", summary="Delightful PG, η = 1 (paper): no behavior log-probs"),
        Method(
            "vcpo",
            "vcpo",
            baseline="opob",
            ess_lr=True,
            summary="VCPO: sequence-IS REINFORCE min(ρ, 8) + ESS-scaled LR + OPOB baseline (paper/reference)",
        ),
        Method(
            "gac",
            "ppo",
            gac={"mode": "project", "threshold": 0.5, "strength": 1.0},
            summary="uncorrected PPO + GAC projection, τ = 0.5, λ = 1 (library defaults; rule reconstructed)",
        ),
        # The best combination of the sweep (seed 100, sweep.md phase 4): the delight gate on the
        # current policy times the token TIS weight min(π_old/μ, 2); both at their papers' defaults.
        Method(
            "delight_tis",
            "delight",
            {"correction": sa.token_tis(high=2.0)},
            summary="best combination (sweep): delight gate η = 1 × token TIS min(π_old/μ, 2)",
        ),
    ]
}


# Variants tried in the sweep (benchmarks/staleness/sweep.md), runnable by name with --methods;
# not in the presets. Combinations and settings that are not a paper's default live here first.
VARIANTS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("gac_tau0", "ppo", gac={"mode": "project", "threshold": 0.0}, summary="naive PPO + GAC, τ = 0"),
        Method("ppo_tis_ess", "ppo", {"correction": sa.token_tis(high=2.0)}, ess_lr=True, summary="TIS + ESS-LR"),
        Method("decoupled_ess", "decoupled_ppo", {"behavior_cap": 5.0}, ess_lr=True, summary="decoupled + ESS-LR"),
        Method("dppo_tv_ess", "dppo_binary_tv", ess_lr=True, summary="DPPO binary TV + ESS-LR"),
        Method("vcpo_group", "vcpo", ess_lr=True, summary="VCPO without OPOB (group-mean baseline)"),
        Method("ppo_ess", "ppo", ess_lr=True, summary="naive PPO + ESS-LR"),
    ]
}


def get_method(name: str) -> Method:
    try:
        return METHODS.get(name) or VARIANTS[name]
    except KeyError:
        raise ValueError(f"method: unknown {name!r}; expected one of {[*METHODS, *VARIANTS]}") from None
