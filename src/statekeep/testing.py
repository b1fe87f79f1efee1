"""A conformance suite for checkpoint storages: run it over your own backend.

Subclass :class:`CheckpointStorageContract` (or, for a backend that keeps its
checkpoints after being closed and reopened, :class:`PersistentCheckpointStorageContract`)
in a pytest module and give it a ``make_storage`` fixture: a function that opens the
storage under test, and opens the *same* storage again when called again::

    import pytest
    from statekeep.testing import PersistentCheckpointStorageContract

    class TestMyStorage(PersistentCheckpointStorageContract):
        @pytest.fixture
        def make_storage(self, tmp_path):
            return lambda: MyStorage(tmp_path / "checkpoints")

Every storage the suite opens is closed again (when it has a ``close()``). statekeep
runs this same suite over its memory, file, SQLite, S3 and PostgreSQL backends. This
module imports pytest, so import it from test code only.

Three promises need help from the backend's own tests, through optional fixtures:

- ``damage``: a function ``(storage, session_id) -> None`` that damages the stored
  checkpoint in place; the suite then expects
  :class:`~statekeep.CorruptCheckpointError` from ``load``. Backends built on
  :class:`~statekeep.BaseCheckpointStorage`'s blob methods need none: the suite alters
  the stored blob itself.
- ``make_failing_storage``: a function opening the storage on something broken (a
  missing directory, a stopped server); the suite expects
  :class:`~statekeep.StorageError` with the original error as ``__cause__``.
- the persistent contract forks processes that each call ``make_storage``: it must
  work in a forked child (make a new client or connection per call).

Without them, those tests are skipped with the reason.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, cast
from uuid import UUID

import pydantic
import pytest

from statekeep.errors import CorruptCheckpointError, StorageError
from statekeep.storage._base import BaseCheckpointStorage, CheckpointStorage

__all__ = ["AWKWARD_IDS", "CheckpointStorageContract", "PersistentCheckpointStorageContract"]

StorageFactory = Callable[[], CheckpointStorage]
Damage = Callable[[CheckpointStorage, str], None]

#: Session ids that must neither escape the storage nor collide with each other.
AWKWARD_IDS: tuple[str, ...] = (
    ".",
    "..",
    "../escape",
    "/",
    "a/b",
    "/etc/passwd",
    "\\",
    "a\\b",
    "C:\\Windows",
    "CON",
    "con",
    "Con",
    "nul",
    "LPT1",
    "com1.txt",
    "aux.",
    " ",
    "trailing dot.",
    "trailing space ",
    ".statekeep",
    ".hidden",
    "-rf",
    "%41",
    "A",
    "a",
    "Session",
    "session",
    "SESSION",
    "x" * 300,
    "x" * 299 + "X",
    "ü" * 200,
    "日本語のセッション",
    "emoji \U0001f389",
    "tab\there",
    "new\nline",
    "semi;colon:star*?<>|\"quote'",
)

_DEFAULT_IDS = ("alpha", "beta", "gamma")


def _close(storage: object) -> None:
    close = getattr(storage, "close", None)
    if close is not None:
        close()


def _signed(writer: int, round_: int) -> dict[str, Any]:
    """A value whose parts all depend on who wrote it, so a mix of two is detectable."""
    body = [writer * 1000 + round_] * (50 + writer)
    return {
        "writer": writer,
        "round": round_,
        "body": body,
        "crc": zlib.crc32(repr((writer, round_, body)).encode()),
    }


def _check_signed(value: dict[str, Any] | None) -> tuple[int, int]:
    assert value is not None, "a checkpoint written by concurrent writers is missing"
    writer, round_, body = value["writer"], value["round"], value["body"]
    assert value == _signed(writer, round_), f"value mixes two writers' saves: {value!r}"
    assert zlib.crc32(repr((writer, round_, body)).encode()) == value["crc"]
    return writer, round_


class _Point(pydantic.BaseModel):
    x: int
    when: datetime


class _Shape(pydantic.BaseModel):
    name: str
    points: list[_Point]
    tags: set[str] = set()


class CheckpointStorageContract:
    """The promises every :class:`~statekeep.CheckpointStorage` keeps.

    Subclasses provide a ``make_storage`` fixture returning a no-argument function that
    opens the storage under test.
    """

    @pytest.fixture
    def make_storage(self) -> StorageFactory:
        """Override: return a function that opens the storage under test."""
        pytest.fail(f"{type(self).__name__} must define a make_storage fixture")

    @pytest.fixture
    def storage(self, make_storage: StorageFactory) -> Iterator[CheckpointStorage]:
        """One storage, closed after the test."""
        opened = make_storage()
        try:
            yield opened
        finally:
            _close(opened)

    # -- basics -----------------------------------------------------------------

    def test_satisfies_the_protocol(self, storage: CheckpointStorage) -> None:
        """The storage is an instance of the runtime-checkable protocol."""
        assert isinstance(storage, CheckpointStorage)

    def test_roundtrip(self, storage: CheckpointStorage) -> None:
        """save returns True and load returns an equal, plain dict."""
        data = {"row": 7, "name": "run", "nested": {"list": [1, 2.5, None, True, "x"]}}
        assert storage.save("s1", data) is True
        loaded = storage.load("s1")
        assert loaded == data
        assert type(loaded) is dict

    def test_empty_and_large_values(self, storage: CheckpointStorage) -> None:
        """An empty dict and a value of several megabytes come back whole."""
        large = {"rows": list(range(100_000)), "text": "ü" * 200_000}
        storage.save("empty", {})
        storage.save("large", large)
        assert storage.load("empty") == {}
        assert storage.load("large") == large

    def test_load_of_an_absent_session_is_none(self, storage: CheckpointStorage) -> None:
        """load of a session never saved is None and exists is False."""
        assert storage.load("nobody") is None
        assert storage.exists("nobody") is False

    def test_save_replaces(self, storage: CheckpointStorage) -> None:
        """A second save of a session replaces the first (no merge, one listing)."""
        storage.save("s1", {"row": 1, "old": True})
        storage.save("s1", {"row": 2})
        assert storage.load("s1") == {"row": 2}
        assert [info.session_id for info in storage.list_checkpoints()] == ["s1"]

    def test_delete(self, storage: CheckpointStorage) -> None:
        """delete removes one session, returns True once and then False."""
        storage.save("s1", {"row": 1})
        storage.save("s2", {"row": 2})
        assert storage.delete("s1") is True
        assert storage.exists("s1") is False
        assert storage.load("s1") is None
        assert storage.delete("s1") is False
        assert storage.load("s2") == {"row": 2}
        assert [info.session_id for info in storage.list_checkpoints()] == ["s2"]

    def test_exists(self, storage: CheckpointStorage) -> None:
        """exists is True exactly for saved sessions."""
        assert storage.exists("s1") is False
        storage.save("s1", {})
        assert storage.exists("s1") is True
        assert storage.exists("s2") is False

    # -- listing ------------------------------------------------------------------

    def test_list_of_an_empty_storage(self, storage: CheckpointStorage) -> None:
        """A fresh storage lists nothing."""
        assert storage.list_checkpoints() == []

    def test_list_reports_metadata_size_and_time(self, storage: CheckpointStorage) -> None:
        """Listing gives metadata, a size that grows with the data, and an aware UTC time."""
        before = datetime.now(timezone.utc)
        storage.save("small", {"x": 1}, metadata={"stage": "load", "n": 3})
        storage.save("big", {"x": "y" * 1000})
        after = datetime.now(timezone.utc)
        infos = {info.session_id: info for info in storage.list_checkpoints()}
        assert set(infos) == {"small", "big"}
        assert dict(infos["small"].metadata) == {"stage": "load", "n": 3}
        assert dict(infos["big"].metadata) == {}
        assert 0 < infos["small"].size_bytes < infos["big"].size_bytes
        slack = timedelta(seconds=2)  # filesystem and database clocks may round
        for info in infos.values():
            assert info.timestamp.tzinfo is not None, "timestamps must be timezone-aware"
            assert before - slack <= info.timestamp <= after + slack

    def test_list_is_oldest_first(self, storage: CheckpointStorage) -> None:
        """Listing is ordered by timestamp, then session id."""
        for name in ("zulu", "yankee", "xray"):
            storage.save(name, {"name": name})
        infos = storage.list_checkpoints()
        stamps = {info.session_id: info.timestamp for info in infos}
        assert stamps["zulu"] <= stamps["yankee"] <= stamps["xray"]
        ordered = sorted(infos, key=lambda info: (info.timestamp, info.session_id))
        assert [i.session_id for i in infos] == [i.session_id for i in ordered]

    def test_replacing_updates_time_and_metadata(self, storage: CheckpointStorage) -> None:
        """Replacing a checkpoint replaces its time, size and metadata too."""
        storage.save("s1", {"v": 1}, metadata={"v": 1})
        (first,) = storage.list_checkpoints()
        storage.save("s1", {"v": 2, "more": "data"}, metadata={"v": 2})
        (second,) = storage.list_checkpoints()
        assert second.timestamp >= first.timestamp
        assert dict(second.metadata) == {"v": 2}
        assert second.size_bytes > first.size_bytes

    def test_metadata_takes_json_forms(self, storage: CheckpointStorage) -> None:
        """Metadata is stored as JSON, like data."""
        when = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc)
        storage.save("s1", {}, metadata={"when": when, "id": UUID(int=1)})
        (info,) = storage.list_checkpoints()
        assert dict(info.metadata) == {
            "when": "2024-05-06T07:08:09Z",
            "id": "00000000-0000-0000-0000-000000000001",
        }

    # -- isolation ------------------------------------------------------------------

    def test_mutating_the_saved_dict_changes_nothing(self, storage: CheckpointStorage) -> None:
        """Changing the dicts passed to save afterwards changes nothing stored."""
        data: dict[str, Any] = {"rows": [1, 2], "inner": {"k": "v"}}
        meta: dict[str, Any] = {"tags": ["a"]}
        storage.save("s1", data, metadata=meta)
        data["rows"].append(3)
        data["inner"]["k"] = "changed"
        data["new"] = 1
        meta["tags"].append("b")
        assert storage.load("s1") == {"rows": [1, 2], "inner": {"k": "v"}}
        assert dict(storage.list_checkpoints()[0].metadata) == {"tags": ["a"]}

    def test_mutating_the_loaded_dict_changes_nothing(self, storage: CheckpointStorage) -> None:
        """Changing a loaded dict changes nothing stored."""
        storage.save("s1", {"rows": [1, 2], "inner": {"k": "v"}})
        loaded = storage.load("s1")
        assert loaded is not None
        loaded["rows"].append(3)
        loaded["inner"]["k"] = "changed"
        loaded.clear()
        assert storage.load("s1") == {"rows": [1, 2], "inner": {"k": "v"}}

    # -- keys ---------------------------------------------------------------------

    def test_awkward_ids_roundtrip_without_colliding(self, storage: CheckpointStorage) -> None:
        """Every id in AWKWARD_IDS is its own checkpoint."""
        for index, key in enumerate(AWKWARD_IDS):
            storage.save(key, {"index": index, "key": key}, metadata={"index": index})
        for index, key in enumerate(AWKWARD_IDS):
            assert storage.load(key) == {"index": index, "key": key}, f"session {key!r}"
            assert storage.exists(key)
        listed = {info.session_id: info.metadata["index"] for info in storage.list_checkpoints()}
        assert listed == {key: index for index, key in enumerate(AWKWARD_IDS)}

    def test_awkward_ids_delete_only_themselves(self, storage: CheckpointStorage) -> None:
        """Deleting an awkward id removes that checkpoint and no other."""
        for key in AWKWARD_IDS:
            storage.save(key, {"key": key})
        for gone, key in enumerate(AWKWARD_IDS):
            assert storage.delete(key) is True, f"session {key!r}"
            remaining = {info.session_id for info in storage.list_checkpoints()}
            assert remaining == set(AWKWARD_IDS[gone + 1 :])

    def test_ids_differing_only_in_case_are_distinct(self, storage: CheckpointStorage) -> None:
        """Ids that differ only in case name different checkpoints."""
        for key in ("run", "Run", "RUN", "rUn"):
            storage.save(key, {"key": key})
        for key in ("run", "Run", "RUN", "rUn"):
            assert storage.load(key) == {"key": key}

    @pytest.mark.parametrize("bad", ["", "a\0b", "\0"])
    def test_empty_and_nul_ids_raise_value_error(
        self, storage: CheckpointStorage, bad: str
    ) -> None:
        """An empty id or one holding NUL raises ValueError from every method."""
        with pytest.raises(ValueError, match="session_id"):
            storage.save(bad, {})
        for call in (storage.load, storage.exists, storage.delete):
            with pytest.raises(ValueError, match="session_id"):
                call(bad)
        assert storage.list_checkpoints() == []

    def test_an_id_that_is_not_valid_unicode_raises_value_error(
        self, storage: CheckpointStorage
    ) -> None:
        """An id holding a lone surrogate (not storable as UTF-8) raises ValueError."""
        for call in (lambda key: storage.save(key, {}), storage.load, storage.exists):
            with pytest.raises(ValueError, match=r"(?i)session_id|surrogate|unicode|utf-8"):
                call("half \ud800 a pair")
        assert storage.list_checkpoints() == []

    @pytest.mark.parametrize("bad", [42, None, b"bytes", 1.5])
    def test_ids_of_other_types_raise_type_error(
        self, storage: CheckpointStorage, bad: Any
    ) -> None:
        """An id that is neither str nor UUID raises TypeError."""
        with pytest.raises(TypeError, match="session_id"):
            storage.save(bad, {})
        with pytest.raises(TypeError, match="session_id"):
            storage.load(bad)

    def test_a_uuid_and_its_string_name_one_checkpoint(self, storage: CheckpointStorage) -> None:
        """A UUID and its string name one checkpoint, listed as the string."""
        sid = UUID("12345678-1234-5678-1234-567812345678")
        storage.save(sid, {"via": "uuid"})
        assert storage.load(str(sid)) == {"via": "uuid"}
        assert storage.exists(str(sid))
        storage.save(str(sid), {"via": "str"})
        assert storage.load(sid) == {"via": "str"}
        (info,) = storage.list_checkpoints()
        assert info.session_id == str(sid)
        assert type(info.session_id) is str
        read = getattr(storage, "load_with_info", None)
        if callable(read):
            found = read(sid)
            assert found is not None
            assert found[0] == {"via": "str"}
            assert found[1].session_id == str(sid)
        assert storage.delete(str(sid)) is True
        assert storage.exists(sid) is False

    # -- values ---------------------------------------------------------------------

    def test_rich_types_come_back_as_their_json_forms(self, storage: CheckpointStorage) -> None:
        """Datetimes, UUIDs, Decimals, bytes, tuples and models come back in JSON form."""
        when = datetime(2024, 1, 2, 3, 4, 5, 600000, tzinfo=timezone.utc)
        data = {
            "aware": when,
            "naive": datetime(2024, 1, 2, 3, 4, 5),
            "day": date(2024, 1, 2),
            "uuid": UUID(int=255),
            "decimal": Decimal("1.10"),
            "bytes": b"\x00\xffhi",
            "tuple": (1, "two"),
            "int_keys": {1: "one"},
            "model": _Shape(name="tri", points=[_Point(x=1, when=when)], tags={"t"}),
        }
        storage.save("rich", data)
        assert storage.load("rich") == {
            "aware": "2024-01-02T03:04:05.600000Z",
            "naive": "2024-01-02T03:04:05",
            "day": "2024-01-02",
            "uuid": "00000000-0000-0000-0000-0000000000ff",
            "decimal": "1.10",
            "bytes": "AP9oaQ==",
            "tuple": [1, "two"],
            "int_keys": {"1": "one"},
            "model": {
                "name": "tri",
                "points": [{"x": 1, "when": "2024-01-02T03:04:05.600000Z"}],
                "tags": ["t"],
            },
        }

    def test_unicode_and_escapes_survive(self, storage: CheckpointStorage) -> None:
        """Newlines, quotes, backslashes and non-ASCII text survive."""
        data = {"text": 'line\nbreak "quoted" \\ tab\t \u2028 ü 日本 \U0001f389', "ü": "key"}
        storage.save("s1", data)
        assert storage.load("s1") == data

    @pytest.mark.parametrize(
        ("data", "metadata"),
        [
            ({"bad": object()}, None),
            ({"fine": 1}, {"bad": object()}),
            ({"bad": {1, object()}}, None),
            ([("not", "a mapping")], None),
            ("not a mapping", None),
            ({"fine": 1}, ["not", "a mapping"]),
        ],
        ids=["object", "object-in-metadata", "object-in-set", "list", "str", "list-metadata"],
    )
    def test_unserialisable_values_raise_type_error_and_store_nothing(
        self, storage: CheckpointStorage, data: Any, metadata: Any
    ) -> None:
        """A value JSON cannot carry raises TypeError naming the session and stores nothing."""
        storage.save("s1", {"kept": True}, metadata={"kept": True})
        with pytest.raises(TypeError, match="s1"):
            storage.save("s1", data, metadata=metadata)
        with pytest.raises(TypeError, match="s2"):
            storage.save("s2", data, metadata=metadata)
        assert storage.load("s1") == {"kept": True}
        assert storage.exists("s2") is False
        assert [dict(info.metadata) for info in storage.list_checkpoints()] == [{"kept": True}]

    def test_a_circular_value_raises_type_error(self, storage: CheckpointStorage) -> None:
        """A value that contains itself raises TypeError."""
        loop: dict[str, Any] = {}
        loop["self"] = loop
        with pytest.raises(TypeError, match="s1"):
            storage.save("s1", loop)
        assert storage.exists("s1") is False

    # -- concurrency ------------------------------------------------------------------

    def test_concurrent_writers_of_one_session_leave_one_whole_value(
        self, storage: CheckpointStorage
    ) -> None:
        """Threads saving one session end with one writer's whole last value."""
        writers, rounds = 6, 25
        start = threading.Barrier(writers, timeout=30)
        errors: list[BaseException] = []

        def write(writer: int) -> None:
            try:
                start.wait()
                for round_ in range(rounds):
                    storage.save("shared", _signed(writer, round_), metadata={"w": writer})
                    _check_signed(storage.load("shared"))
            except BaseException as exc:  # reported below, in the test's thread
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not any(thread.is_alive() for thread in threads), "a writer hung"
        assert errors == []
        writer, round_ = _check_signed(storage.load("shared"))
        assert round_ == rounds - 1, "the last value must be some writer's last save"
        (info,) = storage.list_checkpoints()
        assert info.session_id == "shared"
        assert 0 <= writer < writers

    def test_concurrent_writers_of_many_sessions(self, storage: CheckpointStorage) -> None:
        """Threads saving their own sessions lose nothing."""
        writers = 6
        start = threading.Barrier(writers, timeout=30)
        errors: list[BaseException] = []

        def write(writer: int) -> None:
            try:
                start.wait()
                for round_ in range(10):
                    storage.save(f"session-{writer}", _signed(writer, round_))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert errors == []
        for writer in range(writers):
            assert _check_signed(storage.load(f"session-{writer}")) == (writer, 9)
        assert len(storage.list_checkpoints()) == writers

    # -- damage, failure, retention --------------------------------------------------

    @pytest.fixture
    def damage(self) -> Damage | None:
        """Override: a function damaging a session's stored checkpoint in place."""
        return None

    @pytest.fixture
    def make_failing_storage(self) -> StorageFactory | None:
        """Override: a function opening the storage on something broken."""
        return None

    def test_damaged_data_raises_corrupt_checkpoint_error(
        self, storage: CheckpointStorage, damage: Damage | None
    ) -> None:
        """A damaged checkpoint raises CorruptCheckpointError naming the session."""
        if damage is None:
            damage = _blob_damage(storage)
        storage.save("victim", {"x": 1, "text": "some words to damage"}, metadata={"m": 1})
        storage.save("bystander", {"y": 2})
        damage(storage, "victim")
        with pytest.raises(CorruptCheckpointError, match="victim"):
            storage.load("victim")
        assert storage.load("bystander") == {"y": 2}
        assert "bystander" in {info.session_id for info in storage.list_checkpoints()}
        storage.save("victim", {"x": 2})
        assert storage.load("victim") == {"x": 2}, "a new save replaces a damaged one"

    def test_backend_failure_is_a_storage_error_with_its_cause(
        self, make_failing_storage: StorageFactory | None
    ) -> None:
        """A failing backend raises StorageError whose __cause__ is the original error."""
        if make_failing_storage is None:
            pytest.skip("no make_failing_storage fixture")
        failing = _open_or_error(make_failing_storage)
        if isinstance(failing, StorageError):  # failing at open is fine, with its cause
            assert failing.__cause__ is not None, "StorageError without its cause"
            return
        try:
            calls: list[Callable[[], object]] = [
                lambda: failing.save("s", {"x": 1}),
                lambda: failing.load("s"),
                failing.list_checkpoints,
            ]
            for call in calls:
                with pytest.raises(StorageError) as caught:
                    call()
                assert caught.value.__cause__ is not None, "StorageError without its cause"
                assert not isinstance(caught.value.__cause__, StorageError)
        finally:
            _close(failing)

    def test_delete_older_than(self, storage: CheckpointStorage) -> None:
        """delete_older_than(age) removes what is older and returns how many."""
        prune = getattr(storage, "delete_older_than", None)
        if prune is None:
            pytest.skip(f"{type(storage).__name__} has no delete_older_than")
        storage.save("s1", {})
        storage.save("s2", {})
        assert prune(timedelta(days=1)) == 0
        assert {i.session_id for i in storage.list_checkpoints()} == {"s1", "s2"}
        assert prune(timedelta(0)) == 2
        assert storage.list_checkpoints() == []
        assert storage.load("s1") is None
        with pytest.raises(ValueError, match="negative"):
            prune(timedelta(seconds=-1))
        with pytest.raises(TypeError, match="timedelta"):
            prune(3600)

    # -- data and info from one read ---------------------------------------------------

    def test_load_with_info_gives_data_and_info_of_one_save(
        self, storage: CheckpointStorage
    ) -> None:
        """load_with_info returns the data and the listed info of the newest save."""
        read = _load_with_info(storage)
        storage.save("s1", {"v": 1}, metadata={"v": 1})
        storage.save("other", {"x": 0}, metadata={"other": True})
        for round_ in (2, 3):
            storage.save("s1", {"v": round_, "pad": "p" * round_}, metadata={"v": round_})
            found = read("s1")
            assert found is not None
            data, info = found
            assert data == {"v": round_, "pad": "p" * round_}
            assert type(data) is dict
            (listed,) = [i for i in storage.list_checkpoints() if i.session_id == "s1"]
            assert info == listed, "load_with_info's info differs from the listing's"
            assert info.session_id == "s1"
            assert dict(info.metadata) == {"v": round_}
            assert info.timestamp.tzinfo is not None
        data["v"] = "changed"
        if isinstance(info.metadata, dict):  # a read-only mapping is fine too
            info.metadata["v"] = "changed"
        found = read("s1")
        assert found is not None
        assert found[0] == {"v": 3, "pad": "ppp"}, "mutating the loaded data changed the store"
        assert dict(found[1].metadata) == {"v": 3}, "mutating the info changed the store"

    def test_load_with_info_of_an_absent_session_is_none(self, storage: CheckpointStorage) -> None:
        """load_with_info is None for a session never saved, and after its deletion."""
        read = _load_with_info(storage)
        assert read("nobody") is None
        storage.save("s1", {"x": 1}, metadata={"m": 1})
        found = read("s1")
        assert found is not None
        assert found[0] == {"x": 1}
        storage.delete("s1")
        assert read("s1") is None
        with pytest.raises(ValueError, match="session_id"):
            read("")
        with pytest.raises(TypeError, match="session_id"):
            read(42)

    def test_load_with_info_of_a_damaged_checkpoint_raises(
        self, storage: CheckpointStorage, damage: Damage | None
    ) -> None:
        """A damaged checkpoint raises CorruptCheckpointError from load_with_info too."""
        read = _load_with_info(storage)
        if damage is None:
            damage = _blob_damage(storage)
        storage.save("victim", {"x": 1, "text": "some words to damage"}, metadata={"m": 1})
        storage.save("bystander", {"y": 2}, metadata={"m": 2})
        damage(storage, "victim")
        with pytest.raises(CorruptCheckpointError, match="victim"):
            read("victim")
        found = read("bystander")
        assert found is not None
        assert found[0] == {"y": 2}
        assert dict(found[1].metadata) == {"m": 2}

    def test_load_with_info_never_pairs_two_saves(self, storage: CheckpointStorage) -> None:
        """While a thread saves pairs with matching data and metadata, reads never mix them."""
        read = _load_with_info(storage)
        for n in range(20):  # others: a listing of them takes a while
            storage.save(f"other-{n}", {"n": n}, metadata={"n": -1})
        storage.save("raced", {"n": 0, "pad": ""}, metadata={"n": 0})

        def check() -> None:
            found = read("raced")
            assert found is not None, "a checkpoint being replaced read as absent"
            data, info = found
            assert data["n"] == info.metadata["n"], f"data {data} paired with {info}"
            assert data["pad"] == "p" * (data["n"] % 5)

        def save(n: int) -> None:
            storage.save("raced", {"n": n, "pad": "p" * (n % 5)}, metadata={"n": n})

        _race(save, check, readers=2, reads=150)

    def test_recoverable_state_initialize_does_not_list(self, storage: CheckpointStorage) -> None:
        """RecoverableState.initialize reads value and schema version without a listing."""
        _load_with_info(storage)
        from statekeep._recoverable import RecoverableState

        for n in range(5):
            storage.save(f"other-{n}", {"n": n})
        old = RecoverableState(
            default_state=_V1(n=7),
            persist_state_key="state",
            persistence_enabled=True,
            storage=storage,
        )
        with old:
            pass  # persists the default at schema version 1
        spy = _CountingStorage(storage)
        new = RecoverableState(
            default_state=_V2(written_as=2),
            persist_state_key="state",
            persistence_enabled=True,
            storage=spy,
            schema_version=2,
            migrations={1: _mark_migrated},
        )
        value = new.initialize()
        try:
            assert (value.written_as, value.migrated, value.n) == (1, True, 7)
            assert spy.calls["list_checkpoints"] == 0, "initialize() listed every checkpoint"
            assert spy.calls["load_with_info"] == 1
        finally:
            new.teardown()
        found = storage.load("state")
        assert found == {"written_as": 1, "migrated": True, "n": 7}

    def test_recoverable_state_never_pairs_one_saves_data_with_anothers_schema_version(
        self, storage: CheckpointStorage
    ) -> None:
        """A RecoverableState initializing while its key is saved at two schema versions
        migrates exactly the version-1 saves (never one save's data with another's version).
        """
        _load_with_info(storage)
        from statekeep._recoverable import RecoverableState

        for n in range(20):  # others: a listing of them takes a while
            storage.save(f"other-{n}", {"n": n})
        writers = [
            RecoverableState(
                default_state=model,
                persist_state_key="raced",
                persistence_enabled=True,
                storage=storage,
                schema_version=version,
                migrations={1: _mark_migrated} if version == 2 else None,
            )
            for version, model in ((1, _V1()), (2, _V2(written_as=2)))
        ]
        for writer in writers:  # both start from their defaults: nothing is persisted yet
            assert writer.initialize().written_as == (1 if writer is writers[0] else 2)
        for writer in writers:
            writer.persist_state()

        def save(n: int) -> None:
            writer = writers[n % 2]
            with writer.update() as value:
                value.n = n
            writer.persist_state()

        def check() -> None:
            reader = RecoverableState(
                default_state=_V2(written_as=0),
                persist_state_key="raced",
                persistence_enabled=True,
                storage=storage,
                schema_version=2,
                migrations={1: _mark_migrated},
            )
            value = reader.initialize()
            # no teardown: it would persist what was read; a reader only reads
            assert value.written_as in (1, 2), f"read the default: {value}"
            assert value.migrated == (value.written_as == 1), (
                f"one save's data was read with another save's schema version: {value}"
            )

        try:
            _race(save, check, readers=2, reads=100)
        finally:
            for writer in writers:
                writer.teardown()

    # -- lifecycle -----------------------------------------------------------------

    def test_context_manager_and_idempotent_close(self, make_storage: StorageFactory) -> None:
        """The storage is a context manager and close() may be called twice."""
        opened: Any = make_storage()
        if not hasattr(opened, "close") or not hasattr(opened, "__enter__"):
            pytest.skip(f"{type(opened).__name__} has no close() / context manager")
        with opened as entered:
            assert entered is opened
            entered.save("s1", {"row": 1})
        opened.close()
        opened.close()


