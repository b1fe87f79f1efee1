"""Tests for StateManager and ExecutionContext (statekeep._manager)."""

from __future__ import annotations

import json
import logging
import math
import random
import subprocess
import sys
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pydantic
import pytest

from statekeep import (
    CorruptCheckpointError,
    ExecutionContext,
    FileCheckpointStorage,
    StateManager,
    StorageError,
)
from statekeep.storage import CheckpointInfo, CheckpointStorage, MemoryCheckpointStorage


class FakeClock:
    """A clock the test moves by hand; counts how often it is read."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


class FlakyStorage:
    """A backend double: a memory storage whose save and delete fail while ``failing`` is set."""

    def __init__(self, error: Exception | None = None) -> None:
        self.inner = MemoryCheckpointStorage()
        self.error = error or StorageError("disk on fire")
        self.failing = True
        self.save_calls = 0

    def save(
        self,
        session_id: str | UUID,
        data: Mapping[str, Any],
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> bool:
        self.save_calls += 1
        if self.failing:
            raise self.error
        return self.inner.save(session_id, data, metadata=metadata)

    def load(self, session_id: str | UUID) -> dict[str, Any] | None:
        return self.inner.load(session_id)

    def exists(self, session_id: str | UUID) -> bool:
        return self.inner.exists(session_id)

    def delete(self, session_id: str | UUID) -> bool:
        if self.failing:
            raise self.error
        return self.inner.delete(session_id)

    def list_checkpoints(self) -> list[CheckpointInfo]:
        return self.inner.list_checkpoints()


class DictStorage:
    """The smallest backend a user might write: the five protocol methods over a dict."""

    def __init__(self) -> None:
        self.items: dict[str, dict[str, Any]] = {}

    def save(
        self,
        session_id: str | UUID,
        data: Mapping[str, Any],
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> bool:
        self.items[str(session_id)] = json.loads(json.dumps(dict(data)))
        return True

    def load(self, session_id: str | UUID) -> dict[str, Any] | None:
        return self.items.get(str(session_id))

    def exists(self, session_id: str | UUID) -> bool:
        return str(session_id) in self.items

    def delete(self, session_id: str | UUID) -> bool:
        return self.items.pop(str(session_id), None) is not None

    def list_checkpoints(self) -> list[CheckpointInfo]:
        now = datetime.now(timezone.utc)
        return [CheckpointInfo(key, now, len(json.dumps(v)), {}) for key, v in self.items.items()]


class Job(pydantic.BaseModel):
    """An application's own context model, not derived from ExecutionContext."""

    session_id: str
    last_processed_row: int = 0
    cursor: str = ""


class TaggedContext(ExecutionContext):
    """An ExecutionContext subclass with one more field."""

    tag: str = "none"


@pytest.fixture
def storage() -> MemoryCheckpointStorage:
    return MemoryCheckpointStorage()


class TestExecutionContext:
    """ExecutionContext has the documented defaults and round-trips through JSON."""

    def test_defaults(self) -> None:
        a, b = ExecutionContext(), ExecutionContext()
        assert isinstance(a.session_id, UUID)
        assert a.session_id != b.session_id
        assert (a.last_processed_row, a.total_rows, a.data) == (-1, None, {})
        assert a.pending_completions == set()
        a.data["x"] = 1
        assert b.data == {}

    def test_to_checkpoint_is_json_ready(self) -> None:
        sid = uuid4()
        when = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc)
        ctx = ExecutionContext(session_id=sid, last_processed_row=7, data={"at": when})
        dumped = ctx.to_checkpoint()
        assert json.loads(json.dumps(dumped)) == dumped
        assert dumped["session_id"] == str(sid)
        assert dumped["data"]["at"] == "2024-05-06T07:08:09Z"

    def test_from_checkpoint_roundtrip_keeps_the_subclass(self) -> None:
        ctx = TaggedContext(last_processed_row=3, total_rows=10, data={"k": [1, 2]}, tag="t")
        back = TaggedContext.from_checkpoint(ctx.to_checkpoint())
        assert type(back) is TaggedContext
        assert back == ctx

    def test_from_checkpoint_rejects_bad_data(self) -> None:
        with pytest.raises(pydantic.ValidationError, match="last_processed_row"):
            ExecutionContext.from_checkpoint({"last_processed_row": "many"})


