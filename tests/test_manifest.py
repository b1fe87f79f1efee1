"""The manifest: its format, and verification against every kind of damage."""

from __future__ import annotations

import json
import os
import zlib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from conftest import commit
from statekeep import CorruptStateError, _manifest

FILES = {
    "model.pt": b"weights" * 100,
    "model.optim.pt": b"moments" * 10,
    "buffer/part0": b"\x00\x01\x02" * 50,
    "buffer/nested/part1": b"",
    "step": b"42",
}


@pytest.fixture
def state(states_dir: Path) -> Path:
    return commit(states_dir, FILES)


def seal_v2(body: dict[str, object]) -> bytes:
    """A version-2 manifest laid out unlike the writer's: the seal covers raw bytes."""
    content = json.dumps(body, indent=2)[: -len("\n}")].encode() + b","
    return content + b'\n "checksum": %d\n}\n' % zlib.crc32(content)


def seal_v1(body: dict[str, object]) -> bytes:
    """A version-1 manifest: checksum of the other fields, sorted, without whitespace."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return json.dumps({**body, "checksum": zlib.crc32(canonical)}, indent=1).encode()


def rewrite_manifest(state: Path, change: dict[str, object], *, fix_checksum: bool) -> None:
    manifest = state / _manifest.MANIFEST_NAME
    body = json.loads(manifest.read_bytes())
    body.pop("checksum")
    body.update(change)
    if fix_checksum:
        manifest.write_bytes(seal_v2(body))
    else:
        manifest.write_text(json.dumps({**body, "checksum": 1}))


class TestManifest:
    """The manifest records format, version, time, sequence and every file."""

    def test_content(self, state: Path) -> None:
        body = json.loads((state / _manifest.MANIFEST_NAME).read_bytes())
        assert body["format"] == _manifest.FORMAT
        assert body["version"] == _manifest.FORMAT_VERSION
        files = {f["path"]: f for f in body["files"]}
        assert set(files) == set(FILES) | {"buffer", "buffer/nested"}
        for rel, data in FILES.items():
            assert files[rel] == {
                "path": rel,
                "type": "file",
                "size": len(data),
                "crc32": zlib.crc32(data),
            }
        assert files["buffer"]["type"] == "dir"

    def test_sealed_by_its_last_line(self, state: Path) -> None:
        raw = (state / _manifest.MANIFEST_NAME).read_bytes()
        content, _, seal = raw.rpartition(b'\n "checksum": ')
        assert seal == b"%d\n}\n" % zlib.crc32(content)

    def test_reads_version_1(self, state: Path) -> None:
        manifest = state / _manifest.MANIFEST_NAME
        body = json.loads(manifest.read_bytes())
        body.pop("checksum")
        body["version"] = 1
        manifest.write_bytes(seal_v1(body))
        assert _manifest.verify(state).version == 1
        body["sequence"] += 1  # an edit the version-1 checksum catches
        manifest.write_text(
            json.dumps({**body, "checksum": json.loads(seal_v1(body))["checksum"] ^ 1})
        )
        with pytest.raises(CorruptStateError, match="checksum does not match"):
            _manifest.read_manifest(state)

    def test_reads_version_2_in_any_layout(self, state: Path) -> None:
        rewrite_manifest(state, {}, fix_checksum=True)
        assert _manifest.verify(state).version == 2

    def test_text_after_the_seal_is_refused(self, state: Path) -> None:
        manifest = state / _manifest.MANIFEST_NAME
        manifest.write_bytes(manifest.read_bytes() + b"\n")
        with pytest.raises(CorruptStateError, match="checksum"):
            _manifest.read_manifest(state)

    def test_read_order(self, state: Path) -> None:
        manifest = _manifest.read_manifest(state)
        order = (manifest.created_at.timestamp(), manifest.sequence)
        assert _manifest.read_order(str(state)) == order
        rewrite_manifest(state, {}, fix_checksum=True)  # another layout: no fast order
        assert _manifest.read_order(str(state)) is None

    def test_read_back(self, state: Path) -> None:
        manifest = _manifest.read_manifest(state)
        assert manifest.version == _manifest.FORMAT_VERSION
        assert manifest.size_bytes == sum(len(d) for d in FILES.values())
        assert manifest.created_at.tzinfo is not None
        assert abs(datetime.now(timezone.utc) - manifest.created_at) < timedelta(minutes=5)


def flip_bit(state: Path) -> str:
    path = state / "model.pt"
    data = bytearray(path.read_bytes())
    data[17] ^= 0x04
    path.write_bytes(bytes(data))
    return "model.pt has CRC-32"


def truncate(state: Path) -> str:
    os.truncate(state / "buffer" / "part0", 10)
    return "buffer/part0 is 10 bytes, manifest says 150"


def remove_file(state: Path) -> str:
    (state / "model.optim.pt").unlink()
    return "model.optim.pt is missing"


def extra_file(state: Path) -> str:
    (state / "buffer" / "stray").write_bytes(b"?")
    return "unexpected buffer/stray"


def extra_dir(state: Path) -> str:
    (state / "newdir").mkdir()
    return "unexpected newdir"


def file_became_dir(state: Path) -> str:
    (state / "step").unlink()
    (state / "step").mkdir()
    return "step should be a regular file"


def dir_became_file(state: Path) -> str:
    (state / "buffer" / "nested" / "part1").unlink()
    (state / "buffer" / "nested").rmdir()
    (state / "buffer" / "nested").write_bytes(b"")
    return "buffer/nested should be a directory"


def not_json(state: Path) -> str:
    (state / _manifest.MANIFEST_NAME).write_bytes(b'{"format": "statekeep.state", "ver')
    return "is malformed"


def json_list(state: Path) -> str:
    (state / _manifest.MANIFEST_NAME).write_bytes(b"[1, 2]")
    return "is malformed"


def wrong_format(state: Path) -> str:
    rewrite_manifest(state, {"format": "something.else"}, fix_checksum=True)
    return "is malformed: not a statekeep.state manifest"


def missing_key(state: Path) -> str:
    manifest = state / _manifest.MANIFEST_NAME
    body = json.loads(manifest.read_bytes())
    del body["files"]
    manifest.write_text(json.dumps(body))
    return "is malformed"


def manifest_edited(state: Path) -> str:
    rewrite_manifest(state, {"sequence": 99}, fix_checksum=False)
    return "checksum does not match"


def future_version(state: Path) -> str:
    rewrite_manifest(state, {"version": _manifest.FORMAT_VERSION + 1}, fix_checksum=True)
    return f"format version {_manifest.FORMAT_VERSION + 1}"


def manifest_missing(state: Path) -> str:
    (state / _manifest.MANIFEST_NAME).unlink()
    return "has no manifest"


def manifest_is_dir(state: Path) -> str:
    (state / _manifest.MANIFEST_NAME).unlink()
    (state / _manifest.MANIFEST_NAME).mkdir()
    return "is a directory"


DAMAGE = [
    flip_bit,
    truncate,
    remove_file,
    extra_file,
    extra_dir,
    file_became_dir,
    dir_became_file,
    not_json,
    json_list,
    wrong_format,
    missing_key,
    manifest_edited,
    future_version,
    manifest_missing,
    manifest_is_dir,
]
MANIFEST_DAMAGE = {
    not_json,
    json_list,
    wrong_format,
    missing_key,
    manifest_edited,
    future_version,
    manifest_missing,
    manifest_is_dir,
}


class TestVerify:
    """Every kind of damage raises CorruptStateError naming the state and the file."""

    def test_intact(self, state: Path) -> None:
        assert _manifest.verify(state) == _manifest.read_manifest(state)

    @pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
    def test_damage(self, state: Path, damage: object) -> None:
        assert callable(damage)
        expected = damage(state)
        with pytest.raises(CorruptStateError) as info:
            _manifest.verify(state)
        message = str(info.value)
        assert expected in message
        assert str(state) in message
        if damage in MANIFEST_DAMAGE:
            assert _manifest.MANIFEST_NAME in message

    def test_missing_directory(self, states_dir: Path) -> None:
        with pytest.raises(FileNotFoundError, match="nope"):
            _manifest.verify(states_dir / "nope")
