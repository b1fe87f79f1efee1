"""The manifest: its format, and verification against every kind of damage."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
import zlib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from conftest import commit
from statekeep import CorruptStateError, _commit, _manifest

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

    def test_reads_the_current_version_in_any_layout(self, state: Path) -> None:
        rewrite_manifest(state, {}, fix_checksum=True)
        assert _manifest.verify(state).version == _manifest.FORMAT_VERSION == 3

    def test_reads_version_2_written_by_an_older_statekeep(self, tmp_path: Path) -> None:
        # tests/fixtures/v2.state was committed by statekeep's version-2 writer (main).
        state = tmp_path / "v2.state"
        shutil.copytree(Path(__file__).parent / "fixtures" / "v2.state", state)
        manifest = _manifest.verify(state)
        assert manifest.version == 2
        assert manifest.metadata == {}
        assert manifest.sequence == 1
        assert [e.path for e in manifest.entries] == ["model.pt", "tree", "tree/leaf"]
        assert (
            manifest.seal == json.loads((state / _manifest.MANIFEST_NAME).read_bytes())["checksum"]
        )
        assert _manifest.read_order(str(state)) == (manifest.created_at.timestamp(), 1)

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
    return "is malformed: it is not a statekeep.state manifest"


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
    return "is not a regular file"


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


def seal_text(state: Path, text: str) -> None:
    """Write ``text`` (a JSON object) as the manifest, sealed as version >= 2 seals it.

    The seal is valid, so only the checks of the content itself can refuse it.
    """
    content = text.rstrip()
    assert content.endswith("}")
    body = content[:-1].rstrip().encode() + b","
    (state / _manifest.MANIFEST_NAME).write_bytes(
        body + b'\n "checksum": %d\n}\n' % zlib.crc32(body)
    )


def hostile(state: Path, **change: object) -> str:
    """The state's manifest with fields changed, as text (``RAW:`` values go in verbatim)."""
    body = json.loads((state / _manifest.MANIFEST_NAME).read_bytes())
    body.pop("checksum")
    raw: dict[str, str] = {}
    for key, value in change.items():
        if isinstance(value, str) and value.startswith("RAW:"):
            raw[key] = value[4:]
            body[key] = f"@@{key}@@"
        else:
            body[key] = value
    text = json.dumps(body, indent=1)
    for key, value in raw.items():
        text = text.replace(f'"@@{key}@@"', value)
    return text


def file_entry(path: object, size: object = 1, crc: object = 0, kind: object = "file") -> dict:
    return {"path": path, "type": kind, "size": size, "crc32": crc}


HOSTILE = {
    "sequence_1e999": ({"sequence": "RAW:1e999"}, "sequence"),
    "sequence_huge": ({"sequence": 1 << 70}, "sequence"),
    "sequence_negative": ({"sequence": -3}, "sequence"),
    "sequence_bool": ({"sequence": True}, "sequence"),
    "sequence_str": ({"sequence": "7"}, "sequence"),
    "size_1e999": ({"files": [file_entry("step", "RAW")]}, "size"),
    "size_negative": ({"files": [file_entry("step", -1)]}, "size"),
    "size_float": ({"files": [file_entry("step", 2.0)]}, "size"),
    "size_huge": ({"files": [file_entry("step", 1 << 64)]}, "size"),
    "crc_too_big": ({"files": [file_entry("step", 2, 1 << 32)]}, "CRC-32"),
    "crc_str": ({"files": [file_entry("step", 2, "ff")]}, "CRC-32"),
    "type_unknown": ({"files": [file_entry("step", kind="link")]}, "type"),
    "entry_not_object": ({"files": ["step"]}, "not an object"),
    "files_not_list": ({"files": {"step": 1}}, "not a list"),
    "path_dotdot": ({"files": [file_entry("../outside")]}, "not a plain relative path"),
    "path_inner_dotdot": ({"files": [file_entry("buffer/../../x")]}, "not a plain relative"),
    "path_absolute": ({"files": [file_entry("/etc/passwd")]}, "not a plain relative path"),
    "path_nul": ({"files": [file_entry("st\x00ep")]}, "not a plain relative path"),
    "path_empty_part": ({"files": [file_entry("buffer//part0")]}, "not a plain relative"),
    "path_not_str": ({"files": [file_entry(7)]}, "not a non-empty string"),
    "path_twice": ({"files": [file_entry("step"), file_entry("step")]}, "twice"),
    "path_manifest": ({"files": [file_entry(_manifest.MANIFEST_NAME)]}, "manifest itself"),
    "time_naive_year_1": ({"created_at": "0001-01-01T00:00:00"}, "no time zone"),
    "time_year_1_east": ({"created_at": "0001-01-01T00:00:00+14:00"}, "out of range"),
    "time_not_str": ({"created_at": 1700000000}, "created_at"),
    "time_garbage": ({"created_at": "yesterday"}, "malformed"),
    "version_str": ({"version": "3"}, "version"),
    "version_zero": ({"version": 0}, "version"),
    "metadata_list": ({"metadata": [1]}, "metadata"),
}