class TestConstruction:
    """Bad arguments are rejected at construction with a typed error naming them."""

    @pytest.mark.parametrize("interval", [0, -1])
    def test_non_positive_interval(self, storage: MemoryCheckpointStorage, interval: int) -> None:
        with pytest.raises(ValueError, match="checkpoint_interval must be positive"):
            StateManager(storage, interval)

    @pytest.mark.parametrize("interval", [1.5, True, "5", None])
    def test_non_int_interval(self, storage: MemoryCheckpointStorage, interval: Any) -> None:
        with pytest.raises(TypeError, match="checkpoint_interval must be an int"):
            StateManager(storage, interval)

    @pytest.mark.parametrize("seconds", [0, -2.5, math.nan])
    def test_non_positive_time_interval(
        self, storage: MemoryCheckpointStorage, seconds: float
    ) -> None:
        with pytest.raises(ValueError, match="time_interval must be positive"):
            StateManager(storage, time_interval=seconds)

    @pytest.mark.parametrize("seconds", ["10", False])
    def test_non_number_time_interval(self, storage: MemoryCheckpointStorage, seconds: Any) -> None:
        with pytest.raises(TypeError, match="time_interval must be a number"):
            StateManager(storage, time_interval=seconds)

    @pytest.mark.parametrize("context_type", [dict, ExecutionContext(), "ExecutionContext"])
    def test_context_type_not_a_model(
        self, storage: MemoryCheckpointStorage, context_type: Any
    ) -> None:
        with pytest.raises(TypeError, match="pydantic BaseModel subclass"):
            StateManager(storage, context_type=context_type)

    def test_context_type_missing_a_field(self, storage: MemoryCheckpointStorage) -> None:
        class NoRow(pydantic.BaseModel):
            session_id: str

        with pytest.raises(TypeError, match=r"NoRow.*missing: last_processed_row"):
            StateManager(storage, context_type=NoRow)

    def test_storage_not_a_backend(self) -> None:
        with pytest.raises(TypeError, match="storage must implement CheckpointStorage"):
            StateManager({})  # type: ignore[call-overload]

    def test_clock_not_callable(self, storage: MemoryCheckpointStorage) -> None:
        with pytest.raises(TypeError, match="clock must be callable"):
            StateManager(storage, clock=5.0)  # type: ignore[call-overload]

    def test_properties(self, storage: MemoryCheckpointStorage) -> None:
        manager = StateManager(storage, 7, time_interval=2, context_type=Job)
        assert manager.storage is storage
        assert manager.checkpoint_interval == 7
        assert manager.time_interval == 2.0
        assert manager.context_type is Job
        default = StateManager(storage)
        assert (default.checkpoint_interval, default.time_interval) == (500, None)
        assert default.context_type is ExecutionContext


class TestShouldCheckpoint:
    """A checkpoint is due by rows or seconds counted from the last successful save."""

    def test_before_any_save_counts_from_row_zero(self, storage: MemoryCheckpointStorage) -> None:
        manager = StateManager(storage, 5)
        assert [manager.should_checkpoint(r) for r in range(7)] == [False] * 5 + [True] * 2

    def test_counts_from_the_saved_row_not_multiples(
        self, storage: MemoryCheckpointStorage
    ) -> None:
        manager = StateManager(storage, 5)
        assert manager.save_checkpoint(ExecutionContext(last_processed_row=7))
        assert not manager.should_checkpoint(10)  # a multiple of 5, but only 3 rows on
        assert not manager.should_checkpoint(11)
        assert manager.should_checkpoint(12)

    def test_time_interval_by_the_injected_clock(self, storage: MemoryCheckpointStorage) -> None:
        clock = FakeClock(100.0)
        manager = StateManager(storage, 1000, time_interval=10, clock=clock)
        clock.now = 109.5
        assert not manager.should_checkpoint(1)
        clock.now = 110.0
        assert manager.should_checkpoint(1)
        clock.now = 115.0
        assert manager.save_checkpoint(ExecutionContext(last_processed_row=1))
        clock.now = 124.9
        assert not manager.should_checkpoint(2)
        clock.now = 125.0
        assert manager.should_checkpoint(2)
        assert manager.should_checkpoint(1001)  # rows still count on their own

    def test_without_time_interval_the_clock_is_never_read(
        self, storage: MemoryCheckpointStorage
    ) -> None:
        clock = FakeClock()
        manager = StateManager(storage, 3, clock=clock)
        for row in range(10):
            if manager.should_checkpoint(row):
                manager.save_checkpoint(ExecutionContext(last_processed_row=row))
        assert clock.reads == 0

    def test_row_check_does_not_read_the_clock_when_rows_decide(
        self, storage: MemoryCheckpointStorage
    ) -> None:
        clock = FakeClock()
        manager = StateManager(storage, 3, time_interval=60, clock=clock)
        reads = clock.reads
        assert manager.should_checkpoint(3)
        assert clock.reads == reads


