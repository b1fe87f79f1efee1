# Origin: ondine, tests/unit/test_data_io.py (class TestCheckpointStorage, whole) and
# tests/verification/test_verify_functionality.py (test_claim_17_checkpointing_roundtrip,
# with the temp_dir fixture of that file's conftest written out below).
# Copyright (c) 2025 Binblok, MIT License (https://github.com/ptimizeroracle/ondine).
# ondine 2.1.1's wheel and sdist ship no tests; these come from its repository at the
# v2.0.1 release (commit c1c153a), whose ondine/adapters/checkpoint_storage.py and
# ondine/orchestration/state_manager.py are byte-identical to 2.1.1's and whose
# ExecutionContext watermark code (update_row, complete_rows) is the same.
# Changed for statekeep, and nothing else: each test's import of
# LocalFileCheckpointStorage (ondine.adapters -> statekeep's FileCheckpointStorage under
# the same name); the claim-17 test sits in a class of its own with its fixture.
# Not brought in: tests/unit/test_executors.py's TestExecutionContext (5 tests) checks
# the pipeline fields of ondine's context (pipeline_id, start_time, stage index, costs,
# to_dict/from_dict), which statekeep's ExecutionContext leaves to a subclass
# (docs/coming-from-ondine.md).
import tempfile
from pathlib import Path

import pytest


class TestCheckpointStorage:
    """Test suite for checkpoint storage."""

    def test_checkpoint_save_and_load(self):
        """Test saving and loading checkpoints."""
        from uuid import uuid4

        from statekeep import FileCheckpointStorage as LocalFileCheckpointStorage

        with tempfile.TemporaryDirectory() as temp_dir:
            storage = LocalFileCheckpointStorage(Path(temp_dir))
            session_id = uuid4()

            # Save checkpoint
            data = {
                "rows_processed": 100,
                "stage": "LLMInvocation",
                "timestamp": "2025-10-15T10:00:00",
            }

            success = storage.save(session_id, data)
            assert success is True

            # Load checkpoint
            loaded_data = storage.load(session_id)
            assert loaded_data is not None
            assert loaded_data["rows_processed"] == 100
            assert loaded_data["stage"] == "LLMInvocation"

    def test_checkpoint_list(self):
        """Test listing checkpoints."""
        from uuid import uuid4

        from statekeep import FileCheckpointStorage as LocalFileCheckpointStorage

        with tempfile.TemporaryDirectory() as temp_dir:
            storage = LocalFileCheckpointStorage(Path(temp_dir))

            # Create multiple checkpoints
            session_ids = [uuid4() for _ in range(3)]
            for sid in session_ids:
                storage.save(sid, {"test": "data"})

            # List checkpoints
            checkpoints = storage.list_checkpoints()
            assert len(checkpoints) >= 3

    def test_checkpoint_delete(self):
        """Test deleting checkpoints."""
        from uuid import uuid4

        from statekeep import FileCheckpointStorage as LocalFileCheckpointStorage

        with tempfile.TemporaryDirectory() as temp_dir:
            storage = LocalFileCheckpointStorage(Path(temp_dir))
            session_id = uuid4()

            # Save and then delete
            storage.save(session_id, {"test": "data"})
            success = storage.delete(session_id)
            assert success is True

            # Verify deleted
            loaded = storage.load(session_id)
            assert loaded is None


class TestVerifyFunctionality:
    @pytest.fixture
    def temp_dir(self):
        with tempfile.TemporaryDirectory() as d:
            yield Path(d)

    def test_claim_17_checkpointing_roundtrip(self, temp_dir):
        """Claim 17: Checkpointing — save and load cycle preserves data."""
        from uuid import uuid4

        from statekeep import FileCheckpointStorage as LocalFileCheckpointStorage

        storage = LocalFileCheckpointStorage(checkpoint_dir=temp_dir)
        session_id = uuid4()
        data = {"rows_processed": 500, "results": [1, 2, 3]}

        storage.save(session_id, data)
        assert storage.exists(session_id)

        loaded = storage.load(session_id)
        assert loaded["rows_processed"] == 500
        assert loaded["results"] == [1, 2, 3]