class PersistentCheckpointStorageContract(CheckpointStorageContract):
    """The contract plus the promises of a storage that outlives the object.

    ``make_storage`` must open the same underlying storage each time it is called.
    """

    def test_reopening_keeps_everything(self, make_storage: StorageFactory) -> None:
        """Checkpoints, deletions and listings survive closing and reopening."""
        sid = UUID(int=7)
        first = make_storage()
        try:
            for key in (*_DEFAULT_IDS, *AWKWARD_IDS[:8]):
                first.save(key, {"key": key}, metadata={"m": key})
            first.save(sid, {"uuid": True})
            first.delete("beta")
            before = first.list_checkpoints()
        finally:
            _close(first)
        second = make_storage()
        try:
            assert second.list_checkpoints() == before
            assert second.load("alpha") == {"key": "alpha"}
            assert second.load("beta") is None
            assert second.load(str(sid)) == {"uuid": True}
            for key in AWKWARD_IDS[:8]:
                assert second.load(key) == {"key": key}
            second.save("alpha", {"key": "again"})
        finally:
            _close(second)
        third = make_storage()
        try:
            assert third.load("alpha") == {"key": "again"}
        finally:
            _close(third)

    def test_two_open_instances_see_each_other(self, make_storage: StorageFactory) -> None:
        """Two instances on the same place see each other's saves and deletions."""
        one, two = make_storage(), make_storage()
        try:
            one.save("s1", {"from": "one"})
            assert two.load("s1") == {"from": "one"}
            two.save("s1", {"from": "two"})
            assert one.load("s1") == {"from": "two"}
            assert two.delete("s1") is True
            assert one.exists("s1") is False
        finally:
            _close(one)
            _close(two)

    def test_writers_in_several_processes_end_with_one_whole_value(
        self, make_storage: StorageFactory
    ) -> None:
        """Processes saving one session at once end with one writer's whole last value."""
        if not hasattr(os, "fork"):
            pytest.skip("needs fork")
        writers, rounds = 4, 15
        first = make_storage()  # creates what needs creating before the race
        _close(first)
        context = multiprocessing.get_context("fork")
        start = context.Event()
        with warnings.catch_warnings():
            # Python 3.12+ warns about fork in a process with threads; children here
            # only call make_storage and save, then exit
            warnings.simplefilter("ignore", DeprecationWarning)
            procs = [
                context.Process(target=_process_writer, args=(make_storage, w, rounds, start))
                for w in range(writers)
            ]
            for proc in procs:
                proc.start()
        start.set()
        for proc in procs:
            proc.join(timeout=120)
        hung = [proc for proc in procs if proc.exitcode is None]
        for proc in hung:
            proc.kill()
            proc.join()
        assert not hung, "a writer process hung"
        assert [proc.exitcode for proc in procs] == [0] * writers, "a writer process failed"
        check = make_storage()
        try:
            writer, round_ = _check_signed(check.load("shared"))
            assert round_ == rounds - 1
            assert 0 <= writer < writers
            assert [info.session_id for info in check.list_checkpoints()] == ["shared"]
        finally:
            _close(check)


