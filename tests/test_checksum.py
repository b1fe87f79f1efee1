"""Reading files for the manifest: one-pass CRC-32, small reads and directory scans."""

from __future__ import annotations

import errno
import os
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import statekeep
from statekeep import _checksum

HANG = 10.0  # seconds after which a read that has not returned counts as hung


class TestChecksumFile:
    """Size and CRC-32 of a file in one pass, whatever its size."""

    @pytest.mark.parametrize(
        "size", [0, 1, _checksum.FIRST - 1, _checksum.FIRST, _checksum.FIRST + _checksum.CHUNK]
    )
    @pytest.mark.parametrize("sync", [False, True])
    def test_matches_zlib(self, tmp_path: Path, size: int, sync: bool) -> None:
        data = os.urandom(size)
        (tmp_path / "f").write_bytes(data)
        assert _checksum.checksum_file(str(tmp_path / "f"), sync=sync) == (size, zlib.crc32(data))

    def test_does_not_follow_a_symlink(self, tmp_path: Path) -> None:
        (tmp_path / "target").write_bytes(b"x")
        (tmp_path / "link").symlink_to(tmp_path / "target")
        with pytest.raises(OSError, match="link"):
            _checksum.checksum_file(str(tmp_path / "link"), sync=False)


class TestReadAll:
    """A small or large file comes back whole."""

    @pytest.mark.parametrize("size", [0, 10, _checksum.FIRST, 3 * _checksum.FIRST + 5])
    def test_whole(self, tmp_path: Path, size: int) -> None:
        data = os.urandom(size)
        (tmp_path / "f").write_bytes(data)
        assert _checksum.read_all(str(tmp_path / "f")) == data


class TestReadAllGrowing:
    """A file that grew between the fstat and the read still comes back whole."""

    def test_grew(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        data = os.urandom(3 * _checksum.CHUNK + 11)
        (tmp_path / "f").write_bytes(data)
        real_fstat = os.fstat

        def stale_fstat(fd: int) -> os.stat_result:
            st = real_fstat(fd)
            fields = list(st)
            fields[6] = 100  # st_size as it was before the file grew
            return os.stat_result(fields)

        monkeypatch.setattr(os, "fstat", stale_fstat)
        assert _checksum.read_all(str(tmp_path / "f")) == data


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z").write_bytes(b"")
    (tmp_path / "b" / "a").mkdir()
    (tmp_path / "a").write_bytes(b"1")
    (tmp_path / "skip").write_bytes(b"")
    (tmp_path / "link").symlink_to(tmp_path / "a")
    return tmp_path


class TestScans:
    """scan lists parents first by name; kinds types every entry without a stat each."""

    def test_scan_order(self, tree: Path) -> None:
        got = [rel for rel, _ in _checksum.scan(str(tree))]
        assert got == ["a", "b", "b/a", "b/z", "link", "skip"]

    def test_kinds(self, tree: Path) -> None:
        assert _checksum.kinds(str(tree), "skip") == {
            "a": 1,
            "b": 2,
            "b/a": 2,
            "b/z": 1,
            "link": 0,
        }


def _returns_within(call: Callable[[], object], unblock: Callable[[], None]) -> BaseException:
    """Run ``call`` in a thread; fail the test if it hangs. Returns what it raised."""
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HANG)
    if thread.is_alive():
        unblock()  # let the stuck thread go before failing
        thread.join(HANG)
        pytest.fail(f"{call} blocked for {HANG} s")
    assert outcome, f"{call} returned instead of refusing"
    return outcome[0]


READERS = {
    "read_all": lambda p: _checksum.read_all(p),
    "checksum_file": lambda p: _checksum.checksum_file(p, sync=False),
    "checksum_file_expect": lambda p: _checksum.checksum_file(p, sync=True, expect=1 << 30),
}


