"""pamiq-core 0.4.0's StateStore cases: imported by the benchmark when its own Python
(>= 3.12) has pamiq-core, else run as a worker under a Python that has it.

As a worker, the benchmark process starts it once and sends one case key per line on
stdin; the worker runs one sample of that case and answers with the seconds per
operation. So the peer's samples interleave with statekeep's either way.
Usage: python _pamiq_worker.py TMPDIR REPEAT
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pamiq_core.state_persistence import PersistentStateMixin, StateStore


class Blob(PersistentStateMixin):
    def __init__(self, data: bytes) -> None:
        self.data = data

    def save_state(self, path: Path) -> None:
        with open(path, "wb", buffering=0) as f:
            f.write(self.data)

    def load_state(self, path: Path) -> None:
        with open(path, "rb", buffering=0) as f:
            self.data = f.read()


def make_cases(tmp: Path, repeat: int) -> dict[str, Callable[[], float]]:
    """pamiq-core's cases (seconds per operation), as the benchmark runs them."""
    tmp.mkdir(parents=True, exist_ok=True)
    store = StateStore(tmp / "pamiq-save")
    loader = StateStore(tmp / "pamiq-load")
    for name in ("model", "optimizer", "buffer"):
        store.register(name, Blob(os.urandom(1024)))
        loader.register(name, Blob(os.urandom(1024)))
    saved = loader.save_state()

    def save() -> float:
        start = time.perf_counter()
        for _ in range(repeat):
            store.save_state()
        took = (time.perf_counter() - start) / repeat
        for entry in os.scandir(store.states_dir):
            shutil.rmtree(entry.path)
        return took

    def load() -> float:
        start = time.perf_counter()
        for _ in range(repeat):
            loader.load_state(saved)
        return (time.perf_counter() - start) / repeat

    return {"pamiq_save": save, "pamiq_load": load}


def main() -> None:
    cases = make_cases(Path(sys.argv[1]), int(sys.argv[2]))
    print("ready", flush=True)
    for line in sys.stdin:
        print(repr(cases[line.strip()]()), flush=True)


if __name__ == "__main__":
    main()
