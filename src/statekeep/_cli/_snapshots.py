"""``statekeep ls | show | verify | prune``: snapshots in a states directory."""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, TextIO

from statekeep import _manifest
from statekeep import _scan as scanner
from statekeep._atomic import is_private
from statekeep._cli import _compat
from statekeep._cli._common import (
    DAMAGED,
    OK,
    check_dir,
    compact,
    emit_json,
    fail,
    human_size,
    local_time,
    os_problem,
    table,
)
from statekeep._order import Entry, EntryKind
from statekeep._store import verify_state
from statekeep.errors import CorruptStateError

MANIFEST = _manifest.MANIFEST_NAME


@dataclass
class Row:
    """One state as the command reports it."""

    name: str
    path: str
    sequence: int | None
    created_at: datetime | None
    size_bytes: int
    status: str  # "verified", "damaged" or "unverified"
    problem: str | None
    metadata: dict[str, Any] = field(default_factory=dict)
    location: str = "local"
    check: Callable[[], object] | None = None  # reads every file; CorruptStateError if bad

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "sequence": self.sequence,
            "created_at": None
            if self.created_at is None
            else self.created_at.astimezone(timezone.utc).isoformat(),
            "size_bytes": self.size_bytes,
            "status": self.status,
            "problem": self.problem,
            "metadata": self.metadata,
            "location": self.location,
        }


@dataclass(frozen=True)
class Scanned:
    """A directory of the store: its manifest, or why it has none (then its mtime)."""

    path: str
    name: str
    manifest: _manifest.Manifest | None
    problem: CorruptStateError | None
    mtime: float

    @property
    def key(self) -> tuple[int, float, str]:
        """Commit order, as the store's (:mod:`statekeep._order`): states by sequence, after
        the directories without a readable manifest (by mtime)."""
        if self.manifest is not None:
            return Entry(self.path, EntryKind.STATE, self.manifest.sequence).key
        return Entry(self.path, EntryKind.UNSEQUENCED, created=self.mtime).key


def _row(scanned: Scanned) -> Row:
    m = scanned.manifest
    if m is None:
        return Row(scanned.name, scanned.path, None, None, 0, "damaged", str(scanned.problem))
    created = m.created_at  # aware; made UTC only for --json
    meta = _compat.metadata_of(m)
    path = scanned.path
    return Row(
        scanned.name,
        path,
        m.sequence,
        created,
        m.size_bytes,
        "unverified",
        None,
        meta,
        check=partial(verify_state, path),
    )


def _read_manifest(state: str) -> _manifest.Manifest:
    """The state's manifest; a CorruptStateError for any reason it cannot be had (a FIFO
    manifest is refused unopened; EACCES or EIO are this state's problem, not the list's)."""
    return scanner.read_manifest(state)


def _scan_dirs(states_dir: str, pattern: str | None) -> list[Scanned]:
    """Every directory of ``states_dir`` (private work aside), ordered as the store orders."""
    found: list[Scanned] = []
    with os.scandir(states_dir) as it:
        for entry in it:
            if is_private(entry.name) or not entry.is_dir(follow_symlinks=False):
                continue
            if pattern is not None and not fnmatch.fnmatchcase(entry.name, pattern):
                continue
            manifest = problem = None
            mtime = 0.0
            try:
                manifest = _read_manifest(entry.path)
            except CorruptStateError as exc:
                problem = exc
                try:
                    mtime = entry.stat(follow_symlinks=False).st_mtime
                except OSError:
                    continue  # removed while we looked
            except FileNotFoundError:
                continue
            found.append(Scanned(entry.path, entry.name, manifest, problem, mtime))
    found.sort(key=lambda s: s.key)
    return found


