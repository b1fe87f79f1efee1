# Ported from crawlee (https://github.com/apify/crawlee), test/core/recoverable_state.test.ts
# at commit 69a824b77a2ce5ed48ef6bca5a0a54d5ce504ac4 (the one test suite crawlee has for its
# RecoverableState; crawlee-python has none of its own, and its persistence test
# tests/unit/_statistics/test_persistence.py at 8ea5bde72c63a1dde727e54f77d583cda103d3be is
# re-expressed at the end). Copyright Apify Technologies s.r.o., licensed under the Apache
# License, Version 2.0 (http://www.apache.org/licenses/LICENSE-2.0); this port is modified.
#
# What changed, and only because a port must:
# - TypeScript/vitest -> Python/pytest; ``async``/``await`` dropped (statekeep is
#   synchronous); camelCase names -> crawlee-python's snake_case (``persistStateKey`` ->
#   ``persist_state_key``, ``currentValue`` -> ``current_value``, ``persistState`` ->
#   ``persist_state``).
# - The state is a pydantic model (as in crawlee-python), not a plain object.
# - A KeyValueStore -> a MemoryCheckpointStorage passed as ``storage=`` (crawlee's default
#   store comes from a service locator; here every test passes its storage), and
#   ``store.getValue(key)`` -> ``storage.load(key)``.
# - crawlee's PERSIST_STATE event listener -> statekeep's autosave thread
#   (``persist_interval``); ``vi.spyOn(store, 'setValue').mockRejectedValue`` -> a storage
#   whose ``save`` raises.
# - Where statekeep deliberately differs (docs/coming-from-crawlee.md says why), the test
#   is kept as crawlee wrote it and marked ``xfail(strict=True)`` with the reason.
#
# Left out (crawlee's tests that cannot be expressed on statekeep), one line each:
# - "should keep pre-initialization modifications when there is nothing to restore" and
#   "should overwrite a pre-initialization state with a restored record": crawlee-JS only
#   (reset() before initialize() with persistence on); crawlee-python raises there, as
#   statekeep does.
# - "should handle custom classes with serialize/deserialize", and the six tests of
#   "schemas as conversions" but one: crawlee-JS's serialize/deserialize/zod options; a
#   pydantic model carries its own (de)serialization. The one kept is "should throw a
#   StateValidationError on an invalid record".
# - "should call a defaultState factory afresh for every reset": crawlee-JS's factory
#   default; default_state is a model instance in crawlee-python and statekeep.
# - "reset should be undone by the next initialize, unless the record is cleared too" and
#   the three "resetStore ..." tests: crawlee-JS's resetStore() has no counterpart.
# - "should persist into the store given as a pending open()" and "should await a pending
#   open() even without initialization": a store given as a promise has no counterpart.
# - "should time out a persistence call that takes too long": crawlee-JS's
#   persistenceTimeoutMillis has no counterpart.

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Mapping
from typing import Any
from uuid import UUID

import pytest
from pydantic import BaseModel

from statekeep import MemoryCheckpointStorage, RecoverableState, StateValidationError

WAIT = 30.0


class Data(BaseModel):
    nested: str = "value"


class TestState(BaseModel):
    __test__ = False  # not a pytest class
    counter: int = 0
    message: str = "hello"
    data: Data = Data()


default_state = TestState()
DEFAULT_DUMP = {"counter": 0, "message": "hello", "data": {"nested": "value"}}


