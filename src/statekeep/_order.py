"""What is newest and what may go: the one pure module of ordering and retention.

Nothing here touches the disk or the clock: the store, the keeper and the command give
it what they scanned (and, for the keeper, a way to ask whether a state verifies) and it
answers. Order is the order of commits (promise 6): the highest commit sequence is the
newest; the wall clock only names states. Directories without a readable manifest
(written by older tools, or unreadable) have no sequence: they are ordered by mtime
among themselves, all of them below every state that has one.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

__all__ = [
    "EntryKind",
    "KeepAny",
    "KeepBest",
    "KeepEvery",
    "KeepLatest",
    "RetentionPolicy",
    "StateInfo",
    "oldest_first",
    "plan_removals",
]


class EntryKind(enum.Enum):
    """What a directory of a states dir is, as far as ordering goes."""

    STATE = "state"
    """It has a manifest whose sequence could be read: ordered by that sequence."""
    UNSEQUENCED = "unsequenced"
    """No readable manifest (an older tool's state, or damaged): ordered by mtime, below."""


@dataclass(frozen=True)
class StateInfo:
    """A committed snapshot as listed: where it is, when and in which order it was made.

    Attributes:
        path: the state's directory.
        created_at: when it was committed (UTC, from its manifest; for a directory
            without one, its mtime). Names and policies by time use it, never ordering.
        size_bytes: the payload's size (0 when unknown).
        sequence: its commit sequence: higher is newer, whatever the clock said.
        metadata: the JSON metadata given to ``save_state(metadata=...)``.
        location: ``"local"``, ``"remote"`` or ``"both"``.
    """

    path: Path
    created_at: datetime
    size_bytes: int
    sequence: int = 0
    metadata: Mapping[str, Any] = field(default_factory=dict)
    location: Literal["local", "remote", "both"] = "local"


class Entry(NamedTuple):
    """One directory as a scan saw it: enough to order it, nothing more.

    ``path`` is a str, and this a tuple: a scan of 10,000 states should not build
    10,000 Paths or dataclasses to return one.
    """

    path: str
    kind: EntryKind
    sequence: int = 0
    created: float = 0.0
    """The commit time from the manifest's head (a state), or the mtime (unsequenced)."""

    @property
    def key(self) -> tuple[int, float, str]:
        """Sort key: unsequenced first by mtime, then states by sequence; ties by path."""
        if self.kind is EntryKind.STATE:
            return (1, self.sequence, self.path)
        return (0, self.created, self.path)


def oldest_first(entries: Iterable[Entry]) -> list[Entry]:
    """``entries`` in commit order, oldest first (see :attr:`Entry.key`)."""
    return sorted(entries, key=lambda e: e.key)


@runtime_checkable
class RetentionPolicy(Protocol):
    """**Protocol:** which states to keep; a pure function of the states and the clock.

    ``states`` are oldest first (commit order); ``keep`` returns the paths of those to
    keep. Whatever a policy answers, the keeper never removes the newest state that
    verifies, and a kept state that fails verification does not count: the policy is
    asked again without it. Combine policies with ``|`` or :class:`KeepAny`.
    """

    def keep(self, states: Sequence[StateInfo], now: datetime) -> set[Path]:
        """The paths of ``states`` to keep at time ``now``."""
        ...  # pragma: no cover

    def __or__(self, other: RetentionPolicy) -> RetentionPolicy:
        """A policy keeping what either keeps."""
        ...  # pragma: no cover


class _Combinable:
    def __or__(self, other: RetentionPolicy) -> KeepAny:
        return KeepAny(self, other)  # type: ignore[arg-type]


@dataclass(frozen=True)
class KeepLatest(_Combinable):
    """Keep the newest ``n`` states (``max_keep=n`` is shorthand for this policy).

    Raises:
        ValueError: ``n`` is negative.
    """

    n: int

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 0:
            raise ValueError(f"KeepLatest(n) needs an int n >= 0, got {self.n!r}")

    def keep(self, states: Sequence[StateInfo], now: datetime) -> set[Path]:
        """The last ``n`` of ``states``."""
        return {s.path for s in states[max(len(states) - self.n, 0) :]} if self.n else set()


@dataclass(frozen=True)
class KeepEvery(_Combinable):
    """Keep one state per ``interval`` of time (the newest in each), e.g. hourly or daily.

    Intervals are counted from the Unix epoch in UTC on each state's ``created_at``, so
    ``KeepEvery(timedelta(days=1))`` keeps the last state of each UTC day.

    Raises:
        ValueError: ``interval`` is not positive.
    """

    interval: timedelta

    def __post_init__(self) -> None:
        if not isinstance(self.interval, timedelta) or self.interval <= timedelta(0):
            raise ValueError(
                f"KeepEvery(interval) needs a positive timedelta, got {self.interval!r}"
            )

    def keep(self, states: Sequence[StateInfo], now: datetime) -> set[Path]:
        """For each interval holding a state, the newest (by commit order) in it."""
        width = self.interval.total_seconds()
        newest: dict[int, Path] = {}
        for s in states:  # oldest first: a later state of a bucket replaces an earlier one
            newest[int(s.created_at.timestamp() // width)] = s.path
        return set(newest.values())


@dataclass(frozen=True)
class KeepBest(_Combinable):
    """Keep the best ``n`` states by a numeric metadata ``metric`` (``mode`` min or max).

    States whose metadata lacks the metric, or holds a non-number (or NaN) there, are
    not candidates. Ties go to the newer state.

    Raises:
        ValueError: ``n`` is negative or ``mode`` is not ``"min"``/``"max"``.
    """

    metric: str
    n: int
    mode: Literal["min", "max"] = "min"

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 0:
            raise ValueError(f"KeepBest(n) needs an int n >= 0, got {self.n!r}")
        if self.mode not in ("min", "max"):
            raise ValueError(f"KeepBest(mode) must be 'min' or 'max', got {self.mode!r}")

    def keep(self, states: Sequence[StateInfo], now: datetime) -> set[Path]:
        """The ``n`` states with the lowest (``min``) or highest (``max``) metric."""
        sign = 1.0 if self.mode == "min" else -1.0
        scored = []
        for age, s in enumerate(reversed(states)):  # age 0 is the newest
            value = s.metadata.get(self.metric)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                continue
            try:
                number = float(value)
            except OverflowError:  # an int beyond a float (metadata may hold any JSON int)
                number = math.inf if value > 0 else -math.inf
            scored.append((sign * number, age, s.path))
        scored.sort(key=lambda t: (t[0], t[1]))
        return {path for _, _, path in scored[: self.n]}


@dataclass(frozen=True, init=False)
class KeepAny(_Combinable):
    """Keep every state that any of ``policies`` keeps (``p1 | p2`` builds one)."""

    policies: tuple[RetentionPolicy, ...]

    def __init__(self, *policies: RetentionPolicy) -> None:
        flat: list[RetentionPolicy] = []
        for p in policies:
            if not callable(getattr(p, "keep", None)):
                raise TypeError(f"KeepAny takes retention policies, got {p!r}")
            flat.extend(p.policies if isinstance(p, KeepAny) else (p,))
        object.__setattr__(self, "policies", tuple(flat))

    def keep(self, states: Sequence[StateInfo], now: datetime) -> set[Path]:
        """The union of what each policy keeps."""
        kept: set[Path] = set()
        for p in self.policies:
            kept.update(Path(x) for x in p.keep(states, now))  # a list, or str paths, too
        return kept


def plan_removals(
    states: Sequence[StateInfo],
    policy: RetentionPolicy | None,
    now: datetime,
    is_good: Callable[[StateInfo], bool],
    *,
    remove_all: bool = False,
) -> list[Path]:
    """Which of ``states`` (every candidate directory, oldest first) may go; oldest first.

    ``is_good`` says whether a state verifies (the caller caches it). The rules:

    - ``policy`` None keeps everything; ``remove_all`` (``max_keep=0``) removes everything.
    - A state the policy keeps that is not good does not count: it stays, and the policy
      is asked again without it (so ``KeepLatest(3)`` keeps the 3 newest good states).
    - The newest good state always stays, and so does everything ordered above it
      (damaged states newer than it are left for a person to look at).
    - With no good state at all, nothing is removed.
    """
    if remove_all:
        return [s.path for s in states]
    if policy is None:
        return []
    newest_good = next((i for i in range(len(states) - 1, -1, -1) if is_good(states[i])), None)
    if newest_good is None:
        return []
    keep = {s.path for s in states[newest_good:]}
    candidates = list(states)
    while True:
        # A policy of the user's may answer a list, or paths as str: a kept state must
        # never be missed for its spelling (it would be removed).
        chosen = {Path(p) for p in policy.keep(candidates, now)}
        bad = {s.path for s in candidates if s.path in chosen and not is_good(s)}
        keep |= chosen
        if not bad:
            break
        candidates = [s for s in candidates if s.path not in bad]
    return [s.path for s in states if s.path not in keep]
