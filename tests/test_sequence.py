"""The sequence counter: one number per commit, never repeated by threads or processes."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from conftest import commit
from statekeep import _atomic, _manifest, _sequence


class TestSequence:
    """The store's counter never hands out a number twice."""

    def test_increases_across_commits(self, states_dir: Path) -> None:
        seqs = [
            _manifest.read_manifest(commit(states_dir, {}, f"{i}.s")).sequence for i in range(3)
        ]
        assert seqs == sorted(seqs)
        assert len(set(seqs)) == 3

    @pytest.mark.parametrize("held", [False, True], ids=["per-call", "held-open"])
    def test_threads_get_distinct_numbers(self, states_dir: Path, held: bool) -> None:
        private = _atomic.ensure_private(states_dir, durable=False)
        got: list[int] = []
        lock = threading.Lock()
        counter = _sequence.SequenceCounter(private)

        def take() -> None:
            for _ in range(25):
                value = counter.next() if held else _sequence.next_sequence(private)
                with lock:
                    got.append(value)

        threads = [threading.Thread(target=take) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        counter.close()
        assert sorted(got) == list(range(1, 151))

    def test_held_counter_shares_the_file(self, states_dir: Path) -> None:
        private = _atomic.ensure_private(states_dir, durable=False)
        counter = _sequence.SequenceCounter(private)
        assert counter.next() == 1
        assert _sequence.next_sequence(private) == 2  # another writer, its own open
        assert counter.next() == 3
        counter.close()
        assert counter.next() == 4  # reopened
        counter.close()

    @pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
    def test_forked_child_takes_its_own_lock(self, states_dir: Path) -> None:
        private = _atomic.ensure_private(states_dir, durable=False)
        counter = _sequence.SequenceCounter(private)
        assert counter.next() == 1
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 0 if counter.next() == 2 and counter._fd != -1 else 1
            counter.close()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert counter.next() == 3
        counter.close()
