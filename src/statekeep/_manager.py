"""StateManager and ExecutionContext: row- and time-based checkpoints of one run.

The manager decides when a checkpoint is due and turns an execution context into
storage calls; the storage (any :class:`~statekeep.CheckpointStorage`) moves the bytes.
"""

from __future__ import annotations

import inspect
import logging
import operator
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast, overload
from uuid import UUID

import pydantic

from statekeep._context import ExecutionContext
from statekeep.errors import CorruptCheckpointError, StatekeepError, StorageError
from statekeep.storage._base import CheckpointInfo, CheckpointStorage, session_key

__all__ = ["ExecutionContext", "StateManager"]

logger = logging.getLogger("statekeep")

ContextT = TypeVar("ContextT", bound=pydantic.BaseModel)

_REQUIRED_FIELDS = ("session_id", "last_processed_row")
_ids = operator.attrgetter(*_REQUIRED_FIELDS)


@dataclass(frozen=True)
class _Policy:
    """When the next checkpoint is due, as a pure function of the last save."""

    rows: int
    seconds: float | None

    def next_due(self, saved_row: int, saved_at: float) -> tuple[int, float | None]:
        """The row index and clock reading at which a checkpoint is next due."""
        return saved_row + self.rows, None if self.seconds is None else saved_at + self.seconds


def _check_policy(checkpoint_interval: int, time_interval: float | None) -> _Policy:
    if isinstance(checkpoint_interval, bool) or not isinstance(checkpoint_interval, int):
        raise TypeError(
            f"checkpoint_interval must be an int, not {type(checkpoint_interval).__name__}"
        )
    if checkpoint_interval <= 0:
        raise ValueError(f"checkpoint_interval must be positive, got {checkpoint_interval}")
    if time_interval is not None:
        if isinstance(time_interval, bool) or not isinstance(time_interval, (int, float)):
            raise TypeError(
                f"time_interval must be a number of seconds or None, "
                f"not {type(time_interval).__name__}"
            )
        if not time_interval > 0:
            raise ValueError(f"time_interval must be positive seconds, got {time_interval}")
    return _Policy(checkpoint_interval, None if time_interval is None else float(time_interval))


def _check_context_type(context_type: object) -> None:
    if not (isinstance(context_type, type) and issubclass(context_type, pydantic.BaseModel)):
        raise TypeError(f"context_type must be a pydantic BaseModel subclass, not {context_type!r}")
    missing = [name for name in _REQUIRED_FIELDS if name not in context_type.model_fields]
    if missing:
        raise TypeError(
            f"context_type {context_type.__qualname__} must have the fields "
            f"session_id and last_processed_row; missing: {', '.join(missing)}"
        )


def _takes_metadata(save: Callable[..., Any]) -> bool:
    """Whether ``save`` accepts ``metadata=`` (ondine-era backends do not)."""
    try:
        params = inspect.signature(save).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(
        p.kind is p.VAR_KEYWORD or (p.name == "metadata" and p.kind is not p.POSITIONAL_ONLY)
        for p in params
    )


def _describe(exc: pydantic.ValidationError) -> str:
    parts = [
        f"field {'.'.join(str(p) for p in err['loc']) or '<root>'!r}: {err['msg']}"
        for err in exc.errors()[:3]
    ]
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


