"""MemoryCheckpointStorage: a dict of blobs behind a lock, for unit tests and short jobs."""

from __future__ import annotations

from collections.abc import Iterable

from statekeep import _fork
from statekeep.storage._base import BaseCheckpointStorage

__all__ = ["MemoryCheckpointStorage"]


class MemoryCheckpointStorage(BaseCheckpointStorage):
    """Keeps checkpoints in memory, behaving exactly like the persistent backends.

    Values are stored as the same self-checking JSON blobs the file backend writes, so
    what you get back is an independent copy in the same JSON forms (mutating it, or the
    dict you saved, never changes what is stored). Thread-safe.
    """

    _errors = ()

    def __init__(self) -> None:
        self._lock = _fork.new_lock()
        self._blobs: dict[str, bytes] = {}
        _fork.on_fork_child(self._after_fork)

    def _after_fork(self) -> None:
        self._lock = _fork.new_lock()  # a thread of the parent may have held it

    def _read(self, name: str) -> bytes | None:
        with self._lock:
            return self._blobs.get(name)

    def _write(self, name: str, blob: bytes) -> None:
        with self._lock:
            self._check_open()
            self._blobs[name] = blob

    def _remove(self, name: str) -> bool:
        with self._lock:
            return self._blobs.pop(name, None) is not None

    def _names(self) -> Iterable[str]:
        with self._lock:
            return list(self._blobs)

    def purge(self) -> None:
        """Remove every checkpoint."""
        self._check_open()
        with self._lock:
            self._blobs.clear()

    def _close(self) -> None:
        with self._lock:
            self._blobs.clear()
