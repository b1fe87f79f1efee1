"""Publishing committed states to a remote and restoring them (statekeep._publish)."""

from __future__ import annotations

import io
import logging
import os
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from conftest import commit
from statekeep import (
    CorruptStateError,
    StateExistsError,
    StorageError,
    _atomic,
    _manifest,
    _publish,
    _remote_prune,
    _remote_seq,
    _remote_states,
    _restore,
)
from statekeep._manifest import Entry, Manifest
from statekeep.remote import DirectoryRemote, Remote, S3Remote

FILES = {
    "model.pt": os.urandom(70_000),
    "tree/a": b"a" * 10,
    "tree/sub/b": b"",
    "small": b"hello",
}


@pytest.fixture(params=["directory", "s3"])
def remote(request: pytest.FixtureRequest, tmp_path: Path) -> Remote:
    if request.param == "directory":
        return DirectoryRemote(tmp_path / "remote")
    bucket = request.getfixturevalue("s3_bucket")
    client = request.getfixturevalue("s3_client")
    return S3Remote(f"s3://{bucket}/pub", client=client)


@pytest.fixture
def dir_remote(tmp_path: Path) -> DirectoryRemote:
    return DirectoryRemote(tmp_path / "remote")


def local_entries(root: Path) -> list[str]:
    return sorted(n for n in os.listdir(root) if not _atomic.is_private(n))


def work_entries(root: Path) -> list[str]:
    return [n for n in os.listdir(root) if _atomic.is_private(n)]


