"""The manifest of a committed directory: its format, reading it, verifying against it.

The manifest (:data:`MANIFEST_NAME`, written last, inside the committed directory)
records the format version, the commit time, a sequence number, the caller's metadata
(a JSON object) and, for every file, its relative path, size and CRC-32. CRC-32 because
``zlib.crc32`` is in the standard library, runs at several GB/s (faster than the disk it
guards) and catches every single-bit flip and every burst error up to 32 bits; a
truncation is caught by the size first. It guards against accidents, not against an
attacker, but nothing in a manifest is trusted: every field is type- and range-checked,
and a path that could leave the state (``..``, absolute, NUL) is refused.

Format version 3 (written now) adds ``metadata``; version 2 (still read) has the same
layout without it. Both seal the manifest with the CRC-32 of its own bytes up to the
closing ``"checksum"`` line (:attr:`Manifest.seal`); version 1 (still read) sealed it
with the CRC-32 of the other fields re-encoded canonically. Fields a later version adds
are optional: a reader ignores an entry key it does not know.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from statekeep import _checksum
from statekeep.errors import CorruptStateError

__all__ = [
    "MANIFEST_NAME",
    "Entry",
    "Manifest",
    "check_metadata",
    "parse",
    "read_manifest",
    "read_order",
    "verify",
]

MANIFEST_NAME = ".statekeep-manifest.json"
FORMAT = "statekeep.state"
FORMAT_VERSION = 3
MAX_MANIFEST_BYTES = 1 << 30  # a manifest this large is not one statekeep wrote
_MAX_INT = (1 << 63) - 1  # sizes and sequences: what a file offset can hold
_SEAL = b'\n "checksum": '  # the line that closes a manifest; CRC'd bytes end before it
_encode_str = json.encoder.encode_basestring_ascii  # what json.dumps(str) does, in C
_METADATA = json.JSONEncoder(ensure_ascii=True, allow_nan=False, separators=(", ", ": "))


@dataclass(frozen=True)
class Entry:
    """One path inside a committed directory: a file (with size and CRC) or a directory."""

    path: str
    is_dir: bool
    size: int = 0
    crc32: int = 0


@dataclass(frozen=True)
class Manifest:
    """What a committed directory must contain.

    ``metadata`` is the caller's JSON object (empty when none was given); ``seal`` is
    the CRC-32 that closes the manifest's own bytes (0 until it is written), which
    identifies this exact manifest: "remember what was verified" keys on it.
    """

    created_at: datetime
    sequence: int
    entries: tuple[Entry, ...]
    version: int = FORMAT_VERSION
    metadata: Mapping[str, Any] = field(default_factory=dict)
    seal: int = 0

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
        metadata = _METADATA.encode(dict(self.metadata)) if self.metadata else "{}"
        body = (
            f'{{\n "format": "{FORMAT}",\n "version": {FORMAT_VERSION},\n'
            f' "created_at": "{self.created_at.isoformat()}",\n "sequence": {self.sequence},\n'
            f' "metadata": {metadata},\n'
            f' "files": [\n{lines}\n ],'
        ).encode()
        return b"%s%s%d\n}\n" % (body, _SEAL, zlib.crc32(body))


def check_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of ``metadata`` if it can be written as a JSON object; else an error.

    Raises:
        TypeError: ``metadata`` is not a mapping, a key is not a ``str``, or a value
            (named by its key) is not JSON-ready (only dict, list, tuple, str, int,
            float, bool and None are).
        ValueError: a value (named by its key) holds NaN or infinity, or is nested too
            deeply to encode.
    """
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(
            f"metadata must be a mapping of str to JSON values, not {type(metadata).__name__}"
        )
    checked: dict[str, Any] = {}
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise TypeError(f"metadata key {key!r} is a {type(key).__name__}; keys must be str")
        try:
            text = _METADATA.encode(value)
        except TypeError as exc:
            raise TypeError(f"metadata[{key!r}] is not JSON-ready: {exc}") from None
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"metadata[{key!r}] cannot be written as JSON: {exc}") from None
        checked[key] = json.loads(text)  # a copy the caller cannot change under us
    return checked


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


def _canonical(body: dict[str, object]) -> bytes:
    """Version 1's sealed content: every field but the checksum, sorted, no whitespace."""
    return _CANONICAL.encode(body).encode()


class _Bad(ValueError):
    """A field of a manifest is wrong; the message says which."""


def _int(value: object, what: str, limit: int = _MAX_INT) -> int:
    if type(value) is not int or not 0 <= value <= limit:
        raise _Bad(f"{what} is {value!r:.40}, not an integer from 0 to {limit}")
    return value


