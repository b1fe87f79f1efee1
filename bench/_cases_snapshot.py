"""Snapshot cases: StateStore save/load against inline minimal commits and raw I/O."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shutil
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from _harness import Case, timed

import statekeep
from statekeep import _checksum
from statekeep._manifest import MANIFEST_NAME

SMALL = [("model", os.urandom(1024)), ("optimizer", os.urandom(1024)), ("buffer", os.urandom(1024))]


class Blob(statekeep.PersistentStateMixin):
    """A component holding bytes; saves and loads them as one file (as a user would)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def save_state(self, path: Path) -> None:
        with open(path, "wb", buffering=0) as f:
            f.write(self.data)

    def load_state(self, path: Path) -> None:
        with open(path, "rb", buffering=0) as f:
            self.data = f.read()


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: str, data: bytes, *, sync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def minimal_commit(root: Path, name: str, blobs: list[tuple[str, bytes]], *, sync: bool) -> None:
    """The least code that commits a verified snapshot crash-safely.

    Temp dir, each file written from memory with its CRC-32 computed from memory, a
    manifest, every file fsynced, the dir fsynced, one rename, the parent fsynced.
    """
    tmp = root / f".tmp-{name}"
    os.mkdir(tmp)
    files = []
    for cname, data in blobs:
        write_file(f"{tmp}/{cname}", data, sync=sync)
        files.append({"path": cname, "size": len(data), "crc32": zlib.crc32(data)})
    write_file(f"{tmp}/{MANIFEST_NAME}", json.dumps({"files": files}).encode(), sync=sync)
    if sync:
        fsync_dir(tmp)
    os.rename(tmp, root / name)
    if sync:
        fsync_dir(root)


