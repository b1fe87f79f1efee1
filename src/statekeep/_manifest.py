"""Committing a directory with a manifest, and verifying it later.

The manifest (:data:`MANIFEST_NAME`, written last, inside the committed directory)
records the format version, the commit time, a sequence number and, for every file,
its relative path, size and CRC-32. CRC-32 because ``zlib.crc32`` is in the standard
library, runs at several GB/s (faster than the disk it guards) and catches every
single-bit flip and every burst error up to 32 bits; a truncation is caught by the
size first. It guards against accidents, not against an attacker.
"""

from __future__ import annotations

import json
import os
import threading
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType

from statekeep import _atomic
from statekeep.errors import CorruptStateError

MANIFEST_NAME = ".statekeep-manifest.json"
FORMAT = "statekeep.state"
FORMAT_VERSION = 1
_FIRST = 64 << 10  # the first read: all of a small file
_CHUNK = 4 << 20  # later reads, into one reused buffer
_WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", None)  # absent on macOS
_PARALLEL_SYNC = 4 << 20  # above this size, fsync runs beside the checksum pass


@dataclass(frozen=True)
class Entry:
    """One path inside a committed directory: a file (with size and CRC) or a directory."""

    path: str
    is_dir: bool
    size: int = 0
    crc32: int = 0


@dataclass(frozen=True)
class Manifest:
    """What a committed directory must contain."""

    created_at: datetime
    sequence: int
    entries: tuple[Entry, ...]
    version: int = FORMAT_VERSION

    @property
    def size_bytes(self) -> int:
        return sum(e.size for e in self.entries)

    def to_bytes(self) -> bytes:
        created = self.created_at.isoformat()
        files = [
            {"path": e.path, "type": "dir"}
            if e.is_dir
            else {"path": e.path, "type": "file", "size": e.size, "crc32": e.crc32}
            for e in self.entries
        ]
        body = {
            "format": FORMAT,
            "version": self.version,
            "created_at": created,
            "sequence": self.sequence,
            "files": files,
        }
        checksum = zlib.crc32(_canonical(body))
        # One line per file, laid out by hand: json.dumps(indent=...) would fall back to
        # the pure-Python encoder, which cost more than every syscall of a small save.
        lines = ",\n".join(f"  {json.dumps(f)}" for f in files)
        return (
            f'{{\n "format": {json.dumps(FORMAT)},\n "version": {self.version},\n'
            f' "created_at": {json.dumps(created)},\n "sequence": {self.sequence},\n'
            f' "files": [\n{lines}\n ],\n "checksum": {checksum}\n}}\n'
        ).encode()


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


def _canonical(body: dict[str, object]) -> bytes:
    return _CANONICAL.encode(body).encode()


