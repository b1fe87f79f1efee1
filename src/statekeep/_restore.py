"""Bringing a remote state into a states directory: download, verify, commit.

Each file is downloaded in ranges, its size and CRC-32 checked as the bytes arrive, into
the same private work entry a local save builds in, and the whole is renamed into place
with a no-replace rename (:mod:`statekeep._atomic`): a crash leaves nothing visible.
"""

from __future__ import annotations

import os
import threading
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from statekeep import _atomic
from statekeep._manifest import MANIFEST_NAME, Entry
from statekeep._remote_states import RemoteState
from statekeep.errors import CorruptStateError, StorageError
from statekeep.remote._base import Remote

__all__ = ["FILES_IN_FLIGHT", "PART", "WINDOW", "restore_state"]

PART = 8 << 20  # ranged GETs of large files
WINDOW = 4  # parts of one file in flight
FILES_IN_FLIGHT = 8


class _Stopped(Exception):
    """Another file of the same restore failed, or the restoring thread was interrupted."""


def _download_file(
    remote: Remote, key: str, path: str, entry: Entry, durable: bool, stop: threading.Event
) -> None:
    """Download one file, checking its size and CRC-32 as the bytes arrive.

    Every GET is bounded: at most ``entry.size + 1`` bytes are asked for, a short part
    ends the file, and ``stop`` (set when the restore gives up, or its thread is
    interrupted) is checked before each request, so no worker outlives its restore.
    """
    if stop.is_set():
        raise _Stopped(key)
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
                    if stop.is_set():
                        raise _Stopped(key)
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
            _atomic.full_fsync(fd)
    finally:
        os.close(fd)


def restore_state(
    remote: Remote,
    rs: RemoteState,
    states_dir: str | Path,
    *,
    durable: bool,
    replacing: Callable[[str, str], bool] | None = None,
) -> Path:
    """Download ``rs`` into ``states_dir`` as a committed state, verified on the way in.

    Built in a private work entry and renamed into place (never over an existing state),
    exactly as a local save; a crash leaves nothing visible.

    ``replacing(work, final)``, called once the download has verified, deals with a
    damaged local copy of the same name at ``final``: it either swaps the work entry
    into its place in one step and returns True (the work entry then holds the damaged
    copy, removed here), or takes it out of the way and returns False (then the
    no-replace rename follows; a crash between the two leaves no local state of that
    name, and the remote copy still there).

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
        stop = threading.Event()
        errors: list[BaseException] = []
        with ThreadPoolExecutor(max(min(len(files), FILES_IN_FLIGHT), 1), "statekeep-pull") as pool:
            try:
                futures = [
                    pool.submit(
                        _download_file,
                        remote,
                        prefix + e.path,
                        f"{work.spath}/{e.path}",
                        e,
                        durable,
                        stop,
                    )
                    for e in files
                ]
                for fut in futures:
                    try:
                        fut.result()
                    except _Stopped:
                        pass
                    except Exception as exc:
                        errors.append(exc)
                        stop.set()  # the restore fails: the other files stop early
            finally:
                stop.set()  # also when this thread is interrupted: no worker runs on
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
        _atomic.create_file(f"{work.spath}/{MANIFEST_NAME}", [rs.raw], durable=durable)
        if durable:  # synced as a local commit syncs (F_FULLFSYNC on macOS)
            for entry in rs.manifest.entries:
                if entry.is_dir:
                    _atomic.fsync_dir(f"{work.spath}/{entry.path}")
            _atomic.full_fsync(work.fd)
        swapped = replacing is not None and replacing(work.spath, final)
        if not swapped:
            _atomic.rename_noreplace(work.spath, final)
    except BaseException:
        work.discard()
        raise
    if swapped:
        # The damaged copy, swapped out under the private name. Our lock now holds the
        # good copy at its final name: drop it first (loaders hold what they read), and
        # only then remove the damaged tree, under a trash name the sweep also reclaims.
        trash = _atomic.trash_name(root)
        try:
            os.rename(work.spath, trash)
        except OSError:
            work.discard()
        else:
            work.release()
            _atomic.remove_tree(trash)
    else:
        work.release()
    if durable:
        _atomic.fsync_dir(root)
    return Path(final)
