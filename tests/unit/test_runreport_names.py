"""The metric-name map: wrappers, priorities, and every name found in the code that logs it."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from stable_async.runreport.names import METRIC_NAMES, SIGNAL_BY_KEY, SIGNALS, canonical
from stable_async.runreport.runlog import RunLog
from stable_async.runreport.signals import extract

SRC = pathlib.Path(__file__).resolve().parents[2] / "src" / "stable_async"
DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs" / "report.md"

# Where each trainer writes the names (files of the installed packages, relative to the package).
TRAINER_FILES = {
    "veRL": (
        "verl",
        ["trainer/ppo/rollout_corr_helper.py", "trainer/ppo/core_algos.py", "trainer/ppo/v1/trainer_base.py"],
    ),
    "TRL": ("trl", ["trainer/grpo_trainer.py", "experimental/async_grpo/async_grpo_trainer.py"]),
    "OpenRLHF": ("openrlhf", ["trainer/ray/ppo_actor.py"]),
}
# Names built from a prefix and a key (f"rollout_corr/{key}", prefix + "eff_sample_size"): the code holds the key.
BUILT_PREFIXES = ("rollout_corr/rollout_is_", "rollout_corr/", "actor/behav_imp_weight_", "trace_")


def literal_forms(name: str) -> list[str]:
    forms = [f'"{name}"']
    for prefix in BUILT_PREFIXES:
        if name.startswith(prefix):
            forms.append(f'"{name[len(prefix) :]}"')
            forms.append(f'{name[len(prefix) :]}"')  # the tail of an f-string / prefix + "..."
    return forms


def package_text(package: str, files: list[str]) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        pytest.skip(f"{package} not installed")
    root = pathlib.Path(spec.origin).parent
    return "\n".join((root / f).read_text() for f in files)


@pytest.mark.parametrize("trainer", sorted(TRAINER_FILES))
def test_trainer_names_are_in_the_trainers_code(trainer):
    package, files = TRAINER_FILES[trainer]
    text = package_text(package, files)
    names = [name for _, who, name, _ in METRIC_NAMES if trainer in who.split(", ")]
    assert names
    missing = [n for n in names if not any(form in text for form in literal_forms(n))]
    assert not missing, f"{trainer} does not log {missing} in {files}"


def test_our_names_are_in_our_code():
    text = "\n".join(p.read_text() for p in SRC.rglob("*.py") if "runreport" not in p.parts)
    ours = [name for _, who, name, _ in METRIC_NAMES if who.split(", ")[0] in ("stable-async", "benchmark")]
    if not (SRC / "governor.py").is_file():  # the staleness governor writes governor/*; merged separately
        ours = [n for n in ours if not n.startswith("governor/")]
    missing = [n for n in ours if not any(form in text for form in literal_forms(n))]
    assert not missing


def test_wrappers_and_priorities():
    assert canonical("train/stable_async/vcpo/ess_ratio") == canonical("vcpo/ess_ratio")
    assert canonical("actor/gac/cos")[0] == "grad_cos"  # veRL's actor/ prefix on the loss's metrics
    assert canonical("train/ppo_kl")[0] == "ppo_kl"  # OpenRLHF under W&B / TensorBoard
    assert canonical("kl") is None and canonical("train/") is None and canonical("eval/gac/cos") is None
    k3, k1 = canonical("rollout_corr/k3_kl"), canonical("rollout_corr/kl")
    assert k3[0] == k1[0] == "mismatch_kl" and k3[1] < k1[1]


def test_extract_prefers_priority_then_more_points():
    run = RunLog(
        "r",
        "src",
        "jsonl",
        {
            "rollout_corr/kl": [(1.0, 0.5), (2.0, 0.5)],
            "rollout_corr/k3_kl": [(1.0, 0.1)],
            "train/gac/cos": [(1.0, 0.2)],
            "gac/cos": [(1.0, 0.3), (2.0, 0.4)],
            "loss": [(1.0, 1.0)],
        },
    )
    signals = extract(run)
    assert signals["mismatch_kl"].metric == "rollout_corr/k3_kl"
    assert signals["grad_cos"].metric == "gac/cos"
    assert list(signals) == [s.key for s in SIGNALS if s.key in signals]


def test_every_signal_has_a_name_and_every_name_a_signal():
    used = {signal for signal, _, _, _ in METRIC_NAMES}
    assert used == set(SIGNAL_BY_KEY)
    names = [name for _, _, name, _ in METRIC_NAMES]
    assert len(names) == len(set(names))


def test_docs_table_lists_every_name():
    text = DOCS.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    documented = {line.split("|")[1].strip().strip("`") for line in rows}
    assert documented == {name for _, _, name, _ in METRIC_NAMES}
