"""The CheckpointStorage protocol, CheckpointInfo, and BaseCheckpointStorage.

:class:`BaseCheckpointStorage` holds everything a backend would otherwise repeat: key
checking, JSON encoding, the self-checking blob format, the closed check, the
``(timestamp, session_id)`` order, retention, and the mapping of backend errors to
:class:`~statekeep.StorageError`, once, at the boundary. A backend that stores bytes by
name implements four raw methods (``_read``, ``_write``, ``_remove``, ``_names``); one
with columns of its own (SQLite, PostgreSQL) overrides the record methods instead.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from types import TracebackType
from typing import Any, Protocol, runtime_checkable
from uuid import UUID

from typing_extensions import Self

from statekeep.errors import CorruptCheckpointError, StatekeepError, StorageError
from statekeep.storage import _envelope
from statekeep.storage._codec import decode, encode, session_key

__all__ = [
    "BaseCheckpointStorage",
    "CheckpointInfo",
    "CheckpointStorage",
    "decode",
    "encode",
    "session_key",
]

logger = logging.getLogger("statekeep")


@runtime_checkable
class CheckpointStorage(Protocol):
    """**Protocol:** where a :class:`~statekeep.StateManager` keeps one checkpoint per session.

    Implement these five methods to bring your own backend (or subclass
    :class:`BaseCheckpointStorage`), then run :mod:`statekeep.testing` over it.
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


