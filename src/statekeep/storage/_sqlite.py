"""SQLiteCheckpointStorage: every session's checkpoint as a row of one SQLite database.

The database runs in WAL mode with ``synchronous=FULL`` (a committed save survives
power loss) and a busy timeout, so several processes can share it. Its schema
version is kept in ``PRAGMA user_version``.

One connection per storage, guarded by a lock, rather than one per thread: a
connection made by a thread that has since ended could not be closed by
:meth:`~SQLiteCheckpointStorage.close`, and would be left for the garbage collector.
SQLite serialises writers anyway, and a checkpoint store sees few calls.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from uuid import UUID

from statekeep.errors import CorruptCheckpointError, StatekeepError, StorageError
from statekeep.storage._base import CheckpointInfo, ClosingContext, decode, encode, session_key

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


class SQLiteCheckpointStorage(ClosingContext):
    """Keeps checkpoints in the SQLite database at ``path`` (created if missing).

    Args:
        path: The database file; its parent directories are created.
        timeout: Seconds to wait for another process or thread holding the database.

    Thread- and process-safe. SQLite errors are raised as :class:`~statekeep.StorageError`.
    """

    def __init__(self, path: str | Path, *, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        with self._errors("open"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path, timeout=timeout, isolation_level=None, check_same_thread=False
            )
            try:
                self._prepare(conn)
            except BaseException:
                conn.close()
                raise
        self._conn = conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                conn.execute(_SCHEMA)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise StorageError(
                    f"checkpoint database {self.path} has schema version {version}; "
                    f"this statekeep reads version {SCHEMA_VERSION}"
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Map sqlite3 and OS errors to StorageError, once, at the backend boundary."""
        try:
            yield
        except StatekeepError:
            raise
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(
                f"could not {action} checkpoint database {self.path}: {exc}"
            ) from exc

    @contextmanager
    def _connection(self, action: str) -> Iterator[sqlite3.Connection]:
        with self._lock, self._errors(action):
            if self._conn is None:
                raise ValueError(f"SQLiteCheckpointStorage({str(self.path)!r}) is closed")
            yield self._conn

    def save(
        self,
        session_id: str | UUID,
        data: Mapping[str, Any],
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> bool:
        """Atomically replace the session's row."""
        key = session_key(session_id)
        payload = encode("data", key, data)
        meta = encode("metadata", key, metadata)
        row = (key, _now(), len(payload), zlib.crc32(payload), meta.decode(), payload.decode())
        with self._connection(f"save session {key!r} to") as conn:
            conn.execute("INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?, ?)", row)
        return True

    def load(self, session_id: str | UUID) -> dict[str, Any] | None:
        """The session's data; None when absent.

        Raises:
            CorruptCheckpointError: the row exists but does not match its checksum or
                is not a JSON object.
            StorageError: the database could not be read.
        """
        key = session_key(session_id)
        with self._connection(f"load session {key!r} from") as conn:
            row = conn.execute(
                "SELECT size_bytes, crc32, data FROM checkpoints WHERE session_id = ?", (key,)
            ).fetchone()
        if row is None:
            return None
        size, crc, text = row
        try:
            payload = text.encode() if isinstance(text, str) else bytes(text)
            if len(payload) != size or zlib.crc32(payload) != crc:
                raise ValueError("the data does not match its size and checksum")
            return decode(payload)
        except (TypeError, ValueError) as exc:
            raise CorruptCheckpointError(
                f"checkpoint of session {key!r} in {self.path} is corrupt: {exc}"
            ) from None

    def exists(self, session_id: str | UUID) -> bool:
        """Whether the session has a row."""
        key = session_key(session_id)
        with self._connection(f"look up session {key!r} in") as conn:
            query = "SELECT 1 FROM checkpoints WHERE session_id = ?"
            return conn.execute(query, (key,)).fetchone() is not None

    def delete(self, session_id: str | UUID) -> bool:
        """Remove the session's row; False when there was none."""
        key = session_key(session_id)
        with self._connection(f"delete session {key!r} from") as conn:
            cursor = conn.execute("DELETE FROM checkpoints WHERE session_id = ?", (key,))
            return cursor.rowcount > 0

    def list_checkpoints(self) -> list[CheckpointInfo]:
        """Every readable checkpoint, oldest first, without reading the data column.

        A row whose metadata cannot be read is logged and left out; :meth:`load` of
        its session raises :class:`~statekeep.CorruptCheckpointError`.
        """
        with self._connection("list checkpoints in") as conn:
            rows = conn.execute(
                "SELECT session_id, timestamp, size_bytes, metadata FROM checkpoints"
            ).fetchall()
        infos = []
        for key, stamp, size, meta in rows:
            try:
                infos.append(CheckpointInfo(key, datetime.fromisoformat(stamp), size, decode(meta)))
            except (TypeError, ValueError) as exc:
                logger.warning(
                    "statekeep: skipping corrupt checkpoint of session %r in %s: %s",
                    key,
                    self.path,
                    exc,
                )
        infos.sort(key=lambda info: (info.timestamp, info.session_id))
        return infos

    def close(self) -> None:
        """Close the database connection; later calls raise ValueError. Idempotent."""
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __repr__(self) -> str:
        return f"SQLiteCheckpointStorage({str(self.path)!r})"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()
