"""Checkpoint storage backends behind the :class:`CheckpointStorage` protocol."""

from __future__ import annotations

from statekeep.storage._base import CheckpointInfo, CheckpointStorage
from statekeep.storage._file import FileCheckpointStorage
from statekeep.storage._memory import MemoryCheckpointStorage
from statekeep.storage._sqlite import SQLiteCheckpointStorage

__all__ = [
    "CheckpointInfo",
    "CheckpointStorage",
    "FileCheckpointStorage",
    "MemoryCheckpointStorage",
    "SQLiteCheckpointStorage",
]
