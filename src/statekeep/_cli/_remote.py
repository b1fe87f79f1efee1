"""Snapshots published to a remote (``s3://bucket/prefix`` or ``file:///shared/dir``).

``statekeep ls URL`` and ``statekeep verify URL`` read the remote as a restoring machine
would: the manifests under ``states/``, and for ``verify`` every file, its size and
CRC-32 checked as it streams in (nothing is written locally).
"""

from __future__ import annotations

import importlib
import zlib
from datetime import timezone
from functools import partial
from typing import Any

from statekeep._cli import _compat
from statekeep._cli._common import fail
from statekeep._cli._snapshots import Row
from statekeep.errors import CorruptStateError, StorageError

_CHUNK = 8 << 20  # bytes per ranged GET while verifying


def _open(url: str) -> tuple[Any, Any]:
    """(the Remote, statekeep's publishing module); usage errors when either is missing."""
    try:
        remote_pkg = importlib.import_module("statekeep.remote")
        publish = importlib.import_module("statekeep._publish")
    except ImportError:
        fail(f"{url}: this statekeep cannot read remote snapshots (statekeep.remote is missing)")
    if url.startswith("s3://"):
        try:
            importlib.import_module("boto3")
        except ImportError:
            fail(f"{url}: needs boto3: pip install 'statekeep[s3]'")
    try:
        return remote_pkg.open_remote(url), publish
    except (ValueError, TypeError) as exc:
        fail(f"{url}: {exc}")


def _check(remote: Any, state: Any) -> None:
    """Read every file of a remote state; CorruptStateError naming the first that differs."""
    prefix = state.data_prefix()
    for entry in state.manifest.entries:
        if entry.is_dir:
            continue
        key = prefix + entry.path
        crc, got, start = 0, 0, 0
        try:
            while True:
                data = remote.get(key, start=start, length=_CHUNK)
                crc = zlib.crc32(data, crc)
                got += len(data)
                start += len(data)
                if len(data) < _CHUNK or got > entry.size:
                    break
        except FileNotFoundError:
            raise CorruptStateError(
                f"remote state {state.name} failed verification: {entry.path} is missing"
            ) from None
        where = f"remote state {state.name} failed verification: {entry.path}"
        if got != entry.size:
            raise CorruptStateError(f"{where} is {got} bytes, manifest says {entry.size}")
        if crc != entry.crc32:
            raise CorruptStateError(
                f"{where} has CRC-32 {crc:08x}, manifest says {entry.crc32:08x}"
            )


def rows(url: str) -> list[Row]:
    """Every state on the remote, oldest first (those with a bad manifest first of all)."""
    remote, publish = _open(url)
    base = url.rstrip("/")
    try:
        good, bad = publish.read_remote_states(remote)
    except StorageError as exc:
        fail(f"{url}: cannot list it: {exc}")
    found = [
        Row(name, f"{base}/{name}", None, None, 0, "damaged", str(exc), location="remote")
        for name, exc in sorted(bad, key=lambda b: b[0])
    ]
    for state in good:
        m = state.manifest
        found.append(
            Row(
                state.name,
                f"{base}/{state.name}",
                m.sequence,
                m.created_at.astimezone(timezone.utc),
                m.size_bytes,
                "unverified",
                None,
                _compat.metadata_of(m),
                location="remote",
                check=partial(_check, remote, state),
            )
        )
    return found


def manifest(url: str) -> Any:
    """The manifest of the remote state ``url`` (the remote's URL, a slash, the state's name).

    Raises:
        CorruptStateError: its manifest object is malformed.
    """
    base, _, name = url.rstrip("/").rpartition("/")
    if not name or "://" not in base:
        fail(f"{url}: not a remote state (write the remote's URL, a slash and the state's name)")
    remote, publish = _open(base)
    key = f"{publish.STATES}{name}"
    try:
        blob = remote.get(key)
    except FileNotFoundError:
        fail(f"{url}: no such state")
    except StorageError as exc:
        fail(f"{url}: cannot read it: {exc}")
    except ValueError as exc:  # a name the remote refuses as a key
        fail(f"{url}: {exc}")
    return publish.decode_manifest(name, blob, url).manifest
