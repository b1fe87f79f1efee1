"""SQLiteCheckpointStorage: the conformance suite, the schema, corruption, processes."""

from __future__ import annotations

import errno
import logging
import os
import re
import sqlite3
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import closing
from datetime import timedelta
from pathlib import Path

import pytest

from crashworkers.checkpoint_worker import check_value, run_writers
from statekeep import CorruptCheckpointError, SQLiteCheckpointStorage, StorageError
from statekeep.storage._sqlite import SCHEMA_VERSION
from statekeep.testing import PersistentCheckpointStorageContract


def raw(path: Path) -> closing[sqlite3.Connection]:
    """A plain connection to the database, closed on exit."""
    return closing(sqlite3.connect(path, isolation_level=None))


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "sub" / "checkpoints.sqlite"


@pytest.fixture
def storage(db: Path) -> Iterator[SQLiteCheckpointStorage]:
    with SQLiteCheckpointStorage(db) as opened:
        yield opened


class TestSQLiteContract(PersistentCheckpointStorageContract):
    """The SQLite backend keeps every promise of the shared contract."""

    @pytest.fixture
    def make_storage(self, db: Path) -> Callable[[], SQLiteCheckpointStorage]:
        return lambda: SQLiteCheckpointStorage(db)

    @pytest.fixture
    def damage(self, db: Path) -> Callable[[object, str], None]:
        def flip(storage: object, key: str) -> None:
            with raw(db) as conn:
                conn.execute(
                    "UPDATE checkpoints SET data = upper(data) WHERE session_id = ?", (key,)
                )

        return flip

    @pytest.fixture
    def make_failing_storage(self, tmp_path: Path) -> Callable[[], SQLiteCheckpointStorage]:
        (tmp_path / "a-directory").mkdir()
        return lambda: SQLiteCheckpointStorage(tmp_path / "a-directory")


class TestSchema:
    """The database is in WAL mode, synchronous=FULL, and carries its schema version."""

    def test_settings_and_version(self, storage: SQLiteCheckpointStorage, db: Path) -> None:
        storage.save("s", {"row": 1})
        with raw(db) as conn:
            assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
            assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
            row = conn.execute("SELECT data, metadata FROM checkpoints").fetchone()
        assert row == ('{"row":1}', "{}")  # readable with the sqlite3 shell
        conn_of_storage = storage._conn
        assert conn_of_storage is not None
        assert conn_of_storage.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
        assert conn_of_storage.execute("PRAGMA busy_timeout").fetchone() == (30000,)

    def test_a_newer_schema_is_refused(self, db: Path) -> None:
        SQLiteCheckpointStorage(db).close()
        with raw(db) as conn:
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
        with pytest.raises(StorageError, match=f"schema version {SCHEMA_VERSION + 1}"):
            SQLiteCheckpointStorage(db)

    def test_a_file_that_is_not_a_database(self, db: Path) -> None:
        db.parent.mkdir()
        db.write_bytes(b"this is not an SQLite database, not even close" * 100)
        with pytest.raises(StorageError, match=re.escape(str(db))) as caught:
            SQLiteCheckpointStorage(db)
        assert isinstance(caught.value.__cause__, sqlite3.DatabaseError)

    def test_a_directory_as_database_is_a_storage_error(self, tmp_path: Path) -> None:
        with pytest.raises(StorageError, match="could not open") as caught:
            SQLiteCheckpointStorage(tmp_path)
        assert isinstance(caught.value.__cause__, sqlite3.Error)


