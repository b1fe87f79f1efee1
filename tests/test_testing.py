"""statekeep.testing: the suite catches broken backends, and the documented example passes it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).parent.parent / "docs" / "writing-a-backend.md"

BROKEN = '''
import os
from uuid import UUID

import pytest

from statekeep import MemoryCheckpointStorage
from statekeep.testing import CheckpointStorageContract, PersistentCheckpointStorageContract


class SharesDicts(MemoryCheckpointStorage):
    """Hands back the very dict it was given."""

    def __init__(self):
        super().__init__()
        self.kept = {}

    def save(self, session_id, data, *, metadata=None):
        super().save(session_id, data, metadata=metadata)
        self.kept[str(session_id)] = data
        return True

    def load(self, session_id):
        return None if super().load(session_id) is None else self.kept[str(session_id)]


def fold(session_id):
    return session_id.lower() if isinstance(session_id, str) else session_id


class FoldsCase(MemoryCheckpointStorage):
    """Treats ids case-insensitively, as a naive file backend on macOS would."""

    def save(self, session_id, data, *, metadata=None):
        return super().save(fold(session_id), data, metadata=metadata)

    def load(self, session_id):
        return super().load(fold(session_id))

    def exists(self, session_id):
        return super().exists(fold(session_id))

    def delete(self, session_id):
        return super().delete(fold(session_id))


class KeysByRepr(MemoryCheckpointStorage):
    """Stores a UUID under its repr, not its string."""

    def save(self, session_id, data, *, metadata=None):
        if isinstance(session_id, UUID):
            session_id = repr(session_id)
        return super().save(session_id, data, metadata=metadata)


class NewestFirst(MemoryCheckpointStorage):
    def list_checkpoints(self):
        return super().list_checkpoints()[::-1]


class PairsTwoSaves(MemoryCheckpointStorage):
    """Reads data and info with two calls, as RecoverableState once did."""

    def load_with_info(self, session_id):
        data = self.load(session_id)
        if data is None:
            return None
        os.sched_yield()  # between two reads a real backend waits on I/O: others run
        key = str(session_id)
        (info,) = [i for i in self.list_checkpoints() if i.session_id == key]
        return data, info


class TestSharesDicts(CheckpointStorageContract):
    @pytest.fixture
    def make_storage(self):
        return SharesDicts


class TestFoldsCase(CheckpointStorageContract):
    @pytest.fixture
    def make_storage(self):
        return FoldsCase


class TestKeysByRepr(CheckpointStorageContract):
    @pytest.fixture
    def make_storage(self):
        return KeysByRepr


class TestNewestFirst(CheckpointStorageContract):
    @pytest.fixture
    def make_storage(self):
        return NewestFirst


class TestForgetful(PersistentCheckpointStorageContract):
    @pytest.fixture
    def make_storage(self):
        return MemoryCheckpointStorage


class TestPairsTwoSaves(CheckpointStorageContract):
    @pytest.fixture
    def make_storage(self):
        return PairsTwoSaves


class TestNoFixture(CheckpointStorageContract):
    pass
'''


def failed_tests(output: str) -> set[str]:
    return set(re.findall(r"^FAILED \S+::(\w+::\w+)", output, re.MULTILINE))


def erred_tests(output: str) -> set[str]:
    return set(re.findall(r"^ERROR \S+::(\w+::\w+)", output, re.MULTILINE))


class TestTheSuiteCatchesBrokenBackends:
    """Each kind of broken backend fails the tests of the promise it breaks, and only those."""

    @pytest.fixture(scope="class")
    @classmethod
    def output(cls, tmp_path_factory: pytest.TempPathFactory) -> str:
        folder = tmp_path_factory.mktemp("broken")
        (folder / "test_broken.py").write_text(BROKEN)
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-rfE",
                "-p",
                "no:cacheprovider",
                "test_broken.py",
            ],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert run.returncode == 1, run.stdout + run.stderr
        return run.stdout

    def test_shared_dicts_break_isolation(self, output: str) -> None:
        failed = {name for name in failed_tests(output) if name.startswith("TestSharesDicts")}
        assert failed == {
            "TestSharesDicts::test_mutating_the_saved_dict_changes_nothing",
            "TestSharesDicts::test_mutating_the_loaded_dict_changes_nothing",
            "TestSharesDicts::test_rich_types_come_back_as_their_json_forms",
        }

    def test_case_folding_is_a_collision(self, output: str) -> None:
        failed = {name for name in failed_tests(output) if name.startswith("TestFoldsCase")}
        assert failed == {
            "TestFoldsCase::test_ids_differing_only_in_case_are_distinct",
            "TestFoldsCase::test_awkward_ids_roundtrip_without_colliding",
            "TestFoldsCase::test_awkward_ids_delete_only_themselves",
        }

    def test_a_uuid_must_name_its_string(self, output: str) -> None:
        failed = {name for name in failed_tests(output) if name.startswith("TestKeysByRepr")}
        assert failed == {"TestKeysByRepr::test_a_uuid_and_its_string_name_one_checkpoint"}

    def test_listing_order_is_checked(self, output: str) -> None:
        failed = {name for name in failed_tests(output) if name.startswith("TestNewestFirst")}
        assert failed == {"TestNewestFirst::test_list_is_oldest_first"}

    def test_a_storage_that_forgets_fails_the_persistent_tests(self, output: str) -> None:
        failed = {name for name in failed_tests(output) if name.startswith("TestForgetful")}
        assert failed == {
            "TestForgetful::test_reopening_keeps_everything",
            "TestForgetful::test_two_open_instances_see_each_other",
            "TestForgetful::test_writers_in_several_processes_end_with_one_whole_value",
        }

    def test_data_and_info_from_two_reads_are_caught(self, output: str) -> None:
        failed = {name for name in failed_tests(output) if name.startswith("TestPairsTwoSaves")}
        races = {
            "TestPairsTwoSaves::test_load_with_info_never_pairs_two_saves",
            "TestPairsTwoSaves::"
            "test_recoverable_state_never_pairs_one_saves_data_with_anothers_schema_version",
        }
        assert failed, "a load_with_info made of two reads passed the suite"
        assert failed <= races

    def test_a_missing_fixture_is_reported(self, output: str) -> None:
        erred = {name for name in erred_tests(output) if name.startswith("TestNoFixture")}
        assert "TestNoFixture::test_roundtrip" in erred
        assert "must define a make_storage fixture" in output


class TestTheDocumentedExample:
    """The backend and test module shown in docs/writing-a-backend.md pass the suite as shown."""

    def test_the_example_passes(self, tmp_path: Path) -> None:
        text = DOC.read_text(encoding="utf-8")
        blocks = dict(re.findall(r'```python title="([\w.]+)"\n(.*?)```', text, re.DOTALL))
        assert set(blocks) == {"my_storage.py", "test_my_storage.py"}
        for name, code in blocks.items():
            (tmp_path / name).write_text(code)
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-W",
                "error",
                "-p",
                "no:cacheprovider",
                "test_my_storage.py",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        summary = run.stdout.strip().splitlines()[-1]
        documented = re.search(r"^(\d+ passed(?:, \d+ skipped)?)$", text, re.MULTILINE)
        assert documented is not None
        assert summary.startswith(documented.group(1)), summary
