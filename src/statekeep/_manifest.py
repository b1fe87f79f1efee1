"""The manifest of a committed directory: its format, reading it, verifying against it.

The manifest (:data:`MANIFEST_NAME`, written last, inside the committed directory)
records the format version, the commit time, a sequence number and, for every file,
its relative path, size and CRC-32. CRC-32 because ``zlib.crc32`` is in the standard
library, runs at several GB/s (faster than the disk it guards) and catches every
single-bit flip and every burst error up to 32 bits; a truncation is caught by the
size first. It guards against accidents, not against an attacker.

Format version 2 (written now) seals the manifest with the CRC-32 of its own bytes up
to the closing ``"checksum"`` line; version 1 (still read) sealed it with the CRC-32
of the other fields re-encoded canonically. Both lay the fields out alike.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from statekeep import _checksum
from statekeep.errors import CorruptStateError

__all__ = ["MANIFEST_NAME", "Entry", "Manifest", "parse", "read_manifest", "read_order", "verify"]

MANIFEST_NAME = ".statekeep-manifest.json"
FORMAT = "statekeep.state"
FORMAT_VERSION = 2
_SEAL = b'\n "checksum": '  # the line that closes a manifest; CRC'd bytes end before it
_encode_str = json.encoder.encode_basestring_ascii  # what json.dumps(str) does, in C


@dataclass(frozen=True)
class Entry:
    """One path inside a committed directory: a file (with size and CRC) or a directory."""

    path: str
    is_dir: bool
    size: int = 0
    crc32: int = 0


@dataclass(frozen=True)
class Manifest:
    """What a committed directory must contain."""

    created_at: datetime
    sequence: int
    entries: tuple[Entry, ...]
    version: int = FORMAT_VERSION

    @property
    def size_bytes(self) -> int:
        return sum(e.size for e in self.entries)

    def to_bytes(self) -> bytes:
        """The manifest as written (always the current format version)."""
        # Laid out by hand, one line per file: json.dumps(indent=...) would fall back to
        # the pure-Python encoder, which cost more than every syscall of a small save.
        lines = ",\n".join(
            f'  {{"path": {_encode_str(e.path)}, "type": "dir"}}'
            if e.is_dir
            else f'  {{"path": {_encode_str(e.path)}, "type": "file",'
            f' "size": {e.size}, "crc32": {e.crc32}}}'
            for e in self.entries
        )
        body = (
            f'{{\n "format": "{FORMAT}",\n "version": {FORMAT_VERSION},\n'
            f' "created_at": "{self.created_at.isoformat()}",\n "sequence": {self.sequence},\n'
            f' "files": [\n{lines}\n ],'
        ).encode()
        return b"%s%s%d\n}\n" % (body, _SEAL, zlib.crc32(body))


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


def _canonical(body: dict[str, object]) -> bytes:
    """Version 1's sealed content: every field but the checksum, sorted, no whitespace."""
    return _CANONICAL.encode(body).encode()


def parse(raw: bytes, where: str) -> Manifest:
    """Parse and check the bytes of a manifest; ``where`` names it in errors.

    Raises:
        CorruptStateError: the manifest is malformed, fails its checksum, or is from a
            newer format.
    """
    try:
        body = json.loads(raw)
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} manifest")
        version = body["version"]
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CorruptStateError(
                f"{where} has format version {version!r};"
                f" this statekeep reads versions up to {FORMAT_VERSION}"
            )
        checksum = body.pop("checksum")
        if not isinstance(checksum, int):
            raise ValueError("its checksum is not an integer")
        if version >= 2:
            # The seal is the last line: its CRC covers the raw bytes before it, so a
            # read needs no re-encoding. Anything after it (or a different seal) fails.
            end = raw.rfind(_SEAL)
            if end < 0 or raw[end:] != b"%s%d\n}\n" % (_SEAL, checksum):
                raise ValueError("its checksum does not match its content (no seal at its end)")
            content = raw[:end]
        else:
            content = _canonical(body)
        if zlib.crc32(content) != checksum:
            raise ValueError("its checksum does not match its content")
        entries = tuple(
            Entry(f["path"], True)
            if f["type"] == "dir"
            else Entry(f["path"], False, int(f["size"]), int(f["crc32"]))
            for f in body["files"]
        )
        created_at = datetime.fromisoformat(body["created_at"])
        return Manifest(created_at, int(body["sequence"]), entries, version)
    except CorruptStateError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptStateError(f"{where} is malformed: {exc}") from exc


