"""FileCheckpointStorage: one human-readable file per session, replaced atomically.

A checkpoint file is the self-checking blob of :mod:`statekeep.storage._envelope`: a
JSON header line (format, version, session id, time, payload size and CRC-32, metadata,
and a CRC-32 of the header itself), so listing reads one line per file, then the data
as compact, uncompressed JSON that a person can open and read. Files are written only
through :func:`statekeep._atomic.replace_file`, and read without following a symlink
or blocking on a FIFO.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from statekeep import _atomic
from statekeep.errors import CorruptCheckpointError
from statekeep.storage._base import BaseCheckpointStorage

__all__ = ["FileCheckpointStorage", "file_name"]

SUFFIX = ".ckpt"
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")
_RESERVED = frozenset(
    ["con", "prn", "aux", "nul"] + [f"{p}{i}" for p in ("com", "lpt") for i in range(10)]
)
_MAX_STEM = 160  # escapes triple a character; stay well inside 255-byte file names
_PREFIX = 100


@functools.lru_cache(maxsize=1024)  # a pure function of the key; saves re-escaping it per call
def file_name(key: str) -> str:
    """The file name of session ``key``: reversible, collision-free, safe everywhere.

    Every character outside ``[a-z0-9_-]`` (uppercase letters, ``.``, ``/``, ``\\``,
    non-ASCII) becomes ``%xx`` escapes of its UTF-8 bytes in lowercase hex, so names
    never differ only in case and never hold a separator or a dot. A bare Windows
    device name (``con``, ``lpt1``) has its first letter escaped. A stem too long for
    a file name keeps a readable prefix and adds a SHA-256 of the id after a dot (which
    no escaped stem contains); the header holds the full id and is checked on load.
    """
    stem = "".join(ch if ch in _SAFE else "".join(f"%{b:02x}" for b in ch.encode()) for ch in key)
    if stem in _RESERVED:
        stem = f"%{ord(stem[0]):02x}{stem[1:]}"
    if len(stem) > _MAX_STEM:
        prefix = stem[:_PREFIX]
        cut = prefix.rfind("%", len(prefix) - 2)
        if cut >= 0:
            prefix = prefix[:cut]
        stem = f"{prefix}.{hashlib.sha256(key.encode()).hexdigest()}"
    return stem + SUFFIX


_HEAD_CHUNK = 4096
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)


class FileCheckpointStorage(BaseCheckpointStorage):
    """Stores each session's checkpoint in its own file under ``checkpoint_dir``.

    Saves replace the file atomically (readers see the old checkpoint or the new one)
    and, with ``durable=True``, survive power loss once :meth:`save` returns.
    Thread- and process-safe: concurrent writers of one session leave one of the
    complete values. OS errors are raised as :class:`~statekeep.StorageError`; a
    checkpoint file that is a FIFO, a device or a symlink raises
    :class:`~statekeep.CorruptCheckpointError` and is never read.

    Args:
        checkpoint_dir: The directory (created if missing).
        durable: fsync each save and deletion.
        use_json: Accepted for ondine compatibility: checkpoints are always JSON.
            ``use_json=False`` (ondine's pickle format) is refused with ValueError.
    """

    def __init__(
        self,
        checkpoint_dir: str | Path = ".checkpoints",
        *,
        durable: bool = True,
        use_json: bool = True,
    ) -> None:
        if use_json is not True:
            raise ValueError(
                f"FileCheckpointStorage(use_json={use_json!r}): checkpoints are stored as "
                "JSON only. A pickled checkpoint runs arbitrary code when it is loaded, "
                "and statekeep never unpickles what it was not asked to; pass "
                "use_json=True (the default) or leave it out."
            )
        self.checkpoint_dir = Path(checkpoint_dir)
        self.durable = durable
        with self._guard("create checkpoint directory", None):
            _atomic.make_root(self.checkpoint_dir, durable=durable)
            _atomic.sweep(self.checkpoint_dir)

    def _name(self, key: str) -> str:
        return file_name(key)

    def _place(self, name: str) -> str:
        return str(self.checkpoint_dir / name)

    def _open(self, name: str) -> int | None:
        path = self.checkpoint_dir / name
        try:
            fd = os.open(path, _OPEN_FLAGS)  # a FIFO opens at once and is refused below
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink
                raise CorruptCheckpointError(f"checkpoint file {path} is a symlink") from None
            raise
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):  # what read() would say: EISDIR, a StorageError
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
            if not stat.S_ISREG(mode):
                raise CorruptCheckpointError(
                    f"checkpoint file {path} is not a regular file ({stat.filemode(mode)})"
                )
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _read(self, name: str) -> bytes | None:
        fd = self._open(name)
        if fd is None:
            return None
        try:
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def _read_head(self, name: str) -> bytes | None:
        fd = self._open(name)
        if fd is None:
            return None
        try:
            chunks: list[bytes] = []
            while chunk := os.read(fd, _HEAD_CHUNK):
                chunks.append(chunk)
                if b"\n" in chunk:
                    break
            return b"".join(chunks)
        finally:
            os.close(fd)

    def _has(self, key: str) -> bool:
        try:
            os.lstat(self.checkpoint_dir / file_name(key))
        except FileNotFoundError:
            return False
        return True

    def _write(self, name: str, blob: bytes) -> None:
        _atomic.replace_file(
            self.checkpoint_dir, self.checkpoint_dir / name, (blob,), durable=self.durable
        )

    def _remove(self, name: str) -> bool:
        try:
            _atomic.discard_committed(self.checkpoint_dir, self.checkpoint_dir / name)
        except FileNotFoundError:
            return False
        if self.durable:
            _atomic.fsync_dir(self.checkpoint_dir)
        return True

    def _names(self) -> Iterable[str]:
        with os.scandir(self.checkpoint_dir) as entries:
            return [
                entry.name
                for entry in entries
                if entry.name.endswith(SUFFIX) and not _atomic.is_private(entry.name)
            ]

    def __repr__(self) -> str:
        return f"FileCheckpointStorage({str(self.checkpoint_dir)!r}, durable={self.durable})"
