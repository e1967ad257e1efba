"""mypy checks all of ``src/``: only third-party packages may be overridden in pyproject.toml."""

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_no_mypy_override_on_our_own_modules():
    config = tomllib.loads(PYPROJECT.read_text())["tool"]["mypy"]
    assert config["files"] == ["src/stable_async"]
    for override in config.get("overrides", []):
        modules = override["module"] if isinstance(override["module"], list) else [override["module"]]
        ours = [m for m in modules if m.split(".")[0] == "stable_async"]
        assert not ours, f"mypy override on our own modules {ours}: fix the types instead"
        assert set(override) <= {"module", "ignore_missing_imports", "follow_imports"}, override
