"""Two processes publishing into one remote prefix while a keeper prunes it."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from statekeep import _remote_prune, _remote_states, _restore
from statekeep.remote import DirectoryRemote, Remote, S3Remote
from test_remote_crash import WORKER, check_restored

KEEP = 3


def keep(
    remote: Remote, stop: threading.Event, removed: list[str], errors: list[BaseException]
) -> None:
    """Prune to KEEP states, pass after pass, until ``stop`` is set."""
    while not stop.wait(0.005):
        try:
            removed.extend(_remote_prune.prune_remote(remote, KEEP))
        except BaseException as exc:
            errors.append(exc)
            return


def run_race(
    tmp_path: Path, url: str, remote: Remote, env: dict[str, str], count: int, rounds: int
) -> None:
    for r in range(rounds):
        procs = []
        for tag in ("a", "b"):
            states = tmp_path / f"r{r}-{tag}"
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(WORKER), "writer", str(states), url, tag, str(count)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env=env,
                    text=True,
                )
            )
        stop = threading.Event()
        errors: list[BaseException] = []
        removed: list[str] = []
        keeper = threading.Thread(target=keep, args=(remote, stop, removed, errors))
        keeper.start()
        outputs = []
        try:
            for p in procs:
                out, err = p.communicate(timeout=300)
                assert p.returncode == 0, err[-3000:]
                outputs.append(out)
        finally:
            stop.set()
            keeper.join(60)
        assert not keeper.is_alive(), "the keeper hung"
        assert errors == []
        saved = {Path(line.split(" ", 2)[2]).name for o in outputs for line in o.splitlines()}
        assert len(saved) == 2 * count, "a writer did not finish"
        removed.extend(_remote_prune.prune_remote(remote, KEEP))  # what the last pass takes
        states, bad = _remote_states.read_remote_states(remote)
        assert bad == []
        # Nothing lost: what is gone was pruned, and the newest KEEP by sequence remain.
        names = [s.name for s in states]
        assert len(names) == KEEP
        assert set(names) | set(removed) >= saved
        seqs = sorted(s.sequence for s in states)
        assert len(set(seqs)) == KEEP
        last = {f"{count - 1}-a.state", f"{count - 1}-b.state"}
        assert names[-1] in last, f"newest remote {names[-1]} is not a last save"
        for rs in states:  # no partial state: every listed state restores and verifies
            target = tmp_path / f"check-{r}-{rs.name}"
            target.mkdir()
            path = _restore.restore_state(remote, rs, target, durable=False)
            gen = check_restored(path, frozenset({"small", "big"}))
            assert rs.name.startswith(f"{gen}-")
        for rs in states:
            remote.delete([f"{_remote_states.STATES}{rs.name}"])


class TestTwoPublishersAndAKeeper:
    """Nothing lost, no exception, no partial state."""

    def test_directory(self, tmp_path: Path, worker_env: dict[str, str]) -> None:
        url = str(tmp_path / "remote")
        run_race(tmp_path, url, DirectoryRemote(url), worker_env, count=30, rounds=3)

    def test_s3(
        self,
        tmp_path: Path,
        worker_env: dict[str, str],
        s3_server: Any,
        s3_bucket: str,
    ) -> None:
        url = f"s3://{s3_bucket}/race"
        env = {**worker_env, **s3_server.env()}
        run_race(tmp_path, url, S3Remote(url, client=s3_server.client()), env, count=15, rounds=1)
