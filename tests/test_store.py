"""StateStore: register, save, load, list, and recover the newest good state."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import pickle
import resource
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from datetime import timezone
from pathlib import Path
from typing import Any

import pytest

from statekeep import (
    CorruptStateError,
    LatestStatesKeeper,
    MissingComponentsError,
    PersistentStateMixin,
    StateExistsError,
    StateInfo,
    StatekeepError,
    StateStore,
    _atomic,
    _commit,
    _manifest,
    _store,
    verify_state,
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
        assert info == StateInfo(path, info.created_at, 2 + 1 + 1 + 100 + 1, info.sequence, {})
        assert info.sequence >= 1
        assert info.location == "local"
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

    def test_a_newer_directory_without_manifest_is_ordered_below(self, states_dir: Path) -> None:
        store, *_ = make_store(states_dir)
        good = store.save_state()
        legacy = states_dir / "legacy.state"
        legacy.mkdir()
        future = time.time() + 3600
        os.utime(legacy, (future, future))
        assert store.load_latest_state() == good
        assert store.latest_state() == good

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


class SteppedClock:
    """Stands in for ``datetime`` in the modules that read the clock, shifted by ``offset``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import datetime as real

        self.offset = real.timedelta(0)
        clock = self

        class Shifted(real.datetime):
            @classmethod
            def now(cls, tz: real.tzinfo | None = None) -> Shifted:  # type: ignore[override]
                moment = real.datetime.now(tz) + clock.offset
                return cls.fromtimestamp(moment.timestamp(), tz)

        for module in (_store, _commit):
            monkeypatch.setattr(module, "datetime", Shifted)

    def step_back(self, hours: float) -> None:
        import datetime as real

        self.offset -= real.timedelta(hours=hours)


