"""Pruning a remote: the keeper's rules applied to its states, and its debris reclaimed."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from pathlib import Path

from statekeep import _scan
from statekeep._order import RetentionPolicy, plan_removals
from statekeep._remote_states import (
    DATA,
    SEQ,
    STATES,
    RemoteState,
    read_remote_states,
    verify_listing,
)
from statekeep.remote._base import Remote

__all__ = ["GRACE", "Chooser", "by_policy", "keep_latest", "plan_prune", "prune_remote"]

logger = logging.getLogger("statekeep")

GRACE = timedelta(hours=1)

Chooser = Callable[[list[RemoteState], Callable[[RemoteState], bool]], Iterable[str]]


def keep_latest(max_keep: int) -> Chooser:
    """A chooser removing all but the newest ``max_keep`` (never the newest that verifies)."""

    def choose(states: list[RemoteState], verifies: Callable[[RemoteState], bool]) -> list[str]:
        if max_keep < 0:
            return []
        doomed = states[: max(len(states) - max_keep, 0)]
        if max_keep > 0:
            newest_good = next((rs for rs in reversed(states) if verifies(rs)), None)
            doomed = [rs for rs in doomed if rs is not newest_good]
        return [rs.name for rs in doomed]

    return choose


def by_policy(
    policy: RetentionPolicy | None, pattern: str, now: datetime, *, remove_all: bool = False
) -> Chooser:
    """A chooser applying the local keeper's rules (:func:`statekeep._order.plan_removals`)
    to the remote states whose names match ``pattern``."""

    def choose(states: list[RemoteState], verifies: Callable[[RemoteState], bool]) -> list[str]:
        states = [rs for rs in states if fnmatch.fnmatchcase(rs.name, pattern)]
        infos = [_scan.info_of(Path(rs.name), rs.manifest) for rs in states]
        by_name = {rs.name: rs for rs in states}
        paths = plan_removals(
            infos, policy, now, lambda i: verifies(by_name[i.path.name]), remove_all=remove_all
        )
        return [p.name for p in paths]

    return choose


def _doomed(remote: Remote, states: list[RemoteState], choose: Chooser) -> list[RemoteState]:
    """The states ``choose`` removes, oldest first (verifying by one LIST each, on demand)."""
    checked: dict[str, bool] = {}

    def verifies(rs: RemoteState) -> bool:
        if rs.name not in checked:
            checked[rs.name] = verify_listing(remote, rs)
        return checked[rs.name]

    names = set(choose(states, verifies))
    return [rs for rs in states if rs.name in names]


def plan_prune(remote: Remote, choose: Chooser) -> list[str]:
    """The names of the states :func:`prune_remote` would remove now; removes nothing.

    Raises:
        StorageError: the remote failed.
    """
    states, _ = read_remote_states(remote)
    return [rs.name for rs in _doomed(remote, states, choose)]


def prune_remote(
    remote: Remote,
    max_keep: int = -1,
    *,
    choose: Chooser | None = None,
    grace: timedelta = GRACE,
    now: datetime | None = None,
) -> list[str]:
    """Remove old remote states; return the names removed, oldest first.

    ``choose`` (the keeper passes its retention rules) names the states to remove from
    all of them, oldest first, given a test of whether a state verifies (its files are
    all listed with their sizes: one LIST); by default all but the newest ``max_keep``
    go, never the newest that verifies. Each removal deletes the manifest first (the
    state is gone from that instant), then its files in batches. Files whose manifest
    never arrived (a killed publisher), damaged manifests, stale uploads and sequence
    markers below every kept state go once older than ``grace``.
    """
    now = now or datetime.now(timezone.utc)
    states, bad = read_remote_states(remote)
    doomed = _doomed(remote, states, choose or keep_latest(max_keep))
    removed: list[str] = []
    for rs in doomed:
        remote.delete([f"{STATES}{rs.name}"])
        remote.delete(o.key for o in remote.list(rs.data_prefix()))
        logger.info("statekeep: removed remote state %s", rs.name)
        removed.append(rs.name)
    old = now - grace
    bad_names = {name for name, _ in bad}
    if bad_names:
        for obj in remote.list(STATES):
            if obj.key[len(STATES) :] in bad_names and obj.modified < old:
                remote.delete([obj.key])
                logger.warning("statekeep: removed damaged remote manifest %s", obj.key)
    live = {(rs.name, rs.token) for rs in states if rs.name not in removed}
    orphans: dict[tuple[str, str], list[str]] = {}
    young: set[tuple[str, str]] = set()
    for obj in remote.list(DATA):
        parts = obj.key[len(DATA) :].split("/", 2)
        if len(parts) < 3:
            continue
        group = (parts[0], parts[1])
        if group in live:
            continue
        orphans.setdefault(group, []).append(obj.key)
        if obj.modified >= old:
            young.add(group)
    for group, keys in orphans.items():
        if group not in young and group not in live:
            remote.delete(keys)
            logger.info("statekeep: reclaimed unpublished files of %s", group[0])
    kept = [rs.sequence for rs in states if rs.name not in removed]
    markers = [o.key for o in remote.list(SEQ)]
    if markers:
        floor = min(kept) if kept else None
        drop = [
            k
            for k in markers[:-1]  # the highest marker stays: the counter never goes back
            if k[len(SEQ) :].isdigit() and (floor is None or int(k[len(SEQ) :]) < floor)
        ]
        remote.delete(drop)
    abort = getattr(remote, "abort_incomplete", None)
    if callable(abort):
        abort(grace)
    return removed
