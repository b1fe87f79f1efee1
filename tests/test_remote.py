"""The Remote protocol, run over both implementations: DirectoryRemote and S3Remote (SeaweedFS)."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest

from statekeep import StateExistsError, StorageError
from statekeep.remote import DirectoryRemote, Remote, S3Remote, open_remote

MiB = 1 << 20


@pytest.fixture(params=["directory", "s3"])
def make_remote(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Remote]:
    """A factory of handles on one fresh remote (each call: a new handle, same objects)."""
    if request.param == "directory":
        return lambda: DirectoryRemote(tmp_path / "remote")
    bucket = request.getfixturevalue("s3_bucket")
    server = request.getfixturevalue("s3_server")
    return lambda: S3Remote(f"s3://{bucket}/some/prefix", client=server.client(), part_size=5 * MiB)


@pytest.fixture
def remote(make_remote: Callable[[], Remote]) -> Remote:
    return make_remote()


def put(remote: Remote, key: str, data: bytes) -> None:
    remote.put_if_absent(key, io.BytesIO(data), len(data))


class TestPutGet:
    """Objects go in create-only and come back whole or by range."""

    def test_round_trip(self, remote: Remote) -> None:
        """A put object reads back byte for byte, and satisfies the protocol."""
        assert isinstance(remote, Remote)
        put(remote, "a/b/c.bin", b"hello world")
        assert remote.get("a/b/c.bin") == b"hello world"

    def test_empty_object(self, remote: Remote) -> None:
        """A zero-byte object exists and reads back empty, whole or by range."""
        put(remote, "empty", b"")
        assert remote.get("empty") == b""
        assert remote.get("empty", length=1) == b""
        assert [o.key for o in remote.list("empty")] == ["empty"]

    def test_ranges(self, remote: Remote) -> None:
        """A range is cut at the end of the object; a range past it is empty."""
        put(remote, "r", b"0123456789")
        assert remote.get("r", start=2, length=3) == b"234"
        assert remote.get("r", start=8, length=10) == b"89"
        assert remote.get("r", start=4) == b"456789"
        assert remote.get("r", start=10, length=5) == b""
        assert remote.get("r", start=50, length=5) == b""

    def test_second_put_loses_and_first_stays(self, remote: Remote) -> None:
        """put_if_absent never replaces: the loser gets StateExistsError."""
        put(remote, "k", b"first")
        with pytest.raises(StateExistsError, match="already exists"):
            put(remote, "k", b"second")
        assert remote.get("k") == b"first"

    def test_missing_is_file_not_found(self, remote: Remote) -> None:
        """A key that was never written is FileNotFoundError, not StorageError."""
        with pytest.raises(FileNotFoundError):
            remote.get("nope/never")

    def test_large_object_in_parts(self, remote: Remote) -> None:
        """An object above the part size goes up in parts and comes back whole."""
        data = os.urandom(11 * MiB + 7)
        put(remote, "big", data)
        assert remote.get("big") == data
        assert remote.get("big", start=5 * MiB - 3, length=10) == data[5 * MiB - 3 : 5 * MiB + 7]
        with pytest.raises(StateExistsError):
            put(remote, "big", data[:-1])
        assert remote.get("big") == data
        abort = getattr(remote, "abort_incomplete", None)
        assert abort is not None
        assert abort(timedelta(0)) == 0

    def test_short_source_is_an_error_and_leaves_nothing(self, remote: Remote) -> None:
        """A source that ends before ``size`` raises StorageError; the key stays absent."""
        with pytest.raises(StorageError, match="short"):
            remote.put_if_absent("short", io.BytesIO(b"abc"), 10)
        with pytest.raises(FileNotFoundError):
            remote.get("short")

    @pytest.mark.parametrize("key", ["", "/abs", "a//b", "a/../b", "..", "a/./b", "a\0b", "a\\b"])
    def test_bad_keys_are_refused(self, remote: Remote, key: str) -> None:
        """Keys that could address outside the remote raise ValueError naming the key."""
        with pytest.raises(ValueError, match="object key"):
            put(remote, key, b"x")
        with pytest.raises(ValueError, match="object key"):
            remote.get(key)


class TestListDelete:
    """Listing is by prefix, in key order, after a start key; deletes are batched."""

    def test_list_by_prefix_in_order(self, remote: Remote) -> None:
        """Only keys under the prefix are listed, sorted, with their sizes."""
        for key in ["s/b", "s/a/2", "s/a/1", "t/x", "s0"]:
            put(remote, key, key.encode())
        assert [(o.key, o.size) for o in remote.list("s/")] == [
            ("s/a/1", 5),
            ("s/a/2", 5),
            ("s/b", 3),
        ]
        assert [o.key for o in remote.list("s")] == ["s/a/1", "s/a/2", "s/b", "s0"]
        assert [o.key for o in remote.list("s/", start_after="s/a/1")] == ["s/a/2", "s/b"]
        assert list(remote.list("nothing/")) == []

    def test_list_pages(self, remote: Remote) -> None:
        """More keys than one S3 page (1000) are all listed."""
        if isinstance(remote, S3Remote):
            pytest.skip("1001 PUTs: the directory remote proves the walk; S3 paging is boto3's")
        for i in range(1001):
            put(remote, f"p/{i:05d}", b"")
        assert len(list(remote.list("p/"))) == 1001

    def test_delete_batch_and_missing(self, remote: Remote) -> None:
        """Deleting present and absent keys together removes the present ones, no error."""
        for i in range(5):
            put(remote, f"d/{i}", b"x")
        remote.delete([f"d/{i}" for i in range(3)] + ["d/none", "other/none"])
        assert [o.key for o in remote.list("d/")] == ["d/3", "d/4"]
        put(remote, "d/0", b"again")  # a deleted key can be created anew
        assert remote.get("d/0") == b"again"


class TestRaces:
    """Writers racing for one key: exactly one wins, whole."""

    def test_one_winner(self, make_remote: Callable[[], Remote]) -> None:
        """Eight threads (own handles) put one key, many rounds: one winner each round."""
        handles = [make_remote() for _ in range(8)]
        rounds = 25 if isinstance(handles[0], DirectoryRemote) else 6  # SeaweedFS: ~1 s a round
        for round_ in range(rounds):
            start = threading.Barrier(len(handles), timeout=30)
            wins: list[int] = []
            losses: list[int] = []
            errors: list[BaseException] = []
            key = f"race/{round_}"

            def race(i: int, r: Remote, start: threading.Barrier, key: str) -> None:
                try:
                    start.wait()
                    put(r, key, bytes([i]) * 1000)
                    wins.append(i)  # noqa: B023 - joined below, before the lists change
                except StateExistsError:
                    losses.append(i)  # noqa: B023
                except BaseException as exc:
                    errors.append(exc)  # noqa: B023

            threads = [
                threading.Thread(target=race, args=(i, r, start, key))
                for i, r in enumerate(handles)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
                assert not t.is_alive(), "a put hung"
            assert errors == [], errors
            assert len(wins) == 1
            assert len(losses) == 7
            assert handles[0].get(f"race/{round_}") == bytes([wins[0]]) * 1000
            assert handles[1].get(key) == bytes([wins[0]]) * 1000


class TestDirectoryRemote:
    """The directory implementation never leaves its directory, never shows a partial object."""

    def test_symlink_inside_is_not_followed(self, tmp_path: Path) -> None:
        """A directory replaced by a symlink to elsewhere: reads and writes refuse it."""
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "secret").write_bytes(b"secret")
        remote = DirectoryRemote(tmp_path / "remote")
        (tmp_path / "remote" / "link").symlink_to(outside)
        with pytest.raises(StorageError, match="symlink"):
            remote.get("link/secret")
        with pytest.raises(StorageError, match="symlink"):
            put(remote, "link/new", b"x")
        assert not (outside / "new").exists()
        assert list(remote.list("")) == []
        (tmp_path / "remote" / "file").symlink_to(outside / "secret")
        with pytest.raises(StorageError):
            remote.get("file")

    def test_no_temp_files_visible(self, tmp_path: Path) -> None:
        """Puts in progress are invisible to list; the reserved folder is not a key."""
        remote = DirectoryRemote(tmp_path / "remote")
        put(remote, "a", b"1")
        (tmp_path / "remote" / ".statekeep-incoming" / "x.tmp").write_bytes(b"partial")
        assert [o.key for o in remote.list("")] == ["a"]
        with pytest.raises(ValueError, match="reserved"):
            remote.get(".statekeep-incoming/x.tmp")
        assert remote.abort_incomplete(timedelta(hours=1)) == 0
        assert remote.abort_incomplete(timedelta(0)) == 1

    def test_delete_removes_emptied_directories(self, tmp_path: Path) -> None:
        """Deleting the last key of a folder removes the folder (no debris)."""
        remote = DirectoryRemote(tmp_path / "remote")
        put(remote, "x/y/z", b"1")
        remote.delete(["x/y/z"])
        assert sorted(os.listdir(tmp_path / "remote")) == [".statekeep-incoming"]


class TestS3Remote:
    """S3-specific: URLs, and a server that is not there."""

    @pytest.mark.parametrize("url", ["s3://", "s3:///x", "http://b/x", "s3://b/a/../c"])
    def test_bad_urls(self, url: str) -> None:
        """A URL without a bucket, or with a bad prefix, is a ValueError."""
        with pytest.raises(ValueError, match=r"s3://bucket/prefix|object key"):
            S3Remote(url, client=object())

    def test_server_down_is_storage_error(self) -> None:
        """Every operation against a closed port raises StorageError naming the object."""
        import boto3
        from botocore.config import Config

        import servers

        (port,) = servers.free_ports(1)
        client = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{port}",
            aws_access_key_id="x",
            aws_secret_access_key="y",
            region_name="us-east-1",
            config=Config(connect_timeout=1, retries={"max_attempts": 1}),
        )
        r = S3Remote("s3://bucket/pre", client=client)
        calls: list[Callable[[], Any]] = [
            lambda: put(r, "k", b"x"),
            lambda: r.get("k"),
            lambda: list(r.list("")),
            lambda: r.delete(["k"]),
        ]
        for call in calls:
            with pytest.raises(StorageError, match="s3://bucket/pre/"):
                call()

    def test_a_slow_part_does_not_hold_the_others_back(
        self, s3_server: Any, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With part 1 slow, the later parts go up meanwhile, out of order, and the
        object still completes whole (parts listed in order)."""
        remote = S3Remote(
            f"s3://{s3_bucket}/p", client=s3_server.client(), part_size=5 * MiB, max_in_flight=2
        )
        real = S3Remote._upload_part
        third_started = threading.Event()
        held: list[bool] = []

        def upload_part(self: S3Remote, full: str, upload_id: str, number: int, body: bytes) -> Any:
            if number == 3:
                third_started.set()
            if number == 1:  # held up on the network until part 3 is on its way
                held.append(third_started.wait(10))
            return real(self, full, upload_id, number, body)

        monkeypatch.setattr(S3Remote, "_upload_part", upload_part)
        data = os.urandom(20 * MiB + 3)  # 5 parts, at most 2 in flight
        put(remote, "big", data)
        assert remote.get("big") == data
        # part 2 ended while part 1 was held, and part 3 took its slot at once
        assert held == [True], "part 3 waited for part 1, the oldest, to end"


