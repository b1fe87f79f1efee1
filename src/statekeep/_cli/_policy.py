"""The retention spec of ``statekeep prune``: terms that each keep some states.

A spec is one or more terms, separated by commas or spaces; a state kept by any term
stays (and the keeper always keeps the newest state that verifies):

- ``last:N`` (or ``--keep N`` / ``--keep-last N``): the newest N states;
- ``every:DURATION`` (``--keep-every``): the newest state in each DURATION of time,
  e.g. ``every:1h``, ``every:1d``;
- ``best:METRIC:N[:min|max]`` (``--keep-best``): the N states whose metadata value
  ``METRIC`` is lowest (``min``, the default) or highest (``max``).
"""

from __future__ import annotations

import argparse
import re

from statekeep._cli import _compat
from statekeep._cli._common import fail, parse_duration

_SPLIT = re.compile(r"[,\s]+")


def _count(text: str, what: str) -> int:
    try:
        n = int(text)
    except ValueError:
        fail(f"{what}: {text!r} is not a whole number")
    if n < 1:
        fail(f"{what}: {text!r} must be at least 1 (prune never removes every state)")
    return n


def _best(text: str, what: str) -> tuple[str, int, str]:
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0]:
        fail(f"{what}: {text!r} is not METRIC:N or METRIC:N:min|max (e.g. loss:2:min)")
    mode = parts[2] if len(parts) == 3 else "min"
    if mode not in ("min", "max"):
        fail(f"{what}: {text!r} ends in {mode!r}; write min or max")
    return parts[0], _count(parts[1], what), mode


def parse_spec(spec: str) -> list[tuple[str, str]]:
    """``"last:3, every:1h"`` -> ``[("last", "3"), ("every", "1h")]``; usage error if malformed."""
    terms = []
    for term in _SPLIT.split(spec.strip()):
        if not term:
            continue
        kind, sep, rest = term.partition(":")
        if not sep or kind not in ("last", "every", "best"):
            fail(
                f"--policy: {term!r} is not a term; write last:N, every:DURATION or"
                " best:METRIC:N[:min|max]"
            )
        terms.append((kind, rest))
    if not terms:
        fail("--policy: the spec is empty")
    return terms


def from_args(args: argparse.Namespace) -> tuple[object | None, int]:
    """(policy or None, max_keep) from prune's options; a usage error if none was given."""
    terms: list[tuple[str, str]] = []
    if args.keep is not None:
        terms.append(("last", args.keep))
    terms += [("every", d) for d in args.keep_every]
    terms += [("best", b) for b in args.keep_best]
    if args.policy is not None:
        terms += parse_spec(args.policy)
    if not terms:
        fail(
            "prune needs a rule: --keep N, --keep-every DURATION, --keep-best METRIC:N or --policy"
        )
    if len(terms) == 1 and terms[0][0] == "last":
        return None, _count(terms[0][1], "--keep")  # what every statekeep can do: max_keep
    wanted: list[tuple[str, tuple[object, ...]]] = []
    for kind, value in terms:  # check every term before asking for the policy classes
        if kind == "last":
            wanted.append(("KeepLatest", (_count(value, "last"),)))
        elif kind == "every":
            wanted.append(("KeepEvery", (parse_duration(value, "every"),)))
        else:
            wanted.append(("KeepBest", _best(value, "best")))
    policies = [_compat.policy_class(name)(*params) for name, params in wanted]
    if len(policies) == 1:
        return policies[0], -1
    return _compat.policy_class("KeepAny")(*policies), -1
