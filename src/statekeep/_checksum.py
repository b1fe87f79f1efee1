"""Reading files for the manifest: CRC-32 in one pass, small reads, directory scans.

These helpers take ``str`` paths: on the hot path of a small save or load, building
``pathlib`` objects cost more than the syscalls themselves.
"""

from __future__ import annotations

import os
import threading
import zlib

FIRST = 64 << 10  # the first read: all of a small file
CHUNK = 4 << 20  # later reads, into one reused buffer
_WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", None)  # absent on macOS
_PARALLEL_SYNC = 4 << 20  # above this size, fsync runs beside the checksum pass
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def checksum_file(path: str, *, sync: bool) -> tuple[int, int]:
    """Return (size, crc32) of a file, fsyncing it when ``sync``; one read pass.

    A small file takes one read and no fstat: a short read of a regular file is its end.
    """
    fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW)
    try:
        head = os.read(fd, FIRST)
        if len(head) < FIRST:
            if sync:
                os.fsync(fd)
            return len(head), zlib.crc32(head)
        return _checksum_rest(fd, head, sync=sync)
    finally:
        os.close(fd)


def _checksum_rest(fd: int, head: bytes, *, sync: bool) -> tuple[int, int]:
    """Finish :func:`checksum_file` for a file larger than its first read."""
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
    buf = bytearray(CHUNK)  # one buffer, reused: no allocation (or page faults) per chunk
    view = memoryview(buf)
    while True:
        got = os.readv(fd, [buf])
        read += got
        crc = zlib.crc32(view[:got], crc)
        if got < CHUNK:
            break
    if syncer is not None:
        syncer.join()
        if errors:
            raise errors[0]
    elif sync:
        os.fsync(fd)
    return read, crc


def read_all(path: str) -> bytes:
    """The whole of a small file in as few syscalls as can be (open, read, close)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = [os.read(fd, FIRST)]
        while len(chunks[-1]) == FIRST:
            chunks.append(os.read(fd, FIRST))
        return b"".join(chunks)
    finally:
        os.close(fd)


def scan(root: str, rel: str = "") -> list[tuple[str, os.DirEntry[str]]]:
    """List every entry below ``root`` (relative path, DirEntry), parents first, by name."""
    found: list[tuple[str, os.DirEntry[str]]] = []
    with os.scandir(f"{root}/{rel}" if rel else root) as it:
        entries = sorted(it, key=_name)
    for entry in entries:
        relpath = f"{rel}/{entry.name}" if rel else entry.name
        found.append((relpath, entry))
        if entry.is_dir(follow_symlinks=False):
            found.extend(scan(root, relpath))
    return found


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