class TestSaveCheckpoint:
    """Saves store the context with progress metadata; failures return False and change nothing."""

    def test_saves_data_and_metadata(self, storage: MemoryCheckpointStorage) -> None:
        manager = StateManager(storage, 10)
        ctx = ExecutionContext(last_processed_row=42, total_rows=100, data={"sum": 861})
        assert manager.save_checkpoint(ctx) is True
        assert storage.load(ctx.session_id) == ctx.to_checkpoint()
        [info] = manager.list_checkpoints()
        assert info.session_id == str(ctx.session_id)
        assert info.metadata == {"last_processed_row": 42, "total_rows": 100}

    @pytest.mark.parametrize(
        "error", [StorageError("disk on fire"), OSError(28, "No space left on device")]
    )
    def test_failure_returns_false_logs_and_does_not_advance(
        self, caplog: pytest.LogCaptureFixture, error: Exception
    ) -> None:
        flaky = FlakyStorage(error)
        clock = FakeClock(0.0)
        manager = StateManager(flaky, 5, time_interval=30, clock=clock)
        ctx = ExecutionContext(last_processed_row=5)
        clock.now = 10.0
        with caplog.at_level(logging.ERROR, logger="statekeep"):
            assert manager.save_checkpoint(ctx) is False
        assert str(ctx.session_id) in caplog.text
        assert str(error) in caplog.text
        assert manager.should_checkpoint(5)  # still due: the failed save did not count
        clock.now = 30.0
        assert manager.should_checkpoint(0)  # time still counts from construction
        flaky.failing = False
        assert manager.save_checkpoint(ctx) is True
        assert not manager.should_checkpoint(9)
        assert not manager.should_checkpoint(0)
        assert flaky.save_calls == 2

    def test_storage_returning_false_is_a_failure(self, storage: MemoryCheckpointStorage) -> None:
        class Refusing(DictStorage):
            def save(self, *args: Any, **kwargs: Any) -> bool:
                return False

        manager = StateManager(Refusing(), 5)
        assert manager.save_checkpoint(ExecutionContext(last_processed_row=5)) is False
        assert manager.should_checkpoint(5)

    def test_unserialisable_data_returns_false(self, storage: MemoryCheckpointStorage) -> None:
        manager = StateManager(storage, 5)
        ctx = ExecutionContext(last_processed_row=5, data={"handle": object()})
        assert manager.save_checkpoint(ctx) is False
        assert not storage.exists(ctx.session_id)
        assert manager.should_checkpoint(5)

    def test_wrong_context_type_returns_false(
        self, storage: MemoryCheckpointStorage, caplog: pytest.LogCaptureFixture
    ) -> None:
        manager = StateManager(storage, 5, context_type=Job)
        with caplog.at_level(logging.ERROR, logger="statekeep"):
            assert manager.save_checkpoint(ExecutionContext()) is False  # type: ignore[arg-type]
        assert "this manager saves Job" in caplog.text
        assert storage.list_checkpoints() == []


