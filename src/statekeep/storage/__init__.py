"""Checkpoint storage backends behind the :class:`CheckpointStorage` protocol."""

from __future__ import annotations

from statekeep.storage._base import CheckpointInfo, CheckpointStorage
from statekeep.storage._memory import MemoryCheckpointStorage

__all__ = ["CheckpointInfo", "CheckpointStorage", "MemoryCheckpointStorage"]
