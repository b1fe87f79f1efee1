"""The self-checking form of one checkpoint as a single blob (file, object, dict value).

A blob is two lines. The first is a JSON header: format, version, session id, time,
payload size and CRC-32, metadata, and last a CRC-32 of the header itself, so a listing
reads one line per checkpoint. The second is the payload: the data as compact JSON.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from statekeep.storage._codec import decode

__all__ = [
    "FORMAT",
    "VERSION",
    "Damaged",
    "Header",
    "pack",
    "parse_header",
    "unpack",
    "unpack_with_header",
]

FORMAT = "statekeep-checkpoint"
VERSION = 1
_CRC_FIELD = b',"header_crc32":'


class Damaged(Exception):
    """Why a stored checkpoint could not be read (turned into CorruptCheckpointError)."""


@dataclass(frozen=True)
class Header:
    """The checked header line of a blob."""

    session_id: str
    timestamp: datetime
    size: int
    crc32: int
    metadata: dict[str, Any]
    length: int  # bytes of the header line, newline included


def pack(key: str, payload: bytes, meta: bytes, stamp: datetime) -> bytes:
    """The blob of one checkpoint: header line, payload, newline."""
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
    header = body + _CRC_FIELD + str(zlib.crc32(body)).encode() + b"}\n"
    return b"".join((header, payload, b"\n"))


def parse_header(raw: bytes) -> Header:
    """Check and parse the header line at the start of ``raw``.

    Raises:
        Damaged: the header is truncated, altered or malformed.
    """
    end = raw.find(b"\n") + 1
    if not end:
        raise Damaged("the header line is truncated")
    body, sep, tail = raw[: end - 1].rpartition(_CRC_FIELD)
    if not sep or not tail.endswith(b"}") or not tail[:-1].isdigit():
        raise Damaged("the header line has no checksum")
    if zlib.crc32(body) != int(tail[:-1]):
        raise Damaged("the header checksum does not match")
    try:
        fields = decode(body + b"}")
    except (ValueError, RecursionError) as exc:
        raise Damaged(f"the header is not valid JSON: {exc}") from None
    if fields.get("format") != FORMAT:
        raise Damaged(f"the format is {fields.get('format')!r}, expected {FORMAT!r}")
    if fields.get("version") != VERSION:
        raise Damaged(f"format version {fields.get('version')!r} is not {VERSION}")
    try:
        stamp = datetime.fromisoformat(fields["timestamp"])
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=timezone.utc)  # statekeep always writes UTC
        for name, kind in (("session_id", str), ("size", int), ("crc32", int), ("metadata", dict)):
            if not isinstance(fields[name], kind):
                raise Damaged(f"header field {name!r} has the wrong type")
    except (KeyError, TypeError, ValueError) as exc:
        raise Damaged(f"the header is malformed: {exc!r}") from None
    return Header(
        fields["session_id"], stamp, fields["size"], fields["crc32"], fields["metadata"], end
    )


def unpack(key: str, raw: bytes) -> bytes:
    """The payload of blob ``raw`` of session ``key``, checked against its header.

    Raises:
        Damaged: the blob is not whole, or belongs to another session.
    """
    return unpack_with_header(key, raw)[1]


def unpack_with_header(key: str, raw: bytes) -> tuple[Header, bytes]:
    """The header and payload of blob ``raw`` of session ``key``, the payload checked.

    Raises:
        Damaged: the blob is not whole, or belongs to another session.
    """
    header = parse_header(raw)
    if header.session_id != key:
        raise Damaged(f"it holds session {header.session_id!r}")
    size = len(raw) - header.length - 1
    if size != header.size or not raw.endswith(b"\n"):
        raise Damaged(f"the payload is {size} bytes, header says {header.size}")
    payload = raw[header.length : -1]
    if zlib.crc32(payload) != header.crc32:
        raise Damaged("the payload checksum does not match")
    return header, payload
