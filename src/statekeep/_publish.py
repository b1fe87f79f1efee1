"""Publishing committed states to a remote, and bringing them back.

Layout under the remote (all keys relative to it)::

    seq/<20-digit n>            one create-only marker per claimed commit sequence
    data/<name>/<token>/<path>  the state's files, uploaded first
    states/<name>               its manifest, uploaded LAST and create-only

``states/<name>`` holds a header line naming the upload's random token, then the
state's manifest exactly as committed locally (sealed by its own CRC-32). A state exists
remotely iff its manifest object does; the token keeps two machines publishing one name
from ever mixing their files: each uploads under its own token and only one manifest
wins. Restoring downloads each file in ranges, checks sizes and CRC-32s as the bytes
arrive, and commits through the same private work entry and no-replace rename as a
local save (:mod:`statekeep._atomic`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import io
import logging
import os
import secrets
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from statekeep import _atomic, _checksum, _fork, _manifest, _scan, _sequence
from statekeep._manifest import MANIFEST_NAME, Entry, Manifest
from statekeep._order import RetentionPolicy, StateInfo, plan_removals
from statekeep.errors import CorruptStateError, StateExistsError, StorageError
from statekeep.remote._base import Remote, check_key

__all__ = [
    "Publisher",
    "RemoteCounter",
    "RemoteState",
    "by_policy",
    "claim_sequence",
    "keep_latest",
    "prune_remote",
    "publish_state",
    "read_remote_states",
    "restore_state",
]

logger = logging.getLogger("statekeep")

STATES = "states/"
DATA = "data/"
SEQ = "seq/"
_HEAD = b"statekeep-remote 1 "
PART = 8 << 20  # ranged GETs of large files
WINDOW = 4  # parts of one file in flight
FILES_IN_FLIGHT = 8
GRACE = timedelta(hours=1)
MAX_MANIFEST = 64 << 20  # a manifest object larger than this is not read


def seq_key(n: int) -> str:
    return f"{SEQ}{n:020d}"


@dataclass(frozen=True)
class RemoteState:
    """A state published to a remote: its name, upload token and manifest."""

    name: str
    token: str
    manifest: Manifest
    raw: bytes  # the manifest's bytes, as committed locally

    @property
    def sequence(self) -> int:
        return self.manifest.sequence

    def data_prefix(self) -> str:
        return f"{DATA}{self.name}/{self.token}/"


def encode_manifest(token: str, raw: bytes) -> bytes:
    return b"%s%s\n%s" % (_HEAD, token.encode("ascii"), raw)


def decode_manifest(name: str, blob: bytes, where: str) -> RemoteState:
    """Parse a remote manifest object; :class:`CorruptStateError` naming ``where`` if bad."""
    head, sep, raw = blob.partition(b"\n")
    token = head[len(_HEAD) :].decode("ascii", "replace")
    if not sep or not head.startswith(_HEAD) or not token.isalnum():
        raise CorruptStateError(f"remote state {where} is malformed: no statekeep-remote header")
    manifest = _manifest.parse(raw, f"remote state {where}")
    for entry in manifest.entries:
        try:
            check_key(entry.path)
        except ValueError as exc:
            raise CorruptStateError(f"remote state {where} is malformed: {exc}") from None
        if entry.path.split("/", 1)[0] == MANIFEST_NAME:
            raise CorruptStateError(f"remote state {where} is malformed: it lists its manifest")
    return RemoteState(name, token, manifest, raw)


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
        if len(files) == 1:
            uploaded.append(_upload_file(remote, state, prefix, files[0]))
        elif files:
            with ThreadPoolExecutor(min(len(files), FILES_IN_FLIGHT), "statekeep-publish") as pool:
                futures = [pool.submit(_upload_file, remote, state, prefix, e) for e in files]
                errors: list[BaseException] = []
                for fut in futures:
                    try:
                        uploaded.append(fut.result())
                    except BaseException as exc:
                        errors.append(exc)
                if errors:
                    raise errors[0]
        blob = encode_manifest(token, raw)
        remote.put_if_absent(f"{STATES}{name}", io.BytesIO(blob), len(blob))
    except BaseException:
        try:
            remote.delete(uploaded)
        except Exception as exc:  # the keeper reclaims it after the grace period
            logger.warning("statekeep: could not delete unpublished files of %s: %s", name, exc)
        raise
    return rs


def read_remote_states(
    remote: Remote, cache: dict[str, tuple[datetime, int, RemoteState]] | None = None
) -> tuple[list[RemoteState], list[tuple[str, CorruptStateError]]]:
    """Every state on ``remote`` (by sequence, oldest first) and those whose manifest is bad.

    ``cache`` (name -> (modified, size, state)) saves a GET per manifest already seen.
    """
    good: list[RemoteState] = []
    bad: list[tuple[str, CorruptStateError]] = []
    seen: set[str] = set()
    for obj in remote.list(STATES):
        name = obj.key[len(STATES) :]
        if "/" in name:
            continue  # not written by statekeep
        seen.add(name)
        hit = cache.get(name) if cache is not None else None
        if hit is not None and hit[0] == obj.modified and hit[1] == obj.size:
            good.append(hit[2])
            continue
        try:
            if obj.size > MAX_MANIFEST:
                raise CorruptStateError(
                    f"remote state {remote!r}/{obj.key} is malformed: its manifest is"
                    f" {obj.size} bytes (at most {MAX_MANIFEST})"
                )
            rs = decode_manifest(name, remote.get(obj.key), f"{remote!r}/{obj.key}")
        except FileNotFoundError:
            continue  # pruned while we looked
        except CorruptStateError as exc:
            bad.append((name, exc))
            continue
        if cache is not None:
            cache[name] = (obj.modified, obj.size, rs)
        good.append(rs)
    if cache is not None:
        for name in list(cache):
            if name not in seen:
                del cache[name]
    good.sort(key=lambda s: (s.sequence, s.name))
    return good, bad


def _download_file(remote: Remote, key: str, path: str, entry: Entry, durable: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        crc = 0
        got = 0
        if entry.size <= PART:
            data = remote.get(key, length=entry.size + 1)  # one byte more shows a longer object
            crc = zlib.crc32(data)
            got = len(data)
            if got <= entry.size:
                _atomic.write_all(fd, [data])
        else:
            with ThreadPoolExecutor(WINDOW, "statekeep-restore") as pool:
                pending: deque[Future[bytes]] = deque()
                starts = iter(range(0, entry.size + 1, PART))
                for start in starts:
                    pending.append(pool.submit(remote.get, key, start=start, length=PART))
                    if len(pending) >= WINDOW:
                        break
                while pending:
                    data = pending.popleft().result()
                    crc = zlib.crc32(data, crc)
                    got += len(data)
                    if got <= entry.size:
                        _atomic.write_all(fd, [data])
                    nxt = next(starts, None) if len(data) == PART else None
                    if nxt is not None:  # a short part is the end: ask for nothing past it
                        pending.append(pool.submit(remote.get, key, start=nxt, length=PART))
        if got != entry.size:
            more = "more" if got > entry.size else f"{got}"
            raise CorruptStateError(
                f"remote object {key} failed verification: it is {more} bytes,"
                f" manifest says {entry.size}"
            )
        if crc != entry.crc32:
            raise CorruptStateError(
                f"remote object {key} failed verification: CRC-32 {crc:08x},"
                f" manifest says {entry.crc32:08x}"
            )
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def restore_state(
    remote: Remote, rs: RemoteState, states_dir: str | Path, *, durable: bool
) -> Path:
    """Download ``rs`` into ``states_dir`` as a committed state, verified on the way in.

    Built in a private work entry and renamed into place (never over an existing state),
    exactly as a local save; a crash leaves nothing visible.

    Raises:
        CorruptStateError: a file is missing, of the wrong size or CRC-32 on the remote.
        StateExistsError: a state of that name appeared locally meanwhile.
        StorageError: the remote failed.
    """
    root = os.fspath(states_dir)
    final = f"{root}/{rs.name}"
    work, _ = _atomic.new_work(root, is_dir=True, durable=durable)
    try:
        prefix = rs.data_prefix()
        files: list[Entry] = []
        for entry in rs.manifest.entries:  # parents come before their children
            if entry.is_dir:
                try:
                    os.mkdir(f"{work.spath}/{entry.path}")
                except OSError as exc:
                    raise CorruptStateError(
                        f"remote state {rs.name}: cannot create {entry.path}: {exc}"
                    ) from None
            else:
                files.append(entry)
        with ThreadPoolExecutor(max(min(len(files), FILES_IN_FLIGHT), 1), "statekeep-pull") as pool:
            futures = [
                pool.submit(
                    _download_file, remote, prefix + e.path, f"{work.spath}/{e.path}", e, durable
                )
                for e in files
            ]
            errors: list[BaseException] = []
            for fut in futures:
                try:
                    fut.result()
                except BaseException as exc:
                    errors.append(exc)
        if errors:
            first = errors[0]
            if isinstance(first, FileNotFoundError):
                raise CorruptStateError(
                    f"remote state {rs.name} failed verification: {first}"
                ) from first
            if isinstance(first, OSError) and not isinstance(first, StorageError):
                raise CorruptStateError(
                    f"remote state {rs.name}: cannot restore a file: {first}"
                ) from first
            raise first
        fd = os.open(f"{work.spath}/{MANIFEST_NAME}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _atomic.write_all(fd, [rs.raw])
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        if durable:
            for entry in rs.manifest.entries:
                if entry.is_dir:
                    _atomic.fsync_dir(f"{work.spath}/{entry.path}")
            os.fsync(work.fd)
        _atomic.rename_noreplace(work.spath, final)
    except BaseException:
        work.discard()
        raise
    work.release()
    if durable:
        _atomic.fsync_dir(root)
    return Path(final)


def verify_listing(remote: Remote, rs: RemoteState) -> bool:
    """Whether every file of ``rs`` is on the remote with its size (one LIST, no download)."""
    prefix = rs.data_prefix()
    sizes = {o.key[len(prefix) :]: o.size for o in remote.list(prefix)}
    return all(e.is_dir or sizes.get(e.path) == e.size for e in rs.manifest.entries)


def claim_sequence(remote: Remote, start: int) -> int:
    """Claim the next commit sequence >= ``start`` above every number claimed on ``remote``.

    One LIST (markers from ``start`` up: the keeper leaves few) and one create-only PUT;
    a lost race moves on to the next number.

    Raises:
        StorageError: the remote failed.
    """
    n = max(start, 1)
    for _ in range(1000):
        for obj in remote.list(SEQ, start_after=seq_key(n - 1)):
            tail = obj.key[len(SEQ) :]
            if tail.isdigit():
                n = max(n, int(tail) + 1)
        try:
            remote.put_if_absent(seq_key(n), io.BytesIO(b""), 0)
        except StateExistsError:
            n += 1
            continue
        return n
    raise StorageError(f"could not claim a commit sequence on {remote!r} in 1000 tries")


class RemoteCounter(_sequence.SequenceCounter):
    """The store's sequence counter, with each number claimed on the remote.

    The number is above every local one and every one claimed on the remote, so
    sequences compare across machines. If the remote cannot be reached the number is
    still above every local one (the publish that follows then fails and says so).
    """

    def __init__(self, root: str, remote: Remote) -> None:
        super().__init__(root)
        self._remote = remote
        self._floor = -1

    @contextlib.contextmanager
    def take(self) -> Iterator[int]:
        with super().take() as local:
            if self._floor < 0:
                self._floor = _sequence.highest_committed(self._root)
            start = max(local, self._floor + 1)
            try:
                n = claim_sequence(self._remote, start)
            except StorageError as exc:
                logger.warning("statekeep: could not claim a sequence on %r: %s", self._remote, exc)
                n = start
            self._floor = n
            yield n
        if n > local:
            self.raise_to(n)  # the local counter never hands out a number below it again


class Publisher:
    """What a :class:`~statekeep.StateStore` does with its remote: publish, list, pull."""

    def __init__(self, remote: Remote, states_dir: str | Path, *, durable: bool) -> None:
        self.remote = remote
        self.root = os.fspath(states_dir)
        self.durable = durable
        self._cache: dict[str, tuple[datetime, int, RemoteState]] = {}
        self._failed: set[str] = set()
        self._checked = False  # whether this process has looked for unpublished states
        self._lock = _fork.new_lock()
        _fork.on_fork_child(self._after_fork)

    def _after_fork(self) -> None:
        self._lock = _fork.new_lock()

    def counter(self) -> RemoteCounter:
        return RemoteCounter(self.root, self.remote)

    def states(self) -> list[RemoteState]:
        """Remote states by sequence, oldest first; damaged manifests are logged."""
        with self._lock:
            cache = dict(self._cache)
        good, bad = read_remote_states(self.remote, cache)
        with self._lock:
            self._cache = cache
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

        A remote state whose name is taken locally by something that is not a listed
        state (a damaged one) is left out, as :meth:`pull_newest` leaves it alone.
        """
        infos = {info.path.name: info for info in local}
        for rs in self.states():
            info = infos.get(rs.name)
            if info is not None:
                infos[rs.name] = dataclasses.replace(info, location="both")
            elif not os.path.lexists(f"{self.root}/{rs.name}"):
                info = _scan.info_of(Path(self.root, rs.name), rs.manifest)
                infos[rs.name] = dataclasses.replace(info, location="remote")
        return sorted(infos.values(), key=lambda i: (i.sequence, i.path.name))

    def pull(self, rs: RemoteState) -> Path:
        """Bring ``rs`` into the states directory (see :func:`restore_state`)."""
        return restore_state(self.remote, rs, self.root, durable=self.durable)

    def pull_newest(self, newer_than: int) -> Path | None:
        """Pull the newest remote state above sequence ``newer_than`` that verifies.

        Each newer one that fails is skipped with a warning naming the object, as
        locally. Returns the local path of the state pulled, or None.

        Raises:
            StorageError: the remote failed (nothing was loaded or half-pulled).
        """
        for rs in reversed(self.states()):
            if rs.sequence <= newer_than:
                return None
            if os.path.lexists(f"{self.root}/{rs.name}"):
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


