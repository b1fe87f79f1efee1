"""The local snapshot acceptance tests (tests/test_store.py) again, with ``remote=``.

Every ``StateStore`` those tests make is given a remote here, a fresh DirectoryRemote or
a fresh prefix on SeaweedFS per test: each save then also publishes, each listing also
reads the remote, and each load of the latest state first looks for a newer remote one.
The tests themselves are unchanged. Those that cannot hold with a remote say why below.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import statekeep
import test_store
from statekeep import _manifest, _remote_states
from statekeep.remote import DirectoryRemote, Remote, S3Remote
from test_store import (
    TestLoad,
    TestMetadata,
    TestMissingComponents,
    TestNames,
    TestRegister,
    TestSave,
    TestStateExists,
    make_store,
)

__all__ = [
    "TestListing",
    "TestLoad",
    "TestLoadLatest",
    "TestMetadata",
    "TestMissingComponents",
    "TestNames",
    "TestRegister",
    "TestSave",
    "TestStateExists",
]


@pytest.fixture(autouse=True, params=["directory", "s3"])
def with_remote(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Remote]:
    """Every StateStore made by test_store's tests publishes to one fresh remote."""
    remote: Remote
    if request.param == "directory":
        remote = DirectoryRemote(tmp_path / "the-remote")
    else:
        bucket = request.getfixturevalue("s3_bucket")
        client = request.getfixturevalue("s3_client")
        remote = S3Remote(f"s3://{bucket}/{uuid.uuid4().hex}", client=client)

    class RemoteStateStore(statekeep.StateStore):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("remote", remote)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(test_store, "StateStore", RemoteStateStore)
    # Listings say where each state lives: compare the rest, as the local tests do.
    real = statekeep.StateStore.list_states

    def list_states(self: statekeep.StateStore) -> list[statekeep.StateInfo]:
        return [dataclasses.replace(s, location="local") for s in real(self)]

    monkeypatch.setattr(RemoteStateStore, "list_states", list_states)
    yield remote
    # What the test saved is on the remote, whole: each local state that still verifies
    # is published with the very manifest it has locally, and no remote state is damaged.
    published, bad = _remote_states.read_remote_states(remote)
    assert bad == []
    by_name = {rs.name: rs for rs in published}
    states_dir = tmp_path / "states"
    for path in sorted(states_dir.iterdir()) if states_dir.is_dir() else []:
        try:
            local = _manifest.verify(path)
        except (statekeep.CorruptStateError, FileNotFoundError, NotADirectoryError):
            continue
        assert path.name in by_name, f"{path} was not published"
        # The same state; compared by content, as a test may re-lay out a local manifest.
        theirs = by_name[path.name].manifest
        assert (theirs.sequence, theirs.entries) == (local.sequence, local.entries)


# A local copy that fails verification no longer hides the good remote copy of the same
# state: with a remote, the three tests below that damage local states expect the newer
# state back (replaced by its remote copy) instead of a fallback. The rest run as they are.


class TestListing(test_store.TestListing):
    def test_latest_skips_a_newer_state_whose_manifest_fails(self, states_dir: Path) -> None:
        """The newer state's local manifest is damaged: its remote copy is listed, and a
        load puts it back in place."""
        store, *_ = make_store(states_dir)
        _, newer = store.save_state(), store.save_state()
        manifest = newer / _manifest.MANIFEST_NAME
        raw = manifest.read_bytes()
        manifest.write_bytes(raw.replace(b'"size": 1,', b'"size": 9,', 1))  # head intact
        assert store.latest_state() == newer == store.list_states()[-1].path
        assert store.load_latest_state() == newer
        statekeep.verify_state(newer)


class TestLoadLatest(test_store.TestLoadLatest):
    def test_falls_back_and_logs(self, states_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
        """The two newest local copies are damaged: the newest comes back from the remote."""
        store, value, *_ = make_store(states_dir)
        store.save_state()
        value.value = b"v2"
        flipped = store.save_state()
        value.value = b"v3"
        truncated = store.save_state()
        data = bytearray((flipped / "value").read_bytes())
        data[0] ^= 1
        (flipped / "value").write_bytes(bytes(data))
        os.truncate(truncated / "model.pt", 3)
        value.value = b"current"
        with caplog.at_level(logging.WARNING, logger="statekeep"):
            assert store.load_latest_state() == truncated
        assert value.value == b"v3"
        replaced = [r.getMessage() for r in caplog.records if "replaced it" in r.getMessage()]
        assert len(replaced) == 1
        assert str(truncated) in replaced[0]
        assert "model.pt is 3 bytes, manifest says 100" in replaced[0]
        statekeep.verify_state(truncated)

    def test_none_verifies(self, states_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
        """The only local copy is damaged: the remote copy replaces it and loads."""
        store, *_ = make_store(states_dir)
        path = store.save_state()
        (path / "value").unlink()
        with caplog.at_level(logging.WARNING, logger="statekeep"):
            assert store.load_latest_state() == path
        assert "value is missing" in caplog.text
        statekeep.verify_state(path)
