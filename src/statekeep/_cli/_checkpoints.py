"""``statekeep checkpoints ls | show | rm | prune URL``: any checkpoint storage."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

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
    parse_duration,
    table,
)

# scheme -> (class in statekeep.storage, module it needs, the extra that brings it)
_REMOTE = {
    "s3": ("S3CheckpointStorage", "boto3", "s3"),
    "postgresql": ("PostgresCheckpointStorage", "psycopg", "postgres"),
    "postgres": ("PostgresCheckpointStorage", "psycopg", "postgres"),
}


_CONNINFO = re.compile(r"^\s*(host|hostaddr|port|dbname|user|service)=")


def open_storage(url: str) -> Any:
    """The checkpoint storage ``url`` names; usage errors for what does not exist or cannot open.

    ``sqlite:///PATH`` (PATH as written: ``sqlite:////abs.db`` or ``sqlite:///rel.db``, as
    SQLAlchemy reads them), ``s3://bucket/prefix``, ``postgresql://...`` (or a libpq
    keyword string, ``"host=... dbname=..."``), or a directory.
    """
    from statekeep.errors import StatekeepError

    scheme, sep, rest = url.partition("://")
    if not sep and _CONNINFO.match(url) and not os.path.lexists(url):
        scheme = "postgresql"  # a libpq keyword string: "host=... dbname=..."
    try:
        if not sep and scheme != "postgresql":
            check_dir(url, "checkpoint directory")
            from statekeep.storage import FileCheckpointStorage

            return FileCheckpointStorage(url)
        if scheme == "sqlite":
            path = rest[1:] if rest.startswith("/") else rest
            if not path:
                fail(f"{url}: no database path (write sqlite:///relative.db or sqlite:////abs.db)")
            if os.path.isdir(path):
                fail(f"{url}: {path} is a directory, not a database")
            if not os.path.isfile(path):
                fail(f"{url}: no such database {path}")
            from statekeep.storage import SQLiteCheckpointStorage

            return SQLiteCheckpointStorage(path)
        if scheme in _REMOTE:
            name, module, extra = _REMOTE[scheme]
            try:
                importlib.import_module(module)
            except ImportError:
                fail(f"{url}: needs {module}: pip install 'statekeep[{extra}]'")
            cls = getattr(importlib.import_module("statekeep.storage"), name, None)
            if cls is None:
                fail(f"{url}: this statekeep has no {name}")
            return cls(url)
    except StatekeepError as exc:  # StorageError: a server down, a file that is not a db
        fail(f"{url}: cannot open it: {exc}")
    return fail(
        f"{url}: unknown scheme {scheme!r} (use a directory, sqlite://, s3:// or postgresql://)"
    )


class _Complaints(logging.Handler):
    """Collects what a storage logs while listing (the checkpoints it had to skip)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def _complaints() -> Iterator[_Complaints]:
    log = logging.getLogger("statekeep")
    handler = _Complaints()
    log.addHandler(handler)
    old, log.propagate = log.propagate, False
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.propagate = old


@contextmanager
def _storage(url: str) -> Iterator[Any]:
    from statekeep.errors import StorageError

    storage = open_storage(url)
    try:
        yield storage
    except StorageError as exc:
        fail(f"{url}: {exc}")
    finally:
        close = getattr(storage, "close", None)
        if close is not None:
            close()


def _info_json(info: Any) -> dict[str, Any]:
    return {
        "session_id": info.session_id,
        "timestamp": info.timestamp.isoformat(),
        "size_bytes": info.size_bytes,
        "metadata": dict(info.metadata),
    }


def cmd_ls(args: argparse.Namespace) -> int:
    """Every checkpoint, oldest first; with --verify each is read in full."""
    from statekeep.errors import CorruptCheckpointError

    with _storage(args.url) as storage, _complaints() as complaints:
        infos = storage.list_checkpoints()
        damaged: dict[str, str] = {}
        if args.verify:
            for info in infos:
                try:
                    storage.load(info.session_id)
                except CorruptCheckpointError as exc:
                    damaged[info.session_id] = str(exc)
    problems = complaints.messages + list(damaged.values())
    if args.json:
        rows = []
        for info in infos:
            row = _info_json(info)
            row["status"] = (
                "damaged"
                if info.session_id in damaged
                else ("verified" if args.verify else "unverified")
            )
            rows.append(row)
        emit_json({"storage": args.url, "checkpoints": rows, "problems": problems})
    elif infos:
        body = [
            [
                i.session_id,
                local_time(i.timestamp),
                human_size(i.size_bytes),
                "damaged" if i.session_id in damaged else ("ok" if args.verify else "-"),
                compact(i.metadata),
            ]
            for i in infos
        ]
        print(table(body, ["SESSION", "TIME", "SIZE", "STATUS", "METADATA"]))
    for message in problems:
        print(f"statekeep: damaged: {message}", file=sys.stderr)
    return DAMAGED if problems else OK


def cmd_show(args: argparse.Namespace) -> int:
    """One session's checkpoint: when, how big, metadata, and its data as JSON."""
    from statekeep.errors import CorruptCheckpointError

    with _storage(args.url) as storage:
        try:
            found = storage.load_with_info(args.session)  # data and info of one save
        except CorruptCheckpointError as exc:
            print(f"statekeep: damaged: {exc}", file=sys.stderr)
            return DAMAGED
        except ValueError as exc:  # a session id the storage refuses
            fail(f"{args.session!r}: {exc}")
        if found is None:
            print(
                f"statekeep: {args.url}: no checkpoint for session {args.session!r}",
                file=sys.stderr,
            )
            return DAMAGED
    data, info = found
    head = _info_json(info)
    if args.json:
        emit_json({**head, "session_id": args.session, "data": data})
        return OK
    print(f"session   {args.session}")
    print(f"saved     {local_time(info.timestamp)}")
    print(f"size      {human_size(info.size_bytes)}")
    if info.metadata:
        print(f"metadata  {compact(info.metadata)}")
    print("data:")
    emit_json(data)
    return OK


def cmd_rm(args: argparse.Namespace) -> int:
    """Delete the named sessions' checkpoints."""
    removed: list[str] = []
    missing: list[str] = []
    with _storage(args.url) as storage:
        for session in args.sessions:
            try:
                gone = storage.delete(session)
            except ValueError as exc:
                fail(f"{session!r}: {exc}")
            (removed if gone else missing).append(session)
            if not args.json:
                if gone:
                    print(f"removed  {session}")
                else:
                    print(
                        f"statekeep: {args.url}: no checkpoint for session {session!r}",
                        file=sys.stderr,
                    )
    if args.json:
        emit_json({"removed": removed, "missing": missing})
    return DAMAGED if missing else OK


def cmd_prune(args: argparse.Namespace) -> int:
    """Delete every checkpoint older than --older-than."""
    age = parse_duration(args.older_than, "--older-than")
    now = datetime.now(timezone.utc)
    with _storage(args.url) as storage:
        if args.dry_run:
            old = [i.session_id for i in storage.list_checkpoints() if now - i.timestamp > age]
            count = len(old)
        else:
            old = []
            count = _compat.delete_older_than(storage, age, now)
    verb = "would remove" if args.dry_run else "removed"
    if args.json:
        emit_json({"dry_run": args.dry_run, "removed": count, "sessions": old})
        return OK
    for session in old:
        print(f"{verb}  {session}")
    print(f"{verb} {count} checkpoint{'s' * (count != 1)} older than {args.older_than}")
    return OK
