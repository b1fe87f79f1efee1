"""The S3 and PostgreSQL backends are optional: statekeep imports without boto3 or psycopg."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parent.parent / "src")

# blocks the imports as if the extras were not installed
WITHOUT = """
import sys
for name in ("boto3", "botocore", "psycopg", "psycopg_binary"):
    sys.modules[name] = None
"""


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT + code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"},
    )


class TestWithoutTheExtras:
    """Every top-level name imports; constructing a remote backend names the extra."""

    def test_import_statekeep_needs_neither(self) -> None:
        done = run(
            "import statekeep, statekeep.storage\n"
            "from statekeep import S3CheckpointStorage, PostgresCheckpointStorage\n"
            "assert 'boto3' not in sys.modules or sys.modules['boto3'] is None\n"
            "print(len(statekeep.__all__))"
        )
        assert done.returncode == 0, done.stderr
        assert int(done.stdout) > 20

    @pytest.mark.parametrize(
        ("call", "extra"),
        [
            ("S3CheckpointStorage('s3://bucket/prefix')", "statekeep[s3]"),
            ("PostgresCheckpointStorage('host=127.0.0.1')", "statekeep[postgres]"),
        ],
    )
    def test_constructing_one_names_the_extra(self, call: str, extra: str) -> None:
        done = run(
            "import statekeep\n"
            "try:\n"
            f"    statekeep.{call}\n"
            "except ImportError as exc:\n"
            "    print(exc)\n"
        )
        assert done.returncode == 0, done.stderr
        assert f"pip install {extra}" in done.stdout


class TestS3Url:
    """S3 URLs are checked before any client is made."""

    @pytest.mark.parametrize("url", ["bucket/prefix", "s3://", "s3:///prefix", "http://x/y"])
    def test_bad_urls(self, url: str) -> None:
        from statekeep import S3CheckpointStorage

        with pytest.raises(ValueError, match="s3://"):
            S3CheckpointStorage(url, client=object())

    def test_prefix_forms(self) -> None:
        from statekeep.storage._s3 import parse_s3_url

        assert parse_s3_url("s3://b") == ("b", "")
        assert parse_s3_url("s3://b/") == ("b", "")
        assert parse_s3_url("s3://b/p/q/") == ("b", "p/q/")
