"""Verdicts on scripted series: flagged step ranges, shares and the persistence rule, by hand."""

from __future__ import annotations

import inspect
import math

import pytest

from stable_async.optim.gac import GradientAlignmentControl
from stable_async.runreport.signals import SignalSeries
from stable_async.runreport.verdicts import (
    GRAD_COS_HIGH,
    MAX_RANGES,
    RULE_BY_SIGNAL,
    SEQ_ESS_LOW,
    format_ranges,
    judge,
    runs_of,
    status_line,
    threshold_verdict,
)


def series(signal: str, values: list[float], steps: list[float] | None = None) -> SignalSeries:
    steps = steps if steps is not None else [10.0 * (i + 1) for i in range(len(values))]
    return SignalSeries(signal, f"logged/{signal}", tuple(steps), tuple(values))


def test_runs_of_consecutive_flags():
    steps = [1, 2, 3, 4, 5, 6, 7]
    assert runs_of(steps, [True, True, False, True, False, False, True]) == [(1, 2), (4, 4), (7, 7)]
    assert runs_of(steps, [False] * 7) == []
    assert runs_of(steps, [True] * 7) == [(1, 7)]


def test_sequence_ess_verdict_hand_computed():
    # steps 10..100; below 0.5 at steps 30, 40, 60, 70, 100: first flagged 30, 8 points from there, 5 flagged.
    values = [0.9, 0.8, 0.3, 0.4, 0.9, 0.1, 0.2, 0.9, 0.9, 0.1]
    v = threshold_verdict(series("seq_ess", values), RULE_BY_SIGNAL["seq_ess"])
    assert v is not None
    assert (v.onset, v.flagged, v.considered) == (30.0, 5, 8)
    assert v.share == pytest.approx(5 / 8)
    assert v.ranges == ((30.0, 40.0), (60.0, 70.0), (100.0, 100.0))
    assert "sequence ESS/N below 0.5" in v.message
    assert "from step 30 on (steps 30–40, 60–70, 100)" in v.message
    assert "lower the staleness bound" in v.message


def test_persistence_and_minimum_count():
    rule = RULE_BY_SIGNAL["seq_ess"]
    # Two early dips among 20 points: 2 flagged of the 19 from the first one on, < 20%: no verdict.
    values = [0.9, 0.1, 0.1] + [0.9] * 17
    assert threshold_verdict(series("seq_ess", values), rule) is None
    # One dip at the very end: share 1/1 but a single point: no verdict.
    assert threshold_verdict(series("seq_ess", [0.9] * 9 + [0.1]), rule) is None
    # The same two dips at the end: 2 of 2.
    v = threshold_verdict(series("seq_ess", [0.9] * 8 + [0.1, 0.1]), rule)
    assert v is not None and v.ranges == ((90.0, 100.0),) and v.share == 1.0
    # The threshold itself is not past it.
    assert threshold_verdict(series("seq_ess", [SEQ_ESS_LOW] * 5), rule) is None


def test_above_rule_and_nan_is_undefined_not_a_verdict():
    values = [math.nan, 0.1, 0.7, 0.8, math.nan, 0.9, 0.2]
    verdicts = judge({"grad_cos": series("grad_cos", values)})
    assert len(verdicts) == 1
    v = verdicts[0]
    # flagged (> 0.5): steps 30, 40, 60; from step 30: 4 finite points (30, 40, 60, 70; the NaN at 50 is skipped).
    assert (v.kind, v.onset, v.flagged, v.considered) == ("threshold", 30.0, 3, 4)
    # The NaN at step 50 breaks no run: it is not flagged, so 30–40 and 60 are separate runs.
    assert v.ranges == ((30.0, 40.0), (60.0, 60.0))
    assert "2 NaN" in status_line(series("grad_cos", values))


def test_infinite_values_are_a_verdict():
    verdicts = judge({"mismatch_kl": series("mismatch_kl", [0.001, math.inf, 0.001, 0.001])})
    assert [v.kind for v in verdicts] == ["infinite"]
    assert verdicts[0].ranges == ((20.0, 20.0),) and "±inf at steps 20" in verdicts[0].message


def test_signal_without_rule_gives_no_verdict():
    assert judge({"staleness": series("staleness", [0.0, 9.0, 30.0])}) == []


def test_ranges_are_truncated():
    ranges = [(float(i), float(i)) for i in range(MAX_RANGES + 3)]
    assert format_ranges(ranges).endswith("and 3 more")


def test_gradient_cosine_threshold_is_gac_default():
    default = inspect.signature(GradientAlignmentControl.__init__).parameters["threshold"].default
    assert default == GRAD_COS_HIGH
