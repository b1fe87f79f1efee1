"""Publishing committed states to a remote, and what a store does with its remote.

A state's files go up first (in parallel), its manifest last with a create-only write:
a state exists remotely iff its manifest does (the layout is in
:mod:`statekeep._remote_states`). :class:`Publisher` is the store's side: publish after
each save (and what earlier saves left behind), list local and remote states together,
pull the newest remote state, replace a damaged local copy by its remote one.

Below it: :mod:`statekeep._remote_states` (layout, reading), :mod:`statekeep._restore`
(download, verify, commit), :mod:`statekeep._remote_seq` (the shared sequence). Pruning
is :mod:`statekeep._remote_prune`, used by the keeper.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import logging
import os
import secrets
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

from statekeep import _atomic, _checksum, _fork, _manifest, _scan
from statekeep._manifest import MANIFEST_NAME, Entry
from statekeep._order import StateInfo
from statekeep._remote_seq import RemoteCounter
from statekeep._remote_states import (
    STATES,
    RemoteState,
    decode_manifest,
    encode_manifest,
    read_remote_states,
)
from statekeep._restore import FILES_IN_FLIGHT, restore_state
from statekeep.errors import CorruptStateError, StateExistsError, StorageError
from statekeep.remote._base import Remote

# STATES, decode_manifest and read_remote_states are re-exported for the command line.
__all__ = [
    "STATES",
    "Publisher",
    "decode_manifest",
    "publish_state",
    "read_remote_states",
]

logger = logging.getLogger("statekeep")


class _CrcReader:
    """Reads a file for an upload, keeping the CRC-32 and count of what was read."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.crc = 0
        self.count = 0

    def read(self, size: int = -1, /) -> bytes:
        data = os.read(self.fd, size if size >= 0 else 1 << 30)
        self.crc = zlib.crc32(data, self.crc)
        self.count += len(data)
        return data


