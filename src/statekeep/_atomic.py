"""The one place that commits to disk: build privately, fsync, manifest, rename.

Everything statekeep writes goes through here. Work in progress lives in a private
folder (:data:`PRIVATE_DIR`) inside the target directory, so the final rename stays on
one filesystem and is atomic. Each piece of work is an entry of that folder that its
owner holds an ``flock`` on for as long as it runs; :func:`sweep` reclaims entries
whose owner died (the lock is free) and never touches one that is still running.

An entry is born as ``<token>.pending``, locked, then renamed to ``<token>.work``:
the rename closes the window in which a sweeper could lock a fresh entry before its
owner does. A ``.pending`` leftover (the owner died inside that window) is reclaimed
once it is older than :data:`PENDING_GRACE` seconds.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

try:
    import fcntl as fcntl  # explicit re-export: _manifest locks the sequence file with it
except ImportError:  # pragma: no cover - Windows has no flock; sweeping falls back to age
    fcntl = None  # type: ignore[assignment]

from statekeep.errors import StateExistsError

logger = logging.getLogger("statekeep")

PRIVATE_DIR = ".statekeep"
PENDING_GRACE = 60.0

_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_RENAME_NOREPLACE = 1


def is_private(name: str) -> bool:
    """Whether a directory entry named ``name`` is statekeep's own work, not a state."""
    return name.startswith(PRIVATE_DIR)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the entries of directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | _O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_private(root: Path, *, durable: bool) -> Path:
    """Create ``root`` and its private folder if needed; return the folder."""
    private = root / PRIVATE_DIR
    if private.is_dir():
        return private
    root.mkdir(parents=True, exist_ok=True)
    try:
        private.mkdir()
    except FileExistsError:
        return private
    if durable:
        fsync_dir(root)
    return private


_token_pid = -1
_token_prefix = ""
_token_count = itertools.count()


def _token() -> str:
    """A name unique among this folder's entries: per-process random prefix + a counter.

    One ``getrandom`` per process rather than per entry; a forked child draws its own
    prefix. A clash is still impossible to miss: entries are created with ``O_EXCL``.
    """
    global _token_pid, _token_prefix
    pid = os.getpid()
    if pid != _token_pid:
        _token_prefix, _token_pid = secrets.token_hex(8), pid
    return f"{_token_prefix}{next(_token_count):x}"


