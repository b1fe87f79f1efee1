"""MemoryCheckpointStorage: the conformance suite plus what only the memory backend has."""

from __future__ import annotations

import pytest

from statekeep import MemoryCheckpointStorage
from statekeep.testing import CheckpointStorageContract


class TestMemoryContract(CheckpointStorageContract):
    """The memory backend keeps every promise of the shared contract."""

    @pytest.fixture
    def make_storage(self) -> type[MemoryCheckpointStorage]:
        return MemoryCheckpointStorage


class TestMemoryOnly:
    """purge() and use after close() behave as documented."""

    def test_purge_removes_everything(self) -> None:
        with MemoryCheckpointStorage() as storage:
            storage.save("a", {"x": 1})
            storage.save("b", {"x": 2})
            storage.purge()
            assert storage.list_checkpoints() == []
            assert storage.load("a") is None
            storage.save("a", {"x": 3})
            assert storage.load("a") == {"x": 3}

    def test_instances_do_not_share_checkpoints(self) -> None:
        with MemoryCheckpointStorage() as one, MemoryCheckpointStorage() as two:
            one.save("a", {"x": 1})
            assert two.exists("a") is False

    def test_calls_after_close_raise_value_error(self) -> None:
        storage = MemoryCheckpointStorage()
        storage.save("a", {"x": 1})
        storage.close()
        storage.close()
        for call in (storage.load, storage.exists, storage.delete):
            with pytest.raises(ValueError, match="closed"):
                call("a")
        with pytest.raises(ValueError, match="closed"):
            storage.save("a", {})
        with pytest.raises(ValueError, match="closed"):
            storage.list_checkpoints()
