"""BuildDir: a directory built privately, then committed whole under its final name."""

from __future__ import annotations

import errno
import os
import zlib
from pathlib import Path

import pytest

from conftest import commit
from statekeep import StateExistsError, StorageError, _atomic, _commit, _manifest


@pytest.fixture
def state(states_dir: Path) -> Path:
    return commit(states_dir, {"model.pt": b"weights", "step": b"1"})


class TestBuildDir:
    """A build is private until commit renames it into place, manifest and all."""

    @pytest.mark.parametrize("durable", [True, False])
    def test_commit(self, states_dir: Path, durable: bool) -> None:
        with _commit.BuildDir(states_dir, durable=durable) as build:
            (build.path / "a").write_bytes(b"abc")
            (build.path / "d").mkdir()
            assert os.listdir(states_dir) == [build.path.name]  # only the private build
            assert _atomic.is_private(build.path.name)
            manifest = build.commit(states_dir / "x.state")
        final = states_dir / "x.state"
        assert sorted(os.listdir(final)) == [_manifest.MANIFEST_NAME, "a", "d"]
        assert not build.path.exists()
        assert os.listdir(states_dir) == ["x.state"]  # nothing but the committed state
        assert manifest.entries == (
            _manifest.Entry("a", is_dir=False, size=3, crc32=zlib.crc32(b"abc")),
            _manifest.Entry("d", is_dir=True),
        )
        assert _manifest.verify(final) == manifest
        assert manifest.seal != 0

    def test_leaving_without_commit_removes_the_build(self, states_dir: Path) -> None:
        seen: list[Path] = []

        def failing_save() -> None:
            with _commit.BuildDir(states_dir, durable=True) as build:
                seen.append(build.path)
                (build.path / "half").write_bytes(b"x")
                raise RuntimeError("component failed")

        with pytest.raises(RuntimeError, match="component failed"):
            failing_save()
        assert seen
        assert not seen[0].exists()
        assert os.listdir(states_dir) == []

    def test_commit_to_an_existing_name(self, states_dir: Path, state: Path) -> None:
        before = {p: p.read_bytes() for p in state.rglob("*") if p.is_file()}
        with _commit.BuildDir(states_dir, durable=True) as build:
            (build.path / "other").write_bytes(b"new")
            with pytest.raises(StateExistsError) as info:
                build.commit(state)
        assert info.value.filename == str(state)
        assert {p: p.read_bytes() for p in state.rglob("*") if p.is_file()} == before
        _manifest.verify(state)
        assert not build.path.exists()

    def test_symlink_is_refused(self, states_dir: Path, tmp_path: Path) -> None:
        (tmp_path / "target").write_bytes(b"x")
        with _commit.BuildDir(states_dir, durable=True) as build:
            (build.path / "link").symlink_to(tmp_path / "target")
            with pytest.raises(ValueError, match="link is neither a regular file nor a directory"):
                build.commit(states_dir / "x.state")
        assert not (states_dir / "x.state").exists()

    def test_large_file(self, states_dir: Path) -> None:
        big = os.urandom(1 << 16) * 80  # 5 MB: fsync runs beside the checksum pass
        state = commit(states_dir, {"big": big})
        [entry] = _manifest.verify(state).entries
        assert (entry.size, entry.crc32) == (len(big), zlib.crc32(big))


def failed_save(states_dir: Path) -> None:
    with _commit.BuildDir(states_dir, durable=False) as build:
        (build.path / "half").write_bytes(b"x")
        raise RuntimeError("a component failed")


