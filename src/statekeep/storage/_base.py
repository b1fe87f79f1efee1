"""The CheckpointStorage protocol, CheckpointInfo, and what every backend shares.

Every backend stores the same thing for the same call: the session key is the string
form of the id (a UUID and ``str(uuid)`` name one checkpoint), and data and metadata
are stored as the JSON that pydantic dumps them to, so a value comes back the same
from every backend (datetimes, UUIDs and Decimals as strings, bytes as base64).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any, Protocol, runtime_checkable
from uuid import UUID

import pydantic_core
from typing_extensions import Self

__all__ = [
    "CheckpointInfo",
    "CheckpointStorage",
    "ClosingContext",
    "decode",
    "encode",
    "session_key",
]


@runtime_checkable
class CheckpointStorage(Protocol):
    """**Protocol:** where a :class:`~statekeep.StateManager` keeps one checkpoint per session.

    Implement these five methods to bring your own backend, then run
    :mod:`statekeep.testing` over it.
    """

    def save(
        self,
        session_id: str | UUID,
        data: Mapping[str, Any],
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> bool:
        """Atomically replace the session's checkpoint; return True or raise a typed error."""
        ...

    def load(self, session_id: str | UUID) -> dict[str, Any] | None:
        """The session's data, or None when it has no checkpoint."""
        ...

    def exists(self, session_id: str | UUID) -> bool:
        """Whether the session has a checkpoint."""
        ...

    def delete(self, session_id: str | UUID) -> bool:
        """Remove the session's checkpoint; False when there was none."""
        ...

    def list_checkpoints(self) -> list[CheckpointInfo]:
        """Every checkpoint's session, time, size and metadata, without the data."""
        ...


@dataclass(frozen=True)
class CheckpointInfo:
    """What a storage knows of one checkpoint besides its data."""

    session_id: str
    timestamp: datetime
    size_bytes: int
    metadata: Mapping[str, Any] = field(default_factory=dict)


class ClosingContext:
    """What every bundled backend shares: ``with backend:`` closes it on the way out."""

    def close(self) -> None:
        """Release what the backend holds. Idempotent."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


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
