"""PostgresCheckpointStorage: one row per session in a PostgreSQL table.

``pip install statekeep[postgres]`` (psycopg 3). A save is one upsert statement; the
data is stored as ``bytea``, byte for byte as encoded (``jsonb`` would re-order keys,
rewrite numbers and refuse NaN), with its size and CRC-32, which every load checks.
Times come from the server's clock (``clock_timestamp()``), so every machine orders
checkpoints by one clock. The library creates its table, and records the table's schema
version in ``statekeep_schema``, under an advisory lock: processes opening a fresh
database at once all succeed.

psycopg is imported when a storage is constructed, never by ``import statekeep``.
"""

from __future__ import annotations

import errno
import logging
import zlib
from collections.abc import Iterable
from datetime import timedelta, timezone
from typing import Any

from statekeep import _fork
from statekeep.errors import StorageError
from statekeep.storage._base import BaseCheckpointStorage, CheckpointInfo
from statekeep.storage._codec import decode
from statekeep.storage._envelope import Damaged

__all__ = ["SCHEMA_VERSION", "PostgresCheckpointStorage"]

logger = logging.getLogger("statekeep")

SCHEMA_VERSION = 1
_VERSIONS = "statekeep_schema"
_LOCK_SPACE = 0x5354_4B50  # "STKP": the advisory lock's first key; the second is per table
_SQLSTATE_ERRNO = {"53100": errno.ENOSPC, "42501": errno.EACCES, "25006": errno.EROFS}
# connections dropped in a forked child: kept referenced so the garbage collector never
# closes them there (closing would end the parent's session on the shared socket)
_ORPHANS: list[Any] = []


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:
        raise ImportError(
            "PostgresCheckpointStorage needs psycopg 3: pip install statekeep[postgres]",
            name=exc.name,
        ) from exc
    return psycopg