class TestOnlyStates:
    """Whenever no save runs, the directory holds committed states and nothing else."""

    def test_listing_after_saves_failures_and_removals(self, tmp_path: Path) -> None:
        states_dir = tmp_path / "deep" / "states"
        for i in range(3):
            commit(states_dir, {"f": b"%d" % i}, f"{i}.state")
        with pytest.raises(RuntimeError):
            failed_save(states_dir)
        _atomic.discard_committed(states_dir, states_dir / "0.state")
        expected = ["1.state", "2.state"]
        assert sorted(os.listdir(states_dir)) == expected
        assert sorted(p.name for p in states_dir.glob("*")) == expected
        assert sorted(p.name for p in states_dir.glob(".*")) == []
        # nothing written beside it either
        assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
            "deep",
            "deep/states",
            "deep/states/1.state",
            "deep/states/1.state/.statekeep-manifest.json",
            "deep/states/1.state/f",
            "deep/states/2.state",
            "deep/states/2.state/.statekeep-manifest.json",
            "deep/states/2.state/f",
        ]

    def test_the_store_and_checkpoint_directories(self, tmp_path: Path) -> None:
        from statekeep import FileCheckpointStorage, PersistentStateMixin, StateStore

        class C(PersistentStateMixin):
            def save_state(self, path: Path) -> None:
                path.write_text("x")

        store = StateStore(tmp_path / "states", state_name_format="%f-%S-%M.state")
        store.register("c", C())
        saved = {store.save_state().name for _ in range(3)}
        with FileCheckpointStorage(tmp_path / "ckpt") as storage:
            storage.save("s1", {"a": 1})
            storage.save("s1", {"a": 2})
            storage.save("s2", {"b": 1})
            storage.delete("s2")
        assert set(os.listdir(tmp_path / "states")) == saved
        assert os.listdir(tmp_path / "ckpt") == ["s1.ckpt"]
        assert sorted(os.listdir(tmp_path)) == ["ckpt", "states"]


