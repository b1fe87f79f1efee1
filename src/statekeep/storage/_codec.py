"""Session keys and the JSON every backend stores.

The session key is the string form of the id (a UUID and ``str(uuid)`` name one
checkpoint), and data and metadata are stored as the JSON that pydantic dumps them to,
so a value comes back the same from every backend (datetimes, UUIDs and Decimals as
strings, bytes as base64).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from uuid import UUID

import pydantic_core

__all__ = ["decode", "encode", "session_key"]


def session_key(session_id: str | UUID) -> str:
    """The canonical string a backend stores a session under.

    Raises:
        TypeError: ``session_id`` is neither a str nor a UUID.
        ValueError: ``session_id`` is empty or holds NUL.
    """
    if isinstance(session_id, UUID):
        return str(session_id)
    if not isinstance(session_id, str):
        raise TypeError(f"session_id must be a str or UUID, not {type(session_id).__name__}")
    if not session_id:
        raise ValueError("session_id must not be empty")
    if "\0" in session_id:
        raise ValueError(f"session_id {session_id!r} must not contain NUL")
    if not session_id.isascii():
        try:
            session_id.encode()
        except UnicodeEncodeError:
            raise ValueError(f"session_id {session_id!r} is not valid Unicode") from None
    return session_id


def encode(what: str, key: str, value: Mapping[str, Any] | None) -> bytes:
    """Dump ``value`` to compact JSON the way every backend stores it.

    Raises:
        TypeError: ``value`` is not a mapping, or holds something JSON cannot carry.
    """
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise TypeError(
            f"checkpoint {what} for session {key!r} must be a mapping, not {type(value).__name__}"
        )
    try:
        return pydantic_core.to_json(value, bytes_mode="base64", inf_nan_mode="constants")
    except pydantic_core.PydanticSerializationError as exc:
        raise TypeError(
            f"checkpoint {what} for session {key!r} cannot be stored as JSON: {exc}"
        ) from None


def decode(raw: bytes | str) -> dict[str, Any]:
    """Parse JSON written by :func:`encode`."""
    # A str skips json's encoding sniffing of bytes; encode() always writes UTF-8.
    value = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, found {type(value).__name__}")
    return value