class TestLoadCheckpoint:
    """Load returns None only when absent and raises when a checkpoint is unreadable."""

    def test_absent_is_none(self, storage: MemoryCheckpointStorage) -> None:
        manager = StateManager(storage)
        assert manager.load_checkpoint(uuid4()) is None
        assert not manager.can_resume("nobody")

    def test_roundtrip(self, storage: MemoryCheckpointStorage) -> None:
        manager = StateManager(storage)
        ctx = ExecutionContext(last_processed_row=9, total_rows=20, data={"seen": ["a", "b"]})
        manager.save_checkpoint(ctx)
        loaded = manager.load_checkpoint(ctx.session_id)
        assert loaded == ctx
        assert loaded is not ctx

    def test_uuid_and_its_string_name_one_checkpoint(
        self, storage: MemoryCheckpointStorage
    ) -> None:
        manager = StateManager(storage)
        ctx = ExecutionContext(last_processed_row=4)
        manager.save_checkpoint(ctx)
        as_text = str(ctx.session_id)
        assert manager.can_resume(as_text)
        assert manager.load_checkpoint(as_text) == ctx
        assert manager.cleanup_checkpoints(as_text) is True
        assert not manager.can_resume(ctx.session_id)

    def test_invalid_field_is_corrupt(self, storage: MemoryCheckpointStorage) -> None:
        sid = uuid4()
        storage.save(sid, {"session_id": str(sid), "last_processed_row": "many"})
        manager = StateManager(storage)
        assert manager.can_resume(sid)
        with pytest.raises(CorruptCheckpointError, match=f"{sid}.*'last_processed_row'") as info:
            manager.load_checkpoint(sid)
        assert isinstance(info.value.__cause__, pydantic.ValidationError)

    def test_other_sessions_data_is_corrupt(self, storage: MemoryCheckpointStorage) -> None:
        sid, other = uuid4(), uuid4()
        storage.save(sid, ExecutionContext(session_id=other).to_checkpoint())
        with pytest.raises(CorruptCheckpointError, match=f"{sid}.*'session_id'.*{other}"):
            StateManager(storage).load_checkpoint(sid)

    def test_custom_model_field_named(self, storage: MemoryCheckpointStorage) -> None:
        storage.save("job-1", {"session_id": "job-1", "cursor": ["not", "a", "str"]})
        with pytest.raises(CorruptCheckpointError, match=r"'job-1'.*not a valid Job.*'cursor'"):
            StateManager(storage, context_type=Job).load_checkpoint("job-1")

    def test_storage_errors_propagate(self) -> None:
        class Broken(DictStorage):
            def load(self, session_id: str | UUID) -> dict[str, Any] | None:
                raise CorruptCheckpointError(f"checkpoint file of session {session_id} is torn")

        with pytest.raises(CorruptCheckpointError, match="is torn"):
            StateManager(Broken()).load_checkpoint("s")


class TestCustomContextType:
    """An application's own model is saved and loaded as that model."""

    def test_plain_model(self, storage: MemoryCheckpointStorage) -> None:
        manager = StateManager(storage, 2, context_type=Job)
        job = Job(session_id="job-7", last_processed_row=2, cursor="page=3")
        assert manager.save_checkpoint(job)
        assert not manager.should_checkpoint(3)
        loaded = manager.load_checkpoint("job-7")
        assert type(loaded) is Job
        assert loaded == job
        [info] = manager.list_checkpoints()
        assert info.metadata == {"last_processed_row": 2, "total_rows": None}

    def test_execution_context_subclass(self, storage: MemoryCheckpointStorage) -> None:
        manager = StateManager(storage, context_type=TaggedContext)
        ctx = TaggedContext(tag="blue", last_processed_row=1)
        manager.save_checkpoint(ctx)
        loaded = manager.load_checkpoint(ctx.session_id)
        assert isinstance(loaded, TaggedContext)
        assert loaded.tag == "blue"

    def test_subclass_hooks_are_used(self, storage: MemoryCheckpointStorage) -> None:
        class Versioned(ExecutionContext):
            def to_checkpoint(self) -> dict[str, Any]:
                return {"v": 2, **super().to_checkpoint()}

            @classmethod
            def from_checkpoint(cls, data: Mapping[str, Any]) -> Versioned:
                assert data["v"] == 2
                return cls.model_validate({k: v for k, v in data.items() if k != "v"})

        manager = StateManager(storage, context_type=Versioned)
        ctx = Versioned(last_processed_row=3)
        manager.save_checkpoint(ctx)
        assert storage.load(ctx.session_id)["v"] == 2  # type: ignore[index]
        assert manager.load_checkpoint(ctx.session_id) == ctx


