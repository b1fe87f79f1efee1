"""_order: what is newest and what may go, as pure functions of the states and the clock."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from statekeep import KeepAny, KeepBest, KeepEvery, KeepLatest, RetentionPolicy, StateInfo
from statekeep._order import Entry, EntryKind, oldest_first, plan_removals

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def state(i: int, *, hours: float = 0.0, **metadata: float) -> StateInfo:
    return StateInfo(Path(f"/s/{i:03}.state"), T0 + timedelta(hours=hours), 1, i, metadata)


def paths(*ids: int) -> set[Path]:
    return {Path(f"/s/{i:03}.state") for i in ids}


class TestOrder:
    """Newest is the highest sequence; unsequenced entries sit below, by mtime."""

    def test_sequence_beats_time_and_name(self) -> None:
        a = Entry("/s/z", EntryKind.STATE, sequence=1, created=2e9)
        b = Entry("/s/a", EntryKind.STATE, sequence=2, created=1e9)
        assert oldest_first([b, a]) == [a, b]

    def test_unsequenced_below_every_state_by_mtime(self) -> None:
        s = Entry("/s/s", EntryKind.STATE, sequence=1, created=0.0)
        old = Entry("/s/old", EntryKind.UNSEQUENCED, created=5.0)
        new = Entry("/s/new", EntryKind.UNSEQUENCED, created=9e9)
        assert oldest_first([s, new, old]) == [old, new, s]


class TestPolicies:
    """Each policy is a pure function of (states, now)."""

    def test_keep_latest(self) -> None:
        states = [state(i) for i in range(5)]
        assert KeepLatest(2).keep(states, T0) == paths(3, 4)
        assert KeepLatest(0).keep(states, T0) == set()
        assert KeepLatest(9).keep(states, T0) == paths(0, 1, 2, 3, 4)

    @pytest.mark.parametrize("n", [-1, 1.5, True])
    def test_keep_latest_refuses(self, n: object) -> None:
        with pytest.raises(ValueError, match="KeepLatest"):
            KeepLatest(n)  # type: ignore[arg-type]

    def test_keep_every_keeps_the_newest_of_each_interval(self) -> None:
        # Commit order, not the clock, decides "newest": sequence 3 ran with a clock that
        # had stepped back into hour 0, so it is hour 0's newest.
        states = [
            state(0, hours=0.1),
            state(1, hours=0.5),
            state(2, hours=1.2),
            state(3, hours=0.2),
        ]
        assert KeepEvery(timedelta(hours=1)).keep(states, T0) == paths(2, 3)

    def test_keep_every_refuses_a_non_positive_interval(self) -> None:
        with pytest.raises(ValueError, match="positive timedelta"):
            KeepEvery(timedelta(0))

    def test_keep_best(self) -> None:
        states = [state(0, loss=0.5), state(1, loss=0.1), state(2), state(3, loss=0.3)]
        states.append(state(4, loss=float("nan")))
        assert KeepBest("loss", 2).keep(states, T0) == paths(1, 3)
        assert KeepBest("loss", 1, "max").keep(states, T0) == paths(0)
        assert KeepBest("loss", 0).keep(states, T0) == set()

    def test_keep_best_ties_go_to_the_newer(self) -> None:
        states = [state(0, loss=1.0), state(1, loss=1.0)]
        assert KeepBest("loss", 1).keep(states, T0) == paths(1)

    def test_keep_best_refuses_a_bad_mode(self) -> None:
        with pytest.raises(ValueError, match="'min' or 'max'"):
            KeepBest("loss", 1, "median")  # type: ignore[arg-type]

    def test_any_and_or(self) -> None:
        states = [state(0, loss=0.1), state(1, loss=0.9), state(2, loss=0.8)]
        combined = KeepLatest(1) | KeepBest("loss", 1)
        assert isinstance(combined, KeepAny)
        assert combined.keep(states, T0) == paths(0, 2)
        assert KeepAny(combined, KeepLatest(2)).policies == (
            KeepLatest(1),
            KeepBest("loss", 1),
            KeepLatest(2),
        )
        assert isinstance(combined, RetentionPolicy)

    def test_any_refuses_what_is_not_a_policy(self) -> None:
        with pytest.raises(TypeError, match="retention policies"):
            KeepAny(3)  # type: ignore[arg-type]


class TestPlanRemovals:
    """Damaged states never count as kept; the newest good state always stays."""

    def test_a_damaged_newest_is_not_counted_and_not_removed(self) -> None:
        states = [state(i) for i in range(4)]
        good = paths(0, 1, 2)
        removed = plan_removals(states, KeepLatest(1), T0, lambda s: s.path in good)
        assert set(removed) == paths(0, 1)  # 2 is the newest good; 3 is newer: left alone

    def test_damaged_states_among_the_kept_do_not_count(self) -> None:
        states = [state(i) for i in range(6)]
        good = paths(0, 1, 2, 5)
        removed = plan_removals(states, KeepLatest(3), T0, lambda s: s.path in good)
        assert set(removed) == paths(0)  # keeps 5, 2, 1 (good) and 4, 3 (damaged, uncounted)

    def test_nothing_goes_when_nothing_verifies(self) -> None:
        states = [state(i) for i in range(3)]
        assert plan_removals(states, KeepLatest(1), T0, lambda s: False) == []

    def test_no_policy_keeps_all_and_remove_all_removes_all(self) -> None:
        states = [state(i) for i in range(3)]
        assert plan_removals(states, None, T0, lambda s: True) == []
        everything = plan_removals(states, None, T0, lambda s: True, remove_all=True)
        assert everything == [s.path for s in states]

    def test_removals_come_oldest_first(self) -> None:
        states = [state(i) for i in range(5)]
        assert plan_removals(states, KeepLatest(2), T0, lambda s: True) == sorted(paths(0, 1, 2))


def _policies() -> st.SearchStrategy[RetentionPolicy]:
    leaf: st.SearchStrategy[RetentionPolicy] = st.one_of(
        st.builds(KeepLatest, st.integers(0, 6)),
        st.builds(KeepEvery, st.timedeltas(timedelta(minutes=1), timedelta(days=2))),
        st.builds(KeepBest, st.just("loss"), st.integers(0, 4), st.sampled_from(["min", "max"])),
    )
    return st.recursive(
        leaf, lambda inner: st.builds(lambda a, b: a | b, inner, inner), max_leaves=4
    )


@st.composite
def _scenario(draw: st.DrawFn) -> tuple[list[StateInfo], set[Path]]:
    n = draw(st.integers(0, 25))
    states = []
    for i in range(n):
        hours = draw(st.floats(-48, 48, allow_nan=False))  # the clock may step any way
        meta = {"loss": draw(st.floats(0, 1))} if draw(st.booleans()) else {}
        states.append(state(i, hours=hours, **meta))
    good = {s.path for s in states if draw(st.booleans())}
    return states, good


class TestProperties:
    """Hypothesis: no combination of policies ever removes the newest good state."""

    @settings(max_examples=300, deadline=None)
    @given(_scenario(), _policies())
    def test_newest_good_state_stays(
        self, scenario: tuple[list[StateInfo], set[Path]], policy: RetentionPolicy
    ) -> None:
        states, good = scenario
        removed = set(plan_removals(states, policy, T0, lambda s: s.path in good))
        assert removed <= {s.path for s in states}
        good_order = [s.path for s in states if s.path in good]
        if good_order:
            newest = good_order[-1]
            assert newest not in removed
            # nor anything newer than it (damaged states left for a person)
            after = [s.path for s in states[[s.path for s in states].index(newest) :]]
            assert not removed & set(after)
        else:
            assert removed == set()

    @settings(max_examples=200, deadline=None)
    @given(_scenario(), st.integers(1, 6))
    def test_keep_latest_keeps_the_n_newest_good(
        self, scenario: tuple[list[StateInfo], set[Path]], n: int
    ) -> None:
        states, good = scenario
        removed = set(plan_removals(states, KeepLatest(n), T0, lambda s: s.path in good))
        good_order = [s.path for s in states if s.path in good]
        assert not removed & set(good_order[-n:])
        assert set(good_order[:-n]) <= removed

    @settings(max_examples=200, deadline=None)
    @given(_scenario(), _policies())
    def test_pure(
        self, scenario: tuple[list[StateInfo], set[Path]], policy: RetentionPolicy
    ) -> None:
        states, _ = scenario
        assert policy.keep(states, T0) == policy.keep(list(states), T0)
        assert policy.keep(states, T0) <= {s.path for s in states}