class _V1(pydantic.BaseModel):
    """A state at schema version 1."""

    written_as: int = 1
    n: int = 0


class _V2(pydantic.BaseModel):
    """The same state at schema version 2: ``migrated`` is True only after migration."""

    written_as: int
    migrated: bool = False
    n: int = 0


def _mark_migrated(state: dict[str, Any]) -> dict[str, Any]:
    return {**state, "migrated": True}


def _load_with_info(storage: CheckpointStorage) -> Callable[..., Any]:
    read = getattr(storage, "load_with_info", None)
    if not callable(read):
        pytest.skip(
            f"{type(storage).__name__} has no load_with_info (optional: without it "
            "RecoverableState finds the schema version with a listing)"
        )
    return cast("Callable[..., Any]", read)


class _CountingStorage:
    """Forwards every call to a storage and counts them by method name."""

    def __init__(self, inner: CheckpointStorage) -> None:
        self.inner = inner
        self.calls: dict[str, int] = dict.fromkeys(
            ("save", "load", "load_with_info", "exists", "delete", "list_checkpoints"), 0
        )

    def _count(self, name: str) -> Any:
        self.calls[name] += 1
        return getattr(self.inner, name)

    def save(self, session_id: str | UUID, data: Any, *, metadata: Any = None) -> bool:
        return bool(self._count("save")(session_id, data, metadata=metadata))

    def load(self, session_id: str | UUID) -> dict[str, Any] | None:
        result: dict[str, Any] | None = self._count("load")(session_id)
        return result

    def load_with_info(self, session_id: str | UUID) -> Any:
        return self._count("load_with_info")(session_id)

    def exists(self, session_id: str | UUID) -> bool:
        return bool(self._count("exists")(session_id))

    def delete(self, session_id: str | UUID) -> bool:
        return bool(self._count("delete")(session_id))

    def list_checkpoints(self) -> list[Any]:
        return list(self._count("list_checkpoints")())


