"""StateStore and LatestStatesKeeper with ``remote=``, on both remote implementations."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from statekeep import (
    LatestStatesKeeper,
    PersistentStateMixin,
    StateExistsError,
    StateStore,
    StorageError,
    _atomic,
    _remote_states,
    verify_state,
)
from statekeep._manifest import MANIFEST_NAME
from statekeep.remote import DirectoryRemote, Remote, S3Remote

ROOT = Path(__file__).resolve().parent.parent


class Value(PersistentStateMixin):
    def __init__(self, value: object = None) -> None:
        self.value = value

    def save_state(self, path: Path) -> None:
        path.write_text(json.dumps(self.value))

    def load_state(self, path: Path) -> None:
        self.value = json.loads(path.read_text())


@pytest.fixture(params=["directory", "s3"])
def make_remote(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Remote]:
    """New handles on one fresh remote."""
    if request.param == "directory":
        return lambda: DirectoryRemote(tmp_path / "remote")
    bucket = request.getfixturevalue("s3_bucket")
    server = request.getfixturevalue("s3_server")
    return lambda: S3Remote(f"s3://{bucket}/store", client=server.client())


def store_with(path: Path, remote: Remote, **kw: Any) -> tuple[StateStore, Value]:
    store = StateStore(path, remote=remote, **kw)
    value = Value()
    store.register("value", value)
    return store, value


class TestSaveAndRestore:
    """Saves are published; a fresh machine restores exactly the last one."""

    def test_fresh_machine(self, make_remote: Callable[[], Remote], tmp_path: Path) -> None:
        """An empty states_dir loads the newest remote state, committed locally."""
        store, value = store_with(tmp_path / "m1", make_remote())
        for i in range(3):
            value.value = i
            last = store.save_state(metadata={"i": i})
        fresh, got = store_with(tmp_path / "m2", make_remote())
        assert [s.location for s in fresh.list_states()] == ["remote"] * 3
        assert fresh.latest_state() == tmp_path / "m2" / last.name
        assert fresh.load_latest_state() == tmp_path / "m2" / last.name
        assert got.value == 2
        listing = fresh.list_states()
        assert [s.location for s in listing] == ["remote", "remote", "both"]
        assert [s.metadata for s in listing] == [{"i": 0}, {"i": 1}, {"i": 2}]
        assert sorted(os.listdir(tmp_path / "m2")) == [last.name]

    def test_flipped_byte_falls_back(
        self,
        make_remote: Callable[[], Remote],
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """A flipped byte in the newest remote state: the one before loads, with a warning."""
        remote = make_remote()
        store, value = store_with(tmp_path / "m1", remote, state_name_format="s%f.state")
        for i in range(2):
            value.value = f"value {i}"
            store.save_state()
        newest = _remote_states.read_remote_states(remote)[0][-1]
        key = f"{newest.data_prefix()}value"
        data = bytearray(remote.get(key))
        data[2] ^= 1
        remote.delete([key])
        remote.put_if_absent(key, io.BytesIO(bytes(data)), len(data))
        fresh, got = store_with(tmp_path / "m2", make_remote())
        with caplog.at_level(logging.WARNING, "statekeep"):
            loaded = fresh.load_latest_state()
        assert got.value == "value 0"
        assert loaded is not None
        assert loaded.name != newest.name
        assert "failed verification" in caplog.text
        assert "trying an older one" in caplog.text

    def test_name_taken_by_another_machine(
        self, make_remote: Callable[[], Remote], tmp_path: Path
    ) -> None:
        """Two machines saving one name: the second gets StateExistsError, keeps its local."""
        a, _ = store_with(tmp_path / "a", make_remote(), state_name_format="fixed.state")
        b, _ = store_with(tmp_path / "b", make_remote(), state_name_format="fixed.state")
        a.save_state()
        with pytest.raises(StateExistsError, match=r"already\s+published"):
            b.save_state()
        assert (tmp_path / "b" / "fixed.state").is_dir()
        assert [s.location for s in b.list_states()] == ["both"]

    def test_remote_down_then_next_save(self, tmp_path: Path) -> None:
        """Publishing fails: StorageError, the state committed; the next save publishes it."""
        remote = DirectoryRemote(tmp_path / "remote")
        store, _ = store_with(tmp_path / "m1", remote, state_name_format="s%f.state")
        real = remote.put_if_absent

        def down(key: str, source: object, size: int) -> None:
            raise StorageError("injected: the remote is down")

        remote.put_if_absent = down  # type: ignore[method-assign]
        with pytest.raises(StorageError, match="committed locally"):
            first = store.save_state()
        first = store.list_states()[-1].path
        assert first.is_dir()
        assert store.list_states()[-1].location == "local"
        remote.put_if_absent = real  # type: ignore[method-assign]
        second = store.save_state()
        listing = store.list_states()
        assert [(s.path, s.location) for s in listing] == [(first, "both"), (second, "both")]
        assert listing[0].sequence < listing[1].sequence


class TestKeeperWithRemote:
    """The keeper prunes the remote by the local rules."""

    def test_prunes_remote(self, make_remote: Callable[[], Remote], tmp_path: Path) -> None:
        """max_keep=2: two states stay locally and remotely; manifests of the rest are gone."""
        remote = make_remote()
        store, value = store_with(tmp_path / "m1", remote, state_name_format="s%f.state")
        saved = []
        for i in range(5):
            value.value = i
            saved.append(store.save_state())
        keeper = LatestStatesKeeper(tmp_path / "m1", "s*.state", max_keep=2, remote=remote)
        keeper.cleanup()
        remote_names = [s.name for s in _remote_states.read_remote_states(remote)[0]]
        assert remote_names == [p.name for p in saved[-2:]]
        assert [s.location for s in store.list_states()] == ["both", "both"]
        kept = {o.key.split("/")[1] for o in remote.list(_remote_states.DATA)}
        assert kept == set(remote_names)

    def test_plan_remote_names_what_cleanup_removes(
        self, make_remote: Callable[[], Remote], tmp_path: Path
    ) -> None:
        """plan_remote() removes nothing and names exactly the remote states cleanup() removes,
        a remote-only one included (which plan(), local paths only, cannot name)."""
        remote = make_remote()
        store, value = store_with(tmp_path / "m1", remote, state_name_format="s%f.state")
        saved = []
        for i in range(4):
            value.value = i
            saved.append(store.save_state())
        shutil.rmtree(saved[0])  # now only on the remote
        keeper = LatestStatesKeeper(tmp_path / "m1", "s*.state", max_keep=2, remote=remote)
        before = [s.name for s in _remote_states.read_remote_states(remote)[0]]
        planned = keeper.plan_remote()
        assert planned == [saved[0].name, saved[1].name]
        assert keeper.plan() == [saved[1]]
        assert [s.name for s in _remote_states.read_remote_states(remote)[0]] == before
        keeper.cleanup()
        after = [s.name for s in _remote_states.read_remote_states(remote)[0]]
        assert sorted(set(before) - set(after)) == sorted(planned)  # %f names do not sort
        assert LatestStatesKeeper(tmp_path / "m1", max_keep=2).plan_remote() == []


class TestFreshProcess:
    """Restore on a fresh machine (new dir, new process) gives exactly the last save."""

    @pytest.mark.parametrize("kind", ["directory", "s3"])
    def test_new_process(
        self,
        tmp_path: Path,
        worker_env: dict[str, str],
        kind: str,
        request: pytest.FixtureRequest,
    ) -> None:
        remote = str(tmp_path / "remote")
        extra: dict[str, str] = {}
        if kind == "s3":
            remote = f"s3://{request.getfixturevalue('s3_bucket')}/fresh"
            extra = request.getfixturevalue("s3_server").env()
        code = (
            "import json, sys\n"
            "from statekeep import StateStore\n"
            "sys.path.insert(0, sys.argv[3])\n"
            "from test_remote_store import Value\n"
            "store = StateStore(sys.argv[1], remote=sys.argv[2])\n"
            "v = Value()\n"
            "store.register('value', v)\n"
            "if sys.argv[4] == 'save':\n"
            "    for i in range(5):\n"
            "        v.value = {'step': i}\n"
            "        print(store.save_state().name)\n"
            "else:\n"
            "    p = store.load_latest_state()\n"
            "    print(p.name, json.dumps(v.value))\n"
        )
        env = {**worker_env, **extra, "PYTHONPATH": f"{ROOT / 'src'}"}
        tests = str(ROOT / "tests")
        saved = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / "a"), remote, tests, "save"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=True,
        ).stdout.split()
        out = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / "b"), remote, tests, "load"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=True,
        ).stdout.split(" ", 1)
        assert out[0] == saved[-1]
        assert json.loads(out[1]) == {"step": 4}


class TestDocs:
    """The page's code blocks and the example run as shown."""

    def test_example(
        self,
        make_remote: Callable[[], Remote],
        request: pytest.FixtureRequest,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """examples/lose_the_machine.py restores step 3, on a directory and on S3."""
        sys.path.insert(0, str(ROOT / "examples"))
        try:
            import lose_the_machine
        finally:
            sys.path.remove(str(ROOT / "examples"))
        remote = make_remote()
        url = remote.url if isinstance(remote, S3Remote) else None
        if url is not None:
            for k, v in request.getfixturevalue("s3_server").env().items():
                monkeypatch.setenv(k, v)
        assert lose_the_machine.main(url) == 3


class TestKeeperRemoteDown:
    """A remote that fails does not stop the keeper's local pass, and is logged."""

    def test_local_pass_still_runs(self, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
        remote = DirectoryRemote(tmp_path / "remote")
        store, value = store_with(tmp_path / "m1", remote, state_name_format="s%f.state")
        for i in range(3):
            value.value = i
            store.save_state()

        def down(prefix: str, *, start_after: str = "") -> Any:
            raise StorageError("injected: the remote is down")

        remote.list = down  # type: ignore[method-assign]
        keeper = LatestStatesKeeper(tmp_path / "m1", "s*.state", max_keep=1, remote=remote)
        with caplog.at_level(logging.ERROR, "statekeep"):
            assert len(keeper.cleanup()) == 2
        assert "could not prune" in caplog.text
        assert "injected" in caplog.text


def _down_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "could not consult remote" in r.getMessage()
    ]


class TestRemoteDown:
    """A remote that cannot be reached never stops a local resume."""

    @pytest.mark.timeout(120)
    def test_s3_server_killed(
        self, own_s3_server: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Server SIGKILLed: the restarted program loads its newest local state, lists the
        local states (one warning), a save commits locally and raises StorageError naming
        it; with the server back, the next save publishes both."""
        bucket = own_s3_server.new_bucket()
        url = f"s3://{bucket}/down"
        store, value = store_with(
            tmp_path / "m",
            S3Remote(url, client=own_s3_server.client()),
            state_name_format="s%f.state",
        )
        for i in range(2):
            value.value = i
            last = store.save_state()
        own_s3_server.kill()
        again, got = store_with(
            tmp_path / "m",
            S3Remote(url, client=own_s3_server.client(connect_timeout=1)),
            state_name_format="s%f.state",
        )
        with caplog.at_level(logging.WARNING, "statekeep"):
            assert again.load_latest_state() == last
            assert got.value == 1
            listing = again.list_states()
            assert again.latest_state() == last
            assert again.list_states() == listing
        assert [s.location for s in listing] == ["local", "local"]
        warned = _down_warnings(caplog)
        assert len(warned) == 1, warned
        assert "S3 list" in warned[0]
        got.value = 2
        with pytest.raises(StorageError, match="committed locally") as info:
            again.save_state()
        third = again.list_states()[-1].path
        assert str(third) in str(info.value)
        own_s3_server.start()
        fourth = again.save_state()
        assert [(s.path, s.location) for s in again.list_states()][-2:] == [
            (third, "both"),
            (fourth, "both"),
        ]
        own_s3_server.kill()  # a second outage is logged again
        caplog.clear()
        with caplog.at_level(logging.WARNING, "statekeep"):
            assert [s.location for s in again.list_states()] == ["local"] * 4
        assert len(_down_warnings(caplog)) == 1

    def test_directory_remote_failing(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Every remote read fails (a network disk gone): local load and listing go on; a
        damaged newer local copy does not make the load ask the remote again."""
        store, value = store_with(
            tmp_path / "m", DirectoryRemote(tmp_path / "r"), state_name_format="s%f.state"
        )
        value.value = "kept"
        last = store.save_state()
        value.value = "newer"
        damaged = store.save_state()
        (damaged / "value").write_text('"x"')
        remote = DirectoryRemote(tmp_path / "r")
        calls: list[str] = []

        def down(prefix: str, *, start_after: str = "") -> Any:
            calls.append(prefix)
            raise StorageError(5, "injected: the network disk is gone")

        remote.list = down  # type: ignore[method-assign]
        again, got = store_with(tmp_path / "m", remote)
        with caplog.at_level(logging.WARNING, "statekeep"):
            assert again.load_latest_state() == last
            assert len(calls) == 1, calls  # one failed request per load, not one per state
            assert [s.location for s in again.list_states()] == ["local", "local"]
        assert got.value == "kept"
        assert len(_down_warnings(caplog)) == 1
        assert "network disk is gone" in _down_warnings(caplog)[0]


class TestDamagedLocalCopy:
    """A local copy that fails verification does not hide a good remote copy."""

    def test_damaged_file_is_replaced(
        self, make_remote: Callable[[], Remote], tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        store, value = store_with(tmp_path / "m", make_remote(), state_name_format="s%f.state")
        for i in range(2):
            value.value = f"value {i}"
            last = store.save_state()
        (last / "value").write_text('"value X"')  # same size, other bytes
        again, got = store_with(tmp_path / "m", make_remote(), state_name_format="s%f.state")
        with caplog.at_level(logging.WARNING, "statekeep"):
            assert again.load_latest_state() == last
        assert got.value == "value 1"
        assert "replaced it by its remote copy" in caplog.text
        verify_state(last)
        assert [s.location for s in again.list_states()] == ["both", "both"]
        assert sorted(os.listdir(tmp_path / "m")) == sorted(
            s.path.name for s in again.list_states()
        )

    def test_damaged_manifest_is_listed_remote_and_replaced(
        self, make_remote: Callable[[], Remote], tmp_path: Path
    ) -> None:
        store, value = store_with(tmp_path / "m", make_remote(), state_name_format="s%f.state")
        for i in range(2):
            value.value = i
            last = store.save_state()
        (last / MANIFEST_NAME).write_bytes(b"garbage")
        again, got = store_with(tmp_path / "m", make_remote(), state_name_format="s%f.state")
        listing = again.list_states()
        assert [(s.path, s.location) for s in listing][-1] == (last, "remote")
        assert again.latest_state() == last
        assert again.load_latest_state() == last
        assert got.value == 1
        verify_state(last)
        assert again.list_states()[-1].location == "both"

    def test_a_reader_of_the_damaged_copy_does_not_block_its_repair(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Where the kernel cannot exchange two directories (macOS), the damaged copy is
        removed, then the good one renamed in: another loader reading the damaged copy
        at that moment must not make this load give up on it and load an older state."""
        monkeypatch.setattr(_atomic, "_exchange", lambda src, dst: False)
        remote = DirectoryRemote(tmp_path / "r")
        store, value = store_with(tmp_path / "m", remote, state_name_format="s%f.state")
        for i in range(2):
            value.value = f"value {i}"
            last = store.save_state()
        (last / "value").write_text('"value X"')
        again, got = store_with(tmp_path / "m", DirectoryRemote(tmp_path / "r"))
        with _atomic.Pin(str(last)) as other_loader:  # what another load_state holds
            assert other_loader.held
            assert again.load_latest_state() == last
        assert got.value == "value 1"
        verify_state(last)

    def test_the_repaired_state_is_not_locked_while_the_damaged_copy_goes(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        remote = DirectoryRemote(tmp_path / "r")
        store, value = store_with(tmp_path / "m", remote, state_name_format="s%f.state")
        value.value = "good"
        last = store.save_state()
        (last / "value").write_text('"bad!"')
        real = _atomic.remove_tree
        held: list[bool] = []

        def remove_tree(path: str | os.PathLike[str]) -> bool:
            if os.path.basename(path).startswith(_atomic.PREFIX):  # the damaged copy
                with _atomic.Pin(str(last)) as another_load:
                    held.append(another_load.held)
            return real(path)

        monkeypatch.setattr(_atomic, "remove_tree", remove_tree)
        again, got = store_with(tmp_path / "m", DirectoryRemote(tmp_path / "r"))
        assert again.load_latest_state() == last
        assert got.value == "good"
        assert held
        assert all(held), held

    @pytest.mark.timeout(120)
    def test_two_loaders_repair_at_once(self, tmp_path: Path) -> None:
        """Two stores on one directory load while its newest copy is damaged, 30 rounds:
        both load the newest value, nothing raises, one good copy is left."""
        remote = DirectoryRemote(tmp_path / "r")
        store, value = store_with(tmp_path / "m", remote, state_name_format="s%f.state")
        value.value = "old"
        store.save_state()
        for round_ in range(30):
            value.value = f"new {round_}"
            last = store.save_state()
            (last / "value").write_text('"x"')
            loaders = [store_with(tmp_path / "m", DirectoryRemote(tmp_path / "r")) for _ in "ab"]
            barrier = threading.Barrier(2, timeout=30)
            results: list[object] = []

            def load(
                s: StateStore, barrier: threading.Barrier = barrier, results: list[object] = results
            ) -> None:
                barrier.wait()
                try:
                    results.append(s.load_latest_state())
                except BaseException as exc:  # reported below, with the round
                    results.append(exc)

            threads = [threading.Thread(target=load, args=(s,)) for s, _ in loaders]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert not any(t.is_alive() for t in threads), round_
            assert results == [last, last], round_
            assert [v.value for _, v in loaders] == [f"new {round_}"] * 2, round_
            verify_state(last)
            assert not [n for n in os.listdir(tmp_path / "m") if n.startswith(".")], round_

    def test_remote_copy_damaged_too(
        self, make_remote: Callable[[], Remote], tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Both copies bad: the older state loads, the damaged local one is left as it was."""
        remote = make_remote()
        store, value = store_with(tmp_path / "m", remote, state_name_format="s%f.state")
        for i in range(2):
            value.value = f"value {i}"
            last = store.save_state()
        (last / "value").write_text('"value X"')
        newest = _remote_states.read_remote_states(remote)[0][-1]
        key = f"{newest.data_prefix()}value"
        remote.delete([key])
        remote.put_if_absent(key, io.BytesIO(b'"value Y"'), 9)
        again, got = store_with(tmp_path / "m", make_remote(), state_name_format="s%f.state")
        with caplog.at_level(logging.WARNING, "statekeep"):
            loaded = again.load_latest_state()
        assert loaded is not None
        assert loaded != last
        assert got.value == "value 0"
        assert (last / "value").read_text() == '"value X"'
        assert "cannot replace damaged" in caplog.text
