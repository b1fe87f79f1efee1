"""RecoverableState: lifecycle, schema evolution, autosave consistency, exit hooks, crashes."""

from __future__ import annotations

import copy
import json
import logging
import os
import pickle
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any
from uuid import UUID

import pytest
from pydantic import BaseModel

import statekeep.storage._file as file_module
from statekeep import (
    CheckpointInfo,
    FileCheckpointStorage,
    MemoryCheckpointStorage,
    RecoverableState,
    StatekeepError,
    StateValidationError,
    StateVersionError,
)

KEY = "crawler-state"
WAIT = 30.0  # generous upper bound for events on a loaded 2-core machine


class Counter(BaseModel):
    count: int = 0
    items: list[str] = []


class Pair(BaseModel):
    a: int = 0
    b: int = 0


class Inner(BaseModel):
    value: int


class Nested(BaseModel):
    inner: Inner = Inner(value=0)
    tags: list[int] = []


class RecordingStorage:
    """A MemoryCheckpointStorage that remembers every record saved and signals each save."""

    def __init__(self, *, fail_first: int = 0) -> None:
        self.inner = MemoryCheckpointStorage()
        self.saved: list[dict[str, Any]] = []
        self.changed = threading.Condition()
        self.fail_first = fail_first

    def save(
        self,
        session_id: str | UUID,
        data: Mapping[str, Any],
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> bool:
        with self.changed:
            if self.fail_first:
                self.fail_first -= 1
                raise OSError("disk on fire")
        self.inner.save(session_id, data, metadata=metadata)
        with self.changed:
            self.saved.append(copy.deepcopy(dict(data)))
            self.changed.notify_all()
        return True

    def load(self, session_id: str | UUID) -> dict[str, Any] | None:
        return self.inner.load(session_id)

    def exists(self, session_id: str | UUID) -> bool:
        return self.inner.exists(session_id)

    def delete(self, session_id: str | UUID) -> bool:
        return self.inner.delete(session_id)

    def list_checkpoints(self) -> list[CheckpointInfo]:
        return self.inner.list_checkpoints()

    def wait_for_saves(self, count: int) -> list[dict[str, Any]]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.saved) >= count, timeout=WAIT), (
                f"only {len(self.saved)} of {count} saves happened within {WAIT}s"
            )
            return list(self.saved)


@pytest.fixture
def storage() -> Iterator[MemoryCheckpointStorage]:
    with MemoryCheckpointStorage() as store:
        yield store


def make(storage: Any, default: BaseModel | None = None, **options: Any) -> RecoverableState[Any]:
    return RecoverableState(
        default_state=default if default is not None else Counter(),
        persist_state_key=KEY,
        persistence_enabled=True,
        storage=storage,
        **options,
    )


def stored(storage: Any, version: int, state: dict[str, Any]) -> None:
    storage.save(KEY, {"schema_version": version, "state": state})


