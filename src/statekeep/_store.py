"""Snapshots of many objects: PersistentStateMixin and StateStore."""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from statekeep import _atomic, _commit, _manifest, _publish, _scan, _sequence
from statekeep._order import Entry, EntryKind, StateInfo, oldest_first
from statekeep.errors import (
    CorruptStateError,
    MissingComponentsError,
    StateExistsError,
    StatekeepError,
    StorageError,
)
from statekeep.remote import Remote, open_remote

__all__ = ["PersistentStateMixin", "StateInfo", "StateStore", "verify_state"]

logger = logging.getLogger("statekeep")

_T = TypeVar("_T")

_NAME_MAX = 255  # bytes in one path component on every common filesystem


class PersistentStateMixin:
    """Something that can write its state under a path and read it back.

    Override both methods. ``path`` does not exist yet when :meth:`save_state` is
    called: write a file there, a directory there, or files beside it whose names
    start with ``path.name`` (``model.pt``, ``model.optim.pt``).
    """

    def save_state(self, path: Path) -> None:
        """Write this object's state at ``path``. The default writes nothing."""

    def load_state(self, path: Path) -> None:
        """Restore this object's state from ``path``. The default does nothing."""


def check_name(name: str, what: str = "name") -> None:
    """Reject a name that is not one plain path component.

    Raises:
        ValueError: ``name`` is empty, ``.``/``..``, holds ``/``, ``\\`` or NUL,
            starts with ``.statekeep`` (reserved for the store's own files), cannot be
            encoded for the filesystem, or is longer than a file name may be (255 bytes).
    """
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, not {type(name).__name__}")
    if name in ("", ".", ".."):
        raise ValueError(f"{what} {name!r} is not allowed: it must be a plain file name")
    for bad in ("/", "\\", "\0"):
        if bad in name:
            raise ValueError(f"{what} {name!r} is not allowed: it contains {bad!r}")
    if _atomic.is_private(name):
        raise ValueError(
            f"{what} {name!r} is not allowed: names starting with .statekeep are reserved"
        )
    try:
        size = len(os.fsencode(name))
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} {name!r} is not allowed: {exc.reason} in file names") from None
    if size > _NAME_MAX:
        raise ValueError(
            f"{what} {name[:40]!r}... is not allowed: it is {size} bytes, a file name may be"
            f" at most {_NAME_MAX}"
        )


