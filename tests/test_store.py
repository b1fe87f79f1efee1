"""StateStore: register, save, load, list, and recover the newest good state."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import zlib
from datetime import timezone
from pathlib import Path

import pytest

from statekeep import (
    CorruptStateError,
    PersistentStateMixin,
    StateExistsError,
    StateInfo,
    StateStore,
    _atomic,
    _manifest,
)


class Value(PersistentStateMixin):
    """A component that writes one file."""

    def __init__(self, value: bytes = b"") -> None:
        self.value = value

    def save_state(self, path: Path) -> None:
        path.write_bytes(self.value)

    def load_state(self, path: Path) -> None:
        self.value = path.read_bytes()


class Folder(PersistentStateMixin):
    """A component that writes a directory."""

    def __init__(self, items: dict[str, bytes] | None = None) -> None:
        self.items = dict(items or {})

    def save_state(self, path: Path) -> None:
        path.mkdir()
        for key, data in self.items.items():
            (path / key).write_bytes(data)

    def load_state(self, path: Path) -> None:
        self.items = {p.name: p.read_bytes() for p in path.iterdir()}


class Model(PersistentStateMixin):
    """A component that writes ``<name>.pt`` and ``<name>.optim.pt`` beside its path."""

    def __init__(self, weights: bytes = b"", moments: bytes = b"") -> None:
        self.weights, self.moments = weights, moments

    def save_state(self, path: Path) -> None:
        path.with_name(path.name + ".pt").write_bytes(self.weights)
        path.with_name(path.name + ".optim.pt").write_bytes(self.moments)

    def load_state(self, path: Path) -> None:
        self.weights = path.with_name(path.name + ".pt").read_bytes()
        self.moments = path.with_name(path.name + ".optim.pt").read_bytes()


def make_store(states_dir: Path, **kw: object) -> tuple[StateStore, Value, Folder, Model]:
    store = StateStore(states_dir, **kw)  # type: ignore[arg-type]
    value, folder, model = Value(b"v1"), Folder({"a": b"A", "b": b"B"}), Model(b"W" * 100, b"M")
    store.register("value", value)
    store.register("folder", folder)
    store.register("model", model)
    return store, value, folder, model


def private_entries(states_dir: Path) -> list[str]:
    return sorted(n for n in os.listdir(states_dir) if _atomic.is_private(n))


class TestRegister:
    """Names are plain, unique file names."""

    def test_duplicate(self, states_dir: Path) -> None:
        store = StateStore(states_dir)
        first = Value(b"first")
        store.register("x", first)
        with pytest.raises(KeyError, match="'x' is already registered"):
            store.register("x", Value(b"second"))
        store.save_state()
        assert sorted(os.listdir(store.latest_state() or "")) == [_manifest.MANIFEST_NAME, "x"]

    @pytest.mark.parametrize(
        "name", ["", ".", "..", "a/b", "/abs", "a\\b", "nul\0byte", ".statekeep", ".statekeep-x"]
    )
    def test_bad_names(self, states_dir: Path, name: str) -> None:
        store = StateStore(states_dir)
        with pytest.raises(ValueError, match="is not allowed") as info:
            store.register(name, Value())
        assert repr(name) in str(info.value)

    def test_too_long_for_a_file_name(self, states_dir: Path) -> None:
        store = StateStore(states_dir)
        store.register("n" * 255, Value(b"fits"))  # exactly the limit is fine
        with pytest.raises(ValueError, match="is 256 bytes, a file name may be at most 255"):
            store.register("é" * 128, Value())  # 128 characters, 256 bytes in UTF-8
        assert store.load_state(store.save_state()) is None

    def test_not_encodable_for_the_filesystem(self, states_dir: Path) -> None:
        with pytest.raises(ValueError, match="is not allowed: surrogates not allowed"):
            StateStore(states_dir).register("bad\ud800name", Value())

    def test_not_a_string(self, states_dir: Path) -> None:
        with pytest.raises(TypeError, match="must be a str"):
            StateStore(states_dir).register(3, Value())  # type: ignore[arg-type]

    def test_unicode_name(self, states_dir: Path) -> None:
        store = StateStore(states_dir)
        store.register("模型 ü", Value(b"u"))
        assert (store.save_state() / "模型 ü").read_bytes() == b"u"


class TestSave:
    """A save builds privately and appears complete, in one rename."""

    def test_creates_states_dir_with_parents(self, tmp_path: Path) -> None:
        StateStore(tmp_path / "a" / "b")
        assert os.listdir(tmp_path / "a" / "b") == []  # created, and holds only states

    @pytest.mark.parametrize("durable", [True, False])
    def test_round_trip(self, states_dir: Path, durable: bool) -> None:
        store, value, folder, model = make_store(states_dir, durable=durable)
        path = store.save_state()
        assert path.parent == states_dir
        assert path.name.endswith(".state")
        assert sorted(os.listdir(path)) == sorted(
            [_manifest.MANIFEST_NAME, "value", "folder", "model.pt", "model.optim.pt"]
        )
        value.value, folder.items, model.weights = b"changed", {}, b""
        store.load_state(path)
        assert value.value == b"v1"
        assert folder.items == {"a": b"A", "b": b"B"}
        assert (model.weights, model.moments) == (b"W" * 100, b"M")

    def test_sibling_files_are_in_the_manifest(self, states_dir: Path) -> None:
        store, *_ = make_store(states_dir)
        paths = {e.path for e in _manifest.read_manifest(store.save_state()).entries}
        assert paths == {"value", "folder", "folder/a", "folder/b", "model.pt", "model.optim.pt"}

    def test_components_write_into_a_private_build_in_order(self, states_dir: Path) -> None:
        seen: list[tuple[str, Path]] = []

        class Spy(PersistentStateMixin):
            def __init__(self, name: str) -> None:
                self.name = name

            def save_state(self, path: Path) -> None:
                seen.append((self.name, path))
                assert os.listdir(states_dir) == [path.parent.name]  # only the private build
                path.write_text(self.name)

        store = StateStore(states_dir)
        for name in ("c", "a", "b"):
            store.register(name, Spy(name))
        final = store.save_state()
        assert [name for name, _ in seen] == ["c", "a", "b"]
        build = seen[0][1].parent
        assert build.parent == states_dir
        assert _atomic.is_private(build.name)
        assert build.name.endswith(".work")
        assert all(path.parent == build for _, path in seen)
        assert (final / "a").read_text() == "a"

    def test_default_mixin_writes_nothing(self, states_dir: Path) -> None:
        store = StateStore(states_dir)
        store.register("nothing", PersistentStateMixin())
        path = store.save_state()
        assert os.listdir(path) == [_manifest.MANIFEST_NAME]
        store.load_state(path)

    def test_failing_component_leaves_nothing(self, states_dir: Path) -> None:
        class Broken(PersistentStateMixin):
            def save_state(self, path: Path) -> None:
                path.write_bytes(b"half")
                raise OSError(28, "No space left on device")

        store, *_ = make_store(states_dir)
        store.register("broken", Broken())
        with pytest.raises(OSError, match="No space left"):
            store.save_state()
        assert os.listdir(states_dir) == []

    @pytest.mark.parametrize("fmt", ["a/%f.state", "", "..", ".statekeep%f"])
    def test_bad_name_format(self, states_dir: Path, fmt: str) -> None:
        store = StateStore(states_dir, state_name_format=fmt)
        with pytest.raises(ValueError, match="state_name_format produced"):
            store.save_state()

    def test_name_follows_the_format(self, states_dir: Path) -> None:
        store = StateStore(states_dir, state_name_format="run-%Y.ckpt")
        assert store.save_state().name == f"run-{time.localtime().tm_year}.ckpt"


class TestStateExists:
    """A second save to a committed name fails and leaves the first one intact."""

    def test_second_save(self, states_dir: Path) -> None:
        store, value, *_ = make_store(states_dir, state_name_format="fixed.state")
        first = store.save_state()
        before = {p: p.read_bytes() for p in first.rglob("*") if p.is_file()}
        value.value = b"v2"
        with pytest.raises(StateExistsError) as info:
            store.save_state()
        assert isinstance(info.value, FileExistsError)
        assert info.value.filename == str(first)
        assert {p: p.read_bytes() for p in first.rglob("*") if p.is_file()} == before
        _manifest.verify(first)
        assert private_entries(states_dir) == []

    def test_name_taken_during_the_save(self, states_dir: Path) -> None:
        final = states_dir / "fixed.state"

        class Racer(PersistentStateMixin):
            def save_state(self, path: Path) -> None:
                final.mkdir()  # another writer commits the same name meanwhile
                (final / "theirs").write_bytes(b"theirs")
                path.write_bytes(b"ours")

        store = StateStore(states_dir, state_name_format="fixed.state")
        store.register("racer", Racer())
        with pytest.raises(StateExistsError):
            store.save_state()
        assert os.listdir(final) == ["theirs"]
        assert private_entries(states_dir) == []


class TestLoad:
    """load_state refuses a damaged state unless verify=False."""

    def test_missing(self, states_dir: Path) -> None:
        store, *_ = make_store(states_dir)
        with pytest.raises(FileNotFoundError, match="nope"):
            store.load_state(states_dir / "nope")

    def test_corrupt_is_refused_and_nothing_is_loaded(self, states_dir: Path) -> None:
        store, value, *_ = make_store(states_dir)
        path = store.save_state()
        (path / "model.pt").write_bytes(b"X" * 100)  # same size, other bytes
        value.value = b"current"
        with pytest.raises(CorruptStateError) as info:
            store.load_state(path)
        assert str(path) in str(info.value)
        assert "model.pt" in str(info.value)
        assert value.value == b"current"

    def test_verify_false_loads_anyway(self, states_dir: Path) -> None:
        store, value, _, model = make_store(states_dir)
        path = store.save_state()
        (path / "model.pt").write_bytes(b"tampered")
        (path / _manifest.MANIFEST_NAME).unlink()
        value.value = b"current"
        store.load_state(str(path), verify=False)
        assert value.value == b"v1"
        assert model.weights == b"tampered"

    def test_manifest_missing(self, states_dir: Path) -> None:
        store, *_ = make_store(states_dir)
        path = store.save_state()
        (path / _manifest.MANIFEST_NAME).unlink()
        with pytest.raises(CorruptStateError, match="has no manifest") as info:
            store.load_state(path)
        assert str(path / _manifest.MANIFEST_NAME) in str(info.value)


class TestListing:
    """list_states shows committed states only, oldest first."""

    def test_empty(self, states_dir: Path) -> None:
        store = StateStore(states_dir)
        assert store.list_states() == []
        assert store.latest_state() is None
        assert store.load_latest_state() is None

    def test_oldest_first(self, states_dir: Path) -> None:
        store, *_ = make_store(states_dir)
        paths = [store.save_state() for _ in range(4)]
        infos = store.list_states()
        assert [i.path for i in infos] == paths
        assert [i.created_at for i in infos] == sorted(i.created_at for i in infos)
        assert store.latest_state() == paths[-1]

    def test_state_info(self, states_dir: Path) -> None:
        store, *_ = make_store(states_dir)
        path = store.save_state()
        [info] = store.list_states()
        assert info == StateInfo(path, info.created_at, 2 + 1 + 1 + 100 + 1)
        assert info.created_at.tzinfo is not None
        assert info.created_at.utcoffset() == timezone.utc.utcoffset(None)
        with pytest.raises(dataclasses.FrozenInstanceError):
            info.size_bytes = 0  # type: ignore[misc]

    def test_ignores_what_is_not_a_committed_state(self, states_dir: Path) -> None:
        store, *_ = make_store(states_dir)
        path = store.save_state()
        (states_dir / "notes.state").write_text("a file")
        (states_dir / "legacy.state").mkdir()
        (states_dir / ".statekeep-x.work").mkdir()
        assert [i.path for i in store.list_states()] == [path]
        assert store.latest_state() == path

    def test_latest_skips_a_newer_state_whose_manifest_fails(self, states_dir: Path) -> None:
        store, *_ = make_store(states_dir)
        older, newer = store.save_state(), store.save_state()
        manifest = newer / _manifest.MANIFEST_NAME
        raw = manifest.read_bytes()
        manifest.write_bytes(raw.replace(b'"size": 1,', b'"size": 9,', 1))  # head intact
        assert _manifest.read_order(str(newer)) is not None
        assert store.latest_state() == older == store.list_states()[-1].path

    def test_latest_places_a_manifest_in_another_layout(self, states_dir: Path) -> None:
        store, *_ = make_store(states_dir)
        older, newer = store.save_state(), store.save_state()
        manifest = newer / _manifest.MANIFEST_NAME
        body = json.loads(manifest.read_bytes())
        body.pop("checksum")
        content = json.dumps(body, indent=4)[: -len("\n}")].encode() + b","
        manifest.write_bytes(content + b'\n "checksum": %d\n}\n' % zlib.crc32(content))
        assert _manifest.read_order(str(newer)) is None  # ordered by a full parse instead
        assert store.latest_state() == newer
        (older / _manifest.MANIFEST_NAME).unlink()
        assert store.latest_state() == newer


class TestLoadLatest:
    """load_latest_state falls back to the newest state that verifies, and says why."""

    def test_newest(self, states_dir: Path) -> None:
        store, value, *_ = make_store(states_dir)
        store.save_state()
        value.value = b"v2"
        newest = store.save_state()
        value.value = b"other"
        assert store.load_latest_state() == newest
        assert value.value == b"v2"

    def test_falls_back_and_logs(self, states_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
        store, value, *_ = make_store(states_dir)
        good = store.save_state()
        value.value = b"v2"
        flipped = store.save_state()
        value.value = b"v3"
        truncated = store.save_state()
        data = bytearray((flipped / "value").read_bytes())
        data[0] ^= 1
        (flipped / "value").write_bytes(bytes(data))
        os.truncate(truncated / "model.pt", 3)
        value.value = b"current"
        with caplog.at_level(logging.WARNING, logger="statekeep"):
            assert store.load_latest_state() == good
        assert value.value == b"v1"
        skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
        assert len(skipped) == 2
        assert str(truncated) in skipped[0]
        assert "model.pt is 3 bytes, manifest says 100" in skipped[0]
        assert str(flipped) in skipped[1]
        assert "value has CRC-32" in skipped[1]

    def test_skips_a_newer_directory_without_manifest(
        self, states_dir: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        store, *_ = make_store(states_dir)
        good = store.save_state()
        legacy = states_dir / "legacy.state"
        legacy.mkdir()
        future = time.time() + 3600
        os.utime(legacy, (future, future))
        with caplog.at_level(logging.WARNING, logger="statekeep"):
            assert store.load_latest_state() == good
        assert f"skipping state: state {legacy} has no manifest" in caplog.text
        assert "has no manifest" in caplog.text

    def test_none_verifies(self, states_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
        store, *_ = make_store(states_dir)
        path = store.save_state()
        (path / "value").unlink()
        with caplog.at_level(logging.WARNING, logger="statekeep"):
            assert store.load_latest_state() is None
        assert "value is missing" in caplog.text


class TestSweepOnOpen:
    """A new store reclaims what a killed save left, and nothing else."""

    def test_reclaims_dead_work(self, states_dir: Path) -> None:
        StateStore(states_dir)
        private = states_dir
        (private / ".statekeep-dead.work").mkdir()
        (private / ".statekeep-dead.work" / "half").write_bytes(b"x")
        (private / ".statekeep-gone.trash").mkdir()
        StateStore(states_dir)
        assert private_entries(states_dir) == []

    def test_keeps_live_work(self, states_dir: Path) -> None:
        _atomic.make_root(states_dir, durable=False)
        work = _atomic.Work(states_dir, is_dir=True)
        try:
            StateStore(states_dir)
            assert work.path.is_dir()
        finally:
            work.discard()
