"""The exceptions statekeep raises.

Every error subclasses :class:`StatekeepError` and, where one fits, the builtin
exception a caller would already catch::

    StatekeepError(Exception)
    ├── StateExistsError(StatekeepError, FileExistsError)
    ├── CorruptStateError(StatekeepError, ValueError)       a snapshot failed verification
    ├── CorruptCheckpointError(StatekeepError, ValueError)  a checkpoint could not be read
    └── StorageError(StatekeepError, OSError)               the backend failed

All of them pickle and unpickle to an equal error, so they cross process
boundaries (``multiprocessing``, ``concurrent.futures``) intact.
"""

from __future__ import annotations

__all__ = [
    "CorruptCheckpointError",
    "CorruptStateError",
    "StateExistsError",
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


class StorageError(StatekeepError, OSError):
    """A storage backend failed; ``__cause__`` holds the underlying error."""
