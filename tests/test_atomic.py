"""The atomic-commit layer: work entries, the sweep, and crash-safe rename/replace/discard."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from statekeep import StateExistsError, _atomic


def private_entries(root: Path) -> list[str]:
    """The entries of ``root`` that are statekeep's own work (not committed states)."""
    return sorted(n for n in os.listdir(root) if _atomic.is_private(n))


@pytest.fixture
def private(states_dir: Path) -> Path:
    """The directory work entries live in: the states directory itself."""
    _atomic.make_root(states_dir, durable=True)
    return states_dir


class TestMakeRoot:
    """The directory is created with its parents, once."""

    def test_creates_parents(self, tmp_path: Path) -> None:
        root = tmp_path / "a" / "b"
        assert _atomic.make_root(root, durable=True) is True
        assert root.is_dir()
        assert os.listdir(root) == []  # nothing of statekeep's own

    def test_idempotent(self, states_dir: Path) -> None:
        _atomic.make_root(states_dir, durable=False)
        (states_dir / "keep").write_text("x")
        assert _atomic.make_root(states_dir, durable=False) is False
        assert (states_dir / "keep").read_text() == "x"

    def test_fsync_dir_accepts_a_directory(self, tmp_path: Path) -> None:
        _atomic.fsync_dir(tmp_path)
        (tmp_path / "f").write_text("x")
        with pytest.raises(NotADirectoryError):
            _atomic.fsync_dir(tmp_path / "f")


class TestWork:
    """A work entry is a locked ``.work`` directory or file in the private folder."""

    def test_directory_entry(self, private: Path) -> None:
        work = _atomic.Work(private, is_dir=True)
        assert work.path.parent == private
        assert work.path.name.endswith(".work")
        assert work.path.is_dir()
        assert work.path.name.startswith(_atomic.PREFIX)
        assert _atomic.is_private(work.path.name)
        assert not list(private.glob("*.pending"))
        work.discard()
        assert not work.path.exists()
        assert work.fd == -1

    def test_file_entry(self, private: Path) -> None:
        work = _atomic.Work(private, is_dir=False)
        assert work.path.is_file()
        work.release()
        work.release()  # idempotent
        assert work.path.exists()
        assert _atomic.sweep(private) == [work.path]

    def test_entries_are_distinct(self, private: Path) -> None:
        works = [_atomic.Work(private, is_dir=True) for _ in range(20)]
        assert len({w.path for w in works}) == 20
        for work in works:
            work.discard()


