"""The Python blocks of docs/object-storage.md run as shown, against the test S3 server.

Blocks fenced as ```python run in order in one namespace, in a fresh directory, after a
prelude giving ``counter`` (a component) and pointing boto3 at SeaweedFS (bucket
``my-bucket``); a postlude checks that they did what the page says.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

PAGE = Path(__file__).parents[1] / "docs" / "object-storage.md"
BLOCK = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)

PRELUDE = """
import json
from pathlib import Path
from statekeep import PersistentStateMixin

class Counter(PersistentStateMixin):
    value = 7
    def save_state(self, path: Path) -> None:
        path.write_text(json.dumps(self.value))
    def load_state(self, path: Path) -> None:
        self.value = json.loads(path.read_text())

counter = Counter()
"""

POSTLUDE = """
from statekeep.remote import open_remote
assert [s.location for s in store.list_states()] == ["both"]
assert keeper.remote is not None
assert len(list(open_remote("s3://my-bucket/run-42").list("states/"))) == 1
"""


def test_page_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_server: Any) -> None:
    """Every ```python block of the page runs; the state ends up local and remote."""
    blocks = [body for lang, body in BLOCK.findall(PAGE.read_text()) if lang == "python"]
    assert len(blocks) >= 2
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    client = s3_server.client()
    if "my-bucket" not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket="my-bucket")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(PRELUDE, "prelude", "exec"), namespace)
    for i, block in enumerate(blocks):
        exec(compile(block, f"{PAGE.name} block {i + 1}", "exec"), namespace)
    exec(compile(POSTLUDE, "postlude", "exec"), namespace)