class PostgresCheckpointStorage(BaseCheckpointStorage):
    """Keeps each session's checkpoint as a row of ``table`` in a PostgreSQL database.

    Args:
        conninfo: A libpq connection string or URI (``"postgresql://user@host/db"``,
            ``"host=... dbname=..."``). Without a ``connect_timeout`` in it, 10 s is used.
        table: The table's name (created if missing; any name, quoted as an identifier).

    One connection per storage, guarded by a lock, reconnected after the server went
    away. Every psycopg error becomes :class:`~statekeep.StorageError` (``__cause__`` the
    original); a row that fails its checksum raises
    :class:`~statekeep.CorruptCheckpointError`. Thread-safe; processes and machines
    may share one table.

    Raises:
        ImportError: psycopg is not installed (``pip install statekeep[postgres]``).
        ValueError: ``table`` is empty, longer than 63 bytes, or holds NUL.
        StorageError: the server could not be reached, or the table has another schema.
    """

    def __init__(self, conninfo: str, *, table: str = "statekeep_checkpoints") -> None:
        psycopg = _psycopg()
        if not isinstance(table, str) or not table or "\0" in table or len(table.encode()) > 63:
            raise ValueError(
                f"table must be a non-empty name of at most 63 bytes without NUL, got {table!r}"
            )
        self._psycopg = psycopg
        self._errors = (psycopg.Error, OSError)
        self.table = table
        params = psycopg.conninfo.conninfo_to_dict(conninfo)
        params.setdefault("connect_timeout", 10)
        self._params = params
        self._label = (
            f"{params.get('host', '')}:{params.get('port', '')}/{params.get('dbname', '')}"
        )
        self._lock = _fork.new_lock()
        self._conn: Any = None
        sql = psycopg.sql
        self._q = {
            "put": sql.SQL(
                "INSERT INTO {t} (session_id, saved_at, size_bytes, crc32, metadata, data) "
                "VALUES (%s, clock_timestamp(), %s, %s, %s, %s) "
                "ON CONFLICT (session_id) DO UPDATE SET saved_at = EXCLUDED.saved_at, "
                "size_bytes = EXCLUDED.size_bytes, crc32 = EXCLUDED.crc32, "
                "metadata = EXCLUDED.metadata, data = EXCLUDED.data"
            ),
            "get": sql.SQL("SELECT size_bytes, crc32, data FROM {t} WHERE session_id = %s"),
            "get_info": sql.SQL(
                "SELECT saved_at, size_bytes, crc32, metadata, data FROM {t} WHERE session_id = %s"
            ),
            "has": sql.SQL("SELECT 1 FROM {t} WHERE session_id = %s"),
            "drop": sql.SQL("DELETE FROM {t} WHERE session_id = %s"),
            "list": sql.SQL("SELECT session_id, saved_at, size_bytes, metadata FROM {t}"),
            "old": sql.SQL("DELETE FROM {t} WHERE saved_at < clock_timestamp() - %s"),
        }
        self._q = {k: v.format(t=sql.Identifier(table)) for k, v in self._q.items()}
        self._sql: dict[str, bytes] = {}
        self._cur: Any = None
        with self._guard("open", None), self._lock:
            self._conn = self._connect()  # connects, and creates or checks the table
        _fork.on_fork_child(self._after_fork)

    def _after_fork(self) -> None:
        self._lock = _fork.new_lock()
        if self._conn is not None:
            _ORPHANS.append(self._conn)
        self._conn = None  # the child connects anew on its first call
        self._cur = None

    def _connect(self) -> Any:
        conn = self._psycopg.connect(**self._params, autocommit=True)
        try:
            self._prepare(conn)
            # rendered once (bytes): a Composed would be rendered again on every call
            self._sql = {k: q.as_bytes(conn) for k, q in self._q.items()}
            self._cur = conn.cursor(binary=True)
        except BaseException:
            conn.close()
            raise
        return conn

    def _prepare(self, conn: Any) -> None:
        sql = self._psycopg.sql
        table = sql.Identifier(self.table)
        with conn.transaction():
            # serialises every process preparing this table; released at commit
            conn.execute(
                "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_LOCK_SPACE, self.table)
            )
            conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {v} (table_name text PRIMARY KEY, "
                    "version integer NOT NULL)"
                ).format(v=sql.Identifier(_VERSIONS))
            )
            row = conn.execute(
                sql.SQL("SELECT version FROM {v} WHERE table_name = %s").format(
                    v=sql.Identifier(_VERSIONS)
                ),
                (self.table,),
            ).fetchone()
            if row is None:
                conn.execute(
                    sql.SQL(
                        "CREATE TABLE IF NOT EXISTS {t} (session_id text PRIMARY KEY, "
                        "saved_at timestamptz NOT NULL, size_bytes bigint NOT NULL, "
                        "crc32 bigint NOT NULL, metadata text NOT NULL, data bytea NOT NULL)"
                    ).format(t=table)
                )
                conn.execute(
                    sql.SQL("INSERT INTO {v} (table_name, version) VALUES (%s, %s)").format(
                        v=sql.Identifier(_VERSIONS)
                    ),
                    (self.table, SCHEMA_VERSION),
                )
            elif row[0] != SCHEMA_VERSION:
                why = ValueError(f"{_VERSIONS} says version {row[0]}, expected {SCHEMA_VERSION}")
                raise StorageError(
                    f"checkpoint table {self.table!r} in {self._label} has schema version "
                    f"{row[0]}; this statekeep reads version {SCHEMA_VERSION}"
                ) from why

    def _run(self, name: str, params: tuple[Any, ...], fetch: str = "") -> Any:
        """Run the statement ``name`` on this storage's connection: one round trip.

        ``fetch`` is ``"one"`` (the row or None), ``"all"`` (the rows) or ``""`` (the
        row count). The statements are rendered once per connection and run on one
        reused cursor with binary results (``bytea`` arrives as bytes, not hex text);
        psycopg prepares each on the server after its first few runs.
        """
        with self._lock:
            if self._closed:
                raise ValueError(f"{self!r} is closed")
            if self._conn is None or self._conn.closed:
                self._conn = self._connect()
            cur = self._cur
            try:
                cur.execute(self._sql[name], params)
                if fetch == "one":
                    return cur.fetchone()
                if fetch == "all":
                    return cur.fetchall()
                return int(cur.rowcount)
            except self._psycopg.Error:
                if self._conn.broken or self._conn.closed:
                    self._conn.close()
                    self._conn = None  # the next call reconnects
                raise

    def _errno(self, exc: BaseException) -> int | None:
        state = getattr(exc, "sqlstate", None)
        if state in _SQLSTATE_ERRNO:
            return _SQLSTATE_ERRNO[state]
        if isinstance(exc, self._psycopg.OperationalError) and "refused" in str(exc):
            return errno.ECONNREFUSED
        return super()._errno(exc)

    def _where(self, key: str) -> str:
        return f"table {self.table!r} of {self._label}"

    def _put(self, key: str, payload: bytes, meta: bytes) -> None:
        row = (key, len(payload), zlib.crc32(payload), meta.decode(), payload)
        self._run("put", row)

    def _get(self, key: str) -> bytes | None:
        row = self._run("get", (key,), "one")
        if row is None:
            return None
        size, crc, data = row
        payload = bytes(data)
        if len(payload) != size or zlib.crc32(payload) != crc:
            raise Damaged("the data does not match its size and checksum")
        return payload

    def _get_with_info(self, key: str) -> tuple[bytes, CheckpointInfo] | None:
        row = self._run("get_info", (key,), "one")  # one SELECT: data and info of one save
        if row is None:
            return None
        stamp, size, crc, meta, data = row
        payload = bytes(data)
        if len(payload) != size or zlib.crc32(payload) != crc:
            raise Damaged("the data does not match its size and checksum")
        try:
            info = CheckpointInfo(key, stamp.astimezone(timezone.utc), size, decode(meta))
        except (TypeError, ValueError, RecursionError) as exc:
            raise Damaged(f"its time or metadata cannot be read: {exc}") from None
        return payload, info

    def _has(self, key: str) -> bool:
        return self._run("has", (key,), "one") is not None

    def _drop(self, key: str) -> bool:
        return int(self._run("drop", (key,))) > 0

    def _infos(self) -> Iterable[CheckpointInfo]:
        rows = self._run("list", (), "all")
        infos = []
        for key, stamp, size, meta in rows:
            try:
                infos.append(
                    CheckpointInfo(key, stamp.astimezone(timezone.utc), size, decode(meta))
                )
            except (TypeError, ValueError, RecursionError) as exc:
                logger.warning(
                    "statekeep: skipping corrupt checkpoint of session %r in %s: %s",
                    key,
                    self._where(key),
                    exc,
                )
        return infos

    def _drop_older(self, age: timedelta) -> int:
        return int(self._run("old", (age,)))  # one statement, by the server's clock

    def _close(self) -> None:
        with self._lock:
            conn, self._conn, self._cur = self._conn, None, None
        if conn is not None:
            conn.close()

    def __repr__(self) -> str:
        return f"PostgresCheckpointStorage({self._label!r}, table={self.table!r})"