def _checksum_file(path: str, *, sync: bool) -> tuple[int, int]:
    """Return (size, crc32) of a file, fsyncing it when ``sync``; one read pass.

    A small file takes one read and no fstat: a short read of a regular file is its end.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        head = os.read(fd, _FIRST)
        if len(head) < _FIRST:
            if sync:
                os.fsync(fd)
            return len(head), zlib.crc32(head)
        return _checksum_rest(fd, head, sync=sync)
    finally:
        os.close(fd)


def _checksum_rest(fd: int, head: bytes, *, sync: bool) -> tuple[int, int]:
    """Finish :func:`_checksum_file` for a file larger than its first read."""
    syncer = None
    errors: list[BaseException] = []
    if sync and os.fstat(fd).st_size >= _PARALLEL_SYNC:
        # fsync and crc32 both release the GIL: overlap the disk flush with the read.
        def flush() -> None:
            try:
                os.fsync(fd)
            except BaseException as exc:  # pragma: no cover - surfaced below
                errors.append(exc)

        syncer = threading.Thread(target=flush, name="statekeep-fsync")
        syncer.start()
    if _WILLNEED is not None:
        # Ask the kernel to read the rest ahead now, so the disk works while crc32 runs.
        os.posix_fadvise(fd, len(head), 0, _WILLNEED)
    crc = zlib.crc32(head)
    read = len(head)
    buf = bytearray(_CHUNK)  # one buffer, reused: no allocation (or page faults) per chunk
    view = memoryview(buf)
    while True:
        got = os.readv(fd, [buf])
        read += got
        crc = zlib.crc32(view[:got], crc)
        if got < _CHUNK:
            break
    if syncer is not None:
        syncer.join()
        if errors:
            raise errors[0]
    elif sync:
        os.fsync(fd)
    return read, crc


def scan(root: str, rel: str = "") -> list[tuple[str, os.DirEntry[str]]]:
    """List every entry below ``root`` (relative path, DirEntry), parents first."""
    found: list[tuple[str, os.DirEntry[str]]] = []
    with os.scandir(os.path.join(root, rel) if rel else root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        relpath = f"{rel}/{entry.name}" if rel else entry.name
        found.append((relpath, entry))
        if entry.is_dir(follow_symlinks=False):
            found.extend(scan(root, relpath))
    return found


def build_manifest(directory: Path, *, sequence: int, durable: bool) -> Manifest:
    """Checksum (and with ``durable`` fsync) everything below ``directory``."""
    root = str(directory)
    entries: list[Entry] = []
    for relpath, entry in scan(root):
        if entry.is_dir(follow_symlinks=False):
            if durable:
                _atomic.fsync_dir(entry.path)
            entries.append(Entry(relpath, is_dir=True))
        elif entry.is_file(follow_symlinks=False):
            size, crc = _checksum_file(entry.path, sync=durable)
            entries.append(Entry(relpath, is_dir=False, size=size, crc32=crc))
        else:
            raise ValueError(
                f"{entry.path} is neither a regular file nor a directory;"
                " a state may hold only files and directories"
            )
    return Manifest(datetime.now(timezone.utc), sequence, tuple(entries))


class BuildDir:
    """A directory under construction in ``root``'s private folder.

    Nothing inside it is visible in ``root`` until :meth:`commit` renames it into
    place. Leaving the ``with`` block without committing removes it.
    """

    def __init__(self, root: Path, *, durable: bool) -> None:
        self.root = root
        self.durable = durable
        self._private = root / _atomic.PRIVATE_DIR
        try:
            self._work = _atomic.Work(self._private, is_dir=True)
        except FileNotFoundError:  # first use, or someone removed it: create, then retry
            _atomic.ensure_private(root, durable=durable)
            self._work = _atomic.Work(self._private, is_dir=True)
        self.path = self._work.path

    def commit(self, final: Path) -> Manifest:
        """Write the manifest, make everything durable, and rename to ``final``.

        Raises:
            StateExistsError: ``final`` already exists; it is left untouched.
        """
        manifest = build_manifest(
            self.path, sequence=next_sequence(self._private), durable=self.durable
        )
        fd = os.open(f"{self.path}/{MANIFEST_NAME}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _atomic.write_all(fd, [manifest.to_bytes()])
            if self.durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        if self.durable:
            os.fsync(self._work.fd)  # the build directory itself
        _atomic.rename_noreplace(self.path, final)
        self._work.release()
        if self.durable:
            _atomic.fsync_dir(final.parent)
        return manifest

    def abort(self) -> None:
        if self._work.fd >= 0:
            self._work.discard()

    def __enter__(self) -> BuildDir:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()


def next_sequence(private: Path) -> int:
    """Return the next number of the store's counter (shared by threads and processes)."""
    fd = os.open(f"{private}/sequence", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if _atomic.fcntl is not None:
            _atomic.fcntl.flock(fd, _atomic.fcntl.LOCK_EX)
        raw = os.pread(fd, 32, 0).strip()
        value = (int(raw) if raw.isdigit() else 0) + 1
        os.pwrite(fd, b"%20d\n" % value, 0)
        return value
    finally:
        os.close(fd)


def _read_all(path: str) -> bytes:
    """The whole of a small file in as few syscalls as can be (open, read, close)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = [os.read(fd, _FIRST)]
        while len(chunks[-1]) == _FIRST:
            chunks.append(os.read(fd, _FIRST))
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_manifest(directory: Path) -> Manifest:
    """Parse the manifest of ``directory``.

    Raises:
        FileNotFoundError: ``directory`` does not exist.
        CorruptStateError: the manifest is missing, malformed or from a newer format.
    """
    path = directory / MANIFEST_NAME
    try:
        raw = _read_all(str(path))
    except (FileNotFoundError, NotADirectoryError):
        if not directory.is_dir():
            raise FileNotFoundError(f"state {directory} does not exist") from None
        raise CorruptStateError(f"state {directory} has no manifest ({path} is missing)") from None
    except IsADirectoryError:
        raise CorruptStateError(f"state {directory}: manifest {path} is a directory") from None
    try:
        body = json.loads(raw)
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} manifest")
        version = body["version"]
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CorruptStateError(
                f"state {directory}: manifest {path} has format version {version!r};"
                f" this statekeep reads versions up to {FORMAT_VERSION}"
            )
        checksum = body.pop("checksum")
        if zlib.crc32(_canonical(body)) != checksum:
            raise ValueError("its checksum does not match its content")
        entries = tuple(
            Entry(f["path"], is_dir=True)
            if f["type"] == "dir"
            else Entry(f["path"], is_dir=False, size=int(f["size"]), crc32=int(f["crc32"]))
            for f in body["files"]
        )
        created_at = datetime.fromisoformat(body["created_at"])
        return Manifest(created_at, int(body["sequence"]), entries, version)
    except CorruptStateError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptStateError(f"state {directory}: manifest {path} is malformed: {exc}") from exc


def verify(directory: Path) -> Manifest:
    """Check ``directory`` against its manifest: same paths, sizes and checksums.

    Raises:
        FileNotFoundError: ``directory`` does not exist.
        CorruptStateError: anything differs; the message names the state and the file.
    """
    manifest = read_manifest(directory)
    root = str(directory)
    actual = {rel: entry for rel, entry in scan(root) if rel != MANIFEST_NAME}
    for expected in manifest.entries:
        entry = actual.pop(expected.path, None)
        where = f"state {directory} failed verification: {expected.path}"
        if entry is None:
            raise CorruptStateError(f"{where} is missing")
        if expected.is_dir:
            if not entry.is_dir(follow_symlinks=False):
                raise CorruptStateError(f"{where} should be a directory")
            continue
        if not entry.is_file(follow_symlinks=False):
            raise CorruptStateError(f"{where} should be a regular file")
        size, crc = _checksum_file(entry.path, sync=False)
        if size != expected.size:
            raise CorruptStateError(f"{where} is {size} bytes, manifest says {expected.size}")
        if crc != expected.crc32:
            raise CorruptStateError(
                f"{where} has CRC-32 {crc:08x}, manifest says {expected.crc32:08x}"
            )
    if actual:
        extra = ", ".join(sorted(actual))
        raise CorruptStateError(f"state {directory} failed verification: unexpected {extra}")
    return manifest
