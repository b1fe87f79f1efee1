"""The error tree: each error subclasses the builtin a caller would catch, and pickles."""

from __future__ import annotations

import errno
import pickle

import pytest

import statekeep
from statekeep.errors import (
    CorruptCheckpointError,
    CorruptStateError,
    StateExistsError,
    StatekeepError,
    StorageError,
)


class TestHierarchy:
    """Every error is a StatekeepError and the builtin DESIGN.md names."""

    @pytest.mark.parametrize(
        ("error", "builtin"),
        [
            (StateExistsError, FileExistsError),
            (CorruptStateError, ValueError),
            (CorruptCheckpointError, ValueError),
            (StorageError, OSError),
        ],
    )
    def test_subclasses(self, error: type[Exception], builtin: type[Exception]) -> None:
        assert issubclass(error, StatekeepError)
        assert issubclass(error, builtin)
        with pytest.raises(builtin):
            raise error("boom")

    def test_base_is_an_exception(self) -> None:
        assert StatekeepError.__bases__ == (Exception,)

    def test_reexported_at_top_level(self) -> None:
        for name in (
            "StatekeepError",
            "StateExistsError",
            "CorruptStateError",
            "CorruptCheckpointError",
            "StorageError",
        ):
            assert getattr(statekeep, name) is getattr(statekeep.errors, name)
            assert name in statekeep.__all__


class TestPickle:
    """Errors cross process boundaries intact."""

    @pytest.mark.parametrize(
        "error",
        [
            StatekeepError("base"),
            CorruptStateError("state /x failed verification: a is 1 bytes, manifest says 2"),
            CorruptCheckpointError("checkpoint 'abc' could not be read"),
            StorageError("disk went away"),
        ],
    )
    def test_round_trip(self, error: Exception) -> None:
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is type(error)
        assert back.args == error.args
        assert str(back) == str(error)

    def test_state_exists_keeps_errno_and_filename(self) -> None:
        error = StateExistsError(errno.EEXIST, "state /s/a.state already exists", "/s/a.state")
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is StateExistsError
        assert (back.errno, back.strerror, back.filename) == (
            errno.EEXIST,
            "state /s/a.state already exists",
            "/s/a.state",
        )
        assert str(back) == str(error)

    def test_storage_error_with_errno(self) -> None:
        cause = OSError(errno.ENOSPC, "No space left on device")
        error = StorageError(errno.ENOSPC, "could not write /c/x.json", "/c/x.json")
        error.__cause__ = cause
        back = pickle.loads(pickle.dumps(error))
        assert (back.errno, back.filename) == (errno.ENOSPC, "/c/x.json")
        assert isinstance(back, OSError)


class TestEveryError:
    """Every error the module exports is a StatekeepError that pickles."""

    @pytest.mark.parametrize("name", statekeep.errors.__all__)
    def test_exported_error(self, name: str) -> None:
        error_type = getattr(statekeep.errors, name)
        assert issubclass(error_type, StatekeepError)
        error = error_type("what failed and where")
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is error_type
        assert str(back) == str(error)

    def test_validation_error_keeps_key_and_field(self) -> None:
        from statekeep.errors import StateValidationError, StateVersionError

        for error_type in (StateValidationError, StateVersionError):
            error = error_type("stats.pages is not an int", key="crawler", field="stats.pages")
            back = pickle.loads(pickle.dumps(error))
            assert type(back) is error_type
            assert (back.key, back.field, str(back)) == ("crawler", "stats.pages", str(error))
            assert isinstance(back, ValueError)
