"""FileCheckpointStorage: the conformance suite, the file format, names, corruption, processes."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import zlib
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crashworkers.checkpoint_worker import check_value, run_writers
from statekeep import CorruptCheckpointError, FileCheckpointStorage, StorageError
from statekeep._atomic import PRIVATE_DIR
from statekeep.storage._envelope import pack
from statekeep.storage._file import SUFFIX, file_name
from statekeep.testing import AWKWARD_IDS, PersistentCheckpointStorageContract

WINDOWS_DEVICES = {"con", "prn", "aux", "nul"} | {
    f"{p}{i}" for p in ("com", "lpt") for i in range(10)
}


def unescape(stem: str) -> str:
    """Undo the %xx escaping of a (non-hashed) file name stem."""
    out = bytearray()
    i = 0
    while i < len(stem):
        if stem[i] == "%":
            out.append(int(stem[i + 1 : i + 3], 16))
            i += 3
        else:
            out += stem[i].encode()
            i += 1
    return out.decode()


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[FileCheckpointStorage]:
    with FileCheckpointStorage(tmp_path / "ckpt") as opened:
        yield opened


class TestFileContract(PersistentCheckpointStorageContract):
    """The durable file backend keeps every promise of the shared contract."""

    @pytest.fixture
    def make_storage(self, tmp_path: Path) -> Callable[[], FileCheckpointStorage]:
        return lambda: FileCheckpointStorage(tmp_path / "ckpt")

    @pytest.fixture
    def make_failing_storage(self, tmp_path: Path) -> Callable[[], FileCheckpointStorage]:
        def opened_then_replaced_by_a_file() -> FileCheckpointStorage:
            storage = FileCheckpointStorage(tmp_path / "gone")
            shutil.rmtree(tmp_path / "gone")
            (tmp_path / "gone").write_text("a file where the directory was")
            return storage

        return opened_then_replaced_by_a_file


class TestFileContractNotDurable(PersistentCheckpointStorageContract):
    """With durable=False the file backend keeps the same promises."""

    @pytest.fixture
    def make_storage(self, tmp_path: Path) -> Callable[[], FileCheckpointStorage]:
        return lambda: FileCheckpointStorage(tmp_path / "ckpt", durable=False)


class TestFileFormat:
    """A checkpoint file is a JSON header line and the payload as plain JSON."""

    def test_a_person_can_read_the_file(self, storage: FileCheckpointStorage) -> None:
        storage.save("job-1", {"row": 42, "name": "ü"}, metadata={"stage": "load"})
        path = storage.checkpoint_dir / "job-1.ckpt"
        header_line, payload_line, rest = path.read_text(encoding="utf-8").split("\n")
        assert rest == ""
        assert json.loads(payload_line) == {"row": 42, "name": "ü"}
        assert '"name":"ü"' in payload_line  # not escaped, not compressed
        header = json.loads(header_line)
        assert header["format"] == "statekeep-checkpoint"
        assert header["version"] == 1
        assert header["session_id"] == "job-1"
        assert header["size"] == len(payload_line.encode())
        assert header["crc32"] == zlib.crc32(payload_line.encode())
        assert header["metadata"] == {"stage": "load"}
        assert header["timestamp"].endswith("+00:00")

    def test_listing_reads_only_headers(self, storage: FileCheckpointStorage) -> None:
        storage.save("s1", {"row": 1}, metadata={"m": 1})
        path = storage.checkpoint_dir / "s1.ckpt"
        header = path.read_bytes().split(b"\n")[0]
        path.write_bytes(header + b"\nthe payload is not read by list_checkpoints")
        (info,) = storage.list_checkpoints()
        assert (info.session_id, dict(info.metadata)) == ("s1", {"m": 1})
        with pytest.raises(CorruptCheckpointError):
            storage.load("s1")

    def test_only_checkpoint_files_are_written(
        self, tmp_path: Path, storage: FileCheckpointStorage
    ) -> None:
        for key in AWKWARD_IDS:
            storage.save(key, {"key": key})
        inside = sorted(p.name for p in storage.checkpoint_dir.iterdir())
        assert inside == sorted(file_name(key) for key in AWKWARD_IDS)  # nothing private
        outside = {p for p in tmp_path.rglob("*") if storage.checkpoint_dir not in p.parents}
        assert outside == {storage.checkpoint_dir}


class TestFileNames:
    """Session ids map to safe file names, reversibly and without collisions."""

    def test_names_are_safe_everywhere(self) -> None:
        for key in AWKWARD_IDS:
            name = file_name(key)
            stem = name.removesuffix(SUFFIX)
            assert len(name.encode()) <= 255, key
            assert set(stem) <= set("abcdefghijklmnopqrstuvwxyz0123456789_-%.")
            assert stem.split(".")[0] not in WINDOWS_DEVICES, key
            assert not stem.startswith("."), key

    def test_names_never_collide_even_ignoring_case(self) -> None:
        keys = [*AWKWARD_IDS, *(f"{c}" for c in "aAbB.%"), "%2e", "%2E", "x" * 161, "x" * 162]
        names = [file_name(key) for key in keys]
        assert len({name.lower() for name in names}) == len(set(keys))

    def test_short_names_decode_back_to_the_id(self) -> None:
        decoded = 0
        for key in AWKWARD_IDS:
            stem = file_name(key).removesuffix(SUFFIX)
            if "." not in stem:
                assert unescape(stem) == key
                decoded += 1
        assert decoded == len(AWKWARD_IDS) - 3  # the three long ids are hashed

    @given(
        st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), min_size=1)
    )
    def test_any_id_gets_a_safe_name_that_decodes_back(self, key: str) -> None:
        name = file_name(key)
        stem = name.removesuffix(SUFFIX)
        assert len(name.encode()) <= 255
        assert set(stem) <= set("abcdefghijklmnopqrstuvwxyz0123456789_-%.")
        assert stem.split(".")[0] not in WINDOWS_DEVICES
        if "." not in stem:  # not hashed: the name alone gives the id back
            assert unescape(stem) == key

    @given(st.lists(st.text(min_size=1, max_size=80).filter(lambda k: "\0" not in k), min_size=2))
    def test_distinct_ids_never_share_a_name_even_ignoring_case(self, keys: list[str]) -> None:
        keys = [k for k in dict.fromkeys(keys) if not any(0xD800 <= ord(c) <= 0xDFFF for c in k)]
        assert len({file_name(k).lower() for k in keys}) == len(keys)

    def test_plain_ids_keep_their_name(self) -> None:
        assert file_name("run-2024_01") == "run-2024_01.ckpt"
        assert file_name("CON") == "%43%4f%4e.ckpt"
        assert file_name("con") == "%63on.ckpt"

    def test_a_long_id_keeps_a_readable_prefix_and_is_checked(
        self, storage: FileCheckpointStorage
    ) -> None:
        long_a, long_b = "a" * 300, "a" * 299 + "b"
        assert file_name(long_a).startswith("a" * 100 + ".")
        storage.save(long_a, {"which": "a"})
        # a file that claims another session (here: renamed by hand) is refused
        os.rename(
            storage.checkpoint_dir / file_name(long_a), storage.checkpoint_dir / file_name(long_b)
        )
        with pytest.raises(CorruptCheckpointError, match="holds session"):
            storage.load(long_b)


def flips(raw: bytes) -> Iterator[tuple[int, bytes]]:
    for pos in range(len(raw)):
        for bit in (0, 5):
            changed = bytearray(raw)
            changed[pos] ^= 1 << bit
            yield pos, bytes(changed)


class TestCorruption:
    """Damaged files raise CorruptCheckpointError naming file and session; exists() stays True."""

    @pytest.fixture
    def saved(self, storage: FileCheckpointStorage) -> tuple[FileCheckpointStorage, Path, bytes]:
        storage.save("victim", {"row": 12, "names": ["a", "b"]}, metadata={"m": 1})
        path = storage.checkpoint_dir / "victim.ckpt"
        return storage, path, path.read_bytes()

    def assert_corrupt(self, storage: FileCheckpointStorage, path: Path) -> None:
        with pytest.raises(CorruptCheckpointError) as caught:
            storage.load("victim")
        assert str(path) in str(caught.value)
        assert "'victim'" in str(caught.value)
        assert storage.exists("victim") is True

    def test_every_truncation_is_detected(
        self, saved: tuple[FileCheckpointStorage, Path, bytes]
    ) -> None:
        storage, path, raw = saved
        for length in range(len(raw)):
            path.write_bytes(raw[:length])
            self.assert_corrupt(storage, path)

    def test_every_flipped_bit_is_detected(
        self, saved: tuple[FileCheckpointStorage, Path, bytes]
    ) -> None:
        storage, path, raw = saved
        for _pos, changed in flips(raw):
            path.write_bytes(changed)
            self.assert_corrupt(storage, path)

    @pytest.mark.parametrize(
        "content",
        [
            b"",
            b"\n",
            b"not json at all\n{}\n",
            b'{"format":"other","version":1}\n{}\n',
            b"\x00" * 64,
            b"[1, 2, 3]\n[]\n",
        ],
    )
    def test_malformed_files(
        self, saved: tuple[FileCheckpointStorage, Path, bytes], content: bytes
    ) -> None:
        storage, path, _ = saved
        path.write_bytes(content)
        self.assert_corrupt(storage, path)

    def test_a_newer_format_version_is_refused(
        self, saved: tuple[FileCheckpointStorage, Path, bytes]
    ) -> None:
        storage, path, raw = saved
        header, _, payload = raw.partition(b"\n")
        body = header.rpartition(b',"header_crc32":')[0].replace(b'"version":1', b'"version":2')
        path.write_bytes(body + b',"header_crc32":%d}\n' % zlib.crc32(body) + payload)
        with pytest.raises(CorruptCheckpointError, match="version 2"):
            storage.load("victim")

    @pytest.mark.parametrize(
        ("body", "reason"),
        [
            (b"not json", "not valid JSON"),
            (b'{"format":"someone-else"', "format is 'someone-else'"),
            (b'{"format":"statekeep-checkpoint","version":1', "malformed"),
            (
                b'{"format":"statekeep-checkpoint","version":1,"session_id":"victim",'
                b'"timestamp":"2024-01-01T00:00:00+00:00","size":"12","crc32":0,"metadata":{}',
                "'size' has the wrong type",
            ),
        ],
    )
    def test_headers_with_a_valid_checksum_but_bad_fields(
        self, saved: tuple[FileCheckpointStorage, Path, bytes], body: bytes, reason: str
    ) -> None:
        storage, path, raw = saved
        payload = raw.partition(b"\n")[2]
        path.write_bytes(body + b',"header_crc32":%d}\n' % zlib.crc32(body) + payload)
        with pytest.raises(CorruptCheckpointError, match=re.escape(reason)):
            storage.load("victim")
        assert storage.list_checkpoints() == []

    def test_a_file_copied_to_another_session_is_refused(
        self, saved: tuple[FileCheckpointStorage, Path, bytes], caplog: pytest.LogCaptureFixture
    ) -> None:
        storage, _, raw = saved
        (storage.checkpoint_dir / "other.ckpt").write_bytes(raw)
        with pytest.raises(CorruptCheckpointError, match="holds session 'victim'"):
            storage.load("other")
        with caplog.at_level(logging.WARNING, logger="statekeep"):
            assert [info.session_id for info in storage.list_checkpoints()] == ["victim"]
        assert "other.ckpt" in caplog.text

    def test_a_payload_that_is_not_an_object(
        self, saved: tuple[FileCheckpointStorage, Path, bytes]
    ) -> None:
        storage, path, raw = saved
        header = raw.partition(b"\n")[0]
        fields = json.loads(header)
        payload = b"[1,2]"
        fields.update(size=len(payload), crc32=zlib.crc32(payload))
        del fields["header_crc32"]
        body = json.dumps(fields, separators=(",", ":")).encode()[:-1]
        path.write_bytes(body + b',"header_crc32":%d}\n' % zlib.crc32(body) + payload + b"\n")
        with pytest.raises(CorruptCheckpointError, match="not a JSON object"):
            storage.load("victim")

    def test_load_and_load_with_info_name_the_session_and_the_file(
        self, saved: tuple[FileCheckpointStorage, Path, bytes]
    ) -> None:
        """Both readers report a damaged payload alike: session, file, and "is corrupt"."""
        storage, path, raw = saved
        path.write_bytes(raw[:-2] + bytes([raw[-2] ^ 0x01]) + raw[-1:])
        expected = re.escape(f"checkpoint of session 'victim' at {path} is corrupt: ")
        with pytest.raises(CorruptCheckpointError, match=expected):
            storage.load("victim")
        with pytest.raises(CorruptCheckpointError, match=expected):
            storage.load_with_info("victim")

    def test_listing_skips_a_corrupt_file_and_logs_it(
        self, saved: tuple[FileCheckpointStorage, Path, bytes], caplog: pytest.LogCaptureFixture
    ) -> None:
        storage, path, raw = saved
        storage.save("healthy", {})
        path.write_bytes(raw[:10])
        with caplog.at_level(logging.WARNING, logger="statekeep"):
            infos = storage.list_checkpoints()
        assert [info.session_id for info in infos] == ["healthy"]
        assert str(path) in caplog.text

    def test_a_corrupt_file_can_be_replaced_and_deleted(
        self, saved: tuple[FileCheckpointStorage, Path, bytes]
    ) -> None:
        storage, path, raw = saved
        path.write_bytes(raw[:-3])
        storage.save("victim", {"fresh": True})
        assert storage.load("victim") == {"fresh": True}
        path.write_bytes(b"junk")
        assert storage.delete("victim") is True
        assert storage.exists("victim") is False


class TestErrorsAndLifecycle:
    """OS errors surface as StorageError; leftovers are reclaimed; close() closes."""

    def test_a_directory_in_the_way_is_a_storage_error(
        self, storage: FileCheckpointStorage
    ) -> None:
        (storage.checkpoint_dir / "blocked.ckpt").mkdir()
        with pytest.raises(StorageError, match=r"blocked\.ckpt") as caught:
            storage.load("blocked")
        assert isinstance(caught.value.__cause__, IsADirectoryError)
        with pytest.raises(StorageError) as caught:
            storage.save("blocked", {"x": 1})
        assert isinstance(caught.value.__cause__, OSError)
        assert os.listdir(storage.checkpoint_dir) == ["blocked.ckpt"]

    def test_a_file_as_checkpoint_dir_is_a_storage_error(self, tmp_path: Path) -> None:
        (tmp_path / "file").write_text("x")
        with pytest.raises(StorageError, match="file") as caught:
            FileCheckpointStorage(tmp_path / "file")
        assert isinstance(caught.value.__cause__, FileExistsError | NotADirectoryError)

    def test_opening_reclaims_what_a_killed_save_left(self, tmp_path: Path) -> None:
        legacy = tmp_path / "ckpt" / PRIVATE_DIR  # where an older statekeep put its work
        legacy.mkdir(parents=True)
        (legacy / "0123456789abcdef.work").write_bytes(b"half a checkpoint")
        (tmp_path / "ckpt" / ".statekeep-0123456789abcdef0.work").write_bytes(b"half another")
        with FileCheckpointStorage(tmp_path / "ckpt") as storage:
            assert os.listdir(tmp_path / "ckpt") == []
            assert storage.list_checkpoints() == []

    def test_calls_after_close_raise_value_error(self, tmp_path: Path) -> None:
        storage = FileCheckpointStorage(tmp_path)
        storage.save("a", {})
        storage.close()
        storage.close()
        with pytest.raises(ValueError, match="closed"):
            storage.load("a")
        with pytest.raises(ValueError, match="closed"):
            storage.list_checkpoints()
        assert "durable=True" in repr(storage)

    def test_the_default_directory(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.chdir(tmp_path)
        with FileCheckpointStorage() as storage:
            storage.save("s", {"x": 1})
        assert (tmp_path / ".checkpoints" / "s.ckpt").is_file()


class TestProcesses:
    """Writers in several processes of one session leave one whole value."""

    def test_concurrent_process_writers(self, tmp_path: Path, worker_env: dict[str, str]) -> None:
        count, writers = 40, 4
        outputs = run_writers(
            "file", str(tmp_path / "ckpt"), ["shared"] * writers, count, worker_env
        )
        assert sorted(outputs) == [f"done {who}" for who in range(writers)]
        with FileCheckpointStorage(tmp_path / "ckpt") as storage:
            gen = check_value(storage.load("shared"))
        assert gen % 1_000_000 == count - 1
        assert os.listdir(tmp_path / "ckpt") == ["shared.ckpt"]


class TestSpecialFiles:
    """A FIFO, socket or symlink where a checkpoint file should be: typed error, no hang."""

    def test_a_fifo_is_corrupt_and_never_blocks(
        self, storage: FileCheckpointStorage, caplog: pytest.LogCaptureFixture
    ) -> None:
        storage.save("healthy", {"x": 1})
        os.mkfifo(storage.checkpoint_dir / file_name("pipe"))
        done = threading.Event()
        seen: list[object] = []

        def read() -> None:
            try:
                storage.load("pipe")
            except CorruptCheckpointError as exc:
                seen.append(exc)
            seen.append([i.session_id for i in storage.list_checkpoints()])
            seen.append(storage.exists("pipe"))
            done.set()

        threading.Thread(target=read, daemon=True).start()
        assert done.wait(10), "a reader blocked on the FIFO"
        error, listed, exists = seen
        assert isinstance(error, CorruptCheckpointError)
        assert "pipe.ckpt" in str(error)
        assert "not a regular file" in str(error)
        assert listed == ["healthy"]
        assert exists is True
        assert "pipe.ckpt" in caplog.text
        storage.save("pipe", {"x": 2})  # a save replaces it
        assert storage.load("pipe") == {"x": 2}

    def test_a_symlink_is_corrupt_and_not_followed(
        self, storage: FileCheckpointStorage, tmp_path: Path
    ) -> None:
        outside = tmp_path / "outside.ckpt"
        other = FileCheckpointStorage(tmp_path / "other")
        other.save("link", {"secret": True})
        (tmp_path / "other" / file_name("link")).rename(outside)
        (storage.checkpoint_dir / file_name("link")).symlink_to(outside)
        with pytest.raises(CorruptCheckpointError, match="symlink"):
            storage.load("link")
        assert storage.list_checkpoints() == []
        assert storage.delete("link") is True
        assert outside.exists(), "deleting the link must not touch its target"


class TestUseJson:
    """ondine passes use_json=True; use_json=False (pickle) is refused, saying why."""

    def test_use_json_true_is_accepted(self, tmp_path: Path) -> None:
        with FileCheckpointStorage(tmp_path / "c", use_json=True) as storage:
            storage.save("s", {"x": 1})
            assert storage.load("s") == {"x": 1}

    def test_use_json_false_is_refused(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match=r"use_json=False.*JSON only.*pickle"):
            FileCheckpointStorage(tmp_path / "c", use_json=False)
        assert not (tmp_path / "c").exists()


class TestRetentionByAge:
    """delete_older_than looks at each checkpoint's own time."""

    def test_only_the_old_go(self, storage: FileCheckpointStorage) -> None:
        storage.save("new", {})
        old = storage.checkpoint_dir / file_name("old")
        storage._write(
            file_name("old"),
            pack("old", b"{}", b"{}", datetime.now(timezone.utc) - timedelta(days=3)),
        )
        assert old.exists()
        assert storage.delete_older_than(timedelta(days=2)) == 1
        assert not old.exists()
        assert [i.session_id for i in storage.list_checkpoints()] == ["new"]
