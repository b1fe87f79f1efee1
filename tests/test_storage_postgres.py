"""PostgresCheckpointStorage against a real PostgreSQL server (tests/servers.py)."""

from __future__ import annotations

import math
import multiprocessing
import os
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from servers import PostgresServer, free_ports
from statekeep import CorruptCheckpointError, PostgresCheckpointStorage, StorageError
from statekeep.storage._codec import encode
from statekeep.testing import PersistentCheckpointStorageContract

psycopg = pytest.importorskip("psycopg")


class TestPostgresContract(PersistentCheckpointStorageContract):
    """The whole conformance suite, against the real server."""

    @pytest.fixture
    def make_storage(self, postgres_db: str) -> Callable[[], PostgresCheckpointStorage]:
        return lambda: PostgresCheckpointStorage(postgres_db)

    @pytest.fixture
    def damage(self, postgres_db: str) -> Callable[[object, str], None]:
        def flip(storage: object, key: str) -> None:
            with psycopg.connect(postgres_db, autocommit=True) as conn:
                conn.execute(
                    "UPDATE statekeep_checkpoints SET data = data || '\\x20'::bytea "
                    "WHERE session_id = %s",
                    (key,),
                )

        return flip

    @pytest.fixture
    def make_failing_storage(self) -> Callable[[], PostgresCheckpointStorage]:
        (port,) = free_ports(1)
        return lambda: PostgresCheckpointStorage(f"host=127.0.0.1 port={port} user=x dbname=x")


class TestStoredForm:
    """The payload is stored byte for byte (not jsonb); times come from the server."""

    def test_payload_bytes_are_kept_exactly(self, postgres_db: str) -> None:
        storage = PostgresCheckpointStorage(postgres_db)
        data = {"b": 1, "a": 2.5, "nan": math.nan, "inf": -math.inf}
        storage.save("s", data)
        with psycopg.connect(postgres_db) as conn:
            (raw,) = conn.execute("SELECT data FROM statekeep_checkpoints").fetchone()
            (kind,) = conn.execute(
                "SELECT data_type FROM information_schema.columns "
                "WHERE table_name = 'statekeep_checkpoints' AND column_name = 'data'"
            ).fetchone()
        assert kind == "bytea"
        assert (
            bytes(raw) == encode("data", "s", data) == b'{"b":1,"a":2.5,"nan":NaN,"inf":-Infinity}'
        )
        loaded = storage.load("s")
        assert loaded is not None
        assert list(loaded) == ["b", "a", "nan", "inf"]
        assert math.isnan(loaded["nan"])
        storage.close()

    def test_hand_written_json_comes_back_byte_identical(self, postgres_db: str) -> None:
        storage = PostgresCheckpointStorage(postgres_db)
        storage.save("s", {})
        text = b'{"b":1,"a":2.50}'
        with psycopg.connect(postgres_db, autocommit=True) as conn:
            conn.execute(
                "UPDATE statekeep_checkpoints SET data = %s, size_bytes = %s, crc32 = %s",
                (text, len(text), __import__("zlib").crc32(text)),
            )
        assert storage._get("s") == text
        assert storage.load("s") == {"b": 1, "a": 2.5}
        storage.close()

    def test_times_are_the_servers(self, postgres_db: str) -> None:
        storage = PostgresCheckpointStorage(postgres_db)
        storage.save("s", {})
        with psycopg.connect(postgres_db) as conn:
            conn.execute("SET TIME ZONE 'Asia/Tokyo'")
            (server_now,) = conn.execute("SELECT clock_timestamp()").fetchone()
        (info,) = storage.list_checkpoints()
        assert info.timestamp.utcoffset() == timedelta(0)
        assert timedelta(0) <= server_now - info.timestamp < timedelta(seconds=30)
        storage.close()

    @pytest.mark.parametrize("table", ["Odd Name", 'quo"te', "drop table x; --", "ü"])
    def test_any_table_name_is_quoted(self, postgres_db: str, table: str) -> None:
        with PostgresCheckpointStorage(postgres_db, table=table) as storage:
            storage.save("s", {"t": table})
        with PostgresCheckpointStorage(postgres_db, table=table) as again:
            assert again.load("s") == {"t": table}
        with PostgresCheckpointStorage(postgres_db) as default:
            assert default.load("s") is None

    @pytest.mark.parametrize("table", ["", "x" * 64, "a\0b"])
    def test_bad_table_names_are_refused(self, postgres_db: str, table: str) -> None:
        with pytest.raises(ValueError, match="table"):
            PostgresCheckpointStorage(postgres_db, table=table)


