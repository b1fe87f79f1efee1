"""The commit sequence: one number per commit, never repeated by threads or processes.

It lives with the directory (an extended attribute, or derived from the manifests where
the filesystem has none): the directory holds nothing but committed states.
"""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest

from conftest import commit
from statekeep import _atomic, _commit, _manifest, _sequence

MODES = ["xattr", "scan"]


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the counter in the directory's attribute, and without attributes."""
    if request.param == "scan":
        monkeypatch.setattr(_sequence, "_HAS_XATTR", False)
    return str(request.param)


def seq(state: Path) -> int:
    return _manifest.read_manifest(state).sequence


class TestSequence:
    """The directory's counter never hands out a number twice, and survives restarts."""

    def test_increases_across_commits(self, states_dir: Path, mode: str) -> None:
        seqs = [seq(commit(states_dir, {}, f"{i}.s")) for i in range(3)]
        assert seqs == [1, 2, 3]
        assert sorted(os.listdir(states_dir)) == ["0.s", "1.s", "2.s"]
        assert all(not _atomic.is_private(n) for n in os.listdir(states_dir))

    def test_lives_in_the_directory_attribute(self, states_dir: Path) -> None:
        commit(states_dir, {}, "a.s")
        assert os.getxattr(states_dir, _sequence.XATTR) == b"1"
        assert os.listdir(states_dir) == ["a.s"]

    def test_never_reused_after_every_state_is_removed(self, states_dir: Path) -> None:
        for i in range(3):
            commit(states_dir, {}, f"{i}.s")
        for i in range(3):
            _atomic.discard_committed(states_dir, states_dir / f"{i}.s")
        assert seq(commit(states_dir, {}, "again.s")) == 4

    def test_missing_attribute_starts_above_the_manifests(self, states_dir: Path) -> None:
        for i in range(5):
            commit(states_dir, {}, f"{i}.s")
        os.removexattr(states_dir, _sequence.XATTR)  # e.g. copied with cp -r
        assert seq(commit(states_dir, {}, "next.s")) == 6

    def test_a_held_counter_sees_other_writers(self, states_dir: Path, mode: str) -> None:
        counter = _sequence.SequenceCounter(states_dir)

        def mine(name: str) -> int:
            with _commit.BuildDir(states_dir, durable=False, counter=counter) as build:
                return build.commit(states_dir / name).sequence

        assert mine("a.s") == 1
        assert seq(commit(states_dir, {}, "other.s")) == 2  # another writer, its own counter
        assert mine("b.s") == 3
        counter.close()

    @pytest.mark.parametrize("held", [False, True], ids=["per-call", "held-open"])
    def test_threads_get_distinct_numbers(self, states_dir: Path, held: bool) -> None:
        _atomic.make_root(states_dir, durable=False)
        got: list[int] = []
        lock = threading.Lock()
        counter = _sequence.SequenceCounter(states_dir)

        def take() -> None:
            for _ in range(25):
                value = counter.next() if held else _sequence.next_sequence(states_dir)
                with lock:
                    got.append(value)

        threads = [threading.Thread(target=take) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        counter.close()
        assert sorted(got) == list(range(1, 151))

    def test_held_counter_shares_the_attribute(self, states_dir: Path) -> None:
        _atomic.make_root(states_dir, durable=False)
        counter = _sequence.SequenceCounter(states_dir)
        assert counter.next() == 1
        assert _sequence.next_sequence(states_dir) == 2  # another writer, its own open
        assert counter.next() == 3
        counter.close()
        assert counter.next() == 4  # reopened
        counter.close()

    def test_forked_child_takes_its_own_lock(self, states_dir: Path) -> None:
        _atomic.make_root(states_dir, durable=False)
        counter = _sequence.SequenceCounter(states_dir)
        assert counter.next() == 1
        parent_fd = counter._fd
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 0 if counter._fd == -1 and counter.next() == 2 else 1
            counter.close()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert counter._fd == parent_fd  # the child closed its copy, not ours
        assert counter.next() == 3
        counter.close()

    def test_fork_while_another_thread_holds_the_lock(self, states_dir: Path) -> None:
        """A child forked while a thread of the parent is inside take() does not hang."""
        _atomic.make_root(states_dir, durable=False)
        counter = _sequence.SequenceCounter(states_dir)
        inside, release = threading.Event(), threading.Event()

        def hold() -> None:
            with counter.take():
                inside.set()
                release.wait(30)

        thread = threading.Thread(target=hold)
        counter._xattr = False  # scan mode: the lock is held for the whole block
        thread.start()
        assert inside.wait(30)
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child: its own lock, then waits on flock
                os._exit(0 if counter._lock.acquire(timeout=5) else 1)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
        finally:
            release.set()
            thread.join(30)
        counter.close()


class TestManyProcesses:
    """Several processes committing into one directory never share a number."""

    @pytest.mark.parametrize(("procs", "each"), [(4, 1000)], ids=["4x1000"])
    @pytest.mark.parametrize("how", MODES)
    def test_distinct_and_increasing(
        self,
        states_dir: Path,
        worker_cmd: list[str],
        worker_env: dict[str, str],
        procs: int,
        each: int,
        how: str,
    ) -> None:
        _atomic.make_root(states_dir, durable=False)
        if how == "scan":
            each //= 20  # each number is a real commit
        children = [
            subprocess.Popen(
                [*worker_cmd, "count", str(states_dir), str(each), how],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=worker_env,
            )
            for _ in range(procs)
        ]
        for child in children:  # every one imported and waiting: then start them together
            assert child.stdout is not None
            assert child.stdout.readline() == b"ready\n"
        for child in children:
            assert child.stdin is not None
            child.stdin.write(b"go\n")
            child.stdin.flush()
        seen: list[list[int]] = []
        for child in children:
            out, _ = child.communicate(timeout=120)
            assert child.returncode == 0
            kind, *numbers = out.decode().split()
            assert kind == "got"
            seen.append([int(n) for n in numbers])
        for numbers in seen:
            assert numbers == sorted(numbers)
            assert len(set(numbers)) == each
        every = [n for numbers in seen for n in numbers]
        assert len(set(every)) == procs * each, "two processes took the same number"
        assert sorted(every) == list(range(1, procs * each + 1))


class TestCarryOver:
    """A store written by an older statekeep keeps its counter and loses its folder."""

    def test_migrates_the_private_folder(self, states_dir: Path, mode: str) -> None:
        commit(states_dir, {}, "old.state")
        if mode == "xattr":
            os.removexattr(states_dir, _sequence.XATTR)
        legacy = states_dir / _atomic.PRIVATE_DIR
        legacy.mkdir()
        (legacy / "sequence").write_bytes(b"%20d\n" % 41)
        (legacy / "dead.work").mkdir()  # a killed old saver's build
        (legacy / "dead.work" / "half").write_bytes(b"x")
        (legacy / "gone.trash").mkdir()
        removed = _atomic.sweep(states_dir)
        assert legacy in removed
        assert os.listdir(states_dir) == ["old.state"]
        expected = 42 if mode == "xattr" else 2  # without attributes: above the manifests
        assert seq(commit(states_dir, {}, "new.state")) == expected

    def test_live_old_saver_keeps_the_folder(self, states_dir: Path) -> None:
        legacy = states_dir / _atomic.PRIVATE_DIR
        legacy.mkdir(parents=True)
        (legacy / "sequence").write_bytes(b"7")
        live = _atomic.Work(legacy, is_dir=True)  # an old process still saving in it
        try:
            _atomic.sweep(states_dir)
            assert live.path.exists()
            assert not (legacy / "sequence").exists()  # carried over already
            assert seq(commit(states_dir, {}, "a.state")) == 8
        finally:
            live.discard()
        _atomic.sweep(states_dir)
        assert os.listdir(states_dir) == ["a.state"]

    def test_legacy_folder_as_a_symlink_is_removed_as_a_link(
        self, states_dir: Path, tmp_path: Path
    ) -> None:
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "x.work").mkdir()
        (outside / "y.trash").write_bytes(b"keep me")
        (outside / "sequence").write_bytes(b"99")
        states_dir.mkdir()
        (states_dir / _atomic.PRIVATE_DIR).symlink_to(outside)
        _atomic.sweep(states_dir)
        assert os.listdir(states_dir) == []
        assert sorted(os.listdir(outside)) == ["sequence", "x.work", "y.trash"]