class TestHostileManifests:
    """A manifest with a valid seal but hostile content: CorruptStateError, nothing else."""

    @pytest.mark.parametrize("case", sorted(HOSTILE))
    def test_refused(self, state: Path, case: str) -> None:
        change, expected = HOSTILE[case]
        text = hostile(state, **change)
        if case == "size_1e999":
            text = text.replace('"size": "RAW"', '"size": 1e999')
        seal_text(state, text)
        with pytest.raises(CorruptStateError) as info:
            _manifest.read_manifest(state)
        assert expected in str(info.value)
        assert _manifest.MANIFEST_NAME in str(info.value)
        with pytest.raises(CorruptStateError):
            _manifest.verify(state)
        _manifest.read_order(str(state))  # never raises, whatever it answers

    @pytest.mark.parametrize("depth", [100, 100_000])
    def test_deep_nesting(self, state: Path, depth: int) -> None:
        (state / _manifest.MANIFEST_NAME).write_bytes(b"[" * depth + b"]" * depth)
        with pytest.raises(CorruptStateError, match="manifest"):
            _manifest.read_manifest(state)
        assert _manifest.read_order(str(state)) is None

    def test_nested_metadata_too_deep_for_the_parser(self, state: Path) -> None:
        seal_text(state, hostile(state, metadata="RAW:" + '{"a": ' * 50_000 + "1" + "}" * 50_000))
        with pytest.raises(CorruptStateError, match="nested too deeply"):
            _manifest.read_manifest(state)

    def test_dotdot_path_is_never_read(self, state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        outside = state.parent / "outside"
        outside.write_bytes(b"secret")
        seal_text(state, hostile(state, files=[file_entry("../outside", 6, zlib.crc32(b"secret"))]))
        opened: list[str] = []
        real_open = os.open

        def spy(path: str, *args: int, **kw: int) -> int:
            opened.append(os.fspath(path))
            return real_open(path, *args, **kw)

        monkeypatch.setattr(os, "open", spy)
        with pytest.raises(CorruptStateError, match="not a plain relative path"):
            _manifest.verify(state)
        assert not [p for p in opened if "outside" in p]

    def test_read_order_of_hostile_heads(self, state: Path) -> None:
        manifest = state / _manifest.MANIFEST_NAME
        good = manifest.read_bytes()
        for stamp in [b"0001-01-01T00:00:00", b"9999-12-31T23:59:59-14:00", b"0001-01-01"]:
            head = re.sub(rb'"created_at": "[^"]*"', b'"created_at": "%s"' % stamp, good)
            manifest.write_bytes(head)
            order = _manifest.read_order(str(state))  # never raises
            assert order is None or order[1] == 1
        manifest.write_bytes(good.replace(b'"sequence": 1,', b'"sequence": 99999999999999999999,'))
        assert _manifest.read_order(str(state)) is None  # above 2**63


class TestUnreadable:
    """A FIFO, a directory, a link or an unreadable file: a typed error, never a hang."""

    @pytest.mark.timeout(30)
    def test_manifest_is_a_fifo(self, state: Path) -> None:
        (state / _manifest.MANIFEST_NAME).unlink()
        os.mkfifo(state / _manifest.MANIFEST_NAME)
        with pytest.raises(CorruptStateError, match="not a regular file"):
            _manifest.read_manifest(state)
        with pytest.raises(CorruptStateError, match="not a regular file"):
            _manifest.verify(state)
        assert _manifest.read_order(str(state)) is None

    @pytest.mark.timeout(30)
    def test_state_file_is_a_fifo(self, state: Path) -> None:
        (state / "step").unlink()
        os.mkfifo(state / "step")
        with pytest.raises(CorruptStateError, match="step should be a regular file"):
            _manifest.verify(state)

    @pytest.mark.timeout(30)
    def test_manifest_and_file_are_devices(self, state: Path) -> None:
        """/dev/zero's node as the manifest: a reader that read it would never stop."""
        manifest = state / _manifest.MANIFEST_NAME
        manifest.unlink()
        try:
            os.mknod(manifest, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # like /dev/zero
        except PermissionError as exc:
            if os.environ.get("CI") == "true":
                raise
            pytest.skip(f"cannot create a device node here: {exc}")
        with pytest.raises(CorruptStateError, match="not a regular file"):
            _manifest.read_manifest(state)
        assert _manifest.read_order(str(state)) is None
        manifest.unlink()
        commit(state.parent, {"step": b"1"}, "other.state")
        other = state.parent / "other.state"
        (other / "step").unlink()
        os.mknod(other / "step", stat.S_IFCHR | 0o600, os.makedev(1, 5))
        with pytest.raises(CorruptStateError, match="step should be a regular file"):
            _manifest.verify(other)

    def test_manifest_is_a_symlink(self, state: Path, tmp_path: Path) -> None:
        target = tmp_path / "elsewhere.json"
        (state / _manifest.MANIFEST_NAME).rename(target)
        (state / _manifest.MANIFEST_NAME).symlink_to(target)
        with pytest.raises(CorruptStateError, match="cannot be read"):
            _manifest.read_manifest(state)
        assert _manifest.read_order(str(state)) is None

    def test_subdirectory_is_a_symlink(self, state: Path, tmp_path: Path) -> None:
        outside = tmp_path / "outside"
        (state / "buffer").rename(outside)
        (state / "buffer").symlink_to(outside)
        with pytest.raises(CorruptStateError, match="buffer should be a directory"):
            _manifest.verify(state)

    def test_unreadable_as_another_user(self, tmp_path: Path) -> None:
        """EACCES, as a user who is not root (root reads anything)."""
        base = Path(tempfile.mkdtemp(prefix="statekeep-eacces-"))
        try:
            base.chmod(0o755)
            locked = commit(base, {"f": b"data"}, "locked.state")
            blocked = commit(base, {"f": b"data"}, "blocked.state")
            for path in (locked, blocked, locked / "f"):
                path.chmod(0o755)
            (locked / _manifest.MANIFEST_NAME).chmod(0o644)
            (locked / "f").chmod(0o000)
            (blocked / _manifest.MANIFEST_NAME).chmod(0o000)
            if os.geteuid() != 0:
                pytest.skip("needs root to switch to an unprivileged user")
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child, as nobody
                code = 0
                try:
                    os.setgid(65534)
                    os.setuid(65534)
                    for check, path, expected in [
                        (_manifest.verify, locked, "f cannot be read: Permission denied"),
                        (_manifest.read_manifest, blocked, "cannot be read: Permission denied"),
                        (_manifest.verify, blocked, "cannot be read: Permission denied"),
                    ]:
                        try:
                            check(path)
                            code = 10
                        except CorruptStateError as exc:
                            if expected not in str(exc) or str(path) not in str(exc):
                                code = 11
                        except BaseException:
                            code = 12
                    if _manifest.read_order(str(blocked)) is not None:
                        code = 13
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
        finally:
            shutil.rmtree(base)


class TestMetadata:
    """The caller's JSON object travels in the manifest, under its seal."""

    def test_round_trip(self, states_dir: Path) -> None:
        meta = {"step": 1200, "loss": 0.25, "tags": ["a", "é"], "nested": {"x": None}}
        with _commit.BuildDir(states_dir, durable=False) as build:
            written = build.commit(states_dir / "m.state", metadata=meta)
        assert written.metadata == meta
        read = _manifest.verify(states_dir / "m.state")
        assert read.metadata == meta
        assert read.seal == written.seal
        assert _manifest.read_manifest(commit(states_dir, {}, "plain.state")).metadata == {}

    def test_covered_by_the_seal(self, states_dir: Path) -> None:
        with _commit.BuildDir(states_dir, durable=False) as build:
            build.commit(states_dir / "m.state", metadata={"loss": 0.25})
        manifest = states_dir / "m.state" / _manifest.MANIFEST_NAME
        manifest.write_bytes(manifest.read_bytes().replace(b"0.25", b"0.15"))
        with pytest.raises(CorruptStateError, match="checksum does not match"):
            _manifest.read_manifest(states_dir / "m.state")

    @pytest.mark.parametrize(
        ("meta", "error", "named"),
        [
            ({"when": datetime(2020, 1, 1)}, TypeError, "'when'"),
            ({"loss": float("nan")}, ValueError, "'loss'"),
            ({"deep": [{"x": {1, 2}}]}, TypeError, "'deep'"),
            ({1: "x"}, TypeError, "1"),
            (["not", "a", "mapping"], TypeError, "mapping"),
        ],
    )
    def test_not_json_ready_is_refused_before_writing(
        self, states_dir: Path, meta: object, error: type[Exception], named: str
    ) -> None:
        with _commit.BuildDir(states_dir, durable=False) as build:
            (build.path / "x").write_bytes(b"x")
            with pytest.raises(error, match=re.escape(named)):
                build.commit(states_dir / "m.state", metadata=meta)  # type: ignore[arg-type]
            assert not (build.path / _manifest.MANIFEST_NAME).exists()
        assert os.listdir(states_dir) == []

    def test_mutating_the_callers_dict_afterwards_changes_nothing(self, states_dir: Path) -> None:
        meta: dict[str, object] = {"step": [1]}
        with _commit.BuildDir(states_dir, durable=False) as build:
            written = build.commit(states_dir / "m.state", metadata=meta)
        meta["step"] = 2
        assert written.metadata == {"step": [1]}