class TestSweep:
    """The sweep reclaims what dead owners left and never a live owner's work."""

    def test_live_owner_in_another_thread_is_left_alone(self, private: Path) -> None:
        held = threading.Event()
        done = threading.Event()
        box: list[_atomic.Work] = []

        def owner() -> None:
            box.append(_atomic.Work(private, is_dir=True))
            (box[0].path / "part").write_bytes(b"half")
            held.set()
            done.wait(30)
            box[0].release()  # the owner "dies" without cleaning up

        thread = threading.Thread(target=owner)
        thread.start()
        try:
            assert held.wait(30)
            assert _atomic.sweep(private) == []
            assert (box[0].path / "part").read_bytes() == b"half"
        finally:
            done.set()
            thread.join(30)
        assert _atomic.sweep(private) == [box[0].path]
        assert not box[0].path.exists()

    def test_dead_owner_process_is_reclaimed(
        self, states_dir: Path, worker_cmd: list[str], worker_env: dict[str, str]
    ) -> None:
        proc = subprocess.Popen(
            [*worker_cmd, "hold", str(states_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=worker_env,
        )
        try:
            assert proc.stdout is not None
            kind, path_text = proc.stdout.readline().decode().split()
            assert kind == "held"
            held = Path(path_text)
            assert _atomic.sweep(states_dir) == []  # alive: left alone
            assert (held / "half-written").exists()
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(30) == -signal.SIGKILL
        finally:
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
        assert _atomic.sweep(states_dir) == [held]
        assert not held.exists()

    def test_a_forked_child_does_not_keep_dead_work_alive(
        self, states_dir: Path, worker_cmd: list[str], worker_env: dict[str, str]
    ) -> None:
        proc = subprocess.Popen(
            [*worker_cmd, "hold-fork", str(states_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=worker_env,
        )
        child = -1
        try:
            assert proc.stdout is not None
            kind, path_text, child_text = proc.stdout.readline().decode().split()
            assert kind == "held"
            held, child = Path(path_text), int(child_text)
            assert _atomic.sweep(states_dir) == []  # alive: left alone
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(30) == -signal.SIGKILL
            # The saver is dead; its forked child still runs, and must not hold the lock.
            os.kill(child, 0)
            assert _atomic.sweep(states_dir) == [held]
        finally:
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
            if child > 0:
                os.kill(child, signal.SIGKILL)

    def test_pending_is_kept_while_young_and_reclaimed_when_old(self, private: Path) -> None:
        young = private / ".statekeep-a.pending"
        old = private / ".statekeep-b.pending"
        young.mkdir()
        old.mkdir()
        past = time.time() - _atomic.PENDING_GRACE - 10
        os.utime(old, (past, past))
        assert _atomic.sweep(private) == [old]
        assert young.exists()

    def test_trash_is_reclaimed(self, private: Path) -> None:
        trash = private / ".statekeep-x.trash"
        (trash / "deep").mkdir(parents=True)
        (trash / "deep" / "f").write_bytes(b"1")
        assert _atomic.sweep(private) == [trash]
        assert not trash.exists()

    def test_other_entries_are_left_alone(self, private: Path) -> None:
        (private / "sequence").write_text("3")
        (private / "notes.work").mkdir()  # not a private name: a user's entry
        (private / ".statekeep-x.notes").mkdir()  # private, but not a kind of work
        assert _atomic.sweep(private) == []
        assert sorted(os.listdir(private)) == [".statekeep-x.notes", "notes.work", "sequence"]

    def test_missing_private_folder(self, tmp_path: Path) -> None:
        assert _atomic.sweep(tmp_path / "nowhere") == []

    def test_removal_error_is_logged_and_skipped(
        self, private: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        (private / ".statekeep-a.trash").mkdir()
        (private / ".statekeep-b.trash").mkdir()

        def refuse(path: str) -> bool:
            if path.endswith("a.trash"):
                raise PermissionError(13, "Permission denied", str(path))
            os.rmdir(path)
            return True

        monkeypatch.setattr(_atomic, "remove_tree", refuse)
        with caplog.at_level(logging.WARNING, logger="statekeep"):
            assert _atomic.sweep(private) == [private / ".statekeep-b.trash"]
        assert "could not reclaim" in caplog.text
        assert "a.trash" in caplog.text


class TestDiscardCommitted:
    """Removing a committed entry takes it out of sight first, then deletes it."""

    def test_removes(self, states_dir: Path) -> None:
        state = states_dir / "a.state"
        (state / "sub").mkdir(parents=True)
        (state / "sub" / "f").write_bytes(b"x")
        _atomic.discard_committed(states_dir, state)
        assert not state.exists()
        assert os.listdir(states_dir) == []

    def test_interrupted_before_delete_leaves_only_trash(
        self, states_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        state = states_dir / "a.state"
        state.mkdir(parents=True)
        (state / "f").write_bytes(b"x")

        def die(path: Path) -> bool:
            raise SystemExit("killed between the rename and the delete")

        monkeypatch.setattr(_atomic, "remove_tree", die)
        with pytest.raises(SystemExit):
            _atomic.discard_committed(states_dir, state)
        monkeypatch.undo()
        assert not state.exists()  # gone from the listing at once
        [trash] = os.listdir(states_dir)
        assert trash.startswith(_atomic.PREFIX)
        assert trash.endswith(".trash")
        assert _atomic.sweep(states_dir) == [states_dir / trash]

    def test_missing(self, states_dir: Path) -> None:
        states_dir.mkdir()
        with pytest.raises(FileNotFoundError):
            _atomic.discard_committed(states_dir, states_dir / "nope")


@pytest.fixture(params=["renameat2", "fallback"])
def rename_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "fallback":
        monkeypatch.setattr(_atomic, "_renameat2", None)
    return str(request.param)


class TestRenameNoreplace:
    """Renaming never replaces an existing entry, with or without renameat2."""

    def test_renames(self, tmp_path: Path, rename_mode: str) -> None:
        (tmp_path / "src").mkdir()
        _atomic.rename_noreplace(tmp_path / "src", tmp_path / "dst")
        assert (tmp_path / "dst").is_dir()
        assert not (tmp_path / "src").exists()

    @pytest.mark.parametrize("existing", ["dir", "empty dir", "file"])
    def test_refuses_existing(self, tmp_path: Path, rename_mode: str, existing: str) -> None:
        src, dst = tmp_path / "src", tmp_path / "dst"
        src.mkdir()
        (src / "new").write_text("new")
        if existing == "file":
            dst.write_text("old")
        else:
            dst.mkdir()
            if existing == "dir":
                (dst / "old").write_text("old")
        with pytest.raises(StateExistsError) as info:
            _atomic.rename_noreplace(src, dst)
        assert info.value.filename == str(dst)
        assert str(dst) in str(info.value)
        assert (src / "new").read_text() == "new"
        if existing == "file":
            assert dst.read_text() == "old"
        else:
            assert os.listdir(dst) == (["old"] if existing == "dir" else [])

    def test_missing_source(self, tmp_path: Path, rename_mode: str) -> None:
        with pytest.raises(FileNotFoundError):
            _atomic.rename_noreplace(tmp_path / "nope", tmp_path / "dst")


class TestReplaceFile:
    """A file is replaced whole or not at all."""

    @pytest.mark.parametrize("durable", [True, False])
    def test_creates_and_replaces(self, tmp_path: Path, durable: bool) -> None:
        final = tmp_path / "f.json"
        _atomic.replace_file(tmp_path, final, [b"one"], durable=durable)
        assert final.read_bytes() == b"one"
        _atomic.replace_file(tmp_path, final, [b"two", b"-", b"parts"], durable=durable)
        assert final.read_bytes() == b"two-parts"
        assert os.listdir(tmp_path) == ["f.json"]

    @pytest.mark.parametrize("durable", [True, False])
    def test_a_directory_in_the_way_is_left_alone(self, tmp_path: Path, durable: bool) -> None:
        final = tmp_path / "f.json"
        final.mkdir()
        (final / "inside").write_bytes(b"kept")
        with pytest.raises(IsADirectoryError):
            _atomic.replace_file(tmp_path, final, [b"new"], durable=durable)
        assert (final / "inside").read_bytes() == b"kept"
        assert os.listdir(tmp_path) == ["f.json"]

    @pytest.mark.parametrize("durable", [True, False])
    def test_a_symlink_in_the_way_is_replaced_not_followed(
        self, tmp_path: Path, durable: bool
    ) -> None:
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "target").write_bytes(b"theirs")
        store = tmp_path / "store"
        store.mkdir()
        final = store / "f.json"
        final.symlink_to(outside / "target")
        _atomic.replace_file(store, final, [b"ours"], durable=durable)
        assert not final.is_symlink()
        assert final.read_bytes() == b"ours"
        assert (outside / "target").read_bytes() == b"theirs"
        assert os.listdir(store) == ["f.json"]

    def test_failure_mid_write_keeps_the_old_file(self, tmp_path: Path) -> None:
        final = tmp_path / "f.json"
        final.write_bytes(b"old")

        def chunks() -> Iterator[bytes]:
            yield b"new data, half of it"
            raise RuntimeError("the producer failed")

        with pytest.raises(RuntimeError, match="producer failed"):
            _atomic.replace_file(tmp_path, final, chunks(), durable=True)
        assert final.read_bytes() == b"old"
        assert os.listdir(tmp_path) == ["f.json"]


class TestWriteAll:
    """Short writes are retried until every byte is out."""

    def test_short_writes(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        real_write = os.write
        calls = []

        def short_write(fd: int, data: bytes | memoryview) -> int:
            calls.append(len(data))
            return real_write(fd, bytes(data[:3]))

        def short_writev(fd: int, buffers: list[memoryview]) -> int:
            return short_write(fd, buffers[0])  # at most 3 bytes of the first buffer

        monkeypatch.setattr(os, "write", short_write)
        monkeypatch.setattr(os, "writev", short_writev)
        fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
        try:
            _atomic.write_all(fd, [b"hello ", memoryview(b"world"), b""])
            _atomic.write_all(fd, [b" and one chunk"])  # the single-write path
        finally:
            os.close(fd)
        monkeypatch.undo()
        assert (tmp_path / "f").read_bytes() == b"hello world and one chunk"
        assert len(calls) > 6


class TestCleanupFailure:
    """When removing a work entry fails, its fd and lock are released all the same."""

    def refuse(self, path: str | os.PathLike[str]) -> bool:
        raise PermissionError(13, "Permission denied", os.fspath(path))

    def test_discard_without_a_cause_raises_and_releases(
        self, private: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        before = len(os.listdir("/proc/self/fd"))
        work = _atomic.Work(private, is_dir=True)
        monkeypatch.setattr(_atomic, "remove_tree", self.refuse)
        with pytest.raises(PermissionError):
            work.discard()
        monkeypatch.undo()
        assert work.fd == -1
        assert len(os.listdir("/proc/self/fd")) == before
        assert _atomic.sweep(private) == [work.path]  # unlocked: reclaimable at once

    def test_replace_file_keeps_the_original_error(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        before = len(os.listdir("/proc/self/fd"))

        def chunks() -> Iterator[bytes]:
            yield b"half"
            raise RuntimeError("the producer failed")

        monkeypatch.setattr(_atomic, "remove_tree", self.refuse)
        for _ in range(10):
            with pytest.raises(RuntimeError, match="producer failed") as info:
                _atomic.replace_file(tmp_path, tmp_path / "f", chunks(), durable=False)
            assert any("could not remove its work entry" in n for n in info.value.__notes__)
        monkeypatch.undo()
        assert len(os.listdir("/proc/self/fd")) == before
        assert len(_atomic.sweep(tmp_path)) == 10
        assert os.listdir(tmp_path) == []


class TestSymlinks:
    """Nothing the library deletes or sweeps is reached through a symbolic link."""

    def test_private_entries_that_are_links_are_removed_as_links(
        self, private: Path, tmp_path: Path
    ) -> None:
        victim = tmp_path / "victim"
        victim.mkdir()
        (victim / "precious").write_bytes(b"keep")
        (victim / "a.work").mkdir()
        for suffix in (".work", ".pending", ".trash"):
            (private / f".statekeep-link{suffix}").symlink_to(victim)
        (private / ".statekeep-file.trash").symlink_to(victim / "precious")
        removed = _atomic.sweep(private)
        assert len(removed) == 4
        assert os.listdir(private) == []
        assert sorted(os.listdir(victim)) == ["a.work", "precious"]
        assert (victim / "precious").read_bytes() == b"keep"

    def test_a_link_inside_trash_is_not_followed(self, private: Path, tmp_path: Path) -> None:
        victim = tmp_path / "victim"
        victim.mkdir()
        (victim / "precious").write_bytes(b"keep")
        trash = private / ".statekeep-x.trash"
        (trash / "sub").mkdir(parents=True)
        (trash / "sub" / "link").symlink_to(victim)
        assert _atomic.sweep(private) == [trash]
        assert (victim / "precious").read_bytes() == b"keep"

    def test_discarding_a_committed_link_removes_only_the_link(
        self, private: Path, tmp_path: Path
    ) -> None:
        victim = tmp_path / "victim"
        victim.mkdir()
        (victim / "precious").write_bytes(b"keep")
        (private / "a.state").symlink_to(victim)
        _atomic.discard_committed(private, private / "a.state")
        assert os.listdir(private) == []
        assert (victim / "precious").read_bytes() == b"keep"


class TestSweepRacingSaves:
    """A sweep running in a loop beside many saves never takes a live save's work."""

    def test_threads(self, private: Path) -> None:
        from statekeep import _commit, _manifest

        stop = threading.Event()
        swept: list[Path] = []
        errors: list[BaseException] = []

        def sweeper() -> None:
            while not stop.is_set():
                swept.extend(_atomic.sweep(private))

        def saver(who: int) -> None:
            try:
                for i in range(40):
                    with _commit.BuildDir(private, durable=False) as build:
                        (build.path / "sub").mkdir()
                        (build.path / "sub" / "f").write_bytes(b"%d-%d" % (who, i))
                        build.commit(private / f"{who}-{i}.state")
            except BaseException as exc:  # reported below
                errors.append(exc)

        sweep_thread = threading.Thread(target=sweeper)
        sweep_thread.start()
        savers = [threading.Thread(target=saver, args=(w,)) for w in range(4)]
        for thread in savers:
            thread.start()
        for thread in savers:
            thread.join(120)
        stop.set()
        sweep_thread.join(30)
        assert errors == []
        assert swept == []
        names = sorted(os.listdir(private))
        assert len(names) == 160
        for name in names:
            _manifest.verify(private / name)
