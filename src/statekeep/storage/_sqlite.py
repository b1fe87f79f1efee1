"""SQLiteCheckpointStorage: every session's checkpoint as a row of one SQLite database.

The database runs in WAL mode with ``synchronous=FULL`` (a committed save survives
power loss) and a busy timeout, so several processes can share it. Its schema
version is kept in ``PRAGMA user_version``. A database this process may not write to
(or ``read_only=True``) is opened read-only: loads and listings work, saves raise
:class:`~statekeep.StorageError`.

One connection per storage, guarded by a lock, rather than one per thread: a
connection made by a thread that has since ended could not be closed by
:meth:`~SQLiteCheckpointStorage.close`, and would be left for the garbage collector.
SQLite serialises writers anyway, and a checkpoint store sees few calls.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import quote

from statekeep import _fork
from statekeep.errors import StorageError
from statekeep.storage._base import BaseCheckpointStorage, CheckpointInfo
from statekeep.storage._codec import decode
from statekeep.storage._envelope import Damaged

__all__ = ["SCHEMA_VERSION", "SQLiteCheckpointStorage"]

logger = logging.getLogger("statekeep")

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE checkpoints (
    session_id TEXT PRIMARY KEY NOT NULL,
    timestamp TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    crc32 INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    data TEXT NOT NULL
)
"""


# SQLite's primary result codes, as the errno a caller of an OSError would test
_ERRNO = {
    3: errno.EACCES,  # SQLITE_PERM
    5: errno.EBUSY,  # SQLITE_BUSY
    6: errno.EBUSY,  # SQLITE_LOCKED
    7: errno.ENOMEM,  # SQLITE_NOMEM
    8: errno.EROFS,  # SQLITE_READONLY
    10: errno.EIO,  # SQLITE_IOERR
    13: errno.ENOSPC,  # SQLITE_FULL
    14: errno.ENOENT,  # SQLITE_CANTOPEN
    23: errno.EACCES,  # SQLITE_AUTH
}


# connections a forked child inherited: referenced forever, so never closed there
_ORPHANS: list[sqlite3.Connection] = []


