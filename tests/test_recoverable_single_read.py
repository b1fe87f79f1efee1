"""RecoverableState reads value and schema version with one load_with_info, else falls back.

The contract tests in statekeep.testing check the built-in backends (no listing, no
mismatched pair under a racing writer); these check the choice between the two paths.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from uuid import UUID

import pytest
from pydantic import BaseModel

from statekeep import (
    CheckpointInfo,
    CorruptCheckpointError,
    MemoryCheckpointStorage,
    RecoverableState,
)

KEY = "the-state"


class Old(BaseModel):
    count: int = 0


class New(BaseModel):
    count: int = 0
    label: str = "fresh"


def _label(state: dict[str, Any]) -> dict[str, Any]:
    return {**state, "label": "migrated"}


class FiveMethods:
    """A storage with only the protocol's five methods, counting what is called."""

    def __init__(self, inner: MemoryCheckpointStorage) -> None:
        self.inner = inner
        self.calls: list[str] = []

    def save(
        self,
        session_id: str | UUID,
        data: Mapping[str, Any],
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> bool:
        self.calls.append("save")
        return self.inner.save(session_id, data, metadata=metadata)

    def load(self, session_id: str | UUID) -> dict[str, Any] | None:
        self.calls.append("load")
        return self.inner.load(session_id)

    def exists(self, session_id: str | UUID) -> bool:
        return self.inner.exists(session_id)

    def delete(self, session_id: str | UUID) -> bool:
        return self.inner.delete(session_id)

    def list_checkpoints(self) -> list[CheckpointInfo]:
        self.calls.append("list_checkpoints")
        return self.inner.list_checkpoints()


class WithInfo(FiveMethods):
    """The same, plus load_with_info, without subclassing BaseCheckpointStorage."""

    def load_with_info(
        self, session_id: str | UUID
    ) -> tuple[dict[str, Any], CheckpointInfo] | None:
        self.calls.append("load_with_info")
        return self.inner.load_with_info(session_id)


@pytest.fixture
def memory() -> MemoryCheckpointStorage:
    inner = MemoryCheckpointStorage()
    with RecoverableState(
        default_state=Old(count=5), persist_state_key=KEY, persistence_enabled=True, storage=inner
    ):
        pass  # persisted at schema version 1
    inner.save("someone-else", {"count": 99}, metadata={"schema_version": 7})
    return inner


def _new(storage: Any) -> RecoverableState[New]:
    return RecoverableState(
        default_state=New(),
        persist_state_key=KEY,
        persistence_enabled=True,
        storage=storage,
        schema_version=2,
        migrations={1: _label},
    )


class TestTheStoragesOwnRead:
    """A storage with load_with_info is read once, whatever its class."""

    def test_one_read_and_no_listing(self, memory: MemoryCheckpointStorage) -> None:
        storage = WithInfo(memory)
        state = _new(storage)
        assert state.initialize() == New(count=5, label="migrated")
        assert storage.calls == ["load_with_info"]
        state.teardown()

    def test_absent_is_the_default_without_listing(self) -> None:
        storage = WithInfo(MemoryCheckpointStorage())
        state = _new(storage)
        assert state.initialize() == New()
        assert storage.calls == ["load_with_info"]
        state.teardown()

    def test_a_corrupt_checkpoint_raises_from_initialize(
        self, memory: MemoryCheckpointStorage
    ) -> None:
        found = memory._get_with_info(KEY)
        assert found is not None
        payload, info = found
        meta = json.dumps(dict(info.metadata)).encode()
        memory._put(KEY, payload[:-1], meta)  # the data cut short: no longer whole JSON
        state = _new(WithInfo(memory))
        with pytest.raises(CorruptCheckpointError, match=KEY):
            state.initialize()
        with pytest.raises(RuntimeError, match="not been initialized"):
            _ = state.current_value


class TestFiveMethodStorages:
    """A storage with only the protocol's methods still gets its schema version, by listing."""

    def test_loads_then_lists(self, memory: MemoryCheckpointStorage) -> None:
        storage = FiveMethods(memory)
        state = _new(storage)
        assert state.initialize() == New(count=5, label="migrated")
        assert storage.calls == ["load", "list_checkpoints"]
        state.teardown()

    def test_absent_is_the_default_without_listing(self) -> None:
        storage = FiveMethods(MemoryCheckpointStorage())
        state = _new(storage)
        assert state.initialize() == New()
        assert storage.calls == ["load"]
        state.teardown()
