"""Promises that broke under an adversarial review of the snapshot code, one test each.

Each case is something a user does (resume from a copied-in backup, rotate the states
folder, prune while verifying, run as a user who cannot empty a state) that made the
store order, report or prune wrongly before it was fixed.
"""

from __future__ import annotations

import dataclasses
import fcntl
import gc
import logging
import multiprocessing
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

import pytest

from statekeep import (
    KeepBest,
    KeepLatest,
    LatestStatesKeeper,
    PersistentStateMixin,
    StateInfo,
    StateStore,
    _atomic,
    _checksum,
    _manifest,
    _scan,
    _sequence,
    verify_state,
)
from statekeep.errors import CorruptStateError, StorageError


class Blob(PersistentStateMixin):
    """A component that writes ``data`` and remembers what it loaded."""

    def __init__(self, data: bytes = b"x") -> None:
        self.data = data
        self.loaded: bytes | None = None

    def save_state(self, path: Path) -> None:
        path.write_bytes(self.data)

    def load_state(self, path: Path) -> None:
        self.loaded = path.read_bytes()


def store(states_dir: Path, data: bytes = b"x") -> tuple[StateStore, Blob]:
    s = StateStore(states_dir, durable=False)
    blob = Blob(data)
    s.register("m", blob)
    return s, blob


def seqs(states_dir: Path) -> dict[str, int]:
    return {i.path.name: i.sequence for i in StateStore(states_dir).list_states()}


@pytest.fixture
def backup(tmp_path: Path) -> Path:
    """A state from another store, numbered far above anything a new store hands out."""
    s, _ = store(tmp_path / "elsewhere", b"backup")
    for _ in range(19):
        s.save_state()
    last = s.save_state()
    assert seqs(tmp_path / "elsewhere")[last.name] == 20
    return last


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory user ``nobody`` owns and can reach (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="statekeep-adv-"))
    path.chmod(0o755)
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def as_nobody(fn: Callable[[], None]) -> None:
    """Run ``fn`` in a forked child as user ``nobody`` when we are root (root ignores
    permissions); an assertion failing in the child fails the test."""
    if os.geteuid() != 0:
        fn()
        return
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            fn()
            code = 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child failed: see its output"


needs_xattr = pytest.mark.skipif(
    not _sequence._HAS_XATTR, reason="the counter lives in the manifests: nothing to catch up"
)