class TestCostPerCommit:
    """With the attribute, a commit reads no manifest: no work grows with the states kept."""

    def test_no_manifest_is_read(self, states_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        counter = _sequence.SequenceCounter(states_dir)

        def save(name: str) -> int:
            with _commit.BuildDir(states_dir, durable=False, counter=counter) as build:
                return build.commit(states_dir / name).sequence

        for i in range(30):
            save(f"{i}.s")
        reads: list[str] = []
        real = _manifest.read_order

        def counting(directory: str) -> tuple[float, int] | None:
            reads.append(directory)
            return real(directory)

        monkeypatch.setattr(_manifest, "read_order", counting)
        assert [save(f"more{i}.s") for i in range(5)] == [31, 32, 33, 34, 35]
        assert reads == []
        counter.close()


class _Coarse:
    """A stat result whose times have whole-second resolution (as on some filesystems)."""

    def __init__(self, st: os.stat_result) -> None:
        self._st = st
        self.st_mtime_ns = st.st_mtime_ns // 1_000_000_000 * 1_000_000_000
        self.st_ctime_ns = st.st_ctime_ns // 1_000_000_000 * 1_000_000_000

    def __getattr__(self, name: str) -> object:
        return getattr(self._st, name)


class TestWithoutAttributesOnCoarseTimestamps:
    """Another writer's commit within the same timestamp tick is still seen."""

    def test_same_second_commit_by_another_writer(
        self, states_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(_sequence, "_HAS_XATTR", False)
        real_fstat = os.fstat
        monkeypatch.setattr(os, "fstat", lambda fd: _Coarse(real_fstat(fd)))
        mine, theirs = _sequence.SequenceCounter(states_dir), _sequence.SequenceCounter(states_dir)
        _atomic.make_root(states_dir, durable=False)
        # Their build exists before my commit, so my commit is the last change of the
        # directory's link count: only the timestamps could tell their rename apart.
        with _commit.BuildDir(states_dir, durable=False, counter=theirs) as their_build:
            with _commit.BuildDir(states_dir, durable=False, counter=mine) as build:
                assert build.commit(states_dir / "a.s").sequence == 1
            assert their_build.commit(states_dir / "b.s").sequence == 2
        with _commit.BuildDir(states_dir, durable=False, counter=mine) as build:
            assert build.commit(states_dir / "c.s").sequence == 3
        mine.close()
        theirs.close()
