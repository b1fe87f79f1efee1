"""BuildDir: a directory built privately, then committed whole under its final name."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest

from conftest import commit
from statekeep import StateExistsError, _atomic, _commit, _manifest


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
            assert os.listdir(states_dir) == [_atomic.PRIVATE_DIR]
            manifest = build.commit(states_dir / "x.state")
        final = states_dir / "x.state"
        assert sorted(os.listdir(final)) == [_manifest.MANIFEST_NAME, "a", "d"]
        assert not build.path.exists()
        assert os.listdir(states_dir / _atomic.PRIVATE_DIR) == ["sequence"]
        assert manifest.entries == (
            _manifest.Entry("a", is_dir=False, size=3, crc32=zlib.crc32(b"abc")),
            _manifest.Entry("d", is_dir=True),
        )
        assert _manifest.verify(final) == manifest

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
        assert sorted(os.listdir(states_dir)) == [_atomic.PRIVATE_DIR]

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
