"""kill -9 at random moments during StateStore.save_state, then check every promise.

A zygote process (tests/crashworkers/snapshot_worker.py) imports statekeep once and
forks one saver per kill, so each kill costs a fork rather than an interpreter start.
The default run makes a few hundred kills; ``nox -s crash`` (STATEKEEP_CRASH_CAMPAIGN=long,
``pytest -m crash``) makes thousands. Set STATEKEEP_CRASH_SEED to replay a campaign.
"""

from __future__ import annotations

import os
import random
import selectors
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from crashworkers.snapshot_worker import check_state
from statekeep import StateStore, _atomic, _manifest

DEFAULT_KILLS = 200
LONG_KILLS = 2500


class LineReader:
    """Reads lines from a pipe with deadlines (no sleeping, no blocking forever)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""
        self.selector = selectors.DefaultSelector()
        self.selector.register(fd, selectors.EVENT_READ)

    def close(self) -> None:
        self.selector.close()

    def _fill(self, timeout: float) -> bool:
        if not self.selector.select(max(timeout, 0.0)):
            return False
        chunk = os.read(self.fd, 1 << 16)
        if not chunk:
            raise EOFError("the worker closed its stdout")
        self.buf += chunk
        return True

    def _pop(self) -> str | None:
        if b"\n" not in self.buf:
            return None
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()

    def line(self, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while (line := self._pop()) is None:
            if not self._fill(deadline - time.monotonic()):
                raise TimeoutError(f"no line from the worker within {timeout} s")
        return line

    def lines_for(self, seconds: float) -> list[str]:
        """Every line that arrives within ``seconds`` (the random delay before a kill)."""
        deadline = time.monotonic() + seconds
        lines: list[str] = []
        while True:
            while (line := self._pop()) is not None:
                lines.append(line)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._fill(remaining):
                return lines


@dataclass
class Campaign:
    seed: int
    kills: int = 0
    mid_save: int = 0  # kills that left a save's work entry behind
    states: set[Path] = field(default_factory=set)
    returned_checked: int = 0
    reclaimed: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self, name: str) -> str:
        return (
            f"{name}: {self.kills} kills ({self.mid_save} mid-save), "
            f"{len(self.states)} states checked, {self.returned_checked} returned paths re-checked,"
            f" {self.reclaimed} debris entries reclaimed, {len(self.failures)} failures,"
            f" {self.seconds:.1f} s (STATEKEEP_CRASH_SEED={self.seed})"
        )


def _debris(states_dir: Path) -> list[str]:
    return [n for n in os.listdir(states_dir) if _atomic.is_private(n)]


def check_after_kill(states_dir: Path, saved: list[tuple[int, Path]], run: Campaign) -> None:
    """Check the store after one kill; append what is wrong to ``run.failures``."""
    before = _debris(states_dir)
    if any(n.endswith(".work") for n in before):
        run.mid_save += 1
    store = StateStore(states_dir)  # a new store sweeps what the killed save left
    after = _debris(states_dir)
    run.reclaimed += len(set(before) - set(after))
    if [n for n in after if not n.endswith(".pending")]:
        run.failures.append(f"kill {run.kills}: debris not reclaimed: {after}")
    listed = store.list_states()
    on_disk = {p for p in states_dir.iterdir() if not _atomic.is_private(p.name)}
    if {s.path for s in listed} != on_disk:
        run.failures.append(
            f"kill {run.kills}: unlisted entries {sorted(on_disk - {s.path for s in listed})}"
        )
    gens: dict[Path, int] = {}
    for path in sorted(on_disk):
        try:
            _manifest.verify(path)
            gens[path] = check_state(path)
        except Exception as exc:
            run.failures.append(f"kill {run.kills}: state {path}: {exc!r}")
        run.states.add(path)
    for gen, path in saved:
        run.returned_checked += 1
        if path not in gens:
            run.failures.append(f"kill {run.kills}: returned state {path} (gen {gen}) lost")
        elif gens[path] != gen:
            run.failures.append(f"kill {run.kills}: {path} holds gen {gens[path]}, not {gen}")
    if saved and listed and gens.get(listed[-1].path, -1) < saved[-1][0]:
        run.failures.append(f"kill {run.kills}: latest {listed[-1].path} older than {saved[-1]}")
    for info in listed[:-2]:  # keep the directory small; the newest two are re-checked next time
        shutil.rmtree(info.path)


def run_campaign(
    states_dir: Path, worker_cmd: list[str], env: dict[str, str], kills: int, tmp_path: Path
) -> Campaign:
    seed = int(os.environ.get("STATEKEEP_CRASH_SEED") or random.randrange(1 << 32))
    rng = random.Random(seed)
    run = Campaign(seed)
    StateStore(states_dir)
    start = time.monotonic()
    with open(tmp_path / "worker.err", "w+b") as err:
        proc = subprocess.Popen(
            [*worker_cmd, "zygote", str(states_dir)],
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
                durable = k % 2
                proc.stdin.write(f"go {base} {rng.randrange(1 << 32)} {durable}\n".encode())
                kind, pid_text = reader.line().split()
                assert kind == "pid", kind  # the zygote's protocol: the pid line comes first
                pid = int(pid_text)
                # Mostly inside the first save or two; sometimes late, after several saves.
                dice = rng.random()
                delay = rng.uniform(0, 0.02) if dice < 0.6 else rng.uniform(0.02, 0.1)
                if dice > 0.92:
                    delay = rng.uniform(0.1, 0.4)
                lines = reader.lines_for(delay)
                os.kill(pid, signal.SIGKILL)
                while not lines or not lines[-1].startswith("exit "):
                    lines.append(reader.line())
                run.kills += 1
                status = int(lines[-1].split()[2])
                if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
                    err.seek(0)
                    run.failures.append(
                        f"kill {k}: saver ended with status {status}: {err.read()[-2000:]!r}"
                    )
                saved = [(int(g), Path(p)) for _, g, p in (ln.split(" ", 2) for ln in lines[:-1])]
                check_after_kill(states_dir, saved, run)
            proc.stdin.write(b"quit\n")
        finally:
            reader.close()
            proc.stdin.close()
            proc.stdout.close()
            if proc.wait(timeout=30) != 0:
                run.failures.append(f"the zygote exited with {proc.returncode}")
    run.seconds = time.monotonic() - start
    return run


def assert_campaign(
    run: Campaign, states_dir: Path, kills: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run.failures == [], "\n".join(run.failures[:20])
    assert run.kills == kills
    assert run.mid_save >= kills // 4, "too few kills landed inside a save"
    assert run.returned_checked > 0
    assert len(run.states) >= 10
    # ``.pending`` leftovers (a kill inside the first microseconds of a save) go once old.
    monkeypatch.setattr(_atomic, "PENDING_GRACE", 0.0)
    _atomic.sweep(states_dir)
    # Nothing of statekeep's own is left in the directory: only committed states.
    assert _debris(states_dir) == []
    assert all(_manifest.read_manifest(p).sequence > 0 for p in states_dir.iterdir())


class TestKillDuringSave:
    """A saver SIGKILLed at random moments never leaves a partial, mixed or lost state."""

    def test_default_campaign(
        self,
        states_dir: Path,
        worker_cmd: list[str],
        worker_env: dict[str, str],
        tmp_path: Path,
        crash_report: list[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        run = run_campaign(states_dir, worker_cmd, worker_env, DEFAULT_KILLS, tmp_path)
        crash_report.append(run.summary("default campaign"))
        assert_campaign(run, states_dir, DEFAULT_KILLS, monkeypatch)


@pytest.mark.crash
class TestLongKillCampaign:
    """The same campaign with thousands of kills (nox -s crash)."""

    def test_long_campaign(
        self,
        states_dir: Path,
        worker_cmd: list[str],
        worker_env: dict[str, str],
        tmp_path: Path,
        crash_report: list[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        kills = int(os.environ.get("STATEKEEP_CRASH_KILLS") or LONG_KILLS)
        run = run_campaign(states_dir, worker_cmd, worker_env, kills, tmp_path)
        crash_report.append(run.summary("long campaign"))
        assert_campaign(run, states_dir, kills, monkeypatch)