class TestPublishRestore:
    """A published state comes back byte for byte, through the private commit path."""

    def test_round_trip(self, remote: Remote, tmp_path: Path) -> None:
        """Files, nested and empty ones, and the manifest itself are restored exactly."""
        state = commit(tmp_path / "a", FILES, "s1.state")
        rs = _publish.publish_state(remote, state)
        (found,), bad = _remote_states.read_remote_states(remote)
        assert bad == []
        assert found.name == "s1.state"
        assert found.raw == (state / _manifest.MANIFEST_NAME).read_bytes()
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        path = _restore.restore_state(remote, found, fresh, durable=True)
        assert path == fresh / "s1.state"
        for rel, data in FILES.items():
            assert (path / rel).read_bytes() == data
        assert _manifest.verify(path).sequence == rs.sequence
        assert local_entries(fresh) == ["s1.state"]
        assert work_entries(fresh) == []

    def test_large_file_in_ranges(self, remote: Remote, tmp_path: Path) -> None:
        """A file larger than a ranged part is downloaded in parts and verified whole."""
        big = os.urandom(2 * _restore.PART + 12345)
        state = commit(tmp_path / "a", {"big": big}, "big.state")
        rs = _publish.publish_state(remote, state)
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        assert (
            _restore.restore_state(remote, rs, fresh, durable=False) / "big"
        ).read_bytes() == big

    def test_manifest_is_last(self, dir_remote: DirectoryRemote, tmp_path: Path) -> None:
        """If the manifest cannot be written, no state is listed and the files are removed."""
        state = commit(tmp_path / "a", FILES, "s.state")
        seen: list[str] = []
        real_put = dir_remote.put_if_absent

        def put(key: str, source: object, size: int) -> None:
            seen.append(key)
            if key.startswith(_remote_states.STATES):
                raise StorageError("injected: the manifest PUT fails")
            real_put(key, source, size)  # type: ignore[arg-type]

        dir_remote.put_if_absent = put  # type: ignore[method-assign]
        with pytest.raises(StorageError, match="injected"):
            _publish.publish_state(dir_remote, state)
        assert seen[-1] == f"{_remote_states.STATES}s.state"
        assert len(seen) == 1 + len(FILES)
        assert _remote_states.read_remote_states(dir_remote) == ([], [])
        assert list(dir_remote.list("")) == []

    @pytest.mark.parametrize("failing", ["model.pt", "tree/a", "tree/sub/b", "small"])
    def test_a_failed_upload_in_any_thread_deletes_every_other(
        self, dir_remote: DirectoryRemote, tmp_path: Path, failing: str
    ) -> None:
        """Whichever file fails (the one the calling thread uploads or a pool thread's),
        the publish waits for every upload, deletes those that landed, leaves no thread."""
        state = commit(tmp_path / "a", FILES, "s.state")
        real_put = dir_remote.put_if_absent
        landed: list[str] = []

        def put(key: str, source: object, size: int) -> None:
            if key.endswith("/" + failing):
                raise StorageError(f"injected: the upload of {failing} fails")
            real_put(key, source, size)  # type: ignore[arg-type]
            landed.append(key)

        dir_remote.put_if_absent = put  # type: ignore[method-assign]
        with pytest.raises(StorageError, match="injected"):
            _publish.publish_state(dir_remote, state)
        assert len(landed) == len(FILES) - 1  # the others all ran to the end
        assert list(dir_remote.list("")) == []
        assert not [t for t in threading.enumerate() if t.name.startswith("statekeep-publish")]

    def test_small_puts_skip_the_continue_round_trip(
        self, s3_bucket: str, s3_client: Any, tmp_path: Path
    ) -> None:
        """On S3 each small file and the manifest go up in one request, without botocore's
        ``Expect: 100-continue`` (which waits a round trip before sending the body)."""
        remote = S3Remote(f"s3://{s3_bucket}/pub", client=s3_client)
        state = commit(tmp_path / "a", FILES, "s.state")
        sent: list[tuple[str, bool]] = []

        def record(request: Any, **_: Any) -> None:
            sent.append((request.url, "Expect" in request.headers))

        s3_client.meta.events.register_last("before-send.s3.PutObject", record)
        try:
            _publish.publish_state(remote, state)
        finally:
            s3_client.meta.events.unregister("before-send.s3.PutObject", record)
        assert len(sent) == len(FILES) + 1
        assert [url for url, expect in sent if expect] == []

    def test_local_damage_is_not_published(self, remote: Remote, tmp_path: Path) -> None:
        """A committed state whose file changed since is refused; nothing is published."""
        state = commit(tmp_path / "a", FILES, "s.state")
        (state / "small").write_bytes(b"HELLO")
        with pytest.raises(CorruptStateError, match="small"):
            _publish.publish_state(remote, state)
        assert list(remote.list("")) == []

    def test_two_publishers_one_name(self, remote: Remote, tmp_path: Path) -> None:
        """The second publisher of a name loses with StateExistsError; its files go again."""
        one = commit(tmp_path / "m1", {"x": b"one"}, "same.state")
        two = commit(tmp_path / "m2", {"x": b"two"}, "same.state")
        first = _publish.publish_state(remote, one)
        with pytest.raises(StateExistsError):
            _publish.publish_state(remote, two)
        (only,), _ = _remote_states.read_remote_states(remote)
        assert only.token == first.token
        assert [o.key for o in remote.list(_remote_states.DATA)] == [f"{first.data_prefix()}x"]