class BaseCheckpointStorage:
    """A base for checkpoint backends: subclass it and implement a few raw methods.

    A backend that stores bytes under a name implements:

    - ``_read(name) -> bytes | None``: the stored blob, or None when there is none;
    - ``_write(name, blob)``: replace the blob atomically (readers see old or new);
    - ``_remove(name) -> bool``: delete it, False when there was none;
    - ``_names() -> Iterable[str]``: the names of every stored blob.

    It may override ``_name(key)`` (where a session is stored; default: the key
    itself), ``_place(name)`` (that place, for messages), ``_read_head(name)`` (enough
    of the blob to hold its first line, for listing), ``_close()``, and the class
    attributes ``_errors`` (the backend's exceptions that become
    :class:`~statekeep.StorageError`, with ``__cause__`` the original) and
    ``_list_threads`` (parallel header reads while listing).

    Everything else is done here: session ids are checked, values encoded to JSON, each
    blob carries a header with its session id, time, size, CRC-32 and metadata that is
    checked on every read (:class:`~statekeep.CorruptCheckpointError` on a mismatch),
    listings are sorted, retention (:meth:`delete_older_than`) works, and a closed
    storage raises ValueError. Raw methods may raise ``CorruptCheckpointError``
    themselves. A backend with columns of its own (SQL) overrides the record methods
    ``_put``, ``_get``, ``_get_with_info``, ``_has``, ``_drop``, ``_infos`` instead
    (``_get_with_info(key) -> (payload, CheckpointInfo) | None`` reads both in one
    query; left out, :meth:`load_with_info` falls back to ``_get`` and a listing,
    two reads that a concurrent save can fall between).
    """

    _errors: tuple[type[BaseException], ...] = (OSError,)
    _list_threads: int = 1
    _closed: bool = False

    # -- the public API ----------------------------------------------------------------

    def save(
        self,
        session_id: str | UUID,
        data: Mapping[str, Any],
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> bool:
        """Atomically replace the session's checkpoint with ``data`` and ``metadata``.

        Raises:
            TypeError: ``data`` or ``metadata`` is not a mapping JSON can carry.
            StorageError: the backend failed; nothing was half-written.
        """
        key = self._key(session_id)
        payload = encode("data", key, data)
        meta = encode("metadata", key, metadata)
        with self._guard("save", key):
            self._put(key, payload, meta)
        return True

    def load(self, session_id: str | UUID) -> dict[str, Any] | None:
        """The session's data as a new dict; None when it has no checkpoint.

        Raises:
            CorruptCheckpointError: the checkpoint exists but is not whole.
            StorageError: the backend failed.
        """
        key = self._key(session_id)
        with self._guard("load", key):
            try:
                payload = self._get(key)
                return None if payload is None else _decode_payload(payload)
            except _envelope.Damaged as exc:
                raise self._corrupt(key, exc) from None

    def load_with_info(
        self, session_id: str | UUID
    ) -> tuple[dict[str, Any], CheckpointInfo] | None:
        """The session's data and its :class:`CheckpointInfo`, from one read of one save.

        Data, metadata, time and size always belong to the same :meth:`save`, even while
        other threads or machines save the session again; a :meth:`load` followed by a
        :meth:`list_checkpoints` could pair one save's data with another's metadata.
        The info is what :meth:`list_checkpoints` reports for the session. Not part of
        the :class:`CheckpointStorage` protocol: a backend of your own may leave it out.

        Returns:
            ``(data, info)``, or None when the session has no checkpoint.

        Raises:
            CorruptCheckpointError: the checkpoint exists but is not whole.
            StorageError: the backend failed.
        """
        key = self._key(session_id)
        with self._guard("load", key):
            try:
                found = self._get_with_info(key)
                if found is None:
                    return None
                payload, info = found
                return _decode_payload(payload), info
            except _envelope.Damaged as exc:
                raise self._corrupt(key, exc) from None

    def _corrupt(self, key: str, exc: _envelope.Damaged) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"checkpoint of session {key!r} at {self._where(key)} is corrupt: {exc}"
        )

    def exists(self, session_id: str | UUID) -> bool:
        """Whether the session has a checkpoint (whole or not)."""
        key = self._key(session_id)
        with self._guard("look up", key):
            return self._has(key)

    def delete(self, session_id: str | UUID) -> bool:
        """Remove the session's checkpoint; False when there was none."""
        key = self._key(session_id)
        with self._guard("delete", key):
            return self._drop(key)

    def list_checkpoints(self) -> list[CheckpointInfo]:
        """Every readable checkpoint, oldest first (ties by session id), without the data.

        A checkpoint whose header cannot be read is logged and left out; :meth:`load` of
        its session raises :class:`~statekeep.CorruptCheckpointError`.
        """
        self._check_open()
        with self._guard("list checkpoints", None):
            infos = list(self._infos())
        infos.sort(key=lambda info: (info.timestamp, info.session_id))
        return infos

    def delete_older_than(self, age: timedelta) -> int:
        """Delete every checkpoint saved more than ``age`` ago; return how many went.

        Raises:
            TypeError: ``age`` is not a timedelta.
            ValueError: ``age`` is negative.
            StorageError: the backend failed (what was deleted before stays deleted).
        """
        if not isinstance(age, timedelta):
            raise TypeError(f"age must be a datetime.timedelta, not {type(age).__name__}")
        if age < timedelta(0):
            raise ValueError(f"age must not be negative, got {age}")
        self._check_open()
        with self._guard("delete old checkpoints", None):
            return self._drop_older(age)

    def close(self) -> None:
        """Release what the backend holds; later calls raise ValueError. Idempotent."""
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # -- the raw methods of a blob backend ---------------------------------------------

    def _name(self, key: str) -> str:
        return key

    def _place(self, name: str) -> str:
        """Where blob ``name`` is stored, for messages."""
        return f"{self!r}/{name}"

    def _where(self, key: str) -> str:
        """Where session ``key`` is stored, for messages."""
        return self._place(self._name(key))

    def _read(self, name: str) -> bytes | None:
        raise NotImplementedError

    def _read_head(self, name: str) -> bytes | None:
        return self._read(name)

    def _write(self, name: str, blob: bytes) -> None:
        raise NotImplementedError

    def _remove(self, name: str) -> bool:
        raise NotImplementedError

    def _names(self) -> Iterable[str]:
        raise NotImplementedError

    def _close(self) -> None:
        """Release resources; called once, by the first close()."""

    def _errno(self, exc: BaseException) -> int | None:
        number = getattr(exc, "errno", None)
        return number if isinstance(number, int) else None

    # -- the record methods (a backend with columns of its own overrides these) --------

    def _put(self, key: str, payload: bytes, meta: bytes) -> None:
        self._write(self._name(key), _envelope.pack(key, payload, meta, _now()))

    def _get(self, key: str) -> bytes | None:
        blob = self._read(self._name(key))
        return None if blob is None else _envelope.unpack(key, blob)

    def _get_with_info(self, key: str) -> tuple[bytes, CheckpointInfo] | None:
        if type(self)._get is not BaseCheckpointStorage._get:
            return self._get_then_list(key)  # a record backend written before this method
        blob = self._read(self._name(key))
        if blob is None:
            return None
        header, payload = _envelope.unpack_with_header(key, blob)
        return payload, CheckpointInfo(key, header.timestamp, header.size, header.metadata)

    def _get_then_list(self, key: str) -> tuple[bytes, CheckpointInfo] | None:
        """Two reads, for a backend that overrides ``_get`` but not ``_get_with_info``."""
        payload = self._get(key)
        if payload is None:
            return None
        for info in self._infos():
            if info.session_id == key:
                return payload, info
        raise _envelope.Damaged("its time and metadata cannot be read")

    def _has(self, key: str) -> bool:
        return self._read_head(self._name(key)) is not None

    def _drop(self, key: str) -> bool:
        return self._remove(self._name(key))

    def _infos(self) -> Iterable[CheckpointInfo]:
        names = list(self._names())
        if self._list_threads > 1 and len(names) > 1:
            with ThreadPoolExecutor(min(self._list_threads, len(names))) as pool:
                found = list(pool.map(self._info, names))
        else:
            found = [self._info(name) for name in names]
        return [info for info in found if info is not None]

    def _info(self, name: str) -> CheckpointInfo | None:
        try:
            head = self._read_head(name)
            if head is None:
                return None  # deleted while listing
            header = _envelope.parse_header(head)
            if self._name(header.session_id) != name:
                raise _envelope.Damaged(f"it holds session {header.session_id!r}")
        except (_envelope.Damaged, CorruptCheckpointError) as exc:
            logger.warning("statekeep: skipping corrupt checkpoint %s: %s", self._place(name), exc)
            return None
        return CheckpointInfo(header.session_id, header.timestamp, header.size, header.metadata)

    def _drop_older(self, age: timedelta) -> int:
        cutoff = _now() - age
        return sum(
            1
            for info in self.list_checkpoints()
            if info.timestamp < cutoff and self._drop(info.session_id)
        )

    # -- shared plumbing ---------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self!r} is closed")

    def _key(self, session_id: str | UUID) -> str:
        self._check_open()
        return session_key(session_id)

    @contextmanager
    def _guard(self, action: str, key: str | None) -> Iterator[None]:
        """Map the backend's errors to StorageError, once, at the boundary."""
        try:
            yield
        except StatekeepError:
            raise
        except self._errors as exc:
            what = f"session {key!r} at {self._where(key)}" if key is not None else repr(self)
            message = f"could not {action} {what}: {exc}"
            number = self._errno(exc)
            error = StorageError(message) if number is None else StorageError(number, message)
            raise error from exc


def _decode_payload(payload: bytes) -> dict[str, Any]:
    try:
        return decode(payload)
    except (ValueError, RecursionError) as exc:
        raise _envelope.Damaged(f"the payload is not a JSON object: {exc}") from None


def _now() -> datetime:
    return datetime.now(timezone.utc)
