"""Usage examples of the public API, checked by ``mypy --strict`` (never run by pytest).

If an annotation in statekeep changes in a way that breaks ordinary code, or a name
stops being importable from the top level, this file stops type-checking.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal
from uuid import UUID, uuid4

import pydantic
import pytest
from typing_extensions import assert_type

from statekeep import (
    BaseCheckpointStorage,
    CheckpointInfo,
    CheckpointStorage,
    CorruptCheckpointError,
    CorruptStateError,
    ExecutionContext,
    FileCheckpointStorage,
    KeepAny,
    KeepBest,
    KeepEvery,
    KeepLatest,
    LatestStatesKeeper,
    MemoryCheckpointStorage,
    MissingComponentsError,
    PersistentStateMixin,
    PostgresCheckpointStorage,
    RecoverableState,
    RetentionPolicy,
    S3CheckpointStorage,
    SQLiteCheckpointStorage,
    StateExistsError,
    StateInfo,
    StatekeepError,
    StateManager,
    StateStore,
    StateValidationError,
    StateVersionError,
    StorageError,
    load_pickle,
    save_pickle,
    verify_state,
)
from statekeep.remote import (
    DirectoryRemote,
    Remote,
    RemoteObject,
    S3Remote,
    Source,
    check_key,
    open_remote,
)
from statekeep.testing import (
    AWKWARD_IDS,
    CheckpointStorageContract,
    PersistentCheckpointStorageContract,
)

# --- snapshots ---------------------------------------------------------------------


class Counter(PersistentStateMixin):
    def __init__(self) -> None:
        self.value = 0

    def save_state(self, path: Path) -> None:
        path.write_text(json.dumps(self.value))

    def load_state(self, path: Path) -> None:
        self.value = json.loads(path.read_text())


def snapshots(states_dir: Path) -> None:
    store = StateStore(states_dir)
    StateStore(str(states_dir), "%Y%m%d-%H%M%S-%f.state", durable=False)
    store.register("counter", Counter())

    assert_type(store.save_state(), Path)
    store.load_state(states_dir / "x.state")
    store.load_state("x.state", verify=False)
    assert_type(store.latest_state(), Path | None)
    assert_type(store.load_latest_state(), Path | None)

    for info in store.list_states():
        assert_type(info, StateInfo)
        assert_type(info.path, Path)
        assert_type(info.created_at, datetime)
        assert_type(info.size_bytes, int)

    keeper = LatestStatesKeeper(states_dir, "*.state", max_keep=3, cleanup_interval=0.5)
    assert_type(keeper.cleanup(), list[Path])
    keeper.start()
    keeper.start(background=True)
    keeper.stop()
    with LatestStatesKeeper(str(states_dir)) as running:
        assert_type(running, LatestStatesKeeper)


def retention(states_dir: Path, store: StateStore) -> None:
    assert_type(store.save_state(metadata={"step": 3, "loss": 0.5}), Path)
    store.load_state(states_dir / "x.state", allow_missing=True)
    assert_type(store.load_latest_state(allow_missing=True), Path | None)
    info = verify_state(states_dir / "x.state")
    assert_type(info.sequence, int)
    assert_type(info.metadata, Mapping[str, Any])
    policy: RetentionPolicy = KeepBest("loss", 2, "min") | KeepEvery(timedelta(days=1))
    policy = KeepAny(policy, KeepLatest(1))
    keeper = LatestStatesKeeper(states_dir, policy=policy)
    assert_type(keeper.plan(), list[Path])
    assert_type(policy.keep(store.list_states(), datetime.now(timezone.utc)), set[Path])
    try:
        store.load_latest_state()
    except MissingComponentsError as exc:
        assert_type(exc.missing, tuple[str, ...])


def pickles(path: Path) -> None:
    save_pickle({"weights": [1.0, 2.0]}, path)
    save_pickle([1], str(path))
    assert_type(load_pickle(path), Any)


# --- snapshots on object storage -----------------------------------------------------


def remotes(states_dir: Path, shared: Path, source: Source) -> None:
    remote: Remote = DirectoryRemote(shared, durable=False)
    remote = S3Remote("s3://bucket/prefix", part_size=16 << 20, max_in_flight=2)
    assert_type(open_remote("s3://bucket/prefix"), Remote)
    assert_type(open_remote(shared), Remote)
    assert_type(open_remote(remote), Remote)
    assert_type(check_key("states/a.state/MANIFEST"), str)
    remote.put_if_absent("k", source, 10)
    assert_type(remote.get("k", start=2, length=4), bytes)
    for found in remote.list("states/", start_after="states/a"):
        assert_type(found, RemoteObject)
        assert_type(found.key, str)
        assert_type(found.size, int)
        assert_type(found.modified, datetime)
    remote.delete(["k"])
    with open(shared / "blob", "rb") as binary:
        remote.put_if_absent("blob", binary, 4)  # a binary file is a Source

    store = StateStore(states_dir, remote=remote)
    StateStore(states_dir, remote="s3://bucket/prefix")
    StateStore(states_dir, remote=shared)
    assert_type(store.publish_pending(), list[Path])
    for info in store.list_states():
        assert_type(info.location, Literal["local", "remote", "both"])
    keeper = LatestStatesKeeper(states_dir, max_keep=2, remote=remote)
    assert_type(keeper.plan_remote(), list[str])
    assert_type(keeper.plan_remote(datetime.now(timezone.utc)), list[str])


# --- errors --------------------------------------------------------------------------


def errors(store: StateStore) -> None:
    try:
        store.save_state()
    except FileExistsError as exc:  # StateExistsError is one
        assert_type(exc, FileExistsError)
    try:
        store.load_latest_state()
    except StateExistsError as exc:
        existing: FileExistsError = exc
        base: StatekeepError = exc
        del existing, base
    except CorruptStateError as exc:
        invalid: ValueError = exc
        del invalid
    except (CorruptCheckpointError, StateValidationError, StateVersionError) as exc:
        assert_type(exc, CorruptCheckpointError | StateValidationError | StateVersionError)
    except StorageError as exc:
        os_error: OSError = exc
        del os_error


# --- checkpoint storage --------------------------------------------------------------


class DictStorage:
    """A user's own backend: the five methods of the protocol, nothing else."""

    def __init__(self) -> None:
        self.data: dict[str, dict[str, Any]] = {}

    def save(
        self,
        session_id: str | UUID,
        data: Mapping[str, Any],
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> bool:
        self.data[str(session_id)] = dict(data)
        return True

    def load(self, session_id: str | UUID) -> dict[str, Any] | None:
        return self.data.get(str(session_id))

    def exists(self, session_id: str | UUID) -> bool:
        return str(session_id) in self.data

    def delete(self, session_id: str | UUID) -> bool:
        return self.data.pop(str(session_id), None) is not None

    def list_checkpoints(self) -> list[CheckpointInfo]:
        return []


def storages(tmp: Path) -> None:
    backends: list[CheckpointStorage] = [
        MemoryCheckpointStorage(),
        FileCheckpointStorage(tmp / "checkpoints", durable=False),
        FileCheckpointStorage(),
        SQLiteCheckpointStorage(tmp / "checkpoints.db"),
        DictStorage(),
    ]
    session = uuid4()
    for storage in backends:
        assert_type(storage.save(session, {"row": 1}, metadata={"who": "me"}), bool)
        assert_type(storage.save("job-1", {"row": 2}), bool)
        assert_type(storage.load(session), dict[str, Any] | None)
        assert_type(storage.exists("job-1"), bool)
        assert_type(storage.delete(str(session)), bool)
        for info in storage.list_checkpoints():
            assert_type(info.session_id, str)
            assert_type(info.timestamp, datetime)
            assert_type(info.size_bytes, int)
            assert_type(info.metadata, Mapping[str, Any])

    with MemoryCheckpointStorage() as memory:
        memory.purge()
        found = memory.load_with_info(session)
        assert_type(found, tuple[dict[str, Any], CheckpointInfo] | None)
        if found is not None:
            data, info = found
            assert_type(data, dict[str, Any])
            assert_type(info.metadata, Mapping[str, Any])
    with FileCheckpointStorage(str(tmp)) as files:
        files.close()
    with SQLiteCheckpointStorage(str(tmp / "db.sqlite")) as db:
        db.close()


class BlobStorage(BaseCheckpointStorage):
    """A user's own backend on the public base: four raw methods over named blobs."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def _read(self, name: str) -> bytes | None:
        return self.blobs.get(name)

    def _write(self, name: str, blob: bytes) -> None:
        self.blobs[name] = blob

    def _remove(self, name: str) -> bool:
        return self.blobs.pop(name, None) is not None

    def _names(self) -> Iterable[str]:
        return list(self.blobs)


def remote_storages() -> None:
    based: list[BaseCheckpointStorage] = [
        BlobStorage(),
        S3CheckpointStorage("s3://bucket/checkpoints/"),
        S3CheckpointStorage("s3://bucket", client=object()),
        PostgresCheckpointStorage("postgresql://127.0.0.1/app"),
        PostgresCheckpointStorage("dbname=app", table="my_checkpoints"),
    ]
    for storage in based:
        protocol: CheckpointStorage = storage
        del protocol
        assert_type(storage.delete_older_than(timedelta(days=7)), int)
        assert_type(storage.load_with_info("job-1"), tuple[dict[str, Any], CheckpointInfo] | None)
        storage.close()


# --- StateManager ------------------------------------------------------------------


class CrawlContext(ExecutionContext):
    seen_urls: list[str] = pydantic.Field(default_factory=list)


def manager(storage: CheckpointStorage) -> None:
    plain = StateManager(storage)
    assert_type(plain, StateManager[ExecutionContext])
    context = ExecutionContext(total_rows=10)
    assert_type(context.session_id, UUID | str)
    context.complete_rows(0, count=2)
    context.update_row(5)
    assert_type(context.pending_completions, set[int])
    assert_type(context.to_checkpoint(), dict[str, Any])
    assert_type(ExecutionContext.from_checkpoint({"last_processed_row": 3}), ExecutionContext)
    if plain.should_checkpoint(500):
        assert_type(plain.save_checkpoint(context), bool)
    assert_type(plain.load_checkpoint(context.session_id), ExecutionContext | None)
    assert_type(plain.can_resume(str(context.session_id)), bool)
    assert_type(plain.cleanup_checkpoints(context.session_id), bool)
    assert_type(plain.list_checkpoints(), list[CheckpointInfo])

    ticks = iter(range(1000))
    crawl = StateManager(
        storage,
        100,
        time_interval=30.0,
        context_type=CrawlContext,
        clock=lambda: float(next(ticks)),
    )
    assert_type(crawl, StateManager[CrawlContext])
    resumed = crawl.load_checkpoint(uuid4())
    assert_type(resumed, CrawlContext | None)
    if resumed is not None:
        assert_type(resumed.seen_urls, list[str])
    assert_type(CrawlContext.from_checkpoint({}), CrawlContext)


# --- RecoverableState --------------------------------------------------------------


class Progress(pydantic.BaseModel):
    page: int = 0
    done: list[str] = []


def recoverable(storage: CheckpointStorage) -> None:
    state = RecoverableState(
        default_state=Progress(),
        persist_state_key="crawl",
        persistence_enabled=True,
        storage=storage,
        persist_interval=5.0,
        logger=logging.getLogger("app"),
    )
    assert_type(state, RecoverableState[Progress])
    assert_type(state.initialize(), Progress)
    assert_type(state.current_value.page, int)
    with state.update() as value:
        assert_type(value, Progress)
        value.page += 1
    state.persist_state()
    state.reset()
    state.teardown()

    with RecoverableState(default_state=Progress(), persist_state_key="other") as entered:
        assert_type(entered, RecoverableState[Progress])
        assert_type(entered.current_value.done, list[str])


# --- statekeep.testing -------------------------------------------------------------


class TestBlobStorage(PersistentCheckpointStorageContract):
    """The conformance suite over a user's backend, as writing-a-backend.md shows it."""

    @pytest.fixture
    def make_storage(self, tmp_path: Path) -> Callable[[], CheckpointStorage]:
        return BlobStorage


class TestDictStorage(CheckpointStorageContract):
    @pytest.fixture
    def make_storage(self) -> Callable[[], CheckpointStorage]:
        return DictStorage


def awkward_ids() -> None:
    assert_type(AWKWARD_IDS, tuple[str, ...])
    for session_id in AWKWARD_IDS:
        MemoryCheckpointStorage().save(session_id, {})
