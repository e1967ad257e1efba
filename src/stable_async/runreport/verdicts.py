"""Verdicts: which signal left its band, for what share of the steps, at which steps, and what to do.

A rule flags a logged point when its (finite) value is past the rule's threshold. Let s₀ be the
first flagged step; the rule gives a verdict when at least `MIN_FLAGGED` points are flagged and
they are at least `PERSISTENCE` of the logged points from s₀ on:

    share = #flagged / #points with step ≥ s₀ ≥ PERSISTENCE

The step ranges are the maximal runs of consecutive flagged points (in logging order). Any
±inf value of a signal is a verdict of its own (no persistence needed). A NaN is not: it is how
loggers and GAC write "undefined at this step" (the first step's cosine, a zero gradient when
every reward of a group is equal); NaN points are counted in the signal's status line.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from stable_async.runreport.names import SIGNAL_BY_KEY
from stable_async.runreport.signals import SignalSeries

SEQ_ESS_LOW = 0.5
"""Sequence ESS/N below which the batch counts as less than half its size. Our choice: VCPO
(arXiv 2602.17616) finds collapse is predicted by falling ESS but states no cut-off; in the
committed staleness benchmark uncorrected PPO already loses much of its success at higher
sequence ESS/N (the guide table in docs/benchmark-results.md), so a run below 0.5 is past it."""

TOKEN_ESS_LOW = 0.9
"""Token ESS/N lower bound. Our choice, from the committed staleness benchmark's guide: token
ESS/N stays near 1 (≥ 0.95) at every lag where uncorrected PPO still trains and falls to about
0.7 only for the offline control (data from the initial policy), so 0.9 is far outside the normal range."""

MISMATCH_KL_HIGH = 0.02
"""Per-token mismatch KL (k3) upper bound. Our choice, from the committed staleness benchmark's
guide: between the drift at which uncorrected PPO keeps ≥ 90% of its synchronous success and the
drift at which it has lost about half."""

PPO_KL_HIGH = 0.015
"""Per-token KL(π_old ‖ π_θ) of one update: OpenAI Spinning Up's PPO stops a policy update when
the approximate KL exceeds 1.5 × target_kl, target_kl = 0.01 (its default)."""

CLIP_FRACTION_HIGH = 0.2
"""Clipped-token fraction. A rule of thumb (ours): with ε ≈ 0.2 a healthy PPO update clips a
few percent of the tokens; when a fifth are clipped, a fifth of the batch gives no gradient."""

MASKED_FRACTION_HIGH = 0.1
"""Masked / rejected / capped token fraction. Our choice: a correction that drops more than a
tenth of the tokens changes which samples are learned from, not only their weights."""

GRAD_COS_HIGH = 0.5
"""Consecutive-gradient cosine: the default threshold τ of `stable_async.GradientAlignmentControl`
(0.5), above which GAC projects the step (GAC, arXiv 2603.01501: asynchronous training shows
persistently aligned consecutive gradients)."""

LR_SCALE_LOW = 0.5
"""VCPO's lr scale s: below 0.5 the ESS-scaled step is under half the schedule's (with the sqrt
rule, ESS/N < 0.25). Our choice."""

GOVERNOR_BOUND_LOW = 0.5
"""The governor's bound k is an integer: below 0.5 means k = 0, synchronous training."""

PERSISTENCE = 0.2
"""Share of the points from the first flagged step on that must be flagged (a lone spike is noise)."""

MIN_FLAGGED = 2
"""Fewest flagged points for a verdict."""

MAX_RANGES = 6
"""Step ranges written out in a message; the rest are counted."""


@dataclass(frozen=True)
class Rule:
    """Flag a signal's values above (``above=True``) or below ``threshold``; ``advice`` ends the verdict."""

    signal: str
    threshold: float
    above: bool  # flag values above the threshold (else below)
    advice: str


RULES: tuple[Rule, ...] = (
    Rule(
        "seq_ess",
        SEQ_ESS_LOW,
        False,
        "tighten the correction (sequence-level truncation, VCPO's ESS-scaled lr) or lower the staleness bound",
    ),
    Rule(
        "token_ess",
        TOKEN_ESS_LOW,
        False,
        "token weights are heavy-tailed: cap or mask them (TIS cap, IcePop, M2PO) or lower the staleness bound",
    ),
    Rule(
        "mismatch_kl",
        MISMATCH_KL_HIGH,
        True,
        "correct for the rollout policy (TIS / IcePop / M2PO / VCPO) or lower the staleness bound; "
        "at staleness 0, check the engine's log-probs against the trainer's",
    ),
    Rule(
        "ppo_kl",
        PPO_KL_HIGH,
        True,
        "each update moves far from π_old: lower the lr or the number of PPO epochs / minibatches",
    ),
    Rule(
        "clip_fraction",
        CLIP_FRACTION_HIGH,
        True,
        "the data is too stale for the trust region: lower the staleness bound or the lr, "
        "or use a divergence trust region (DPPO)",
    ),
    Rule(
        "masked_fraction",
        MASKED_FRACTION_HIGH,
        True,
        "the correction drops a large share of the tokens: lower the staleness bound before loosening its threshold",
    ),
    Rule(
        "grad_cos",
        GRAD_COS_HIGH,
        True,
        "consecutive gradients stay aligned, stale steps compound (GAC's signature): "
        "enable GAC or lower the staleness bound or the lr",
    ),
    Rule(
        "lr_scale",
        LR_SCALE_LOW,
        False,
        "VCPO cuts the step to under half: the samples are stale enough to slow learning; lower the staleness bound",
    ),
    Rule(
        "governor_bound",
        GOVERNOR_BOUND_LOW,
        False,
        "the governor held the run synchronous (bound 0): its signals left their band, see the other verdicts",
    ),
)
RULE_BY_SIGNAL = {r.signal: r for r in RULES}