class Work:
    """A locked entry of the private folder: a build directory or a temp file.

    The entry stays locked until :meth:`release`; after a crash the kernel drops
    the lock and the next :func:`sweep` reclaims the entry.
    """

    __slots__ = ("fd", "spath")

    def __init__(self, private: str | os.PathLike[str], *, is_dir: bool) -> None:
        base = f"{private}/{_token()}"  # str paths: pathlib costs here add up
        pending = f"{base}.pending"
        if is_dir:
            os.mkdir(pending)
            fd = os.open(pending, os.O_RDONLY | _O_DIRECTORY)
        else:
            fd = os.open(pending, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            work = f"{base}.work"
            os.rename(pending, work)
        except BaseException:
            os.close(fd)
            remove_tree(pending)
            raise
        self.fd = fd
        self.spath = work

    @property
    def path(self) -> Path:
        """The entry's path (``spath`` is the same as a ``str``)."""
        return Path(self.spath)

    def release(self) -> None:
        """Drop the lock (after the entry was renamed into place or removed)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        """Remove the entry, then drop the lock."""
        remove_tree(self.spath)
        self.release()


def new_work(root: str | os.PathLike[str], *, is_dir: bool, durable: bool) -> tuple[Work, bool]:
    """A locked work entry in ``root``'s private folder, and whether the folder was made.

    The folder usually exists, so it is not checked first: only when creating the entry
    fails for want of it is the folder (re)created, and the entry created again.
    """
    try:
        return Work(f"{root}/{PRIVATE_DIR}", is_dir=is_dir), False
    except FileNotFoundError:  # first use, or someone removed the folder
        return Work(ensure_private(Path(root), durable=durable), is_dir=is_dir), True


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Remove a file or a directory tree; a path that is already gone is fine."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


def _owner_is_gone(path: Path) -> bool:
    """Lock ``path`` without waiting; True (lock taken, then closed) if nobody held it."""
    if fcntl is None:  # pragma: no cover
        return time.time() - path.stat().st_mtime > PENDING_GRACE
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def sweep(root: Path) -> list[Path]:
    """Reclaim what killed saves and interrupted removals left in ``root``'s private folder.

    Returns the entries removed. Work whose owner is alive is left alone.
    """
    private = root / PRIVATE_DIR
    removed: list[Path] = []
    try:
        entries = list(os.scandir(private))
    except FileNotFoundError:
        return removed
    now = time.time()
    for entry in entries:
        path = Path(entry.path)
        try:
            if entry.name.endswith(".work"):
                if not _owner_is_gone(path):
                    continue
            elif entry.name.endswith(".pending"):
                if now - entry.stat(follow_symlinks=False).st_mtime < PENDING_GRACE:
                    continue
            elif not entry.name.endswith(".trash"):
                continue
            remove_tree(path)
        except FileNotFoundError:
            continue  # another sweeper got there first
        except OSError as exc:
            logger.warning("statekeep: could not reclaim %s: %s", path, exc)
            continue
        logger.info("statekeep: reclaimed %s", path)
        removed.append(path)
    return removed


def discard_committed(root: Path, path: Path) -> None:
    """Remove a committed entry of ``root`` crash-safely.

    The entry is first renamed into the private folder, which takes it out of every
    listing at once; only then is it deleted. A crash in between leaves a ``.trash``
    entry that the next sweep removes.
    """
    private = ensure_private(root, durable=False)
    trash = private / f"{secrets.token_hex(8)}.trash"
    os.rename(path, trash)
    remove_tree(trash)


def _load_renameat2() -> object | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.renameat2
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


_renameat2 = _load_renameat2()
_AT_FDCWD = -100


def rename_noreplace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Rename ``src`` to ``dst``; raise :class:`StateExistsError` if ``dst`` exists.

    Uses ``renameat2(RENAME_NOREPLACE)`` where the kernel offers it, so two writers
    racing for one name cannot replace each other.
    """
    global _renameat2
    if _renameat2 is not None:
        rc = _renameat2(  # type: ignore[operator]
            _AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE
        )
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise StateExistsError(errno.EEXIST, f"state {dst} already exists", str(dst))
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
        _renameat2 = None  # this filesystem cannot; fall back for good
    if os.path.lexists(dst):
        raise StateExistsError(errno.EEXIST, f"state {dst} already exists", str(dst))
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise StateExistsError(errno.EEXIST, f"state {dst} already exists", str(dst)) from exc
        raise


def write_all(fd: int, chunks: Iterable[bytes | memoryview]) -> None:
    """Write every chunk to ``fd``, retrying short writes.

    Chunks go out up to 64 at a time in one ``writev`` (one syscall where ``write``
    would take one per chunk).
    """
    if isinstance(chunks, (list, tuple)) and len(chunks) == 1:  # the common case: write()
        view = memoryview(chunks[0])
        while view:
            view = view[os.write(fd, view) :]
        return
    it = iter(chunks)
    while batch := [memoryview(c) for c in itertools.islice(it, 64)]:
        if not hasattr(os, "writev"):  # pragma: no cover - Windows
            batch = [memoryview(b"".join(batch))]
            while batch[0]:
                batch[0] = batch[0][os.write(fd, batch[0]) :]
            continue
        while batch:
            done = os.writev(fd, batch)
            while batch and done >= len(batch[0]):
                done -= len(batch.pop(0))
            if batch and done:
                batch[0] = batch[0][done:]


def replace_file(root: Path, final: Path, chunks: Iterable[bytes], *, durable: bool) -> None:
    """Atomically replace ``final`` (inside ``root``) with the concatenated ``chunks``.

    Readers see the old file or the new one, never a mix; with ``durable`` the new one
    survives power loss once this returns.
    """
    work, _ = new_work(root, is_dir=False, durable=durable)
    try:
        write_all(work.fd, chunks)
        if durable:
            os.fsync(work.fd)
        os.rename(work.spath, final)
    except BaseException:
        work.discard()
        raise
    work.release()
    if durable:
        fsync_dir(final.parent)
