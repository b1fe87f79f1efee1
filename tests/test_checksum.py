"""Reading files for the manifest: one-pass CRC-32, small reads and directory scans."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest

from statekeep import _checksum


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