@dataclass(frozen=True)
class Verdict:
    """A signal past its threshold: the share of steps from ``onset`` on, the flagged ``ranges``
    (first step, last step), and the ``message`` printed (with the advice)."""

    signal: str
    metric: str
    kind: str  # "threshold" or "infinite"
    message: str
    onset: float
    flagged: int
    considered: int
    share: float
    ranges: tuple[tuple[float, float], ...]

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def runs_of(steps: Sequence[float], flags: Sequence[bool]) -> list[tuple[float, float]]:
    """Maximal runs of consecutive flagged points, as (first step, last step)."""
    out: list[tuple[float, float]] = []
    start: float | None = None
    for i, (step, flag) in enumerate(zip(steps, flags, strict=True)):
        if flag and start is None:
            start = step
        if start is not None and (not flag or i == len(steps) - 1):
            out.append((start, step if flag else steps[i - 1]))
            start = None
    return out


def _step(x: float) -> str:
    return f"{x:g}"


def format_ranges(ranges: Sequence[tuple[float, float]]) -> str:
    parts = [_step(a) if a == b else f"{_step(a)}–{_step(b)}" for a, b in ranges[:MAX_RANGES]]
    more = len(ranges) - MAX_RANGES
    return ", ".join(parts) + (f" and {more} more" if more > 0 else "")


def threshold_verdict(series: SignalSeries, rule: Rule) -> Verdict | None:
    """The rule's verdict on the series, or None (see the module docstring)."""
    flags = [math.isfinite(v) and (v > rule.threshold if rule.above else v < rule.threshold) for v in series.values]
    if sum(flags) < MIN_FLAGGED:
        return None
    first = flags.index(True)
    considered = sum(1 for v in series.values[first:] if math.isfinite(v))
    flagged = sum(flags)
    share = flagged / considered
    if share < PERSISTENCE:
        return None
    ranges = tuple(runs_of(series.steps, flags))
    onset = series.steps[first]
    title = SIGNAL_BY_KEY[rule.signal].title
    side = "above" if rule.above else "below"
    message = (
        f"{title} {side} {rule.threshold:g} in {share:.0%} of the logged steps from step {_step(onset)} on "
        f"(steps {format_ranges(ranges)}): {rule.advice}"
    )
    return Verdict(rule.signal, series.metric, "threshold", message, onset, flagged, considered, share, ranges)


def infinite_verdict(series: SignalSeries) -> Verdict | None:
    flags = [math.isinf(v) for v in series.values]
    if not any(flags):
        return None
    ranges = tuple(runs_of(series.steps, flags))
    title = SIGNAL_BY_KEY[series.signal].title
    message = (
        f"{title} is ±inf at steps {format_ranges(ranges)} ({series.metric}): an overflowing weight or "
        "log-ratio upstream; find the first such step in the trainer's logs"
    )
    onset = series.steps[flags.index(True)]
    return Verdict(
        series.signal,
        series.metric,
        "infinite",
        message,
        onset,
        sum(flags),
        len(flags),
        sum(flags) / len(flags),
        ranges,
    )


def judge(signals: dict[str, SignalSeries]) -> list[Verdict]:
    """Every verdict on a run's signals, in signal order (infinite values first for each signal)."""
    out: list[Verdict] = []
    for key, series in signals.items():
        bad = infinite_verdict(series)
        if bad is not None:
            out.append(bad)
        rule = RULE_BY_SIGNAL.get(key)
        if rule is not None:
            verdict = threshold_verdict(series, rule)
            if verdict is not None:
                out.append(verdict)
    return out


def status_line(series: SignalSeries) -> str:
    """One line per signal: where it stayed (median, extreme and its step) against its threshold."""
    title = SIGNAL_BY_KEY[series.signal].title
    finite = [(v, s) for v, s in zip(series.values, series.steps) if math.isfinite(v)]
    if not finite:
        return f"{title} ({series.metric}): no finite value ({len(series.values)} points)"
    rule = RULE_BY_SIGNAL.get(series.signal)
    median = statistics.median(v for v, _ in finite)
    pick = max if rule is None or rule.above else min
    worst = pick(finite, key=lambda point: point[0])  # the first step reaching the extreme
    band = "" if rule is None else f"; threshold {rule.threshold:g} ({'above' if rule.above else 'below'} flags)"
    word = "max" if rule is None or rule.above else "min"
    undefined = sum(1 for v in series.values if math.isnan(v))
    nan = f" ({undefined} NaN: undefined there)" if undefined else ""
    return (
        f"{title} ({series.metric}): median {median:.4g}, {word} {worst[0]:.4g} at step {_step(worst[1])}, "
        f"{len(series.values)} points{nan}{band}"
    )