class FailingStorage(MemoryCheckpointStorage):
    """``vi.spyOn(store, 'setValue').mockRejectedValue(new Error('store is on fire'))``."""

    def __init__(self) -> None:
        super().__init__()
        self.attempted = threading.Event()

    def save(
        self,
        session_id: str | UUID,
        data: Mapping[str, Any],
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> bool:
        self.attempted.set()
        raise OSError("store is on fire")


def test_should_initialize_with_default_state_when_persistence_is_disabled() -> None:
    recoverable_state = RecoverableState(
        default_state=default_state, persist_state_key="test-key", persistence_enabled=False
    )
    state = recoverable_state.initialize()
    assert state == default_state
    assert state is not default_state  # Should be a deep copy
    assert recoverable_state.current_value == default_state


def test_should_throw_when_accessing_current_value_before_it_has_been_established() -> None:
    recoverable_state = RecoverableState(
        default_state=default_state, persist_state_key="test-key", persistence_enabled=False
    )
    with pytest.raises(RuntimeError):
        recoverable_state.current_value  # noqa: B018


def test_should_establish_a_deep_copy_of_the_default_state_on_a_synchronous_reset() -> None:
    recoverable_state = RecoverableState(
        default_state=default_state, persist_state_key="test-key", persistence_enabled=False
    )
    recoverable_state.reset()
    assert recoverable_state.current_value == default_state
    assert recoverable_state.current_value is not default_state


def test_should_allow_state_modification_after_initialization() -> None:
    recoverable_state = RecoverableState(
        default_state=default_state, persist_state_key="test-key", persistence_enabled=False
    )
    recoverable_state.initialize()
    recoverable_state.current_value.counter = 42
    recoverable_state.current_value.message = "modified"
    recoverable_state.current_value.data.nested = "new value"
    assert recoverable_state.current_value.counter == 42
    assert recoverable_state.current_value.message == "modified"
    assert recoverable_state.current_value.data.nested == "new value"


def test_should_reset_state_to_default_values() -> None:
    recoverable_state = RecoverableState(
        default_state=default_state, persist_state_key="test-key", persistence_enabled=False
    )
    recoverable_state.initialize()
    recoverable_state.current_value.counter = 42
    recoverable_state.current_value.message = "modified"
    recoverable_state.reset()
    assert recoverable_state.current_value == default_state
    assert recoverable_state.current_value is not default_state  # Should be a new copy


def test_should_handle_teardown_gracefully_when_persistence_is_disabled() -> None:
    recoverable_state = RecoverableState(
        default_state=default_state, persist_state_key="test-key", persistence_enabled=False
    )
    recoverable_state.initialize()
    recoverable_state.teardown()


def test_should_start_listening_again_when_initialized_after_a_teardown() -> None:
    def listener_count() -> int:
        return len([t for t in threading.enumerate() if t.name == "statekeep-autosave-test-key"])

    recoverable_state = RecoverableState(
        default_state=default_state,
        persist_state_key="test-key",
        persistence_enabled=True,
        storage=MemoryCheckpointStorage(),
        persist_interval=3600,
    )
    recoverable_state.initialize()
    assert listener_count() == 1
    recoverable_state.teardown()
    assert listener_count() == 0
    recoverable_state.initialize()
    assert listener_count() == 1
    recoverable_state.teardown()


class _Logged(logging.Handler):
    """Sets an event when an error is logged (the autosave thread logs its failures)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.seen.set()


def test_should_warn_rather_than_throw_when_a_periodic_persist_fails() -> None:
    store = FailingStorage()
    logger = logging.getLogger("crawlee-port.periodic")
    logged = _Logged()
    logger.addHandler(logged)
    recoverable_state = RecoverableState(
        default_state=default_state,
        persist_state_key="test-key",
        persistence_enabled=True,
        storage=store,
        persist_interval=0.001,
        logger=logger,
    )
    try:
        recoverable_state.initialize()
        # An exception in the autosave thread must not escape it: it is logged.
        assert logged.seen.wait(WAIT)
        assert "store is on fire" in repr(logged.records[0].exc_info)
        with pytest.raises(OSError, match="store is on fire"):
            recoverable_state.persist_state()
    finally:
        logger.removeHandler(logged)
        with pytest.raises(OSError, match="store is on fire"):
            recoverable_state.teardown()  # see the next test


@pytest.mark.xfail(
    strict=True,
    reason="deliberate: teardown() raises when its final persist fails, instead of warning "
    "(crawlee-python raises too); see docs/coming-from-crawlee.md",
)
def test_should_warn_rather_than_throw_when_the_persist_during_teardown_fails() -> None:
    store = FailingStorage()
    recoverable_state = RecoverableState(
        default_state=default_state,
        persist_state_key="test-key",
        persistence_enabled=True,
        storage=store,
    )
    recoverable_state.initialize()
    recoverable_state.teardown()


def test_should_handle_arrays_and_complex_objects_in_deep_copy() -> None:
    class Nested(BaseModel):
        nested: str

    class WithArray(BaseModel):
        items: list[int | Nested]

    recoverable_state = RecoverableState(
        default_state=WithArray(items=[1, 2, Nested(nested="value")]),
        persist_state_key="test-key",
        persistence_enabled=False,
    )
    recoverable_state.initialize()
    recoverable_state.current_value.items.append(4)
    item = recoverable_state.current_value.items[2]
    assert isinstance(item, Nested)
    item.nested = "modified"
    recoverable_state.reset()
    assert recoverable_state.current_value.items == [1, 2, Nested(nested="value")]


def test_should_preserve_values_that_do_not_survive_json_in_the_default_deep_copy() -> None:
    class Odd(BaseModel):
        limit: float
        since: dt.datetime
        counts: dict[str, int]

    counts = {"a": 1}
    recoverable_state = RecoverableState(
        default_state=Odd(
            limit=float("inf"),
            since=dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc),
            counts=counts,
        ),
        persist_state_key="test-key",
        persistence_enabled=False,
    )
    state = recoverable_state.initialize()
    assert state.limit == float("inf")
    assert state.since == dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
    assert state.counts == counts
    assert state.counts is not counts  # Should be a deep copy


def test_should_persist_the_state_as_json_and_restore_it() -> None:
    store = MemoryCheckpointStorage()
    recoverable_state = RecoverableState(
        default_state=default_state,
        persist_state_key="test-key",
        persistence_enabled=True,
        storage=store,
    )
    recoverable_state.initialize()
    recoverable_state.current_value.counter = 42
    recoverable_state.persist_state()
    assert store.load("test-key") == {**DEFAULT_DUMP, "counter": 42}

    restored = RecoverableState(
        default_state=default_state,
        persist_state_key="test-key",
        persistence_enabled=True,
        storage=store,
    )
    assert restored.initialize() == TestState(counter=42)


def test_should_not_let_modifications_of_a_restored_state_reach_the_persisted_record() -> None:
    store = MemoryCheckpointStorage()
    store.save("test-key", {**DEFAULT_DUMP, "counter": 42})
    recoverable_state = RecoverableState(
        default_state=default_state,
        persist_state_key="test-key",
        persistence_enabled=True,
        storage=store,
    )
    recoverable_state.initialize()
    recoverable_state.current_value.data.nested = "mutated"
    assert store.load("test-key") == {**DEFAULT_DUMP, "counter": 42}


def test_should_throw_a_state_validation_error_on_an_invalid_record() -> None:
    class Schema(BaseModel):
        counter: int
        message: str

    store = MemoryCheckpointStorage()
    store.save("test-key", {"counter": "not a number", "message": "hi"})
    recoverable_state = RecoverableState(
        default_state=Schema(counter=0, message=""),
        persist_state_key="test-key",
        persistence_enabled=True,
        storage=store,
    )
    with pytest.raises(StateValidationError):
        recoverable_state.initialize()


@pytest.mark.xfail(
    strict=True,
    reason="deliberate: a value that does not validate leaves the state uninitialized "
    "(or, with on_invalid='reset', starts from the default); see docs/coming-from-crawlee.md",
)
def test_should_stay_usable_and_keep_persisting_after_a_caught_validation_error() -> None:
    class Schema(BaseModel):
        counter: int
        message: str

    store = MemoryCheckpointStorage()
    store.save("test-key", {"counter": "not a number", "message": "hi"})
    recoverable_state = RecoverableState(
        default_state=Schema(counter=0, message=""),
        persist_state_key="test-key",
        persistence_enabled=True,
        storage=store,
    )
    with pytest.raises(StateValidationError):
        recoverable_state.initialize()
    assert recoverable_state.current_value == Schema(counter=0, message="")
    recoverable_state.current_value.counter = 1
    recoverable_state.persist_state()
    assert store.load("test-key") == {"counter": 1, "message": ""}


@pytest.mark.xfail(
    strict=True,
    reason="deliberate, as crawlee-python: reset() also clears the persisted record "
    "(crawlee-python writes None under the key); see docs/coming-from-crawlee.md",
)
def test_reset_should_leave_the_persisted_record_alone() -> None:
    store = MemoryCheckpointStorage()
    recoverable_state = RecoverableState(
        default_state=default_state,
        persist_state_key="test-key",
        persistence_enabled=True,
        storage=store,
    )
    recoverable_state.initialize()
    recoverable_state.current_value.counter = 42
    recoverable_state.persist_state()
    recoverable_state.reset()
    assert recoverable_state.current_value.counter == 0
    record = store.load("test-key")
    assert record is not None
    assert record["counter"] == 42


@pytest.mark.xfail(
    strict=True,
    reason="deliberate, as crawlee-python: persist_state() before initialize() raises "
    "RuntimeError; see docs/coming-from-crawlee.md",
)
def test_persist_state_should_be_a_no_op_when_there_is_no_state_to_write() -> None:
    store = MemoryCheckpointStorage()
    recoverable_state = RecoverableState(
        default_state=default_state,
        persist_state_key="test-key",
        persistence_enabled=True,
        storage=store,
    )
    recoverable_state.persist_state()
    assert store.load("test-key") is None


@pytest.mark.xfail(
    strict=True,
    reason="deliberate, as crawlee-python: persist_state() before initialize() raises "
    "RuntimeError; see docs/coming-from-crawlee.md",
)
def test_persist_state_should_be_a_no_op_before_initialization() -> None:
    store = MemoryCheckpointStorage()
    recoverable_state = RecoverableState(
        default_state=default_state,
        persist_state_key="test-key",
        persistence_enabled=True,
        storage=store,
    )
    recoverable_state.persist_state()
    assert store.load("test-key") is None


def test_should_persist_into_the_store_given_as_an_open_instance(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.setenv("STATEKEEP_STATE_DIR", str(tmp_path / "default-store"))
    named_store = MemoryCheckpointStorage()
    recoverable_state = RecoverableState(
        default_state=default_state,
        persist_state_key="test-key",
        persistence_enabled=True,
        storage=named_store,
    )
    recoverable_state.initialize()
    recoverable_state.current_value.counter = 42
    recoverable_state.persist_state()
    record = named_store.load("test-key")
    assert record is not None
    assert record["counter"] == 42
    assert not (tmp_path / "default-store").exists()  # the default store was not used


# crawlee-python, tests/unit/_statistics/test_persistence.py: test_basic_persistence, on
# the model crawlee's Statistics keeps in its RecoverableState (the one field it uses).
class StatisticsState(BaseModel):
    requests_failed: int = 0


def test_basic_persistence(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("STATEKEEP_STATE_DIR", str(tmp_path))  # crawlee's default store
    key = "statistics_foo"

    with RecoverableState(
        default_state=StatisticsState(), persistence_enabled=True, persist_state_key=key
    ) as statistics:
        statistics.current_value.requests_failed = 42

    with RecoverableState(
        default_state=StatisticsState(), persistence_enabled=True, persist_state_key=key
    ) as statistics:
        pass

    assert statistics.current_value.requests_failed == 42