class TestCleanupAndList:
    """cleanup_checkpoints deletes one session; list_checkpoints shows all without data."""

    def test_cleanup(self, storage: MemoryCheckpointStorage) -> None:
        manager = StateManager(storage)
        keep, drop = ExecutionContext(), ExecutionContext()
        manager.save_checkpoint(keep)
        manager.save_checkpoint(drop)
        assert manager.cleanup_checkpoints(drop.session_id) is True
        assert manager.cleanup_checkpoints(drop.session_id) is False
        assert [i.session_id for i in manager.list_checkpoints()] == [str(keep.session_id)]

    @pytest.mark.parametrize("error", [StorageError("disk on fire"), OSError("disk on fire")])
    def test_cleanup_failure_returns_false(
        self, caplog: pytest.LogCaptureFixture, error: Exception
    ) -> None:
        flaky = FlakyStorage(error)
        flaky.inner.save("s", {"session_id": "s"})
        with caplog.at_level(logging.ERROR, logger="statekeep"):
            assert StateManager(flaky).cleanup_checkpoints("s") is False
        assert "disk on fire" in caplog.text
        assert flaky.exists("s")

    def test_list_shows_progress(self, storage: MemoryCheckpointStorage) -> None:
        manager = StateManager(storage)
        for row in (10, 20):
            manager.save_checkpoint(ExecutionContext(last_processed_row=row, total_rows=50))
        rows = sorted(i.metadata["last_processed_row"] for i in manager.list_checkpoints())
        assert rows == [10, 20]


class TestUserBackend:
    """The runtime protocol check accepts a minimal user backend and rejects an incomplete one."""

    def test_minimal_backend_works(self) -> None:
        backend = DictStorage()
        assert isinstance(backend, CheckpointStorage)
        manager = StateManager(backend, 2)
        ctx = ExecutionContext(last_processed_row=2, data={"n": 1})
        assert manager.save_checkpoint(ctx)
        assert manager.load_checkpoint(str(ctx.session_id)) == ctx

    def test_backend_without_metadata_argument(self, caplog: pytest.LogCaptureFixture) -> None:
        class OndineStyle(DictStorage):
            def save(self, session_id: str | UUID, data: Mapping[str, Any]) -> bool:  # type: ignore[override]
                return super().save(session_id, data)

        with caplog.at_level(logging.WARNING, logger="statekeep"):
            manager = StateManager(OndineStyle(), 2)  # type: ignore[call-overload]
        assert "OndineStyle.save takes no metadata" in caplog.text
        ctx = ExecutionContext(last_processed_row=2)
        assert manager.save_checkpoint(ctx)
        assert manager.load_checkpoint(ctx.session_id) == ctx

    def test_incomplete_backend_rejected(self) -> None:
        class NoList:
            def save(self, session_id: Any, data: Any, *, metadata: Any = None) -> bool:
                return True

            def load(self, session_id: Any) -> None:
                return None

            def exists(self, session_id: Any) -> bool:
                return False

            def delete(self, session_id: Any) -> bool:
                return False

        assert not isinstance(NoList(), CheckpointStorage)
        with pytest.raises(TypeError, match="NoList"):
            StateManager(NoList())  # type: ignore[call-overload]