def _scan(states_dir: str, pattern: str | None = None) -> list[Scanned]:
    """Every state of ``states_dir``, oldest first; usage errors for what is not a store."""
    check_dir(states_dir, "states directory")
    try:
        found = _scan_dirs(states_dir, pattern)
    except OSError as exc:
        fail(f"{states_dir}: cannot read it: {os_problem(exc)}")
    if found and all(
        s.manifest is None and not os.path.lexists(f"{s.path}/{MANIFEST}") for s in found
    ):
        fail(
            f"{states_dir}: not a statekeep states directory"
            f" (none of its {len(found)} directories has a {MANIFEST})"
        )
    if not found and pattern is None:  # (with a pattern, nothing may match: that is fine)
        if os.path.isfile(f"{states_dir}/{MANIFEST}"):
            fail(
                f"{states_dir}: is a state, not a states directory"
                f" (try: statekeep show {states_dir})"
            )
        try:
            others = [n for n in os.listdir(states_dir) if not is_private(n)]
        except OSError as exc:
            fail(f"{states_dir}: cannot read it: {os_problem(exc)}")
        if others:
            fail(
                f"{states_dir}: not a statekeep states directory (it holds {len(others)} other"
                f" entr{'ies' if len(others) > 1 else 'y'}, no states)"
            )
    return found


class Progress:
    """Bytes checked / total on a terminal's stderr; silent when stderr is not a terminal."""

    def __init__(self, total: int, stream: TextIO, enabled: bool) -> None:
        self.total, self.done, self.stream = total, 0, stream
        self.enabled = enabled and stream.isatty()

    def advance(self, nbytes: int, count: int, of: int) -> None:
        self.done += nbytes
        if self.enabled:
            self.stream.write(
                f"\rchecked {human_size(self.done)} / {human_size(self.total)}"
                f" ({count}/{of} states)\x1b[K"
            )
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def _verify_rows(rows: list[Row], show_progress: bool = True) -> list[Row]:
    """Check every unverified row in place (status and problem); return those still there.

    A state removed while we looked (a keeper pruning it) is not damage: it is left out.
    """
    gone: set[int] = set()
    progress = Progress(sum(r.size_bytes for r in rows), sys.stderr, show_progress)
    try:
        for i, row in enumerate(rows, 1):
            if row.status == "unverified" and row.check is not None:
                try:
                    row.check()
                except CorruptStateError as exc:
                    row.status, row.problem = "damaged", str(exc)
                except FileNotFoundError:
                    gone.add(i)
                except OSError as exc:  # EACCES, EIO: this state cannot be checked
                    row.status = "damaged"
                    row.problem = f"state {row.path} cannot be read: {exc}"
                else:
                    row.status = "verified"
            progress.advance(row.size_bytes, i, len(rows))
    finally:
        progress.close()
    return [row for i, row in enumerate(rows, 1) if i not in gone]


def _print_rows(rows: list[Row]) -> None:
    if not rows:
        return
    body = [
        [
            r.name,
            "-" if r.sequence is None else str(r.sequence),
            "-" if r.created_at is None else local_time(r.created_at),
            human_size(r.size_bytes) if r.status != "damaged" or r.sequence is not None else "-",
            r.status,
            compact(r.metadata),
        ]
        for r in rows
    ]
    print(table(body, ["NAME", "SEQ", "TIME", "SIZE", "STATUS", "METADATA"]))


def _problems(rows: list[Row]) -> int:
    bad = [r for r in rows if r.status == "damaged"]
    for r in bad:
        print(f"statekeep: damaged: {r.problem}", file=sys.stderr)
    return DAMAGED if bad else OK


def _is_url(target: str) -> bool:
    return "://" in target


def _rows(target: str) -> list[Row]:
    """Every state of a states directory or a remote URL, oldest first."""
    if _is_url(target):
        from statekeep._cli import _remote

        return _remote.rows(target)
    return [_row(s) for s in _scan(target)]


def cmd_ls(args: argparse.Namespace) -> int:
    """One line per state, newest last."""
    rows = _rows(args.target)
    if args.verify:
        rows = _verify_rows(rows)
    if args.json:
        emit_json({"states_dir": args.target, "states": [r.to_json() for r in rows]})
    else:
        _print_rows(rows)
    return _problems(rows)


def _states_of(target: str, names: list[str]) -> list[Row]:
    if not names and not _is_url(target) and os.path.lexists(f"{target}/{MANIFEST}"):
        check_dir(target, "state")  # the target is one state
        return [_one(Path(target))]
    found = _rows(target)
    if not names:
        return found
    by_name = {r.name: r for r in found}
    for name in names:
        if name not in by_name:
            fail(f"{target}: has no state {name!r}")
    return [by_name[name] for name in names]


