"""The store's sequence counter: one number per commit, shared by threads and processes.

The counter lives in ``<private folder>/sequence``; every read-increment-write runs
under an exclusive ``flock`` on it, so it never repeats or goes back while the file
exists, whichever process commits.
"""

from __future__ import annotations

import contextlib
import os
import threading

from statekeep import _atomic


def _bump(fd: int) -> int:
    """Read, increment and write the counter in ``fd`` (the caller holds the lock)."""
    raw = os.pread(fd, 32, 0).strip()
    value = (int(raw) if raw.isdigit() else 0) + 1
    os.pwrite(fd, b"%20d\n" % value, 0)
    return value


def next_sequence(private: str | os.PathLike[str]) -> int:
    """Return the next number of the counter in ``private`` (opened for this call only)."""
    fd = os.open(f"{private}/sequence", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if _atomic.fcntl is not None:
            _atomic.fcntl.flock(fd, _atomic.fcntl.LOCK_EX)
        return _bump(fd)
    finally:
        os.close(fd)


class SequenceCounter:
    """The counter of one store, its file held open between commits.

    Saves an ``open`` and a ``close`` per commit. A ``flock`` belongs to the open file,
    which threads of one process share (and a forked child would too), so the lock is
    taken under a thread lock, and a process that finds itself forked opens its own.
    """

    def __init__(self, private: str | os.PathLike[str]) -> None:
        self._path = f"{private}/sequence"
        self._fd = -1
        self._pid = -1
        self._lock = threading.Lock()

    def next(self) -> int:
        """Return the next number; it is larger than every number handed out before."""
        pid = os.getpid()
        if pid != self._pid:  # first use, or a forked child: the parent's lock is not ours
            if self._fd >= 0:
                os.close(self._fd)  # the child's copy only; the parent keeps its own
            self._lock = threading.Lock()
            self._fd = -1
            self._pid = pid
        with self._lock:
            if self._fd < 0:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
            fd = self._fd
            if _atomic.fcntl is None:  # pragma: no cover - Windows
                return _bump(fd)
            _atomic.fcntl.flock(fd, _atomic.fcntl.LOCK_EX)
            try:
                return _bump(fd)
            finally:
                _atomic.fcntl.flock(fd, _atomic.fcntl.LOCK_UN)

    def close(self) -> None:
        """Close the file (if this process opened it); the next call reopens it."""
        with self._lock:
            if self._fd >= 0 and self._pid == os.getpid():
                os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown, os may be gone
            self.close()
