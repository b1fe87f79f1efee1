"""The speed goals (issue 5, tightened by issue 13), each a ratio of two medians of one run.

Where a goal has a ``least`` case (the least inline code that keeps the same guarantee),
its ratio against the same baseline is printed beside it: when that is over the bound
too, the bound is out of reach on the machine of the run, whatever statekeep does.
"""

from __future__ import annotations

from dataclasses import dataclass

from _harness import Result, table


@dataclass(frozen=True)
class Goal:
    """``num`` against ``den``: a time ratio (num/den <= limit, or < limit when ``strict``),
    or with ``throughput`` a throughput ratio (den/num >= limit)."""

    text: str
    num: str
    den: str
    limit: float
    throughput: bool = False
    strict: bool = False
    fallback_den: str | None = None  # used (and said) when ``den`` was skipped
    least: str | None = None  # the least code with the same guarantee, against ``den``


def goals(large_mb: list[int], counts: list[int]) -> list[Goal]:
    small, big = counts[0], counts[-1]
    growth = big / small * 1.2  # issue 5: 10,000 states within 12x the time of 1,000
    found = [
        Goal(
            "durable 3x1 KB save vs minimal crash-safe commit",
            "sk_save_durable",
            "min_save_durable",
            1.3,
            least="min_save_comp_durable",
        ),
        Goal(
            "non-durable save vs the same commit without fsync",
            "sk_save_nosync",
            "min_save_nosync",
            1.2,
            least="min_save_promises_nosync",
        ),
        Goal(
            "non-durable save vs pamiq-core StateStore.save_state",
            "sk_save_nosync",
            "pamiq_save",
            1.2,
            least="min_save_promises_nosync",
        ),
        Goal(
            "non-durable save vs in-place writes (issue 2)",
            "sk_save_nosync",
            "inplace_save",
            1.5,
            least="min_save_promises_nosync",
        ),
        Goal(
            "load_state(verify) 3x1 KB vs raw read of the files",
            "sk_load_small",
            "raw_read_small",
            1.6,
            least="min_verified_load",
        ),
        Goal(
            "durable FileCheckpointStorage.save 1 KB vs minimal durable atomic replace",
            "file_save_1 KB_durable",
            "replace_1 KB_durable",
            1.3,
        ),
        Goal(
            "non-durable FileCheckpointStorage.save 1 KB faster than ondine",
            "file_save_1 KB_nosync",
            "ondine_save_1 KB",
            1.0,
            strict=True,
            fallback_den="ondine_style_1 KB",
            least="exchange_1 KB_nosync",
        ),
        Goal(
            "MemoryCheckpointStorage save+load 1 KB vs deepcopy round trip (issue 3)",
            "memory_1 KB",
            "deepcopy_1 KB",
            2.0,
        ),
        Goal(
            "StateManager.should_checkpoint vs a bare function call",
            "should_checkpoint",
            "bare_call",
            2.0,
        ),
    ]
    for mb in large_mb:
        found.append(
            Goal(
                f"{mb} MB durable save vs raw write+fsync",
                f"sk_save_{mb}",
                f"raw_write_{mb}",
                1.1,
                least=f"min_save_{mb}",
            )
        )
        found.append(
            Goal(
                f"{mb} MB load+verify throughput vs raw read (cold)",
                f"sk_load_{mb}",
                f"raw_read_{mb}",
                0.9,
                throughput=True,
                least=f"min_load1_{mb}",
            )
        )
    for op in ("list", "latest", "cleanup"):
        found.append(
            Goal(
                f"{op} over {big:,} states vs {small:,} (growth)",
                f"{op}_{big}",
                f"{op}_{small}",
                growth,
            )
        )
    return found


def _ratio(results: dict[str, Result], num: str, den: str, throughput: bool) -> float:
    a, b = results[num].median, results[den].median
    return b / a if throughput else a / b