class TestConstruction:
    """Bad arguments are rejected at construction with a typed error naming them."""

    @pytest.mark.parametrize(
        ("options", "error", "match"),
        [
            ({"default_state": {"count": 1}}, TypeError, "default_state must be a pydantic"),
            (
                {"persist_state_key": "", "persistence_enabled": True},
                ValueError,
                "persist_state_key",
            ),
            ({"persist_state_key": "a\0b"}, ValueError, "persist_state_key"),
            ({"persist_state_key": 7}, TypeError, "persist_state_key"),
            ({"storage": object()}, TypeError, "CheckpointStorage"),
            ({"persist_interval": 0}, ValueError, "persist_interval"),
            ({"persist_interval": -1.0}, ValueError, "persist_interval"),
            ({"persist_interval": float("nan")}, ValueError, "persist_interval"),
            ({"persist_interval": float("inf")}, ValueError, "persist_interval"),
            ({"persist_interval": True}, ValueError, "persist_interval"),
            ({"on_invalid": "ignore"}, ValueError, "on_invalid"),
            ({"schema_version": 0}, ValueError, "schema_version"),
            ({"schema_version": "2"}, TypeError, "schema_version"),
            ({"schema_version": 2, "migrations": {2: dict}}, ValueError, "version 2"),
            ({"schema_version": 2, "migrations": {0: dict}}, ValueError, "version 0"),
            ({"schema_version": 2, "migrations": {1: "nope"}}, TypeError, "not callable"),
            ({"schema_version": 2, "migrations": [dict]}, TypeError, "mapping"),
        ],
    )
    def test_rejects(self, options: dict[str, Any], error: type[Exception], match: str) -> None:
        arguments: dict[str, Any] = {"default_state": Counter(), "persist_state_key": KEY}
        arguments.update(options)
        with pytest.raises(error, match=match):
            RecoverableState(**arguments)

    def test_design_signature(self, storage: MemoryCheckpointStorage) -> None:
        state = RecoverableState(
            default_state=Counter(count=3),
            persist_state_key=KEY,
            persistence_enabled=True,
            storage=storage,
            persist_interval=None,
            logger=logging.getLogger("app"),
        )
        assert state.initialize() == Counter(count=3)
        state.teardown()

    def test_arguments_are_keyword_only(self) -> None:
        with pytest.raises(TypeError):
            RecoverableState(Counter(), KEY)  # type: ignore[misc]


class TestLifecycle:
    """initialize, persist_state, reset, teardown and the context manager keep their promises."""

    def test_current_value_before_initialize(self, storage: MemoryCheckpointStorage) -> None:
        with pytest.raises(RuntimeError, match="initialize"):
            make(storage).current_value  # noqa: B018

    def test_initialize_deep_copies_default(self, storage: MemoryCheckpointStorage) -> None:
        default = Counter(items=["a"])
        state = make(storage, default)
        value = state.initialize()
        value.items.append("b")
        assert default.items == ["a"]
        state.reset()
        assert state.current_value.items == ["a"]
        state.teardown()

    def test_initialize_loads_persisted_value(self, storage: MemoryCheckpointStorage) -> None:
        with make(storage) as first, first.update() as value:
            value.count = 41
            value.items.append("x")
        second = make(storage)
        assert second.initialize() == Counter(count=41, items=["x"])
        second.teardown()

    def test_persisted_record_format(self, storage: MemoryCheckpointStorage) -> None:
        with make(storage, schema_version=3, migrations={1: dict, 2: dict}) as state:
            state.current_value.count = 2
            state.persist_state()
            assert storage.load(KEY) == {"count": 2, "items": []}  # the model's own dump
            (info,) = storage.list_checkpoints()
            assert info.metadata == {
                "kind": "statekeep.RecoverableState",
                "format": 2,
                "schema_version": 3,
            }

    def test_disabled_persistence_touches_nothing(self, storage: MemoryCheckpointStorage) -> None:
        state = RecoverableState(default_state=Counter(), persist_state_key=KEY, storage=storage)
        state.persist_state()  # a no-op, even before initialize
        stored(storage, 1, {"count": 5})
        value = state.initialize()
        assert value == Counter()  # the persisted value is not read either
        value.count = 9
        state.persist_state()
        state.teardown()
        assert storage.load(KEY) == {"schema_version": 1, "state": {"count": 5}}

    def test_persist_before_initialize_fails(self, storage: MemoryCheckpointStorage) -> None:
        with pytest.raises(RuntimeError, match="not initialized"):
            make(storage).persist_state()

    def test_initialize_twice_is_harmless(self, storage: MemoryCheckpointStorage) -> None:
        state = make(storage, persist_interval=3600)
        first = state.initialize()
        first.count = 4
        assert state.initialize() is first
        threads = [t for t in threading.enumerate() if t.name == f"statekeep-autosave-{KEY}"]
        assert len(threads) == 1
        assert threads[0].daemon
        state.teardown()
        assert not threads[0].is_alive()

    def test_reset_removes_persisted_value(self, storage: MemoryCheckpointStorage) -> None:
        with make(storage, Counter(count=1)) as state:
            state.current_value.count = 10
            state.persist_state()
            assert storage.exists(KEY)
            state.reset()
            assert not storage.exists(KEY)
            assert state.current_value == Counter(count=1)

    def test_reset_before_initialize_fails(self, storage: MemoryCheckpointStorage) -> None:
        with pytest.raises(RuntimeError, match="not initialized"):
            make(storage).reset()

    def test_teardown_persists_and_is_idempotent(self, storage: MemoryCheckpointStorage) -> None:
        state = make(storage)
        state.initialize().count = 8
        state.teardown()
        state.teardown()
        assert storage.load(KEY) == {"count": 8, "items": []}
        assert state.current_value.count == 8  # still readable
        with pytest.raises(RuntimeError):
            state.persist_state()
        assert storage.exists(KEY)  # a storage we did not create is left open

    def test_initialize_after_teardown_reloads(self, storage: MemoryCheckpointStorage) -> None:
        state = make(storage)
        with state:
            state.current_value.count = 3
        stored(storage, 1, {"count": 30})
        with state:
            assert state.current_value.count == 30

    def test_context_manager_returns_state(self, storage: MemoryCheckpointStorage) -> None:
        state = make(storage)
        with state as entered:
            assert entered is state
            entered.current_value.count = 6
        assert make(storage).initialize().count == 6


