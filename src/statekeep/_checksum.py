"""Reading files for the manifest: CRC-32 in one pass, small reads, directory scans.

These helpers take ``str`` paths: on the hot path of a small save or load, building
``pathlib`` objects cost more than the syscalls themselves.

Every file is opened with ``O_NONBLOCK | O_NOFOLLOW`` and checked with ``fstat`` before
its first read, so a FIFO, a device or a symlink where a file should be never blocks a
reader nor leads it out of the directory. What callers see (and map to their own typed
errors, naming the state or checkpoint):

- :class:`NotRegularFileError` (an ``OSError``, ``errno`` ``EINVAL``): the path is a
  FIFO, socket or device; its message names the path and the kind;
- ``IsADirectoryError``: the path is a directory;
- ``OSError`` with ``errno`` ``ELOOP``: the path is a symlink;
- ``FileNotFoundError`` and any other ``OSError`` of the open or the reads, as raised.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import threading
import zlib

FIRST = 64 << 10  # the first read: all of a small file
CHUNK = 1 << 20  # later reads, into one reused buffer small enough to stay in cache
_SEQUENTIAL = getattr(os, "POSIX_FADV_SEQUENTIAL", None)  # absent on macOS
_PARALLEL_SYNC = 4 << 20  # above this size, fsync runs beside the checksum pass
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
# O_NONBLOCK: opening a FIFO for reading must not wait for a writer (the fstat then
# refuses it); on a regular file the flag changes nothing.
_O_READ = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | _O_NOFOLLOW

__all__ = ["NotRegularFileError", "checksum_file", "kinds", "open_regular", "read_all", "scan"]


class NotRegularFileError(OSError):
    """A FIFO, socket or device where a regular file should be (never read: it could block)."""


_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def open_regular(path: str) -> tuple[int, os.stat_result]:
    """Open ``path`` for reading if it is a regular file: (fd, its fstat).

    Raises:
        NotRegularFileError: it is a FIFO, socket or device.
        IsADirectoryError: it is a directory.
        OSError: the open failed (``ELOOP`` for a symlink).
    """
    fd = os.open(path, _O_READ)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, "is a directory", path)
            kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
            raise NotRegularFileError(errno.EINVAL, f"is {kind}, not a regular file", path)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def checksum_file(path: str, *, sync: bool, expect: int = 0) -> tuple[int, int]:
    """Return (size, crc32) of a regular file, fsyncing it when ``sync``; one read pass.

    ``expect`` is the size the caller expects (verification knows it from the manifest):
    when it is large, the read-ahead hint goes out before the first read, not after.

    Raises:
        NotRegularFileError, IsADirectoryError, OSError: see the module's docstring.
    """
    fd, st = open_regular(path)
    try:
        if expect >= FIRST and _SEQUENTIAL is not None:
            os.posix_fadvise(fd, 0, 0, _SEQUENTIAL)
        head = os.read(fd, FIRST)
        if len(head) < FIRST:  # a short read of a regular file is its end
            if sync:
                os.fsync(fd)
            return len(head), zlib.crc32(head)
        return _checksum_rest(fd, head, sync=sync, size=st.st_size)
    finally:
        os.close(fd)


def _checksum_rest(fd: int, head: bytes, *, sync: bool, size: int) -> tuple[int, int]:
    """Finish :func:`checksum_file` for a file larger than its first read.

    The caller closes ``fd`` when this returns or raises, so the fsync thread (if any)
    is always joined first: left running, it would fsync whatever file reuses the fd.
    """
    if not (sync and size >= _PARALLEL_SYNC):
        crc, read = _crc_rest(fd, head)
        if sync:
            os.fsync(fd)
        return read, crc
    # fsync and crc32 both release the GIL: overlap the disk flush with the read.
    errors: list[BaseException] = []

    def flush() -> None:
        try:
            os.fsync(fd)
        except BaseException as exc:  # surfaced below, after the join
            errors.append(exc)

    syncer = threading.Thread(target=flush, name="statekeep-fsync", daemon=True)
    syncer.start()
    try:
        crc, read = _crc_rest(fd, head)
    except BaseException as exc:
        syncer.join()
        if errors and sys.version_info >= (3, 11):
            exc.add_note(f"the fsync beside the failed read also failed: {errors[0]!r}")
        raise
    syncer.join()
    if errors:
        raise errors[0]
    return read, crc


def _crc_rest(fd: int, head: bytes) -> tuple[int, int]:
    """(crc32, bytes read) of ``head`` followed by the rest of ``fd``, read sequentially."""
    if _SEQUENTIAL is not None:
        # A larger read-ahead window: the disk keeps reading while crc32 runs on the
        # previous chunk, which is still in the CPU cache (measured: a cold 64 MB
        # checksum pass at 1 MiB chunks ~ one cold raw read; 4 MiB chunks + WILLNEED
        # cost 20-30% more).
        os.posix_fadvise(fd, 0, 0, _SEQUENTIAL)
    crc = zlib.crc32(head)
    read = len(head)
    buf = bytearray(CHUNK)  # one buffer, reused: no allocation (or page faults) per chunk
    view = memoryview(buf)
    while True:
        got = os.readv(fd, [buf])
        read += got
        crc = zlib.crc32(view[:got], crc)
        if got < CHUNK:
            return crc, read


def read_all(path: str) -> bytes:
    """The whole of a small regular file in as few syscalls as can be.

    open, fstat, one read of the size fstat gave (plus one byte, to see the end), close.

    Raises:
        NotRegularFileError, IsADirectoryError, OSError: see the module's docstring.
    """
    fd, st = open_regular(path)
    try:
        want = st.st_size + 1
        data = os.read(fd, want)
        if len(data) < want:  # a short read of a regular file is its end
            return data
        chunks = [data]  # it grew since the fstat: read on to the end
        while data:
            data = os.read(fd, CHUNK)
            chunks.append(data)
        return b"".join(chunks)
    finally:
        os.close(fd)


def scan(root: str) -> list[tuple[str, os.DirEntry[str]]]:
    """List every entry below ``root`` (relative path, DirEntry), parents first, by name.

    Iterative (an explicit stack), so a tree of any depth is walked; symlinks are
    listed, never followed.
    """
    found: list[tuple[str, os.DirEntry[str]]] = []
    todo: list[tuple[str, os.DirEntry[str]]] = _listed(root, "")
    while todo:
        relpath, entry = todo.pop()
        found.append((relpath, entry))
        if entry.is_dir(follow_symlinks=False):
            todo += _listed(entry.path, relpath)
    return found


def _listed(path: str, rel: str) -> list[tuple[str, os.DirEntry[str]]]:
    """The entries of ``path`` as (relative path, DirEntry), by name *descending*: the
    stack in :func:`scan` pops the smallest first."""
    with os.scandir(path) as it:
        entries = sorted(it, key=_name, reverse=True)
    return [(f"{rel}/{e.name}" if rel else e.name, e) for e in entries]


def _name(entry: os.DirEntry[str]) -> str:
    return entry.name


def kinds(root: str, skip: str) -> dict[str, int]:
    """Every path below ``root`` but ``skip``: relative path -> 1 (file), 2 (dir) or 0.

    Unordered and without ``DirEntry`` objects kept: the cheap scan that verification
    needs to find missing, extra and wrongly typed entries. The types come from the
    directory listing itself (no stat per entry where the filesystem reports them).
    """
    found: dict[str, int] = {}
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(f"{root}/{rel}" if rel else root) as it:
            for entry in it:
                relpath = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_file(follow_symlinks=False):
                    found[relpath] = 1
                elif entry.is_dir(follow_symlinks=False):
                    found[relpath] = 2
                    stack.append(relpath)
                else:
                    found[relpath] = 0
    found.pop(skip, None)
    return found
