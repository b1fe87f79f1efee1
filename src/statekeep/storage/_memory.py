"""MemoryCheckpointStorage: a dict of JSON records behind a lock, for unit tests and short jobs."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timezone
from typing import NamedTuple

from statekeep import _fork
from statekeep.storage._base import BaseCheckpointStorage, CheckpointInfo
from statekeep.storage._codec import decode

__all__ = ["MemoryCheckpointStorage"]


class _Record(NamedTuple):
    payload: bytes  # the data's JSON: decoding it is the copy handed back
    meta: bytes  # the metadata's JSON
    timestamp: datetime


class MemoryCheckpointStorage(BaseCheckpointStorage):
    """Keeps checkpoints in memory, behaving exactly like the persistent backends.

    Data and metadata are kept as the JSON every backend stores, so what you get back
    is an independent copy in the same JSON forms (mutating it, or the dict you saved,
    never changes what is stored). Nothing is written anywhere, so unlike the file
    backend no checksum is kept: there is no medium to damage. Thread-safe.
    """

    _errors = ()

    def __init__(self) -> None:
        self._lock = _fork.new_lock()
        self._records: dict[str, _Record] = {}
        _fork.on_fork_child(self._after_fork)

    def _after_fork(self) -> None:
        self._lock = _fork.new_lock()  # a thread of the parent may have held it

    def _put(self, key: str, payload: bytes, meta: bytes) -> None:
        record = _Record(payload, meta, datetime.now(timezone.utc))
        with self._lock:
            self._check_open()
            self._records[key] = record

    def _get(self, key: str) -> bytes | None:
        with self._lock:
            record = self._records.get(key)
        return None if record is None else record.payload

    def _get_with_info(self, key: str) -> tuple[bytes, CheckpointInfo] | None:
        with self._lock:
            record = self._records.get(key)
        if record is None:
            return None
        return record.payload, _info(key, record)

    def _has(self, key: str) -> bool:
        with self._lock:
            return key in self._records

    def _drop(self, key: str) -> bool:
        with self._lock:
            return self._records.pop(key, None) is not None

    def _infos(self) -> Iterable[CheckpointInfo]:
        with self._lock:
            records = list(self._records.items())
        return [_info(key, record) for key, record in records]

    def purge(self) -> None:
        """Remove every checkpoint."""
        self._check_open()
        with self._lock:
            self._records.clear()

    def _close(self) -> None:
        with self._lock:
            self._records.clear()


def _info(key: str, record: _Record) -> CheckpointInfo:
    return CheckpointInfo(key, record.timestamp, len(record.payload), decode(record.meta))