def _rel_path(value: object) -> str:
    """A manifest entry's path: relative, inside the state, plain components only."""
    if not isinstance(value, str) or not value:
        raise _Bad(f"a file path is {value!r:.80}, not a non-empty string")
    parts = value.split("/")
    if "\0" in value or value.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise _Bad(f"file path {value!r:.200} is not a plain relative path inside the state")
    if value == MANIFEST_NAME:
        raise _Bad(f"file path {value!r} names the manifest itself")
    return value


def _entry(item: object) -> Entry:
    if not isinstance(item, dict):
        raise _Bad(f"a file entry is {item!r:.80}, not an object")
    path = _rel_path(item.get("path"))
    kind = item.get("type")
    if kind == "dir":
        return Entry(path, True)
    if kind != "file":
        raise _Bad(f"file {path!r} has type {kind!r:.40}, not 'file' or 'dir'")
    size, crc = item.get("size"), item.get("crc32")
    if type(size) is int and type(crc) is int and 0 <= size <= _MAX_INT and 0 <= crc <= 0xFFFFFFFF:
        return Entry(path, False, size, crc)  # the common case: no error message built
    size = _int(size, f"the size of {path!r}")
    return Entry(path, False, size, _int(crc, f"the CRC-32 of {path!r}", 0xFFFFFFFF))


def _created_at(value: object) -> datetime:
    if not isinstance(value, str):
        raise _Bad(f"created_at is {value!r:.40}, not a string")
    created = datetime.fromisoformat(value)
    if created.tzinfo is None or created.utcoffset() is None:
        raise _Bad(f"created_at {value!r:.40} has no time zone")
    try:
        created.astimezone(timezone.utc).timestamp()
    except (OverflowError, ValueError, OSError) as exc:
        raise _Bad(f"created_at {value!r:.40} is out of range: {exc}") from None
    return created


def _body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except RecursionError:
        raise _Bad("it is nested too deeply to be a manifest") from None
    except UnicodeDecodeError as exc:
        raise _Bad(f"it is not UTF-8 text: {exc}") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise _Bad(f"it is not a {FORMAT} manifest")
    return body


def parse(raw: bytes, where: str) -> Manifest:
    """Parse and check the bytes of a manifest; ``where`` names it in errors.

    Raises:
        CorruptStateError: the manifest is malformed or hostile (wrong types, numbers
            out of range, a path that leaves the state), fails its checksum, or is from
            a newer format.
    """
    try:
        body = _body(raw)
        version = body.get("version")
        if type(version) is not int or version < 1:
            raise _Bad(f"its version is {version!r:.40}")
        if version > FORMAT_VERSION:
            raise CorruptStateError(
                f"{where} has format version {version!r};"
                f" this statekeep reads versions up to {FORMAT_VERSION}"
            )
        checksum = _int(body.pop("checksum", None), "its checksum", 0xFFFFFFFF)
        if version >= 2:
            # The seal is the last line: its CRC covers the raw bytes before it, so a
            # read needs no re-encoding. Anything after it (or a different seal) fails.
            end = raw.rfind(_SEAL)
            if end < 0 or raw[end:] != b"%s%d\n}\n" % (_SEAL, checksum):
                raise _Bad("its checksum does not match its content (no seal at its end)")
            content = raw[:end]
        else:
            content = _canonical(body)
        if zlib.crc32(content) != checksum:
            raise _Bad("its checksum does not match its content")
        files = body.get("files")
        if not isinstance(files, list):
            raise _Bad(f"its files are {files!r:.40}, not a list")
        entries = tuple(_entry(f) for f in files)
        if len({e.path for e in entries}) != len(entries):
            raise _Bad("it lists a path twice")
        metadata = body.get("metadata", {}) if version >= 3 else {}
        if not isinstance(metadata, dict):
            raise _Bad(f"its metadata is {metadata!r:.40}, not an object")
        created_at = _created_at(body.get("created_at"))
        sequence = _int(body.get("sequence"), "its sequence")
        return Manifest(created_at, sequence, entries, version, metadata, checksum)
    except CorruptStateError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError) as exc:
        raise CorruptStateError(f"{where} is malformed: {exc}") from None


