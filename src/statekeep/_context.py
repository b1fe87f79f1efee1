"""ExecutionContext: where a run is, in the form StateManager checkpoints."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from uuid import UUID, uuid4

import pydantic
from typing_extensions import Self

__all__ = ["ExecutionContext"]


class ExecutionContext(pydantic.BaseModel):
    """Where a run is: its session, how many rows are done, and anything else to keep.

    By convention ``last_processed_row`` counts the rows already done, so a resumed run
    starts at that row; ``data`` holds anything else the run needs back (JSON-ready).
    """

    session_id: UUID = pydantic.Field(default_factory=uuid4)
    last_processed_row: int = 0
    total_rows: int | None = None
    data: dict[str, Any] = pydantic.Field(default_factory=dict)

    def to_checkpoint(self) -> dict[str, Any]:
        """This context as a JSON-ready dict (UUIDs, datetimes and such as strings)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_checkpoint(cls, data: Mapping[str, Any]) -> Self:
        """Rebuild a context from what :meth:`to_checkpoint` returned.

        Raises:
            pydantic.ValidationError: ``data`` does not describe a valid context.
        """
        return cls.model_validate(dict(data))
