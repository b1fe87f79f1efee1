"""What every command shares: the usage error, output, sizes, times and durations."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, NoReturn

OK, DAMAGED, USAGE = 0, 1, 2


class UsageError(Exception):
    """The command cannot run as asked: printed as one line on stderr, exit status 2."""


def fail(message: str) -> NoReturn:
    raise UsageError(message)


def os_problem(exc: OSError) -> str:
    """An OSError as its reason alone (the caller names the path)."""
    return exc.strerror or str(exc)


def check_dir(path: str, what: str = "directory") -> None:
    """A usage error unless ``path`` is a directory this process can list."""
    try:
        os.stat(path)
    except FileNotFoundError:
        fail(f"{path}: no such {what}")
    except OSError as exc:
        fail(f"{path}: cannot read it: {os_problem(exc)}")
    if not os.path.isdir(path):
        fail(f"{path}: not a {what} (it is a file)")
    if not os.access(path, os.R_OK | os.X_OK):
        fail(f"{path}: cannot read it: Permission denied")


def emit_json(value: object) -> None:
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False, default=str))
    sys.stdout.write("\n")


def human_size(n: int) -> str:
    """``n`` bytes for people: 512 B, 1.5 KB, 3.2 MB (powers of 1000, as `ls -h --si`)."""
    if n < 1000:
        return f"{n} B"
    value = float(n)
    for unit in ("KB", "MB", "GB", "TB"):
        value /= 1000
        if value < 999.95 or unit == "TB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def local_time(when: datetime) -> str:
    """An aware datetime in the local zone, to the second."""
    t = datetime.fromtimestamp(when.timestamp())  # local, naive; cheaper than astimezone()
    return f"{t.year:04d}-{t.month:02d}-{t.day:02d} {t.hour:02d}:{t.minute:02d}:{t.second:02d}"


def compact(metadata: Mapping[str, Any]) -> str:
    """Metadata on one line: ``step=3 loss=0.25`` (non-scalars as JSON)."""
    parts = []
    for key, value in metadata.items():
        if isinstance(value, str):
            shown = value
        elif type(value) in (int, float):  # the common case (a step, a loss), without json
            shown = repr(value)
        else:
            shown = json.dumps(value, default=str)
        parts.append(f"{key}={shown}")
    return " ".join(parts)


def table(rows: list[list[str]], header: list[str]) -> str:
    """Left-aligned columns; the last column is not padded."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"(\d+)([smhdw])")


def parse_duration(text: str, what: str) -> timedelta:
    """``90s``, ``15m``, ``1h``, ``7d``, ``2w`` or a sum (``1h30m``); else a usage error."""
    spec = text.strip().lower()
    pos, seconds = 0, 0
    for match in _DURATION.finditer(spec):
        if match.start() != pos:
            break
        seconds += int(match[1]) * _UNITS[match[2]]
        pos = match.end()
    if not spec or pos != len(spec):
        fail(f"{what}: {text!r} is not a duration (write e.g. 30s, 15m, 1h, 7d, 2w or 1h30m)")
    if seconds <= 0:
        fail(f"{what}: {text!r} must be longer than zero")
    return timedelta(seconds=seconds)
