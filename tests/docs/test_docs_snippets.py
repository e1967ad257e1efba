"""Every ```python block in docs/ runs: each page's blocks are executed in order as one script.

A page whose snippets need something a CPU test machine lacks (a GPU cluster, a launcher) opts
out with the HTML comment ``<!-- snippets: not-run -->`` and says why next to it.
"""

import pathlib
import re
import runpy

import pytest

from stable_async import registry

DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs"
BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```", re.S | re.M)
PAGES = sorted(p for p in DOCS.rglob("*.md") if BLOCK.search(p.read_text()))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_page_snippets_run(page, tmp_path, monkeypatch):
    text = page.read_text()
    if "<!-- snippets: not-run -->" in text:
        pytest.skip("page opts out of snippet execution (see the page)")
    script = tmp_path / "snippets.py"
    script.write_text("\n\n".join(BLOCK.findall(text)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # a page may register its own loss
    runpy.run_path(str(script), run_name="__main__")
