"""The one place that commits to disk: build privately, fsync, rename into place.

Everything statekeep writes goes through here. Work in progress lives in the target
directory itself, as entries whose names start with :data:`PREFIX` (``.statekeep-``),
so the final rename stays on one filesystem and is atomic, and nothing is ever written
outside the directory. Such an entry exists only while a save runs (or until the next
sweep, when its owner was killed): whenever no save is running, the directory holds
nothing but what was committed. :func:`is_private` names those entries; every scanner
skips them.

Each piece of work is an entry that its owner holds an ``flock`` on for as long as it
runs; :func:`sweep` reclaims entries whose owner died (the lock is free) and never
touches one that is still running. An entry is born as ``.statekeep-<token>.pending``,
locked, then renamed to ``.statekeep-<token>.work``: the rename closes the window in
which a sweeper could lock a fresh entry before its owner does. A ``.pending`` leftover
(the owner died inside that window) is reclaimed once it is older than
:data:`PENDING_GRACE` seconds.

Nothing here follows a symbolic link for what it deletes: a private entry that is a
link is removed as a link.

POSIX only (Linux, macOS): ``flock``, ``O_DIRECTORY`` and directory fsync are relied on.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import itertools
import logging
import os
import secrets
import stat
import sys
import time
import weakref
from collections.abc import Iterable
from pathlib import Path

from statekeep import _fork
from statekeep.errors import StateExistsError, StorageError

logger = logging.getLogger("statekeep")

PRIVATE_DIR = ".statekeep"  # every private name starts so; also the folder of old stores
PREFIX = ".statekeep-"  # the prefix of a work entry's name
PENDING_GRACE = 60.0
_SUFFIXES = (".work", ".pending", ".trash")

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2  # linux/fs.h
_F_FULLFSYNC = getattr(fcntl, "F_FULLFSYNC", None)  # macOS: fsync does not reach the disk
_O_NOFOLLOW = os.O_NOFOLLOW


def is_private(name: str) -> bool:
    """Whether a directory entry named ``name`` is statekeep's own work, not a state."""
    return name.startswith(PRIVATE_DIR)