class TestClockSteps:
    """A clock stepped back between saves changes no decision: order is the sequence."""

    def test_latest_list_load_and_keeper_follow_the_sequence(
        self, states_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        clock = SteppedClock(monkeypatch)
        store, value, *_ = make_store(states_dir)
        value.value = b"before"
        before = store.save_state()
        clock.step_back(1)  # NTP step, VM resume
        value.value = b"after"
        after = store.save_state()
        assert after.name < before.name  # named by the stepped clock
        infos = store.list_states()
        assert [i.path for i in infos] == [before, after]
        assert infos[1].created_at < infos[0].created_at
        assert infos[0].sequence < infos[1].sequence
        assert store.latest_state() == after
        value.value = b""
        assert store.load_latest_state() == after
        assert value.value == b"after"
        assert LatestStatesKeeper(states_dir, max_keep=1).cleanup() == [before]
        assert store.latest_state() == after


class TestMissingComponents:
    """load_state checks the manifest's names before calling any component."""

    def test_refused_before_any_component_is_called(self, states_dir: Path) -> None:
        old = StateStore(states_dir)
        old.register("model", Value(b"weights"))
        saved = old.save_state()
        new = StateStore(states_dir)
        model, scheduler = Value(b"untouched"), Value(b"untouched")
        new.register("model", model)
        new.register("scheduler", scheduler)
        for load in (lambda: new.load_latest_state(), lambda: new.load_state(saved)):
            with pytest.raises(MissingComponentsError) as info:
                load()
            assert info.value.state == str(saved)
            assert info.value.missing == ("scheduler",)
            assert info.value.present == ("model",)
            assert str(saved) in str(info.value)
            assert "scheduler" in str(info.value)
            assert model.value == b"untouched"  # nothing was handed to any component
        assert new.load_latest_state(allow_missing=True) == saved
        assert model.value == b"weights"
        assert scheduler.value == b"untouched"  # absent: not called

    def test_no_silent_fallback_to_an_older_state(self, states_dir: Path) -> None:
        store = StateStore(states_dir)
        a, b = Value(b"1"), Value(b"1")
        store.register("a", a)
        store.register("b", b)
        store.save_state()  # complete, older
        newer = StateStore(states_dir)
        newer.register("a", Value(b"2"))
        newest = newer.save_state()  # lacks b
        with pytest.raises(MissingComponentsError, match="lacks registered components"):
            store.load_latest_state()
        assert store.load_latest_state(allow_missing=True) == newest

    def test_error_pickles_with_its_fields(self) -> None:
        error = MissingComponentsError("state /s lacks", state="/s", missing=["b"], present=["a"])
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is MissingComponentsError
        assert (str(back), back.state, back.missing, back.present) == (
            "state /s lacks",
            "/s",
            ("b",),
            ("a",),
        )
        assert isinstance(back, StatekeepError)

    def test_sibling_files_count_as_the_component(self, states_dir: Path) -> None:
        store, *_ = make_store(states_dir)
        path = store.save_state()
        store.load_state(path)  # model.pt and model.optim.pt are "model"


class TestUnreadableStates:
    """One unreadable state never stops the others; loading it directly raises a typed error."""

    def fail_reads_under(
        self, monkeypatch: pytest.MonkeyPatch, where: Path, err: int = errno.EIO
    ) -> None:
        real_open = os.open

        def failing_open(path: object, *args: object, **kw: object) -> int:
            if os.fspath(path).startswith(f"{where}/"):  # type: ignore[call-overload]
                raise OSError(err, os.strerror(err), os.fspath(path))  # type: ignore[call-overload]
            return real_open(path, *args, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "open", failing_open)

    @pytest.mark.parametrize("err", [errno.EIO, errno.EACCES])
    def test_oldest_unreadable(
        self,
        states_dir: Path,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
        err: int,
    ) -> None:
        store, value, *_ = make_store(states_dir)
        bad = store.save_state()
        value.value = b"v2"
        good = store.save_state()
        self.fail_reads_under(monkeypatch, bad, err)
        with caplog.at_level(logging.WARNING, logger="statekeep"):
            for _ in range(3):
                assert [i.path for i in store.list_states()] == [good]
                assert store.latest_state() == good
                assert store.load_latest_state() == good
            assert LatestStatesKeeper(states_dir, max_keep=1).plan() == [bad]
        told = [r.getMessage() for r in caplog.records if str(bad) in r.getMessage()]
        assert len(told) == 1, told  # once per path, not per call
        with pytest.raises(CorruptStateError, match=str(bad)):
            store.load_state(bad)

    def test_eio_in_a_file_of_the_newest_falls_back(
        self, states_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        store, value, *_ = make_store(states_dir)
        good = store.save_state()
        value.value = b"v2"
        newest = store.save_state()
        self.fail_reads_under(monkeypatch, newest / "folder")
        value.value = b""
        with caplog.at_level(logging.WARNING, logger="statekeep"):
            for _ in range(3):
                assert store.load_latest_state() == good
        told = [r.getMessage() for r in caplog.records if str(newest) in r.getMessage()]
        assert len(told) == 1, told  # once per path, not per call
        assert "Input/output error" in told[0]
        assert "trying an older one" in told[0]
        assert value.value == b"v1"
        with pytest.raises(CorruptStateError, match=str(newest)):
            store.load_state(newest)
        assert LatestStatesKeeper(states_dir, max_keep=1).cleanup() == []

    @pytest.mark.timeout(30)  # a FIFO opened for reading would block forever
    def test_fifo_as_a_manifest(self, states_dir: Path) -> None:
        store, *_ = make_store(states_dir)
        good = store.save_state()
        fifo = store.save_state()
        (fifo / _manifest.MANIFEST_NAME).unlink()
        os.mkfifo(fifo / _manifest.MANIFEST_NAME)
        assert [i.path for i in store.list_states()] == [good]
        assert store.latest_state() == good
        assert store.load_latest_state() == good
        for check in (store.load_state, verify_state):
            with pytest.raises(CorruptStateError, match="not a regular file"):
                check(fifo)
        # No readable manifest: ordered below the good state, and it does not count.
        assert LatestStatesKeeper(states_dir, max_keep=1).cleanup() == [fifo]


class TestNames:
    """A name that is another's prefix plus a dot is refused: their files could collide."""

    @pytest.mark.parametrize(
        ("first", "second"), [("model", "model.optim"), ("model.optim", "model")]
    )
    def test_prefix_plus_dot(self, states_dir: Path, first: str, second: str) -> None:
        store = StateStore(states_dir)
        store.register(first, Value())
        with pytest.raises(ValueError, match=rf"'{second}' clashes with registered '{first}'"):
            store.register(second, Value())
        store.register("modelx", Value())  # no dot: no clash
        store.register("mode", Value())

    def test_save_logs_at_debug(self, states_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
        store, *_ = make_store(states_dir)
        with caplog.at_level(logging.DEBUG, logger="statekeep"):
            path = store.save_state()
        [info] = store.list_states()
        line = f"saved state {path} (sequence {info.sequence}, {info.size_bytes} bytes)"
        assert line in caplog.text


class Gen(PersistentStateMixin):
    """Writes a generation number; its load tolerates a missing file (as many real ones do)."""

    def __init__(self) -> None:
        self.gen = 0
        self.value: int | None = None
        self.loaded_from: Path | None = None
        self.calls = 0
        self.delay = 0.0  # seconds each load takes (a large model, a slow disk)

    def save_state(self, path: Path) -> None:
        path.write_text(str(self.gen))

    def load_state(self, path: Path) -> None:
        self.calls += 1
        self.loaded_from = path.parent
        try:
            self.value = int(path.read_text())
        except FileNotFoundError:
            self.value = None  # a lenient component: would keep a partial load silently
        time.sleep(self.delay)


def gen_store(states_dir: Path) -> tuple[StateStore, Gen, Gen]:
    store = StateStore(states_dir, f"%Y-%m-%d_%H-%M-%S,%f-{threading.get_ident()}.state")
    a, b = Gen(), Gen()
    store.register("a", a)
    store.register("b", b)
    return store, a, b


class TestLoaderRacingKeeper:
    """A loader racing saves and a max_keep=1 keeper loads the newest state that still exists."""

    LOADS = 500

    def check_loads(self, states_dir: Path, loads: int = LOADS, delay: float = 0.0) -> int:
        loader, a, b = gen_store(states_dir)
        a.delay = b.delay = delay
        retried = 0
        for _ in range(loads):
            a.calls = b.calls = 0
            path = loader.load_latest_state()
            assert path is not None, "None while a committed state exists"
            # Both components got the whole of one state, the one returned.
            assert a.loaded_from == b.loaded_from == path
            assert a.value is not None
            assert a.value == b.value
            retried += a.calls > 1
        return retried

    def test_threads(self, states_dir: Path) -> None:
        saver, a, b = gen_store(states_dir)
        saver.durable = False
        saver.save_state()
        stop = threading.Event()
        failures: list[BaseException] = []

        def save_forever() -> None:
            try:
                while not stop.is_set():
                    a.gen = b.gen = a.gen + 1
                    saver.save_state()
            except BaseException as exc:
                failures.append(exc)

        thread = threading.Thread(target=save_forever)
        keeper = LatestStatesKeeper(states_dir, max_keep=1, cleanup_interval=0)
        thread.start()
        keeper.start()
        try:
            self.check_loads(states_dir)
        finally:
            stop.set()
            keeper.stop()
            thread.join(30)
        assert not thread.is_alive()
        assert failures == []
        assert a.gen > 0

    def start_saver_and_keeper(
        self, states_dir: Path, worker_env: dict[str, str]
    ) -> list[subprocess.Popen[bytes]]:
        """A process saving as fast as it can and one pruning to max_keep=1 without pause."""
        StateStore(states_dir)
        saver_code = (
            "import sys, pathlib\n"
            "from statekeep import StateStore, PersistentStateMixin\n"
            "class G(PersistentStateMixin):\n"
            "    gen = 0\n"
            "    def save_state(self, path):\n"
            "        path.write_text(str(self.gen))\n"
            "s = StateStore(sys.argv[1], '%Y-%m-%d_%H-%M-%S,%f-p.state', durable=False)\n"
            "a, b = G(), G()\n"
            "s.register('a', a); s.register('b', b)\n"
            "s.save_state(); print('ready', flush=True)\n"
            "while True:\n"
            "    a.gen = b.gen = a.gen + 1\n"
            "    s.save_state()\n"
        )
        keeper_code = (
            "import sys\n"
            "from statekeep import LatestStatesKeeper\n"
            "k = LatestStatesKeeper(sys.argv[1], max_keep=1, cleanup_interval=0)\n"
            "print('ready', flush=True)\n"
            "k.start(background=False)\n"
        )
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, str(states_dir)],
                stdout=subprocess.PIPE,
                env=worker_env,
            )
            for code in (saver_code, keeper_code)
        ]
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"ready\n"
        return procs

    def stop(self, procs: list[subprocess.Popen[bytes]]) -> None:
        for proc in procs:
            assert proc.poll() is None, "a worker died during the race"
        for proc in procs:
            proc.kill()
            proc.wait(30)
            assert proc.stdout is not None
            proc.stdout.close()

    def test_processes(self, states_dir: Path, worker_env: dict[str, str]) -> None:
        procs = self.start_saver_and_keeper(states_dir, worker_env)
        try:
            self.check_loads(states_dir)
        finally:
            self.stop(procs)

    @pytest.mark.timeout(120)
    def test_components_slower_than_the_saver(
        self, states_dir: Path, worker_env: dict[str, str]
    ) -> None:
        """Each load takes longer than a save, so a newer state and its pruning always
        land before the load ends: the state being loaded must be held against removal
        (before, every attempt lost the state under it and no load ever finished)."""
        procs = self.start_saver_and_keeper(states_dir, worker_env)
        try:
            retried = self.check_loads(states_dir, loads=20, delay=0.02)
        finally:
            self.stop(procs)
        # Only a state removed between the listing and the hold costs an attempt.
        assert retried <= 5


