"""StalenessGovernor: AIMD on scripted signal sequences, hand-computed traces, exact resume, bad input."""

from __future__ import annotations

import copy
import itertools
import math
import pickle

import pytest
import torch

import stable_async as sa

IN, OUT = 0.9, 0.2  # sequence ESS/N in band and below the default floor 0.5


def trace(gov: sa.StalenessGovernor, signals: list[dict]) -> list[int]:
    return [gov.update(**s) for s in signals]


# ---------------------------------------------------------------------- the rule on scripted sequences
def test_bound_rises_while_in_band_up_to_max():
    gov = sa.StalenessGovernor(max_bound=5, patience=2)
    bounds = trace(gov, [{"ess_ratio": IN}] * 14)
    assert bounds == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 5, 5, 5]
    assert gov.bound == 5 and gov.metrics()["governor/in_band"] == 1.0


def test_bound_falls_when_a_signal_leaves_the_band_down_to_min():
    gov = sa.StalenessGovernor(max_bound=32, min_bound=2, initial_bound=32)
    assert trace(gov, [{"ess_ratio": OUT}] * 6) == [16, 8, 4, 2, 2, 2]
    assert gov.metrics()["governor/in_band"] == 0.0 and gov.metrics()["governor/alarms"] == 6.0


def test_hand_computed_aimd_trace():
    # β = 0.7, increase 2, patience 3, k_max 12, k_min 1, k_0 = 6; the ESS floor 0.5.
    gov = sa.StalenessGovernor(max_bound=12, min_bound=1, initial_bound=6, beta=0.7, increase=2, patience=3)
    ess = [0.9, 0.9, 0.9, 0.9, 0.4, 0.6, 0.6, 0.6, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.1, 0.1, 0.1, 0.1]
    # k: 6 →(3 in band) 8 → alarm ⌊5.6⌋ = 5 → 3 in band: 7 → 3 in band: 9 → 3 in band: 11
    #    → alarms ⌊7.7⌋ = 7, ⌊4.9⌋ = 4, ⌊2.8⌋ = 2, ⌊1.4⌋ = 1
    expected = [6, 6, 8, 8, 5, 5, 5, 7, 7, 7, 9, 9, 9, 11, 7, 4, 2, 1]
    assert trace(gov, [{"ess_ratio": e} for e in ess]) == expected


def test_decrease_is_the_exact_floor_of_beta_times_bound():
    for beta, bound, expected in ((0.7, 10, 7), (0.29, 100, 29), (0.5, 1, 0), (0.0, 9, 0), (0.9, 3, 2)):
        gov = sa.StalenessGovernor(max_bound=100, initial_bound=bound, beta=beta)
        assert gov.update(ess_ratio=0.0) == expected, (beta, bound)


@pytest.mark.parametrize(
    ("signal", "bad", "good"),
    [
        ("ess_ratio", 0.49, 0.5),
        ("token_ess_ratio", 0.89, 0.9),
        ("mismatch_kl", 0.21, 0.2),
        ("grad_cos", -0.21, -0.2),
        ("clip_fraction", 0.31, 0.3),
    ],
)
def test_each_alarm_fires_outside_its_limit_only(signal, bad, good):
    limits = {"token_ess_floor": 0.9, "clip_ceiling": 0.3}  # the other three are on by default
    gov = sa.StalenessGovernor(max_bound=8, initial_bound=8, patience=1, **limits)
    assert gov.update(**{signal: good}) == 8  # at the limit: in band (k_max already)
    assert gov.update(**{signal: bad}) == 4
    assert gov.metrics()[f"governor/alarm_{signal}"] == 1.0
    assert gov.update(**{signal: good}) == 5


def test_a_disabled_limit_never_fires_and_omitted_signals_take_no_part():
    gov = sa.StalenessGovernor(max_bound=8, patience=1, ess_floor=None, kl_ceiling=None, cos_floor=None)
    assert trace(gov, [{"ess_ratio": 0.0, "mismatch_kl": 50.0, "grad_cos": -1.0}] * 3) == [1, 2, 3]
    gov = sa.StalenessGovernor(max_bound=8, initial_bound=4, patience=1)
    gov.update(grad_cos=-0.9)  # alarm; the next step omits grad_cos: only ESS counts
    assert gov.bound == 2 and gov.update(ess_ratio=IN) == 3


def test_a_step_without_any_signal_holds():
    gov = sa.StalenessGovernor(max_bound=8, initial_bound=3, patience=2)
    bounds = trace(gov, [{"ess_ratio": IN}, {}, {}, {"ess_ratio": IN}])
    assert bounds == [3, 3, 3, 4]  # the streak survives the holds
    assert gov.metrics()["governor/steps"] == 4.0


