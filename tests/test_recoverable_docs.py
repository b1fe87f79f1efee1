"""The Python blocks of the RecoverableState pages run as shown.

Each page's ```python blocks run in order in one namespace, in a fresh working
directory, after a prelude that supplies what the text leaves to the reader. Blocks
fenced as ```py are shown only (crawlee's async code, fragments).
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
BLOCK = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)

PRELUDES = {
    "docs/recoverable-state.md": """
urls = ["https://example.com/a", "https://example.com/b"]
def crawl(url):
    return url.endswith("a")
""",
    "docs/coming-from-crawlee.md": """
import logging
from pydantic import BaseModel
from statekeep import FileCheckpointStorage, RecoverableState

class Progress(BaseModel):
    pages_done: int = 0
""",
}


@pytest.mark.parametrize("page", sorted(PRELUDES))
def test_page_blocks_run(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STATEKEEP_STATE_DIR", str(tmp_path / "state"))
    text = (ROOT / page).read_text(encoding="utf-8")
    blocks = [code for fence, code in BLOCK.findall(text) if fence == "python"]
    assert blocks, f"{page} has no ```python block"
    namespace: dict[str, object] = {"__name__": "__docs__"}
    exec(compile(PRELUDES[page], f"{page} prelude", "exec"), namespace)
    for number, code in enumerate(blocks, 1):
        exec(compile(code, f"{page}, python block {number}", "exec"), namespace)
    for name, value in namespace.items():  # a test function shown on the page runs too
        if name.startswith("test_") and callable(value):
            value()
    assert not [t for t in threading.enumerate() if t.name.startswith("statekeep-autosave-")]
