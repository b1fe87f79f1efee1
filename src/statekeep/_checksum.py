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
from collections.abc import Callable

from statekeep._atomic import full_fsync

FIRST = 64 << 10  # the first read: all of a small file
CHUNK = 1 << 20  # later reads, into one reused buffer small enough to stay in cache
_SEQUENTIAL = getattr(os, "POSIX_FADV_SEQUENTIAL", None)  # absent on macOS
_PARALLEL_SYNC = 4 << 20  # above this size, fsync runs beside the checksum pass
PARALLEL_MIN = 32 << 20  # from this size, the checksum pass is split across threads
MAX_PARTS = 4  # at most this many threads per file
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
# O_NONBLOCK: opening a FIFO for reading must not wait for a writer (the fstat then
# refuses it); on a regular file the flag changes nothing.
_O_READ = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | _O_NOFOLLOW

__all__ = [
    "NotRegularFileError",
    "checksum_file",
    "crc32_combine",
    "kinds",
    "open_regular",
    "read_all",
    "scan",
]


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
    A file of :data:`PARALLEL_MIN` bytes or more is split into contiguous parts, one
    per idle CPU (see :func:`_parts`), each read and checksummed by its own thread
    (``zlib.crc32`` and reads release the GIL); the parts' CRCs are combined into the
    CRC-32 of the whole file, so the manifest format does not change.

    Raises:
        NotRegularFileError, IsADirectoryError, OSError: see the module's docstring.
    """
    fd, st = open_regular(path)
    try:
        size = st.st_size
        if size >= PARALLEL_MIN and (parts := _parts()) > 1:
            return _with_fsync(fd, sync, _crc_parallel, path, fd, size, parts)
        if expect >= FIRST and _SEQUENTIAL is not None:
            os.posix_fadvise(fd, 0, 0, _SEQUENTIAL)
        head = os.read(fd, FIRST)
        if len(head) < FIRST:  # a short read of a regular file is its end
            if sync:
                full_fsync(fd)
            return len(head), zlib.crc32(head)
        if sync and size < _PARALLEL_SYNC:
            size_crc = _crc_rest(fd, head)
            full_fsync(fd)
            return size_crc
        return _with_fsync(fd, sync, _crc_rest, fd, head)
    finally:
        os.close(fd)


def _with_fsync(
    fd: int, sync: bool, crc_pass: Callable[..., tuple[int, int]], *args: object
) -> tuple[int, int]:
    """Run ``crc_pass(*args)``; with ``sync``, fsync ``fd`` on a thread beside it.

    The caller closes ``fd`` when this returns or raises, so the fsync thread is always
    joined first: left running, it would fsync whatever file reuses the fd.
    """
    if not sync:
        return crc_pass(*args)
    # fsync and crc32 both release the GIL: overlap the disk flush with the read.
    errors: list[BaseException] = []

    def flush() -> None:
        try:
            full_fsync(fd)
        except BaseException as exc:  # surfaced below, after the join
            errors.append(exc)

    syncer = threading.Thread(target=flush, name="statekeep-fsync", daemon=True)
    syncer.start()
    try:
        result = crc_pass(*args)
    except BaseException as exc:
        syncer.join()
        if errors and sys.version_info >= (3, 11):
            exc.add_note(f"the fsync beside the failed read also failed: {errors[0]!r}")
        raise
    syncer.join()
    if errors:
        raise errors[0]
    return result


def _crc_rest(fd: int, head: bytes) -> tuple[int, int]:
    """(bytes read, crc32) of ``head`` followed by the rest of ``fd``, read sequentially."""
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
            return read, crc


def _parts() -> int:
    """How many threads a large checksum pass uses: one per CPU that is free now.

    Measured on a 2-CPU machine shared with busy jobs (load ~9): two parts took 1.2-1.45x
    the time of one sequential pass, since the second thread only waited for a CPU and
    the split broke the single read-ahead stream. So a part is added only for a CPU the
    1-minute load average leaves idle (1 + free CPUs, at most :data:`MAX_PARTS`).
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        busy = os.getloadavg()[0]
    except OSError:  # pragma: no cover - no load average on this platform
        busy = float(cpus or 1)
    free = int((cpus or 1) - busy)
    return max(1, min(MAX_PARTS, cpus or 1, 1 + free))


