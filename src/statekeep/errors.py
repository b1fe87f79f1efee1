"""The exceptions statekeep raises.

Every error subclasses :class:`StatekeepError` and, where one fits, the builtin
exception a caller would already catch::

    StatekeepError(Exception)
    ├── StateExistsError(StatekeepError, FileExistsError)
    ├── CorruptStateError(StatekeepError, ValueError)       a snapshot failed verification
    ├── CorruptCheckpointError(StatekeepError, ValueError)  a checkpoint could not be read
    ├── MissingComponentsError(StatekeepError)              a snapshot lacks registered components
    ├── StorageError(StatekeepError, OSError)               the backend failed
    └── StateValidationError(StatekeepError, ValueError)    a persisted state does not fit its model
        └── StateVersionError                               ...its schema version cannot be migrated

All of them pickle and unpickle to an equal error, so they cross process
boundaries (``multiprocessing``, ``concurrent.futures``) intact.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "CorruptCheckpointError",
    "CorruptStateError",
    "MissingComponentsError",
    "StateExistsError",
    "StateValidationError",
    "StateVersionError",
    "StatekeepError",
    "StorageError",
]


class StatekeepError(Exception):
    """Base class of every error statekeep raises on purpose."""


class StateExistsError(StatekeepError, FileExistsError):
    """A snapshot with that name is already committed; it was left untouched."""


class CorruptStateError(StatekeepError, ValueError):
    """A snapshot directory failed verification against its manifest."""


class CorruptCheckpointError(StatekeepError, ValueError):
    """A checkpoint exists but could not be read back intact."""


class MissingComponentsError(StatekeepError):
    """A snapshot does not hold every registered component; no component was loaded.

    Attributes:
        state: the snapshot's path.
        missing: the registered components it lacks.
        present: the components (or, for a snapshot that did not record them, the
            top-level names) it holds.
    """

    def __init__(
        self,
        message: str,
        *,
        state: str | None = None,
        missing: Sequence[str] = (),
        present: Sequence[str] = (),
    ) -> None:
        super().__init__(message)
        self.state = state
        self.missing = tuple(missing)
        self.present = tuple(present)


class StorageError(StatekeepError, OSError):
    """A storage backend failed; ``__cause__`` holds the underlying error."""


class StateValidationError(StatekeepError, ValueError):
    """A persisted :class:`~statekeep.RecoverableState` value does not validate as its model.

    Attributes:
        key: the ``persist_state_key`` whose persisted value failed.
        field: the dotted path of the first offending field (``"stats.pages"``), or None
            when the record as a whole is malformed.
    """

    def __init__(self, message: str, *, key: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.field = field


class StateVersionError(StateValidationError):
    """A persisted value's schema version is newer than the application's, or has no migration.

    Never answered by resetting to the default, whatever ``on_invalid`` says: the value may
    be perfectly good for a newer release of the application.
    """
