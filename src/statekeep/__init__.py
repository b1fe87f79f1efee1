"""statekeep: save program state often and cheaply; come back exactly where you were.

Every save is atomic (a reader sees all of it or none of it), durable (fsynced) by
default and verified on load; see the documentation for the guarantees.
"""

from __future__ import annotations

from statekeep._context import ExecutionContext
from statekeep._keeper import LatestStatesKeeper
from statekeep._manager import StateManager
from statekeep._order import KeepAny, KeepBest, KeepEvery, KeepLatest, RetentionPolicy, StateInfo
from statekeep._pickle import load_pickle, save_pickle
from statekeep._recoverable import RecoverableState
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
