"""save_pickle / load_pickle: the opt-in helpers pamiq-core components use."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from statekeep import PersistentStateMixin, StateStore, load_pickle, save_pickle


class Model(PersistentStateMixin):
    def __init__(self) -> None:
        self.weights: dict[str, list[float]] = {}

    def save_state(self, path: Path) -> None:
        save_pickle(self.weights, path)

    def load_state(self, path: Path) -> None:
        self.weights = load_pickle(path)


class TestPickleHelpers:
    """The helpers round-trip objects and fail with the errors their docstrings name."""

    def test_round_trip(self, tmp_path: Path) -> None:
        value = {"a": [1.5, 2.5], "b": {1, 2}, "c": (None, b"\x00\xff")}
        save_pickle(value, tmp_path / "v.pkl")
        assert load_pickle(str(tmp_path / "v.pkl")) == value

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError):
            load_pickle(tmp_path / "absent.pkl")

    def test_not_a_pickle(self, tmp_path: Path) -> None:
        (tmp_path / "junk.pkl").write_bytes(b"not a pickle at all")
        with pytest.raises(pickle.UnpicklingError):
            load_pickle(tmp_path / "junk.pkl")

    def test_unpicklable(self, tmp_path: Path) -> None:
        with pytest.raises((pickle.PicklingError, TypeError, AttributeError)):
            save_pickle(lambda: None, tmp_path / "f.pkl")


class TestInAStore:
    """A pamiq-core style component that pickles is saved, verified and restored."""

    def test_component_round_trip(self, tmp_path: Path) -> None:
        model = Model()
        model.weights = {"layer": [0.25, 0.5]}
        store = StateStore(tmp_path / "states", durable=False)
        store.register("model", model)
        saved = store.save_state()
        model.weights = {}
        store.load_state(saved)
        assert model.weights == {"layer": [0.25, 0.5]}