@needs_xattr
class TestResumeFromACopiedInState:
    """A state copied into the directory by hand never outranks the saves that follow.

    Before: the directory's counter (its extended attribute) knew nothing of the copy,
    so every later save was numbered below it, ordered older, and pruned at once by
    ``max_keep=1``, while ``load_latest_state`` kept restoring the copy.
    """

    def copy_in(self, backup: Path, states_dir: Path) -> None:
        shutil.copytree(backup, states_dir / backup.name)

    def assert_newest(self, states_dir: Path, saved: Path) -> None:
        numbers = seqs(states_dir)
        assert numbers[saved.name] == max(numbers.values())
        LatestStatesKeeper(states_dir, max_keep=1).cleanup()
        assert os.listdir(states_dir) == [saved.name]

    def test_store_opened_after_the_copy_saves_at_once(
        self, backup: Path, states_dir: Path
    ) -> None:
        first, _ = store(states_dir)
        first.save_state()
        self.copy_in(backup, states_dir)
        s, _ = store(states_dir)
        self.assert_newest(states_dir, s.save_state())

    def test_store_opened_after_the_copy(self, backup: Path, states_dir: Path) -> None:
        first, _ = store(states_dir)
        first.save_state()
        self.copy_in(backup, states_dir)
        s, blob = store(states_dir)
        assert s.load_latest_state() == states_dir / backup.name
        assert blob.loaded == b"backup"
        self.assert_newest(states_dir, s.save_state())

    def test_store_opened_before_the_copy_then_loading(
        self, backup: Path, states_dir: Path
    ) -> None:
        s, _ = store(states_dir)
        s.save_state()
        self.copy_in(backup, states_dir)
        assert s.latest_state() == states_dir / backup.name
        self.assert_newest(states_dir, s.save_state())

    def test_a_keeper_pass_in_between(self, backup: Path, states_dir: Path) -> None:
        s, _ = store(states_dir)
        s.save_state()
        self.copy_in(backup, states_dir)
        assert LatestStatesKeeper(states_dir, max_keep=5).cleanup() == []
        self.assert_newest(states_dir, s.save_state())

    def test_a_reader_that_may_not_raise_the_counter(self, backup: Path, nobody_dir: Path) -> None:
        states_dir = nobody_dir / "states"
        mine = store(states_dir)[0].save_state()  # the attribute says 1
        self.copy_in(backup, states_dir)
        if os.geteuid() == 0:
            os.chown(states_dir, 0, 0)  # root's; the reader below is nobody
        else:
            states_dir.chmod(0o555)

        def scenario() -> None:
            reader, blob = store(states_dir)
            assert reader.load_latest_state() == states_dir / backup.name
            assert blob.loaded == b"backup"
            assert [i.path for i in reader.list_states()] == [mine, states_dir / backup.name]

        try:
            as_nobody(scenario)
        finally:
            states_dir.chmod(0o755)

    def test_a_dry_run_writes_nothing(self, backup: Path, states_dir: Path) -> None:
        s, _ = store(states_dir)
        s.save_state()
        self.copy_in(backup, states_dir)
        before = os.getxattr(states_dir, _sequence.XATTR)
        assert LatestStatesKeeper(states_dir, max_keep=1).plan() != []
        assert os.getxattr(states_dir, _sequence.XATTR) == before

    def test_a_damaged_number_is_not_believed(self, states_dir: Path) -> None:
        """A manifest whose head claims the largest number but fails its seal must not
        push the counter there: every later save would be numbered out of range."""
        s, _ = store(states_dir)
        hostile = s.save_state()
        manifest = hostile / ".statekeep-manifest.json"
        raw = manifest.read_bytes().replace(b'"sequence": 1,', b'"sequence": 9223372036854775807,')
        manifest.write_bytes(raw)
        s2, _ = store(states_dir)
        assert s2.load_latest_state() is None
        LatestStatesKeeper(states_dir, max_keep=5).cleanup()
        saved = s2.save_state()
        assert verify_state(saved).sequence == 2
        assert s2.load_latest_state() == saved


class TestHugeNumbersInTheDirectory:
    """A manifest claiming the largest sequence cannot make later saves unloadable.

    Before: where the counter comes from the manifests (no extended attributes, or the
    attribute lost in a copy), a damaged head claiming 2**63-1 made every later save
    numbered 2**63: committed, but refused by every reader ("not an integer from 0
    to ..."), so nothing saved after it could ever be loaded.
    """

    @pytest.fixture(params=["scan", "attribute lost"])
    def without_attribute(
        self, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
    ) -> Callable[[Path], None]:
        if request.param == "scan":
            monkeypatch.setattr(_sequence, "_HAS_XATTR", False)
            return lambda states_dir: None
        if not _sequence._HAS_XATTR:
            pytest.skip("no extended attributes here")
        return lambda states_dir: os.removexattr(states_dir, _sequence.XATTR)

    def claim_max(self, state: Path, *, sealed: bool) -> None:
        path = state / _manifest.MANIFEST_NAME
        if sealed:
            m = dataclasses.replace(_manifest.read_manifest(state), sequence=(1 << 63) - 1)
            path.write_bytes(m.to_bytes())
        else:
            raw = path.read_bytes()
            path.write_bytes(raw.replace(b'"sequence": 1,', b'"sequence": 9223372036854775807,'))

    def test_a_damaged_head_is_not_believed(
        self, states_dir: Path, without_attribute: Callable[[Path], None]
    ) -> None:
        s, _ = store(states_dir)
        self.claim_max(s.save_state(), sealed=False)
        without_attribute(states_dir)
        s2, _ = store(states_dir)
        saved = s2.save_state()
        verify_state(saved)
        assert s2.load_latest_state() == saved

    def test_a_sealed_maximum_refuses_the_save(
        self, states_dir: Path, without_attribute: Callable[[Path], None]
    ) -> None:
        s, _ = store(states_dir)
        top = s.save_state()
        self.claim_max(top, sealed=True)
        without_attribute(states_dir)
        s2, _ = store(states_dir)
        with pytest.raises(StorageError, match="exhausted"):
            s2.save_state()
        assert os.listdir(states_dir) == [top.name]  # nothing unloadable was committed