Chooser = Callable[[list[RemoteState], Callable[[RemoteState], bool]], Iterable[str]]


def keep_latest(max_keep: int) -> Chooser:
    """A chooser removing all but the newest ``max_keep`` (never the newest that verifies)."""

    def choose(states: list[RemoteState], verifies: Callable[[RemoteState], bool]) -> list[str]:
        if max_keep < 0:
            return []
        doomed = states[: max(len(states) - max_keep, 0)]
        if max_keep > 0:
            newest_good = next((rs for rs in reversed(states) if verifies(rs)), None)
            doomed = [rs for rs in doomed if rs is not newest_good]
        return [rs.name for rs in doomed]

    return choose


def by_policy(
    policy: RetentionPolicy | None, pattern: str, now: datetime, *, remove_all: bool = False
) -> Chooser:
    """A chooser applying the local keeper's rules (:func:`statekeep._order.plan_removals`)
    to the remote states whose names match ``pattern``."""

    def choose(states: list[RemoteState], verifies: Callable[[RemoteState], bool]) -> list[str]:
        states = [rs for rs in states if fnmatch.fnmatchcase(rs.name, pattern)]
        infos = [_scan.info_of(Path(rs.name), rs.manifest) for rs in states]
        by_name = {rs.name: rs for rs in states}
        paths = plan_removals(
            infos, policy, now, lambda i: verifies(by_name[i.path.name]), remove_all=remove_all
        )
        return [p.name for p in paths]

    return choose


