"""The Python blocks of the pages about checkpoints, porting and the README run as shown.

Each page's ```python blocks run in order in one namespace, in a fresh working
directory; before each block a page's prelude supplies what the text leaves to the
reader (``storage``: some checkpoint storage, ``manager``, ``logger``, a pamiq-core
directory). Blocks fenced as ```py are shown only: signatures, and before/after imports of
packages that are not installed here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
BLOCK = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)

CHECKPOINT_PRELUDE = """
import logging
from statekeep import CheckpointInfo, MemoryCheckpointStorage, StateManager
storage = MemoryCheckpointStorage()
manager = StateManager(storage)
session_id = "doc-run"
logger = logging.getLogger("docs")
"""

PRELUDES = {
    "README.md": "",
    "docs/checkpoints.md": CHECKPOINT_PRELUDE,
    "docs/coming-from-ondine.md": CHECKPOINT_PRELUDE,
    "docs/coming-from-pamiq-core.md": """
from pathlib import Path
from statekeep import StateStore
old = Path("states/2024-12-01_09-30-00,000000.state")  # written by pamiq-core: no manifest
old.mkdir(parents=True, exist_ok=True)
store = StateStore("states")
""",
}


def python_blocks(page: str) -> list[str]:
    text = (ROOT / page).read_text(encoding="utf-8")
    return [code for fence, code in BLOCK.findall(text) if fence == "python"]


@pytest.mark.parametrize("page", sorted(PRELUDES))
def test_page_blocks_run(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(page)
    assert blocks, f"{page} has no ```python block"
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for number, code in enumerate(blocks, 1):
        exec(compile(PRELUDES[page], f"{page} prelude", "exec"), namespace)
        try:
            exec(compile(code, f"{page}, python block {number}", "exec"), namespace)
        finally:
            for value in list(namespace.values()):
                close = getattr(value, "close", None)
                if callable(close) and type(value).__module__.startswith("statekeep"):
                    close()