def _one(path: Path) -> Row:
    try:
        m = _read_manifest(str(path))
    except CorruptStateError as exc:
        return Row(path.name, str(path), None, None, 0, "damaged", str(exc))
    except FileNotFoundError:
        fail(f"{path}: no such state")
    return _row(Scanned(str(path), path.name, m, None, 0.0))


def cmd_verify(args: argparse.Namespace) -> int:
    """Check every file of every state (or of those named)."""
    rows = _verify_rows(_states_of(args.target, args.states))
    if args.json:
        bad = sum(r.status == "damaged" for r in rows)
        emit_json({"states": [r.to_json() for r in rows], "damaged": bad, "checked": len(rows)})
        return DAMAGED if bad else OK
    for r in rows:
        if r.status == "verified":
            print(f"ok       {r.name}  ({human_size(r.size_bytes)})")
        else:
            print(f"DAMAGED  {r.name}: {r.problem}")
    bad = sum(r.status == "damaged" for r in rows)
    noun = "state" if len(rows) == 1 else "states"
    print(f"{len(rows)} {noun} checked, {bad} damaged")
    return DAMAGED if bad else OK


def cmd_show(args: argparse.Namespace) -> int:
    """A state's manifest: files, sizes, checksums, metadata."""
    path = args.state
    try:
        if _is_url(path):
            from statekeep._cli import _remote

            m = _remote.manifest(path)
        else:
            check_dir(path, "state")
            m = _read_manifest(path)
    except CorruptStateError as exc:
        print(f"statekeep: damaged: {exc}", file=sys.stderr)
        return DAMAGED
    except FileNotFoundError:
        fail(f"{path}: no such state")
    meta = dict(_compat.metadata_of(m))
    files = [
        {"path": e.path, "type": "dir"}
        if e.is_dir
        else {"path": e.path, "type": "file", "size": e.size, "crc32": f"{e.crc32:08x}"}
        for e in m.entries
    ]
    if args.json:
        emit_json(
            {
                "path": path,
                "name": os.path.basename(os.path.normpath(path)),
                "format_version": m.version,
                "sequence": m.sequence,
                "created_at": m.created_at.astimezone(timezone.utc).isoformat(),
                "size_bytes": m.size_bytes,
                "metadata": meta,
                "files": files,
            }
        )
        return OK
    nfiles = sum(not e.is_dir for e in m.entries)
    print(f"state     {path}")
    print(f"sequence  {m.sequence}")
    print(f"created   {local_time(m.created_at)}")
    print(f"size      {human_size(m.size_bytes)} in {nfiles} file{'s' * (nfiles != 1)}")
    print(f"format    version {m.version}")
    if meta:
        print(f"metadata  {compact(meta)}")
    body = [
        ["dir", "-", "-", f"{e.path}/"]
        if e.is_dir
        else ["file", str(e.size), f"{e.crc32:08x}", e.path]
        for e in m.entries
    ]
    if body:
        print()
        print(table(body, ["TYPE", "SIZE", "CRC32", "PATH"]))
    return OK


def cmd_prune(args: argparse.Namespace) -> int:
    """The keeper's rules, once."""
    from statekeep._cli import _policy

    policy, max_keep = _policy.from_args(args)
    names = [s.name for s in _scan(args.target, args.pattern)]
    keeper = _compat.keeper(args.target, args.pattern, max_keep, policy)
    if args.dry_run:
        removed = _compat.plan(keeper)
    else:
        try:
            removed = keeper.cleanup()
        except OSError as exc:
            fail(f"{args.target}: cannot prune it: {os_problem(exc)}")
    gone = {p.name for p in removed}
    kept = [n for n in names if n not in gone]
    gone_in_order = [n for n in names if n in gone] + sorted(gone.difference(names))
    verb = "would remove" if args.dry_run else "removed"
    if args.json:
        emit_json({"dry_run": args.dry_run, "removed": gone_in_order, "kept": kept})
        return OK
    for name in gone_in_order:
        print(f"{verb}  {name}")
    print(f"{verb} {len(gone)}, kept {len(kept)}")
    return OK
