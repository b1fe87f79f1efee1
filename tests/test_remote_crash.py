"""kill -9 at random moments while states are committed and published to a remote.

A zygote (tests/crashworkers/publish_worker.py) imports statekeep once and forks one
saver per kill. After each kill: the remote lists no partial state (every listed state
restores and verifies, unmixed), every save that returned is complete on the remote,
a state committed locally but not published is published by the next saver's first
save, and remote sequences follow the order of the saves. Runs over a DirectoryRemote
(most kills: fast) and SeaweedFS.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from crashworkers.snapshot_worker import payload
from statekeep import _atomic, _remote_prune, _remote_states, _restore
from statekeep.remote import DirectoryRemote, Remote, S3Remote
from test_crash_snapshots import LineReader

WORKER = Path(__file__).parent / "crashworkers" / "publish_worker.py"
DIRECTORY_KILLS = 100
S3_KILLS = 30


def check_restored(path: Path, expect: frozenset[str] = frozenset({"small", "tree", "big"})) -> int:
    """The generation of a complete, unmixed restored state (AssertionError otherwise)."""
    gens = set()
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            if name == ".statekeep-manifest.json":
                continue
            head, _, body = Path(dirpath, name).read_bytes().partition(b"\n")
            gen = int(head)
            assert body == payload(gen, len(body)), f"{dirpath}/{name} is not gen {gen}'s data"
            gens.add(gen)
    assert {p.name for p in path.iterdir()} >= expect, sorted(os.listdir(path))
    assert len(gens) == 1, f"{path} mixes generations {gens}"
    return gens.pop()


@dataclass
class Campaign:
    seed: int
    kills: int = 0
    mid_publish: int = 0  # kills that left a state committed locally but not on the remote
    restored: int = 0
    returned_checked: int = 0
    pending_published: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self, name: str) -> str:
        return (
            f"{name}: {self.kills} kills ({self.mid_publish} between local commit and publish),"
            f" {self.restored} remote states restored and checked, {self.returned_checked}"
            f" returned saves found remote, {self.pending_published} pending states published"
            f" by the next save, {len(self.failures)} failures, {self.seconds:.1f} s"
            f" (STATEKEEP_CRASH_SEED={self.seed})"
        )


class Checker:
    def __init__(self, remote: Remote, states_dir: Path, scratch: Path, run: Campaign) -> None:
        self.remote = remote
        self.states_dir = states_dir
        self.scratch = scratch
        self.run = run
        self.checked: dict[str, int] = {}  # remote name -> sequence
        self.pending: set[str] = set()

    def after_kill(self, saved: list[tuple[int, Path]]) -> None:
        run = self.run
        states, bad = _remote_states.read_remote_states(self.remote)
        if bad:
            run.failures.append(f"kill {run.kills}: damaged remote manifests {bad}")
        by_name = {s.name: s for s in states}
        for rs in states:
            if rs.name in self.checked:
                continue
            target = self.scratch / f"k{run.kills}-{rs.name}"
            target.mkdir()
            try:
                path = _restore.restore_state(self.remote, rs, target, durable=False)
                gen = check_restored(path)
                if f"{gen}.state" != rs.name:
                    run.failures.append(f"kill {run.kills}: {rs.name} holds gen {gen}")
            except Exception as exc:
                run.failures.append(f"kill {run.kills}: remote state {rs.name}: {exc!r}")
            self.checked[rs.name] = rs.sequence
            run.restored += 1
            shutil.rmtree(target)
        for _gen, path in saved:
            run.returned_checked += 1
            if path.name not in by_name:
                run.failures.append(f"kill {run.kills}: returned save {path} not on the remote")
        if saved:  # this saver saved at least once: what the last one left is published now
            for name in self.pending:
                if name in by_name:
                    run.pending_published += 1
                else:
                    run.failures.append(f"kill {run.kills}: pending {name} still not published")
            self.pending = set()
        local = {p.name for p in self.states_dir.iterdir() if p.name.endswith(".state")}
        new_pending = local - set(by_name)
        if new_pending - self.pending:
            run.mid_publish += 1
        self.pending |= new_pending
        ordered = sorted(states, key=lambda s: s.sequence)
        gens = [int(s.name.split(".")[0]) for s in ordered]
        if gens != sorted(gens):
            run.failures.append(f"kill {run.kills}: remote sequence order {gens} is not save order")
        for name in sorted(local, key=lambda n: int(n.split(".")[0]))[:-2]:
            if name in by_name:  # keep the local directory small: published ones may go
                shutil.rmtree(self.states_dir / name)


def run_campaign(
    remote_url: str,
    remote: Remote,
    tmp_path: Path,
    env: dict[str, str],
    kills: int,
    scale: float = 1.0,
) -> Campaign:
    seed = int(os.environ.get("STATEKEEP_CRASH_SEED") or random.randrange(1 << 32))
    rng = random.Random(seed)
    run = Campaign(seed)
    states_dir = tmp_path / "states"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    states_dir.mkdir()
    checker = Checker(remote, states_dir, scratch, run)
    start = time.monotonic()
    with open(tmp_path / "worker.err", "w+b") as err:
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), "zygote", str(states_dir), remote_url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
            bufsize=0,
        )
        assert proc.stdin is not None
        assert proc.stdout is not None
        reader = LineReader(proc.stdout.fileno())
        try:
            for k in range(kills):
                base = (k + 1) * 1_000_000
                proc.stdin.write(f"go {base} {rng.randrange(1 << 32)} {k % 2}\n".encode())
                kind, pid_text = reader.line().split()
                assert kind == "pid", kind
                dice = rng.random()
                delay = rng.uniform(0, 0.03) if dice < 0.7 else rng.uniform(0.03, 0.15)
                lines = reader.lines_for(delay * scale)
                os.kill(int(pid_text), signal.SIGKILL)
                while not lines or not lines[-1].startswith("exit "):
                    lines.append(reader.line())
                run.kills += 1
                status = int(lines[-1].split()[2])
                if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
                    err.seek(0)
                    run.failures.append(f"kill {k}: saver ended {status}: {err.read()[-2000:]!r}")
                saved = [(int(g), Path(p)) for _, g, p in (ln.split(" ", 2) for ln in lines[:-1])]
                checker.after_kill(saved)
            proc.stdin.write(b"quit\n")
        finally:
            reader.close()
            proc.stdin.close()
            proc.stdout.close()
            if proc.wait(timeout=30) != 0:
                run.failures.append(f"the zygote exited with {proc.returncode}")
    run.seconds = time.monotonic() - start
    return run


def assert_campaign(run: Campaign, remote: Remote, kills: int, min_mid: int) -> None:
    assert run.failures == [], "\n".join(run.failures[:20])
    assert run.kills == kills
    assert run.returned_checked > 0
    assert run.mid_publish >= min_mid, "too few kills landed between commit and publish"
    assert run.pending_published > 0
    # The keeper's sweep (grace 0) reclaims every file a killed publisher left unpublished.
    states, _ = _remote_states.read_remote_states(remote)
    _remote_prune.prune_remote(remote, -1, grace=timedelta(0))
    live = {rs.data_prefix() for rs in states}
    stray = [o.key for o in remote.list("data/") if not any(o.key.startswith(p) for p in live)]
    assert stray == []


class TestKillDuringPublish:
    """A saver SIGKILLed while publishing never leaves a partial state on the remote."""

    def test_directory_remote(
        self, tmp_path: Path, worker_env: dict[str, str], crash_report: list[str]
    ) -> None:
        url = str(tmp_path / "remote")
        remote = DirectoryRemote(url)
        run = run_campaign(url, remote, tmp_path, worker_env, DIRECTORY_KILLS)
        crash_report.append(run.summary("publish to a directory"))
        assert_campaign(run, remote, DIRECTORY_KILLS, DIRECTORY_KILLS // 10)

    def test_s3_remote(
        self,
        tmp_path: Path,
        worker_env: dict[str, str],
        crash_report: list[str],
        s3_server: Any,
        s3_bucket: str,
    ) -> None:
        url = f"s3://{s3_bucket}/crash"
        env = {**worker_env, **s3_server.env()}
        remote = S3Remote(url, client=s3_server.client())
        # A request to SeaweedFS takes milliseconds: kills land later.
        run = run_campaign(url, remote, tmp_path, env, S3_KILLS, scale=4.0)
        crash_report.append(run.summary("publish to SeaweedFS"))
        assert_campaign(run, remote, S3_KILLS, 2)  # seen: 3 to 17 of 30


REPAIR_KILLS = 30


class TestKillDuringRepair:
    """A loader SIGKILLed while it replaces a damaged local copy by the remote one."""

    def test_directory_remote(
        self, tmp_path: Path, worker_env: dict[str, str], crash_report: list[str]
    ) -> None:
        """After every kill the state is still there under its name (the damaged copy or
        the good one, never neither), and a fresh store loads it whole."""
        from statekeep import PersistentStateMixin, StateStore, verify_state

        seed = int(os.environ.get("STATEKEEP_CRASH_SEED") or random.randrange(1 << 32))
        rng = random.Random(seed)
        url = str(tmp_path / "remote")
        states_dir = tmp_path / "states"
        parts = {f"p{i}": bytes([i]) * (256 << 10) for i in range(8)}  # 2 MB in 8 files

        class Blob(PersistentStateMixin):
            def __init__(self) -> None:
                self.parts: dict[str, bytes] = {}

            def save_state(self, path: Path) -> None:
                path.mkdir()
                for name, data in parts.items():
                    (path / name).write_bytes(data)

            def load_state(self, path: Path) -> None:
                self.parts = {p.name: p.read_bytes() for p in path.iterdir()}

        store = StateStore(states_dir, remote=url, state_name_format="s%f.state")
        store.register("blob", Blob())
        store.save_state()
        newest = store.save_state()
        start = time.monotonic()
        outcomes = {"repaired": 0, "damaged": 0, "gone": 0}
        exchange = _atomic._renameat2 is not None
        failures: list[str] = []
        took = 0.05
        for k in range(REPAIR_KILLS + 1):
            victim = newest / "blob" / f"p{rng.randrange(8)}"
            os.truncate(victim, rng.randrange(256 << 10))
            proc = subprocess.Popen(
                [sys.executable, str(WORKER), "repair", str(states_dir), url],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=worker_env,
                bufsize=0,
            )
            assert proc.stdin is not None
            assert proc.stdout is not None
            try:
                assert proc.stdout.readline() == b"ready\n"
                began = time.monotonic()
                proc.stdin.write(b"go\n")
                if k == 0:  # one whole run, unkilled: how long a repair takes here
                    line = proc.stdout.readline().decode()
                    took = time.monotonic() - began
                    assert line == f"loaded {newest}\n", line
                else:
                    time.sleep(rng.uniform(0, took * 1.2))  # a random moment of the repair
                    proc.kill()
            finally:
                proc.stdin.close()
                proc.stdout.close()
                proc.wait(timeout=30)
            try:
                verify_state(newest)
                outcomes["repaired"] += 1
            except FileNotFoundError:
                # Only where the kernel cannot exchange two directories (the damaged one
                # is then discarded before ours is renamed in): the remote copy stays.
                if exchange:
                    failures.append(f"kill {k}: {newest} is gone")
                outcomes["gone"] += 1
            except Exception:
                outcomes["damaged"] += 1
            fresh = StateStore(states_dir, remote=url)  # sweeps what the kill left
            blob = Blob()
            fresh.register("blob", blob)
            if fresh.load_latest_state() != newest or blob.parts != parts:
                failures.append(f"kill {k}: the fresh load did not give the newest state whole")
            # A kill inside mkdir-then-lock leaves a young ``.pending``: the sweep takes it
            # once it is old (core's rule); every other private entry must be gone now.
            private = [
                n
                for n in os.listdir(states_dir)
                if n.startswith(".") and not n.endswith(".pending")
            ]
            if private:
                failures.append(f"kill {k}: private entries left after a sweep: {private}")
        crash_report.append(
            f"repair from a directory remote: {REPAIR_KILLS} kills, {outcomes['repaired']}"
            f" left the good copy, {outcomes['damaged']} the damaged one,"
            f" {outcomes['gone']} neither, {len(failures)}"
            f" failures, {time.monotonic() - start:.1f} s (STATEKEEP_CRASH_SEED={seed})"
        )
        assert failures == [], failures
        assert sum(outcomes.values()) == REPAIR_KILLS + 1