def test_any_alarm_wins_over_in_band_signals():
    gov = sa.StalenessGovernor(max_bound=8, initial_bound=8)
    assert gov.update(ess_ratio=1.0, token_ess_ratio=1.0, mismatch_kl=0.5, grad_cos=0.9) == 4
    m = gov.metrics()
    assert (m["governor/alarm_mismatch_kl"], m["governor/alarm_ess_ratio"], m["governor/alarm_grad_cos"]) == (1, 0, 0)


def test_smoothing_is_an_exponential_moving_average():
    gov = sa.StalenessGovernor(max_bound=8, initial_bound=8, smoothing=0.75, patience=1)
    values = [1.0, 0.2, 0.2, 0.2]
    expected_avg = [1.0, 0.8, 0.65, 0.5375]  # 0.75·x̄ + 0.25·x
    bounds = []
    for x, avg in zip(values, expected_avg):
        bounds.append(gov.update(ess_ratio=x))
        assert gov.metrics()["governor/ess_ratio"] == pytest.approx(avg, abs=1e-15)
    assert bounds == [8, 8, 8, 8]  # the average stays above 0.5: no alarm, unlike the raw signal
    assert gov.update(ess_ratio=0.2) == 4  # 0.453125 < 0.5


def test_lr_scale_is_one_in_band_and_sqrt_of_ess_over_floor_below():
    gov = sa.StalenessGovernor(max_bound=8, ess_floor=0.64)
    gov.update(ess_ratio=0.9)
    assert gov.lr_scale == 1.0
    gov.update(ess_ratio=0.16)
    assert gov.lr_scale == pytest.approx(0.5, abs=1e-15)
    assert gov.metrics()["governor/lr_scale"] == gov.lr_scale
    gov.update(mismatch_kl=0.5)  # out of band, but not by ESS: no lr suggestion
    assert gov.lr_scale == 1.0


def test_tensor_signals_equal_float_signals():
    a, b = sa.StalenessGovernor(max_bound=8), sa.StalenessGovernor(max_bound=8)
    sig = [(0.9, 0.01), (0.3, 0.05), (0.8, 0.3), (0.95, 0.0)]
    for ess, kl in sig:
        a.update(ess_ratio=ess, mismatch_kl=kl)
        b.update(ess_ratio=torch.tensor(ess, dtype=torch.float64), mismatch_kl=torch.tensor([kl], dtype=torch.float64))
        assert a.metrics() == b.metrics()


# ---------------------------------------------------------------------- resume
SCRIPT = [
    {"ess_ratio": e, "mismatch_kl": k, "grad_cos": c}
    for e, k, c in zip(
        [0.9, 0.7, 0.95, 0.4, 0.8, 0.85, 0.9, 0.6, 0.3, 0.9, 0.99, 0.97],
        [0.01, 0.05, 0.02, 0.1, 0.3, 0.01, 0.0, 0.02, 0.2, 0.01, 0.0, 0.0],
        [0.1, -0.1, 0.2, 0.0, 0.1, -0.3, 0.2, 0.3, 0.1, 0.0, 0.1, 0.2],
    )
]


@pytest.mark.parametrize("cut", [1, 3, 5, 8, 11])
def test_resume_gives_the_same_next_decisions(cut):
    kwargs = {"max_bound": 16, "initial_bound": 4, "smoothing": 0.3, "patience": 2}
    full = sa.StalenessGovernor(**kwargs)
    bounds = trace(full, SCRIPT)
    first = sa.StalenessGovernor(**kwargs)
    trace(first, SCRIPT[:cut])
    saved = pickle.loads(pickle.dumps(first.state_dict()))  # what a checkpoint round-trip gives
    resumed = sa.StalenessGovernor(**kwargs)
    resumed.load_state_dict(saved)
    assert resumed.metrics() == first.metrics()
    rest = []
    for s in SCRIPT[cut:]:
        rest.append(resumed.update(**s))
    assert rest == bounds[cut:]
    assert resumed.metrics() == full.metrics() and resumed.state_dict() == full.state_dict()


def test_the_resume_script_is_not_trivial():
    bounds = trace(sa.StalenessGovernor(max_bound=16, initial_bound=4, smoothing=0.3, patience=2), SCRIPT)
    assert len(set(bounds)) >= 3 and any(b < a for a, b in itertools.pairwise(bounds))
    assert any(b > a for a, b in itertools.pairwise(bounds))


