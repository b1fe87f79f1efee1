"""LatestStatesKeeper: what it prunes, in which order, in both modes, and what it never touches."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from crashworkers.snapshot_worker import check_state, make_store
from statekeep import (
    KeepBest,
    KeepLatest,
    LatestStatesKeeper,
    PersistentStateMixin,
    StateStore,
    _atomic,
    _manifest,
    _scan,
)
from statekeep import _keeper as keeper_module


class ObservedKeeper(LatestStatesKeeper):
    """A keeper that counts its passes and records what it removed (behaviour unchanged)."""

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.passes = 0
        self.removed: list[Path] = []
        self.threads: set[threading.Thread] = set()
        self.fail_passes = 0
        self._cond = threading.Condition()

    def cleanup(self) -> list[Path]:
        self.threads.add(threading.current_thread())
        try:
            if self.fail_passes:
                self.fail_passes -= 1
                raise RuntimeError("injected failure of a whole pass")
            removed = super().cleanup()
            self.removed.extend(removed)
            return removed
        finally:
            with self._cond:
                self.passes += 1
                self._cond.notify_all()

    def wait_passes(self, n: int, timeout: float = 30.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.passes >= n, timeout)


class Blob(PersistentStateMixin):
    def __init__(self, data: bytes = b"data") -> None:
        self.data = data

    def save_state(self, path: Path) -> None:
        path.write_bytes(self.data)


def save(states_dir: Path, name: str, data: bytes = b"data") -> Path:
    store = StateStore(states_dir, state_name_format=name)
    store.register("blob", Blob(data))
    return store.save_state()


def legacy(states_dir: Path, name: str, mtime: float) -> Path:
    """A state directory written by an older tool: no manifest."""
    path = states_dir / name
    path.mkdir(parents=True)
    (path / "model.pt").write_bytes(b"old")
    os.utime(path, (mtime, mtime))
    return path


def names(states_dir: Path) -> list[str]:
    return sorted(n for n in os.listdir(states_dir) if not _atomic.is_private(n))


class TestInit:
    """Arguments are checked; a missing directory is created with a warning."""

    def test_negative_interval(self, states_dir: Path) -> None:
        with pytest.raises(ValueError, match="cleanup_interval must be >= 0, got -1"):
            LatestStatesKeeper(states_dir, cleanup_interval=-1)

    def test_pattern_with_a_slash(self, states_dir: Path) -> None:
        with pytest.raises(ValueError, match="must match names"):
            LatestStatesKeeper(states_dir, "sub/*.state")

    def test_creates_missing_dir(self, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
        missing = tmp_path / "a" / "b"
        with caplog.at_level(logging.WARNING, logger="statekeep"):
            LatestStatesKeeper(missing)
        assert missing.is_dir()
        assert f"states_dir {missing} does not exist" in caplog.text


class TestCleanup:
    """One pass removes all but the newest max_keep matching directories."""

    def test_orders_by_manifest_time_not_name_or_mtime(self, states_dir: Path) -> None:
        made = [save(states_dir, f"s{i}.state") for i in range(4)]
        # Scramble names and mtimes so that only the manifests tell the true order.
        for i, path in enumerate(made):
            path.rename(states_dir / f"{'zyxw'[i]}.state")
            stamp = 2_000_000_000 - i * 1000
            os.utime(states_dir / f"{'zyxw'[i]}.state", (stamp, stamp))
        keeper = LatestStatesKeeper(states_dir, max_keep=2)
        assert keeper.cleanup() == [states_dir / "z.state", states_dir / "y.state"]
        assert names(states_dir) == ["w.state", "x.state"]
        assert sorted(os.listdir(states_dir)) == ["w.state", "x.state"]  # nothing private

    def test_legacy_directories_never_count_as_kept(self, states_dir: Path) -> None:
        now = time.time()
        for name, age in (("a", 100), ("b", 300), ("c", 200)):
            legacy(states_dir, f"{name}.state", now - age)
        keeper = LatestStatesKeeper(states_dir, max_keep=1)
        assert keeper.cleanup() == []  # none verifies: nothing may go
        assert names(states_dir) == ["a.state", "b.state", "c.state"]

    def test_legacy_directories_go_by_mtime_once_enough_states_verify(
        self, states_dir: Path
    ) -> None:
        now = time.time()
        a = legacy(states_dir, "a.state", now - 100)
        b = legacy(states_dir, "b.state", now - 300)
        c = legacy(states_dir, "c.state", now - 200)
        keeper = LatestStatesKeeper(states_dir, max_keep=2)
        good = save(states_dir, "good.state")
        assert keeper.cleanup() == []  # one good state of the two to keep: nothing goes yet
        later = save(states_dir, "later.state")
        assert keeper.cleanup() == [b, c, a]  # oldest first, by mtime among themselves
        assert names(states_dir) == [good.name, later.name]

    def test_a_newer_directory_without_manifest_never_pushes_out_the_good_state(
        self, states_dir: Path
    ) -> None:
        now = time.time()
        old = legacy(states_dir, "old.state", now - 3600)
        current = save(states_dir, "current.state")
        newer = legacy(states_dir, "newer.state", now + 3600)
        keeper = LatestStatesKeeper(states_dir, max_keep=1)
        assert keeper.cleanup() == [old, newer]
        assert names(states_dir) == ["current.state"]
        _manifest.verify(current)

    def test_only_matching_directories(self, states_dir: Path) -> None:
        save(states_dir, "a.state")
        save(states_dir, "b.state")
        (states_dir / "file.state").write_text("a file that matches")
        save(states_dir, "other.ckpt")
        keeper = LatestStatesKeeper(states_dir, max_keep=0)
        assert sorted(p.name for p in keeper.cleanup()) == ["a.state", "b.state"]
        assert names(states_dir) == ["file.state", "other.ckpt"]
        assert (states_dir / "file.state").read_text() == "a file that matches"

    def test_negative_keeps_all(self, states_dir: Path) -> None:
        for i in range(3):
            save(states_dir, f"{i}.state")
        assert LatestStatesKeeper(states_dir, max_keep=-1).cleanup() == []
        assert len(names(states_dir)) == 3

    def test_zero_removes_all(self, states_dir: Path) -> None:
        for i in range(3):
            save(states_dir, f"{i}.state")
        assert len(LatestStatesKeeper(states_dir, max_keep=0).cleanup()) == 3
        assert names(states_dir) == []

    def test_fewer_than_max_keep(self, states_dir: Path) -> None:
        save(states_dir, "a.state")
        assert LatestStatesKeeper(states_dir, max_keep=5).cleanup() == []
        assert names(states_dir) == ["a.state"]

    def test_undeletable_state_is_logged_and_others_go(
        self, states_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        stuck, gone, kept = (save(states_dir, f"{n}.state") for n in "abc")
        real = _atomic.discard_committed

        def refuse_one(root: Path, path: Path) -> None:
            if path == stuck:
                raise PermissionError(13, "Permission denied", str(path))
            real(root, path)

        monkeypatch.setattr(keeper_module._atomic, "discard_committed", refuse_one)
        keeper = LatestStatesKeeper(states_dir, max_keep=1)
        with caplog.at_level(logging.ERROR, logger="statekeep"):
            assert keeper.cleanup() == [gone]
            for _ in range(3):  # a background keeper passes again and again
                assert keeper.cleanup() == []
        assert caplog.text.count(f"could not remove state {stuck}") == 1, "said once"
        assert names(states_dir) == ["a.state", "c.state"]
        monkeypatch.undo()
        assert keeper.cleanup() == [stuck]
        assert kept.is_dir()

    def test_two_keepers_at_once(self, states_dir: Path) -> None:
        made = [save(states_dir, f"{i:02}.state") for i in range(20)]
        keepers = [ObservedKeeper(states_dir, max_keep=3) for _ in range(2)]
        threads = [threading.Thread(target=k.cleanup) for k in keepers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        removed = keepers[0].removed + keepers[1].removed
        assert sorted(removed) == made[:17]
        assert names(states_dir) == ["17.state", "18.state", "19.state"]

    def test_a_pass_reclaims_dead_saves_but_not_live_ones(self, states_dir: Path) -> None:
        _atomic.make_root(states_dir, durable=False)
        private = states_dir
        dead = private / ".statekeep-0123456789abcdef.work"  # a killed save: nobody holds its lock
        dead.mkdir()
        (dead / "model.pt").write_bytes(b"half")
        trash = private / ".statekeep-fedcba9876543210.trash"  # an interrupted removal
        trash.mkdir()
        live = _atomic.Work(private, is_dir=True)  # a save still running
        try:
            LatestStatesKeeper(states_dir, max_keep=5).cleanup()
            assert not dead.exists()
            assert not trash.exists()
            assert live.path.is_dir()
        finally:
            live.discard()


class TestBackground:
    """start() prunes in a daemon thread; stop() returns at once."""

    def test_runs_and_stops_promptly(self, states_dir: Path) -> None:
        for i in range(3):
            save(states_dir, f"{i}.state")
        keeper = ObservedKeeper(states_dir, max_keep=1, cleanup_interval=3600)
        keeper.start()
        keeper.start()  # idempotent
        try:
            assert keeper.wait_passes(1)
            [thread] = keeper.threads
            assert thread is not threading.current_thread()
            assert thread.daemon
        finally:
            began = time.monotonic()
            keeper.stop()
            elapsed = time.monotonic() - began
        assert elapsed < 5.0, f"stop() took {elapsed:.1f} s with cleanup_interval=3600"
        assert not thread.is_alive()
        assert keeper.passes == 1
        assert names(states_dir) == ["2.state"]
        keeper.stop()  # idempotent

    def test_restart(self, states_dir: Path) -> None:
        keeper = ObservedKeeper(states_dir, max_keep=1, cleanup_interval=3600)
        keeper.start()
        assert keeper.wait_passes(1)
        keeper.stop()
        save(states_dir, "a.state")
        save(states_dir, "b.state")
        keeper.start()
        try:
            assert keeper.wait_passes(2)
        finally:
            keeper.stop()
        assert names(states_dir) == ["b.state"]

    def test_error_in_a_pass_is_logged_and_the_loop_goes_on(
        self, states_dir: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        save(states_dir, "a.state")
        save(states_dir, "b.state")
        keeper = ObservedKeeper(states_dir, max_keep=1, cleanup_interval=0)
        keeper.fail_passes = 1
        with caplog.at_level(logging.ERROR, logger="statekeep"):
            keeper.start()
            try:
                assert keeper.wait_passes(2)
            finally:
                keeper.stop()
        assert f"cleanup of {states_dir} failed" in caplog.text
        assert "injected failure" in caplog.text
        assert names(states_dir) == ["b.state"]

    def test_context_manager(self, states_dir: Path) -> None:
        save(states_dir, "a.state")
        save(states_dir, "b.state")
        with ObservedKeeper(states_dir, max_keep=1, cleanup_interval=3600) as keeper:
            assert keeper.wait_passes(1)
            [thread] = keeper.threads
            assert thread.is_alive()
        assert not thread.is_alive()
        assert names(states_dir) == ["b.state"]


class TestForeground:
    """start(background=False) blocks its caller until stop() is called elsewhere."""

    def test_blocks_until_stopped(self, states_dir: Path) -> None:
        save(states_dir, "a.state")
        save(states_dir, "b.state")
        keeper = ObservedKeeper(states_dir, max_keep=1, cleanup_interval=3600)
        runner = threading.Thread(target=keeper.start, kwargs={"background": False})
        runner.start()
        try:
            assert keeper.wait_passes(1)
            assert keeper.threads == {runner}
            assert runner.is_alive()
        finally:
            began = time.monotonic()
            keeper.stop()
            runner.join(10)
        assert not runner.is_alive()
        assert time.monotonic() - began < 5.0
        assert names(states_dir) == ["b.state"]


class Slow(PersistentStateMixin):
    """Writes half its data, then waits until released (a long save in progress)."""

    def __init__(self) -> None:
        self.block = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def save_state(self, path: Path) -> None:
        path.mkdir()
        (path / "half").write_bytes(b"h" * 1000)
        if self.block:
            self.entered.set()
            assert self.release.wait(30), "never released"
        (path / "rest").write_bytes(b"r" * 1000)


class TestSaveInProgress:
    """pamiq-core's failure: a slow save while the keeper runs with max_keep=1."""

    def test_previous_state_survives_and_build_is_untouched(self, states_dir: Path) -> None:
        slow = Slow()
        store = StateStore(states_dir)
        store.register("slow", slow)
        previous = store.save_state()
        slow.block = True
        result: list[Path] = []
        saver = threading.Thread(target=lambda: result.append(store.save_state()))
        saver.start()
        keeper = ObservedKeeper(states_dir, max_keep=1, cleanup_interval=0)
        try:
            assert slow.entered.wait(30)
            [build] = states_dir.glob(".statekeep-*.work")
            assert keeper.cleanup() == []
            keeper.start()
            assert keeper.wait_passes(5)
            keeper.stop()
            StateStore(states_dir)  # a sweep meanwhile leaves the live build alone
            assert names(states_dir) == [previous.name]
            _manifest.verify(previous)
            assert (build / "slow" / "half").read_bytes() == b"h" * 1000
        finally:
            keeper.stop()
            slow.release.set()
            saver.join(30)
        [new] = result
        assert not build.exists()
        _manifest.verify(new)
        assert keeper.cleanup() == [previous]
        assert names(states_dir) == [new.name]