class TestSchemaEvolution:
    """Persisted values are migrated and validated; failures are typed, never silent resets."""

    class CounterV3(BaseModel):
        total: int
        label: str

    MIGRATIONS: Mapping[int, Any] = {
        1: lambda old: {"total": old["count"]},
        2: lambda old: {**old, "label": f"total={old['total']}"},
    }

    def test_migrates_in_order(self, storage: MemoryCheckpointStorage) -> None:
        stored(storage, 1, {"count": 3})
        default = self.CounterV3(total=0, label="")
        with make(storage, default, schema_version=3, migrations=self.MIGRATIONS) as state:
            assert state.current_value == self.CounterV3(total=3, label="total=3")
        assert storage.load(KEY) == {"total": 3, "label": "total=3"}

    def test_migrates_from_the_middle(self, storage: MemoryCheckpointStorage) -> None:
        stored(storage, 2, {"total": 5})
        default = self.CounterV3(total=0, label="")
        state = make(storage, default, schema_version=3, migrations=self.MIGRATIONS)
        assert state.initialize() == self.CounterV3(total=5, label="total=5")

    def test_missing_migration(self, storage: MemoryCheckpointStorage) -> None:
        stored(storage, 1, {"count": 3})
        state = make(storage, schema_version=3, migrations={2: dict})
        with pytest.raises(StateVersionError, match="no migration from version 1 to 2") as info:
            state.initialize()
        assert info.value.key == KEY
        assert KEY in str(info.value)

    @pytest.mark.parametrize("on_invalid", ["raise", "reset"])
    def test_newer_version_always_raises(
        self, storage: MemoryCheckpointStorage, on_invalid: str
    ) -> None:
        stored(storage, 4, {"count": 3})
        state = make(storage, schema_version=2, migrations={1: dict}, on_invalid=on_invalid)
        with pytest.raises(StateVersionError, match=r"version 4, newer than .* 2"):
            state.initialize()
        assert storage.load(KEY) == {"schema_version": 4, "state": {"count": 3}}
        with pytest.raises(RuntimeError):
            state.current_value  # noqa: B018

    def test_failing_migration(self, storage: MemoryCheckpointStorage) -> None:
        stored(storage, 1, {"total": 3})  # no "count": the migration raises KeyError
        state = make(storage, self.CounterV3(total=0, label=""), schema_version=3,
                     migrations=self.MIGRATIONS)  # fmt: skip
        with pytest.raises(StateValidationError, match="migration from version 1 to 2") as info:
            state.initialize()
        assert isinstance(info.value.__cause__, KeyError)

    def test_migration_returning_non_dict(self, storage: MemoryCheckpointStorage) -> None:
        stored(storage, 1, {"count": 3})
        state = make(storage, schema_version=2, migrations={1: lambda old: [old]})
        with pytest.raises(StateValidationError, match="returned list, not a dict"):
            state.initialize()

    @pytest.mark.parametrize(
        ("persisted", "field"),
        [
            ({"count": "many"}, "count"),
            ({"count": 1, "items": ["a", 2]}, "items.1"),
        ],
    )
    def test_invalid_value_names_key_and_field(
        self, storage: MemoryCheckpointStorage, persisted: dict[str, Any], field: str
    ) -> None:
        stored(storage, 1, persisted)
        with pytest.raises(StateValidationError) as info:
            make(storage).initialize()
        assert info.value.key == KEY
        assert info.value.field == field
        assert repr(KEY) in str(info.value)
        assert repr(field) in str(info.value)
        assert not isinstance(info.value, StateVersionError)
        assert storage.load(KEY) == {"schema_version": 1, "state": persisted}  # untouched

    def test_nested_field(self, storage: MemoryCheckpointStorage) -> None:
        stored(storage, 1, {"inner": {"value": "x"}, "tags": []})
        with pytest.raises(StateValidationError, match=r"'inner\.value'") as info:
            make(storage, Nested()).initialize()
        assert info.value.field == "inner.value"

    def test_malformed_envelope(self, storage: MemoryCheckpointStorage) -> None:
        storage.save(KEY, {"schema_version": "1", "state": {"count": 1}})
        with pytest.raises(
            StateValidationError, match="malformed RecoverableState envelope"
        ) as info:
            make(storage).initialize()
        assert info.value.key == KEY
        assert info.value.field is None

    def test_reset_option_logs_and_starts_over(
        self, storage: MemoryCheckpointStorage, caplog: pytest.LogCaptureFixture
    ) -> None:
        stored(storage, 1, {"count": "many"})
        logger = logging.getLogger("app.state")
        state = make(storage, Counter(count=1), on_invalid="reset", logger=logger)
        with caplog.at_level(logging.WARNING, logger="app.state"):
            assert state.initialize() == Counter(count=1)
        (record,) = caplog.records
        assert record.name == "app.state"
        assert record.levelno == logging.WARNING
        assert repr(KEY) in record.getMessage()
        assert "'count'" in record.getMessage()
        assert "on_invalid='reset'" in record.getMessage()
        state.teardown()
        assert storage.load(KEY) == {"count": 1, "items": []}

    def test_errors_pickle(self) -> None:
        for error in (
            StateValidationError("bad", key="k", field="a.b"),
            StateVersionError("new", key="k"),
        ):
            clone = pickle.loads(pickle.dumps(error))
            assert type(clone) is type(error)
            assert (str(clone), clone.key, clone.field) == (str(error), error.key, error.field)
            assert isinstance(clone, (StatekeepError, ValueError))