def evaluate(found: list[Goal], results: dict[str, Result], memory: dict | None) -> bool:
    """Print every goal as PASS, MISS or SKIP with its ratio; True if none missed."""
    rows = []
    all_ok = True
    for g in found:
        den, note = g.den, ""
        if den not in results and g.fallback_den in results:
            den, note = g.fallback_den, f" (peer skipped: vs {results[g.fallback_den].label})"
        if g.num not in results or den not in results:
            missing = g.num if g.num not in results else den
            rows.append([g.text, "", "", "", f"SKIP ({missing} not measured)"])
            continue

        ratio = _ratio(results, g.num, den, g.throughput)
        least = ""
        if g.least is not None and g.least in results:
            least = f"{_ratio(results, g.least, den, g.throughput):.2f}x"
        ok = (
            ratio >= g.limit
            if g.throughput
            else (ratio < g.limit if g.strict else ratio <= g.limit)
        )
        bound = ("≥ " if g.throughput else "< " if g.strict else "≤ ") + f"{g.limit:g}x"
        rows.append([g.text + note, f"{ratio:.2f}x", least, bound, "PASS" if ok else "MISS"])
        all_ok &= ok
    if memory is not None:
        m = memory["statekeep"]
        ratio = (m["peak"] - m["baseline"]) * 1024 / m["size"]
        ok = ratio <= 1.1
        rows.append(
            [
                f"peak RSS growth of the {m['size'] >> 20} MB save vs the state's size",
                f"{ratio:.2f}x",
                "",
                "≤ 1.1x",
                "PASS" if ok else "MISS",
            ]
        )
        all_ok &= ok
    print(table(rows, ["goal", "ratio", "least code, same guarantee", "bound", "verdict"]))
    return all_ok


def remote_goals(big_mb: int, counts: list[int]) -> list[Goal]:
    """Issues 10-12: remote checkpoints, snapshots on S3, and the command line."""
    found = [
        Goal(f"S3 {op} {size} vs raw {raw}", f"s3_{op}_{size}", f"s3_raw_{raw}_{size}", 1.2)
        for op, raw in (("save", "put"), ("load", "get"))
        for size in ("1 KB", "1 MB")
    ]
    found += [
        Goal(f"PostgreSQL {op} {size} vs raw {raw}", f"pg_{op}_{size}", f"pg_raw_{raw}_{size}", 1.2)
        for op, raw in (("save", "upsert"), ("load", "select"))
        for size in ("1 KB", "1 MB")
    ]
    small, big = counts[0], counts[-1]
    found += [
        Goal(
            f"S3 list_checkpoints, {big:,} vs {small:,} (growth)",
            f"s3_list_{big}",
            f"s3_list_{small}",
            big / small * 1.2,
        ),
        Goal(
            f"PostgreSQL list_checkpoints, {big:,} vs {small:,} (growth)",
            f"pg_list_{big}",
            f"pg_list_{small}",
            big / small * 1.2,
        ),
        Goal(
            "publish 3x1 KB vs inline boto3",
            "rsnap-3x1KB-publish",
            "rsnap-3x1KB-inline-publish",
            1.25,
        ),
        Goal(
            "restore 3x1 KB vs inline boto3",
            "rsnap-3x1KB-restore",
            "rsnap-3x1KB-inline-restore",
            1.25,
        ),
        Goal(
            f"publish {big_mb} MB throughput vs inline boto3",
            f"rsnap-{big_mb}MB-publish",
            f"rsnap-{big_mb}MB-inline-publish",
            0.8,
            throughput=True,
        ),
        Goal(
            f"restore {big_mb} MB throughput vs inline boto3",
            f"rsnap-{big_mb}MB-restore",
            f"rsnap-{big_mb}MB-inline-restore",
            0.8,
            throughput=True,
        ),
        Goal("statekeep ls vs list_states() + start-up", "cli_ls", "cli_baseline", 2.0),
    ]
    return found
