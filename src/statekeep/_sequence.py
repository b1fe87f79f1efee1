"""The commit sequence of a directory: one number per commit, shared by every writer.

The number lives with the directory itself, never in a file of its own (the directory
holds only committed states):

* **In an extended attribute** ``user.statekeep.sequence`` of the directory, where the
  filesystem has user extended attributes (ext4, XFS, btrfs, ZFS, tmpfs since Linux
  6.6, ...). Every read-increment-write runs under an exclusive ``flock`` on the
  directory, so it never repeats or goes back, whichever thread or process commits. The
  attribute is part of the directory's inode: the fsync of the directory that follows
  every durable commit makes it durable too, so it survives restarts and power loss.
  An attribute that is missing (a new directory, or one copied without its attributes)
  starts from the highest sequence found in the directory's manifests.
* **Derived from the manifests** where there are no user extended attributes (macOS,
  whose Python has no ``os.setxattr``; filesystems without them). The next number is one
  more than the highest sequence of the committed states, and the directory's ``flock``
  is then held from taking the number until the state is renamed into place, so two
  writers cannot take the same one. Each commit then reads the heads of the manifests
  (512 bytes each): O(number of states) per commit, the price of having nowhere else
  to keep the number.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from collections.abc import Iterator

from statekeep import _atomic, _fork, _manifest
from statekeep.errors import CorruptStateError, StorageError

__all__ = [
    "XATTR",
    "SequenceCounter",
    "carry_over",
    "catch_up",
    "highest_committed",
    "next_sequence",
]

logger = logging.getLogger("statekeep")

XATTR = "user.statekeep.sequence"
_HAS_XATTR = hasattr(os, "getxattr") and hasattr(os, "setxattr")
_UNSUPPORTED = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM})
_MAX_DIGITS = 19  # sequences stay below 2**63
_MAX_SEQUENCE = (1 << 63) - 1  # what a manifest accepts (statekeep._manifest)


class _NoXattr(Exception):
    """The directory's filesystem has no user extended attributes."""


def _get(fd: int) -> int | None:
    """The counter in the attribute of ``fd``; None when missing or not a number."""
    try:
        raw = os.getxattr(fd, XATTR)
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            return None
        if exc.errno in _UNSUPPORTED:
            raise _NoXattr from exc
        raise
    text = raw.strip()
    if not text.isdigit() or len(text) > _MAX_DIGITS:
        return None
    value = int(text)
    # Above what a manifest can hold, it is not a number statekeep wrote: start again
    # above the manifests, as for a missing attribute.
    return value if value <= _MAX_SEQUENCE else None


def _set(fd: int, value: int) -> None:
    try:
        os.setxattr(fd, XATTR, b"%d" % value)
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            raise _NoXattr from exc
        raise


def highest_committed(root: str) -> int:
    """The highest sequence among the sealed manifests of ``root``'s states (0 if none).

    The heads of the manifests (:func:`statekeep._manifest.read_order`) rank the states;
    the manifest at the top is then read whole and must match its seal, else the next
    one down is tried: a damaged or hostile head claiming a huge number must not push
    every later commit's number out of range (each would then fail to load).
    """
    heads: list[tuple[int, str]] = []
    with os.scandir(root) as it:
        for entry in it:
            if _atomic.is_private(entry.name) or not entry.is_dir(follow_symlinks=False):
                continue
            order = _manifest.read_order(entry.path)
            if order is not None:
                heads.append((order[1], entry.path))
    heads.sort(reverse=True)
    for head in heads:
        if head in _sealed:
            return head[0]
        try:
            sequence = _manifest.read_manifest(head[1]).sequence
        except (FileNotFoundError, CorruptStateError):
            continue
        if len(_sealed) >= 4096:
            _sealed.clear()
        _sealed[(sequence, head[1])] = None
        return sequence
    return 0


# (sequence, path) of manifests read whole and sealed: a committed manifest never
# changes, so where there are no attributes each commit reads one whole manifest only
# when the top of the directory changed, not every time.
_sealed: dict[tuple[int, str], None] = {}


def _checked(value: int, root: str) -> int:
    """``value`` if a manifest can hold it; else the directory's numbers are spent."""
    if value > _MAX_SEQUENCE:
        raise StorageError(
            errno.EOVERFLOW,
            f"the commit sequence of {root} is exhausted (a state there is numbered"
            f" {value - 1}); move its states to a new directory",
        )
    return value