class TestAutosave:
    """The autosave thread persists on its own, stops promptly, and never saves half an update."""

    def test_autosave_persists(self) -> None:
        recording = RecordingStorage()
        with make(recording, persist_interval=0.01) as state:
            with state.update() as value:
                value.count = 5
            with recording.changed:
                assert recording.changed.wait_for(
                    lambda: any(r["count"] == 5 for r in recording.saved), timeout=WAIT
                )

    def test_teardown_stops_thread_promptly(self, storage: MemoryCheckpointStorage) -> None:
        state = make(storage, persist_interval=3600)
        state.initialize()
        (thread,) = [t for t in threading.enumerate() if t.name == f"statekeep-autosave-{KEY}"]
        started = time.monotonic()
        state.teardown()
        assert time.monotonic() - started < 5  # an hour-long interval does not delay it
        assert not thread.is_alive()

    def test_autosave_failure_is_logged_and_retried(self, caplog: pytest.LogCaptureFixture) -> None:
        recording = RecordingStorage(fail_first=1)
        with (
            caplog.at_level(logging.ERROR, logger="statekeep"),
            make(recording, persist_interval=0.01),
        ):
            recording.wait_for_saves(1)
        assert any("persisting failed" in r.getMessage() for r in caplog.records)
        assert any(isinstance(r.exc_info[1], OSError) for r in caplog.records if r.exc_info)

    def test_update_keeps_fields_consistent(self) -> None:
        recording = RecordingStorage()
        stop = threading.Event()
        state = make(recording, Pair(), persist_interval=0.0005)
        state.initialize()

        def hammer() -> None:
            while not stop.is_set():
                with state.update() as value:
                    value.a += 1
                    os.sched_yield()  # invite the autosave thread in between the two fields
                    value.b += 1

        worker = threading.Thread(target=hammer)
        worker.start()
        try:
            saved = recording.wait_for_saves(200)
        finally:
            stop.set()
            worker.join()
            state.teardown()
        records = saved
        assert any(r["a"] > 0 for r in records)
        assert all(r["a"] == r["b"] for r in records), [r for r in records if r["a"] != r["b"]]

    def test_concurrent_persists_end_with_the_newest(self) -> None:
        recording = RecordingStorage()
        state = make(recording)
        state.initialize()

        def work() -> None:
            for _ in range(50):
                with state.update() as value:
                    value.count += 1
                state.persist_state()

        workers = [threading.Thread(target=work) for _ in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert recording.load(KEY) == {"count": 200, "items": []}
        counts = [r["count"] for r in recording.saved]
        assert counts == sorted(counts)  # an older snapshot is never written after a newer one
        state.teardown()

    def test_a_stale_snapshot_is_dropped_not_written_over_a_newer_one(self) -> None:
        recording = RecordingStorage()
        state = make(recording)
        state.initialize()
        at_gate, newer_written = threading.Event(), threading.Event()

        class GatedLock:
            """The write lock, but the 'older' thread waits at it until the newer write is done."""

            def __init__(self, lock: Any) -> None:
                self.lock = lock

            def __enter__(self) -> None:
                if threading.current_thread().name == "older":
                    at_gate.set()
                    assert newer_written.wait(WAIT)
                self.lock.acquire()

            def __exit__(self, *exc: object) -> None:
                self.lock.release()

        state._io_lock = GatedLock(state._io_lock)  # type: ignore[assignment]
        with state.update() as value:
            value.count = 1
        older = threading.Thread(target=state.persist_state, name="older")
        older.start()  # snapshots count=1, then waits at the write lock
        assert at_gate.wait(WAIT)
        with state.update() as value:
            value.count = 2
        state.persist_state()  # snapshots and writes count=2
        newer_written.set()
        older.join(WAIT)
        assert [r["count"] for r in recording.saved] == [2]
        assert recording.load(KEY) == {"count": 2, "items": []}
        state.teardown()


class TestDefaultStorage:
    """Without a storage, a FileCheckpointStorage in the default directory is used and closed."""

    @pytest.fixture
    def opened(self, monkeypatch: pytest.MonkeyPatch) -> list[FileCheckpointStorage]:
        opened: list[FileCheckpointStorage] = []

        class Spy(FileCheckpointStorage):
            def __init__(self, checkpoint_dir: str | Path = ".checkpoints") -> None:
                super().__init__(checkpoint_dir)
                opened.append(self)

        monkeypatch.setattr(file_module, "FileCheckpointStorage", Spy)
        return opened

    def test_environment_variable(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, opened: list[Any]
    ) -> None:
        monkeypatch.setenv("STATEKEEP_STATE_DIR", str(tmp_path / "states"))
        state = RecoverableState(
            default_state=Counter(), persist_state_key=KEY, persistence_enabled=True
        )
        state.initialize().count = 12
        state.teardown()
        (storage,) = opened
        assert storage.checkpoint_dir == tmp_path / "states"
        with pytest.raises(ValueError, match="closed"):
            storage.load(KEY)
        with FileCheckpointStorage(tmp_path / "states") as reader:
            assert reader.load(KEY) == {"count": 12, "items": []}

    def test_default_directory(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, opened: list[Any]
    ) -> None:
        monkeypatch.delenv("STATEKEEP_STATE_DIR", raising=False)
        monkeypatch.chdir(tmp_path)
        with RecoverableState(
            default_state=Counter(count=2), persist_state_key=KEY, persistence_enabled=True
        ):
            pass
        with FileCheckpointStorage(tmp_path / ".statekeep-state") as reader:
            assert reader.load(KEY) == {"count": 2, "items": []}

    def test_closed_when_loading_fails(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, opened: list[Any]
    ) -> None:
        monkeypatch.setenv("STATEKEEP_STATE_DIR", str(tmp_path))
        with FileCheckpointStorage(tmp_path) as writer:
            writer.save(KEY, {"schema_version": 9, "state": {}})
        state = RecoverableState(
            default_state=Counter(), persist_state_key=KEY, persistence_enabled=True
        )
        with pytest.raises(StateVersionError):
            state.initialize()
        with pytest.raises(ValueError, match="closed"):
            opened[0].load(KEY)

    def test_disabled_creates_nothing(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, opened: list[Any]
    ) -> None:
        monkeypatch.chdir(tmp_path)
        with RecoverableState(default_state=Counter(), persist_state_key=KEY):
            pass
        assert opened == []
        assert list(tmp_path.iterdir()) == []


class AppHandler:
    """The application's own SIGTERM handler; it writes to a pipe so a test can wait for it."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.read_end, self.write_end = os.pipe()

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.calls.append(signum)
        os.write(self.write_end, b"x")

    def wait(self, count: int = 1) -> list[int]:
        while len(self.calls) < count:
            ready, _, _ = select.select([self.read_end], [], [], WAIT)
            assert ready, f"the application's handler was not called within {WAIT}s"
            os.read(self.read_end, 1)
        return self.calls

    def close(self) -> None:
        os.close(self.read_end)
        os.close(self.write_end)


class TestSigtermInProcess:
    """The SIGTERM hook persists off the handler, then chains; teardown gives the signal back."""

    @pytest.fixture
    def app_handler(self) -> Iterator[AppHandler]:
        handler = AppHandler()
        original = signal.signal(signal.SIGTERM, handler)
        try:
            yield handler
        finally:
            signal.signal(signal.SIGTERM, original)
            handler.close()

    def test_chains_and_persists(self, app_handler: AppHandler) -> None:
        recording = RecordingStorage()
        with make(recording, Pair(), persist_on_exit=True) as state:
            state.current_value.a = 3
            os.kill(os.getpid(), signal.SIGTERM)
            assert app_handler.wait() == [signal.SIGTERM]
            assert recording.wait_for_saves(1)[0] == {"a": 3, "b": 0}

    def test_waits_for_update_to_end(self, app_handler: AppHandler) -> None:
        recording = RecordingStorage()
        with make(recording, Pair(), persist_on_exit=True) as state:
            with state.update() as value:
                value.a = 1
                os.kill(os.getpid(), signal.SIGTERM)
                assert app_handler.wait() == [signal.SIGTERM]  # called at once
                assert recording.saved == []  # the hand-off waits for update() to end
                value.b = 1
            assert recording.wait_for_saves(1)[0] == {"a": 1, "b": 1}  # never half of it

    def test_handler_does_no_io(self, app_handler: AppHandler) -> None:
        """The storage's lock is held by the main thread when SIGTERM arrives (8.6)."""
        recording = RecordingStorage()
        state = make(recording, Pair(a=7), persist_on_exit=True)
        state.initialize()
        with recording.changed:
            # The main thread holds the storage's own lock, as a StateManager saving to
            # the same storage would: persisting inside the handler would wait for it
            # forever (with a non-reentrant lock) or write in the middle of that save.
            os.kill(os.getpid(), signal.SIGTERM)
            assert app_handler.wait() == [signal.SIGTERM]  # the handler returned
            assert recording.saved == []
        assert recording.wait_for_saves(1) == [{"a": 7, "b": 0}]
        state.teardown()

    def test_teardown_restores_handler(self, app_handler: AppHandler) -> None:
        mine = signal.getsignal(signal.SIGTERM)
        with make(RecordingStorage(), Pair(), persist_on_exit=True):
            assert signal.getsignal(signal.SIGTERM) is not mine
        assert signal.getsignal(signal.SIGTERM) is mine
        assert not [t for t in threading.enumerate() if t.name == "statekeep-sigterm"]

    def test_ignored_sigterm_stays_ignored(self) -> None:
        recording = RecordingStorage()
        original = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            with make(recording, Pair(a=5), persist_on_exit=True):
                os.kill(os.getpid(), signal.SIGTERM)
                assert recording.wait_for_saves(1)[0] == {"a": 5, "b": 0}
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        finally:
            signal.signal(signal.SIGTERM, original)

    def test_outside_main_thread(self, caplog: pytest.LogCaptureFixture) -> None:
        before = signal.getsignal(signal.SIGTERM)
        state = make(RecordingStorage(), Pair(), persist_on_exit=True)
        with caplog.at_level(logging.WARNING, logger="statekeep"):
            worker = threading.Thread(target=state.initialize)
            worker.start()
            worker.join()
        assert signal.getsignal(signal.SIGTERM) is before
        assert any("not on SIGTERM" in r.getMessage() for r in caplog.records)
        state.teardown()

    def test_disabled_persistence_installs_nothing(self) -> None:
        before = signal.getsignal(signal.SIGTERM)
        state = RecoverableState(
            default_state=Pair(), persist_state_key=KEY, persist_interval=0.01,
            persist_on_exit=True,
        )  # fmt: skip
        with state:
            assert signal.getsignal(signal.SIGTERM) is before
            assert not [
                t for t in threading.enumerate() if t.name.startswith("statekeep-autosave-")
            ]

    def test_stacked_states_each_persist_once(self, app_handler: AppHandler) -> None:
        first_storage, second_storage = RecordingStorage(), RecordingStorage()
        first = make(first_storage, Pair(a=1), persist_on_exit=True)
        second = make(second_storage, Pair(a=2), persist_on_exit=True)
        first.initialize()
        second.initialize()
        os.kill(os.getpid(), signal.SIGTERM)
        assert app_handler.wait() == [signal.SIGTERM]  # handed on once, through both
        assert first_storage.wait_for_saves(1) == [{"a": 1, "b": 0}]
        assert second_storage.wait_for_saves(1) == [{"a": 2, "b": 0}]
        second.teardown()
        first.teardown()

    def test_stacked_states_torn_down(self, app_handler: AppHandler) -> None:
        recording = RecordingStorage()
        mine = signal.getsignal(signal.SIGTERM)
        first = make(recording, Pair(), persist_on_exit=True)
        second = make(recording, Pair(), persist_on_exit=True)
        first.initialize()
        assert signal.getsignal(signal.SIGTERM) is not mine
        second.initialize()
        first.teardown()
        second.teardown()
        saves = len(recording.saved)
        os.kill(os.getpid(), signal.SIGTERM)
        assert app_handler.wait() == [signal.SIGTERM]  # reached through any pass-through
        assert len(recording.saved) == saves  # neither torn-down state persisted again


CHILD = textwrap.dedent(
    """
    import signal, sys, threading
    from pydantic import BaseModel
    from statekeep import FileCheckpointStorage, RecoverableState

    class Pair(BaseModel):
        a: int = 0
        b: int = 0

    mode, directory = sys.argv[1], sys.argv[2]
    storage = FileCheckpointStorage(directory, durable=False)
    if mode == "app-handler":
        def handler(signum, frame):
            print("app handler", flush=True)
            sys.exit(3)
        signal.signal(signal.SIGTERM, handler)
    state = RecoverableState(
        default_state=Pair(), persist_state_key="job", persistence_enabled=True,
        storage=storage, persist_on_exit=(mode != "no-hook"),
    )
    state.initialize()
    if mode == "count":
        while True:
            with state.update() as value:
                value.a += 1
                value.b += 1
            state.persist_state()
            print(value.a, flush=True)
    with state.update() as value:
        value.a = value.b = 42
    print("ready", flush=True)
    if mode in ("exit", "no-hook"):
        sys.exit(0)
    threading.Event().wait()
    """
)

RECOVER = textwrap.dedent(
    """
    import json, sys
    from pydantic import BaseModel
    from statekeep import FileCheckpointStorage, RecoverableState

    class Pair(BaseModel):
        a: int = 0
        b: int = 0

    with FileCheckpointStorage(sys.argv[1]) as storage:
        state = RecoverableState(default_state=Pair(), persist_state_key="job",
                                 persistence_enabled=True, storage=storage)
        with state:
            print(json.dumps(state.current_value.model_dump()))
    """
)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[[str], subprocess.Popen[str]]]:
    """Start the child script in a mode; any child still running at the end is killed."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    children: list[subprocess.Popen[str]] = []

    def start(mode: str) -> subprocess.Popen[str]:
        child = subprocess.Popen(
            [sys.executable, str(script), mode, str(tmp_path / "ckpt")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        children.append(child)
        return child

    yield start
    for child in children:
        if child.poll() is None:
            child.kill()
        child.communicate()


Spawn = Callable[[str], "subprocess.Popen[str]"]


def persisted(tmp_path: Path) -> dict[str, Any] | None:
    with FileCheckpointStorage(tmp_path / "ckpt") as storage:
        return storage.load("job")


def finish(child: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = child.communicate(timeout=WAIT)
    return child.returncode, out, err


class TestExitInSubprocess:
    """In a real process: persisted at normal exit and on SIGTERM, and the exit status is kept."""

    def test_atexit(self, tmp_path: Path, spawn: Spawn) -> None:
        code, out, err = finish(spawn("exit"))
        assert (code, out) == (0, "ready\n"), err
        assert persisted(tmp_path) == {"a": 42, "b": 42}

    def test_without_the_option_nothing_is_persisted(self, tmp_path: Path, spawn: Spawn) -> None:
        code, _, err = finish(spawn("no-hook"))
        assert code == 0, err
        assert persisted(tmp_path) is None

    def test_sigterm_with_default_handler(self, tmp_path: Path, spawn: Spawn) -> None:
        child = spawn("sigterm")
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        child.send_signal(signal.SIGTERM)
        code, _, err = finish(child)
        assert code == -signal.SIGTERM, err  # still dies by SIGTERM
        assert persisted(tmp_path) == {"a": 42, "b": 42}

    def test_sigterm_chains_to_application_handler(self, tmp_path: Path, spawn: Spawn) -> None:
        child = spawn("app-handler")
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        child.send_signal(signal.SIGTERM)
        code, out, err = finish(child)
        assert (code, out) == (3, "app handler\n"), err
        assert persisted(tmp_path) == {"a": 42, "b": 42}


class TestCrashRecovery:
    """A process SIGKILLed while persisting to files is recovered by the next process."""

    def test_sigkill_then_recover(self, tmp_path: Path, spawn: Spawn) -> None:
        child = spawn("count")
        assert child.stdout is not None
        last = 0
        while last < 30:
            line = child.stdout.readline()
            assert line, finish(child)
            last = int(line)
        child.kill()
        finish(child)
        assert child.returncode == -signal.SIGKILL
        script = tmp_path / "recover.py"
        script.write_text(RECOVER)
        result = subprocess.run(
            [sys.executable, str(script), str(tmp_path / "ckpt")],
            capture_output=True,
            text=True,
            timeout=WAIT,
            check=True,
        )
        recovered = json.loads(result.stdout)
        assert recovered["a"] == recovered["b"]
        assert recovered["a"] >= last  # every value printed had been persisted first