def test_load_state_dict_warns_on_other_settings_and_rejects_bad_state():
    gov = sa.StalenessGovernor(max_bound=8, initial_bound=8)
    gov.update(ess_ratio=0.9)
    sd = gov.state_dict()
    other = sa.StalenessGovernor(max_bound=8, beta=0.25)
    with pytest.warns(UserWarning, match="beta"):
        other.load_state_dict(copy.deepcopy(sd))
    assert other.bound == 8
    small = sa.StalenessGovernor(max_bound=4)
    with pytest.raises(ValueError, match=r"state_dict\['bound'\]"):
        small.load_state_dict(sd)
    with pytest.raises(ValueError, match="missing keys"):
        small.load_state_dict({"bound": 1})
    with pytest.raises(TypeError, match="state_dict"):
        small.load_state_dict([1, 2])


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_bound": -1}, "max_bound"),
        ({"max_bound": 4.0}, "max_bound"),
        ({"max_bound": True}, "max_bound"),
        ({"max_bound": 4, "min_bound": 5}, "min_bound"),
        ({"max_bound": 4, "initial_bound": 5}, "initial_bound"),
        ({"max_bound": 4, "min_bound": 2, "initial_bound": 1}, "initial_bound"),
        ({"max_bound": 4, "ess_floor": 1.5}, "ess_floor"),
        ({"max_bound": 4, "ess_floor": "0.5"}, "ess_floor"),
        ({"max_bound": 4, "token_ess_floor": -0.1}, "token_ess_floor"),
        ({"max_bound": 4, "kl_ceiling": -1.0}, "kl_ceiling"),
        ({"max_bound": 4, "kl_ceiling": math.nan}, "kl_ceiling"),
        ({"max_bound": 4, "cos_floor": -2.0}, "cos_floor"),
        ({"max_bound": 4, "clip_ceiling": 2.0}, "clip_ceiling"),
        ({"max_bound": 4, "beta": 1.0}, "beta"),
        ({"max_bound": 4, "beta": False}, "beta"),
        ({"max_bound": 4, "increase": 0}, "increase"),
        ({"max_bound": 4, "patience": 1.5}, "patience"),
        ({"max_bound": 4, "smoothing": 1.0}, "smoothing"),
    ],
)
def test_bad_settings_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}: expected"):
        sa.StalenessGovernor(**kwargs)


@pytest.mark.parametrize(
    ("signal", "value"),
    [
        ("ess_ratio", math.nan),
        ("ess_ratio", 1.5),
        ("ess_ratio", -0.1),
        ("ess_ratio", True),
        ("token_ess_ratio", math.inf),
        ("mismatch_kl", math.nan),
        ("mismatch_kl", -math.inf),
        ("mismatch_kl", "0.1"),
        ("grad_cos", 1.5),
        ("grad_cos", torch.tensor(math.nan)),
        ("clip_fraction", 1.2),
    ],
)
def test_bad_signals_name_the_signal_and_change_nothing(signal, value):
    gov = sa.StalenessGovernor(max_bound=8, initial_bound=4)
    gov.update(ess_ratio=0.9)
    before = gov.state_dict()
    with pytest.raises(ValueError, match=f"^{signal}: expected"):
        gov.update(**{"token_ess_ratio": 0.95, signal: value})
    assert gov.state_dict() == before


def test_update_from_rejects_what_is_not_an_accumulator():
    with pytest.raises(TypeError, match="accumulator"):
        sa.StalenessGovernor(max_bound=4).update_from({"ess_ratio": 0.9})


# ---------------------------------------------------------------------- from a StepAccumulator
def test_update_from_reads_the_accumulators_sequence_and_token_ess_and_k3_kl():
    gen = torch.Generator().manual_seed(3)
    log_w = 0.8 * torch.randn(6, 5, generator=gen, dtype=torch.float64)
    mask = torch.rand(6, 5, generator=gen) < 0.8
    acc = sa.StepAccumulator()
    acc.record_log_weights(log_w, mask)
    stats = acc.reduce()
    direct = sa.StalenessGovernor(max_bound=8, initial_bound=4, token_ess_floor=0.9)
    direct.update(
        ess_ratio=sa.effective_sample_size(log_w, mask, level="sequence").ess_ratio,
        token_ess_ratio=sa.effective_sample_size(log_w, mask, level="token").ess_ratio,
        mismatch_kl=float((torch.expm1(log_w) - log_w)[mask].mean()),
        grad_cos=0.1,
    )
    for source in (acc, stats):
        gov = sa.StalenessGovernor(max_bound=8, initial_bound=4, token_ess_floor=0.9)
        gov.update_from(source, grad_cos=0.1)
        assert gov.metrics() == pytest.approx(direct.metrics(), rel=1e-12)
    assert direct.metrics()["governor/in_band"] == 0.0  # the case is not trivial: an alarm fires


def test_update_from_an_empty_step_holds():
    gov = sa.StalenessGovernor(max_bound=8, initial_bound=3, patience=1)
    assert gov.update_from(sa.StepAccumulator()) == 3
    assert "governor/in_band" not in gov.metrics()
