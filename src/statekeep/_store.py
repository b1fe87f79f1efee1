"""Snapshots of many objects: PersistentStateMixin, StateStore and StateInfo."""

from __future__ import annotations

import errno
import fnmatch
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from statekeep import _atomic, _commit, _manifest, _sequence
from statekeep.errors import CorruptStateError, StateExistsError

__all__ = ["PersistentStateMixin", "StateInfo", "StateStore"]

logger = logging.getLogger("statekeep")

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


@dataclass(frozen=True)
class StateInfo:
    """A committed snapshot: where it is, when it was committed (UTC), its payload size."""

    path: Path
    created_at: datetime
    size_bytes: int


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
    if name.startswith(_atomic.PRIVATE_DIR):
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


@dataclass(frozen=True)
class Scanned:
    """A directory of the store as seen by a scan: its manifest, or why it has none."""

    path: Path
    manifest: _manifest.Manifest | None
    problem: CorruptStateError | None
    mtime: float

    @property
    def order(self) -> tuple[float, int, str]:
        if self.manifest is not None:
            return (self.manifest.created_at.timestamp(), self.manifest.sequence, self.path.name)
        return (self.mtime, 0, self.path.name)


def scan_dirs(states_dir: Path, match: str | None = None) -> list[Scanned]:
    """Every directory of ``states_dir`` but the private one, oldest first."""
    found: list[Scanned] = []
    try:
        it = os.scandir(states_dir)
    except FileNotFoundError:
        return found
    with it:
        for entry in it:
            if _atomic.is_private(entry.name) or not entry.is_dir(follow_symlinks=False):
                continue
            if match is not None and not fnmatch.fnmatchcase(entry.name, match):
                continue
            path = Path(entry.path)
            manifest = problem = None
            try:
                manifest = _manifest.read_manifest(path)
            except CorruptStateError as exc:
                problem = exc
            except FileNotFoundError:
                continue  # removed while we looked
            mtime = 0.0  # only ordered by mtime when there is no manifest: stat only then
            if manifest is None:
                try:
                    mtime = entry.stat(follow_symlinks=False).st_mtime
                except FileNotFoundError:
                    continue
            found.append(Scanned(path, manifest, problem, mtime))
    found.sort(key=lambda s: s.order)
    return found


def newest_committed(root: str) -> Path | None:
    """The newest directory of ``root`` with a valid manifest (as :func:`scan_dirs` orders).

    Orders by the head of each manifest only (no full parse of every one), then reads
    the candidates' whole manifests newest first until one is valid: the answer is the
    same as the last of a full scan's states that have a manifest.
    """
    heads: list[tuple[float, int, str]] = []
    rest: list[str] = []  # manifests whose head is not laid out as statekeep writes it
    try:
        it = os.scandir(root)
    except FileNotFoundError:
        return None
    with it:
        for entry in it:
            if _atomic.is_private(entry.name) or not entry.is_dir(follow_symlinks=False):
                continue
            order = _manifest.read_order(entry.path)
            if order is None:
                rest.append(entry.name)
            else:
                heads.append((order[0], order[1], entry.name))
    for name in rest:  # rare: parse these fully to place them
        try:
            m = _manifest.read_manifest(f"{root}/{name}")
        except (CorruptStateError, FileNotFoundError):
            continue
        heads.append((m.created_at.timestamp(), m.sequence, name))
    heads.sort()
    for *_, name in reversed(heads):
        try:
            _manifest.read_manifest(f"{root}/{name}")
        except (CorruptStateError, FileNotFoundError):
            continue
        return Path(root, name)
    return None


class StateStore:
    """Saves registered components into timestamped, atomically committed directories.

    Args:
        states_dir: where states go; created (with parents) if missing.
        state_name_format: ``strftime`` format of a state's directory name (local time).
        durable: fsync every file and directory so a save survives power loss.
    """

    def __init__(
        self,
        states_dir: str | Path,
        state_name_format: str = "%Y-%m-%d_%H-%M-%S,%f.state",
        *,
        durable: bool = True,
    ) -> None:
        self.states_dir = Path(states_dir)
        self.state_name_format = state_name_format
        self.durable = durable
        self._states: dict[str, PersistentStateMixin] = {}
        self._lock = threading.Lock()
        self._root = str(self.states_dir)
        _atomic.make_root(self.states_dir, durable=durable)
        self._counter = _sequence.SequenceCounter(self._root)
        _atomic.sweep(self.states_dir)

    def register(self, name: str, state: PersistentStateMixin) -> None:
        """Add a component; it is saved at ``<state dir>/<name>``.

        Raises:
            KeyError: ``name`` is already registered.
            ValueError: ``name`` is not a plain file name.
        """
        check_name(name, "state name")
        with self._lock:
            if name in self._states:
                raise KeyError(f"state name {name!r} is already registered")
            self._states[name] = state

    def _components(self) -> Iterator[tuple[str, PersistentStateMixin]]:
        with self._lock:
            return iter(list(self._states.items()))

    def save_state(self) -> Path:
        """Save every component into a new state directory and return its path.

        The state is built privately and becomes visible in one rename, complete.

        Raises:
            StateExistsError: a state with the same name is already committed.
        """
        name = datetime.now().strftime(self.state_name_format)
        check_name(name, "state_name_format produced")
        final = f"{self._root}/{name}"  # str until the end: pathlib costs add up here
        if os.path.lexists(final):
            raise StateExistsError(errno.EEXIST, f"state {final} already exists", final)
        with _commit.BuildDir(self._root, durable=self.durable, counter=self._counter) as b:
            for component, state in self._components():
                state.save_state(b.path / component)
            b.commit(final)
        return self.states_dir / name

    def load_state(self, state_path: str | Path, *, verify: bool = True) -> None:
        """Restore every registered component from ``state_path``.

        Raises:
            FileNotFoundError: ``state_path`` does not exist.
            CorruptStateError: with ``verify``, the state does not match its manifest.
        """
        root = os.fspath(state_path)  # str for our own reads; Path only for components
        if verify:
            _manifest.verify(root)  # raises FileNotFoundError itself: no stat needed first
        elif not os.path.isdir(root):
            raise FileNotFoundError(f"state {root} does not exist")
        path = Path(root)
        for component, state in self._components():
            state.load_state(path / component)

    def list_states(self) -> list[StateInfo]:
        """Committed states (directories with a readable manifest), oldest first."""
        return [
            StateInfo(
                s.path,
                s.manifest.created_at.astimezone(timezone.utc),
                s.manifest.size_bytes,
            )
            for s in scan_dirs(self.states_dir)
            if s.manifest is not None
        ]

    def latest_state(self) -> Path | None:
        """The newest committed state, or None."""
        return newest_committed(self._root)

    def load_latest_state(self) -> Path | None:
        """Load the newest state that verifies; return its path, or None if none does.

        Each newer state that fails verification is skipped with a warning saying why.
        """
        for scanned in reversed(scan_dirs(self.states_dir)):
            try:
                if scanned.problem is not None:
                    raise scanned.problem
                self.load_state(scanned.path, verify=True)
            except CorruptStateError as exc:
                # The error names the state and the file; say what we do about it.
                logger.warning("statekeep: skipping state: %s; trying an older one", exc)
                continue
            except FileNotFoundError:
                continue  # pruned while we looked
            return scanned.path
        return None
