"""`StalenessGovernor`: the measured off-policyness of each step decides how far rollouts may run ahead.

Asynchronous trainers bound staleness by a number fixed before the run (AReaL's
``max_head_offpolicyness``, veRL's ``staleness_threshold``, SkyRL's ``max_staleness_steps``,
TRL's ``max_staleness``): too small wastes the overlap asynchrony exists for, too large
collapses the run. The governor closes the loop: after each training step it reads the
signals the step measured — sequence ESS/N of π_θ against μ (VCPO: a low ESS/N predicts
divergence), token ESS/N, the per-token mismatch KL, the cosine between consecutive step
gradients (GAC's signal), the clipped fraction — and returns the staleness bound k for the
rollouts admitted next.

Control rule: additive increase, multiplicative decrease (AIMD, the rule TCP uses for its
congestion window) on a band of the signals. With k_t the bound, n_t the number of
consecutive in-band steps since the last change, and x_t the (optionally smoothed) signals of
step t, the step is *out of band* (an alarm) when any given signal leaves its limit:

    alarm_t = [ess_t < ess_floor] ∨ [token_ess_t < token_ess_floor] ∨ [kl_t > kl_ceiling]
              ∨ [cos_t < cos_floor] ∨ [clip_t > clip_ceiling]

(a limit set to None, or a signal not given, takes no part), and then

    alarm_t:            k_{t+1} = max(k_min, ⌊β · k_t⌋),              n_{t+1} = 0
    in band:            n' = n_t + 1
        n' ≥ patience:  k_{t+1} = min(k_max, k_t + increase),        n_{t+1} = 0
        otherwise:      k_{t+1} = k_t,                               n_{t+1} = n'

A step where no signal at all is given holds: k and n are unchanged (no evidence either way).
⌊β · k⌋ is computed as ``floor(round(β · k, 9))``, so that β = 0.7, k = 10 gives 7 and
β = 0.29, k = 100 gives 29 (no float representation error in a hand-computed trace).

Smoothing (``smoothing`` = α, default 0: none): each signal enters the rule as its exponential
moving average x̄_t = α · x̄_{t−1} + (1 − α) · x_t, started at its first given value; a step that
omits a signal leaves its average as it was.

Learning-rate scale (``lr_scale``): with the sequence ESS/N below its floor the governor also
suggests s = sqrt(ess / ess_floor) (VCPO's square-root rule with ``ess_floor`` as its base
ratio), 1.0 otherwise (in band, or no ESS given); multiply the step's lr by it, or ignore it.

Why AIMD on ESS/N. In the staleness benchmark (``stable-async bench``; the per-step percentiles
are in docs/governor.md, from ``benchmarks/staleness/signal_percentiles.py``) the drift of a batch
grows with the bound but is noisy from step to step, and depends on the phase of training (low
while the policy moves fast, ≈ 1 once it has converged). A set-point controller (PI) on so noisy a
signal needs damping and a gain tuned to how the drift responds to the bound, and that response
changes with the phase of training; AIMD needs neither: it grows the bound slowly while the
measured drift stays acceptable and cuts it at once when it does not — the asymmetric cost here (a
too-large bound can collapse the run, a too-small one only costs time). The defaults (ess_floor
0.5, kl_ceiling 0.2 per token, cos_floor −0.2, β = 0.5, increase 1, patience 2) lie between the
drift the benchmark measures at bounds that keep synchronous success and at bounds that lose it.

Every signal is a *global* scalar (reduced over data-parallel ranks by the caller; `update_from`
uses the `stable_async.StepAccumulator`'s own DP reduction), so every rank takes the same
decisions. The governor is deterministic and `state_dict` / `load_state_dict` resume exactly.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from stable_async.checks import ArgumentTypeError, check_int, check_number, check_optional_number
from stable_async.optim.accumulator import StepAccumulator, StepStatistics
from stable_async.optim.ess_lr import ess_lr_scale

SIGNALS = ("ess_ratio", "token_ess_ratio", "mismatch_kl", "grad_cos", "clip_fraction")
"""The signals `StalenessGovernor.update` reads, in the order of its arguments."""

_RATIO_TOLERANCE = 1e-6  # ESS/N and cosines a rounding above their range are accepted (and clamped)
_SETTINGS = (
    "max_bound",
    "min_bound",
    "initial_bound",
    "ess_floor",
    "token_ess_floor",
    "kl_ceiling",
    "cos_floor",
    "clip_ceiling",
    "beta",
    "increase",
    "patience",
    "smoothing",
)
_STATE_VERSION = 1


def _check_signal(name: str, value: Any) -> float | None:
    """A signal as a float (None when omitted); NaN/inf and out-of-range values are errors."""
    if value is None:
        return None
    if name in ("ess_ratio", "token_ess_ratio", "clip_fraction"):
        return min(check_number(name, value, low=0.0, high=1.0 + _RATIO_TOLERANCE), 1.0)
    if name == "grad_cos":
        return max(min(check_number(name, value, low=-1.0 - _RATIO_TOLERANCE, high=1.0 + _RATIO_TOLERANCE), 1.0), -1.0)
    return check_number(name, value)  # mismatch_kl: k3 ≥ 0, but a k1 estimate may be slightly negative


class StalenessGovernor:
    """AIMD control of the staleness bound k from the measured signals of each step (module docstring).

    Args:
        max_bound: the largest bound k_max the governor may return (e.g. the trainer's
            configured staleness limit, or the number of snapshots an engine keeps).
        min_bound: the smallest bound k_min (default 0: fully synchronous).
        initial_bound: k at the first step (default ``min_bound``: start conservative).
        ess_floor: sequence ESS/N below this is an alarm (default 0.5; None: off).
        token_ess_floor: token ESS/N below this is an alarm (default None: off).
        kl_ceiling: per-token mismatch KL (k3 of μ against π_θ) above this is an alarm
            (default 0.2; None: off).
        cos_floor: a consecutive-step gradient cosine below this is an alarm (default −0.2;
            None: off).
        clip_ceiling: a clipped (or masked) token fraction above this is an alarm (default
            None: off).
        beta: the multiplicative decrease β in [0, 1) (default 0.5).
        increase: the additive increase, an int ≥ 1 (default 1).
        patience: consecutive in-band steps before each increase, an int ≥ 1 (default 2).
        smoothing: EMA coefficient α in [0, 1) of every signal (default 0: the raw signal).

    Example::

        gov = sa.StalenessGovernor(max_bound=32)
        for step in range(steps):
            batch = engine.rollout(max_staleness=gov.bound)    # versions in [t − k, t]
            ...                                                # loss, backward, record into acc
            stats = acc.reduce()
            opt.step()
            gov.update(ess_ratio=stats.sequence.ess_ratio, mismatch_kl=stats.mismatch_k3_kl)
            log(gov.metrics())
    """

    def __init__(
        self,
        max_bound: int,
        min_bound: int = 0,
        initial_bound: int | None = None,
        *,
        ess_floor: float | None = 0.5,
        token_ess_floor: float | None = None,
        kl_ceiling: float | None = 0.2,
        cos_floor: float | None = -0.2,
        clip_ceiling: float | None = None,
        beta: float = 0.5,
        increase: int = 1,
        patience: int = 2,
        smoothing: float = 0.0,
    ) -> None:
        self.max_bound = check_int("max_bound", max_bound, low=0)
        self.min_bound = check_int("min_bound", min_bound, low=0, high=self.max_bound)
        start = self.min_bound if initial_bound is None else initial_bound
        self.initial_bound = check_int("initial_bound", start, low=self.min_bound, high=self.max_bound)
        self.ess_floor = check_optional_number("ess_floor", ess_floor, low=0.0, high=1.0)
        self.token_ess_floor = check_optional_number("token_ess_floor", token_ess_floor, low=0.0, high=1.0)
        self.kl_ceiling = check_optional_number("kl_ceiling", kl_ceiling, low=0.0)
        self.cos_floor = check_optional_number("cos_floor", cos_floor, low=-1.0, high=1.0)
        self.clip_ceiling = check_optional_number("clip_ceiling", clip_ceiling, low=0.0, high=1.0)
        self.beta = check_number("beta", beta, low=0.0, high=1.0, high_open=True)
        self.increase = check_int("increase", increase, low=1)
        self.patience = check_int("patience", patience, low=1)
        self.smoothing = check_number("smoothing", smoothing, low=0.0, high=1.0, high_open=True)
        self._bound = self.initial_bound
        self._streak = 0
        self._steps = 0
        self._alarms = 0
        self._lr_scale = 1.0
        self._in_band = 1.0
        self._smoothed: dict[str, float] = {}
        self._last: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"StalenessGovernor(bound={self._bound}, max_bound={self.max_bound}, min_bound={self.min_bound})"

    # ------------------------------------------------------------------ what the caller reads
    @property
    def bound(self) -> int:
        """The staleness bound k for the rollouts admitted next (an int in [min_bound, max_bound])."""
        return self._bound

    @property
    def lr_scale(self) -> float:
        """sqrt(ESS/N / ess_floor) when the last update's (smoothed) ESS/N was below its floor, else 1.0."""
        return self._lr_scale

    def _limits(self) -> dict[str, tuple[str, float | None]]:
        return {
            "ess_ratio": ("floor", self.ess_floor),
            "token_ess_ratio": ("floor", self.token_ess_floor),
            "mismatch_kl": ("ceiling", self.kl_ceiling),
            "grad_cos": ("floor", self.cos_floor),
            "clip_fraction": ("ceiling", self.clip_ceiling),
        }

    def _alarms_of(self, names: list[str]) -> dict[str, bool]:
        """Per given signal that has a limit: whether its (smoothed) value is outside the limit."""
        out = {}
        limits = self._limits()
        for name in names:
            kind, limit = limits[name]
            if limit is not None:
                value = self._smoothed[name]
                out[name] = value < limit if kind == "floor" else value > limit
        return out

    def metrics(self) -> dict[str, float]:
        """The last decision, for logging: ``governor/bound``, ``governor/lr_scale``, ``governor/in_band``
        (1 in band, 0 after an alarm; a hold keeps the last value; 1 before the first update),
        ``governor/streak``, ``governor/alarms`` (alarms so far), ``governor/steps``, and for each
        signal the last update was given: ``governor/<signal>`` (the value the rule used, smoothed)
        and, if it has a limit, ``governor/alarm_<signal>`` (0 or 1)."""
        out = {
            "governor/bound": float(self._bound),
            "governor/lr_scale": self.lr_scale,
            "governor/in_band": self._in_band,
            "governor/streak": float(self._streak),
            "governor/alarms": float(self._alarms),
            "governor/steps": float(self._steps),
        }
        out.update({f"governor/{key}": value for key, value in self._last.items()})
        return out

    # ------------------------------------------------------------------ the rule
    def update(
        self,
        ess_ratio: Any = None,
        token_ess_ratio: Any = None,
        mismatch_kl: Any = None,
        grad_cos: Any = None,
        clip_fraction: Any = None,
    ) -> int:
        """One step of the rule (module docstring) on this step's global signals; returns the new bound.

        Args:
            ess_ratio: sequence-level ESS/N in [0, 1] of π_θ against μ (VCPO's ESS).
            token_ess_ratio: token-level ESS/N in [0, 1].
            mismatch_kl: mean per-token mismatch KL (k3 of μ against π_θ, veRL ``rollout_corr/k3_kl``).
            grad_cos: cosine in [−1, 1] of this step's gradient with the previous step's.
            clip_fraction: fraction in [0, 1] of clipped or masked tokens.

        Each may be a float, a one-element tensor or None (omitted). NaN, ±inf, a bool or a value
        outside the range raises a ValueError / TypeError naming the signal, and leaves the
        governor unchanged.
        """
        given = {
            name: _check_signal(name, value)
            for name, value in zip(
                SIGNALS, (ess_ratio, token_ess_ratio, mismatch_kl, grad_cos, clip_fraction), strict=True
            )
        }
        values = {name: value for name, value in given.items() if value is not None}
        self._steps += 1
        a = self.smoothing
        for name, value in values.items():
            previous = self._smoothed.get(name)
            self._smoothed[name] = value if previous is None else a * previous + (1.0 - a) * value
        alarms = self._alarms_of(list(values))
        self._last = {name: self._smoothed[name] for name in values}
        self._last.update({f"alarm_{name}": float(alarmed) for name, alarmed in alarms.items()})
        ess = self._smoothed.get("ess_ratio") if "ess_ratio" in values else None
        floor = self.ess_floor
        self._lr_scale = 1.0 if ess is None or not floor else ess_lr_scale(ess, "sqrt", base_ratio=floor)
        if not values:
            return self._bound  # no evidence: hold
        if any(alarms.values()):
            self._bound = max(self.min_bound, math.floor(round(self.beta * self._bound, 9)))
            self._streak = 0
            self._alarms += 1
            self._in_band = 0.0
            return self._bound
        self._streak += 1
        if self._streak >= self.patience:
            self._bound = min(self.max_bound, self._bound + self.increase)
            self._streak = 0
        self._in_band = 1.0
        return self._bound

    def update_from(
        self,
        accumulator: StepAccumulator | StepStatistics,
        *,
        grad_cos: Any = None,
        clip_fraction: Any = None,
    ) -> int:
        """`update` with the step's ESS/N (sequence and token) and k3 mismatch KL from a `StepAccumulator`.

        A `StepAccumulator` is reduced here (`StepAccumulator.reduce`: a collective over its
        data-parallel group; every rank must call this at every step); pass its `StepStatistics`
        instead when the step already reduced it (e.g. `StableStep`). Signals of a step with no
        valid token are omitted. ``grad_cos`` and ``clip_fraction`` are passed through.
        """
        if isinstance(accumulator, StepAccumulator):
            stats = accumulator.reduce()
        elif isinstance(accumulator, StepStatistics):
            stats = accumulator
        else:
            raise ArgumentTypeError(
                "accumulator: expected a stable_async.StepAccumulator or StepStatistics, "
                f"got {type(accumulator).__name__}"
            )
        return self.update(
            ess_ratio=stats.sequence.ess_ratio if stats.sequence.n > 0 else None,
            token_ess_ratio=stats.token.ess_ratio if stats.token.n > 0 else None,
            mismatch_kl=stats.mismatch_k3_kl if stats.token.n > 0 else None,
            grad_cos=grad_cos,
            clip_fraction=clip_fraction,
        )

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything the next decision depends on (plain Python values), and the settings."""
        return {
            "version": _STATE_VERSION,
            "bound": self._bound,
            "streak": self._streak,
            "steps": self._steps,
            "alarms": self._alarms,
            "lr_scale": self._lr_scale,
            "in_band": self._in_band,
            "smoothed": dict(self._smoothed),
            "last": dict(self._last),
            "settings": {name: getattr(self, name) for name in _SETTINGS},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a `state_dict`; the settings stay as constructed (a warning if the checkpoint's differ)."""
        if not isinstance(state_dict, dict):
            raise ArgumentTypeError(f"state_dict: expected a dict, got {type(state_dict).__name__}")
        missing = [k for k in ("bound", "streak", "steps", "alarms", "smoothed") if k not in state_dict]
        if missing:
            raise ValueError(f"state_dict: missing keys {missing}; expected a StalenessGovernor.state_dict()")
        bound = check_int("state_dict['bound']", state_dict["bound"], low=0)
        if not self.min_bound <= bound <= self.max_bound:
            raise ValueError(
                f"state_dict['bound']: expected a bound in [{self.min_bound}, {self.max_bound}] "
                f"(this governor's min_bound, max_bound), got {bound}"
            )
        smoothed = state_dict["smoothed"]
        if not isinstance(smoothed, dict) or any(name not in SIGNALS for name in smoothed):
            raise ValueError(f"state_dict['smoothed']: expected a dict keyed by signals {list(SIGNALS)}")
        saved = state_dict.get("settings", {})
        changed = sorted(k for k in _SETTINGS if k in saved and saved[k] != getattr(self, k))
        if changed:
            warnings.warn(
                f"StalenessGovernor.load_state_dict: checkpoint settings differ for {changed}; "
                "keeping the constructor's",
                stacklevel=2,
            )
        self._bound = bound
        self._streak = check_int("state_dict['streak']", state_dict["streak"], low=0)
        self._steps = check_int("state_dict['steps']", state_dict["steps"], low=0)
        self._alarms = check_int("state_dict['alarms']", state_dict["alarms"], low=0)
        self._in_band = check_number("state_dict['in_band']", state_dict.get("in_band", 1.0), low=0.0, high=1.0)
        self._lr_scale = check_number("state_dict['lr_scale']", state_dict.get("lr_scale", 1.0), low=0.0, high=1.0)
        self._smoothed = {name: check_number(f"state_dict['smoothed'][{name!r}]", v) for name, v in smoothed.items()}
        self._last = {k: float(v) for k, v in state_dict.get("last", {}).items()}


__all__ = ["SIGNALS", "StalenessGovernor"]