class During(PersistentStateMixin):
    """A component whose load runs ``during`` (with the path) after reading its file."""

    def __init__(self, during: Any = None) -> None:
        self.value = b"x"
        self.during = during

    def save_state(self, path: Path) -> None:
        path.write_bytes(self.value)

    def load_state(self, path: Path) -> None:
        self.value = path.read_bytes()
        if self.during is not None:
            self.during(path.parent)


def fork_lingering_child() -> tuple[int, int]:
    """Fork a child that lives until the returned pipe end is closed; (pid, that end).

    Returns once the child is past ``fork()`` and its at-fork hooks (else a check made
    at once could see the parent's descriptors still open in it)."""
    r, w = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        os.write(ready_w, b"r")
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"r"
    finally:
        os.close(ready_r)
    return pid, w


class TestHeldWhileLoading:
    """A state being loaded is held against removal: the keeper leaves it for later."""

    def two_states(self, states_dir: Path, during: Any) -> tuple[StateStore, Path, Path]:
        store = StateStore(states_dir, durable=False)
        store.register("c", During(during))
        older = store.save_state()
        newer = store.save_state()
        return store, older, newer

    def test_the_keeper_leaves_it_for_a_later_pass(
        self, states_dir: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        keeper = LatestStatesKeeper(states_dir, max_keep=1)
        removed_during: list[list[Path]] = []
        store, older, newer = self.two_states(
            states_dir, lambda state: removed_during.append(keeper.cleanup())
        )
        with caplog.at_level(logging.DEBUG, logger="statekeep"):
            store.load_state(older)
        assert removed_during == [[]]
        assert f"{older} is being loaded; left for a later pass" in caplog.text
        assert keeper.cleanup() == [older]  # the load is over: the next pass removes it
        assert [p.name for p in states_dir.iterdir()] == [newer.name]

    def test_a_child_forked_during_the_load_does_not_hold_it(self, states_dir: Path) -> None:
        children: list[tuple[int, int]] = []

        def fork(state: Path) -> None:
            children.append(fork_lingering_child())

        store, older, _ = self.two_states(states_dir, fork)
        store.load_state(older)
        try:
            [(pid, _)] = children
            os.kill(pid, 0)  # alive
            assert LatestStatesKeeper(states_dir, max_keep=1).cleanup() == [older]
        finally:
            for pid, w in children:
                os.close(w)
                os.waitpid(pid, 0)

    def fds_on(self, directory: Path) -> int:
        """How many of this process's descriptors are open on ``directory``."""
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                count += os.readlink(f"/proc/self/fd/{fd}") == str(directory)
            except OSError:
                continue
        return count

    @contextlib.contextmanager
    def waiting_load(self, state: Path) -> Iterator[tuple[Callable[[], None], list[bool]]]:
        """A thread's ``Pin`` on ``state``, opened and waiting for the exclusive lock
        this holds (as a remover does); yields a function that lets go of that lock and
        waits for the thread, and what the pin said (``held``)."""
        blocker = os.open(state, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(blocker, fcntl.LOCK_EX)
        pinned: list[bool] = []

        def load() -> None:
            with _atomic.Pin(str(state)) as pin:
                pinned.append(pin.held)

        loader = threading.Thread(target=load)
        loader.start()

        def let_go() -> None:
            fcntl.flock(blocker, fcntl.LOCK_UN)
            loader.join(30)
            assert not loader.is_alive()

        try:
            deadline = time.monotonic() + 30
            while self.fds_on(state) < 2:  # the loader has opened it and waits
                assert time.monotonic() < deadline
                time.sleep(0.001)
            yield let_go, pinned
        finally:
            fcntl.flock(blocker, fcntl.LOCK_UN)
            loader.join(30)
            os.close(blocker)

    def test_a_child_forked_while_the_load_waits_does_not_hold_it(
        self, states_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The load waits for the lock (a remover holds it); another thread forks
        meanwhile. The child's copy of the waiting descriptor must not keep the state."""
        monkeypatch.setattr(_atomic, "_PIN_WAIT", 30.0)
        _, older, _ = self.two_states(states_dir, None)
        child, w = -1, -1
        try:
            with self.waiting_load(older) as (let_go, pinned):
                child, w = fork_lingering_child()
                let_go()
            assert pinned == [True]
            os.kill(child, 0)  # alive
            assert LatestStatesKeeper(states_dir, max_keep=1).cleanup() == [older]
        finally:
            if child > 0:
                os.close(w)
                os.waitpid(child, 0)

    def test_a_state_renamed_away_while_the_load_waits_is_not_held(
        self, states_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The load opened the directory, then waited for a remover that renamed it out
        and put another directory under its name: the lock it then gets is on the old
        directory, so the new one is not held."""
        monkeypatch.setattr(_atomic, "_PIN_WAIT", 30.0)
        _, older, _ = self.two_states(states_dir, None)
        with self.waiting_load(older) as (let_go, pinned):
            older.rename(states_dir / ".statekeep-x.trash")
            older.mkdir()
            let_go()
        assert pinned == [False]

    def test_an_interrupt_while_the_load_waits_leaks_nothing(
        self, states_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Ctrl-C (a real SIGINT) while the load waits for the lock: the descriptor is
        closed, and the state is not held for the rest of the process's life."""
        monkeypatch.setattr(_atomic, "_PIN_WAIT", 30.0)
        store, older, _ = self.two_states(states_dir, None)
        blocker = os.open(older, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(blocker, fcntl.LOCK_EX)
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        previous = signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
        try:
            with pytest.raises(KeyboardInterrupt):
                store.load_state(older)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            os.close(blocker)
        assert self.fds_on(older) == 0
        assert LatestStatesKeeper(states_dir, max_keep=1).cleanup() == [older]

    def test_a_remover_that_cannot_open_it_leaves_it(self, states_dir: Path) -> None:
        """Out of descriptors, the remover cannot see whether a reader holds the state:
        it says so and leaves the state where it is (before: renamed away unlocked)."""
        _, older, _ = self.two_states(states_dir, None)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        with _atomic.Pin(str(older)) as pin:
            assert pin.held
            spent: list[int] = []
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
            try:
                with contextlib.suppress(OSError):
                    while True:
                        spent.append(os.open(os.devnull, os.O_RDONLY))
                with pytest.raises(OSError, match="Too many open files") as caught:
                    _atomic.discard_committed(states_dir, older)
            finally:
                for fd in spent:
                    os.close(fd)
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            assert caught.value.errno == errno.EMFILE
            assert older.is_dir()
            assert _atomic.sweep(states_dir) == []  # nothing was renamed out of sight

    def test_a_brief_exclusive_hold_is_waited_out(self, states_dir: Path) -> None:
        _, older, _ = self.two_states(states_dir, None)
        fd = os.open(older, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a remover does across its rename
        unlock = threading.Timer(0.02, fcntl.flock, (fd, fcntl.LOCK_UN))
        unlock.start()
        try:
            with _atomic.Pin(str(older)) as pin:
                assert pin.held
        finally:
            unlock.join(30)
            os.close(fd)

    def test_a_long_exclusive_hold_is_read_unpinned(self, states_dir: Path) -> None:
        store, older, _ = self.two_states(states_dir, None)
        fd = os.open(older, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # a saver stopped right after its commit
            with _atomic.Pin(str(older)) as pin:
                assert not pin.held
            store.load_state(older)  # still loads (as it would without holding)
        finally:
            os.close(fd)


class TestListingThatLosesItsOnlyState:
    """A listing whose one state is pruned before it is read (its successor renamed in
    just after the directory was read) proves nothing: it is taken again."""

    @pytest.fixture
    def racing(self, states_dir: Path, monkeypatch: pytest.MonkeyPatch) -> StateStore:
        saver, a, b = gen_store(states_dir)
        saver.save_state()
        keeper = LatestStatesKeeper(states_dir, max_keep=1)
        real = _manifest.read_order
        races = [2]  # two listings in a row lose their only state
        inside = [False]

        def read_order(directory: str) -> tuple[float, int] | None:
            if races[0] and not inside[0]:
                races[0] -= 1
                inside[0] = True
                try:  # between reading the directory and reading this state's manifest:
                    a.gen = b.gen = a.gen + 1
                    saver.save_state()  # a newer state is committed,
                    assert keeper.cleanup() == [Path(directory)]  # and this one pruned
                finally:
                    inside[0] = False
            return real(directory)

        loader, *_ = gen_store(states_dir)
        monkeypatch.setattr(_manifest, "read_order", read_order)
        return loader

    def test_load_latest_state(self, racing: StateStore, states_dir: Path) -> None:
        path = racing.load_latest_state()
        assert path is not None, "None while a committed state exists"
        assert [p.name for p in states_dir.iterdir()] == [path.name]

    def test_latest_state(self, racing: StateStore, states_dir: Path) -> None:
        path = racing.latest_state()
        assert path is not None, "None while a committed state exists"
        assert [p.name for p in states_dir.iterdir()] == [path.name]

    def test_list_states(self, racing: StateStore, states_dir: Path) -> None:
        listed = [info.path for info in racing.list_states()]
        assert listed == list(states_dir.iterdir())


class TestMetadata:
    """save_state(metadata=...) lands in the manifest; verify_state checks without loading."""

    def test_round_trip_and_verify_state(self, states_dir: Path) -> None:
        store, value, *_ = make_store(states_dir)
        path = store.save_state(metadata={"step": 7, "loss": 0.25, "tags": ["a"]})
        [info] = store.list_states()
        assert info.metadata == {"step": 7, "loss": 0.25, "tags": ["a"]}
        value.value = b"changed"
        checked = verify_state(path)
        assert checked == info
        assert value.value == b"changed"  # nothing was loaded

    def test_verify_state_raises_on_damage(self, states_dir: Path) -> None:
        store, *_ = make_store(states_dir)
        path = store.save_state()
        os.truncate(path / "model.pt", 1)
        with pytest.raises(CorruptStateError, match=r"model\.pt is 1 bytes"):
            verify_state(path)
        with pytest.raises(FileNotFoundError):
            verify_state(states_dir / "nope.state")

    @pytest.mark.parametrize(
        ("metadata", "error", "match"),
        [
            ({"step": 1, "when": object()}, TypeError, "metadata\\['when'\\] is not JSON-ready"),
            ({"loss": float("nan")}, ValueError, "metadata\\['loss'\\]"),
            ({1: "x"}, TypeError, "metadata key 1"),
            ({"statekeep:components": []}, ValueError, "reserved"),
        ],
    )
    def test_refused_before_anything_is_written(
        self, states_dir: Path, metadata: dict[Any, Any], error: type[Exception], match: str
    ) -> None:
        store, *_ = make_store(states_dir)
        with pytest.raises(error, match=match):
            store.save_state(metadata=metadata)
        assert os.listdir(states_dir) == []

    def test_keyword_only(self, states_dir: Path) -> None:
        store, *_ = make_store(states_dir)
        with pytest.raises(TypeError):
            store.save_state({"step": 1})  # type: ignore[misc]


class TestMissingComponentsWithoutARecord:
    """States that did not record their components are checked by their top-level names."""

    def test_state_from_an_older_statekeep(self, states_dir: Path) -> None:
        fixture = Path(__file__).parent / "fixtures" / "v2.state"

        class Pt(PersistentStateMixin):
            data = b""

            def load_state(self, path: Path) -> None:
                self.data = path.with_name(path.name + ".pt").read_bytes()

        store = StateStore(states_dir)
        model = Pt()
        store.register("model", model)  # the fixture holds model.pt and tree/
        store.load_state(fixture)
        assert model.data == (fixture / "model.pt").read_bytes()
        store.register("scheduler", Value(b"untouched"))
        with pytest.raises(MissingComponentsError) as info:
            store.load_state(fixture)
        assert info.value.missing == ("scheduler",)
        assert info.value.present == ("model.pt", "tree")

    def test_directory_without_manifest_is_not_checked(self, states_dir: Path) -> None:
        legacy = states_dir / "legacy.state"
        legacy.mkdir(parents=True)
        (legacy / "a").write_bytes(b"A")
        store = StateStore(states_dir)
        a = Value()
        store.register("a", a)
        store.register("nothing", PersistentStateMixin())  # wrote nothing, as pamiq-core allows
        store.load_state(legacy, verify=False)
        assert a.value == b"A"
