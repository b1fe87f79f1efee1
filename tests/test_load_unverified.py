"""load_state(verify=False): the missing-components check reads only the manifest's head.

The names a store recorded are taken from the metadata line at the head of the manifest
(one bounded read, no parse of the file list); whenever that line cannot give them, the
whole manifest is read as before. Either way, no component is called when one is missing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from statekeep import MissingComponentsError, PersistentStateMixin, StateStore
from statekeep._manifest import MANIFEST_NAME
from statekeep._scan import recorded_components


class Value(PersistentStateMixin):
    """A component that writes one file, and counts its loads."""

    def __init__(self, value: bytes = b"") -> None:
        self.value = value
        self.loads = 0

    def save_state(self, path: Path) -> None:
        path.write_bytes(self.value)

    def load_state(self, path: Path) -> None:
        self.loads += 1
        self.value = path.read_bytes()


def _save(states_dir: Path, names: list[str], **metadata: object) -> Path:
    store = StateStore(states_dir, durable=False)
    for name in names:
        store.register(name, Value(name.encode()))
    return store.save_state(metadata=metadata)


def _loader(states_dir: Path, names: list[str]) -> tuple[StateStore, list[Value]]:
    store = StateStore(states_dir, durable=False)
    values = [Value(b"untouched") for _ in names]
    for name, value in zip(names, values, strict=True):
        store.register(name, value)
    return store, values


class TestRecordedComponents:
    def test_names_from_the_head(self, states_dir: Path) -> None:
        saved = _save(states_dir, ["a", "b"], step=3)
        assert recorded_components(str(saved)) == ["a", "b"]

    def test_none_when_the_metadata_does_not_fit_in_the_head(self, states_dir: Path) -> None:
        saved = _save(states_dir, ["a"], blob="x" * (1 << 17))
        assert recorded_components(str(saved)) is None

    def test_none_for_a_manifest_laid_out_otherwise(self, states_dir: Path) -> None:
        saved = _save(states_dir, ["a"])
        manifest = saved / MANIFEST_NAME
        manifest.write_bytes(manifest.read_bytes().replace(b'"version": 3', b'"version": 4'))
        assert recorded_components(str(saved)) is None
        manifest.write_bytes(b"{}")
        assert recorded_components(str(saved)) is None

    def test_none_for_bytes_that_are_not_text(self, states_dir: Path) -> None:
        saved = _save(states_dir, ["a"])
        manifest = saved / MANIFEST_NAME
        raw = manifest.read_bytes()
        assert b'["a"]' in raw
        manifest.write_bytes(raw.replace(b'["a"]', b'["\xff"]'))
        assert recorded_components(str(saved)) is None

    def test_none_without_a_manifest_or_a_state(self, states_dir: Path) -> None:
        saved = _save(states_dir, ["a"])
        assert recorded_components(str(saved.parent / "gone.state")) is None
        (saved / MANIFEST_NAME).unlink()
        assert recorded_components(str(saved)) is None

    @pytest.mark.timeout(20)
    def test_a_fifo_manifest_is_not_read(self, states_dir: Path) -> None:
        saved = _save(states_dir, ["a"])
        (saved / MANIFEST_NAME).unlink()
        os.mkfifo(saved / MANIFEST_NAME)
        assert recorded_components(str(saved)) is None

    def test_a_linked_manifest_is_not_followed(self, states_dir: Path, tmp_path: Path) -> None:
        saved = _save(states_dir, ["a"])
        outside = tmp_path / "outside.json"
        os.rename(saved / MANIFEST_NAME, outside)
        os.symlink(outside, saved / MANIFEST_NAME)
        assert recorded_components(str(saved)) is None


class TestUnverifiedLoadRefusesMissingComponents:
    def test_refused_before_any_component_is_called(self, states_dir: Path) -> None:
        saved = _save(states_dir, ["model"])
        store, (model, scheduler) = _loader(states_dir, ["model", "scheduler"])
        with pytest.raises(MissingComponentsError) as info:
            store.load_state(saved, verify=False)
        assert (info.value.missing, info.value.present) == (("scheduler",), ("model",))
        assert model.loads == scheduler.loads == 0
        store.load_state(saved, verify=False, allow_missing=True)
        assert (model.value, model.loads, scheduler.loads) == (b"model", 1, 0)

    def test_a_component_that_wrote_nothing_is_held(self, states_dir: Path) -> None:
        store = StateStore(states_dir, durable=False)
        store.register("a", Value(b"A"))
        store.register("empty", PersistentStateMixin())
        saved = store.save_state()
        loader, (a,) = _loader(states_dir, ["a"])
        loader.register("empty", PersistentStateMixin())
        loader.load_state(saved, verify=False)  # "empty" was recorded: not missing
        assert (a.value, a.loads) == (b"A", 1)

    def test_metadata_beyond_the_head_still_checked(self, states_dir: Path) -> None:
        saved = _save(states_dir, ["model"], blob="x" * (1 << 17))
        store, (model, scheduler) = _loader(states_dir, ["model", "scheduler"])
        with pytest.raises(MissingComponentsError) as info:
            store.load_state(saved, verify=False)
        assert info.value.missing == ("scheduler",)
        assert model.loads == scheduler.loads == 0

    def test_missing_state_is_file_not_found(self, states_dir: Path) -> None:
        store, _ = _loader(states_dir, ["a"])
        with pytest.raises(FileNotFoundError):
            store.load_state(states_dir / "nope.state", verify=False)