class SequenceCounter:
    """The counter of one directory, the directory held open between commits.

    A ``flock`` belongs to the open file, which threads of one process share, so it is
    taken under a thread lock; a forked child forgets the parent's descriptor and lock
    (:func:`statekeep._fork.on_fork_child`) and opens its own.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._root = os.fspath(root)
        self._fd = -1
        self._id = (0, 0)  # (st_dev, st_ino) of the directory ``_fd`` holds open
        self._lock = _fork.new_lock()
        self._xattr = _HAS_XATTR  # False once the filesystem refuses attributes
        self._last = 0  # the highest number this object has seen or handed out
        _fork.on_fork_child(self._reset_in_child)

    def _reset_in_child(self) -> None:
        self._lock = _fork.new_lock()
        fd, self._fd = self._fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)  # the child's own copy: the parent's open file stays open

    def _open(self) -> int:
        """The directory's descriptor (the caller holds ``_lock``).

        A held descriptor is checked against what ``root`` names now: a directory that
        was moved away and replaced (a backup restored, a script rotating folders) must
        not keep receiving the numbers of the new one, or two writers of the new
        directory (one holding the old descriptor) would hand out the same number.
        """
        fd = self._fd
        if fd >= 0:
            try:
                now = os.stat(self._root)
            except OSError:
                return fd  # gone: the commit that follows says so
            if (now.st_dev, now.st_ino) == self._id:
                return fd
            self._fd = -1
            os.close(fd)
        fd = os.open(self._root, os.O_RDONLY | os.O_DIRECTORY)
        held = os.fstat(fd)
        self._fd, self._id = fd, (held.st_dev, held.st_ino)
        return fd

    def _bump_xattr(self, fd: int) -> int | None:
        """Increment the attribute (the caller holds the flock); None if unsupported."""
        try:
            current = _get(fd)
            if current is None:
                current = highest_committed(self._root)
            value = _checked(max(current, self._last) + 1, self._root)
            _set(fd, value)
        except _NoXattr:
            self._xattr = False
            return None
        self._last = value
        return value

    def _bump_scan(self) -> int:
        """The next number from the manifests (the caller holds the flock).

        The heads of all the manifests are read every time: a cache would need to know
        whether another writer committed since, and a directory's timestamps cannot
        say so reliably (coarse on some filesystems, and changed by our own work).
        """
        self._last = _checked(max(self._last, highest_committed(self._root)) + 1, self._root)
        return self._last

    @contextlib.contextmanager
    def take(self) -> Iterator[int]:
        """A new number, larger than every number committed in the directory before.

        Commit the state inside the ``with`` block: where the number comes from the
        manifests, the directory stays locked until the block ends, so no other writer
        can take the same number before the state that carries it is visible.
        """
        self._lock.acquire()
        try:
            fd = self._open()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                value = self._bump_xattr(fd) if self._xattr else None
            except BaseException:
                fcntl.flock(fd, fcntl.LOCK_UN)
                raise
            if value is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
        except BaseException:
            self._lock.release()
            raise
        if value is not None:
            self._lock.release()
            yield value
            return
        try:
            yield self._bump_scan()
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            self._lock.release()

    def next(self) -> int:
        """A new number, with nothing committed under it (tests and one-off callers)."""
        with self.take() as value:
            return value

    def raise_to(self, value: int) -> None:
        """Make every later number larger than ``value`` (an older store's counter)."""
        with self._lock:
            fd = self._open()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                self._last = max(self._last, value)
                if self._xattr:
                    current = _get(fd)
                    if current is None or current < value:
                        _set(fd, max(value, highest_committed(self._root)))
            except _NoXattr:
                self._xattr = False
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    @property
    def seen(self) -> int:
        """The highest number this counter has handed out or been shown."""
        return self._last

    def observe(self, highest: int) -> None:
        """Make every later number larger than ``highest``, the sequence of a state seen
        in the directory (from a manifest that was read whole and matched its seal).

        States copied into the directory by hand (resuming from a backup) carry numbers
        the attribute never handed out; without this, the next save would be numbered
        below them, ordered older than they are, and pruned at once. Costs nothing when
        ``highest`` is not above what this counter has seen. Never waits for the
        directory's lock, and a failure to raise the attribute (the lock is held, a
        read-only filesystem, a directory we may only read) is ignored: a reader must
        neither block nor fail for it.
        """
        if highest <= self._last:
            return
        if not self._xattr:  # each commit reads the manifests: nothing to store, no lock
            self._last = max(self._last, highest)  # (the lock is held through a commit)
            return
        with self._lock:
            self._last = max(self._last, highest)  # this counter's own saves go above
            try:
                fd = self._open()
                # A reader never waits: if a writer (or anyone) holds the directory's
                # lock, the attribute is raised by a later scan or keeper pass instead.
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                try:
                    current = _get(fd)
                    if current is not None and current < highest:
                        _set(fd, highest)
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            except _NoXattr:
                self._xattr = False
            except OSError as exc:
                logger.debug("statekeep: could not raise the counter of %s: %s", self._root, exc)

    def close(self) -> None:
        """Close the directory (the next call reopens it)."""
        with self._lock:
            fd, self._fd = self._fd, -1
            if fd >= 0:
                os.close(fd)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown, os may be gone
            self.close()


def next_sequence(root: str | os.PathLike[str]) -> int:
    """The next number of ``root``'s counter (the directory opened for this call only)."""
    counter = SequenceCounter(root)
    try:
        return counter.next()
    finally:
        counter.close()


def catch_up(root: str | os.PathLike[str], highest: int) -> None:
    """:meth:`SequenceCounter.observe` for a caller that holds no counter (the keeper).

    Reads the attribute without opening the directory; only when it is below
    ``highest`` is the directory opened, locked and the attribute raised.
    """
    if not _HAS_XATTR or highest <= 0:
        return
    try:
        raw = os.getxattr(root, XATTR).strip()
    except OSError:
        return  # missing (the next commit starts above the manifests) or unsupported
    if raw.isdigit() and len(raw) <= _MAX_DIGITS and int(raw) >= highest:
        return
    counter = SequenceCounter(root)
    try:
        counter.observe(highest)
    finally:
        counter.close()


def carry_over(root: str | os.PathLike[str], legacy_file: str | os.PathLike[str]) -> None:
    """Carry the counter of an older store's ``.statekeep/sequence`` file over to ``root``."""
    try:
        fd = os.open(legacy_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return
    try:
        raw = os.read(fd, 64).strip()
    except OSError:
        return
    finally:
        os.close(fd)
    if not raw.isdigit() or len(raw) > _MAX_DIGITS:
        return
    counter = SequenceCounter(root)
    try:
        counter.raise_to(int(raw))
    finally:
        counter.close()
