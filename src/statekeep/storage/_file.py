"""FileCheckpointStorage: one human-readable file per session, replaced atomically.

A checkpoint file holds two lines. The first is a JSON header (format, version,
session id, time, payload size and CRC-32, metadata, and last a CRC-32 of the header
itself), so listing reads one line per file. The second is the payload: the data as
compact, uncompressed JSON that a person can open and read. Files are written only
through :func:`statekeep._atomic.replace_file`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from uuid import UUID

from statekeep import _atomic
from statekeep._checksum import read_all
from statekeep.errors import CorruptCheckpointError, StorageError
from statekeep.storage._base import CheckpointInfo, ClosingContext, decode, encode, session_key

__all__ = ["FileCheckpointStorage", "file_name"]

logger = logging.getLogger("statekeep")

FORMAT = "statekeep-checkpoint"
VERSION = 1
SUFFIX = ".ckpt"
_CRC_FIELD = b',"header_crc32":'
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")
_RESERVED = frozenset(
    ["con", "prn", "aux", "nul"] + [f"{p}{i}" for p in ("com", "lpt") for i in range(10)]
)
_MAX_STEM = 160  # escapes triple a character; stay well inside 255-byte file names
_PREFIX = 100


@functools.lru_cache(maxsize=1024)  # a pure function of the key; saves re-escaping it per call
def file_name(key: str) -> str:
    """The file name of session ``key``: reversible, collision-free, safe everywhere.

    Every character outside ``[a-z0-9_-]`` (uppercase letters, ``.``, ``/``, ``\\``,
    non-ASCII) becomes ``%xx`` escapes of its UTF-8 bytes in lowercase hex, so names
    never differ only in case and never hold a separator or a dot. A bare Windows
    device name (``con``, ``lpt1``) has its first letter escaped. A stem too long for
    a file name keeps a readable prefix and adds a SHA-256 of the id after a dot (which
    no escaped stem contains); the header holds the full id and is checked on load.
    """
    stem = "".join(ch if ch in _SAFE else "".join(f"%{b:02x}" for b in ch.encode()) for ch in key)
    if stem in _RESERVED:
        stem = f"%{ord(stem[0]):02x}{stem[1:]}"
    if len(stem) > _MAX_STEM:
        prefix = stem[:_PREFIX]
        cut = prefix.rfind("%", len(prefix) - 2)
        if cut >= 0:
            prefix = prefix[:cut]
        stem = f"{prefix}.{hashlib.sha256(key.encode()).hexdigest()}"
    return stem + SUFFIX


@contextmanager
def _os_errors(action: str, where: Path) -> Iterator[None]:
    """Map an OSError to StorageError, once, at the backend boundary."""
    try:
        yield
    except OSError as exc:
        raise StorageError(exc.errno, f"could not {action} {where}: {exc}") from exc


class _Bad(Exception):
    """Why a checkpoint file could not be read (turned into CorruptCheckpointError)."""


def _header_bytes(key: str, payload: bytes, meta: bytes, stamp: datetime) -> bytes:
    fields = {
        "format": FORMAT,
        "version": VERSION,
        "session_id": key,
        "timestamp": stamp.isoformat(),
        "size": len(payload),
        "crc32": zlib.crc32(payload),
    }
    body = json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode()
    body = body[:-1] + b',"metadata":' + meta
    return body + _CRC_FIELD + str(zlib.crc32(body)).encode() + b"}\n"


def _parse_header(line: bytes) -> dict[str, Any]:
    if not line.endswith(b"\n"):
        raise _Bad("the header line is truncated")
    body, sep, tail = line[:-1].rpartition(_CRC_FIELD)
    if not sep or not tail.endswith(b"}") or not tail[:-1].isdigit():
        raise _Bad("the header line has no checksum")
    if zlib.crc32(body) != int(tail[:-1]):
        raise _Bad("the header checksum does not match")
    try:
        header = decode(body + b"}")
    except ValueError as exc:
        raise _Bad(f"the header is not valid JSON: {exc}") from None
    if header.get("format") != FORMAT:
        raise _Bad(f"the format is {header.get('format')!r}, expected {FORMAT!r}")
    if header.get("version") != VERSION:
        raise _Bad(f"format version {header.get('version')!r} is not {VERSION}")
    try:
        header["timestamp"] = datetime.fromisoformat(header["timestamp"])
        for name, kind in (("session_id", str), ("size", int), ("crc32", int), ("metadata", dict)):
            if not isinstance(header[name], kind):
                raise _Bad(f"header field {name!r} has the wrong type")
    except (KeyError, TypeError, ValueError) as exc:
        raise _Bad(f"the header is malformed: {exc!r}") from None
    return header


class FileCheckpointStorage(ClosingContext):
    """Stores each session's checkpoint in its own file under ``checkpoint_dir``.

    Saves replace the file atomically (readers see the old checkpoint or the new one)
    and, with ``durable=True``, survive power loss once :meth:`save` returns.
    Thread- and process-safe: concurrent writers of one session leave one of the
    complete values. OS errors are raised as :class:`~statekeep.StorageError`.
    """

    def __init__(
        self, checkpoint_dir: str | Path = ".checkpoints", *, durable: bool = True
    ) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.durable = durable
        self._closed = False
        with _os_errors("create checkpoint directory", self.checkpoint_dir):
            _atomic.make_root(self.checkpoint_dir, durable=durable)
            _atomic.sweep(self.checkpoint_dir)

    def _path(self, session_id: str | UUID) -> tuple[str, Path]:
        if self._closed:
            raise ValueError(f"FileCheckpointStorage({str(self.checkpoint_dir)!r}) is closed")
        key = session_key(session_id)
        return key, self.checkpoint_dir / file_name(key)

    def save(
        self,
        session_id: str | UUID,
        data: Mapping[str, Any],
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> bool:
        """Atomically replace the session's checkpoint file."""
        key, path = self._path(session_id)
        payload = encode("data", key, data)
        header = _header_bytes(key, payload, encode("metadata", key, metadata), _now())
        with _os_errors("write checkpoint", path):
            _atomic.replace_file(
                self.checkpoint_dir, path, (header, payload, b"\n"), durable=self.durable
            )
        return True

    def load(self, session_id: str | UUID) -> dict[str, Any] | None:
        """The session's data; None when absent.

        Raises:
            CorruptCheckpointError: the file exists but is truncated, altered or malformed.
            StorageError: the file could not be read.
        """
        key, path = self._path(session_id)
        try:
            raw = read_all(str(path))  # open, read, close: no buffered-file machinery
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(exc.errno, f"could not read checkpoint {path}: {exc}") from exc
        try:
            return self._parse(key, raw)
        except _Bad as exc:
            raise CorruptCheckpointError(
                f"checkpoint file {path} of session {key!r} is corrupt: {exc}"
            ) from None

    @staticmethod
    def _parse(key: str, raw: bytes) -> dict[str, Any]:
        end = raw.find(b"\n") + 1
        header = _parse_header(raw[:end] if end else raw)
        if header["session_id"] != key:
            raise _Bad(f"it holds session {header['session_id']!r}")
        payload = raw[end:]
        if len(payload) != header["size"] + 1 or not payload.endswith(b"\n"):
            raise _Bad(f"the payload is {len(payload) - 1} bytes, header says {header['size']}")
        payload = payload[:-1]
        if zlib.crc32(payload) != header["crc32"]:
            raise _Bad("the payload checksum does not match")
        try:
            return decode(payload)
        except ValueError as exc:
            raise _Bad(f"the payload is not a JSON object: {exc}") from None

    def exists(self, session_id: str | UUID) -> bool:
        """Whether the session has a checkpoint file (readable or not)."""
        _, path = self._path(session_id)
        with _os_errors("check checkpoint", path):
            try:
                os.stat(path)
            except FileNotFoundError:
                return False
        return True

    def delete(self, session_id: str | UUID) -> bool:
        """Remove the session's checkpoint file; False when there was none."""
        _, path = self._path(session_id)
        with _os_errors("delete checkpoint", path):
            try:
                _atomic.discard_committed(self.checkpoint_dir, path)
            except FileNotFoundError:
                return False
            if self.durable:
                _atomic.fsync_dir(self.checkpoint_dir)
        return True

    def list_checkpoints(self) -> list[CheckpointInfo]:
        """Every readable checkpoint, oldest first, reading only the header lines.

        A file whose header cannot be read is logged and left out; :meth:`load` of
        its session raises :class:`~statekeep.CorruptCheckpointError`.
        """
        if self._closed:
            raise ValueError(f"FileCheckpointStorage({str(self.checkpoint_dir)!r}) is closed")
        infos = []
        with _os_errors("list checkpoints in", self.checkpoint_dir):
            for entry in os.scandir(self.checkpoint_dir):
                if entry.name.endswith(SUFFIX) and entry.is_file(follow_symlinks=False):
                    info = self._info(Path(entry.path))
                    if info is not None:
                        infos.append(info)
        infos.sort(key=lambda info: (info.timestamp, info.session_id))
        return infos

    def _info(self, path: Path) -> CheckpointInfo | None:
        try:
            with open(path, "rb") as fh:
                header = _parse_header(fh.readline())
            if file_name(header["session_id"]) != path.name:
                raise _Bad(f"it holds session {header['session_id']!r}")
        except FileNotFoundError:
            return None  # deleted while listing
        except _Bad as exc:
            logger.warning("statekeep: skipping corrupt checkpoint file %s: %s", path, exc)
            return None
        return CheckpointInfo(
            header["session_id"], header["timestamp"], header["size"], header["metadata"]
        )

    def close(self) -> None:
        """Mark the storage closed (it holds no open files). Idempotent."""
        self._closed = True

    def __repr__(self) -> str:
        return f"FileCheckpointStorage({str(self.checkpoint_dir)!r}, durable={self.durable})"


def _now() -> datetime:
    return datetime.now(timezone.utc)