class StateManager(Generic[ContextT]):
    """Saves a run's context every ``checkpoint_interval`` rows (or seconds) and resumes it.

    Both intervals count from the last *successful* save; before any save, from row 0
    and from when the manager was made. A failed save is logged and leaves them where
    they were, so the next row asks for a checkpoint again.

    Args:
        storage: where checkpoints go; any :class:`~statekeep.CheckpointStorage`.
        checkpoint_interval: rows between checkpoints (a positive int).
        time_interval: if set, seconds after which a checkpoint is due whatever the row.
        context_type: the pydantic model saved and loaded; it needs the fields
            ``session_id`` and ``last_processed_row``. Subclasses of
            :class:`ExecutionContext` go through ``to_checkpoint``/``from_checkpoint``,
            other models through ``model_dump(mode="json")``/``model_validate``.
        clock: seconds for ``time_interval``; monotonic by default, injectable for tests.

    Raises:
        TypeError: an argument has the wrong type, or ``context_type`` lacks a field.
        ValueError: ``checkpoint_interval`` or ``time_interval`` is not positive.
    """

    # Slots make attribute reads in should_checkpoint, the per-row hot path, cheaper.
    __slots__ = (
        "_clock",
        "_context_type",
        "_due_at",
        "_due_row",
        "_native",
        "_policy",
        "_storage",
        "_with_metadata",
    )

    @overload
    def __init__(
        self: StateManager[ExecutionContext],
        storage: CheckpointStorage,
        checkpoint_interval: int = 500,
        *,
        time_interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None: ...

    @overload
    def __init__(
        self,
        storage: CheckpointStorage,
        checkpoint_interval: int = 500,
        *,
        time_interval: float | None = None,
        context_type: type[ContextT],
        clock: Callable[[], float] = time.monotonic,
    ) -> None: ...

    def __init__(
        self,
        storage: CheckpointStorage,
        checkpoint_interval: int = 500,
        *,
        time_interval: float | None = None,
        context_type: type[Any] = ExecutionContext,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(storage, CheckpointStorage):
            raise TypeError(
                f"storage must implement CheckpointStorage (save, load, exists, delete, "
                f"list_checkpoints), not {type(storage).__name__}"
            )
        self._policy = _check_policy(checkpoint_interval, time_interval)
        _check_context_type(context_type)
        if not callable(clock):
            raise TypeError(f"clock must be callable, not {type(clock).__name__}")
        self._storage = storage
        self._with_metadata = _takes_metadata(storage.save)
        if not self._with_metadata:
            logger.warning(
                "statekeep: %s.save takes no metadata argument; checkpoints are saved without it",
                type(storage).__name__,
            )
        self._context_type: type[ContextT] = context_type
        self._native = issubclass(context_type, ExecutionContext)
        self._clock = clock
        self._due_row, self._due_at = self._policy.next_due(0, self._now())

    @property
    def storage(self) -> CheckpointStorage:
        """The storage checkpoints go to."""
        return self._storage

    @property
    def checkpoint_interval(self) -> int:
        """Rows between checkpoints."""
        return self._policy.rows

    @property
    def time_interval(self) -> float | None:
        """Seconds between checkpoints, or None when only rows count."""
        return self._policy.seconds

    @property
    def context_type(self) -> type[ContextT]:
        """The model :meth:`load_checkpoint` returns."""
        return self._context_type

    def _now(self) -> float:
        # Without a time interval the clock is never read.
        return 0.0 if self._policy.seconds is None else self._clock()

    def should_checkpoint(self, current_row: int) -> bool:
        """Whether a checkpoint is due at ``current_row`` (or by the clock)."""
        # Called once per row: compare against thresholds precomputed at each save.
        if current_row >= self._due_row:
            return True
        due_at = self._due_at
        return due_at is not None and self._clock() >= due_at

    def save_checkpoint(self, context: ContextT) -> bool:
        """Save ``context`` under its session; True on success.

        Never raises: a failure (storage error, unserialisable data, wrong context
        type) is logged and returns False without moving the intervals on.
        """
        try:
            if not isinstance(context, self._context_type):
                raise TypeError(
                    f"context is a {type(context).__name__}, "
                    f"this manager saves {self._context_type.__qualname__}"
                )
            session_id, row = _ids(context)
            if isinstance(row, bool) or not isinstance(row, int):
                raise TypeError(f"last_processed_row must be an int, not {type(row).__name__}")
            if isinstance(context, ExecutionContext):
                payload = context.to_checkpoint()
            else:
                payload = context.model_dump(mode="json")
            if self._with_metadata:
                metadata = {
                    "last_processed_row": row,
                    "total_rows": getattr(context, "total_rows", None),
                }
                saved = self._storage.save(session_id, payload, metadata=metadata)
            else:
                saved = self._storage.save(session_id, payload)
            if not saved:
                raise StorageError(f"{type(self._storage).__name__}.save returned False")
        except Exception as exc:
            logger.error(
                "statekeep: checkpoint of session %s failed: %s: %s",
                getattr(context, "session_id", "<unknown>"),
                type(exc).__name__,
                exc,
                exc_info=exc,
            )
            return False
        self._due_row, self._due_at = self._policy.next_due(row, self._now())
        logger.debug("statekeep: checkpoint of session %s saved at row %d", session_id, row)
        return True

    def load_checkpoint(self, session_id: str | UUID) -> ContextT | None:
        """The session's saved context, or None when it has no checkpoint.

        Raises:
            CorruptCheckpointError: a checkpoint exists but is not a valid context
                (the message names the session and the field).
            StorageError: the storage failed.
        """
        key = session_key(session_id)
        data = self._storage.load(session_id)
        if data is None:
            return None
        what = f"checkpoint of session {key!r}"
        name = self._context_type.__qualname__
        try:
            if self._native:
                native = cast("type[ExecutionContext]", self._context_type)
                context = cast(ContextT, native.from_checkpoint(data))
            else:
                context = self._context_type.model_validate(dict(data))
        except pydantic.ValidationError as exc:
            raise CorruptCheckpointError(f"{what} is not a valid {name}: {_describe(exc)}") from exc
        except (TypeError, ValueError, KeyError) as exc:
            raise CorruptCheckpointError(f"{what} is not a valid {name}: {exc}") from exc
        stored = _ids(context)[0]
        if str(stored) != key:
            raise CorruptCheckpointError(
                f"{what} holds field 'session_id' = {str(stored)!r}, another session"
            )
        return context

    def can_resume(self, session_id: str | UUID) -> bool:
        """Whether the session has a checkpoint (which :meth:`load_checkpoint` may still reject)."""
        return self._storage.exists(session_id)

    def cleanup_checkpoints(self, session_id: str | UUID) -> bool:
        """Delete the session's checkpoint; False when there was none or the storage failed."""
        try:
            deleted = self._storage.delete(session_id)
        except (StatekeepError, OSError) as exc:
            logger.error(
                "statekeep: deleting the checkpoint of session %s failed: %s", session_id, exc
            )
            return False
        if deleted:
            logger.debug("statekeep: checkpoint of session %s deleted", session_id)
        return deleted

    def list_checkpoints(self) -> list[CheckpointInfo]:
        """Every checkpoint in the storage, with its metadata (``last_processed_row``, ...)."""
        return self._storage.list_checkpoints()
