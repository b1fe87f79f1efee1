"""load_with_info beyond the contract: damaged info columns, and backends written before it."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from contextlib import closing
from datetime import timezone
from pathlib import Path

import pytest

from statekeep import (
    BaseCheckpointStorage,
    CorruptCheckpointError,
    PostgresCheckpointStorage,
    SQLiteCheckpointStorage,
)
from statekeep.storage import CheckpointInfo


class TestSQLiteInfoColumns:
    """A row whose metadata or time cannot be read: listing skips it, load_with_info raises."""

    @pytest.mark.parametrize(
        "update",
        [
            "SET metadata = 'oops'",
            "SET metadata = '[1, 2]'",
            "SET timestamp = 'yesterday'",
            "SET timestamp = 12",
        ],
        ids=["metadata-not-json", "metadata-not-an-object", "time-not-iso", "time-not-text"],
    )
    def test_damaged_info(self, tmp_path: Path, update: str) -> None:
        db = tmp_path / "c.sqlite"
        with SQLiteCheckpointStorage(db) as storage:
            storage.save("victim", {"x": 1}, metadata={"schema_version": 2})
            storage.save("healthy", {"y": 2}, metadata={"m": 1})
            with closing(sqlite3.connect(db, isolation_level=None)) as conn:
                conn.execute(f"UPDATE checkpoints {update} WHERE session_id = 'victim'")
            with pytest.raises(CorruptCheckpointError, match=r"'victim'.*time or metadata"):
                storage.load_with_info("victim")
            found = storage.load_with_info("healthy")
            assert found is not None
            assert found[0] == {"y": 2}
            assert dict(found[1].metadata) == {"m": 1}

    def test_a_time_without_a_zone_is_utc(self, tmp_path: Path) -> None:
        db = tmp_path / "c.sqlite"
        with SQLiteCheckpointStorage(db) as storage:
            storage.save("s", {"x": 1})
            with closing(sqlite3.connect(db, isolation_level=None)) as conn:
                conn.execute("UPDATE checkpoints SET timestamp = '2024-05-06T07:08:09'")
            found = storage.load_with_info("s")
            assert found is not None
            assert found[1].timestamp.tzinfo == timezone.utc
            assert found[1] == storage.list_checkpoints()[0]


class TestPostgresInfoColumns:
    """A row whose metadata cannot be read raises from load_with_info, naming the session."""

    def test_damaged_metadata(self, postgres_db: str) -> None:
        psycopg = pytest.importorskip("psycopg")
        with PostgresCheckpointStorage(postgres_db) as storage:
            storage.save("victim", {"x": 1}, metadata={"schema_version": 2})
            storage.save("healthy", {"y": 2})
            with psycopg.connect(postgres_db, autocommit=True) as conn:
                conn.execute(
                    "UPDATE statekeep_checkpoints SET metadata = '[' WHERE session_id = 'victim'"
                )
            with pytest.raises(CorruptCheckpointError, match=r"'victim'.*time or metadata"):
                storage.load_with_info("victim")
            found = storage.load_with_info("healthy")
            assert found is not None
            assert found[0] == {"y": 2}


class _RecordsOnly(BaseCheckpointStorage):
    """A record backend written against the older base: it overrides _get, not _get_with_info."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[bytes, bytes]] = {}
        self.listings = 0

    def _put(self, key: str, payload: bytes, meta: bytes) -> None:
        self.rows[key] = (payload, meta)

    def _get(self, key: str) -> bytes | None:
        row = self.rows.get(key)
        return None if row is None else row[0]

    def _has(self, key: str) -> bool:
        return key in self.rows

    def _drop(self, key: str) -> bool:
        return self.rows.pop(key, None) is not None

    def _infos(self) -> Iterable[CheckpointInfo]:
        from datetime import datetime

        from statekeep.storage._codec import decode

        self.listings += 1
        stamp = datetime(2024, 1, 1, tzinfo=timezone.utc)
        return [
            CheckpointInfo(key, stamp, len(payload), decode(meta))
            for key, (payload, meta) in self.rows.items()
        ]


class TestOlderRecordBackends:
    """A backend overriding _get but not _get_with_info still answers, with a listing."""

    def test_falls_back_to_get_and_a_listing(self) -> None:
        storage = _RecordsOnly()
        storage.save("s", {"x": 1}, metadata={"m": 1})
        storage.save("t", {"x": 2})
        found = storage.load_with_info("s")
        assert found is not None
        assert found[0] == {"x": 1}
        assert dict(found[1].metadata) == {"m": 1}
        assert storage.listings == 1
        assert storage.load_with_info("absent") is None

    def test_a_checkpoint_missing_from_the_listing_is_corrupt(self) -> None:
        storage = _RecordsOnly()
        storage.save("s", {"x": 1})
        storage._infos = list  # type: ignore[method-assign]
        with pytest.raises(CorruptCheckpointError, match=r"'s'.*time and metadata"):
            storage.load_with_info("s")

    def test_blob_backends_read_once(self) -> None:
        """The built-in blob path makes one raw read and no listing."""

        class Counting(BaseCheckpointStorage):  # a blob backend over a dict
            reads = 0

            def __init__(self) -> None:
                self.blobs: dict[str, bytes] = {}

            def _read(self, name: str) -> bytes | None:
                type(self).reads += 1
                return self.blobs.get(name)

            def _write(self, name: str, blob: bytes) -> None:
                self.blobs[name] = blob

            def _names(self) -> Iterable[str]:
                raise AssertionError("load_with_info listed")

        storage = Counting()
        storage.save("s", {"x": 1}, metadata={"m": 1})
        found = storage.load_with_info("s")
        assert found is not None
        assert Counting.reads == 1


class TestCommandShow:
    """``statekeep checkpoints show`` reads one checkpoint, not every checkpoint's header."""

    def test_show_reads_only_its_session(self, tmp_path: Path) -> None:
        import subprocess
        import sys

        from statekeep import FileCheckpointStorage

        root = tmp_path / "ck"
        with FileCheckpointStorage(root, durable=False) as storage:
            storage.save("alpha", {"row": 41}, metadata={"owner": "etl"})
        (root / "zulu.ckpt").write_bytes(b"a damaged neighbour\n")
        src = str(Path(__file__).resolve().parents[1] / "src")
        done = subprocess.run(
            [sys.executable, "-m", "statekeep", "checkpoints", "show", str(root), "alpha"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"},
        )
        assert done.returncode == 0, done.stderr
        assert "metadata  owner=etl" in done.stdout
        assert "zulu" not in done.stderr, "show read another session's checkpoint"
