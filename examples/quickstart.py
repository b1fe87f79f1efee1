"""The statekeep demo: save a few states, get killed in the middle of a save, recover.

Run it with ``python examples/quickstart.py`` (or ``nox -s demo``). It

1. saves three states of a small "training job" (a counter, a model written as
   ``model.pt`` + ``model.optim.pt``, a directory of logs);
2. starts a child process that begins saving step 4 slowly and SIGKILLs it mid-save;
3. opens the store again as a restarted program would: the half-written save was never
   visible, its debris is reclaimed, and the newest good state (step 3) is loaded;
4. flips one bit in that state and shows ``load_latest_state`` falling back to step 2.

Everything happens in a temporary directory (printed; ``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from statekeep import PersistentStateMixin, StateStore


class Counter(PersistentStateMixin):
    """The training step, as a JSON file."""

    def __init__(self) -> None:
        self.step = 0

    def save_state(self, path: Path) -> None:
        path.write_text(json.dumps({"step": self.step}))

    def load_state(self, path: Path) -> None:
        self.step = json.loads(path.read_text())["step"]


class Model(PersistentStateMixin):
    """Weights and optimizer state, written beside the path (``model.pt``, ``model.optim.pt``)."""

    def __init__(self, slow: bool = False) -> None:
        self.weights = b""
        self.slow = slow

    def save_state(self, path: Path) -> None:
        optim = path.with_name(path.name + ".optim.pt")
        optim.write_bytes(self.weights[::-1])
        with open(path.with_name(path.name + ".pt"), "wb") as f:
            half = len(self.weights) // 2
            f.write(self.weights[:half])
            f.flush()
            if self.slow:  # the child: announce that we are mid-save, then crawl
                print("MID-SAVE", flush=True)
                for start in range(half, len(self.weights), 1024):
                    time.sleep(0.05)
                    f.write(self.weights[start : start + 1024])
            else:
                f.write(self.weights[half:])

    def load_state(self, path: Path) -> None:
        self.weights = path.with_name(path.name + ".pt").read_bytes()


class Logs(PersistentStateMixin):
    """A directory with one file per step."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def save_state(self, path: Path) -> None:
        path.mkdir()
        for i, line in enumerate(self.lines):
            (path / f"{i:04}.txt").write_text(line)

    def load_state(self, path: Path) -> None:
        self.lines = [p.read_text() for p in sorted(path.iterdir())]


class Job:
    """The program being checkpointed: three components in one store."""

    def __init__(self, states_dir: Path, *, slow: bool = False) -> None:
        self.counter, self.model, self.logs = Counter(), Model(slow), Logs()
        self.store = StateStore(states_dir)
        self.store.register("counter", self.counter)
        self.store.register("model", self.model)
        self.store.register("logs", self.logs)

    def train_step(self) -> None:
        self.counter.step += 1
        self.model.weights = bytes([self.counter.step]) * 64_000
        self.logs.lines.append(f"step {self.counter.step}: loss {1 / self.counter.step:.3f}")


def child(states_dir: Path) -> None:
    """Resume, train one step, and save it slowly (the parent kills us mid-save)."""
    job = Job(states_dir, slow=True)
    job.store.load_latest_state()
    job.train_step()
    job.store.save_state()
    print("SAVED", flush=True)  # never reached: we are killed first


def show(states_dir: Path) -> None:
    """What a user's glob sees (opening a StateStore here would already sweep)."""
    for path in sorted(states_dir.glob("*.state")):
        print(f"     {path.name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the demo directory")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return 0
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="     [log] %(message)s")
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="statekeep-demo-"))
    states_dir = root / "states"
    print(f"statekeep demo in {root}\n")
    try:
        print("1. The job trains three steps and saves after each:")
        job = Job(states_dir)
        for _ in range(3):
            job.train_step()
            print(f"     step {job.counter.step} saved to {job.store.save_state().name}")

        print("\n2. A second run resumes and starts saving step 4 slowly; we kill -9 it mid-save.")
        proc = subprocess.Popen(
            [sys.executable, __file__, "--child", str(states_dir)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        with proc.stdout:
            line = proc.stdout.readline().strip()
            if line != "MID-SAVE":
                print(f"     the child did not reach the save (said {line!r})")
                proc.kill()
                proc.wait()
                return 1
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        print(f"     child {proc.pid} killed by SIGKILL (exit status {proc.returncode})")
        # A killed save leaves its private build directory (a dot-name, never a state).
        debris = sorted(states_dir.glob(".statekeep-*.work"))
        for entry in debris:
            files = {p.name: p.stat().st_size for p in entry.iterdir() if p.is_file()}
            print(f"     left behind: {entry.name} holding {files} (never listed)")
        print("     states_dir/*.state still shows only the three committed states:")
        show(states_dir)

        print("\n3. The job restarts: a new StateStore reclaims the debris and loads the latest:")
        job = Job(states_dir)
        latest = job.store.load_latest_state()
        assert latest is not None
        leftover = sorted(states_dir.glob(".statekeep-*"))
        print(f"     debris left: {[p.name for p in leftover]}")
        print(
            f"     loaded {latest.name}: step {job.counter.step}, {len(job.logs.lines)} log lines,"
        )
        print(f"     model.pt = {len(job.model.weights)} bytes of {job.model.weights[:1]!r}")
        ok = job.counter.step == 3 and job.model.weights == bytes([3]) * 64_000 and not leftover

        print("\n4. A bit flips in that state on disk; load_latest_state notices and falls back:")
        weights = latest / "model.pt"
        data = bytearray(weights.read_bytes())
        data[1234] ^= 0x10
        weights.write_bytes(bytes(data))
        job = Job(states_dir)
        fallback = job.store.load_latest_state()
        assert fallback is not None
        print(f"     loaded {fallback.name}: step {job.counter.step}")
        ok = ok and job.counter.step == 2

        print(
            f"\n{'OK' if ok else 'UNEXPECTED'}: nothing partial was ever loaded; "
            f"finished in {time.monotonic() - started:.1f} s"
        )
        return 0 if ok else 1
    finally:
        if args.keep:
            print(f"(kept {root})")
        else:
            shutil.rmtree(root)
            print(f"(removed {root}; pass --keep to keep it)")


if __name__ == "__main__":
    sys.exit(main())
