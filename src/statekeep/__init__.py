"""statekeep: save program state often and cheaply; come back exactly where you were.

Every save is atomic (a reader sees all of it or none of it), durable (fsynced) by
default and verified on load; see the documentation for the guarantees.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from statekeep._keeper import LatestStatesKeeper
from statekeep._order import KeepAny, KeepBest, KeepEvery, KeepLatest, RetentionPolicy, StateInfo
from statekeep._pickle import load_pickle, save_pickle
from statekeep._store import PersistentStateMixin, StateStore, verify_state
from statekeep.errors import (
    CorruptCheckpointError,
    CorruptStateError,
    MissingComponentsError,
    StateExistsError,
    StatekeepError,
    StateValidationError,
    StateVersionError,
    StorageError,
)

if TYPE_CHECKING:  # these load pydantic: imported on first use, by __getattr__ below
    from statekeep._context import ExecutionContext
    from statekeep._manager import StateManager
    from statekeep._recoverable import RecoverableState
    from statekeep.storage import (
        BaseCheckpointStorage,
        CheckpointInfo,
        CheckpointStorage,
        FileCheckpointStorage,
        MemoryCheckpointStorage,
        PostgresCheckpointStorage,
        S3CheckpointStorage,
        SQLiteCheckpointStorage,
    )

__version__ = "0.1.0"

__all__ = [
    "BaseCheckpointStorage",
    "CheckpointInfo",
    "CheckpointStorage",
    "CorruptCheckpointError",
    "CorruptStateError",
    "ExecutionContext",
    "FileCheckpointStorage",
    "KeepAny",
    "KeepBest",
    "KeepEvery",
    "KeepLatest",
    "LatestStatesKeeper",
    "MemoryCheckpointStorage",
    "MissingComponentsError",
    "PersistentStateMixin",
    "PostgresCheckpointStorage",
    "RecoverableState",
    "RetentionPolicy",
    "S3CheckpointStorage",
    "SQLiteCheckpointStorage",
    "StateExistsError",
    "StateInfo",
    "StateManager",
    "StateStore",
    "StateValidationError",
    "StateVersionError",
    "StatekeepError",
    "StorageError",
    "load_pickle",
    "save_pickle",
    "verify_state",
]

# The modules of the names in __all__ that are not imported above. Importing statekeep
# (and running the statekeep command) stays light: pydantic loads when one is first used.
_LAZY = ("statekeep.storage", "statekeep._context", "statekeep._manager", "statekeep._recoverable")


def __getattr__(name: str) -> Any:
    if name in __all__:
        for module in _LAZY:
            value = getattr(importlib.import_module(module), name, __getattr__)
            if value is not __getattr__:
                globals()[name] = value
                return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
