"""Listing and pruning cases: list_states, latest_state and keeper cleanup over N states."""

from __future__ import annotations

import json
import os
from pathlib import Path

from _harness import Case, timed

import statekeep
from statekeep._manifest import MANIFEST_NAME

KEEP_CHURN = 10  # states added (untimed) and pruned (timed) per cleanup sample


class Small(statekeep.PersistentStateMixin):
    def save_state(self, path: Path) -> None:
        with open(path, "wb", buffering=0) as f:
            f.write(b"x" * 64)


def fill(root: Path, count: int) -> statekeep.StateStore:
    """A store holding ``count`` committed states (written without fsync: setup only)."""
    store = statekeep.StateStore(root, durable=False)
    store.register("component", Small())
    have = sum(1 for e in os.scandir(root) if e.name.endswith(".state"))
    for _ in range(count - have):
        store.save_state()
    return store


def read_manifests(root: Path) -> list[object]:
    """The least a listing must do: scan the directory and parse every manifest."""
    found = []
    with os.scandir(root) as it:
        for entry in it:
            if entry.name.endswith(".state"):
                with open(f"{entry.path}/{MANIFEST_NAME}", "rb") as f:
                    found.append(json.loads(f.read()))
    return found


def listing_cases(tmp: Path, counts: list[int]) -> list[Case]:
    """Each case at the smallest count is the baseline of the same case at larger ones."""
    cases: list[Case] = []
    first = counts[0]
    for count in counts:
        root = tmp / f"states-{count}"
        store = fill(root, count)
        grow = count != first
        keeper = statekeep.LatestStatesKeeper(root, max_keep=count, cleanup_interval=0)

        def cleanup(
            store: statekeep.StateStore = store, keeper: statekeep.LatestStatesKeeper = keeper
        ) -> float:
            for _ in range(KEEP_CHURN):
                store.save_state()
            return timed(keeper.cleanup, 1)

        cases.append(
            Case(
                f"raw_list_{count}",
                f"scandir + parse each manifest, {count:,}",
                lambda root=root: timed(lambda: read_manifests(root), 1),
                baseline=f"raw_list_{first}" if grow else None,
            )
        )
        cases.append(
            Case(
                f"list_{count}",
                f"list_states over {count:,} states",
                lambda store=store: timed(store.list_states, 1),
                baseline=f"list_{first}" if grow else f"raw_list_{count}",
            )
        )
        cases.append(
            Case(
                f"latest_{count}",
                f"latest_state over {count:,} states",
                lambda store=store: timed(store.latest_state, 1),
                baseline=f"latest_{first}" if grow else f"raw_list_{count}",
            )
        )
        cases.append(
            Case(
                f"cleanup_{count}",
                f"keeper.cleanup, {count:,} kept, {KEEP_CHURN} pruned",
                cleanup,
                baseline=f"cleanup_{first}" if grow else None,
            )
        )
    return cases