def _upload_file(remote: Remote, state: str, prefix: str, entry: Entry) -> str:
    key = prefix + entry.path
    fd = os.open(f"{state}/{entry.path}", os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        reader = _CrcReader(fd)
        remote.put_if_absent(key, reader, entry.size)
        extra = os.read(fd, 1)
    finally:
        os.close(fd)
    if reader.count != entry.size or reader.crc != entry.crc32 or extra:
        remote.delete([key])
        raise CorruptStateError(
            f"state {state} failed verification while publishing: {entry.path} no longer"
            " matches its manifest"
        )
    return key


def _upload_all(
    remote: Remote, state: str, prefix: str, files: list[Entry], uploaded: list[str]
) -> None:
    """Upload ``files`` in parallel, appending each key uploaded to ``uploaded``.

    The calling thread uploads the first file itself while a pool of at most
    ``FILES_IN_FLIGHT - 1`` threads uploads the rest: no thread at all for one file, one
    fewer to start for several. Every upload has ended when this returns or raises (the
    first error is raised; ``uploaded`` then names what must be deleted again).
    """
    if len(files) <= 1:
        uploaded.extend(_upload_file(remote, state, prefix, e) for e in files)
        return
    errors: list[BaseException] = []
    with ThreadPoolExecutor(min(len(files) - 1, FILES_IN_FLIGHT - 1), "statekeep-publish") as pool:
        futures = [pool.submit(_upload_file, remote, state, prefix, e) for e in files[1:]]
        try:
            uploaded.append(_upload_file(remote, state, prefix, files[0]))
        except BaseException as exc:
            errors.append(exc)
        for fut in futures:  # waits for every upload, so none is left running
            try:
                uploaded.append(fut.result())
            except BaseException as exc:
                errors.append(exc)
    if errors:
        raise errors[0]


def publish_state(remote: Remote, state_path: str | Path) -> RemoteState:
    """Publish the committed state at ``state_path``: its files, then its manifest.

    Raises:
        StateExistsError: a state of that name is already on the remote (the files this
            call uploaded are deleted again).
        CorruptStateError: the local state does not match its manifest (nothing published).
        StorageError: the remote failed; no manifest was written, so nothing is visible.
    """
    state = os.fspath(state_path)
    name = os.path.basename(state)
    raw = _checksum.read_all(f"{state}/{MANIFEST_NAME}")
    manifest = _manifest.parse(raw, f"state {state}: manifest")
    token = secrets.token_hex(8)
    rs = RemoteState(name, token, manifest, raw)
    prefix = rs.data_prefix()
    files = [e for e in manifest.entries if not e.is_dir]
    uploaded: list[str] = []
    try:
        _upload_all(remote, state, prefix, files, uploaded)
        blob = encode_manifest(token, raw)
        remote.put_if_absent(f"{STATES}{name}", io.BytesIO(blob), len(blob))
    except BaseException:
        try:
            remote.delete(uploaded)
        except Exception as exc:  # the keeper reclaims it after the grace period
            logger.warning("statekeep: could not delete unpublished files of %s: %s", name, exc)
        raise
    return rs


class Publisher:
    """What a :class:`~statekeep.StateStore` does with its remote: publish, list, pull."""

    def __init__(self, remote: Remote, states_dir: str | Path, *, durable: bool) -> None:
        self.remote = remote
        self.root = os.fspath(states_dir)
        self.durable = durable
        self._cache: dict[str, tuple[datetime, int, RemoteState]] = {}
        self._failed: set[str] = set()
        self._checked = False  # whether this process has looked for unpublished states
        self._down = False  # whether the remote's outage has been logged (once per outage)
        self._lock = _fork.new_lock()
        _fork.on_fork_child(self._after_fork)

    def _after_fork(self) -> None:
        self._lock = _fork.new_lock()

    def unreachable(self, exc: StorageError, doing: str) -> None:
        """Log, once per outage, that the remote could not be consulted (and why)."""
        with self._lock:
            first, self._down = not self._down, True
        if first:
            logger.warning(
                "statekeep: could not consult remote %r (%s); %s", self.remote, exc, doing
            )

    def counter(self) -> RemoteCounter:
        return RemoteCounter(self.root, self.remote)

    def states(self) -> list[RemoteState]:
        """Remote states by sequence, oldest first; damaged manifests are logged."""
        with self._lock:
            cache = dict(self._cache)
        good, bad = read_remote_states(self.remote, cache)
        with self._lock:
            self._cache = cache
            self._down = False
        for name, exc in bad:
            logger.warning("statekeep: skipping remote state %s: %s", name, exc)
        return good

    def publish(self, path: str | Path) -> None:
        """Publish what earlier saves left unpublished, then the committed state ``path``.

        Raises:
            StateExistsError: another writer already published a state of that name.
            StorageError: the remote failed; the message says the state is committed
                locally and that the next save publishes it.
        """
        path = os.fspath(path)
        name = os.path.basename(path)
        with self._lock:
            due = bool(self._failed) or not self._checked
        try:
            if due:  # older ones first: a crash or failure may have left some behind
                self.publish_pending(everything=False, skip=name)
            publish_state(self.remote, path)
        except StateExistsError as exc:
            raise StateExistsError(
                exc.errno,
                f"state {path} is committed locally, but a state named {name} was already"
                f" published to {self.remote!r} by another writer",
                path,
            ) from exc
        except StorageError as exc:
            with self._lock:
                self._failed.add(name)
            raise StorageError(
                exc.errno,
                f"state {path} is committed locally, but publishing it to {self.remote!r}"
                f" failed ({exc}); the next save publishes it",
            ) from exc
        with self._lock:
            self._failed.discard(name)

    def publish_pending(self, *, everything: bool = True, skip: str = "") -> list[Path]:
        """Publish local states missing on the remote; return those published.

        With ``everything=False`` only those newer than the remote's oldest state (an
        older one would be the first to go by any retention) and those whose publishing
        failed in this process.

        Raises:
            StorageError: the remote failed (what was published before stays published).
        """
        states = self.states()
        on_remote = {s.name for s in states}
        on_remote.update(o.key[len(STATES) :] for o in self.remote.list(STATES))
        floor = states[0].sequence if states and not everything else 0
        with self._lock:
            failed = set(self._failed)
        local: list[tuple[int, str]] = []
        with os.scandir(self.root) as it:
            for entry in it:
                if _atomic.is_private(entry.name) or entry.name in on_remote or entry.name == skip:
                    continue
                if not entry.is_dir(follow_symlinks=False):
                    continue
                order = _manifest.read_order(entry.path)
                if order is not None and (order[1] >= floor or entry.name in failed):
                    local.append((order[1], entry.name))
        published: list[Path] = []
        for _, name in sorted(local):
            try:
                publish_state(self.remote, f"{self.root}/{name}")
            except (StateExistsError, CorruptStateError, FileNotFoundError) as exc:
                logger.warning("statekeep: not publishing state %s: %s", name, exc)
            else:
                logger.info("statekeep: published pending state %s", name)
                published.append(Path(self.root, name))
            with self._lock:
                self._failed.discard(name)
        with self._lock:
            self._checked = True
        return published

    def listing(self, local: list[StateInfo]) -> list[StateInfo]:
        """``local`` (a store's states) merged with the remote's, by sequence, each
        saying where it lives; a remote-only state's path is where it would be pulled.

        A remote state whose local directory has a manifest that cannot be read (a
        damaged copy, which :meth:`pull_newest` replaces) is listed as ``remote``. A
        remote that cannot be reached gives ``local`` alone, with a warning (once).
        """
        try:
            remote_states = self.states()
        except StorageError as exc:
            self.unreachable(exc, "listing local states only")
            return local
        infos = {info.path.name: info for info in local}
        for rs in remote_states:
            info = infos.get(rs.name)
            if info is not None:
                infos[rs.name] = dataclasses.replace(info, location="both")
            elif not os.path.lexists(path := f"{self.root}/{rs.name}") or _damaged(path):
                info = _scan.info_of(Path(self.root, rs.name), rs.manifest)
                infos[rs.name] = dataclasses.replace(info, location="remote")
        return sorted(infos.values(), key=lambda i: (i.sequence, i.path.name))

    def repair(self, path: str, problem: BaseException) -> bool:
        """Replace the damaged local copy at ``path`` by its remote copy, if that verifies.

        The remote copy is downloaded and verified first; only then does it take the
        damaged directory's place (see :meth:`_swap_if_same`). Returns whether it did
        (or another loader's copy did); never raises for the remote (an outage or a
        damaged remote copy is logged and the damaged local copy is left as it was).
        """
        name = os.path.basename(path)
        try:
            rs = next((r for r in self.states() if r.name == name), None)
            if rs is None:
                return False
            before = os.lstat(path)
            self.pull(rs, replacing=lambda work, final: self._swap_if_same(work, final, before))
        except StorageError as exc:
            self.unreachable(exc, f"cannot replace the damaged local copy {path}")
            return False
        except StateExistsError:
            # Another loader put its copy in place meanwhile: ours is dropped; the caller
            # verifies theirs like any state.
            logger.info("statekeep: %s was replaced by another loader meanwhile", path)
            return True
        except (CorruptStateError, OSError) as exc:
            logger.warning(
                "statekeep: cannot replace damaged %s from %r: %s", path, self.remote, exc
            )
            return False
        logger.warning(
            "statekeep: local copy %s failed verification (%s); replaced it by its remote copy"
            " from %r",
            path,
            problem,
            self.remote,
        )
        return True

    def _swap_if_same(self, work: str, path: str, before: os.stat_result) -> bool:
        """Put the verified ``work`` in place of ``path`` if that is still the damaged
        directory seen (not a good copy another loader put there meanwhile: then that
        one stays and ours is dropped, by :class:`StateExistsError`).

        One atomic exchange where the kernel has it, so a concurrent reader sees the
        damaged copy or the good one, never neither; else the damaged one is discarded
        (:func:`statekeep._atomic.discard_committed`) and the caller renames ours in.
        """
        try:
            now = os.lstat(path)
        except FileNotFoundError:
            return False
        if (now.st_dev, now.st_ino) != (before.st_dev, before.st_ino):
            raise StateExistsError(errno.EEXIST, f"state {path} was replaced meanwhile", path)
        if _atomic._exchange(work, path):
            return True
        # The damaged copy fails every reader: one reading it must not hold up its repair.
        _atomic.discard_committed(Path(self.root), Path(path), readers=False)
        return False

    def pull(self, rs: RemoteState, replacing: Callable[[str, str], bool] | None = None) -> Path:
        """Bring ``rs`` into the states directory (see :func:`restore_state`)."""
        return restore_state(self.remote, rs, self.root, durable=self.durable, replacing=replacing)

    def pull_newest(self, newer_than: int) -> Path | None:
        """Pull the newest remote state above sequence ``newer_than`` that verifies.

        Each newer one that fails is skipped with a warning naming the object, as
        locally. A local directory of that name whose manifest cannot be read is
        replaced by the remote copy (see :meth:`repair`). Returns the local path of the
        state pulled, or None.

        Raises:
            StorageError: the remote failed (nothing was loaded or half-pulled).
        """
        for rs in reversed(self.states()):
            if rs.sequence <= newer_than:
                return None
            local = f"{self.root}/{rs.name}"
            if os.path.lexists(local):
                problem = _damaged(local)
                if problem is not None and self.repair(local, problem):
                    return Path(local)
                continue  # a local entry of that name: the local loader decides about it
            try:
                path = self.pull(rs)
            except CorruptStateError as exc:
                logger.warning("statekeep: skipping remote state: %s; trying an older one", exc)
                continue
            except StateExistsError:
                return Path(self.root, rs.name)  # another loader pulled it meanwhile
            logger.info("statekeep: restored state %s from %r", rs.name, self.remote)
            return path
        return None


def _damaged(path: str) -> CorruptStateError | None:
    """Why the local directory ``path`` has no readable manifest (None if it has one,
    or is not a directory: only a damaged state is replaced)."""
    if not os.path.isdir(path) or os.path.islink(path):
        return None
    try:
        _scan.read_manifest(path)
    except CorruptStateError as exc:
        return exc
    except FileNotFoundError:
        return None
    return None