def full_fsync(fd: int) -> None:
    """Flush ``fd`` (a file or a directory) to stable storage.

    ``fcntl(F_FULLFSYNC)`` on macOS, where plain ``fsync`` leaves the data in the
    drive's cache; ``fsync`` elsewhere (and where the filesystem refuses F_FULLFSYNC).
    """
    if _F_FULLFSYNC is not None:
        try:
            fcntl.fcntl(fd, _F_FULLFSYNC)
            return
        except OSError:  # pragma: no cover - macOS filesystems without it
            pass
    os.fsync(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the entries of directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        full_fsync(fd)
    finally:
        os.close(fd)


def make_root(root: str | os.PathLike[str], *, durable: bool) -> bool:
    """Create directory ``root`` (and its parents) if missing; True if it was made.

    With ``durable``, the parent of every directory created is fsynced, so the new
    directory's name survives power loss along with what is later committed in it.
    """
    path = Path(root)
    if path.is_dir():
        return False
    missing = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    path.mkdir(parents=True, exist_ok=True)
    if durable:
        for made in reversed(missing):
            fsync_dir(made.parent)
    return bool(missing)


_token_pid = -1
_token_prefix = ""
_token_count = itertools.count()


def _token() -> str:
    """A name unique among the directory's entries: per-process random prefix + a counter.

    One ``getrandom`` per process rather than per entry; a forked child draws its own
    prefix. A clash is still impossible to miss: entries are created with ``O_EXCL``.
    """
    global _token_pid, _token_prefix
    pid = os.getpid()
    if pid != _token_pid:
        _token_prefix, _token_pid = secrets.token_hex(8), pid
    return f"{_token_prefix}{next(_token_count):x}"


def add_note(error: BaseException, note: str) -> None:
    """Attach ``note`` to ``error`` (``add_note`` on Python >= 3.11, else a log line)."""
    if sys.version_info >= (3, 11):
        error.add_note(note)
    else:  # pragma: no cover - Python 3.10
        logger.warning("statekeep: %s (while handling %r)", note, error)


class _LiveWork:
    """The work entries this process holds, so that a forked child lets go of them.

    A child made by ``fork()`` inherits every descriptor, and an ``flock`` lasts while
    any descriptor of its open file does: a long-lived child would keep the parent's
    work "alive" after the parent died, and the sweep would never reclaim it. In the
    child, each inherited work descriptor is closed (the parent's own stays open).
    """

    def __init__(self) -> None:
        self.entries: weakref.WeakSet[Work | Pin] = weakref.WeakSet()
        _fork.on_fork_child(self.reset_in_child)

    def reset_in_child(self) -> None:
        for work in list(self.entries):
            fd, work.fd = work.fd, -1
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.entries = weakref.WeakSet()


class Work:
    """A locked work entry of a directory: a build directory or a temp file.

    The entry stays locked until :meth:`release`; after a crash the kernel drops
    the lock and the next :func:`sweep` reclaims the entry.
    """

    __slots__ = ("__weakref__", "fd", "spath")

    def __init__(self, root: str | os.PathLike[str], *, is_dir: bool) -> None:
        base = f"{root}/{PREFIX}{_token()}"  # str paths: pathlib costs here add up
        pending = f"{base}.pending"
        if is_dir:
            os.mkdir(pending)
            fd = os.open(pending, os.O_RDONLY | os.O_DIRECTORY | _O_NOFOLLOW)
        else:
            fd = os.open(pending, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            work = f"{base}.work"
            os.rename(pending, work)
        except BaseException:
            os.close(fd)
            remove_tree(pending)
            raise
        self.fd = fd
        self.spath = work
        _live.entries.add(self)

    @property
    def path(self) -> Path:
        """The entry's path (``spath`` is the same as a ``str``)."""
        return Path(self.spath)

    def release(self) -> None:
        """Drop the lock (after the entry was renamed into place or removed)."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            _live.entries.discard(self)
            os.close(fd)

    def discard(self, cause: BaseException | None = None) -> None:
        """Remove the entry, then drop the lock (always, even if the removal fails).

        ``cause`` is the error that made the work fail: when removing the entry fails
        too, that failure is attached to ``cause`` as a note (the caller re-raises
        ``cause``) instead of being raised; the entry, unlocked, goes at the next sweep.
        """
        try:
            remove_tree(self.spath)
        except OSError as exc:
            if cause is None:
                raise
            add_note(cause, f"statekeep could not remove its work entry {self.spath}: {exc!r}")
        finally:
            self.release()


_live = _LiveWork()


def new_work(root: str | os.PathLike[str], *, is_dir: bool, durable: bool) -> tuple[Work, bool]:
    """A locked work entry in directory ``root``, and whether ``root`` had to be made.

    ``root`` usually exists, so it is not checked first: only when creating the entry
    fails for want of it is ``root`` (re)created, and the entry created again.
    """
    try:
        return Work(root, is_dir=is_dir), False
    except FileNotFoundError:  # first use, or someone removed the directory
        make_root(root, durable=durable)
        return Work(root, is_dir=is_dir), True


class StateInUse(BlockingIOError):
    """A committed directory could not be removed: a reader holds it (see :class:`Pin`)."""


_PIN_WAIT = 0.1  # seconds; an exclusive holder keeps the lock across one rename only


class Pin:
    """A shared ``flock`` on a committed state directory, held while it is read.

    Whoever removes a committed directory (:func:`discard_committed`) takes the
    exclusive lock first and leaves the directory alone while a reader holds it, so a
    state cannot be pruned from under a load that has started. The exclusive lock is
    held only across a rename (a saver's right after its commit, a remover's while it
    renames the state out): a reader that finds it taken tries again for
    :data:`_PIN_WAIT` seconds, then reads unpinned. ``held`` says whether the pin was
    taken; a directory that was renamed away meanwhile, a link, or a filesystem
    without ``flock`` leave it False (the read then goes on as it would without).
    """

    __slots__ = ("__weakref__", "fd", "held")

    def __init__(self, path: str) -> None:
        self.fd = -1
        self.held = False
        if not path:
            return  # "" is no directory (and must not be read as one): the read says so
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _O_NOFOLLOW)
        except OSError:
            return  # gone, a link, not a directory, not readable: the read will say
        # Tracked before it is locked and before any wait: a child forked from now on
        # closes its copy, and an interrupt (Ctrl-C during the wait) closes ours.
        self.fd = fd
        _live.entries.add(self)
        try:
            held = _lock_shared(fd)
            # Opened before a remover renamed it out: the lock then holds a directory
            # that no longer has this name.
            held = held and _still_named(path, fd)
        except OSError:
            held = False
        except BaseException:
            self.release()
            raise
        if held:
            self.held = True
        else:
            self.release()

    def release(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            _live.entries.discard(self)
            os.close(fd)

    def __enter__(self) -> Pin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # an interrupt between __init__ and ``with``
        self.release()


def _lock_shared(fd: int) -> bool:
    deadline = time.monotonic() + _PIN_WAIT
    pause = 0.0005
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.01)
        except OSError:  # no flock here (ENOLCK on some network filesystems)
            return False


def _lock_exclusive(path: str | os.PathLike[str]) -> int:
    """An fd holding the exclusive ``flock`` of directory ``path``, or -1 where a
    directory cannot be locked (no ``flock`` on its filesystem).

    Raises:
        StateInUse: a reader holds it (:class:`Pin`).
        FileNotFoundError: ``path`` is gone.
        OSError: ``path`` cannot be opened (out of descriptors, a permission): it is not
            renamed away unlocked, from under a reader it could not see.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        named = _still_named(path, fd)
    except BlockingIOError:
        os.close(fd)
        raise StateInUse(
            errno.EWOULDBLOCK, "a reader is loading it; left for a later pass", os.fspath(path)
        ) from None
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP):
            return -1  # no flock here (some network filesystems): nothing can hold it
        raise
    except BaseException:
        os.close(fd)
        raise
    if not named:
        os.close(fd)  # gone, or another directory took the name meanwhile: that one stays
        raise FileNotFoundError(errno.ENOENT, "replaced while it was being removed", str(path))
    return fd


def trash_name(root: str | os.PathLike[str]) -> str:
    """A fresh private name in ``root`` for an entry on its way out (see :func:`sweep`)."""
    return f"{root}/{PREFIX}{_token()}.trash"


def remove_tree(path: str | os.PathLike[str]) -> bool:
    """Remove a file, a link or a directory tree; False if ``path`` was already gone.

    A symbolic link is removed as a link, never followed, wherever it is met. The walk
    is iterative and holds one descriptor at a time, so a tree of any depth goes.
    """
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            _remove_dir_tree(os.fspath(path))
        else:
            os.unlink(path)
    except FileNotFoundError:
        return False
    return True


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | _O_NOFOLLOW


def _dir_id(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _still_named(path: str | os.PathLike[str], fd: int) -> bool:
    """Whether ``path`` (not followed) still names the file open as ``fd``."""
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == _dir_id(fd)


def _remove_dir_tree(path: str) -> None:
    """Empty and remove directory ``path``, descending by ``openat(O_NOFOLLOW)``.

    Going back up opens ``..`` (never a link) and checks it is the directory that was
    come down from, so a tree moved meanwhile stops the removal instead of steering it.
    """
    fd = os.open(path, _DIR_FLAGS)
    names: list[str] = []  # the way down from ``path``
    ids = [_dir_id(fd)]
    try:
        while True:
            child = None
            with os.scandir(fd) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        child = entry.name
                        break
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.name, dir_fd=fd)
            if child is not None:
                try:
                    sub = os.open(child, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    continue
                os.close(fd)
                fd = sub
                names.append(child)
                ids.append(_dir_id(fd))
                continue
            if not names:
                break
            up = os.open("..", _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = up
            name = names.pop()
            ids.pop()
            if _dir_id(fd) != ids[-1]:
                raise OSError(errno.ESTALE, f"{path} was moved while it was being removed", path)
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(name, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(path)


def _reclaim_work(path: str) -> bool:
    """Remove the ``.work`` entry ``path`` if its owner is gone; True if it was removed.

    The entry is locked without waiting (a live owner holds the lock) and removed while
    the lock is held, and only if ``path`` still names the entry that was locked: an
    owner that committed (renamed the entry away) and then let go of the lock in the
    meantime has left nothing to reclaim.
    """
    fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | os.O_NONBLOCK)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        if not _still_named(path, fd):
            return False
        return remove_tree(path)
    finally:
        os.close(fd)


def _reclaim(entry: os.DirEntry[str], now: float) -> bool:
    """Remove the private entry ``entry`` if it is debris; True if it was removed."""
    if entry.is_symlink():
        return remove_tree(entry.path)  # never ours to follow: the link itself goes
    if entry.name.endswith(".work"):
        return _reclaim_work(entry.path)
    young = now - entry.stat(follow_symlinks=False).st_mtime < PENDING_GRACE
    if entry.name.endswith(".pending") and young:
        return False
    return remove_tree(entry.path)  # an old .pending, or .trash


def _sweep_entries(directory: str, now: float, removed: list[Path], *, legacy: bool) -> None:
    with os.scandir(directory) as it:
        entries = [e for e in it if (legacy or is_private(e.name)) and e.name.endswith(_SUFFIXES)]
    for entry in entries:
        try:
            if not _reclaim(entry, now):
                continue
        except FileNotFoundError:
            continue  # another sweeper got there first
        except OSError as exc:
            logger.warning("statekeep: could not reclaim %s: %s", entry.path, exc)
            continue
        logger.info("statekeep: reclaimed %s", entry.path)
        removed.append(Path(entry.path))


def _migrate_legacy(root: Path, now: float, removed: list[Path]) -> None:
    """Retire the ``.statekeep/`` folder of a store written by an older statekeep.

    Its counter is carried over to the directory's own, its debris reclaimed, and the
    folder removed once empty (a live save of an old process still inside keeps it).
    """
    legacy = root / PRIVATE_DIR
    try:
        mode = os.lstat(legacy).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(mode):  # a link or a file where the folder was: remove it as such
        os.unlink(legacy)
        removed.append(legacy)
        return
    from statekeep import _sequence  # _sequence builds on this module

    _sequence.carry_over(root, legacy / "sequence")
    _sweep_entries(str(legacy), now, removed, legacy=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(legacy / "sequence")
    try:
        os.rmdir(legacy)
    except FileNotFoundError:
        return
    except OSError as exc:
        logger.warning("statekeep: could not remove the old private folder %s: %s", legacy, exc)
        return
    logger.info("statekeep: removed the private folder %s of an older statekeep", legacy)
    removed.append(legacy)


def sweep(root: Path) -> list[Path]:
    """Reclaim what killed saves and interrupted removals left in directory ``root``.

    Returns the entries removed. Work whose owner is alive is left alone. A directory
    from an older statekeep has its ``.statekeep/`` folder migrated and removed.
    """
    removed: list[Path] = []
    now = time.time()
    try:
        _sweep_entries(str(root), now, removed, legacy=False)
    except FileNotFoundError:
        return removed
    try:
        _migrate_legacy(Path(root), now, removed)
    except OSError as exc:
        logger.warning("statekeep: could not migrate %s/%s: %s", root, PRIVATE_DIR, exc)
    return removed


def discard_committed(root: Path, path: Path, *, readers: bool = True) -> None:
    """Remove a committed entry of ``root`` crash-safely.

    The entry is first renamed to a private ``.trash`` name, which takes it out of every
    listing at once; only then is it deleted. A crash in between leaves a ``.trash``
    entry that the next sweep removes. A directory is renamed only while this holds its
    exclusive ``flock``, so never while a reader holds a :class:`Pin` on it; with
    ``readers=False`` (a damaged copy no reader can load whole) readers are not waited
    for: theirs vanishes, and they list again.

    Raises:
        StateInUse: a reader is loading ``path``; it is left where it is.
        PermissionError: ``path`` is a directory this process may not empty (not
            listable or not writable by it: another user's, or ``chmod 000``). It is
            left where it is, visible, rather than renamed out of sight only to fail.
        OSError: (``EROFS``) the same, because ``path`` is on a read-only filesystem.
    """
    is_dir = stat.S_ISDIR(os.lstat(path).st_mode)
    if is_dir and not os.access(path, os.R_OK | os.W_OK | os.X_OK, follow_symlinks=False):
        if not os.path.lexists(path):  # access() says False for a path removed meanwhile
            raise FileNotFoundError(errno.ENOENT, "already removed", str(path))
        if os.statvfs(path).f_flag & os.ST_RDONLY:  # access() says False there too
            raise OSError(errno.EROFS, "it is on a read-only filesystem", str(path))
        raise PermissionError(
            errno.EACCES, "a directory this user may not list or empty", str(path)
        )
    trash = trash_name(root)
    guard = _lock_exclusive(path) if is_dir and readers else -1
    try:
        os.rename(path, trash)
    finally:
        if guard >= 0:
            os.close(guard)
    remove_tree(trash)


def _load_renameat2() -> object | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.renameat2
    except (OSError, AttributeError):  # pragma: no cover - not glibc (macOS)
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


def _exchange(src: str, dst: str | os.PathLike[str]) -> bool:
    """Swap ``src`` and ``dst`` atomically (``renameat2(RENAME_EXCHANGE)``).

    Why not a rename over ``dst``: ext4 (``auto_da_alloc``) writes a file renamed over
    another out to disk at once, which made a non-durable 1 KB replace cost 2 ms on a
    busy disk against 0.1 ms for an exchange (docs/performance.md). False when ``dst``
    does not exist yet or the kernel or filesystem cannot exchange: rename instead.
    """
    if _renameat2 is None:
        return False
    rc = _renameat2(  # type: ignore[operator]
        _AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_EXCHANGE
    )
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOENT, errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), src, None, os.fspath(dst))


def _drop_swapped_out(old: str, final: str | os.PathLike[str]) -> None:
    """Remove what an exchange moved out of ``final`` to ``old`` (the replaced file).

    If that was a directory, swap back and fail as a rename over it would have. Any
    other failure to remove it leaves an unlocked work entry that the next sweep takes.
    """
    try:
        os.unlink(old)
    except IsADirectoryError:
        _exchange(old, final)
        raise IsADirectoryError(errno.EISDIR, "is a directory", os.fspath(final)) from None
    except OSError:
        pass


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
        while batch:
            done = os.writev(fd, batch)
            while batch and done >= len(batch[0]):
                done -= len(batch.pop(0))
            if batch and done:
                batch[0] = batch[0][done:]


def create_file(path: str, chunks: Iterable[bytes], *, durable: bool) -> None:
    """Create ``path``, which must not exist yet, holding ``chunks``; fully synced with
    ``durable``. A manifest is written so, into the work entry it seals."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW, 0o644)
    try:
        write_all(fd, chunks)
        if durable:
            full_fsync(fd)
    finally:
        os.close(fd)


def sync_parent_after_commit(final: str | os.PathLike[str], what: str) -> None:
    """fsync the directory that names ``final``, which was just renamed into place.

    Raises:
        StorageError: the fsync failed. The rename has happened, so ``final`` is
            committed (visible, complete); only its durability across power loss is
            unknown. The message says exactly that.
    """
    parent = os.path.dirname(os.fspath(final)) or "."
    try:
        fsync_dir(parent)
    except OSError as exc:
        raise StorageError(
            exc.errno,
            f"{what} {os.fspath(final)} is committed, but syncing its directory {parent}"
            f" failed ({exc.strerror or exc}): whether it survives a power loss is unknown",
        ) from exc


def replace_file(root: Path, final: Path, chunks: Iterable[bytes], *, durable: bool) -> None:
    """Atomically replace ``final`` (inside ``root``) with the concatenated ``chunks``.

    Readers see the old file or the new one, never a mix; with ``durable`` the new one
    survives power loss once this returns.

    Raises:
        StorageError: with ``durable``, the file was replaced but syncing its directory
            afterwards failed (the message says so).
    """
    work, _ = new_work(root, is_dir=False, durable=durable)
    try:
        write_all(work.fd, chunks)
        if durable:
            full_fsync(work.fd)
            os.rename(work.spath, final)
        elif _exchange(work.spath, final):
            _drop_swapped_out(work.spath, final)
        else:
            os.rename(work.spath, final)
    except BaseException as exc:
        work.discard(exc)
        raise
    work.release()
    if durable:
        sync_parent_after_commit(final, "file")
