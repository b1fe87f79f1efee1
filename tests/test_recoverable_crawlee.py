"""RecoverableState stores what crawlee stores, and accepts what crawlee passes (issue 9.6-9.10)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, Field, RootModel

from statekeep import (
    FileCheckpointStorage,
    MemoryCheckpointStorage,
    RecoverableState,
    StateValidationError,
    StateVersionError,
)

KEY = "crawler-progress"


class Progress(BaseModel):
    pages_done: int = 0
    failed_urls: list[str] = []
    user_agent: str = Field("x", alias="userAgent")


# Written by statekeep's FileCheckpointStorage + RecoverableState as they were before the
# record became the model's own dump (main at 77ec264): the data is the envelope
# {"schema_version", "state"}, the metadata has no "format".
ENVELOPE_FILE = (
    b'{"format":"statekeep-checkpoint","version":1,"session_id":"crawler-progress","ti'
    b'mestamp":"2026-11-29T09:44:14.528875+00:00","size":102,"crc32":2534931174,"metad'
    b'ata":{"kind":"statekeep.RecoverableState","schema_version":1},"header_crc32":248'
    b"7562075}\n"
    b'{"schema_version":1,"state":{"pages_done":41,"failed_urls":["https://example.com'
    b'/a"],"userAgent":"x"}}\n'
)


@pytest.fixture
def storage() -> Iterator[MemoryCheckpointStorage]:
    with MemoryCheckpointStorage() as store:
        yield store


def make(storage: Any, default: BaseModel | None = None, **options: Any) -> RecoverableState[Any]:
    return RecoverableState(
        default_state=default if default is not None else Progress(),
        persist_state_key=KEY,
        persistence_enabled=True,
        storage=storage,
        **options,
    )


def metadata_of(storage: Any, key: str = KEY) -> dict[str, Any]:
    (info,) = [i for i in storage.list_checkpoints() if i.session_id == key]
    return dict(info.metadata)


class TestRecordFormat:
    """9.6: the data is ``model_dump(mode="json", by_alias=True)``; the version is metadata."""

    def test_data_is_the_models_own_dump(self, storage: MemoryCheckpointStorage) -> None:
        with make(storage, schema_version=2, migrations={1: dict}) as state:
            with state.update() as value:
                value.pages_done = 3
                value.failed_urls.append("u")
            state.persist_state()
            assert storage.load(KEY) == state.current_value.model_dump(mode="json", by_alias=True)
            assert storage.load(KEY) == {"pages_done": 3, "failed_urls": ["u"], "userAgent": "x"}
            assert metadata_of(storage) == {
                "kind": "statekeep.RecoverableState",
                "format": 2,
                "schema_version": 2,
            }

    def test_reads_a_record_crawlee_wrote(self, storage: MemoryCheckpointStorage) -> None:
        # crawlee's KeyValueStore holds the bare dump with no statekeep metadata: version 1.
        storage.save(KEY, {"pages_done": 9, "failed_urls": [], "userAgent": "bot"})
        assert make(storage).initialize() == Progress(pages_done=9, userAgent="bot")

    def test_reads_the_envelope_written_before(self, tmp_path: Path) -> None:
        (tmp_path / f"{KEY}.ckpt").write_bytes(ENVELOPE_FILE)
        with FileCheckpointStorage(tmp_path) as files:
            state = make(files)
            assert state.initialize() == Progress(
                pages_done=41, failed_urls=["https://example.com/a"]
            )
            state.teardown()  # rewrites it in the new form
            assert files.load(KEY) == {
                "pages_done": 41,
                "failed_urls": ["https://example.com/a"],
                "userAgent": "x",
            }
            assert metadata_of(files)["format"] == 2
            assert make(files).initialize().pages_done == 41

    def test_envelope_is_migrated(self, storage: MemoryCheckpointStorage) -> None:
        class V2(BaseModel):
            done: int

        storage.save(KEY, {"schema_version": 1, "state": {"pages_done": 4}})
        state = make(storage, V2(done=0), schema_version=2,
                     migrations={1: lambda old: {"done": old["pages_done"]}})  # fmt: skip
        assert state.initialize() == V2(done=4)

    def test_version_in_metadata_drives_migrations(self, storage: MemoryCheckpointStorage) -> None:
        class V3(BaseModel):
            total: int

        storage.save(
            KEY,
            {"done": 5},
            metadata={"kind": "statekeep.RecoverableState", "format": 2, "schema_version": 2},
        )
        state = make(storage, V3(total=0), schema_version=3,
                     migrations={1: dict, 2: lambda old: {"total": old["done"]}})  # fmt: skip
        assert state.initialize() == V3(total=5)

    def test_newer_version_in_metadata_raises(self, storage: MemoryCheckpointStorage) -> None:
        storage.save(KEY, {"pages_done": 1}, metadata={"format": 2, "schema_version": 7})
        with pytest.raises(StateVersionError, match="schema version 7"):
            make(storage).initialize()

    @pytest.mark.parametrize("version", ["2", 0, None, True])
    def test_malformed_version_in_metadata(
        self, storage: MemoryCheckpointStorage, version: object
    ) -> None:
        storage.save(KEY, {"pages_done": 1}, metadata={"format": 2, "schema_version": version})
        with pytest.raises(StateValidationError, match="malformed schema version") as info:
            make(storage).initialize()
        assert info.value.key == KEY


class TestRootModels:
    """9.9: a RootModel round-trips whatever its root; a dict root is stored bare."""

    @pytest.mark.parametrize(
        ("model", "value", "stored"),
        [
            (RootModel[list[int]], [1, 2, 3], {"root": [1, 2, 3]}),
            (RootModel[int], 7, {"root": 7}),
            (RootModel[str], "seven", {"root": "seven"}),
            (RootModel[list[str] | None], None, {"root": None}),
            (RootModel[dict[str, int]], {"a": 1}, {"a": 1}),
        ],
    )
    def test_round_trip(self, tmp_path: Path, model: Any, value: Any, stored: Any) -> None:
        with FileCheckpointStorage(tmp_path) as files:
            with make(files, model.model_validate(value)):
                pass
            assert files.load(KEY) == stored
            assert (metadata_of(files).get("root") == "wrapped") is ("root" in stored)
            restored = make(files, model.model_validate(value))
            assert restored.initialize().root == value
            restored.teardown()

    def test_changed_value_survives(self, storage: MemoryCheckpointStorage) -> None:
        with make(storage, RootModel[list[int]]([])) as state, state.update() as value:
            value.root.append(5)
        assert make(storage, RootModel[list[int]]([])).initialize().root == [5]

    def test_reset_option_does_not_drop_a_good_value(
        self, storage: MemoryCheckpointStorage
    ) -> None:
        with make(storage, RootModel[list[int]]([1])):
            pass
        state = make(storage, RootModel[list[int]]([]), on_invalid="reset")
        assert state.initialize().root == [1]

    def test_migrating_a_root_value(self, storage: MemoryCheckpointStorage) -> None:
        storage.save(KEY, {"root": [1, 2]}, metadata={"format": 2, "schema_version": 1,
                                                      "root": "wrapped"})  # fmt: skip
        state = make(storage, RootModel[int](0), schema_version=2, migrations={1: sum})
        assert state.initialize().root == 3

    def test_wrapped_marker_with_other_keys(self, storage: MemoryCheckpointStorage) -> None:
        storage.save(KEY, {"root": [1], "x": 2}, metadata={"format": 2, "schema_version": 1,
                                                           "root": "wrapped"})  # fmt: skip
        with pytest.raises(StateValidationError, match="wrapped root value"):
            make(storage, RootModel[list[int]]([])).initialize()


class TestCrawleeCallingConventions:
    """9.7, 9.8, 9.10: what crawlee's own callers pass is accepted."""

    def test_empty_key_while_disabled(self) -> None:
        # crawlee's RequestList passes ``persist_state_key or ''``.
        with RecoverableState(default_state=Progress(), persist_state_key="") as state:
            state.current_value.pages_done = 1
            state.persist_state()
        assert state.current_value.pages_done == 1

    def test_empty_key_while_enabled_is_refused(self) -> None:
        with pytest.raises(ValueError, match="persist_state_key"):
            RecoverableState(
                default_state=Progress(), persist_state_key="", persistence_enabled=True
            )

    def test_persist_state_takes_event_data(self, storage: MemoryCheckpointStorage) -> None:
        with make(storage) as state:
            state.current_value.pages_done = 2
            state.persist_state(None)
            assert storage.load(KEY)["pages_done"] == 2  # type: ignore[index]
            state.current_value.pages_done = 3
            state.persist_state(event_data={"is_migrating": False})
            assert storage.load(KEY)["pages_done"] == 3  # type: ignore[index]

    @pytest.mark.parametrize(
        ("options", "named"),
        [
            ({"storage": MemoryCheckpointStorage()}, "storage given"),
            ({"persist_interval": 5.0}, "persist_interval given"),
            (
                {"storage": MemoryCheckpointStorage(), "persist_interval": 5.0},
                "storage and persist_interval given",
            ),
        ],
    )
    def test_warns_once_when_persistence_is_left_disabled(
        self, caplog: pytest.LogCaptureFixture, options: dict[str, Any], named: str
    ) -> None:
        with caplog.at_level(logging.WARNING, logger="statekeep"):
            state = RecoverableState(default_state=Progress(), persist_state_key=KEY, **options)
            state.initialize()
            state.persist_state()
            state.teardown()
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, warnings
        assert named in warnings[0].getMessage()
        assert "persistence_enabled" in warnings[0].getMessage()
        assert repr(KEY) in warnings[0].getMessage()

    @pytest.mark.parametrize("options", [{}, {"persistence_enabled": True}])
    def test_no_warning_otherwise(
        self, caplog: pytest.LogCaptureFixture, options: dict[str, Any]
    ) -> None:
        storage = MemoryCheckpointStorage()
        with caplog.at_level(logging.WARNING, logger="statekeep"):
            RecoverableState(
                default_state=Progress(),
                persist_state_key=KEY,
                **({"storage": storage, "persist_interval": 5.0} if options else {}),
                **options,
            )
        assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
