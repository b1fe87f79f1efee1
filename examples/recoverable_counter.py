"""A counter that survives kill -9, then a schema upgrade, with RecoverableState.

1. A worker process counts, persisting after every step; we SIGKILL it mid-run.
2. A new worker recovers the last persisted count and finishes the job to 50.
3. The application ships schema version 2 (a renamed field); the saved value is
   migrated on load.

Run it: ``python examples/recoverable_counter.py``. It exits non-zero if a check fails.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
from typing import Any

from pydantic import BaseModel

from statekeep import FileCheckpointStorage, RecoverableState

TARGET = 50


class Progress(BaseModel):
    """Schema version 1."""

    count: int = 0


class ProgressV2(BaseModel):
    """Schema version 2: ``count`` was renamed, and a field was added."""

    pages_done: int = 0
    note: str = ""


def rename_count(old: dict[str, Any]) -> dict[str, Any]:
    """Migration from version 1 to version 2."""
    return {"pages_done": old["count"], "note": "migrated from v1"}


def worker(directory: str, stop_at: int | None) -> None:
    """Count up, persisting each step; print each persisted count."""
    with (
        FileCheckpointStorage(directory) as storage,
        RecoverableState(
            default_state=Progress(),
            persist_state_key="counter",
            persistence_enabled=True,
            storage=storage,
        ) as state,
    ):
        print(f"worker starts at {state.current_value.count}", flush=True)
        while stop_at is None or state.current_value.count < stop_at:
            with state.update() as value:
                value.count += 1
            state.persist_state()
            print(value.count, flush=True)


def main() -> int:
    with tempfile.TemporaryDirectory() as directory:
        me = [sys.executable, __file__, "--worker", directory]

        child = subprocess.Popen(me, stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        print(child.stdout.readline().strip())
        last = 0
        while last < 20:
            last = int(child.stdout.readline())
        child.kill()
        child.communicate()
        print(f"1. killed the worker with SIGKILL after it reported count {last}")
        if child.returncode != -signal.SIGKILL:
            print(f"FAIL: worker exited with {child.returncode}, expected SIGKILL")
            return 1

        finished = subprocess.run([*me, str(TARGET)], capture_output=True, text=True, check=True)
        lines = finished.stdout.split("\n")
        resumed = int(lines[0].rsplit(" ", 1)[1])
        print(f"2. a new worker resumed at {resumed} and counted to {lines[-2]}")
        if resumed < last:
            print(f"FAIL: resumed at {resumed}, but {last} had been persisted")
            return 1

        with (
            FileCheckpointStorage(directory) as storage,
            RecoverableState(
                default_state=ProgressV2(),
                persist_state_key="counter",
                persistence_enabled=True,
                storage=storage,
                schema_version=2,
                migrations={1: rename_count},
            ) as state,
        ):
            upgraded = state.current_value
        print(f"3. version 2 of the app loaded {upgraded!r}")
        if upgraded != ProgressV2(pages_done=TARGET, note="migrated from v1"):
            print(f"FAIL: expected pages_done={TARGET} after the migration")
            return 1
    print("OK: nothing persisted was lost, and the old value was migrated")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)
        sys.exit(0)
    sys.exit(main())
