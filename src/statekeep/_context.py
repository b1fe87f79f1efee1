"""ExecutionContext: where a run is, in the form StateManager checkpoints."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from uuid import UUID, uuid4

import pydantic
from typing_extensions import Self

from statekeep.storage._base import session_key

__all__ = ["ExecutionContext"]


class ExecutionContext(pydantic.BaseModel):
    """Where a run is: its session, the rows done, and anything else to keep.

    ``last_processed_row`` is a watermark, as in ondine 2.1.1: the highest row index such
    that every row at or below it is done; ``-1`` means none is done yet, and a resumed run
    starts at ``last_processed_row + 1``. Rows that finish out of order are reported with
    :meth:`complete_rows`, which moves the watermark only across rows with no gap beneath
    them; the rows finished ahead of a gap wait in ``pending_completions``, which is not
    part of the checkpoint (after a crash they are done again). ``data`` holds anything
    else the run needs back (JSON-ready).

    ``session_id`` is a ``UUID`` (a new one by default, so give one that stays the same
    across restarts to resume) or a non-empty string; a string in a UUID's canonical form
    is read as that UUID.
    """

    session_id: UUID | str = pydantic.Field(default_factory=uuid4)
    """The run's name in the storage: a UUID or a non-empty string; new ``uuid4()`` by default."""

    last_processed_row: int = pydantic.Field(default=-1, ge=-1)
    """The watermark: every row at or below it is done; ``-1`` when none is."""

    pending_completions: set[int] = pydantic.Field(default_factory=set, exclude=True, repr=False)
    """Rows done above a gap, waiting for the rows below; not part of the checkpoint."""

    total_rows: int | None = None
    """How many rows the run has, if known."""

    data: dict[str, Any] = pydantic.Field(default_factory=dict)
    """Anything else the run needs back; it must be JSON-ready."""

    @pydantic.field_validator("session_id", mode="before")
    @classmethod
    def _uuid_if_it_is_one(cls, value: object) -> object:
        """A string in a UUID's canonical form becomes that UUID; other strings stay strings.

        A UUID and its string form name the same checkpoint, so a context loaded back
        from JSON has the same ``session_id`` it was saved with.
        """
        if isinstance(value, str):
            try:
                as_uuid = UUID(value)
            except ValueError:
                return value
            return as_uuid if str(as_uuid) == value else value
        return value

    @pydantic.field_validator("session_id")
    @classmethod
    def _valid_key(cls, value: UUID | str) -> UUID | str:
        session_key(value)  # empty, NUL or unencodable: ValueError, reported by pydantic
        return value

    def update_row(self, row_index: int) -> None:
        """Force the watermark to ``row_index``, for callers that finish rows in order.

        Anything that finishes rows out of order must use :meth:`complete_rows`, which
        never moves the watermark past a gap.
        """
        self.last_processed_row = row_index

    def complete_rows(self, first_row_index: int, count: int = 1) -> None:
        """Mark ``count`` rows from ``first_row_index`` done.

        The watermark moves up only across rows with no gap beneath them, so after a
        crash everything at or below it really was done. Rows reported ahead of a gap
        wait in ``pending_completions`` until the gap closes; reporting a row twice, or a
        row already under the watermark, changes nothing.

        Raises:
            TypeError: an argument is not an int.
            ValueError: ``first_row_index`` is negative or ``count`` is less than 1.
        """
        for name, value in (("first_row_index", first_row_index), ("count", count)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, not {type(value).__name__}")
        if first_row_index < 0:
            raise ValueError(f"first_row_index must be >= 0, got {first_row_index}")
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        watermark = self.last_processed_row
        pending = self.pending_completions
        pending.update(range(max(first_row_index, watermark + 1), first_row_index + count))
        while watermark + 1 in pending:
            watermark += 1
            pending.discard(watermark)
        self.last_processed_row = watermark

    def to_checkpoint(self) -> dict[str, Any]:
        """This context as a JSON-ready dict, without ``pending_completions``."""
        return self.model_dump(mode="json")

    @classmethod
    def from_checkpoint(cls, data: Mapping[str, Any]) -> Self:
        """Rebuild a context from what :meth:`to_checkpoint` returned.

        Raises:
            pydantic.ValidationError: ``data`` does not describe a valid context.
        """
        return cls.model_validate(dict(data))