class TestConcurrentSavesWhilePruning:
    """Threads and processes saving into one store while the keeper prunes with max_keep=2."""

    def test_every_remaining_state_verifies(
        self, states_dir: Path, worker_cmd: list[str], worker_env: dict[str, str]
    ) -> None:
        saves_each, n_threads, n_procs = 8, 3, 3
        StateStore(states_dir)
        keeper = ObservedKeeper(states_dir, max_keep=2, cleanup_interval=0)
        reported: dict[Path, int] = {}
        errors: list[BaseException] = []
        lock = threading.Lock()

        def thread_writer(i: int) -> None:
            try:
                fmt = f"%Y-%m-%d_%H-%M-%S,%f-t{i}.state"
                store, current = make_store(str(states_dir), i, True, name_format=fmt)
                for k in range(saves_each):
                    current[0] = (i + 1) * 1000 + k
                    path = store.save_state()
                    with lock:
                        reported[path] = current[0]
            except BaseException as exc:
                errors.append(exc)

        keeper.start()
        try:
            procs = [
                subprocess.Popen(
                    [
                        *worker_cmd,
                        "writer",
                        str(states_dir),
                        f"p{i}",
                        str(saves_each),
                        str((i + 100) * 1000),
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env=worker_env,
                )
                for i in range(n_procs)
            ]
            threads = [threading.Thread(target=thread_writer, args=(i,)) for i in range(n_threads)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            for proc in procs:
                out, err = proc.communicate(timeout=120)
                assert proc.returncode == 0, err.decode()
                for line in out.decode().splitlines():
                    _, gen, path = line.split(" ", 2)
                    reported[Path(path)] = int(gen)
            # a whole pass that began after the last save: the one after the next to end
            assert keeper.wait_passes(keeper.passes + 2)
        finally:
            keeper.stop()
        assert errors == []
        assert len(reported) == saves_each * (n_threads + n_procs)
        assert set(keeper.removed) <= set(reported), "the keeper removed something never saved"
        remaining = [states_dir / n for n in names(states_dir)]
        assert set(remaining) | set(keeper.removed) == set(reported), "a saved state was lost"
        for path in remaining:
            _manifest.verify(path)
            assert check_state(path) == reported[path]
        assert len(remaining) == 2
        StateStore(states_dir)
        assert [n for n in os.listdir(states_dir) if _atomic.is_private(n)] == []


def flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1
    path.write_bytes(bytes(data))


class TestNeverDeletesTheNewestGoodState:
    """A damaged, unreadable or manifest-less newest directory never counts as kept."""

    @pytest.mark.parametrize("damage", ["payload bit", "manifest bit", "manifest head bit", "eio"])
    def test_older_good_state_survives(
        self, states_dir: Path, monkeypatch: pytest.MonkeyPatch, damage: str
    ) -> None:
        good = save(states_dir, "a.state", b"good")
        bad = save(states_dir, "b.state", b"newer")
        manifest = bad / _manifest.MANIFEST_NAME
        if damage == "payload bit":
            flip_bit(bad / "blob", 0)
        elif damage == "manifest bit":
            flip_bit(manifest, manifest.read_bytes().index(b'"blob"') + 1)
        elif damage == "manifest head bit":
            flip_bit(manifest, manifest.read_bytes().index(b'"sequence": ') + 12)
        else:
            real_open = os.open

            def failing(path: str, *args: int, **kw: int) -> int:
                if os.fspath(path).startswith(f"{bad}/"):
                    raise OSError(errno.EIO, "Input/output error", path)
                return real_open(path, *args, **kw)

            monkeypatch.setattr(os, "open", failing)
        keeper = LatestStatesKeeper(states_dir, max_keep=1)
        removed: list[Path] = []
        for _ in range(2):
            removed += keeper.cleanup()
            assert good not in removed
            assert good.is_dir()
        store = StateStore(states_dir)
        store.register("blob", Blob())
        assert store.load_latest_state() == good
        # Once a newer good state exists, what is older than it may go, damaged or not.
        newest = save(states_dir, "c.state", b"newest")
        assert set(keeper.cleanup()) == {good, bad} - set(removed)
        assert names(states_dir) == [newest.name]

    def test_each_state_is_read_once_per_process(
        self, states_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        _scan._cache.clear()
        made = [save(states_dir, f"{i}.state") for i in range(4)]
        reads: list[str] = []
        real = _manifest.verify

        def counting(directory: str | Path) -> _manifest.Manifest:
            reads.append(os.fspath(directory))
            return real(directory)

        monkeypatch.setattr(_scan._manifest, "verify", counting)
        keeper = LatestStatesKeeper(states_dir, max_keep=2)
        assert keeper.cleanup() == made[:2]
        for _ in range(3):
            assert keeper.cleanup() == []
        assert LatestStatesKeeper(states_dir, max_keep=2).cleanup() == []  # another keeper
        assert sorted(reads) == [str(made[2]), str(made[3])]
        later = save(states_dir, "4.state")
        assert keeper.cleanup() == [made[2]]
        assert sorted(reads) == [str(made[2]), str(made[3]), str(later)]


class TestLifecycle:
    """Start and stop are logged; the context manager prunes once more on exit; fork works."""

    def test_start_and_stop_logged_at_info(
        self, states_dir: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        keeper = LatestStatesKeeper(states_dir, max_keep=3, cleanup_interval=7.5)
        with caplog.at_level(logging.INFO, logger="statekeep"):
            keeper.start()
            keeper.stop()
        text = caplog.text
        assert f"keeper started on {states_dir} (max_keep=3, every 7.5s)" in text
        assert f"keeper stopped on {states_dir}" in text

    def test_context_manager_leaves_max_keep(self, states_dir: Path) -> None:
        store = StateStore(states_dir)
        store.register("blob", Blob())
        with LatestStatesKeeper(states_dir, max_keep=3, cleanup_interval=3600):
            for _ in range(8):
                store.save_state()
        assert len(names(states_dir)) == 3

    @pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
    def test_start_in_a_forked_child(self, states_dir: Path) -> None:
        save(states_dir, "a.state")
        save(states_dir, "b.state")
        keeper = ObservedKeeper(states_dir, max_keep=1, cleanup_interval=3600)
        keeper.start()
        try:
            assert keeper.wait_passes(1)
            save(states_dir, "c.state")
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child reports by its exit status
                code = 1
                try:
                    keeper.passes = 0
                    keeper._cond = threading.Condition()
                    keeper.start()
                    code = 0 if keeper.wait_passes(1, timeout=20) else 2
                    keeper.stop()
                    code = code or (0 if names(states_dir) == ["c.state"] else 3)
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
        finally:
            keeper.stop()


class TestPolicyArgument:
    """policy= replaces max_keep; plan() says what would go and removes nothing."""

    def test_both_given(self, states_dir: Path) -> None:
        with pytest.raises(ValueError, match="not both"):
            LatestStatesKeeper(states_dir, max_keep=3, policy=KeepLatest(2))
        with pytest.raises(ValueError, match="not both"):
            LatestStatesKeeper(states_dir, max_keep=10, policy=KeepLatest(2))  # explicit 10
        LatestStatesKeeper(states_dir, policy=KeepLatest(2))  # max_keep left alone

    def test_plan_removes_nothing(self, states_dir: Path) -> None:
        made = [save(states_dir, f"{i}.state") for i in range(3)]
        keeper = LatestStatesKeeper(states_dir, policy=KeepLatest(1))
        assert keeper.plan() == made[:2]
        assert names(states_dir) == ["0.state", "1.state", "2.state"]
        assert keeper.cleanup() == made[:2]
        assert keeper.plan() == []

    def test_best_by_metric_plus_the_newest(self, states_dir: Path) -> None:
        store = StateStore(states_dir, "%Y-%m-%d_%H-%M-%S,%f.state")
        store.register("blob", Blob())
        losses = [0.9, 0.2, 0.5, 0.1, 0.7, 0.8]
        made = [store.save_state(metadata={"loss": x}) for x in losses]
        keeper = LatestStatesKeeper(states_dir, policy=KeepBest("loss", 2) | KeepLatest(1))
        keeper.cleanup()
        assert [i.path for i in store.list_states()] == [made[1], made[3], made[5]]
        assert [i.metadata for i in store.list_states()] == [{"loss": x} for x in (0.2, 0.1, 0.8)]