def minimal_commit_components(
    root: Path,
    name: str,
    components: list[tuple[str, Blob]],
    *,
    sync: bool,
    locked: bool = False,
    counter: int | None = None,
) -> None:
    """The least code that commits a verified snapshot crash-safely *through components*:
    each component writes its own file (as with statekeep, the bytes are not in hand),
    so each file is read back for its CRC-32 (and fsynced with ``sync``); then the
    manifest, the dir fsynced, one rename, the parent fsynced. With ``locked``, the
    build directory is also a locked work entry as statekeep's is (made as ``.pending``,
    flocked, renamed): what "a crashed save is reclaimed, a live one never" costs.

    With ``counter`` (a descriptor of ``root``, held open as a store holds it), it also
    does the two things statekeep's other promises need: the build directory is listed
    and every file found is checksummed (promise 3: whatever a component wrote, under
    any name, is in the manifest), and the manifest carries the next number of a
    commit counter kept in ``root``'s xattr under an ``flock`` (promise 6: commit order
    across processes)."""
    tmp = root / f".tmp-{name}"
    if locked:  # a work entry a sweeper can tell from a live one: locked before named
        os.mkdir(f"{tmp}.pending")
        lock = os.open(f"{tmp}.pending", os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(f"{tmp}.pending", tmp)
    else:
        os.mkdir(tmp)
    files = []
    for cname, component in components:
        component.save_state(tmp / cname)
    names = [e.name for e in os.scandir(tmp)] if counter is not None else None
    for cname in names if names is not None else [c for c, _ in components]:
        fd = os.open(f"{tmp}/{cname}", os.O_RDONLY)
        try:
            data = os.read(fd, 1 << 16)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        files.append({"path": cname, "size": len(data), "crc32": zlib.crc32(data)})
    head: dict[str, object] = {}
    if counter is not None:
        fcntl.flock(counter, fcntl.LOCK_EX)
        try:
            try:
                number = int(os.getxattr(counter, "user.bench.sequence")) + 1
            except OSError:
                number = 1
            with contextlib.suppress(OSError):  # no user xattrs here (statekeep then scans)
                os.setxattr(counter, "user.bench.sequence", b"%d" % number)
        finally:
            fcntl.flock(counter, fcntl.LOCK_UN)
        head = {"sequence": number}
    write_file(f"{tmp}/{MANIFEST_NAME}", json.dumps({**head, "files": files}).encode(), sync=sync)
    if sync:
        fsync_dir(tmp)
    os.rename(tmp, root / name)
    if locked:
        os.close(lock)
    if sync:
        fsync_dir(root)


def in_place(root: Path, name: str, blobs: list[tuple[str, bytes]]) -> None:
    """What pamiq-core's StateStore does: mkdir, then each component writes its file."""
    state = root / name
    state.mkdir()
    for cname, data in blobs:
        with open(state / cname, "wb", buffering=0) as f:
            f.write(data)


def read_raw(directory: Path, names: list[str]) -> None:
    for cname in names:
        with open(directory / cname, "rb", buffering=0) as f:
            f.read()


def verified_read(directory: Path, names: list[str]) -> None:
    """The least code that verifies then loads, held against a keeper's removal while it
    reads (as load_state is): a shared flock on the directory, checked to still be the
    one named; parse the manifest, read and CRC each file, compare, then read each file
    again as the component would."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        if os.stat(directory, follow_symlinks=False).st_ino != os.fstat(fd).st_ino:
            raise ValueError(directory)
        with open(directory / MANIFEST_NAME, "rb", buffering=0) as f:
            expected = {e["path"]: e for e in json.loads(f.read())["files"]}
        for cname in names:
            with open(directory / cname, "rb", buffering=0) as f:
                data = f.read()
            entry = expected[cname]
            if len(data) != entry["size"] or zlib.crc32(data) != entry["crc32"]:
                raise ValueError(cname)
        read_raw(directory, names)
    finally:
        os.close(fd)


def read_crc(path: Path) -> None:
    """Read a file once and CRC the bytes in memory (a verified read with one pass)."""
    with open(path, "rb", buffering=0) as f:
        zlib.crc32(f.read())


def crc_part(path: Path, start: int, end: int, out: list[int], i: int) -> None:
    """CRC-32 of ``path``'s bytes ``start:end``, read through a descriptor of its own."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_SEQUENTIAL)
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        crc, pos = 0, start
        while pos < end:
            got = os.preadv(fd, [view[: min(len(buf), end - pos)]], pos)
            crc = zlib.crc32(view[:got], crc)
            pos += got
        out[i] = crc
    finally:
        os.close(fd)


def crc_two_threads(path: Path, size: int) -> int:
    """The file's CRC-32 from two halves checksummed at once (one pass, both cores)."""
    half = size // 2
    out = [0, 0]
    other = threading.Thread(target=crc_part, args=(path, half, size, out, 1))
    other.start()
    crc_part(path, 0, half, out, 0)
    other.join()
    return _checksum.crc32_combine(out[0], out[1], size - half)


def verified_read_two_threads(path: Path, size: int, crc: int) -> None:
    """The least code that verifies a large file on both cores, then loads it."""
    if crc_two_threads(path, size) != crc:
        raise ValueError(path)
    read_raw(path.parent, [path.name])


def verified_read_one_thread(path: Path, size: int, crc: int) -> None:
    """The least code that verifies a large file (one sequential pass), then loads it."""
    out = [0]
    crc_part(path, 0, size, out, 0)
    if out[0] != crc:
        raise ValueError(path)
    read_raw(path.parent, [path.name])


def minimal_commit_large(root: Path, name: str, data: bytes) -> None:
    """The least code that commits one large component crash-safely and verifiably:
    the component's write, its CRC-32 (from memory, beside the fsync), the file
    fsynced, a manifest written and fsynced, the dir fsynced, one rename, the parent
    fsynced."""
    tmp = root / f".tmp-{name}"
    os.mkdir(tmp)
    fd = os.open(f"{tmp}/weights", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
        out = [0]
        crc = threading.Thread(target=lambda: out.__setitem__(0, zlib.crc32(data)))
        crc.start()
        os.fsync(fd)
        crc.join()
    finally:
        os.close(fd)
    manifest = json.dumps({"files": [{"path": "weights", "size": len(data), "crc32": out[0]}]})
    write_file(f"{tmp}/{MANIFEST_NAME}", manifest.encode(), sync=True)
    fsync_dir(tmp)
    os.rename(tmp, root / name)
    fsync_dir(root)


def clear_dir(path: Path) -> None:
    for entry in os.scandir(path):
        if entry.name != ".statekeep":
            shutil.rmtree(entry.path) if entry.is_dir() else os.unlink(entry.path)


def evict(path: Path) -> None:
    """Drop ``path``'s pages (or every file's below it) from the page cache."""
    paths = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _names() -> str:
    return f"{time.time_ns()}.state"


def small_cases(tmp: Path, repeat: int) -> list[Case]:
    """3 x 1 KB components: save (durable and not), load with verification."""
    cases: list[Case] = []
    for durable in (True, False):
        tag = "durable" if durable else "no fsync"
        sk_root = tmp / f"sk-{tag}"
        store = statekeep.StateStore(sk_root, durable=durable)
        for cname, data in SMALL:
            store.register(cname, Blob(data))
        base_root = tmp / f"min-{tag}"
        base_root.mkdir()

        def sk_save(store: statekeep.StateStore = store, root: Path = sk_root) -> float:
            t = timed(store.save_state, repeat)
            clear_dir(root)
            return t

        def min_save(root: Path = base_root, sync: bool = durable) -> float:
            t = timed(lambda: minimal_commit(root, _names(), SMALL, sync=sync), repeat)
            clear_dir(root)
            return t

        comp_root = tmp / f"minc-{tag}"
        comp_root.mkdir()
        blobs = [(cname, Blob(data)) for cname, data in SMALL]

        def min_save_comp(
            root: Path = comp_root, sync: bool = durable, blobs: list[tuple[str, Blob]] = blobs
        ) -> float:
            t = timed(lambda: minimal_commit_components(root, _names(), blobs, sync=sync), repeat)
            clear_dir(root)
            return t

        base_key = f"min_save_{'durable' if durable else 'nosync'}"
        cases.append(Case(base_key, f"minimal crash-safe commit ({tag})", min_save))
        if not durable:
            lock_root = tmp / "minl-nosync"
            lock_root.mkdir()

            def min_save_locked(
                root: Path = lock_root, blobs: list[tuple[str, Blob]] = blobs
            ) -> float:
                t = timed(
                    lambda: minimal_commit_components(
                        root, _names(), blobs, sync=False, locked=True
                    ),
                    repeat,
                )
                clear_dir(root)
                return t

            cases.append(
                Case(
                    "min_save_locked_nosync",
                    "minimal commit through the components + locked work entry (no fsync)",
                    min_save_locked,
                    baseline=base_key,
                )
            )
            full_root = tmp / "minp-nosync"
            full_root.mkdir()
            held = os.open(full_root, os.O_RDONLY | os.O_DIRECTORY)  # as a store holds it

            def min_save_promises(
                root: Path = full_root, blobs: list[tuple[str, Blob]] = blobs, held: int = held
            ) -> float:
                t = timed(
                    lambda: minimal_commit_components(
                        root, _names(), blobs, sync=False, locked=True, counter=held
                    ),
                    repeat,
                )
                clear_dir(root)
                return t

            cases.append(
                Case(
                    "min_save_promises_nosync",
                    "least commit keeping the promises: work entry, scan, counter (no fsync)",
                    min_save_promises,
                    baseline=base_key,
                    close=functools.partial(os.close, held),
                )
            )
        cases.append(
            Case(
                f"min_save_comp_{'durable' if durable else 'nosync'}",
                f"minimal commit through the components ({tag})",
                min_save_comp,
                baseline=base_key,
            )
        )
        cases.append(
            Case(
                f"sk_save_{'durable' if durable else 'nosync'}",
                f"StateStore.save_state 3x1 KB ({tag})",
                sk_save,
                baseline=base_key,
            )
        )

    pamiq_root = tmp / "inplace"
    pamiq_root.mkdir()

    def inplace_save() -> float:
        t = timed(lambda: in_place(pamiq_root, _names(), SMALL), repeat)
        clear_dir(pamiq_root)
        return t

    cases.append(
        Case("inplace_save", "in-place writes, mkdir + 3 files (pamiq-core style)", inplace_save)
    )

    load_root = tmp / "load"
    load_store = statekeep.StateStore(load_root, durable=False)
    for cname, data in SMALL:
        load_store.register(cname, Blob(data))
    saved = load_store.save_state()
    names = [c for c, _ in SMALL]
    cases.append(
        Case(
            "raw_read_small",
            "raw read of the 3 files",
            lambda: timed(lambda: read_raw(saved, names), repeat),
        )
    )
    cases.append(
        Case(
            "min_verified_load",
            "minimal held verify-then-load (inline)",
            lambda: timed(lambda: verified_read(saved, names), repeat),
            baseline="raw_read_small",
        )
    )
    cases.append(
        Case(
            "sk_load_small",
            "StateStore.load_state 3x1 KB (verify=True)",
            lambda: timed(lambda: load_store.load_state(saved), repeat),
            baseline="raw_read_small",
        )
    )
    cases.append(
        Case(
            "sk_load_small_noverify",
            "StateStore.load_state 3x1 KB (verify=False)",
            lambda: timed(lambda: load_store.load_state(saved, verify=False), repeat),
            baseline="raw_read_small",
        )
    )
    return cases


def large_cases(tmp: Path, sizes: list[int]) -> list[Case]:
    """One big component: durable save vs raw write+fsync; cold load+verify vs raw read."""
    cases: list[Case] = []
    for size in sizes:
        mb = size >> 20
        data = os.urandom(1 << 20) * mb  # realistic enough; crc32 cost is content-blind
        root = tmp / f"large-{mb}"
        store = statekeep.StateStore(root, durable=True)
        store.register("weights", Blob(data))
        raw_path = tmp / f"raw-{mb}.bin"

        def sk_save(store: statekeep.StateStore = store, root: Path = root) -> float:
            t = timed(store.save_state, 1)
            clear_dir(root)
            return t

        def raw_write(path: Path = raw_path, data: bytes = data) -> float:
            t = timed(lambda: write_file(str(path), data, sync=True), 1)
            path.unlink()
            return t

        min_root = tmp / f"large-min-{mb}"
        min_root.mkdir()

        def min_save(root: Path = min_root, data: bytes = data) -> float:
            t = timed(lambda: minimal_commit_large(root, _names(), data), 1)
            clear_dir(root)
            return t

        cases.append(Case(f"raw_write_{mb}", f"raw write+fsync {mb} MB", raw_write, nbytes=size))
        cases.append(
            Case(
                f"min_save_{mb}",
                f"minimal crash-safe commit {mb} MB (inline)",
                min_save,
                baseline=f"raw_write_{mb}",
                nbytes=size,
            )
        )
        cases.append(
            Case(
                f"sk_save_{mb}",
                f"StateStore.save_state {mb} MB (durable)",
                sk_save,
                baseline=f"raw_write_{mb}",
                nbytes=size,
            )
        )

        load_root = tmp / f"large-load-{mb}"
        loader = statekeep.StateStore(load_root, durable=True)
        blob = Blob(data)
        loader.register("weights", blob)
        saved = loader.save_state()
        raw_copy = tmp / f"raw-read-{mb}.bin"
        write_file(str(raw_copy), data, sync=True)

        def sk_load(
            loader: statekeep.StateStore = loader, saved: Path = saved, blob: Blob = blob
        ) -> float:
            evict(saved)
            t = timed(lambda: loader.load_state(saved), 1)
            blob.data = b""
            return t

        def raw_read(path: Path = raw_copy) -> float:
            evict(path)
            return timed(lambda: read_raw(path.parent, [path.name]), 1)

        cases.append(
            Case(f"raw_read_{mb}", f"raw read {mb} MB (cold cache)", raw_read, nbytes=size)
        )

        def raw_read_crc(path: Path = raw_copy) -> float:
            evict(path)
            return timed(lambda: read_crc(path), 1)

        cases.append(
            Case(
                f"raw_crc_{mb}",
                f"raw read {mb} MB + crc32 in memory (cold)",
                raw_read_crc,
                baseline=f"raw_read_{mb}",
                nbytes=size,
            )
        )
        cases.append(
            Case(
                f"sk_load_{mb}",
                f"StateStore.load_state {mb} MB + verify (cold)",
                sk_load,
                baseline=f"raw_read_{mb}",
                nbytes=size,
            )
        )

        def sk_load_serial(load: Callable[[], float] = sk_load) -> float:
            saved_min = _checksum.PARALLEL_MIN
            _checksum.PARALLEL_MIN = 1 << 62  # one thread, one sequential pass
            try:
                return load()
            finally:
                _checksum.PARALLEL_MIN = saved_min

        cases.append(
            Case(
                f"sk_load_{mb}_serial",
                f"StateStore.load_state {mb} MB + verify, one thread (cold)",
                sk_load_serial,
                baseline=f"raw_read_{mb}",
                nbytes=size,
            )
        )
        crc = zlib.crc32(data)

        def min_load1(path: Path = raw_copy, size: int = size, crc: int = crc) -> float:
            evict(path)
            return timed(lambda: verified_read_one_thread(path, size, crc), 1)

        cases.append(
            Case(
                f"min_load1_{mb}",
                f"minimal verify-then-load {mb} MB, 1 thread (inline, cold)",
                min_load1,
                baseline=f"raw_read_{mb}",
                nbytes=size,
            )
        )

        def min_load2(path: Path = raw_copy, size: int = size, crc: int = crc) -> float:
            evict(path)
            return timed(lambda: verified_read_two_threads(path, size, crc), 1)

        cases.append(
            Case(
                f"min_load2_{mb}",
                f"minimal verify-then-load {mb} MB, 2 threads (inline, cold)",
                min_load2,
                baseline=f"raw_read_{mb}",
                nbytes=size,
            )
        )
    return cases
