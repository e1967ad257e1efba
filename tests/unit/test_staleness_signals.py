"""`governor_signals`: logged metric names → `StalenessGovernor.update` arguments, into the real governor."""

from __future__ import annotations

import pytest

import stable_async as sa
from stable_async.integrations.staleness import SIGNAL_METRICS, governor_signals


def test_names_and_the_sequence_ess_ratio():
    logs = {
        "stable_async/rollout_corr/rollout_is_eff_sample_size": 0.8,
        "stable_async/rollout_corr/k3_kl": 0.05,
        "stable_async/actor/pg_clipfrac": 0.1,
        "stable_async/gac/cos": 0.3,
        "stable_async/vcpo/ess": 12.0,
        "stable_async/vcpo/ess_num_seqs": 16.0,
        "loss": 1.0,
    }
    assert governor_signals(logs, prefix="stable_async/") == {
        "token_ess_ratio": 0.8,
        "mismatch_kl": 0.05,
        "clip_fraction": 0.1,
        "grad_cos": 0.3,
        "ess_ratio": 0.75,
    }
    assert set(governor_signals({})) == {*SIGNAL_METRICS, "ess_ratio"}
    assert all(value is None for value in governor_signals(logs).values())  # no prefix: none of them
    assert governor_signals({"vcpo/ess": 0.0, "vcpo/ess_num_seqs": 0.0})["ess_ratio"] is None  # nothing recorded


def test_the_governor_acts_on_translated_metrics():
    gov = sa.StalenessGovernor(max_bound=8, initial_bound=4, patience=1)
    low = {"vcpo/ess": 10.0, "vcpo/ess_num_seqs": 40.0}  # ESS/N 0.25 < the 0.5 floor
    assert gov.update(**governor_signals(low)) == 2  # ⌊0.5 · 4⌋
    high = {"vcpo/ess": 38.0, "vcpo/ess_num_seqs": 40.0, "rollout_corr/k3_kl": 0.01}
    assert gov.update(**governor_signals(high)) == 3  # in band, patience 1: +1
    assert gov.update(**governor_signals({})) == 3  # no evidence: hold


def test_nan_is_the_governors_error_named_after_its_signal():
    gov = sa.StalenessGovernor(max_bound=4)
    with pytest.raises(ValueError, match="mismatch_kl"):
        gov.update(**governor_signals({"rollout_corr/k3_kl": float("nan")}))
