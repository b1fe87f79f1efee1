"""MemoryCheckpointStorage: a dict behind a lock, for unit tests and short-lived jobs."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any
from uuid import UUID

from statekeep.storage._base import CheckpointInfo, ClosingContext, decode, encode, session_key

__all__ = ["MemoryCheckpointStorage"]


class MemoryCheckpointStorage(ClosingContext):
    """Keeps checkpoints in memory, behaving exactly like the persistent backends.

    Values are stored as the same JSON the other backends write, so what you get back
    is an independent copy in the same JSON forms (mutating it, or the dict you saved,
    never changes what is stored). Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, tuple[bytes, bytes, datetime]] = {}
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("MemoryCheckpointStorage is closed")

    def save(
        self,
        session_id: str | UUID,
        data: Mapping[str, Any],
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> bool:
        """Replace the session's checkpoint with a copy of ``data``."""
        key = session_key(session_id)
        record = (encode("data", key, data), encode("metadata", key, metadata), _now())
        with self._lock:
            self._check_open()
            self._records[key] = record
        return True

    def load(self, session_id: str | UUID) -> dict[str, Any] | None:
        """A fresh copy of the session's data, or None."""
        key = session_key(session_id)
        with self._lock:
            self._check_open()
            record = self._records.get(key)
        return None if record is None else decode(record[0])

    def exists(self, session_id: str | UUID) -> bool:
        """Whether the session has a checkpoint."""
        key = session_key(session_id)
        with self._lock:
            self._check_open()
            return key in self._records

    def delete(self, session_id: str | UUID) -> bool:
        """Remove the session's checkpoint; False when there was none."""
        key = session_key(session_id)
        with self._lock:
            self._check_open()
            return self._records.pop(key, None) is not None

    def list_checkpoints(self) -> list[CheckpointInfo]:
        """Every checkpoint, oldest first."""
        with self._lock:
            self._check_open()
            records = list(self._records.items())
        infos = [
            CheckpointInfo(key, stamp, len(data), decode(meta))
            for key, (data, meta, stamp) in records
        ]
        infos.sort(key=lambda info: (info.timestamp, info.session_id))
        return infos

    def purge(self) -> None:
        """Remove every checkpoint."""
        with self._lock:
            self._check_open()
            self._records.clear()

    def close(self) -> None:
        """Release the stored values; later calls raise ValueError. Idempotent."""
        with self._lock:
            self._closed = True
            self._records.clear()


def _now() -> datetime:
    return datetime.now(timezone.utc)