class TestResumableExample:
    """The example pipeline survives a real SIGKILL: no row skipped, at most an interval redone."""

    def test_example_pipeline(self) -> None:
        script = Path(__file__).parents[1] / "examples" / "resumable_pipeline.py"
        args = ["--rows", "2000", "--interval", "100", "--kill-after", "730"]
        done = subprocess.run(
            [sys.executable, str(script), *args], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "killed the pipeline with SIGKILL" in done.stdout
        assert "rows skipped: 0" in done.stdout
        assert "OK: no row skipped" in done.stdout


class TestWatermark:
    """last_processed_row is ondine 2.1.1's watermark: it never runs ahead of a gap."""

    def test_out_of_order_rows_wait_above_the_gap(self) -> None:
        ctx = ExecutionContext()
        for row in (0, 1, 3, 4):
            ctx.complete_rows(row)
        assert ctx.last_processed_row == 1
        assert ctx.pending_completions == {3, 4}
        ctx.complete_rows(2)
        assert ctx.last_processed_row == 4
        assert ctx.pending_completions == set()

    def test_a_batch_moves_across_all_its_rows(self) -> None:
        ctx = ExecutionContext()
        ctx.complete_rows(4, count=3)
        assert (ctx.last_processed_row, ctx.pending_completions) == (-1, {4, 5, 6})
        ctx.complete_rows(0, count=4)
        assert (ctx.last_processed_row, ctx.pending_completions) == (6, set())

    def test_reporting_a_row_twice_is_harmless(self) -> None:
        ctx = ExecutionContext()
        ctx.complete_rows(0)
        ctx.complete_rows(0)
        ctx.complete_rows(2)
        ctx.complete_rows(2)
        assert (ctx.last_processed_row, ctx.pending_completions) == (0, {2})
        ctx.complete_rows(0, count=2)  # row 0 again, below the watermark: not kept pending
        assert (ctx.last_processed_row, ctx.pending_completions) == (2, set())

    def test_update_row_forces_the_watermark(self) -> None:
        ctx = ExecutionContext()
        ctx.update_row(41)
        assert ctx.last_processed_row == 41
        ctx.complete_rows(42)
        assert ctx.last_processed_row == 42

    def test_pending_rows_are_not_in_the_checkpoint(self, storage: MemoryCheckpointStorage) -> None:
        ctx = ExecutionContext(total_rows=10)
        for row in (0, 2, 3):
            ctx.complete_rows(row)
        assert "pending_completions" not in ctx.to_checkpoint()
        manager = StateManager(storage, 1)
        assert manager.save_checkpoint(ctx)
        back = manager.load_checkpoint(ctx.session_id)
        assert back is not None
        assert (back.last_processed_row, back.pending_completions) == (0, set())

    @pytest.mark.parametrize(
        ("args", "error", "match"),
        [
            (("1",), TypeError, "first_row_index must be an int, not str"),
            ((True,), TypeError, "first_row_index must be an int, not bool"),
            ((0, 1.0), TypeError, "count must be an int, not float"),
            ((-1,), ValueError, "first_row_index must be >= 0, got -1"),
            ((0, 0), ValueError, "count must be >= 1, got 0"),
        ],
    )
    def test_bad_arguments(self, args: tuple[Any, ...], error: type[Exception], match: str) -> None:
        ctx = ExecutionContext()
        with pytest.raises(error, match=match):
            ctx.complete_rows(*args)
        assert (ctx.last_processed_row, ctx.pending_completions) == (-1, set())

    def test_a_negative_watermark_below_minus_one_is_refused(self) -> None:
        with pytest.raises(pydantic.ValidationError, match="last_processed_row"):
            ExecutionContext(last_processed_row=-2)

    def test_any_completion_order_gives_the_contiguous_prefix(self) -> None:
        rng = random.Random(20261129)
        for _ in range(300):
            rows = list(range(rng.randint(1, 40)))
            reports = rows + rng.choices(rows, k=rng.randint(0, 10))  # some reported twice
            rng.shuffle(reports)
            ctx = ExecutionContext()
            done: set[int] = set()
            for row in reports:
                ctx.complete_rows(row)
                done.add(row)
                prefix = -1
                while prefix + 1 in done:
                    prefix += 1
                assert ctx.last_processed_row == prefix
                assert ctx.pending_completions == {r for r in done if r > prefix}
            assert (ctx.last_processed_row, ctx.pending_completions) == (rows[-1], set())


class TestSessionIds:
    """A session id is a UUID or a non-empty string, and names the same checkpoint after a load."""

    def test_a_string_session_id_saves_and_resumes(self, tmp_path: Path) -> None:
        with FileCheckpointStorage(tmp_path) as files:
            manager = StateManager(files, 2)
            ctx = ExecutionContext(session_id="my-run", total_rows=5)
            ctx.update_row(2)
            assert manager.save_checkpoint(ctx)
        with FileCheckpointStorage(tmp_path) as files:
            back = StateManager(files, 2).load_checkpoint("my-run")
        assert back == ctx
        assert back is not None
        assert back.session_id == "my-run"

    def test_a_uuid_in_canonical_string_form_is_that_uuid(self) -> None:
        sid = uuid4()
        assert ExecutionContext(session_id=str(sid)).session_id == sid
        upper = str(sid).upper()  # not the form session_key stores, so it stays a string
        assert ExecutionContext(session_id=upper).session_id == upper

    @pytest.mark.parametrize(("bad", "match"), [("", "must not be empty"), ("a\0b", "NUL")])
    def test_bad_string_ids_are_refused(self, bad: str, match: str) -> None:
        with pytest.raises(pydantic.ValidationError, match=f"session_id(.|\n)*{match}"):
            ExecutionContext(session_id=bad)


class TestLogPrefix:
    """Every line StateManager logs starts with the prefix the rest of statekeep uses."""

    def test_all_lines_are_prefixed(self, caplog: pytest.LogCaptureFixture) -> None:
        class NoMetadata(DictStorage):
            def save(self, session_id: str | UUID, data: Mapping[str, Any]) -> bool:  # type: ignore[override]
                return super().save(session_id, data)

        with caplog.at_level(logging.DEBUG, logger="statekeep"):
            StateManager(NoMetadata(), 2)  # type: ignore[call-overload]
            flaky = FlakyStorage()
            manager = StateManager(flaky, 2)
            manager.save_checkpoint(ExecutionContext(session_id="s"))
            manager.cleanup_checkpoints("s")
            flaky.failing = False
            manager.save_checkpoint(ExecutionContext(session_id="s"))
            manager.cleanup_checkpoints("s")
        messages = [r.getMessage() for r in caplog.records if r.name == "statekeep"]
        assert len(messages) == 5, messages
        assert all(m.startswith("statekeep: ") for m in messages), messages


# A pipeline with four concurrent "LLM calls": the call for row 1 hangs, the calls for
# rows 0 and 2-7 finish and each is checkpointed. The test SIGKILLs it there.
_HUNG_PIPELINE = """
import sys, threading
from concurrent.futures import ThreadPoolExecutor
import statekeep

directory, session = sys.argv[1], sys.argv[2]
never = threading.Event()
lock = threading.Lock()
finished = set()
with statekeep.FileCheckpointStorage(directory) as storage:
    manager = statekeep.StateManager(storage, checkpoint_interval=1)
    context = statekeep.ExecutionContext(session_id=session, total_rows=12)

    def call_llm(row):
        if row == 1 or row > 7:
            never.wait()  # row 1's call hangs; rows past 7 are not reached before the kill
            return
        with lock:
            context.complete_rows(row)
            assert manager.save_checkpoint(context)
            finished.add(row)
            if finished == {0, 2, 3, 4, 5, 6, 7}:
                print(context.last_processed_row, sorted(context.pending_completions), flush=True)

    pool = ThreadPoolExecutor(max_workers=4)
    for row in range(12):
        pool.submit(call_llm, row)
    never.wait()
"""


class TestConcurrentCallsResume:
    """Four concurrent calls, killed while row 1 hangs and rows 2-7 are done: resume at row 1."""

    def test_resumes_at_the_row_that_never_finished(self, tmp_path: Path) -> None:
        child = subprocess.Popen(
            [sys.executable, "-c", _HUNG_PIPELINE, str(tmp_path), "llm-run"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None
            line = child.stdout.readline()  # blocks until rows 0 and 2-7 are saved
            assert line.split(maxsplit=1) == ["0", "[2, 3, 4, 5, 6, 7]\n"]
            child.kill()  # SIGKILL
        finally:
            if child.poll() is None:
                child.kill()
            child.wait(timeout=30)
            if child.stdout is not None:
                child.stdout.close()
        assert child.returncode == -9

        with FileCheckpointStorage(tmp_path) as files:
            manager = StateManager(files, checkpoint_interval=1)
            context = manager.load_checkpoint("llm-run")
            assert context is not None
            start = context.last_processed_row + 1
            assert start == 1
            lock = threading.Lock()
            done: list[int] = []

            def call_llm(row: int) -> None:
                with lock:
                    done.append(row)
                    context.complete_rows(row)
                    assert manager.save_checkpoint(context)

            with ThreadPoolExecutor(max_workers=4) as pool:
                list(pool.map(call_llm, range(start, 12)))
            assert sorted(done) == list(range(1, 12))
            final = manager.load_checkpoint("llm-run")
        assert final is not None
        assert final.last_processed_row == 11
