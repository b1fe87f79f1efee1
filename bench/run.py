"""statekeep benchmarks: every operation against the physical limit and the peers.

Run ``python bench/run.py`` (or ``nox -s bench``); ``--quick`` for a smoke run. Each
suite's cases run interleaved in this one process (pamiq-core's too when this Python is
>= 3.12, else in a worker under one); the tables give medians, and ratios against
baselines of the same run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from _cases_checkpoint import call_cases, checkpoint_cases
from _cases_cli import cli_cases
from _cases_listing import listing_cases
from _cases_remote import remote_suites
from _cases_snapshot import large_cases, small_cases
from _goals import evaluate, goals, remote_goals
from _harness import Case, Result, Suite, run_suite, suite_table
from _peers import PamiqWorker, pamiq_python

HERE = Path(__file__).resolve().parent


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    fs = subprocess.run(
        ["df", "-T", tempfile.gettempdir()], capture_output=True, text=True, check=False
    ).stdout.splitlines()[-1:]
    return (
        f"{os.cpu_count()} CPUs ({cpu}); Python {platform.python_version()};"
        f" {platform.system()} {platform.release()}; temp dir on: {' '.join(fs)}"
    )


def rss(tmp: Path, size_mb: int) -> dict[str, dict[str, int]]:
    """Peak RSS of a durable save of one ``size_mb`` component, and of a raw write."""
    out = {}
    for mode in ("statekeep", "raw"):
        root = tmp / f"rss-{mode}"
        done = subprocess.run(
            [sys.executable, str(HERE / "_rss_child.py"), str(root), str(size_mb), mode],
            capture_output=True,
            text=True,
            check=True,
        )
        out[mode] = json.loads(done.stdout)
    return out


def build_suites(tmp: Path, quick: bool, pamiq: tuple[str | None, str]) -> list[Suite]:
    small_rounds, repeat = (5, 5) if quick else (41, 10)
    small = Suite("Snapshots, 3 x 1 KB components", small_cases(tmp, repeat), small_rounds)
    python, why = pamiq
    labels = {
        "pamiq_save": ("pamiq-core StateStore.save_state 3x1 KB", "inplace_save"),
        "pamiq_load": ("pamiq-core StateStore.load_state 3x1 KB", "raw_read_small"),
    }
    if python == sys.executable:  # this Python has pamiq-core 0.4.0: run it in this process
        from _pamiq_worker import make_cases

        for key, sample in make_cases(tmp / "pamiq", repeat).items():
            label, baseline = labels[key]
            small.cases.append(Case(key, label, sample, baseline=baseline))
        small.skipped.append(f"pamiq-core: run in this process ({why})")
        python = None
    worker = None
    if python is not None:
        try:
            worker = PamiqWorker(python, tmp / "pamiq", repeat)
        except (OSError, RuntimeError) as exc:
            why = f"its worker under {python} failed: {exc}"
            small.skipped.append(f"pamiq-core: skipped, {why}")
    elif not any(c.key == "pamiq_save" for c in small.cases):
        small.skipped.append(f"pamiq-core: skipped, {why}")
    if worker is not None:
        for key, (label, baseline) in labels.items():
            close = worker.close if key == "pamiq_load" else None
            small.cases.append(worker.case(key, label, baseline=baseline, close=close))
        small.skipped.append(f"pamiq-core: run by a worker under {why}")
    sizes = [16 << 20, 64 << 20] if quick else [64 << 20, 256 << 20]
    # Writes and cold reads in separate suites: interleaving fsync-heavy writes with
    # evict-and-read cases made both sides' timings swing 3-4x on this VM's disk.
    big = large_cases(tmp, sizes)
    large_writes = Suite(
        "One large component, written (fsynced)",
        [c for c in big if "save" in c.key or "write" in c.key],
        2 if quick else 11,
    )
    large_reads = Suite(
        "One large component, read back (cold page cache)",
        [c for c in big if not ("save" in c.key or "write" in c.key)],
        2 if quick else 11,
    )
    ck_cases, ck_skipped = checkpoint_cases(
        tmp, {"1 KB": 1024, "1 MB": 1 << 20}, 20 if quick else 40
    )
    ckpt = Suite("Checkpoints, one session", ck_cases, 3 if quick else 21, ck_skipped)
    call, call_skipped = call_cases(20_000 if quick else 200_000)
    calls = Suite("Per-call overhead", call, 5 if quick else 21, call_skipped)
    counts = [100, 1000] if quick else [1000, 10_000]
    listing = Suite("Listing and pruning", listing_cases(tmp, counts), 3 if quick else 9)
    command = Suite("Command line", cli_cases(tmp, 1000 if quick else 10_000), 3 if quick else 7)
    return [
        small,
        large_writes,
        large_reads,
        ckpt,
        calls,
        listing,
        command,
        *remote_suites(quick),
        *rsnap_suites(tmp, quick),
    ]


def rsnap_suites(tmp: Path, quick: bool) -> list[Suite]:
    """Snapshots published to and restored from S3 (SeaweedFS on 127.0.0.1)."""
    from _cases_rsnap import rsnap_cases

    import servers

    big_mb = 16 if quick else 256
    try:
        server = servers.start_s3()
    except (servers.ServerUnavailable, OSError, ImportError) as exc:
        return [Suite("Snapshots on S3", [], 0, [f"S3: skipped, {exc}"])]
    small, big = rsnap_cases(tmp, server, server.new_bucket(), big_mb=big_mb)
    last = big[-1].close

    def stop() -> None:
        if last is not None:
            last()
        servers.discard(server)

    big[-1].close = stop
    return [
        Suite("Snapshots on S3 (SeaweedFS), 3 x 1 KB", small, 5 if quick else 15),
        Suite(f"Snapshots on S3 (SeaweedFS), {big_mb} MB", big, 3),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a fast smoke run (few rounds, smaller sizes: its ratios are indicative only)",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of the round order")
    parser.add_argument("--only", default="", help="comma-separated suite title prefixes")
    parser.add_argument("--rounds", type=int, default=0, help="override every suite's rounds")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="statekeep-bench-", dir=args.dir) as name:
        tmp = Path(name)
        results: dict[str, Result] = {}
        # First, while this process is still small (a child's ru_maxrss starts at ours).
        memory = None if args.only else rss(tmp, 64 if args.quick else 256)
        suites = build_suites(tmp, args.quick, pamiq_python())
        # A peer's import (ondine's) configures the root logger to print INFO; statekeep's
        # per-removal INFO lines would then be formatted and printed inside timed cleanups.
        logging.getLogger("statekeep").setLevel(logging.WARNING)
        for suite in suites:
            if args.only and not any(suite.title.startswith(p) for p in args.only.split(",")):
                for case in suite.cases:
                    if case.close:
                        case.close()
                continue
            suite.rounds = args.rounds or suite.rounds
            print(f"\n## {suite.title} ({suite.rounds} interleaved rounds, medians)\n")
            res = run_suite(suite, rng)
            results.update(res)
            print(suite_table(suite, res))
            for line in suite.skipped:
                print(f"- {line}")
    if memory is not None:
        print("\n## Peak memory of one large durable save (child process, ru_maxrss)\n")
        for mode, m in memory.items():
            growth = (m["peak"] - m["baseline"]) * 1024
            print(
                f"- {mode}: state {m['size'] >> 20} MB; peak grew {growth / 2**20:.0f} MiB"
                f" above the baseline = {growth / m['size']:.2f}x the state's size"
                f" (holding the buffer alone: {(m['holding'] - m['baseline']) / 1024:.0f} MiB)"
            )
    print("\n## Goals (issues 5 and 13), ratios from this run\n")
    large_mb, counts = ([16, 64], [100, 1000]) if args.quick else ([64, 256], [1000, 10_000])
    remote = remote_goals(16 if args.quick else 256, [100, 1000] if args.quick else [1000, 10_000])
    evaluate(goals(large_mb, counts) + remote, results, memory)
    if args.quick:
        print("\n(--quick: few rounds and smaller sizes; the verdicts above are indicative only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