class TestOpenRemote:
    """open_remote picks the implementation from the URL."""

    def test_schemes(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A path or file:// is a directory; s3:// is S3; a Remote passes through."""
        assert isinstance(open_remote(tmp_path / "a"), DirectoryRemote)
        assert isinstance(open_remote(str(tmp_path / "b")), DirectoryRemote)
        d = open_remote(f"file://{tmp_path / 'c'}")
        assert isinstance(d, DirectoryRemote)
        assert d.root == tmp_path / "c"
        assert open_remote(d) is d
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        assert isinstance(open_remote("s3://bucket/x"), S3Remote)
        with pytest.raises(ValueError, match="unknown scheme 'gs'"):
            open_remote("gs://bucket/x")


class TestPublicFace:
    """statekeep.remote's names: sorted, documented, in the API page and the changelog."""

    def test_all_is_sorted_and_documented(self) -> None:
        """Every exported name has a docstring of its own."""
        import statekeep.remote as module

        assert module.__all__ == sorted(set(module.__all__))
        for name in module.__all__:
            obj = getattr(module, name)
            doc = vars(obj).get("__doc__") if isinstance(obj, type) else obj.__doc__
            assert (doc or "").strip(), f"{name} has no docstring"

    def test_api_page_and_changelog(self) -> None:
        """docs/api.md renders statekeep.remote; CHANGELOG.md names each class."""
        from test_exported_members import API_PAGE, CHANGELOG, documented_names

        assert "statekeep.remote" in documented_names(API_PAGE.read_text(encoding="utf-8"))
        changelog = CHANGELOG.read_text(encoding="utf-8")
        for name in ("Remote", "S3Remote", "DirectoryRemote", "open_remote"):
            assert f"`{name}" in changelog or f"{name}(" in changelog, name


class TestLayers:
    """The remote-snapshot modules import downwards only (each one job, no cycles)."""

    ALLOWED: ClassVar[dict[str, set[str]]] = {  # module -> remote-snapshot modules it imports
        "_remote_states": set(),
        "_restore": {"_remote_states"},
        "_remote_seq": {"_remote_states"},
        "_remote_prune": {"_remote_states"},
        "_publish": {"_remote_states", "_restore", "_remote_seq"},
        "_store": {"_publish"},
        "_keeper": {"_remote_prune"},
    }

    def test_arrows_point_down(self) -> None:
        import ast

        src = Path(__file__).parents[1] / "src" / "statekeep"
        for module, allowed in self.ALLOWED.items():
            tree = ast.parse((src / f"{module}.py").read_text(encoding="utf-8"))
            used: set[str] = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module:
                    if node.module == "statekeep":
                        used.update(a.name for a in node.names)
                    elif node.module.startswith("statekeep."):
                        used.add(node.module.split(".")[1])
            assert used & set(self.ALLOWED) <= allowed, (module, used & set(self.ALLOWED))
            assert "errors" in used or "_scan" in used, (module, used)  # the walk sees imports
            lines = (src / f"{module}.py").read_text(encoding="utf-8").count("\n")
            assert lines < 400 or module in ("_store", "_keeper"), (module, lines)


class TestFork:
    """An S3Remote that made its own client makes a new one in a forked child."""

    def test_child_gets_its_own_client(
        self, s3_server: Any, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The child lists through a client of its own; the parent's stays usable."""
        for key, value in s3_server.env().items():
            monkeypatch.setenv(key, value)
        remote = S3Remote(f"s3://{s3_bucket}/fork")
        put(remote, "k", b"parent")
        parent_client = remote.client
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through the pipe
            code = 1
            try:
                ok = remote.client is not parent_client and remote.get("k") == b"parent"
                code = 0 if ok else 2
            finally:
                os.write(w, bytes([code]))
                os._exit(0)
        os.close(w)
        try:
            _, status = os.waitpid(pid, 0)
            assert os.read(r, 1) == b"\x00"
        finally:
            os.close(r)
        assert os.WEXITSTATUS(status) == 0
        assert remote.client is parent_client
        assert remote.get("k") == b"parent"