class TestDamage:
    """A damaged remote state is refused with a typed error and leaves nothing local."""

    def _published(self, remote: DirectoryRemote, tmp_path: Path) -> _remote_states.RemoteState:
        state = commit(tmp_path / "a", FILES, "s.state")
        return _publish.publish_state(remote, state)

    @pytest.mark.parametrize(
        ("damage", "message"),
        [
            (lambda p: p.write_bytes(b"\x00" + p.read_bytes()[1:]), "CRC-32"),
            (lambda p: p.write_bytes(p.read_bytes()[:-1]), "bytes, manifest says"),
            (lambda p: p.write_bytes(p.read_bytes() + b"!"), "more bytes"),
            (lambda p: p.unlink(), "does not exist"),
        ],
        ids=["flipped", "truncated", "extended", "missing"],
    )
    def test_damaged_file(
        self, dir_remote: DirectoryRemote, tmp_path: Path, damage: object, message: str
    ) -> None:
        """Each kind of damage to a data object is named; the states dir stays empty."""
        rs = self._published(dir_remote, tmp_path)
        damage(dir_remote.root / f"{rs.data_prefix()}model.pt")  # type: ignore[operator]
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        with pytest.raises(CorruptStateError, match=message):
            _restore.restore_state(dir_remote, rs, fresh, durable=False)
        assert local_entries(fresh) == []
        assert work_entries(fresh) == []

    def test_damaged_manifest_is_reported(
        self, dir_remote: DirectoryRemote, tmp_path: Path
    ) -> None:
        """A manifest object with a flipped byte is listed as bad, not as a state."""
        self._published(dir_remote, tmp_path)
        path = dir_remote.root / _remote_states.STATES / "s.state"
        raw = bytearray(path.read_bytes())
        raw[60] ^= 1
        path.write_bytes(bytes(raw))
        good, bad = _remote_states.read_remote_states(dir_remote)
        assert good == []
        assert [name for name, _ in bad] == ["s.state"]
        assert isinstance(bad[0][1], CorruptStateError)

    @pytest.mark.parametrize("path", ["../evil", "/abs", "a/../../b", _manifest.MANIFEST_NAME])
    def test_hostile_paths_in_a_manifest(self, path: str) -> None:
        """A sealed manifest naming a path outside the state is refused before any write."""
        manifest = Manifest(datetime.now(timezone.utc), 1, (Entry(path, False, 1, 0),))
        blob = _remote_states.encode_manifest("abc", manifest.to_bytes())
        with pytest.raises(CorruptStateError, match="malformed"):
            _remote_states.decode_manifest("x.state", blob, "here")

    def test_no_header(self) -> None:
        """Bytes that are not a statekeep remote manifest are refused."""
        with pytest.raises(CorruptStateError, match="header"):
            _remote_states.decode_manifest("x", b"garbage", "here")


class TestSequence:
    """Commit sequences are claimed on the remote: unique and above every claim."""

    def test_concurrent_claims_are_unique(self, dir_remote: DirectoryRemote) -> None:
        """Eight threads claiming 20 numbers each never get the same number twice."""
        got: list[int] = []
        errors: list[BaseException] = []
        barrier = threading.Barrier(8, timeout=30)

        def claim() -> None:
            try:
                barrier.wait()
                mine = [
                    _remote_seq.claim_sequence(DirectoryRemote(dir_remote.root), 1)
                    for _ in range(20)
                ]
                assert mine == sorted(mine)
                got.extend(mine)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=claim) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
            assert not t.is_alive()
        assert errors == []
        assert sorted(got) == list(range(1, 161))

    def test_claims_go_above_the_remote(self, dir_remote: DirectoryRemote) -> None:
        """A machine whose local counter is behind still claims above every remote claim."""
        assert _remote_seq.claim_sequence(dir_remote, 50) == 50
        assert _remote_seq.claim_sequence(dir_remote, 1) == 51
        assert _remote_seq.claim_sequence(dir_remote, 100) == 100

    def test_counter_orders_two_machines(self, dir_remote: DirectoryRemote, tmp_path: Path) -> None:
        """States committed alternately on two machines get increasing sequences."""
        from statekeep import _commit

        machines = [tmp_path / "m1", tmp_path / "m2"]
        counters = [_publish.Publisher(dir_remote, m, durable=False).counter() for m in machines]
        for m in machines:
            m.mkdir()
        seqs = []
        for i in range(6):
            root = machines[i % 2]
            with _commit.BuildDir(root, durable=False, counter=counters[i % 2]) as b:
                (b.path / "x").write_bytes(b"x")
                seqs.append(b.commit(root / f"{i}.state").sequence)
        assert seqs == sorted(seqs)
        assert len(set(seqs)) == 6