def read_manifest(directory: str | Path) -> Manifest:
    """Parse the manifest of ``directory``.

    Raises:
        FileNotFoundError: ``directory`` does not exist.
        CorruptStateError: the manifest is missing, malformed or from a newer format.
    """
    path = f"{directory}/{MANIFEST_NAME}"
    try:
        raw = _checksum.read_all(path)
    except (FileNotFoundError, NotADirectoryError):
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"state {directory} does not exist") from None
        raise CorruptStateError(f"state {directory} has no manifest ({path} is missing)") from None
    except IsADirectoryError:
        raise CorruptStateError(f"state {directory}: manifest {path} is a directory") from None
    return parse(raw, f"state {directory}: manifest {path}")


_HEADER = re.compile(
    rb'\{\n "format": "statekeep\.state",\n "version": \d+,\n'
    rb' "created_at": "([^"\\]+)",\n "sequence": (\d+),\n'
)


def read_order(directory: str) -> tuple[float, int] | None:
    """(created_at as a timestamp, sequence) from the head of ``directory``'s manifest.

    Only orders states: it reads the first 512 bytes and checks nothing else, so a
    caller must still :func:`read_manifest` the state it picks. None when the head is
    not laid out as statekeep writes it (missing, damaged, or written otherwise).
    """
    try:
        fd = os.open(f"{directory}/{MANIFEST_NAME}", os.O_RDONLY)
    except OSError:
        return None
    try:
        head = os.read(fd, 512)
    except OSError:
        return None
    finally:
        os.close(fd)
    match = _HEADER.match(head)
    if match is None:
        return None
    try:
        created = datetime.fromisoformat(match[1].decode("ascii"))
    except ValueError:
        return None
    return created.timestamp(), int(match[2])


def verify(directory: str | Path) -> Manifest:
    """Check ``directory`` against its manifest: same paths, sizes and checksums.

    Raises:
        FileNotFoundError: ``directory`` does not exist.
        CorruptStateError: anything differs; the message names the state and the file.
    """
    root = os.fspath(directory)
    manifest = read_manifest(root)
    actual = _checksum.kinds(root, MANIFEST_NAME)
    for expected in manifest.entries:
        kind = actual.pop(expected.path, None)
        if kind == 1 and not expected.is_dir:  # the common case first: a file to check
            try:
                size, crc = _checksum.checksum_file(
                    f"{root}/{expected.path}", sync=False, expect=expected.size
                )
            except FileNotFoundError:
                kind = None  # removed since the scan
            else:
                if size == expected.size and crc == expected.crc32:
                    continue
        elif kind == 2 and expected.is_dir:
            continue
        where = f"state {root} failed verification: {expected.path}"
        if kind is None:
            raise CorruptStateError(f"{where} is missing")
        if expected.is_dir:
            raise CorruptStateError(f"{where} should be a directory")
        if kind != 1:
            raise CorruptStateError(f"{where} should be a regular file")
        if size != expected.size:
            raise CorruptStateError(f"{where} is {size} bytes, manifest says {expected.size}")
        raise CorruptStateError(f"{where} has CRC-32 {crc:08x}, manifest says {expected.crc32:08x}")
    if actual:
        extra = ", ".join(sorted(actual))
        raise CorruptStateError(f"state {root} failed verification: unexpected {extra}")
    return manifest
