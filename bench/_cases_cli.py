"""The command's cases: ``statekeep ls`` over many states, against ``list_states()``.

Issue 12's goal: ``statekeep ls`` on 10,000 states runs within 2x the time of
``list_states()`` in one process plus the interpreter's start-up. ``cli_baseline`` is
that sum (both measured in the same sample); ``cli_ls`` is the whole command, run as a
user runs it (a new interpreter, output to a pipe that is drained).

To wire in: ``Suite("Command line", cli_cases(tmp, 10_000), rounds)`` and
``cli_goals()`` appended to the goals. ``python bench/_cases_cli.py [COUNT]`` runs the
cases alone and prints the medians.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _cases_listing import fill
from _goals import Goal
from _harness import Case

SRC = Path(__file__).resolve().parent.parent / "src"


def _env() -> dict[str, str]:
    env = dict(os.environ)  # the statekeep under test, installed or not
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    return env


def _wall(argv: list[str]) -> float:
    """Seconds one run of ``argv`` takes, its output drained through a pipe."""
    start = time.perf_counter()
    subprocess.run(argv, capture_output=True, env=_env(), check=True)
    return time.perf_counter() - start


def cli_cases(tmp: Path, count: int = 10_000) -> list[Case]:
    """``cli_startup``, ``cli_list`` (in-process), ``cli_baseline`` (their sum), ``cli_ls``."""
    root = tmp / f"cli-states-{count}"
    store = fill(root, count)
    python = sys.executable

    def startup() -> float:
        return _wall([python, "-c", "pass"])

    def listing() -> float:
        start = time.perf_counter()
        store.list_states()
        return time.perf_counter() - start

    return [
        Case("cli_startup", "interpreter start-up (python -c pass)", startup),
        Case("cli_list", f"list_states() in-process, {count:,} states", listing),
        Case(
            "cli_baseline",
            f"list_states() + start-up, {count:,} states",
            lambda: startup() + listing(),
        ),
        Case(
            "cli_ls",
            f"statekeep ls, {count:,} states",
            lambda: _wall([python, "-m", "statekeep", "ls", str(root)]),
            baseline="cli_baseline",
        ),
    ]


def cli_goals() -> list[Goal]:
    """Issue 12: the command within 2x of what it lists, measured in-process, plus start-up."""
    return [Goal("statekeep ls vs list_states() + start-up", "cli_ls", "cli_baseline", 2.0)]


def main() -> None:
    import tempfile

    count = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    with tempfile.TemporaryDirectory() as tmp:
        cases = cli_cases(Path(tmp), count)
        samples: dict[str, list[float]] = {c.key: [] for c in cases}
        for _ in range(rounds):
            for case in cases:
                samples[case.key].append(case.sample())
    medians = {key: statistics.median(values) for key, values in samples.items()}
    for case in cases:
        print(f"{case.label:45} {medians[case.key] * 1000:9.1f} ms")
    ratio = medians["cli_ls"] / medians["cli_baseline"]
    print(f"statekeep ls / (list_states + start-up) = {ratio:.2f} (goal <= 2.0)")


if __name__ == "__main__":
    main()