class TestSpecialFiles:
    """A FIFO, device, directory or symlink where a file should be: refused, never blocks."""

    @pytest.mark.parametrize("reader", sorted(READERS))
    def test_fifo_is_refused_without_blocking(self, tmp_path: Path, reader: str) -> None:
        fifo = str(tmp_path / "manifest")
        os.mkfifo(fifo)

        def unblock() -> None:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

        exc = _returns_within(lambda: READERS[reader](fifo), unblock)
        assert isinstance(exc, _checksum.NotRegularFileError), exc
        assert exc.errno == errno.EINVAL
        assert fifo in str(exc)
        assert "FIFO" in str(exc)

    def test_fifo_with_a_writer_is_refused(self, tmp_path: Path) -> None:
        fifo = str(tmp_path / "f")
        os.mkfifo(fifo)
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so the writer's open succeeds
        writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        try:
            exc = _returns_within(lambda: _checksum.read_all(fifo), lambda: None)
        finally:
            os.close(writer)
            os.close(reader)
        assert isinstance(exc, _checksum.NotRegularFileError)

    @pytest.mark.parametrize("reader", sorted(READERS))
    def test_device_is_refused(self, reader: str) -> None:
        with pytest.raises(_checksum.NotRegularFileError, match=r"character device.*/dev/null"):
            READERS[reader]("/dev/null")

    @pytest.mark.parametrize("reader", sorted(READERS))
    def test_directory_is_refused(self, tmp_path: Path, reader: str) -> None:
        with pytest.raises(IsADirectoryError):
            READERS[reader](str(tmp_path))

    @pytest.mark.parametrize("reader", sorted(READERS))
    def test_symlink_is_not_followed(self, tmp_path: Path, reader: str) -> None:
        (tmp_path / "target").write_bytes(b"outside")
        (tmp_path / "link").symlink_to(tmp_path / "target")
        with pytest.raises(OSError, match="link") as info:
            READERS[reader](str(tmp_path / "link"))
        assert info.value.errno == errno.ELOOP


DEPTH = 1100  # deeper than Python's default recursion limit of 1000


def _deep(root: Path) -> str:
    """A chain of DEPTH directories below ``root``, a file at the bottom; its relpath."""
    rel = "/".join(["d"] * DEPTH)
    path = str(root)
    for _ in range(DEPTH):  # os.makedirs recurses once per level
        path += "/d"
        os.mkdir(path)
    with open(f"{path}/leaf", "wb") as f:
        f.write(b"bottom")
    return f"{rel}/leaf"


def _remove_tree(top: Path) -> None:
    """Remove ``top`` bottom-up with an explicit stack: pytest's own clean-up of its temp
    dirs (shutil.rmtree, recursive before Python 3.12) would fail on a deep tree."""
    stack = [(str(top), False)]
    while stack:
        path, emptied = stack.pop()
        if emptied:
            os.rmdir(path)
            continue
        stack.append((path, True))
        with os.scandir(path) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    stack.append((entry.path, False))
                else:
                    os.unlink(entry.path)