def _crc_parallel(path: str, fd: int, size: int, parts: int) -> tuple[int, int]:
    """(bytes read, crc32) of the file open as ``fd``: ``parts`` ranges on as many threads.

    Each extra thread reads through a descriptor of its own (its own read-ahead
    window: two streams through one descriptor defeat the kernel's read-ahead), opened
    again by ``path`` and used only if it is the same file; otherwise it shares ``fd``
    (``pread`` needs no offset of its own). Every thread is joined before this returns
    or raises. ``size`` is the fstat size: a file that shrank since ends at the first
    short part; one that grew is read on to its end.
    """
    bounds = [size * i // parts for i in range(parts + 1)]
    results: list[tuple[int, int]] = [(0, 0)] * parts
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            own = _reopen(path, fd)
            try:
                results[i] = _crc_range(own, bounds[i], bounds[i + 1])
            finally:
                if own != fd:
                    os.close(own)
        except BaseException as exc:  # surfaced below, after the join
            errors.append(exc)

    threads = [
        threading.Thread(target=work, args=(i,), name="statekeep-crc", daemon=True)
        for i in range(1, parts)
    ]
    try:
        for thread in threads:
            thread.start()
        results[0] = _crc_range(fd, 0, bounds[1])
    finally:
        for thread in threads:
            if thread.ident is not None:
                thread.join()
    if errors:
        raise errors[0]
    read = crc = 0
    for i, (got, part_crc) in enumerate(results):
        crc = crc32_combine(crc, part_crc, got)
        read += got
        if got < bounds[i + 1] - bounds[i]:
            return read, crc  # the file ends here (it shrank since the fstat)
    got, rest_crc = _crc_range(fd, size, None)  # it grew since the fstat
    return read + got, crc32_combine(crc, rest_crc, got)


def _reopen(path: str, fd: int) -> int:
    """A new descriptor of the file open as ``fd``, or ``fd`` itself if ``path`` no longer
    names that file."""
    try:
        own, st = open_regular(path)
    except OSError:
        return fd
    was = os.fstat(fd)
    if (st.st_dev, st.st_ino) == (was.st_dev, was.st_ino):
        return own
    os.close(own)
    return fd


def _crc_range(fd: int, start: int, end: int | None) -> tuple[int, int]:
    """(bytes read, crc32) of ``fd`` from ``start`` to ``end`` (None: to its end)."""
    if _SEQUENTIAL is not None:
        os.posix_fadvise(fd, start, 0 if end is None else end - start, _SEQUENTIAL)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    crc = 0
    pos = start
    while end is None or pos < end:
        want = CHUNK if end is None else min(CHUNK, end - pos)
        got = os.preadv(fd, [view[:want]], pos)
        if not got:
            break
        crc = zlib.crc32(view[:got], crc)
        pos += got
    return pos - start, crc


# CRC-32 of two pieces joined, from their CRCs: zlib's crc32_combine, which Python's zlib
# module does not expose. Polynomials over GF(2) in zlib's reflected bit order (bit 31 is
# x^0); multiplying by x^(8 * n) shifts a CRC past n zero bytes.
_POLY = 0xEDB88320


def _multmodp(a: int, b: int) -> int:
    """a(x) * b(x) modulo the CRC-32 polynomial."""
    product = 0
    bit = 1 << 31
    while bit:
        if a & bit:
            product ^= b
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
        bit >>= 1
    return product


_X2N = [1 << 30]  # x^(2^k) mod p for k = 0..31
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of ``A + B`` from ``crc1 = crc32(A)``, ``crc2 = crc32(B)``, ``len(B)``."""
    shift = 1 << 31  # x^0
    k = 3  # x^(8 * len2) = product of x^(2^(k)) over the bits of len2, shifted by 3
    while len2:
        if len2 & 1:
            shift = _multmodp(_X2N[k & 31], shift)
        len2 >>= 1
        k += 1
    return _multmodp(shift, crc1) ^ crc2


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