class SyncSpy:
    """Records, in order, every fsync (by the path its fd names) and every rename."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, str, str]] = []
        real_fsync, real_rename, real_noreplace = os.fsync, os.rename, _atomic.rename_noreplace

        def fsync(fd: int) -> None:
            self.events.append(("sync", os.readlink(f"/proc/self/fd/{fd}"), ""))
            real_fsync(fd)

        def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
            real_rename(src, dst)
            self.events.append(("rename", os.fspath(src), os.fspath(dst)))

        def noreplace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
            real_noreplace(src, dst)
            self.events.append(("rename", os.fspath(src), os.fspath(dst)))

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "fdatasync", fsync)
        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(_atomic, "rename_noreplace", noreplace)

    def synced(self) -> list[str]:
        return [path for kind, path, _ in self.events if kind == "sync"]

    def index_of_rename(self, dst: Path) -> int:
        [i] = [i for i, (k, _, d) in enumerate(self.events) if k == "rename" and d == str(dst)]
        return i


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd (Linux)")
class TestEverythingIsSynced:
    """With durable=True every file and directory is synced before the rename, the parent after."""

    def test_durable_commit(self, states_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        _atomic.make_root(states_dir, durable=True)
        spy = SyncSpy(monkeypatch)
        big = os.urandom(1 << 16) * 80  # large enough for the parallel fsync path
        with _commit.BuildDir(states_dir, durable=True) as build:
            for rel, data in {"a": b"1", "d/b": b"2", "d/e/c": b"", "big": big}.items():
                (build.path / rel).parent.mkdir(parents=True, exist_ok=True)
                (build.path / rel).write_bytes(data)
            work = str(build.path)
            build.commit(states_dir / "x.state")
        renamed = spy.index_of_rename(states_dir / "x.state")
        before = {p for k, p, _ in spy.events[:renamed] if k == "sync"}
        inside = {"a", "d", "d/b", "d/e", "d/e/c", "big", _manifest.MANIFEST_NAME}
        assert {f"{work}/{rel}" for rel in inside} | {work} <= before
        after = [p for k, p, _ in spy.events[renamed:] if k == "sync"]
        assert after == [str(states_dir)]

    def test_not_durable_syncs_nothing(
        self, states_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        _atomic.make_root(states_dir, durable=False)
        spy = SyncSpy(monkeypatch)
        commit(states_dir, {"a": b"1"}, durable=False)
        assert spy.synced() == []

    def test_replace_file(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        spy = SyncSpy(monkeypatch)
        final = tmp_path / "f.json"
        _atomic.replace_file(tmp_path, final, [b"one", b"two"], durable=True)
        renamed = spy.index_of_rename(final)
        temp = spy.events[renamed][1]  # the locked .work file (born .pending, then renamed)
        assert _atomic.is_private(os.path.basename(temp))
        assert [p for k, p, _ in spy.events[:renamed] if k == "sync"] == [temp]
        assert [p for k, p, _ in spy.events[renamed:] if k == "sync"] == [str(tmp_path)]

    def test_a_new_directory_is_named_durably(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from statekeep import FileCheckpointStorage, StateStore

        spy = SyncSpy(monkeypatch)
        StateStore(tmp_path / "a" / "states")
        assert spy.synced() == [str(tmp_path), str(tmp_path / "a")]
        spy.events.clear()
        FileCheckpointStorage(tmp_path / "ckpt").close()
        assert spy.synced() == [str(tmp_path)]
        spy.events.clear()
        StateStore(tmp_path / "a" / "states")  # exists: nothing to make durable
        assert spy.synced() == []


class TestAfterTheRename:
    """A failed fsync of the parent after the rename says the state IS committed."""

    def test_parent_sync_fails(self, states_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        _atomic.make_root(states_dir, durable=True)
        real = _atomic.fsync_dir

        def failing(path: str | os.PathLike[str]) -> None:
            if os.fspath(path) == str(states_dir):
                raise OSError(errno.EIO, "Input/output error")
            real(path)

        monkeypatch.setattr(_atomic, "fsync_dir", failing)
        with pytest.raises(StorageError) as info:
            commit(states_dir, {"a": b"1"}, "x.state")
        message = str(info.value)
        assert f"{states_dir / 'x.state'} is committed" in message
        assert "power loss is unknown" in message
        assert info.value.errno == errno.EIO
        assert isinstance(info.value.__cause__, OSError)
        _manifest.verify(states_dir / "x.state")  # it is there, whole
        assert os.listdir(states_dir) == ["x.state"]


class TestCleanupFailure:
    """A failed save whose clean-up fails too: the original error, a note, no fd leaked."""

    def test_build(self, states_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        _atomic.make_root(states_dir, durable=False)
        before = len(os.listdir("/proc/self/fd"))

        def refuse(path: str | os.PathLike[str]) -> bool:
            raise PermissionError(errno.EROFS, "Read-only file system", os.fspath(path))

        for _ in range(20):
            monkeypatch.setattr(_atomic, "remove_tree", refuse)
            with pytest.raises(RuntimeError, match="component failed") as info:
                failed_save(states_dir)
            monkeypatch.undo()
            notes = getattr(info.value, "__notes__", [])
            assert any("could not remove its work entry" in n and "Read-only" in n for n in notes)
        assert len(os.listdir("/proc/self/fd")) == before  # nothing leaked
        # unlocked: the next sweep reclaims all twenty
        assert len(_atomic.sweep(states_dir)) == 20
        assert os.listdir(states_dir) == []


class TestDeepTrees:
    """A tree deeper than Python's recursion limit saves, verifies and is removed."""

    def test_twelve_hundred_levels(self, states_dir: Path) -> None:
        with _commit.BuildDir(states_dir, durable=False) as build:
            deep = build.path
            for _ in range(1200):
                deep = deep / "d"
                deep.mkdir()
            (deep / "leaf").write_bytes(b"bottom")
            manifest = build.commit(states_dir / "deep.state")
        assert len(manifest.entries) == 1201
        assert manifest.entries[-1].path.endswith("/d/leaf")
        assert _manifest.verify(states_dir / "deep.state") == manifest
        _atomic.discard_committed(states_dir, states_dir / "deep.state")
        assert os.listdir(states_dir) == []