@needs_xattr
def test_an_attribute_out_of_range_is_not_believed(states_dir: Path) -> None:
    """An attribute holding a number no manifest can carry (another tool wrote it) is
    treated as missing: the count starts again above the manifests, and saves go on."""
    s, _ = store(states_dir)
    s.save_state()
    os.setxattr(states_dir, _sequence.XATTR, b"9999999999999999999")
    later = s.save_state()
    assert verify_state(later).sequence == 2
    assert os.getxattr(states_dir, _sequence.XATTR) == b"2"


class TestStatesDirReplaced:
    """A states folder moved away and recreated while a store holds it open.

    Before: the store's counter kept the old folder open and numbered its saves into
    the new folder from the old one's attribute, repeating numbers another writer of
    the new folder had handed out (two states with one sequence: order by accident).
    """

    def test_numbers_follow_the_folder_now_there(self, tmp_path: Path) -> None:
        states_dir = tmp_path / "states"
        old, _ = store(states_dir)
        for _ in range(5):
            old.save_state()
        states_dir.rename(tmp_path / "states.old")
        states_dir.mkdir()
        old.save_state()
        new, _ = store(states_dir)
        new.save_state()
        new.save_state()
        last = old.save_state()
        numbers = seqs(states_dir)
        assert len(set(numbers.values())) == 4  # one number per commit
        assert numbers[last.name] == max(numbers.values())
        assert new.latest_state() == last


