"""The code in docs/across-machines.md runs as shown, against the test servers."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from servers import S3Server

DOC = Path(__file__).resolve().parent.parent / "docs" / "across-machines.md"
SRC = str(Path(__file__).resolve().parent.parent / "src")
DOC_CONNINFO = "postgresql://app@db.internal/jobs"


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)


def test_the_page_has_its_examples() -> None:
    assert len(blocks()) == 3


@pytest.mark.parametrize("index", range(3), ids=["s3", "postgres", "retention"])
def test_each_block_runs(
    index: int, s3_server: S3Server, postgres_db: str, worker_env: dict[str, str]
) -> None:
    if not _exists(s3_server):
        s3_server.client().create_bucket(Bucket="my-bucket")
    code = blocks()[index].replace(DOC_CONNINFO, postgres_db)
    env = {**worker_env, **s3_server.env(), "PYTHONPATH": SRC}
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    expected = {0: "{'row': 1500}\n", 2: "removed 0 checkpoints older than a week\n"}
    if index in expected:
        assert done.stdout == expected[index]
    else:
        assert "+00:00" in done.stdout


def _exists(server: S3Server) -> bool:
    names = {b["Name"] for b in server.client().list_buckets().get("Buckets", [])}
    return "my-bucket" in names
