"""A full disk: every save that fails on it leaves the last committed state as it was.

The disk is real: a 2 MiB tmpfs mounted for the test (root only), filled with a
ballast file, so writes fail with the kernel's own ENOSPC. Where tmpfs cannot be
mounted the tests skip, except under CI, where they must run and so fail instead.
A second case needs no mount: a child process whose RLIMIT_FSIZE makes the kernel
refuse a large write (EFBIG).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from statekeep import (
    FileCheckpointStorage,
    PersistentStateMixin,
    SQLiteCheckpointStorage,
    StateStore,
    StorageError,
    _atomic,
)

DISK_SIZE = 2 << 20


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A fresh 2 MiB tmpfs; unmounted afterwards."""
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE}", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        reason = f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Write a ballast file until only about ``leave`` bytes are free; return it."""
    ballast = disk / "ballast"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(ballast, "wb") as fh:
        fh.write(b"\0" * max(free - leave, 0))
    return ballast


class Blob(PersistentStateMixin):
    """A component whose state is a byte string; ``fill_up`` makes it eat all free space."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.fill_up = False

    def save_state(self, path: Path) -> None:
        path.write_bytes(self.data)
        if self.fill_up:  # leave not one byte for the manifest
            with open(f"{path}.pad", "wb") as fh:
                try:
                    while True:
                        fh.write(b"\0" * 4096)
                        fh.flush()
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise

    def load_state(self, path: Path) -> None:
        self.data = path.read_bytes()


def private_entries(root: Path) -> list[str]:
    return sorted(n for n in os.listdir(root) if _atomic.is_private(n))


class TestSnapshotsOnAFullDisk:
    """A snapshot that does not fit raises, and the previous one stays the latest and loads."""

    def test_component_write_fails(self, small_disk: Path) -> None:
        blob = Blob(b"first")
        store = StateStore(small_disk / "states", state_name_format="%f-%S.state")
        store.register("blob", blob)
        first = store.save_state()
        ballast = fill(small_disk, leave=64 << 10)
        blob.data = b"x" * (256 << 10)
        with pytest.raises(OSError, match="No space left") as caught:
            store.save_state()
        assert caught.value.errno == errno.ENOSPC
        assert [s.path for s in store.list_states()] == [first]
        assert private_entries(small_disk / "states") == []  # the build was removed
        blob.data = b""
        assert store.load_latest_state() == first
        assert blob.data == b"first"
        ballast.unlink()  # space again: saving works again
        blob.data = b"second"
        assert store.save_state() in [s.path for s in store.list_states()]

    def test_manifest_write_fails(self, small_disk: Path) -> None:
        blob = Blob(b"first")
        store = StateStore(small_disk / "states", state_name_format="%f-%S.state")
        store.register("blob", blob)
        first = store.save_state()
        blob.data, blob.fill_up = b"second", True
        with pytest.raises(OSError, match="No space left") as caught:
            store.save_state()
        assert caught.value.errno == errno.ENOSPC
        assert [s.path for s in store.list_states()] == [first]
        assert private_entries(small_disk / "states") == []
        assert store.load_latest_state() == first
        assert blob.data == b"first"


class TestCheckpointsOnAFullDisk:
    """A checkpoint that does not fit raises StorageError; the previous one still loads."""

    @pytest.mark.parametrize("backend", ["file", "sqlite"])
    def test_previous_checkpoint_survives(self, small_disk: Path, backend: str) -> None:
        session = uuid.uuid4()
        storage: FileCheckpointStorage | SQLiteCheckpointStorage
        if backend == "file":
            storage = FileCheckpointStorage(small_disk / "ckpt")
        else:
            storage = SQLiteCheckpointStorage(small_disk / "ckpt.db")
        with storage:
            storage.save(session, {"row": 1})
            fill(small_disk, leave=64 << 10)
            with pytest.raises(StorageError) as caught:
                storage.save(session, {"row": 2, "blob": "x" * (512 << 10)})
            assert isinstance(caught.value.__cause__, Exception)
            assert storage.load(session) == {"row": 1}
            assert [info.session_id for info in storage.list_checkpoints()] == [str(session)]
        if backend == "file":
            assert private_entries(small_disk / "ckpt") == []


class TestFileSizeLimit:
    """A write the kernel refuses (RLIMIT_FSIZE, EFBIG) fails the save and loses nothing."""

    def test_refused_write(self, tmp_path: Path) -> None:
        script = textwrap.dedent(
            """
            import atexit, errno, resource, signal, sys
            from pathlib import Path
            from statekeep import FileCheckpointStorage, PersistentStateMixin, StateStore
            from statekeep import StorageError

            class Blob(PersistentStateMixin):
                def __init__(self, data): self.data = data
                def save_state(self, path): path.write_bytes(self.data)
                def load_state(self, path): self.data = path.read_bytes()

            root = Path(sys.argv[1])
            blob = Blob(b"small")
            store = StateStore(root / "states", state_name_format="%f-%S.state")
            store.register("blob", blob)
            first = store.save_state()
            ckpt = FileCheckpointStorage(root / "ckpt")
            ckpt.save("s", {"v": 1})
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            limits = resource.getrlimit(resource.RLIMIT_FSIZE)
            # Lifted again before coverage (if it measures this process) writes its data at
            # exit: a data file cut at 64 KiB is what reported "database disk image is malformed".
            atexit.register(resource.setrlimit, resource.RLIMIT_FSIZE, limits)
            resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, limits[1]))
            blob.data = b"x" * (1 << 20)
            try:
                store.save_state()
            except OSError as exc:
                assert exc.errno == errno.EFBIG, exc
            else:
                raise SystemExit("the oversized snapshot was saved")
            try:
                ckpt.save("s", {"v": "y" * (1 << 20)})
            except StorageError as exc:
                assert exc.errno == errno.EFBIG, exc
            else:
                raise SystemExit("the oversized checkpoint was saved")
            assert [s.path for s in store.list_states()] == [first]
            assert store.load_latest_state() == first and blob.data == b"small"
            assert ckpt.load("s") == {"v": 1}
            print("ok")
            """
        )
        done = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "ok"
        leftovers = [
            p.name
            for root in (tmp_path / "states", tmp_path / "ckpt")
            for p in root.iterdir()
            if _atomic.is_private(p.name)
        ]
        assert leftovers == []
