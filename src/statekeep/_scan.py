"""Scanning a states dir: what directories it holds, their order keys, their manifests.

Reads as little as it can: the head of each manifest orders a state (its sequence);
whole manifests are read only for the states a caller asks about. Nothing here follows a
symlink, opens a special file, or lets one unreadable state stop the others: such a
state is reported once per path in the log and skipped (or, for the keeper, counted as
not verifying).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import stat
import threading
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path

from statekeep import _atomic, _fork, _manifest
from statekeep._order import Entry, EntryKind, StateInfo
from statekeep.errors import CorruptStateError

__all__ = [
    "VerifiedCache",
    "components_key",
    "head_info",
    "info_of",
    "read_manifest",
    "recorded_components",
    "scan",
    "verified",
    "warn_once",
]

logger = logging.getLogger("statekeep")

# Metadata key under which the store records the names of the components it saved (so
# that a component which wrote nothing is not taken for a missing one). Never shown.
components_key = "statekeep:components"


def read_manifest(directory: str) -> _manifest.Manifest:
    """The whole manifest of ``directory``.

    Raises:
        FileNotFoundError: ``directory`` no longer exists.
        CorruptStateError: the manifest is missing, unreadable, special or malformed.
    """
    return _manifest.read_manifest(directory)


# The head of a manifest as this statekeep writes it (format version 3): the metadata is
# one line (JSON without newlines), before the list of files.
_HEAD_METADATA = re.compile(
    rb'\{\n "format": "statekeep\.state",\n "version": 3,\n "created_at": "[^"\\\n]*",\n'
    rb' "sequence": \d+,\n "metadata": (\{[^\n]*\}),\n "files": \['
)
_HEAD_BYTES = 1 << 16


def recorded_components(directory: str) -> list[str] | None:
    """The component names recorded in the head of ``directory``'s manifest, unverified.

    For ``load_state(verify=False)``: one bounded read of the manifest's head and a
    parse of its metadata line only, instead of the whole manifest. None whenever that
    does not give the names (no manifest, not a regular file, laid out otherwise, no
    record, metadata beyond the head): the caller reads the manifest whole. Never raises.
    """
    try:
        fd = os.open(f"{directory}/{_manifest.MANIFEST_NAME}", _HEAD_FLAGS)
    except (OSError, ValueError):
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None  # a FIFO or a device is never read
        head = os.read(fd, _HEAD_BYTES)
    except OSError:
        return None
    finally:
        os.close(fd)
    match = _HEAD_METADATA.match(head)
    if match is None:
        return None
    try:
        metadata = json.loads(match[1].decode("ascii"))  # str: no encoding sniffing
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    names = metadata.get(components_key) if isinstance(metadata, dict) else None
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        return names
    return None


_HEAD_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW


def _head(directory: str) -> tuple[float, int] | Exception | None:
    """(created, sequence) of a manifest whose head is not as statekeep writes it; None
    when there is no manifest; the error when it cannot be placed."""
    path = f"{directory}/{_manifest.MANIFEST_NAME}"
    try:
        os.lstat(path)
    except FileNotFoundError:
        return None if os.path.isdir(directory) else FileNotFoundError(directory)
    except OSError as exc:
        return CorruptStateError(f"state {directory}: manifest {path} cannot be read: {exc}")
    try:  # laid out otherwise, special or damaged: a whole parse places it, or says why not
        m = _manifest.read_manifest(directory)
    except (CorruptStateError, FileNotFoundError) as exc:
        return exc
    return m.created_at.timestamp(), m.sequence


def scan(
    states_dir: str | Path, match: str | None = None, gone: list[str] | None = None
) -> list[Entry]:
    """Every directory of ``states_dir`` (not private work, not a symlink), unordered.

    A directory whose manifest head gives a sequence is a :attr:`EntryKind.STATE`;
    any other (no manifest, unreadable, damaged head) is :attr:`EntryKind.UNSEQUENCED`
    with its mtime. Entries removed while we looked are left out, and appended to
    ``gone`` when it is given: a listing that lost one is no proof that nothing is
    there (its successor may have been renamed in just after the directory was read).
    """
    root = os.fspath(states_dir)
    found: list[Entry] = []
    try:
        it = os.scandir(root)
    except FileNotFoundError:
        return found
    with it:
        for d in it:
            if _atomic.is_private(d.name) or not d.is_dir(follow_symlinks=False):
                continue
            if match is not None and not fnmatch.fnmatchcase(d.name, match):
                continue
            order = _manifest.read_order(d.path)  # the common case: one open, one read
            if order is not None:
                found.append(Entry(d.path, EntryKind.STATE, order[1], order[0]))
                continue
            head = _head(d.path)
            if isinstance(head, FileNotFoundError):
                if gone is not None:
                    gone.append(d.path)
                continue  # removed while we looked
            if isinstance(head, tuple):
                found.append(Entry(d.path, EntryKind.STATE, head[1], head[0]))
                continue
            if isinstance(head, Exception):
                warn_once(d.path, head)
            try:
                mtime = d.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:
                if gone is not None:
                    gone.append(d.path)
                continue
            found.append(Entry(d.path, EntryKind.UNSEQUENCED, created=mtime))
    return found


def info_of(path: Path, manifest: _manifest.Manifest) -> StateInfo:
    """The listing of a state from its manifest (its private metadata keys left out)."""
    meta = dict(manifest.metadata)
    meta.pop(components_key, None)
    return StateInfo(
        path,
        manifest.created_at.astimezone(timezone.utc),
        manifest.size_bytes,
        manifest.sequence,
        meta,
    )


def head_info(entry: Entry) -> StateInfo:
    """How a directory whose manifest cannot be read whole appears to a retention policy."""
    when = datetime.fromtimestamp(entry.created, timezone.utc)
    return StateInfo(Path(entry.path), when, 0, entry.sequence)


_warned: OrderedDict[tuple[str, str], None] = OrderedDict()
_warned_lock = threading.Lock()


def warn_once(
    path: str | os.PathLike[str],
    problem: BaseException,
    template: str = "skipping %s: %s",
    level: int = logging.WARNING,
) -> None:
    """Log that ``path`` is skipped because of ``problem``, once per path and problem.

    ``template`` gets the path and the problem (``%s`` each, in that order).
    """
    key = (os.fspath(path), str(problem))
    with _warned_lock:
        if key in _warned:
            return
        _warned[key] = None
        if len(_warned) > 4096:
            _warned.popitem(last=False)
    logger.log(level, "statekeep: " + template, key[0], problem)


class VerifiedCache:
    """Which states verified, keyed by (path, sequence, manifest seal); bounded, shared.

    A committed state never changes in place, so once one has been read in full and
    matched its manifest, the same manifest at the same path needs no second reading.
    """

    def __init__(self, size: int = 65536) -> None:
        self._size = size
        self._results: OrderedDict[tuple[str, int, int], bool] = OrderedDict()
        self._lock = threading.Lock()
        _fork.on_fork_child(self._after_fork)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int, int]) -> bool | None:
        with self._lock:
            return self._results.get(key)

    def put(self, key: tuple[str, int, int], good: bool) -> None:
        with self._lock:
            self._results[key] = good
            self._results.move_to_end(key)
            if len(self._results) > self._size:
                self._results.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._results.clear()


_cache = VerifiedCache()


def verified(
    path: Path, sequence: int | None = None, seal: int | None = None, cache: VerifiedCache = _cache
) -> bool:
    """Whether the state at ``path`` verifies, reading its files only once per manifest.

    ``sequence`` and ``seal``, when the caller read them already, spare re-reading the
    manifest of a state known to verify. Logs (once) why a state does not verify. A
    state that vanished does not verify.
    """
    root = os.fspath(path)
    if sequence is not None and seal is not None:
        known = cache.get((root, sequence, seal))
        if known is not None:
            return known
    try:
        manifest = _manifest.verify(root)
    except FileNotFoundError:
        return False
    except CorruptStateError as exc:
        warn_once(root, exc)
        if seal is not None and sequence is not None and not isinstance(exc.__cause__, OSError):
            cache.put((root, sequence, seal), False)  # EIO or a permission may pass: ask again
        return False
    cache.put((root, manifest.sequence, manifest.seal), True)
    return True