class TestVerifyRacingRemoval:
    """A state pruned while it is verified is gone, not corrupt.

    Before: ``verify_state`` raised ``CorruptStateError`` ("m is missing") for a state a
    keeper had just removed, and the keeper and the loader logged it as damaged.
    """

    @pytest.fixture
    def prune_during_read(self, monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], None]:
        """Arrange for the state to be pruned (as a keeper does) just as its first file
        is read, then let the read go on."""

        def arm(state: Path) -> None:
            real = _checksum.checksum_file
            done = threading.Event()

            def pruning(path: str, **kw: object) -> tuple[int, int]:
                if not done.is_set():
                    done.set()
                    _atomic.discard_committed(state.parent, state)
                return real(path, **kw)  # type: ignore[arg-type]

            monkeypatch.setattr(_checksum, "checksum_file", pruning)

        return arm

    def test_verify_state_says_not_found(
        self, states_dir: Path, prune_during_read: Callable[[Path], None]
    ) -> None:
        s, _ = store(states_dir)
        state = s.save_state()
        prune_during_read(state)
        with pytest.raises(FileNotFoundError, match="removed"):
            verify_state(state)

    def test_no_damage_is_reported(
        self,
        states_dir: Path,
        prune_during_read: Callable[[Path], None],
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        s, _ = store(states_dir)
        state = s.save_state()
        prune_during_read(state)
        with caplog.at_level(logging.WARNING, logger="statekeep"):
            assert _scan.verified(state) is False
        assert caplog.records == []

    def test_a_real_loss_is_still_corruption(self, states_dir: Path) -> None:
        s, _ = store(states_dir)
        state = s.save_state()
        (state / "m").unlink()
        with pytest.raises(CorruptStateError, match="m is missing"):
            verify_state(state)


class TestUnremovableState:
    """The keeper leaves a state it may not empty where it is, visible.

    Before: it renamed the state to a private ``.trash`` name, then failed to delete it:
    the state vanished from every listing, ``states_dir`` held private debris for good,
    and every later pass warned about it again.
    """

    def test_stays_visible_and_the_rest_is_pruned(self, nobody_dir: Path) -> None:
        states_dir = nobody_dir / "states"

        def scenario() -> None:
            s, _ = store(states_dir)
            locked, second, third = s.save_state(), s.save_state(), s.save_state()
            locked.chmod(0)
            removed = LatestStatesKeeper(states_dir, max_keep=1).cleanup()
            assert removed == [second]
            assert sorted(os.listdir(states_dir)) == sorted([locked.name, third.name])
            locked.chmod(0o755)
            assert LatestStatesKeeper(states_dir, max_keep=1).cleanup() == [locked]
            assert os.listdir(states_dir) == [third.name]

        as_nobody(scenario)

    def test_removed_by_another_pruner_meanwhile_is_not_a_permission_error(
        self, states_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Two keepers pruning one directory: the one that comes second finds the state
        gone (FileNotFoundError, which the keeper skips), not forbidden."""
        s, _ = store(states_dir)
        state = s.save_state()
        real = os.access
        fired = threading.Event()

        def other_keeper_first(path: object, mode: int, **kw: bool) -> bool:
            if not fired.is_set():
                fired.set()
                _atomic.discard_committed(states_dir, state)
            return real(path, mode, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "access", other_keeper_first)
        with pytest.raises(FileNotFoundError):
            _atomic.discard_committed(states_dir, state)


class TestListingRacingTheKeeper:
    """``latest_state()`` and ``list_states()`` never answer "nothing" while a committed
    state exists, with saves and a keeper (``max_keep=1``) renaming states in and out.

    Before: they worked from one scan; when the state listed was pruned before its
    manifest was read (a newer one having been committed after the scan), they
    returned ``None`` / ``[]`` (about 1 call in 2000 with a saver and a keeper running).
    """

    @pytest.fixture
    def reader_racing(
        self, states_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> tuple[StateStore, Callable[[], Path]]:
        """A reader whose next manifest read first commits a newer state and prunes the
        one being read, as a saver and a keeper in other processes do; and the newer
        state, once it exists."""
        saver, _ = store(states_dir)
        old = saver.save_state()
        reader = StateStore(states_dir)
        real = _scan.read_manifest
        newer: list[Path] = []

        def racing(directory: str) -> _manifest.Manifest:
            if not newer and directory == str(old):
                newer.append(saver.save_state())
                _atomic.discard_committed(states_dir, old)
            return real(directory)

        monkeypatch.setattr(_scan, "read_manifest", racing)
        return reader, lambda: newer[0]

    def test_latest_state(self, reader_racing: tuple[StateStore, Callable[[], Path]]) -> None:
        reader, newer = reader_racing
        assert reader.latest_state() == newer()

    def test_list_states(self, reader_racing: tuple[StateStore, Callable[[], Path]]) -> None:
        reader, newer = reader_racing
        assert [i.path for i in reader.list_states()] == [newer()]

    def test_an_empty_directory_is_still_empty(self, states_dir: Path) -> None:
        reader = StateStore(states_dir)
        assert reader.latest_state() is None
        assert reader.list_states() == []

    def test_processes(self, states_dir: Path) -> None:
        """The real race, a saver and a keeper in two processes, many calls."""
        ctx = multiprocessing.get_context("fork")
        stop = ctx.Event()
        s, _ = store(states_dir)
        s.save_state()
        procs = [
            ctx.Process(target=_save_until, args=(states_dir, stop)),
            ctx.Process(target=_prune_until, args=(states_dir, stop)),
        ]
        for p in procs:
            p.start()
        reader = StateStore(states_dir)
        empty = calls = 0
        deadline = time.monotonic() + 8.0
        try:
            while calls < 20_000 and time.monotonic() < deadline:
                calls += 2
                empty += reader.latest_state() is None
                empty += not reader.list_states()
        finally:
            stop.set()
            for p in procs:
                p.join(30)
        assert [p.exitcode for p in procs] == [0, 0], "a saver or keeper failed: see stderr"
        assert calls >= 200, "too few calls to mean anything"
        assert empty == 0, f"{empty} of {calls} calls found nothing"


def _save_until(states_dir: Path, stop: EventType) -> None:
    s, _ = store(states_dir)
    while not stop.is_set():
        s.save_state()


def _prune_until(states_dir: Path, stop: EventType) -> None:
    keeper = LatestStatesKeeper(states_dir, max_keep=1, cleanup_interval=0)
    while not stop.is_set():
        keeper.cleanup()


@needs_xattr
class TestReadersNeverWaitForTheLock:
    """Raising the counter from a listing never waits for the directory's ``flock``:
    a loader must not hang because another process (a saver stopped mid-commit, a
    backup script running under ``flock states/``) holds it."""

    def test_load_while_the_directory_is_locked(self, backup: Path, states_dir: Path) -> None:
        s, _ = store(states_dir)
        s.save_state()
        shutil.copytree(backup, states_dir / backup.name)  # above the counter: a raise is due
        holder = os.open(states_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(holder, fcntl.LOCK_EX)
            result: list[object] = []
            t = threading.Thread(
                target=lambda: result.append(store(states_dir)[0].load_latest_state()),
                daemon=True,
            )
            t.start()
            t.join(20)
            assert not t.is_alive(), "a reader waited for the directory's lock"
            assert result == [states_dir / backup.name]
        finally:
            os.close(holder)
        # Once the lock is free, the next listing raises the counter after all.
        assert s.latest_state() == states_dir / backup.name
        later = s.save_state()
        assert seqs(states_dir)[later.name] > 20


@pytest.fixture
def read_only_view(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(a writable directory, the same directory seen through a read-only bind mount)."""
    source, view = tmp_path / "rw", tmp_path / "ro"
    source.mkdir()
    view.mkdir()
    bind = subprocess.run(["mount", "--bind", source, view], capture_output=True, text=True)
    if bind.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {bind.stderr.strip()}")
    try:
        ro = subprocess.run(
            ["mount", "-o", "remount,bind,ro", view], capture_output=True, text=True
        )
        if ro.returncode != 0:
            pytest.skip(f"cannot remount read-only here: {ro.stderr.strip()}")
        yield source, view
    finally:
        gc.collect()  # a store holds its directory open: let go of the test's stores
        if subprocess.run(["umount", view]).returncode != 0:
            subprocess.run(["umount", "-l", view], check=True)  # never leave it mounted


class TestReadOnlyFilesystem:
    """States on a read-only filesystem (an inference host's image) load and list; the
    keeper removes nothing and says why, without claiming a permission problem."""

    def test_load_list_and_prune(
        self, read_only_view: tuple[Path, Path], caplog: pytest.LogCaptureFixture
    ) -> None:
        source, view = read_only_view
        s, _ = store(source / "states")
        s.save_state()
        newest = s.save_state()
        reader, blob = store(view / "states")
        assert reader.load_latest_state() == view / "states" / newest.name
        assert blob.loaded == b"x"
        assert len(reader.list_states()) == 2
        with caplog.at_level(logging.ERROR, logger="statekeep"):
            assert LatestStatesKeeper(view / "states", max_keep=1).cleanup() == []
        assert "read-only filesystem" in caplog.text
        assert len(os.listdir(source / "states")) == 2
        del s, reader, blob


def test_a_huge_metric_does_not_stop_pruning(states_dir: Path) -> None:
    """Metadata may hold any JSON integer; one beyond a float's range ranks as infinite
    instead of making every keeper pass raise OverflowError (so nothing was ever pruned
    again)."""
    s, _ = store(states_dir)
    huge = s.save_state(metadata={"loss": 10**400})
    tiny = s.save_state(metadata={"loss": -(10**400)})
    middle = [s.save_state(metadata={"loss": x}) for x in (0.5, 0.4, 0.3)]
    keeper = LatestStatesKeeper(states_dir, policy=KeepBest("loss", 2) | KeepLatest(1))
    assert keeper.cleanup() == [huge, middle[0], middle[1]]
    assert {i.path for i in s.list_states()} == {tiny, middle[2]}
    worst = LatestStatesKeeper(states_dir, policy=KeepBest("loss", 1, mode="max"))
    assert worst.plan() == [tiny]


class _KeepAsStrings:
    """A user's policy that answers a list of str paths rather than a set of Paths."""

    def keep(self, states: Sequence[StateInfo], now: datetime) -> list[str]:
        return [str(s.path) for s in states[-2:]]


def test_a_policy_answering_str_paths_keeps_them(states_dir: Path) -> None:
    """Before: the kept states were compared as Paths, so every state a policy named as
    str was removed (all but the newest)."""
    s, _ = store(states_dir)
    paths = [s.save_state() for _ in range(4)]
    keeper = LatestStatesKeeper(states_dir, policy=_KeepAsStrings())  # type: ignore[arg-type]
    assert keeper.cleanup() == paths[:2]
    assert sorted(os.listdir(states_dir)) == sorted(p.name for p in paths[2:])
    paths += [s.save_state(), s.save_state()]
    combined = KeepLatest(1) | _KeepAsStrings()  # type: ignore[operator]
    assert LatestStatesKeeper(states_dir, policy=combined).cleanup() == paths[2:4]


def test_an_empty_path_reads_nothing_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    """``verify_state("")`` and ``load_state("")`` used to open
    ``/.statekeep-manifest.json``: "" joined to the manifest's name is a path in the
    filesystem's root. They now refuse before opening anything."""
    opened: list[str] = []
    real_open = os.open

    def recording(path: object, *args: object, **kw: object) -> int:
        opened.append(os.fsdecode(path))  # type: ignore[arg-type]
        return real_open(path, *args, **kw)  # type: ignore[arg-type]

    s, _ = store(Path(tempfile.mkdtemp(prefix="statekeep-adv-")))
    try:
        monkeypatch.setattr(os, "open", recording)
        with pytest.raises(FileNotFoundError, match="empty path"):
            verify_state("")
        with pytest.raises(FileNotFoundError, match="empty path"):
            s.load_state("")
        assert opened == []
    finally:
        monkeypatch.undo()
        shutil.rmtree(s.states_dir)


class TestKeeperIntervals:
    """An interval too long for a timed wait (``inf``, ``1e300``) means one pass, then
    waiting for ``stop()``; NaN is refused. Before: the background thread died of an
    ``OverflowError`` after its first pass (while the keeper still said it was running,
    so ``start()`` did nothing), and NaN made the loop spin."""

    @pytest.mark.parametrize("interval", [float("inf"), 1e300])
    def test_endless_interval(self, states_dir: Path, interval: float) -> None:
        s, _ = store(states_dir)
        for _ in range(3):
            s.save_state()
        died: list[BaseException] = []
        old_hook = threading.excepthook
        threading.excepthook = lambda args: died.append(args.exc_value)  # type: ignore[assignment,misc]
        try:
            keeper = LatestStatesKeeper(states_dir, max_keep=1, cleanup_interval=interval)
            keeper.start()
            thread = keeper._thread
            assert thread is not None
            deadline = time.monotonic() + 20
            while len(os.listdir(states_dir)) > 1 and time.monotonic() < deadline:
                thread.join(0.01)  # the first pass runs at once
            assert len(os.listdir(states_dir)) == 1
            thread.join(0.2)
            assert thread.is_alive(), f"the keeper thread died: {died}"
            keeper.stop()
            assert not thread.is_alive()
        finally:
            threading.excepthook = old_hook
        assert died == []

    def test_nan_is_refused(self, states_dir: Path) -> None:
        with pytest.raises(ValueError, match="cleanup_interval"):
            LatestStatesKeeper(states_dir, cleanup_interval=float("nan"))