@pytest.fixture
def deep_root(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "deep"
    root.mkdir()
    yield root
    _remove_tree(root)


class TestDeepTrees:
    """A tree deeper than the recursion limit is scanned, saved and verified."""

    def test_scan(self, deep_root: Path) -> None:
        tmp_path = deep_root
        leaf = _deep(tmp_path)
        got = [rel for rel, _ in _checksum.scan(str(tmp_path))]
        assert len(got) == DEPTH + 1
        assert got[-1] == leaf
        assert got == sorted(got, key=len)  # parents first
        assert set(_checksum.kinds(str(tmp_path), "")) == set(got)

    def test_save_and_verified_load(self, deep_root: Path) -> None:
        tmp_path = deep_root

        class Deep(statekeep.PersistentStateMixin):
            loaded = b""

            def save_state(self, path: Path) -> None:
                path.mkdir()
                _deep(path)

            def load_state(self, path: Path) -> None:
                self.loaded = (path / _deep_rel()).read_bytes()

        store = statekeep.StateStore(tmp_path / "states")
        component = Deep()
        store.register("tree", component)
        saved = store.save_state()
        store.load_state(saved)  # verify=True reads the whole tree against the manifest
        assert component.loaded == b"bottom"


def _deep_rel() -> str:
    return "/".join(["d"] * DEPTH) + "/leaf"


class TestFsyncBesideTheRead:
    """The fsync thread of a large durable checksum never outlives the file's fd."""

    def test_read_failure_joins_the_fsync_thread(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        path = tmp_path / "big"
        path.write_bytes(os.urandom(_checksum._PARALLEL_SYNC + _checksum.CHUNK))
        real_fsync, real_close = os.fsync, os.close
        read_failed, closed = threading.Event(), threading.Event()
        watched: list[int] = []
        seen: list[str] = []

        def readv(fd: int, buffers: list[bytearray]) -> int:
            watched.append(fd)
            read_failed.set()
            raise OSError(errno.EIO, "injected read error")

        def close(fd: int) -> None:
            if watched and fd == watched[0]:
                closed.set()
            real_close(fd)

        def fsync(fd: int) -> None:
            read_failed.wait(HANG)
            # Closed already? Then this fsync would hit whatever file reuses the fd.
            seen.append("closed before fsync" if closed.wait(0.2) else "fd still open")
            real_fsync(fd)

        monkeypatch.setattr(os, "readv", readv)
        monkeypatch.setattr(os, "close", close)
        monkeypatch.setattr(os, "fsync", fsync)
        with pytest.raises(OSError, match="injected read error"):
            _checksum.checksum_file(str(path), sync=True)
        monkeypatch.undo()
        assert seen == ["fd still open"]
        assert not [t for t in threading.enumerate() if t.name == "statekeep-fsync"]


class TestCrc32Combine:
    """The CRC-32 of two pieces joined, from the pieces' CRCs and the second's length."""

    @pytest.mark.parametrize(
        ("la", "lb"), [(0, 0), (1, 0), (0, 1), (5, 7), (1000, 12345), (1 << 16, (3 << 16) + 7)]
    )
    def test_matches_zlib(self, la: int, lb: int) -> None:
        a, b = os.urandom(la), os.urandom(lb)
        got = _checksum.crc32_combine(zlib.crc32(a), zlib.crc32(b), lb)
        assert got == zlib.crc32(a + b)


@pytest.fixture
def parallel(monkeypatch: pytest.MonkeyPatch) -> int:
    """Split every file of 64 KiB or more into 3 parts, whatever the CPU count."""
    monkeypatch.setattr(_checksum, "PARALLEL_MIN", 1 << 16)
    monkeypatch.setattr(_checksum, "_parts", lambda: 3)
    return 3


class TestParallelPass:
    """A large file is checksummed in parts on threads; the result is the whole file's."""

    @pytest.mark.parametrize(
        "size", [1 << 16, (1 << 16) + 1, 3 * _checksum.CHUNK + 2, _checksum._PARALLEL_SYNC + 7]
    )
    @pytest.mark.parametrize("sync", [False, True])
    def test_matches_zlib(self, tmp_path: Path, parallel: int, size: int, sync: bool) -> None:
        data = os.urandom(size)
        (tmp_path / "f").write_bytes(data)
        got = _checksum.checksum_file(str(tmp_path / "f"), sync=sync, expect=size)
        assert got == (size, zlib.crc32(data))
        assert not [t for t in threading.enumerate() if t.name.startswith("statekeep-")]

    def _run(self, path: Path, told: int) -> tuple[int, int]:
        fd = os.open(path, os.O_RDONLY)
        try:
            return _checksum._crc_parallel(str(path), fd, told, 3)
        finally:
            os.close(fd)

    def test_file_that_grew_since_the_fstat_is_read_to_its_end(self, tmp_path: Path) -> None:
        data = os.urandom(3 * _checksum.CHUNK + 5)
        (tmp_path / "f").write_bytes(data)
        assert self._run(tmp_path / "f", len(data) - _checksum.CHUNK - 3) == (
            len(data),
            zlib.crc32(data),
        )

    def test_file_that_shrank_since_the_fstat_ends_where_it_ends(self, tmp_path: Path) -> None:
        data = os.urandom(3 * _checksum.CHUNK + 5)
        (tmp_path / "f").write_bytes(data)
        assert self._run(tmp_path / "f", len(data) + 2 * _checksum.CHUNK) == (
            len(data),
            zlib.crc32(data),
        )

    def test_path_now_naming_another_file_is_not_read(self, tmp_path: Path) -> None:
        data = os.urandom(2 * _checksum.CHUNK)
        path = tmp_path / "f"
        path.write_bytes(data)
        fd = os.open(path, os.O_RDONLY)
        try:
            path.unlink()
            path.write_bytes(os.urandom(len(data)))  # same name, other bytes
            got = _checksum._crc_parallel(str(path), fd, len(data), 3)
        finally:
            os.close(fd)
        assert got == (len(data), zlib.crc32(data))

    def test_a_failed_part_is_raised_after_every_thread_is_joined(
        self, tmp_path: Path, parallel: int, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        (tmp_path / "f").write_bytes(os.urandom(3 * _checksum.CHUNK))
        real_preadv = os.preadv
        started = threading.Barrier(3, timeout=HANG)  # every part is reading

        def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
            started.wait()
            if offset >= _checksum.CHUNK:  # the parts after the first fail
                raise OSError(errno.EIO, "injected read error")
            return real_preadv(fd, buffers, offset)

        monkeypatch.setattr(os, "preadv", preadv)
        with pytest.raises(OSError, match="injected read error"):
            _checksum.checksum_file(str(tmp_path / "f"), sync=False)
        assert not [t for t in threading.enumerate() if t.name.startswith("statekeep-")]


class TestParts:
    """A part per CPU the load leaves free, one at least, MAX_PARTS at most."""

    @pytest.mark.parametrize(
        ("cpus", "load", "parts"),
        [(2, 0.0, 2), (2, 0.9, 2), (2, 1.2, 1), (2, 9.0, 1), (8, 0.0, 4), (8, 5.5, 3), (1, 0, 1)],
    )
    def test_parts(
        self, monkeypatch: pytest.MonkeyPatch, cpus: int, load: float, parts: int
    ) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
        monkeypatch.setattr(os, "cpu_count", lambda: cpus)
        monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
        assert _checksum._parts() == parts