class TestPending:
    """A state whose publishing failed is published by the next save."""

    def test_failure_then_next_save(
        self, dir_remote: DirectoryRemote, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """StorageError says the state is committed locally; the next publish sends both."""
        root = tmp_path / "states"
        publisher = _publish.Publisher(dir_remote, root, durable=False)
        first = commit(root, {"x": b"1"}, "1.state")
        real_put = dir_remote.put_if_absent

        def down(key: str, source: object, size: int) -> None:
            raise StorageError("injected: remote down")

        dir_remote.put_if_absent = down  # type: ignore[method-assign]
        with pytest.raises(StorageError, match=r"committed locally.*next save publishes it"):
            publisher.publish(first)
        assert first.is_dir()
        dir_remote.put_if_absent = real_put  # type: ignore[method-assign]
        second = commit(root, {"x": b"2"}, "2.state")
        with caplog.at_level(logging.INFO, "statekeep"):
            publisher.publish(second)
        assert [s.name for s in publisher.states()] == ["1.state", "2.state"]
        assert "published pending state 1.state" in caplog.text

    def test_explicit_publish_pending(self, dir_remote: DirectoryRemote, tmp_path: Path) -> None:
        """publish_pending() publishes every local state the remote lacks, oldest first."""
        root = tmp_path / "states"
        for i in range(3):
            commit(root, {"x": b"%d" % i}, f"{i}.state")
        publisher = _publish.Publisher(dir_remote, root, durable=False)
        assert [p.name for p in publisher.publish_pending()] == ["0.state", "1.state", "2.state"]
        assert publisher.publish_pending() == []


class TestPrune:
    """Remote pruning: manifest first, never the newest that verifies, debris after grace."""

    def _publish(self, remote: Remote, tmp_path: Path, n: int) -> list[_remote_states.RemoteState]:
        root = tmp_path / "states"
        publisher = _publish.Publisher(remote, root, durable=False)
        counter = publisher.counter()
        from statekeep import _commit

        root.mkdir()
        out = []
        for i in range(n):
            with _commit.BuildDir(root, durable=False, counter=counter) as b:
                (b.path / "x").write_bytes(b"%d" % i)
                b.commit(root / f"{i}.state")
            out.append(_publish.publish_state(remote, root / f"{i}.state"))
        return out

    def test_keeps_newest(self, remote: Remote, tmp_path: Path) -> None:
        """max_keep=2 of 5 removes the three oldest, their files and old sequence markers."""
        states = self._publish(remote, tmp_path, 5)
        removed = _remote_prune.prune_remote(remote, 2)
        assert removed == ["0.state", "1.state", "2.state"]
        assert [s.name for s in _remote_states.read_remote_states(remote)[0]] == [
            "3.state",
            "4.state",
        ]
        data = {o.key for o in remote.list(_remote_states.DATA)}
        assert data == {f"{s.data_prefix()}x" for s in states[3:]}
        markers = [int(o.key[len(_remote_states.SEQ) :]) for o in remote.list(_remote_states.SEQ)]
        assert min(markers) >= states[3].sequence
        assert max(markers) == states[4].sequence

    def test_newest_that_verifies_stays(self, dir_remote: DirectoryRemote, tmp_path: Path) -> None:
        """With the newest state's files gone, max_keep=1 keeps the newest complete one."""
        states = self._publish(dir_remote, tmp_path, 3)
        dir_remote.delete([f"{states[2].data_prefix()}x"])
        removed = _remote_prune.prune_remote(dir_remote, 1)
        assert removed == ["0.state"]
        assert [s.name for s in _remote_states.read_remote_states(dir_remote)[0]] == [
            "1.state",
            "2.state",
        ]

    def test_orphans_after_grace(self, dir_remote: DirectoryRemote, tmp_path: Path) -> None:
        """Files whose manifest never arrived go only once older than the grace period."""
        self._publish(dir_remote, tmp_path, 1)
        orphan = f"{_remote_states.DATA}ghost.state/deadbeef/x"
        dir_remote.put_if_absent(orphan, io.BytesIO(b"x"), 1)
        _remote_prune.prune_remote(dir_remote, -1)
        assert orphan in {o.key for o in dir_remote.list(_remote_states.DATA)}
        later = datetime.now(timezone.utc) + timedelta(hours=2)
        _remote_prune.prune_remote(dir_remote, -1, now=later)
        assert orphan not in {o.key for o in dir_remote.list(_remote_states.DATA)}
        assert len(_remote_states.read_remote_states(dir_remote)[0]) == 1

    def test_counter_survives_removing_everything(self, remote: Remote, tmp_path: Path) -> None:
        """max_keep=0 removes every state but the highest marker: claims never go back."""
        states = self._publish(remote, tmp_path, 3)
        assert _remote_prune.prune_remote(remote, 0) == [s.name for s in states]
        assert _remote_states.read_remote_states(remote) == ([], [])
        assert [o.key for o in remote.list(_remote_states.SEQ)] == [
            _remote_seq.seq_key(states[-1].sequence)
        ]
        assert _remote_seq.claim_sequence(remote, 1) == states[-1].sequence + 1


class TestPullNewest:
    """A fresh machine pulls the newest remote state that verifies, skipping damaged ones."""

    def test_fallback_with_warning(
        self, remote: Remote, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A flipped byte in the newest remote state: the one before is pulled, with a warning."""
        root = tmp_path / "m1"
        publisher = _publish.Publisher(remote, root, durable=False)
        counter = publisher.counter()
        from statekeep import _commit

        root.mkdir()
        for i in range(3):
            with _commit.BuildDir(root, durable=False, counter=counter) as b:
                (b.path / "x").write_bytes(b"state %d" % i)
                b.commit(root / f"{i}.state")
            publisher.publish(root / f"{i}.state")
        newest = publisher.states()[-1]
        key = f"{newest.data_prefix()}x"
        data = bytearray(remote.get(key))
        data[3] ^= 0x20
        remote.delete([key])
        remote.put_if_absent(key, io.BytesIO(bytes(data)), len(data))
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        other = _publish.Publisher(remote, fresh, durable=True)
        with caplog.at_level(logging.WARNING, "statekeep"):
            path = other.pull_newest(0)
        assert path == fresh / "1.state"
        assert (path / "x").read_bytes() == b"state 1"
        assert f"{key} failed verification" in caplog.text
        assert "trying an older one" in caplog.text
        assert local_entries(fresh) == ["1.state"]
        assert other.pull_newest(_manifest.verify(path).sequence) is None


class TestHostileSizes:
    """Sizes a damaged or hostile remote claims never make a restore hang or balloon."""

    @pytest.mark.timeout(20)  # a restore that loops is stopped by pytest-timeout, not hung
    def test_manifest_claims_a_huge_file(self, dir_remote: DirectoryRemote, tmp_path: Path) -> None:
        """A sealed manifest saying a 1-byte object is 1 PB: a few GETs, then CorruptStateError."""
        calls: list[int] = []
        real_get = dir_remote.get

        def get(key: str, *, start: int = 0, length: int | None = None) -> bytes:
            calls.append(start)
            if len(calls) > 4 * _restore.WINDOW:  # fail at once rather than loop on
                raise AssertionError(f"unbounded: {len(calls)} GETs of a 1-byte object")
            return real_get(key, start=start, length=length)

        dir_remote.get = get  # type: ignore[method-assign]
        manifest = Manifest(datetime.now(timezone.utc), 1, (Entry("x", False, 1 << 50, 0),))
        rs = _remote_states.RemoteState("h.state", "tok", manifest, manifest.to_bytes())
        dir_remote.put_if_absent(f"{rs.data_prefix()}x", io.BytesIO(b"x"), 1)
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        with pytest.raises(CorruptStateError, match="manifest says 1125899906842624"):
            _restore.restore_state(dir_remote, rs, fresh, durable=False)
        assert len(calls) <= _restore.WINDOW
        assert local_entries(fresh) == []

    def test_huge_manifest_object_is_not_read(self, dir_remote: DirectoryRemote) -> None:
        """A manifest object above MAX_MANIFEST is reported damaged without a GET."""
        path = dir_remote.root / _remote_states.STATES
        path.mkdir(parents=True)
        with open(path / "big.state", "wb") as f:
            f.truncate(_remote_states.MAX_MANIFEST + 1)
        good, bad = _remote_states.read_remote_states(dir_remote)
        assert good == []
        assert "at most" in str(bad[0][1])
