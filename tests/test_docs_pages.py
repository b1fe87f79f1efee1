"""The Python blocks of the pages about checkpoints, porting and the README run as shown.

Each page's ```python blocks run in order in one namespace, in a fresh working
directory; before each block a page's prelude supplies what the text leaves to the
reader (``storage``: some checkpoint storage, ``manager``, ``logger``, a pamiq-core
directory, an ondine checkpoint file), and after the last one a postlude checks what the
blocks should have done. Blocks fenced as ```py are shown only: signatures, and
before/after imports of packages that are not installed here.
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

# A checkpoint as ondine 2.1.1's LocalFileCheckpointStorage writes it, for the page's
# migration snippet to copy.
ONDINE_FILE = """
import gzip, json
from pathlib import Path
ondine_file = Path(".checkpoints/checkpoint_0b5e55f0-0000-4000-8000-000000000007.json.gz")
if not ondine_file.exists():
    ondine_file.parent.mkdir(exist_ok=True)
    context = {"session_id": "0b5e55f0-0000-4000-8000-000000000007", "last_processed_row": 41,
               "total_rows": 100, "intermediate_data": {"k": 1}, "accumulated_cost": "0.5"}
    record = {"version": "1.0", "session_id": context["session_id"],
              "timestamp": "2026-11-29T09:00:00", "data": context}
    with gzip.open(ondine_file, "wt", encoding="utf-8") as f:
        json.dump(record, f)
"""

POSTLUDES = {
    "docs/coming-from-ondine.md": """
from statekeep import FileCheckpointStorage, StateManager
with FileCheckpointStorage(".checkpoints-statekeep") as migrated:
    back = StateManager(migrated).load_checkpoint("0b5e55f0-0000-4000-8000-000000000007")
assert back is not None
assert (back.last_processed_row, back.total_rows, back.data) == (41, 100, {"k": 1})
""",
}

PRELUDES = {
    "README.md": "",
    "docs/index.md": "",
    "docs/checkpoints.md": CHECKPOINT_PRELUDE,
    "docs/coming-from-ondine.md": CHECKPOINT_PRELUDE + ONDINE_FILE,
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
    exec(compile(POSTLUDES.get(page, ""), f"{page} postlude", "exec"), namespace)


# Pages whose ```python blocks another test module runs (with servers, subprocesses or
# fixtures of its own).
RUN_ELSEWHERE = {
    "docs/across-machines.md": "test_storage_docs.py",
    "docs/coming-from-crawlee.md": "test_recoverable_docs.py",
    "docs/command-line.md": "test_cli.py",
    "docs/getting-started.md": "test_docs_snapshots.py",
    "docs/object-storage.md": "test_remote_docs.py",
    "docs/recoverable-state.md": "test_recoverable_docs.py",
    "docs/retention.md": "test_docs_snapshots.py",
    "docs/writing-a-backend.md": "test_testing.py",
}


def test_every_page_with_python_blocks_is_run_by_a_test() -> None:
    """A page whose ```python blocks no test runs would drift from the code unseen."""
    pages = ["README.md", *(f"docs/{p.name}" for p in sorted((ROOT / "docs").glob("*.md")))]
    with_blocks = {page for page in pages if python_blocks(page)}
    assert with_blocks == set(PRELUDES) | set(RUN_ELSEWHERE)
    for page, module in RUN_ELSEWHERE.items():
        text = (ROOT / "tests" / module).read_text(encoding="utf-8")
        assert page.rsplit("/", 1)[-1] in text, f"{module} does not name {page}"
