"""The local snapshot acceptance tests (tests/test_store.py) again, with ``remote=``.

Every ``StateStore`` those tests make is given a remote here, a fresh DirectoryRemote or
a fresh prefix on SeaweedFS per test: each save then also publishes, each listing also
reads the remote, and each load of the latest state first looks for a newer remote one.
The tests themselves are unchanged. Those that cannot hold with a remote say why below.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import statekeep
import test_store
from statekeep import _manifest, _publish
from statekeep.remote import DirectoryRemote, Remote, S3Remote
from test_store import (
    TestListing,
    TestLoad,
    TestLoadLatest,
    TestMetadata,
    TestMissingComponents,
    TestNames,
    TestRegister,
    TestSave,
    TestStateExists,
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
    published, bad = _publish.read_remote_states(remote)
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