def _race(
    save: Callable[[int], None],
    check: Callable[[], None],
    *,
    readers: int,
    reads: int,
    saves: int = 20,
) -> None:
    """Run ``save(1), save(2), ...`` in one thread while ``readers`` threads ``check()``
    until each checked ``reads`` times and ``saves`` saves happened (at most 60 s).

    Re-raises the first failure of any thread.
    """
    done = threading.Event()
    errors: list[BaseException] = []
    saved = [0]

    def write() -> None:
        try:
            while not done.is_set():
                save(saved[0] + 1)
                saved[0] += 1
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)
            done.set()

    def read() -> None:
        try:
            deadline = time.monotonic() + 60
            count = 0
            while not done.is_set() and time.monotonic() < deadline:
                check()
                count += 1
                if count >= reads and saved[0] >= saves:
                    break
        except BaseException as exc:
            errors.append(exc)
            done.set()

    writer = threading.Thread(target=write, name="statekeep-testing-writer")
    threads = [
        threading.Thread(target=read, name=f"statekeep-testing-reader-{r}") for r in range(readers)
    ]
    writer.start()
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        done.set()
        writer.join(timeout=120)
    assert not writer.is_alive(), "the writer hung"
    assert not any(t.is_alive() for t in threads), "a reader hung"
    if errors:
        raise errors[0]
    assert saved[0] >= saves, f"only {saved[0]} saves happened during the reads"


def _open_or_error(make: StorageFactory) -> CheckpointStorage | StorageError:
    try:
        return make()
    except StorageError as exc:
        return exc


def _process_writer(make_storage: StorageFactory, writer: int, rounds: int, start: Any) -> None:
    start.wait(60)
    storage = make_storage()
    try:
        for round_ in range(rounds):
            storage.save("shared", _signed(writer, round_))
            _check_signed(storage.load("shared"))
    finally:
        _close(storage)


def _blob_damage(storage: CheckpointStorage) -> Damage:
    """Alter the stored data through the raw methods of a BaseCheckpointStorage blob backend."""
    base = BaseCheckpointStorage
    if not isinstance(storage, base) or type(storage)._get is not base._get:
        pytest.skip(f"no damage fixture for {type(storage).__name__}")

    def flip(target: CheckpointStorage, key: str) -> None:
        assert isinstance(target, base)
        name = target._name(key)
        blob = target._read(name)
        assert blob is not None
        head, _, payload = blob.partition(b"\n")
        # still valid JSON of the same size: only the checksum can tell
        assert b"some words" in payload
        target._write(name, head + b"\n" + payload.replace(b"some words", b"SOME words"))

    return flip
