"""The canonical signals and the metric names each trainer logs them under.

Every name below was read from the code that logs it: stable-async's losses, corrections and
optimizers (``stable_async.losses.*``, ``correction``, ``diagnostics``, ``optim.gac``,
``optim.ess_lr``, ``governor``), veRL 0.9.1 (``verl.trainer.ppo.rollout_corr_helper``, ``core_algos``,
``ppo/v1/trainer_base``), TRL 1.16 (``GRPOTrainer``, ``experimental.async_grpo``), OpenRLHF 0.11.2
(``trainer/ray/ppo_actor.py``) and the staleness benchmark (``bench.trainer``).

Loggers wrap names: the HF Trainer's TensorBoard / W&B callbacks and OpenRLHF add ``train/``;
our TRL adapter logs our metrics as ``stable_async/<name>``; veRL prefixes the policy loss's
metrics with ``actor/`` unless they already start with it (``actor/vcpo/ess_ratio``). A logged
name is matched after removing those wrappers (`WRAPPERS`), outermost first.

Not mapped, on purpose: TRL's ``kl`` (KL to the reference model, not the rollout mismatch) and
``sampling/sampling_logp_difference/*`` (mean |Δ log p|, not a KL); veRL's and TRL's learning
rate (the schedule's value, not the ESS scale).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Signal:
    """A canonical signal: ``key`` (file and JSON name), ``title`` (axis label), ``meaning``."""

    key: str
    title: str
    meaning: str


SIGNALS: tuple[Signal, ...] = (
    Signal("seq_ess", "sequence ESS/N", "ESS/N of the sequence-level importance weights π_θ/μ"),
    Signal("token_ess", "token ESS/N", "ESS/N of the token-level importance weights"),
    Signal(
        "mismatch_kl", "mismatch KL", "per-token KL between the rollout policy μ and the trainer's π (k3 preferred)"
    ),
    Signal("ppo_kl", "policy KL", "per-token KL between π_old and π_θ inside the update"),
    Signal("clip_fraction", "clipped fraction", "fraction of tokens the surrogate clips"),
    Signal("masked_fraction", "masked fraction", "fraction of tokens the correction rejects, caps or filters"),
    Signal("grad_cos", "gradient cosine", "cosine of consecutive steps' gradients (GAC's c_t)"),
    Signal("lr_scale", "lr scale", "the step's learning-rate scale (VCPO's ESS scale s, or the governor's)"),
    Signal("governor_bound", "governor bound", "the staleness governor's bound k"),
    Signal("staleness", "staleness", "mean policy versions behind of the trained samples"),
)
SIGNAL_BY_KEY = {s.key: s for s in SIGNALS}

#: (signal, trainer, logged name, note). Per signal, earlier names win when a run logs several.
METRIC_NAMES: tuple[tuple[str, str, str, str], ...] = (
    ("seq_ess", "stable-async", "vcpo/ess_ratio", "ESSScaledLR: the ESS/N it scaled by"),
    ("seq_ess", "benchmark", "trace_ess_ratio", ""),
    (
        "token_ess",
        "stable-async, veRL",
        "rollout_corr/rollout_is_eff_sample_size",
        "1 / mean((w / mean w)²) of the applied (veRL: truncated) weights",
    ),
    ("token_ess", "stable-async", "actor/behav_imp_weight_eff_sample_size", "decoupled PPO's behaviour weights"),
    ("token_ess", "benchmark", "trace_token_ess_ratio", ""),
    ("mismatch_kl", "stable-async, veRL", "rollout_corr/k3_kl", "k3"),
    ("mismatch_kl", "benchmark", "trace_mismatch_kl", "k3"),
    ("mismatch_kl", "stable-async, veRL", "rollout_corr/kl", "k1: mean(log μ − log π)"),
    ("mismatch_kl", "stable-async", "prime_rl/mismatch_kl", ""),
    ("mismatch_kl", "stable-async", "actor/behav_kl", "decoupled PPO: k1 of μ against the proximal policy"),
    ("mismatch_kl", "OpenRLHF", "vllm_kl", "k1: mean(log μ − log π_old)"),
    ("ppo_kl", "stable-async, veRL", "actor/ppo_kl", ""),
    ("ppo_kl", "OpenRLHF", "ppo_kl", ""),
    ("clip_fraction", "stable-async, veRL", "actor/pg_clipfrac", ""),
    ("clip_fraction", "TRL", "clip_ratio/region_mean", "low or high clipped tokens"),
    ("clip_fraction", "TRL", "cispo_clip_ratio", "loss_type='cispo'"),
    ("clip_fraction", "OpenRLHF", "ppo_clip_ratio", ""),
    ("masked_fraction", "stable-async, veRL", "rollout_corr/rollout_rs_masked_fraction", "rejection sampling"),
    ("masked_fraction", "stable-async", "actor/m2po_masked_fraction", ""),
    ("masked_fraction", "stable-async", "actor/behav_capped_fraction", "decoupled PPO's behaviour-weight cap"),
    ("masked_fraction", "OpenRLHF", "is_filter_ratio", "truncated or masked fraction of its IS correction"),
    ("grad_cos", "stable-async", "gac/cos", ""),
    ("grad_cos", "benchmark", "trace_grad_cos", ""),
    ("lr_scale", "stable-async", "vcpo/lr_scale", ""),
    ("lr_scale", "stable-async", "governor/lr_scale", "StalenessGovernor's lr scale"),
    ("governor_bound", "stable-async", "governor/bound", "StalenessGovernor"),
    ("staleness", "TRL", "sample/staleness_mean", "experimental async_grpo"),
    ("staleness", "veRL", "training/off_policy/trajectory_staleness/mean", "ppo v1 trainer"),
    ("staleness", "benchmark", "trace_staleness", ""),
)

#: Prefixes loggers put in front of a name (see the module docstring).
WRAPPERS = ("train/", "stable_async/", "actor/")

_RANK = {name: (signal, i) for i, (signal, _, name, _) in reversed(list(enumerate(METRIC_NAMES)))}


def canonical(name: str) -> tuple[str, int] | None:
    """(signal key, priority) of a logged name, or None; priority: lower wins."""
    while True:
        if name in _RANK:
            return _RANK[name]
        wrapper = next((w for w in WRAPPERS if name.startswith(w) and len(name) > len(w)), None)
        if wrapper is None:
            return None
        name = name[len(wrapper) :]