class TestCorruption:
    """A damaged row raises CorruptCheckpointError naming the session; exists() stays True."""

    @pytest.mark.parametrize(
        "update",
        [
            "UPDATE checkpoints SET data = '{\"row\":2}'",
            "UPDATE checkpoints SET data = substr(data, 1, 4)",
            "UPDATE checkpoints SET data = x'00ff'",
            "UPDATE checkpoints SET crc32 = crc32 + 1",
        ],
        ids=["changed", "truncated", "binary", "checksum"],
    )
    def test_damaged_rows(self, storage: SQLiteCheckpointStorage, db: Path, update: str) -> None:
        storage.save("victim", {"row": 1})
        with raw(db) as conn:
            conn.execute(update)
        with pytest.raises(CorruptCheckpointError, match="'victim'") as caught:
            storage.load("victim")
        assert str(db) in str(caught.value)
        assert storage.exists("victim") is True

    def test_a_payload_that_is_not_an_object(
        self, storage: SQLiteCheckpointStorage, db: Path
    ) -> None:
        storage.save("victim", {"row": 1})
        with raw(db) as conn:
            conn.execute(
                "UPDATE checkpoints SET data = '[1]', size_bytes = 3, crc32 = ?",
                (zlib.crc32(b"[1]"),),
            )
        with pytest.raises(CorruptCheckpointError, match="JSON object"):
            storage.load("victim")

    def test_listing_skips_bad_metadata_and_logs_it(
        self, storage: SQLiteCheckpointStorage, db: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        storage.save("victim", {})
        storage.save("healthy", {})
        with raw(db) as conn:
            conn.execute("UPDATE checkpoints SET metadata = 'oops' WHERE session_id = 'victim'")
        with caplog.at_level(logging.WARNING, logger="statekeep"):
            infos = storage.list_checkpoints()
        assert [info.session_id for info in infos] == ["healthy"]
        assert "'victim'" in caplog.text


class TestLifecycle:
    """close() closes the connection once; a lock held elsewhere is waited for, then reported."""

    def test_calls_after_close_raise_value_error(self, db: Path) -> None:
        storage = SQLiteCheckpointStorage(db)
        storage.save("a", {})
        storage.close()
        storage.close()
        with pytest.raises(ValueError, match="closed"):
            storage.load("a")
        with pytest.raises(ValueError, match="closed"):
            storage.save("a", {})
        assert repr(storage) == f"SQLiteCheckpointStorage({str(db)!r})"

    def test_a_lock_held_too_long_is_a_storage_error(self, db: Path) -> None:
        with SQLiteCheckpointStorage(db, timeout=0.05) as storage, raw(db) as other:
            other.execute("BEGIN EXCLUSIVE")
            with pytest.raises(StorageError, match="locked") as caught:
                storage.save("s", {"x": 1})
            assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
            other.execute("ROLLBACK")
            assert storage.save("s", {"x": 1}) is True


class TestProcesses:
    """Writers in several processes of one session leave one whole value."""

    def test_concurrent_process_writers(self, db: Path, worker_env: dict[str, str]) -> None:
        count, writers = 40, 4
        SQLiteCheckpointStorage(db).close()
        outputs = run_writers("sqlite", str(db), ["shared"] * writers, count, worker_env)
        assert sorted(outputs) == [f"done {who}" for who in range(writers)]
        with SQLiteCheckpointStorage(db) as storage:
            gen = check_value(storage.load("shared"))
            assert len(storage.list_checkpoints()) == 1
        assert gen % 1_000_000 == count - 1

    def test_processes_creating_the_database_at_once(
        self, db: Path, worker_env: dict[str, str]
    ) -> None:
        sessions = [f"session-{who}" for who in range(4)]
        run_writers("sqlite", str(db), sessions, 3, worker_env)
        with SQLiteCheckpointStorage(db) as storage:
            for who in range(4):
                assert check_value(storage.load(f"session-{who}")) == who * 1_000_000 + 2


class TestIssue8Item12:
    """Rows written by other tools, read-only databases, errno and causes."""

    def test_a_timestamp_without_a_zone_is_read_as_utc(
        self, storage: SQLiteCheckpointStorage, db: Path
    ) -> None:
        storage.save("naive", {"x": 1})
        storage.save("aware", {"x": 2})
        with raw(db) as conn:
            conn.execute(
                "UPDATE checkpoints SET timestamp = '2020-01-02T03:04:05' "
                "WHERE session_id = 'naive'"
            )
        infos = storage.list_checkpoints()
        assert [i.session_id for i in infos] == ["naive", "aware"]
        assert infos[0].timestamp.isoformat() == "2020-01-02T03:04:05+00:00"

    def test_a_read_only_database_opens_for_reading(self, db: Path) -> None:
        with SQLiteCheckpointStorage(db) as writer:
            writer.save("s", {"x": 1}, metadata={"m": 1})
        with SQLiteCheckpointStorage(db, read_only=True) as reader:
            assert reader.read_only
            assert reader.load("s") == {"x": 1}
            assert [i.session_id for i in reader.list_checkpoints()] == ["s"]
            with pytest.raises(StorageError) as caught:
                reader.save("s", {"x": 2})
            assert isinstance(caught.value.__cause__, sqlite3.Error)
            assert caught.value.errno == errno.EROFS
            assert reader.load("s") == {"x": 1}

    @pytest.mark.skipif(os.geteuid() == 0, reason="root may write a file without write bits")
    def test_a_file_without_write_permission_opens_read_only(self, db: Path) -> None:
        with SQLiteCheckpointStorage(db) as writer:
            writer.save("s", {"x": 1})
        db.chmod(0o444)
        with SQLiteCheckpointStorage(db) as reader:
            assert reader.read_only
            assert reader.load("s") == {"x": 1}

    def test_a_missing_database_read_only_is_a_storage_error(self, db: Path) -> None:
        with pytest.raises(StorageError) as caught:
            SQLiteCheckpointStorage(db, read_only=True)
        assert isinstance(caught.value.__cause__, sqlite3.Error)
        assert not db.exists()

    def test_the_schema_version_error_has_a_cause(self, db: Path) -> None:
        SQLiteCheckpointStorage(db).close()
        with raw(db) as conn:
            conn.execute("PRAGMA user_version=7")
        with pytest.raises(StorageError, match="schema version 7") as caught:
            SQLiteCheckpointStorage(db)
        assert isinstance(caught.value.__cause__, ValueError)

    def test_errno_is_set(self, db: Path) -> None:
        with SQLiteCheckpointStorage(db, timeout=0.05) as storage, raw(db) as conn:
            conn.execute("BEGIN EXCLUSIVE")
            try:
                with pytest.raises(StorageError) as caught:
                    storage.save("s", {})
            finally:
                conn.execute("ROLLBACK")
        assert caught.value.errno == errno.EBUSY
        assert isinstance(caught.value.__cause__, sqlite3.OperationalError)


class TestRetention:
    """delete_older_than removes by age, atomically per row."""

    def test_by_age(self, storage: SQLiteCheckpointStorage, db: Path) -> None:
        for key in ("old", "older", "new"):
            storage.save(key, {})
        with raw(db) as conn:
            conn.execute(
                "UPDATE checkpoints SET timestamp = '2001-01-01T00:00:00+00:00' "
                "WHERE session_id IN ('old', 'older')"
            )
            conn.execute("UPDATE checkpoints SET timestamp = 'garbage' WHERE session_id = 'older'")
        assert storage.delete_older_than(timedelta(days=1)) == 1
        assert storage.exists("old") is False
        assert storage.exists("older") is True  # unknown age: kept
        assert storage.exists("new") is True
        assert storage.delete_older_than(timedelta(0)) == 1
        assert storage.exists("new") is False


class TestFork:
    """A storage opened before a fork works in the child (own connection) and the parent."""

    def test_parent_and_child_both_work(self, storage: SQLiteCheckpointStorage) -> None:
        storage.save("parent", {"who": "parent"})
        inherited = storage._conn
        pid = os.fork()
        if pid == 0:  # the child: its own connection; the parent's is left alone
            code = 1
            try:
                storage.save("child", {"who": "child"})
                code = 0 if storage.load("parent") == {"who": "parent"} else 2
                code = code or (3 if storage._conn is inherited else 0)
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert storage.load("child") == {"who": "child"}
        storage.save("parent", {"who": "parent", "again": True})
        assert storage.load("parent") == {"who": "parent", "again": True}


class TestSpecialFiles:
    """A FIFO where the database should be is refused, never waited on."""

    def test_a_fifo_as_database(self, tmp_path: Path) -> None:
        fifo = tmp_path / "db.sqlite"
        os.mkfifo(fifo)
        done = threading.Event()
        seen: list[BaseException] = []

        def open_it() -> None:
            try:
                SQLiteCheckpointStorage(fifo).close()
            except BaseException as exc:
                seen.append(exc)
            done.set()

        threading.Thread(target=open_it, daemon=True).start()
        assert done.wait(10), "opening a FIFO as the database hung"
        assert len(seen) == 1
        assert isinstance(seen[0], StorageError)
        assert isinstance(seen[0].__cause__, sqlite3.Error)
