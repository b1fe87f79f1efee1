"""The Python blocks of docs/getting-started.md and docs/retention.md run as shown."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks(page: str) -> list[str]:
    return _BLOCK.findall((DOCS / page).read_text())


@pytest.mark.parametrize("page", ["getting-started.md", "retention.md"])
def test_page_runs(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    out = io.StringIO()
    found = blocks(page)
    assert found, f"no python blocks in {page}"
    with contextlib.redirect_stdout(out):
        for code in found:
            exec(compile(code, f"{page}", "exec"), namespace)
    if page == "retention.md":
        assert "[(1, 0.4), (3, 0.2), (4, 0.5)]" in out.getvalue()