def _read_regular(path: str, limit: int) -> bytes:
    """The bytes of regular file ``path``; never blocks on a FIFO or a device.

    Raises:
        FileNotFoundError, NotADirectoryError: ``path`` does not exist.
        _Special: ``path`` is not a regular file (or is larger than ``limit``).
        OSError: any other failure (EACCES, EIO, ELOOP, ...).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Special(f"{path} is not a regular file")
        if st.st_size > limit:
            raise _Special(f"{path} is {st.st_size} bytes, more than a manifest can be")
        want = max(st.st_size + 1, 4096)
        chunks = [os.read(fd, want)]
        if len(chunks[0]) < want:  # a short read of a regular file is its end
            return chunks[0]
        while chunks[-1] and sum(map(len, chunks)) <= limit:
            chunks.append(os.read(fd, 1 << 20))
        return b"".join(chunks)
    finally:
        os.close(fd)


class _Special(Exception):
    """A path is not a regular file."""


def read_manifest(directory: str | Path) -> Manifest:
    """Parse the manifest of ``directory``.

    Raises:
        FileNotFoundError: ``directory`` does not exist.
        CorruptStateError: anything else (the manifest is missing, unreadable (EACCES,
            EIO, ...), not a regular file, malformed, hostile, or from a newer format);
            the message names the manifest.
    """
    if not os.fspath(directory):  # "" + "/<manifest>" would read from the root directory
        raise FileNotFoundError("state '' does not exist: an empty path names no state")
    path = f"{directory}/{MANIFEST_NAME}"
    try:
        raw = _read_regular(path, MAX_MANIFEST_BYTES)
    except (FileNotFoundError, NotADirectoryError):
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"state {directory} does not exist") from None
        raise CorruptStateError(f"state {directory} has no manifest ({path} is missing)") from None
    except _Special as exc:
        raise CorruptStateError(f"state {directory}: manifest {exc}") from None
    except OSError as exc:
        raise CorruptStateError(
            f"state {directory}: manifest {path} cannot be read: {exc.strerror or exc}"
        ) from exc
    return parse(raw, f"state {directory}: manifest {path}")


_HEADER = re.compile(
    rb'\{\n "format": "statekeep\.state",\n "version": \d{1,9},\n'
    rb' "created_at": "([^"\\]{1,64})",\n "sequence": (\d{1,19}),\n'
)


def read_order(directory: str) -> tuple[float, int] | None:
    """(created_at as a timestamp, sequence) from the head of ``directory``'s manifest.

    Only orders states: it reads the first 512 bytes and checks nothing else, so a
    caller must still :func:`read_manifest` the state it picks. None when the head is
    not laid out as statekeep writes it (missing, damaged, unreadable, not a regular
    file, or written otherwise). Never raises.
    """
    try:
        fd = os.open(f"{directory}/{MANIFEST_NAME}", os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except (OSError, ValueError):
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
    sequence = int(match[2])
    try:
        created = datetime.fromisoformat(match[1].decode("ascii"))
        if created.tzinfo is None or sequence > _MAX_INT:
            return None
        stamp = created.timestamp()
    except (ValueError, OverflowError, OSError, UnicodeDecodeError):
        return None
    if not math.isfinite(stamp):
        return None
    return stamp, sequence


def _corrupt_read(root: str, rel: str, exc: OSError) -> CorruptStateError:
    return CorruptStateError(
        f"state {root} failed verification: {rel} cannot be read: {exc.strerror or exc}"
    )


def verify(directory: str | Path) -> Manifest:
    """Check ``directory`` against its manifest: same paths, sizes and checksums.

    Raises:
        FileNotFoundError: ``directory`` does not exist (or was removed meanwhile).
        CorruptStateError: anything differs or cannot be read (EACCES, EIO, a FIFO or a
            device where a file should be); the message names the state and the file.
    """
    root = os.fspath(directory)
    manifest = read_manifest(root)
    try:
        _check_files(root, manifest)
    except CorruptStateError:
        # A state pruned (renamed away) while its files were read looks like one with
        # files missing: it is gone, not corrupt, and must not be reported as damaged.
        if not os.path.isdir(root):
            raise FileNotFoundError(f"state {root} was removed while it was verified") from None
        raise
    return manifest


def _check_files(root: str, manifest: Manifest) -> None:
    """Compare the tree of ``root`` with ``manifest``; CorruptStateError names the file."""
    try:
        actual = _checksum.kinds(root, MANIFEST_NAME)
    except FileNotFoundError:
        raise FileNotFoundError(f"state {root} does not exist") from None
    except OSError as exc:
        raise _corrupt_read(root, exc.filename or root, exc) from exc
    for expected in manifest.entries:
        kind = actual.pop(expected.path, None)
        if kind == 1 and not expected.is_dir:  # the common case first: a file to check
            try:
                size, crc = _checksum.checksum_file(
                    f"{root}/{expected.path}", sync=False, expect=expected.size
                )
            except FileNotFoundError:
                kind = None  # removed since the scan
            except OSError as exc:
                raise _corrupt_read(root, expected.path, exc) from exc
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