class StateStore:
    """Saves registered components into timestamped, atomically committed directories.

    Args:
        states_dir: where states go; created (with parents) if missing.
        state_name_format: ``strftime`` format of a state's directory name (local time).
        durable: fsync every file and directory so a save survives power loss.
        remote: where each committed state is also published (``s3://bucket/prefix``,
            a path of a shared disk, or a :class:`statekeep.remote.Remote`); see
            "Snapshots on object storage" in the documentation.
    """

    def __init__(
        self,
        states_dir: str | Path,
        state_name_format: str = "%Y-%m-%d_%H-%M-%S,%f.state",
        *,
        durable: bool = True,
        remote: str | os.PathLike[str] | Remote | None = None,
    ) -> None:
        self.states_dir = Path(states_dir)
        self.state_name_format = state_name_format
        self.durable = durable
        self._states: dict[str, PersistentStateMixin] = {}
        self._lock = threading.Lock()
        self._root = str(self.states_dir)
        _atomic.make_root(self.states_dir, durable=durable)
        self._counter = _sequence.SequenceCounter(self._root)
        self._publisher: _publish.Publisher | None = None
        if remote is not None:
            self._publisher = _publish.Publisher(open_remote(remote), self._root, durable=durable)
            self._counter = self._publisher.counter()
        _atomic.sweep(self.states_dir)
        self._scan()  # a state copied in by hand may be numbered above the counter

    def register(self, name: str, state: PersistentStateMixin) -> None:
        """Add a component; it is saved at ``<state dir>/<name>``.

        Raises:
            KeyError: ``name`` is already registered.
            ValueError: ``name`` is not a plain file name, or it is another registered
                name plus a dot and more (``model`` and ``model.optim``): the files one
                writes beside its path could be the other's.
        """
        check_name(name, "state name")
        with self._lock:
            if name in self._states:
                raise KeyError(f"state name {name!r} is already registered")
            for other in self._states:
                if name.startswith(other + ".") or other.startswith(name + "."):
                    raise ValueError(
                        f"state name {name!r} clashes with registered {other!r}: a component"
                        " may write files beside its path named <name>.<anything>"
                    )
            self._states[name] = state

    def _components(self) -> Iterator[tuple[str, PersistentStateMixin]]:
        with self._lock:
            return iter(list(self._states.items()))

    def save_state(self, *, metadata: Mapping[str, Any] | None = None) -> Path:
        """Save every component into a new state directory and return its path.

        The state is built privately and becomes visible in one rename, complete.

        Args:
            metadata: JSON-ready values (a step, a loss) recorded in the manifest and
                shown by :meth:`list_states` and :func:`verify_state`.

        With a remote, the state is then published (files first, the manifest last)
        before this returns, after anything earlier saves left unpublished.

        Raises:
            StateExistsError: a state with the same name is already committed (or,
                with a remote, another machine already published that name).
            TypeError: ``metadata`` is not a mapping of str keys to JSON-ready values
                (checked before anything is written; the message names the key).
            StorageError: publishing failed; the state is committed locally, and the
                next save (or :meth:`publish_pending`) publishes it.
        """
        meta = _check_metadata(metadata)
        components = list(self._components())
        meta[_scan.components_key] = [c for c, _ in components]
        name = datetime.now().strftime(self.state_name_format)
        check_name(name, "state_name_format produced")
        final = f"{self._root}/{name}"  # str until the end: pathlib costs add up here
        if os.path.lexists(final):
            raise StateExistsError(errno.EEXIST, f"state {final} already exists", final)
        with _commit.BuildDir(self._root, durable=self.durable, counter=self._counter) as b:
            for component, state in components:
                state.save_state(b.path / component)
            manifest = b.commit(final, metadata=meta)
        logger.debug(
            "statekeep: saved state %s (sequence %d, %d bytes)",
            final,
            manifest.sequence,
            manifest.size_bytes,
        )
        if self._publisher is not None:
            self._publisher.publish(final)
        return self.states_dir / name

    def publish_pending(self) -> list[Path]:
        """Publish every local state the remote lacks, oldest first; return those published.

        Without a remote there is nothing to do. A name another machine already
        published is skipped with a warning.

        Raises:
            StorageError: the remote failed (what was published before stays).
        """
        if self._publisher is None:
            return []
        return self._publisher.publish_pending()

    def load_state(
        self, state_path: str | Path, *, verify: bool = True, allow_missing: bool = False
    ) -> None:
        """Restore every registered component from ``state_path``.

        Before any component is called, the state's manifest must name every registered
        component; ``allow_missing=True`` loads it anyway and skips the components it
        does not hold (a program that has gained a component loading an older state).
        A directory without a manifest (an older tool's, loaded with ``verify=False``)
        has nothing to check against: every component is called. While the components
        read, the state is held against removal (a keeper leaves it for a later pass).

        Raises:
            FileNotFoundError: ``state_path`` does not exist.
            CorruptStateError: with ``verify``, the state does not match its manifest, or
                it cannot be read (a permission, an I/O error, a special file).
            MissingComponentsError: the state lacks registered components (and not
                ``allow_missing``); no component was called.
        """
        root = os.fspath(state_path)  # str for our own reads; Path only for components
        # Held against removal while it is read: a keeper leaves it for a later pass.
        with _atomic.Pin(root):
            self._load(state_path, root, verify=verify, allow_missing=allow_missing)

    def _load(
        self, state_path: str | Path, root: str, *, verify: bool, allow_missing: bool
    ) -> None:
        recorded = None if verify else _scan.recorded_components(root)  # the cheap way
        manifest: _manifest.Manifest | None = None
        if verify:
            manifest = _manifest.verify(root)
        elif recorded is None:
            try:
                manifest = _scan.read_manifest(root)
            except CorruptStateError:
                if not os.path.isdir(root):
                    raise FileNotFoundError(f"state {root} does not exist") from None
                # an older tool's state: nothing to check the names against
        components = list(self._components())
        names = [c for c, _ in components]
        if recorded is not None:
            missing = [c for c in names if c not in recorded]
        else:
            missing = [] if manifest is None else _missing(manifest, names)
        if missing and not allow_missing:
            present = recorded if recorded is not None else _present(manifest)
            raise MissingComponentsError(
                f"state {root} lacks registered components {missing}; it holds {present}"
                " (load_state(..., allow_missing=True) loads it without them)",
                state=root,
                missing=missing,
                present=present,
            )
        path = state_path if isinstance(state_path, Path) else Path(root)  # no re-parse
        for component, state in components:
            if component not in missing:
                state.load_state(path / component)

    def _scan(self, gone: list[str] | None = None) -> list[Entry]:
        """The directory's entries, oldest first (those removed while we looked are
        appended to ``gone``, see :func:`statekeep._scan.scan`).

        States copied in by hand (a backup restored) carry numbers the directory's
        counter never handed out: the counter is shown the highest of them, so that the
        next save is still numbered above (else it would be ordered older, and pruned).
        Only a manifest read whole and matching its seal is believed, and only when its
        head shows a number above what the counter has seen (no extra read otherwise).
        """
        entries = oldest_first(_scan.scan(self._root, gone=gone))
        for entry in reversed(entries):
            if entry.kind is not EntryKind.STATE or entry.sequence <= self._counter.seen:
                break
            try:
                manifest = _scan.read_manifest(entry.path)
            except (FileNotFoundError, CorruptStateError):
                continue
            self._counter.observe(manifest.sequence)
            break
        return entries

    def _settled(self, pick: Callable[[list[Entry]], _T | None]) -> _T | None:
        """``pick`` applied to a scan; when it finds nothing, scan again until two
        listings agree.

        A listing taken while states are renamed in (saves) and out (a keeper) may miss
        both the state that went and the one that came (readdir promises nothing about
        entries changed under it), and a state listed may be gone before it is read:
        "nothing there" stands only when two listings in a row agree and neither lost an
        entry while it was read.
        """
        seen: list[str] | None = None
        for _ in range(_MAX_RESCANS):
            gone: list[str] = []
            entries = self._scan(gone)
            found = pick(entries)
            if found is not None:
                return found
            listing = [e.path for e in entries]
            if listing == seen and not gone:
                return None
            seen = None if gone else listing
        raise StatekeepError(
            f"states in {self._root} kept vanishing while listing ({_MAX_RESCANS} attempts)"
        )

    def list_states(self) -> list[StateInfo]:
        """Committed states (directories with a readable manifest), oldest first.

        Order is the order of commits (the sequence), whatever the clock said. A
        state whose manifest cannot be read is left out and logged once. Never empty
        while a committed state exists, even with a keeper pruning meanwhile. With a
        remote, its states are listed too; each says where it lives (``location``).
        If the remote cannot be reached, the local states are listed (``location``
        ``"local"``) and a warning says why, once per outage.
        """

        def infos(entries: list[Entry]) -> list[StateInfo] | None:
            found: list[StateInfo] = []
            for entry in entries:
                if entry.kind is not EntryKind.STATE:
                    continue
                try:
                    manifest = _scan.read_manifest(entry.path)
                except FileNotFoundError:
                    continue  # removed while we looked
                except CorruptStateError as exc:
                    _scan.warn_once(entry.path, exc)
                    continue
                found.append(_scan.info_of(Path(entry.path), manifest))
            return found or None

        local = self._settled(infos) or []
        if self._publisher is not None:
            return self._publisher.listing(local)
        return local

    def latest_state(self) -> Path | None:
        """The newest committed state (highest sequence with a readable manifest), or None.

        None only when no committed state exists: a state pruned while we looked makes
        the directory be listed again. With a remote, the newest of local and remote
        states (a remote-only state's path is where :meth:`load_latest_state` would
        bring it).
        """
        if self._publisher is not None:
            listing = self.list_states()
            return listing[-1].path if listing else None

        def newest(entries: list[Entry]) -> Path | None:
            for entry in reversed(entries):
                if entry.kind is not EntryKind.STATE:
                    break  # unsequenced entries are all ordered below the states
                try:
                    _scan.read_manifest(entry.path)
                except FileNotFoundError:
                    continue
                except CorruptStateError as exc:
                    _scan.warn_once(entry.path, exc)
                    continue
                return Path(entry.path)
            return None

        return self._settled(newest)

    def load_latest_state(self, *, allow_missing: bool = False) -> Path | None:
        """Load the newest state that verifies; return its path, or None if none does.

        Each newer state that fails verification is skipped with a warning saying why.
        If the state being loaded disappears (a keeper pruned it), the directory is
        scanned again and the whole load starts over on the newest state that still
        exists, so no component keeps part of a state that vanished.

        With a remote, a remote state newer than every local one is first brought into
        ``states_dir`` (verified on the way, through the same private path as a save):
        on an empty ``states_dir`` that is the newest remote state that verifies. A
        local state that fails verification is replaced by its remote copy when that
        one verifies (with a warning). A remote that cannot be reached does not stop
        the load: the newest local state that verifies is loaded, with a warning
        saying why the remote could not be consulted.

        Raises:
            MissingComponentsError: the newest state that verifies lacks registered
                components (never skipped silently; pass ``allow_missing=True``).
        """
        publisher = self._publisher
        if publisher is not None:
            try:
                publisher.pull_newest(_sequence.highest_committed(self._root))
            except StorageError as exc:
                publisher.unreachable(exc, "resuming from the newest local state that verifies")
                publisher = None  # not asked again in this load (each try may wait a timeout)
        bad: set[str] = set()
        repaired: set[str] = set()
        seen: list[str] | None = None
        for _ in range(_MAX_RESCANS):
            vanished = False
            gone: list[str] = []
            entries = self._scan(gone)
            for entry in reversed(entries):
                if entry.kind is not EntryKind.STATE:
                    break
                if entry.path in bad:
                    continue
                try:
                    self.load_state(entry.path, verify=True, allow_missing=allow_missing)
                except MissingComponentsError:
                    raise
                except CorruptStateError as exc:
                    if not os.path.isdir(entry.path):
                        vanished = True
                        break
                    if (
                        publisher is not None
                        and entry.path not in repaired
                        and publisher.repair(entry.path, exc)
                    ):
                        repaired.add(entry.path)
                        vanished = True  # the remote copy is in its place: load it
                        break
                    bad.add(entry.path)
                    # The error names the state and the file; say what we do about it, once.
                    _scan.warn_once(entry.path, exc, "skipping %s (%s); trying an older one")
                    continue
                except Exception:
                    if os.path.isdir(entry.path):
                        raise  # the component's own error, on a state that is still there
                    vanished = True
                    break
                if not os.path.isdir(entry.path):
                    vanished = True  # pruned under the components: load the whole again
                    break
                return Path(entry.path)
            if vanished:
                continue
            # A listing taken while states are renamed in and out may miss both the state
            # that went and the one that came (readdir promises nothing about entries
            # changed under it), and one that lost an entry while it was read proves
            # nothing: "nothing loadable" stands only when two listings in a row agree
            # and neither lost an entry.
            listing = [e.path for e in entries]
            if listing == seen and not gone:
                return None
            seen = None if gone else listing
        raise StatekeepError(
            f"states in {self._root} kept vanishing while loading ({_MAX_RESCANS} attempts)"
        )