class TestSchema:
    """The library creates and versions its table, safely under concurrency."""

    def test_a_newer_schema_is_refused_with_a_cause(self, postgres_db: str) -> None:
        PostgresCheckpointStorage(postgres_db).close()
        with psycopg.connect(postgres_db, autocommit=True) as conn:
            conn.execute("UPDATE statekeep_schema SET version = 99")
        with pytest.raises(StorageError, match="schema version 99") as caught:
            PostgresCheckpointStorage(postgres_db)
        assert caught.value.__cause__ is not None

    @pytest.mark.parametrize("attempt", range(6))
    def test_processes_opening_a_fresh_database_at_once_all_work(
        self, postgres_db: str, attempt: int
    ) -> None:
        ctx = multiprocessing.get_context("fork")
        go = ctx.Event()
        results = ctx.Queue()
        procs = [
            ctx.Process(target=_open_and_save, args=(postgres_db, n, go, results)) for n in range(8)
        ]
        for proc in procs:
            proc.start()
        go.set()
        outcomes = [results.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join(timeout=60)
        assert sorted(outcomes) == [f"ok {n}" for n in range(8)]
        storage = PostgresCheckpointStorage(postgres_db)
        assert len(storage.list_checkpoints()) == 8
        storage.close()


def _open_and_save(conninfo: str, n: int, go: object, results: object) -> None:
    go.wait(30)  # type: ignore[attr-defined]
    try:
        storage = PostgresCheckpointStorage(conninfo)
        storage.save(f"p{n}", {"n": n})
        storage.close()
        results.put(f"ok {n}")  # type: ignore[attr-defined]
    except BaseException as exc:
        results.put(f"{n}: {exc!r}")  # type: ignore[attr-defined]


class TestDamage:
    """A row that fails its checksum raises CorruptCheckpointError."""

    @pytest.mark.parametrize(
        "update",
        [
            "SET data = '\\x7b7d'::bytea",
            "SET crc32 = crc32 + 1",
            "SET size_bytes = 1",
            "SET data = '\\x5b5d'::bytea, size_bytes = 2, crc32 = 1439758374",
        ],
        ids=["data", "crc", "size", "not-an-object"],
    )
    def test_damaged_row(self, postgres_db: str, update: str) -> None:
        storage = PostgresCheckpointStorage(postgres_db)
        storage.save("victim", {"x": 1})
        with psycopg.connect(postgres_db, autocommit=True) as conn:
            conn.execute(f"UPDATE statekeep_checkpoints {update}")
        with pytest.raises(CorruptCheckpointError, match="victim"):
            storage.load("victim")
        storage.close()

    def test_listing_skips_a_row_with_bad_metadata(self, postgres_db: str) -> None:
        storage = PostgresCheckpointStorage(postgres_db)
        storage.save("victim", {"x": 1})
        storage.save("healthy", {"x": 1})
        with psycopg.connect(postgres_db, autocommit=True) as conn:
            conn.execute(
                "UPDATE statekeep_checkpoints SET metadata = '[' WHERE session_id = 'victim'"
            )
        assert [i.session_id for i in storage.list_checkpoints()] == ["healthy"]
        storage.close()


class TestRoundTrips:
    """A save and a load are one round trip each, prepared statements once warm."""

    def test_one_round_trip_each_prepared(self, postgres_db: str, tmp_path: Path) -> None:
        storage = PostgresCheckpointStorage(postgres_db)
        for n in range(8):  # past psycopg's prepare threshold
            storage.save("s", {"n": n})
            storage.load("s")
        with open(tmp_path / "trace", "w+b") as trace:
            storage._conn.pgconn.trace(trace.fileno())  # libpq's log of protocol messages
            try:
                storage.save("s", {"n": "last"})
                assert storage.load("s") == {"n": "last"}
            finally:
                storage._conn.pgconn.untrace()
            trace.seek(0)
            sent = [ln.split("\t")[3] for ln in trace.read().decode().splitlines() if "\tF\t" in ln]
        assert sent.count("Sync") == 2, sent  # one statement per call, nothing else
        assert "Parse" not in sent, sent  # both ran prepared
        assert "Query" not in sent, sent  # no BEGIN/COMMIT or other simple query
        storage.close()


class TestFailures:
    """Connection failures are StorageError with the psycopg error as __cause__."""

    def test_server_down_at_start_fails_within_the_timeout(self) -> None:
        (port,) = free_ports(1)
        done = threading.Event()
        errors: list[BaseException] = []

        def call() -> None:
            try:
                PostgresCheckpointStorage(f"host=127.0.0.1 port={port} user=x dbname=x")
            except BaseException as exc:
                errors.append(exc)
            done.set()

        threading.Thread(target=call, daemon=True).start()
        assert done.wait(20), "opening a storage on a dead server hung"
        assert isinstance(errors[0], StorageError), errors
        assert isinstance(errors[0].__cause__, psycopg.OperationalError)

    def test_a_killed_session_fails_once_then_reconnects(self, postgres_db: str) -> None:
        """The call that meets a dead connection fails with StorageError; the next one
        runs on a new connection (and a new cursor: the old one died with its session)."""
        storage = PostgresCheckpointStorage(postgres_db)
        storage.save("s", {"n": 1})
        old = storage._conn
        with psycopg.connect(postgres_db, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (old.info.backend_pid,))
        with pytest.raises(StorageError) as caught:
            storage.load("s")
        assert isinstance(caught.value.__cause__, psycopg.OperationalError)
        storage.save("s", {"n": 2})
        assert storage.load("s") == {"n": 2}
        assert storage._conn is not old
        storage.close()

    def test_a_missing_database(self, postgres_server: PostgresServer) -> None:
        with pytest.raises(StorageError, match="no_such_db") as caught:
            PostgresCheckpointStorage(postgres_server.conninfo("no_such_db"))
        assert isinstance(caught.value.__cause__, psycopg.Error)


class TestFork:
    """A storage opened before a fork works in the child (own connection) and the parent."""

    def test_parent_and_child_both_work(self, postgres_db: str) -> None:
        storage = PostgresCheckpointStorage(postgres_db)
        storage.save("parent", {"who": "parent"})
        inherited = storage._conn
        pid = os.fork()
        if pid == 0:  # the child connects anew; the parent's session is left alone
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
        storage.close()
