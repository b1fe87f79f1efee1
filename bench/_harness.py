"""The benchmark machinery: cases, interleaved rounds, medians, the printed tables.

A case is a ``sample()`` callable that performs its operation a few times and returns
the seconds one operation took; anything it must prepare or clean up it does outside
its own timer. Cases of one suite run interleaved: every round runs each case once,
in a fresh random order, so drift of the (shared, noisy) machine hits all of them
alike. The figure kept per case is the median over the rounds.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass
class Case:
    """One timed operation.

    Attributes:
        key: unique name, used by goals and baselines.
        label: what the table shows.
        sample: runs the operation and returns seconds per operation.
        baseline: key of the case this one is compared with in the table.
        nbytes: bytes moved per operation (the table then shows MB/s).
        close: called once after the suite.
    """

    key: str
    label: str
    sample: Callable[[], float]
    baseline: str | None = None
    nbytes: int = 0
    close: Callable[[], None] | None = None


@dataclass
class Suite:
    """Cases that are compared with each other, hence run interleaved."""

    title: str
    cases: list[Case]
    rounds: int
    skipped: list[str] = field(default_factory=list)  # "what: why" lines to print


@dataclass
class Result:
    key: str
    label: str
    samples: list[float]
    baseline: str | None
    nbytes: int

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median (a noise indicator)."""
        if len(self.samples) < 4:
            return 0.0
        q = statistics.quantiles(self.samples, n=4)
        return (q[2] - q[0]) / self.median if self.median else 0.0


def timed(op: Callable[[], object], repeat: int) -> float:
    """Run ``op`` ``repeat`` times and return the mean seconds per call."""
    start = time.perf_counter()
    for _ in range(repeat):
        op()
    return (time.perf_counter() - start) / repeat


def run_suite(suite: Suite, rng: random.Random) -> dict[str, Result]:
    """Run the suite's cases interleaved; one warm-up round is discarded."""
    results = {c.key: Result(c.key, c.label, [], c.baseline, c.nbytes) for c in suite.cases}
    order = list(suite.cases)
    try:
        for round_no in range(suite.rounds + 1):
            rng.shuffle(order)
            for case in order:
                seconds = case.sample()
                if round_no:
                    results[case.key].samples.append(seconds)
            print(".", end="", flush=True, file=sys.stderr)
    finally:
        print(file=sys.stderr)
        for case in suite.cases:
            if case.close is not None:
                case.close()
    return results


def fmt_time(seconds: float) -> str:
    if seconds < 1e-6:
        return f"{seconds * 1e9:.0f} ns"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_rate(result: Result) -> str:
    if result.nbytes:
        return f"{result.nbytes / result.median / 1e6:,.0f} MB/s"
    return f"{1 / result.median:,.0f} ops/s"


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """A GitHub-flavoured Markdown table (also readable in a terminal)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def suite_table(suite: Suite, results: dict[str, Result]) -> str:
    """Absolute medians, rates, noise, and the ratio against each row's baseline."""
    rows = []
    for case in suite.cases:
        res = results[case.key]
        ratio = ""
        if case.baseline is not None and case.baseline in results:
            base = results[case.baseline]
            ratio = f"{res.median / base.median:.2f}x {base.label}"
        rows.append([res.label, fmt_time(res.median), fmt_rate(res), f"±{res.spread:.0%}", ratio])
    header = ["operation", "median", "rate", "IQR", "time ratio vs baseline (same run)"]
    return table(rows, header)