def prune_remote(
    remote: Remote,
    max_keep: int = -1,
    *,
    choose: Chooser | None = None,
    grace: timedelta = GRACE,
    now: datetime | None = None,
) -> list[str]:
    """Remove old remote states; return the names removed, oldest first.

    ``choose`` (the keeper passes its retention rules) names the states to remove from
    all of them, oldest first, given a test of whether a state verifies (its files are
    all listed with their sizes: one LIST); by default all but the newest ``max_keep``
    go, never the newest that verifies. Each removal deletes the manifest first (the
    state is gone from that instant), then its files in batches. Files whose manifest
    never arrived (a killed publisher), damaged manifests, stale uploads and sequence
    markers below every kept state go once older than ``grace``.
    """
    now = now or datetime.now(timezone.utc)
    states, bad = read_remote_states(remote)
    checked: dict[str, bool] = {}

    def verifies(rs: RemoteState) -> bool:
        if rs.name not in checked:
            checked[rs.name] = verify_listing(remote, rs)
        return checked[rs.name]

    names = set((choose or keep_latest(max_keep))(states, verifies))
    doomed = [rs for rs in states if rs.name in names]
    removed: list[str] = []
    for rs in doomed:
        remote.delete([f"{STATES}{rs.name}"])
        remote.delete(o.key for o in remote.list(rs.data_prefix()))
        logger.info("statekeep: removed remote state %s", rs.name)
        removed.append(rs.name)
    old = now - grace
    bad_names = {name for name, _ in bad}
    if bad_names:
        for obj in remote.list(STATES):
            if obj.key[len(STATES) :] in bad_names and obj.modified < old:
                remote.delete([obj.key])
                logger.warning("statekeep: removed damaged remote manifest %s", obj.key)
    live = {(rs.name, rs.token) for rs in states if rs.name not in removed}
    orphans: dict[tuple[str, str], list[str]] = {}
    young: set[tuple[str, str]] = set()
    for obj in remote.list(DATA):
        parts = obj.key[len(DATA) :].split("/", 2)
        if len(parts) < 3:
            continue
        group = (parts[0], parts[1])
        if group in live:
            continue
        orphans.setdefault(group, []).append(obj.key)
        if obj.modified >= old:
            young.add(group)
    for group, keys in orphans.items():
        if group not in young and group not in live:
            remote.delete(keys)
            logger.info("statekeep: reclaimed unpublished files of %s", group[0])
    kept = [rs.sequence for rs in states if rs.name not in removed]
    markers = [o.key for o in remote.list(SEQ)]
    if markers:
        floor = min(kept) if kept else None
        drop = [
            k
            for k in markers[:-1]  # the highest marker stays: the counter never goes back
            if k[len(SEQ) :].isdigit() and (floor is None or int(k[len(SEQ) :]) < floor)
        ]
        remote.delete(drop)
    abort = getattr(remote, "abort_incomplete", None)
    if callable(abort):
        abort(grace)
    return removed
