"""A pipeline that is killed with SIGKILL part-way, resumes, and loses no row.

Run it::

    python examples/resumable_pipeline.py

The parent starts the pipeline in a child process; the child processes rows one by one,
appends each finished row id to a results file (standing in for the pipeline's output)
and saves a checkpoint through a :class:`statekeep.StateManager` every
``--interval`` rows. When enough rows have appeared in the results file the parent kills
the child with SIGKILL, then resumes the same session from its checkpoint and finishes.
Finally it checks the results file: every row must be there (none skipped), and the rows
done twice must be at most ``checkpoint_interval``. It exits non-zero if not.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from uuid import UUID

import statekeep

SESSION = UUID("5e55f00d-0000-4000-8000-000000000001")
ROW_BYTES = 7  # each result line is a six-digit row id and a newline


def process(row: int) -> int:
    """Stand-in for real work: a few hundred microseconds of hashing."""
    digest = str(row).encode()
    for _ in range(200):
        digest = hashlib.sha256(digest).digest()
    return digest[0]


def run(workdir: Path, rows: int, interval: int) -> int:
    """Process rows from the session's checkpoint (or from row 0) to the end.

    Returns the row it started from.
    """
    with statekeep.FileCheckpointStorage(workdir / "checkpoints") as storage:
        manager = statekeep.StateManager(storage, checkpoint_interval=interval)
        context = manager.load_checkpoint(SESSION)
        if context is None:
            context = statekeep.ExecutionContext(
                session_id=SESSION, total_rows=rows, data={"checksum": 0}
            )
        start = context.last_processed_row + 1  # rows [0, last_processed_row] are done
        fd = os.open(workdir / "results.txt", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            for row in range(start, rows):
                value = process(row)
                os.write(fd, f"{row:06d}\n".encode())  # the row's output is out
                context.data["checksum"] = (context.data["checksum"] + value) % 1_000_003
                context.update_row(row)  # in order; out-of-order workers use complete_rows
                if manager.should_checkpoint(row):
                    manager.save_checkpoint(context)
        finally:
            os.close(fd)
        if not manager.save_checkpoint(context):  # the final state, for anyone who asks
            raise RuntimeError("the final checkpoint could not be saved")
    return start


def kill_part_way(workdir: Path, rows: int, interval: int, kill_after: int) -> int:
    """Run the pipeline in a child and SIGKILL it once ``kill_after`` rows are out."""
    results = workdir / "results.txt"
    command = [sys.executable, __file__, "--child", str(workdir)]
    command += ["--rows", str(rows), "--interval", str(interval)]
    child = subprocess.Popen(command)
    try:
        deadline = time.monotonic() + 60
        while child.poll() is None and time.monotonic() < deadline:
            if results.exists() and results.stat().st_size >= kill_after * ROW_BYTES:
                child.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)  # polling a file another process writes; nothing to wait on
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
    if child.returncode != -signal.SIGKILL:
        raise SystemExit(f"the child was not killed part-way (exit status {child.returncode})")
    return results.stat().st_size // ROW_BYTES


def check(workdir: Path, rows: int, interval: int) -> list[str]:
    """What went wrong, judged from the results file; empty when all is well."""
    raw = (workdir / "results.txt").read_bytes()
    problems = []
    if len(raw) % ROW_BYTES:
        problems.append("the results file ends with a partial line")
    counts = Counter(int(raw[i : i + ROW_BYTES - 1]) for i in range(0, len(raw), ROW_BYTES))
    skipped = [row for row in range(rows) if counts[row] == 0]
    redone = sum(n - 1 for n in counts.values())
    print(f"rows in the results file: {sum(counts.values())}, distinct: {len(counts)}")
    print(f"rows skipped: {len(skipped)}, rows redone: {redone} (allowed: <= {interval})")
    if skipped:
        problems.append(f"{len(skipped)} rows were skipped, the first {skipped[0]}")
    if redone > interval:
        problems.append(f"{redone} rows were redone, more than the interval {interval}")
    if set(counts) - set(range(rows)):
        problems.append("the results file holds rows that do not exist")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--interval", type=int, default=500, help="checkpoint_interval")
    parser.add_argument("--kill-after", type=int, default=3_700, help="rows before the kill")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        run(args.child, args.rows, args.interval)
        return 0

    began = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        out = kill_part_way(workdir, args.rows, args.interval, args.kill_after)
        print(f"killed the pipeline with SIGKILL after {out} rows were out")
        with statekeep.FileCheckpointStorage(workdir / "checkpoints") as storage:
            for info in storage.list_checkpoints():
                done = info.metadata["last_processed_row"] + 1
                print(f"last checkpoint: {done} of {args.rows} rows, saved {info.timestamp}")
        start = run(workdir, args.rows, args.interval)
        print(f"resumed from row {start} and finished")
        problems = check(workdir, args.rows, args.interval)
    print(f"took {time.monotonic() - began:.2f} s")
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    if not problems:
        print("OK: no row skipped, at most checkpoint_interval rows redone")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