_MAX_RESCANS = 10_000


def _recorded(manifest: _manifest.Manifest) -> list[str] | None:
    """The components the store recorded at save time (None for states saved before)."""
    names = manifest.metadata.get(_scan.components_key)
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        return names
    return None


def _present(manifest: _manifest.Manifest | None) -> list[str]:
    if manifest is None:
        return []
    recorded = _recorded(manifest)
    if recorded is not None:
        return recorded
    return sorted({e.path.split("/", 1)[0] for e in manifest.entries})


def _missing(manifest: _manifest.Manifest, registered: list[str]) -> list[str]:
    """Registered components the state does not hold (a component that wrote nothing is
    held if the store recorded it; before that, by the top-level names it wrote)."""
    recorded = _recorded(manifest)
    if recorded is not None:
        return [c for c in registered if c not in recorded]
    tops = {e.path.split("/", 1)[0] for e in manifest.entries}
    return [c for c in registered if not any(t == c or t.startswith(c + ".") for t in tops)]


def _check_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of ``metadata`` once it is known to encode as JSON (the key is reserved)."""
    checked = _manifest.check_metadata(metadata)
    if _scan.components_key in checked:
        raise ValueError(f"metadata key {_scan.components_key!r} is reserved for statekeep")
    return checked


def verify_state(path: str | Path) -> StateInfo:
    """Check a state against its manifest without loading it; return its listing.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CorruptStateError: any file differs from the manifest, or cannot be read.
    """
    root = os.fspath(path)
    return _scan.info_of(Path(root), _manifest.verify(root))