class SQLiteCheckpointStorage(BaseCheckpointStorage):
    """Keeps checkpoints in the SQLite database at ``path`` (created if missing).

    Args:
        path: The database file; its parent directories are created.
        timeout: Seconds to wait for another process or thread holding the database.
        read_only: Open an existing database for reading only. Also chosen by itself
            when the file or its directory is not writable by this process.

    Thread- and process-safe. SQLite errors are raised as :class:`~statekeep.StorageError`
    with ``errno`` set where one fits (``EROFS``, ``EBUSY``, ``ENOSPC``, ...).
    """

    _errors = (sqlite3.Error, OSError)

    def __init__(self, path: str | Path, *, timeout: float = 30.0, read_only: bool = False) -> None:
        self.path = Path(path)
        self._lock = _fork.new_lock()
        self._conn: sqlite3.Connection | None = None
        self.read_only = read_only or _not_writable(self.path)
        self._timeout = timeout
        with self._guard("open", None):
            if not self.read_only:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = self._connect()
        _fork.on_fork_child(self._after_fork)

    def _connect(self) -> sqlite3.Connection:
        if self.read_only:
            uri = f"file:{quote(str(self.path.absolute()))}?mode=ro"
            conn = sqlite3.connect(
                uri, uri=True, timeout=self._timeout, isolation_level=None, check_same_thread=False
            )
        else:
            conn = sqlite3.connect(
                self.path, timeout=self._timeout, isolation_level=None, check_same_thread=False
            )
        try:
            self._prepare(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _after_fork(self) -> None:
        # A child must neither use the parent's connection nor close it (closing may
        # checkpoint the parent's WAL): it keeps it referenced and opens its own.
        self._lock = _fork.new_lock()
        if self._conn is not None:
            _ORPHANS.append(self._conn)
            self._conn = None

    def _prepare(self, conn: sqlite3.Connection) -> None:
        if self.read_only:
            self._check_version(conn.execute("PRAGMA user_version").fetchone()[0])
            return
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                conn.execute(_SCHEMA)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            else:
                self._check_version(version)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _check_version(self, version: int) -> None:
        if version != SCHEMA_VERSION:
            why = ValueError(f"PRAGMA user_version is {version}, expected {SCHEMA_VERSION}")
            raise StorageError(
                f"checkpoint database {self.path} has schema version {version}; "
                f"this statekeep reads version {SCHEMA_VERSION}"
            ) from why

    def _errno(self, exc: BaseException) -> int | None:
        if isinstance(exc, sqlite3.Error):
            code = getattr(exc, "sqlite_errorcode", None)
            return None if code is None else _ERRNO.get(code & 0xFF)
        return super()._errno(exc)

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._closed:
                raise ValueError(f"{self!r} is closed")
            if self._conn is None:  # in a forked child
                self._conn = self._connect()
            yield self._conn

    def _put(self, key: str, payload: bytes, meta: bytes) -> None:
        row = (key, _now(), len(payload), zlib.crc32(payload), meta.decode(), payload.decode())
        with self._connection() as conn:
            conn.execute("INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?, ?)", row)

    def _get(self, key: str) -> bytes | None:
        with self._connection() as conn:
            row = conn.execute(
                "SELECT size_bytes, crc32, data FROM checkpoints WHERE session_id = ?", (key,)
            ).fetchone()
        if row is None:
            return None
        size, crc, text = row
        payload = text.encode() if isinstance(text, str) else bytes(text)
        if len(payload) != size or zlib.crc32(payload) != crc:
            raise Damaged("the data does not match its size and checksum")
        return payload

    def _get_with_info(self, key: str) -> tuple[bytes, CheckpointInfo] | None:
        with self._connection() as conn:  # one SELECT: data and info of one save
            row = conn.execute(
                "SELECT timestamp, size_bytes, crc32, metadata, data FROM checkpoints "
                "WHERE session_id = ?",
                (key,),
            ).fetchone()
        if row is None:
            return None
        stamp, size, crc, meta, text = row
        payload = text.encode() if isinstance(text, str) else bytes(text)
        if len(payload) != size or zlib.crc32(payload) != crc:
            raise Damaged("the data does not match its size and checksum")
        try:
            info = CheckpointInfo(key, _parse_time(stamp), size, decode(meta))
        except (TypeError, ValueError, RecursionError) as exc:
            raise Damaged(f"its time or metadata cannot be read: {exc}") from None
        return payload, info

    def _has(self, key: str) -> bool:
        with self._connection() as conn:
            query = "SELECT 1 FROM checkpoints WHERE session_id = ?"
            return conn.execute(query, (key,)).fetchone() is not None

    def _drop(self, key: str) -> bool:
        with self._connection() as conn:
            cursor = conn.execute("DELETE FROM checkpoints WHERE session_id = ?", (key,))
            return cursor.rowcount > 0

    def _infos(self) -> Iterable[CheckpointInfo]:
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT session_id, timestamp, size_bytes, metadata FROM checkpoints"
            ).fetchall()
        infos = []
        for key, stamp, size, meta in rows:
            try:
                infos.append(CheckpointInfo(key, _parse_time(stamp), size, decode(meta)))
            except (TypeError, ValueError, RecursionError) as exc:
                logger.warning(
                    "statekeep: skipping corrupt checkpoint of session %r in %s: %s",
                    key,
                    self.path,
                    exc,
                )
        return infos

    def _drop_older(self, age: timedelta) -> int:
        cutoff = datetime.now(timezone.utc) - age
        with self._connection() as conn:
            rows = conn.execute("SELECT session_id, timestamp FROM checkpoints").fetchall()
        old = []
        for key, stamp in rows:
            try:
                if _parse_time(stamp) < cutoff:
                    old.append((key, stamp))
            except (TypeError, ValueError):
                continue  # a row of unknown age is kept
        removed = 0
        with self._connection() as conn:
            for key, stamp in old:
                # matching the stored time too: a row saved again meanwhile stays
                cursor = conn.execute(
                    "DELETE FROM checkpoints WHERE session_id = ? AND timestamp = ?", (key, stamp)
                )
                removed += cursor.rowcount
        return removed

    def _close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _where(self, key: str) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"SQLiteCheckpointStorage({str(self.path)!r})"


def _not_writable(path: Path) -> bool:
    """An existing database (or its directory) this process may not write to."""
    if not path.exists():
        return False
    return not os.access(path, os.W_OK) or not os.access(path.parent, os.W_OK)


def _parse_time(stamp: object) -> datetime:
    if not isinstance(stamp, str):
        raise TypeError(f"the timestamp is {type(stamp).__name__}, not text")
    parsed = datetime.fromisoformat(stamp)
    # a row written by hand or by another tool without a zone: statekeep writes UTC
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=timezone.utc)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()
