"""Every ```python block in docs/ runs: each page's blocks are executed in order as one script.

A page whose snippets need something a CPU test machine lacks (a GPU cluster, a launcher) opts
out with the HTML comment ``<!-- snippets: not-run -->`` and says why next to it. A page whose
snippets import an optional trainer (TRL, veRL, OpenRLHF, ...) that is not installed is skipped,
naming the missing package; with every package installed, every page runs. A single block that
cannot run on a CPU test machine is marked by ``<!-- snippet: not-run -->`` on the line before
its fence (the page says why in its text); the page's other blocks still run.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import re
import runpy

import pytest

from stable_async import registry

DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs"
BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```", re.S | re.M)
NOT_RUN_BLOCK = re.compile(r"^<!-- snippet: not-run -->\n```python[^\n]*\n.*?^```", re.S | re.M)
PAGES = sorted(p for p in DOCS.rglob("*.md") if BLOCK.search(p.read_text()))
# Optional packages a page may need, and the adapters that import them.
OPTIONAL = (
    "trl",
    "verl",
    "openrlhf",
    "deepspeed",
    "transformers",
    "datasets",
    "peft",
    "matplotlib",
    "areal",
    "skyrl",
    "ray",
)
ADAPTER_NEEDS = {
    "stable_async.integrations.trl": "trl",
    "stable_async.integrations.verl": "verl",
    "stable_async.integrations.verl_plugin": "verl",
    "stable_async.integrations.openrlhf": "openrlhf",
}


def imported_modules(script: str) -> set[str]:
    """Every module name the script imports (``import a.b`` and ``from a.b import c`` give ``a.b``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(script)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def missing_optional(script: str) -> str | None:
    """The first optional package the script needs that is not installed, or None."""
    needed = set()
    for name in imported_modules(script):
        top = name.split(".")[0]
        if top in OPTIONAL:
            needed.add(top)
        needed.update(pkg for adapter, pkg in ADAPTER_NEEDS.items() if name == adapter)
    return next((pkg for pkg in sorted(needed) if importlib.util.find_spec(pkg) is None), None)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_page_snippets_run(page, tmp_path, monkeypatch):
    text = page.read_text()
    if "<!-- snippets: not-run -->" in text:
        pytest.skip("page opts out of snippet execution (see the page)")
    source = "\n\n".join(BLOCK.findall(NOT_RUN_BLOCK.sub("", text)))
    missing = missing_optional(source)
    if missing is not None:
        pytest.skip(f"optional package {missing!r} is not installed")
    script = tmp_path / "snippets.py"
    script.write_text(source)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # a page may register its own loss
    runpy.run_path(str(script), run_name="__main__")


def test_a_page_needing_an_absent_trainer_is_skipped(monkeypatch):
    script = "import torch\nfrom stable_async.integrations.trl import StableGRPOTrainer\n"
    assert missing_optional(script) is None or importlib.util.find_spec("trl") is None
    real_find_spec = importlib.util.find_spec
    absent = {"trl", "verl"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in absent else real_find_spec(name))
    assert missing_optional(script) == "trl"
    assert missing_optional("from verl.trainer.ppo import core_algos\n") == "verl"
    assert missing_optional("import torch\nimport stable_async as sa\n") is None


def test_a_block_marked_not_run_is_left_out():
    text = "```python\na = 1\n```\n<!-- snippet: not-run -->\n```python\nimport skyrl\n```\n```python\nb = 2\n```\n"
    assert BLOCK.findall(NOT_RUN_BLOCK.sub("", text)) == ["a = 1\n", "b = 2\n"]
