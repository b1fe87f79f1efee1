"""Checkpoint cases: every backend against inline minimal code and the key-value peers."""

from __future__ import annotations

import copy
import ctypes
import gzip
import json
import os
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from _harness import Case, timed
from _peers import import_peer

import statekeep
import statekeep.storage

Memory = getattr(statekeep, "MemoryCheckpointStorage", statekeep.storage.MemoryCheckpointStorage)

ONDINE_SKIP = (
    "ondine 2.1.1 skipped: `import ondine.adapters.checkpoint_storage` failed (the `bench`"
    " dependency group installs it with pandas, polars, litellm … ; outside `nox -s bench`"
    " it may be missing). Compared instead with an inline ondine-style save (json.dumps +"
    " gzip level 1 to the final path, no fsync, no rename)"
)


def payload(size: int) -> dict[str, Any]:
    """A checkpoint-like dict whose JSON is about ``size`` bytes."""
    rows = [{"row": i, "text": f"value {i:06d} " + "x" * 40} for i in range(max(size // 72, 1))]
    return {"session_id": str(uuid.uuid4()), "last_processed_row": len(rows), "rows": rows}


def atomic_replace(root: Path, name: str, data: bytes, *, sync: bool) -> None:
    """The least code that replaces a file atomically (and durably with ``sync``)."""
    tmp = f"{root}/.{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, f"{root}/{name}")
    if sync:
        dfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


_libc = ctypes.CDLL(None, use_errno=True)
_RENAME_EXCHANGE = 2  # linux/fs.h


def exchange_replace(root: Path, name: str, data: bytes) -> None:
    """An atomic replace without fsync that ext4 does not flush: write a temp file,
    swap it with the old one (``renameat2(RENAME_EXCHANGE)``), unlink the old. A rename
    over an existing file (or a truncate) makes ext4 (``auto_da_alloc``) write the new
    data out at once; an exchange does not. Same promise without ``durable``: atomic,
    survives a process crash."""
    tmp = f"{root}/.{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    final = f"{root}/{name}"
    if _libc.renameat2(-100, tmp.encode(), -100, final.encode(), _RENAME_EXCHANGE) == 0:
        os.unlink(tmp)
    else:  # no old file yet (or no renameat2): a plain rename has nothing to flush
        os.rename(tmp, final)


def ondine_style_save(root: Path, session: str, data: dict[str, Any]) -> None:
    body = {
        "version": "1.0",
        "session_id": session,
        "timestamp": datetime.now().isoformat(),
        "data": data,
    }
    with gzip.open(root / f"checkpoint_{session}.json.gz", "wb", compresslevel=1) as f:
        f.write(json.dumps(body, default=str).encode())


def checkpoint_cases(tmp: Path, sizes: dict[str, int], repeat: int) -> tuple[list[Case], list[str]]:
    cases: list[Case] = []
    skipped: list[str] = []
    closers: list[Any] = []
    sid = str(uuid.uuid4())
    ondine_mod, why = import_peer("ondine.adapters.checkpoint_storage")
    if ondine_mod is None:
        skipped.append(f"{ONDINE_SKIP} [{why}]")
    has = {
        name: hasattr(statekeep, name)
        for name in ("FileCheckpointStorage", "SQLiteCheckpointStorage")
    }
    skipped += [f"{name}: not in statekeep yet" for name, ok in has.items() if not ok]
    dc_mod, dc_why = import_peer("diskcache")
    sd_mod, sd_why = import_peer("sqlitedict")
    if dc_mod is None:
        skipped.append(f"diskcache: {dc_why}")
    if sd_mod is None:
        skipped.append(f"sqlitedict: {sd_why}")

    def one(tag: str, size: int) -> None:  # a function, so each size's closures bind its own data
        data = payload(size)
        encoded = json.dumps(data).encode()
        rep = repeat if size < 100_000 else max(repeat // 10, 1)
        base = tmp / f"ckpt-{tag}"
        base.mkdir()

        def t(op: Any, rep: int = rep) -> Any:
            return lambda: timed(op, rep)

        for sync in (True, False):
            what = "durable" if sync else "no fsync"
            key = f"replace_{tag}_{'durable' if sync else 'nosync'}"
            cases.append(
                Case(
                    key,
                    f"json.dumps + minimal atomic replace {tag} ({what})",
                    t(
                        lambda d=base, s=sync: atomic_replace(
                            d, "c.json", json.dumps(data).encode(), sync=s
                        )
                    ),
                )
            )
        cases.append(
            Case(
                f"exchange_{tag}_nosync",
                f"json.dumps + atomic replace by exchange {tag} (no fsync)",
                t(lambda d=base: exchange_replace(d, "x.json", json.dumps(data).encode())),
                baseline=f"replace_{tag}_nosync",
            )
        )
        cases.append(
            Case(
                f"ondine_style_{tag}",
                f"ondine-style gzip JSON write {tag} (inline)",
                t(lambda: ondine_style_save(base, sid, data)),
            )
        )
        if ondine_mod is not None:
            ond = ondine_mod.LocalFileCheckpointStorage(base / "ondine")  # type: ignore[attr-defined]
            cases.append(
                Case(
                    f"ondine_save_{tag}",
                    f"ondine LocalFileCheckpointStorage.save {tag}",
                    t(lambda o=ond: o.save(uuid.UUID(sid), data)),
                )
            )
        if has["FileCheckpointStorage"]:
            for durable in (True, False):
                what = "durable" if durable else "no fsync"
                dkey = "durable" if durable else "nosync"
                fs = statekeep.FileCheckpointStorage(base / f"file-{dkey}", durable=durable)
                closers.append(fs)
                fs.save(sid, data)
                cases.append(
                    Case(
                        f"file_save_{tag}_{dkey}",
                        f"FileCheckpointStorage.save {tag} ({what})",
                        t(lambda fs=fs: fs.save(sid, data)),
                        baseline=f"replace_{tag}_{dkey}",
                    )
                )
            cases.append(
                Case(
                    f"file_load_{tag}",
                    f"FileCheckpointStorage.load {tag}",
                    t(lambda fs=fs: fs.load(sid)),
                    baseline=f"raw_load_{tag}",
                )
            )
        raw_file = base / "raw.json"
        raw_file.write_bytes(encoded)
        cases.append(
            Case(
                f"raw_load_{tag}",
                f"raw read + json.loads {tag}",
                t(lambda: json.loads(raw_file.read_bytes())),
            )
        )
        if has["SQLiteCheckpointStorage"]:
            sq = statekeep.SQLiteCheckpointStorage(base / "ckpt.sqlite")
            closers.append(sq)
            sq.save(sid, data)
            cases.append(
                Case(
                    f"sqlite_save_{tag}",
                    f"SQLiteCheckpointStorage.save {tag}",
                    t(lambda sq=sq: sq.save(sid, data)),
                    baseline=f"replace_{tag}_durable",
                )
            )
            cases.append(
                Case(
                    f"sqlite_load_{tag}",
                    f"SQLiteCheckpointStorage.load {tag}",
                    t(lambda sq=sq: sq.load(sid)),
                    baseline=f"raw_load_{tag}",
                )
            )
        mem = Memory()
        closers.append(mem)

        def mem_round(mem: Any = mem) -> None:
            mem.save(sid, data)
            mem.load(sid)

        cases.append(
            Case(
                f"deepcopy_{tag}",
                f"copy.deepcopy round trip {tag}",
                t(lambda: copy.deepcopy(copy.deepcopy(data))),
            )
        )
        cases.append(
            Case(
                f"memory_{tag}",
                f"MemoryCheckpointStorage save+load {tag}",
                t(mem_round),
                baseline=f"deepcopy_{tag}",
            )
        )
        if dc_mod is not None:
            cache = dc_mod.Cache(str(base / "diskcache"))  # type: ignore[attr-defined]
            closers.append(cache)
            cache.set(sid, data)
            cases.append(
                Case(
                    f"diskcache_set_{tag}",
                    f"diskcache Cache.set {tag}",
                    t(lambda c=cache: c.set(sid, data)),
                )
            )
            cases.append(
                Case(
                    f"diskcache_get_{tag}",
                    f"diskcache Cache.get {tag}",
                    t(lambda c=cache: c.get(sid)),
                    baseline=f"raw_load_{tag}",
                )
            )
        if sd_mod is not None:
            sd = sd_mod.SqliteDict(str(base / "sqlitedict.sqlite"))  # type: ignore[attr-defined]
            closers.append(sd)

            def sd_set(sd: Any = sd) -> None:
                sd[sid] = data
                sd.commit()

            sd_set()

            cases.append(Case(f"sqlitedict_set_{tag}", f"sqlitedict set + commit {tag}", t(sd_set)))
            cases.append(
                Case(
                    f"sqlitedict_get_{tag}",
                    f"sqlitedict get {tag}",
                    t(lambda sd=sd: sd[sid]),
                    baseline=f"raw_load_{tag}",
                )
            )

    for tag, size in sizes.items():
        one(tag, size)
    if closers:
        cases[-1].close = lambda: [c.close() for c in closers]  # type: ignore[func-returns-value]
    return cases, skipped


def call_cases(calls: int) -> tuple[list[Case], list[str]]:
    """StateManager.should_checkpoint per call, against a bare Python function call."""

    def bare(current_row: int) -> bool:
        return current_row >= 500

    cases = [Case("bare_call", "bare Python function call", lambda: timed_calls(bare, calls))]
    if not hasattr(statekeep, "StateManager"):
        return cases, ["StateManager: not in statekeep yet"]
    manager = statekeep.StateManager(Memory())
    cases.append(
        Case(
            "should_checkpoint",
            "StateManager.should_checkpoint",
            lambda: timed_calls(manager.should_checkpoint, calls),
            baseline="bare_call",
        )
    )
    return cases, []


def timed_calls(fn: Any, calls: int) -> float:
    import time

    rows = range(calls)
    start = time.perf_counter()
    for row in rows:
        fn(row)
    return (time.perf_counter() - start) / calls
