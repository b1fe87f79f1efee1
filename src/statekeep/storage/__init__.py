"""Checkpoint storage backends behind the :class:`CheckpointStorage` protocol.

The S3 and PostgreSQL backends import boto3 and psycopg only when constructed
(``pip install statekeep[s3]`` / ``statekeep[postgres]``).
"""

from __future__ import annotations

from statekeep.storage._base import BaseCheckpointStorage, CheckpointInfo, CheckpointStorage
from statekeep.storage._file import FileCheckpointStorage
from statekeep.storage._memory import MemoryCheckpointStorage
from statekeep.storage._postgres import PostgresCheckpointStorage
from statekeep.storage._s3 import S3CheckpointStorage
from statekeep.storage._sqlite import SQLiteCheckpointStorage

__all__ = [
    "BaseCheckpointStorage",
    "CheckpointInfo",
    "CheckpointStorage",
    "FileCheckpointStorage",
    "MemoryCheckpointStorage",
    "PostgresCheckpointStorage",
    "S3CheckpointStorage",
    "SQLiteCheckpointStorage",
]
