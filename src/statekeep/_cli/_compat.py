"""The seams between the command and the library: metadata, the keeper, retention by age.

Kept in one place so that the command's modules import the library lazily (``ls`` never
imports the keeper) and a user's checkpoint backend without ``delete_older_than`` still
prunes through the protocol's five methods.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any


def metadata_of(manifest: object) -> dict[str, Any]:
    """The manifest's metadata as the caller gave it (``{}`` before manifests carried any).

    The keys statekeep records for itself (``statekeep:...``) are left out, as
    ``list_states()`` leaves them out.
    """
    found = getattr(manifest, "metadata", None)
    if not isinstance(found, Mapping):
        return {}
    return {k: v for k, v in found.items() if not str(k).startswith("statekeep:")}


def policy_class(name: str) -> Any:
    """``statekeep.<name>``: a retention policy class."""
    return getattr(importlib.import_module("statekeep"), name)


def keeper(states_dir: str, pattern: str, max_keep: int, policy: Any) -> Any:
    """A LatestStatesKeeper for one pass (never started): ``max_keep`` or ``policy``."""
    from statekeep._keeper import LatestStatesKeeper

    if policy is None:
        return LatestStatesKeeper(states_dir, pattern, max_keep=max_keep, cleanup_interval=0)
    return LatestStatesKeeper(states_dir, pattern, cleanup_interval=0, policy=policy)


def plan(keeper: Any) -> list[Path]:
    """What one cleanup pass would remove now, removing nothing."""
    return list(keeper.plan())


def delete_older_than(storage: Any, age: timedelta, now: datetime) -> int:
    """``storage.delete_older_than(age)``, or the same through the protocol's five methods."""
    method = getattr(storage, "delete_older_than", None)
    if method is not None:
        return int(method(age))
    removed = 0
    for info in storage.list_checkpoints():
        if now - info.timestamp > age and storage.delete(info.session_id):
            removed += 1
    return removed
