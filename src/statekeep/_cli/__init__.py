"""The ``statekeep`` command (also ``python -m statekeep``): see docs/command-line.md.

Exit status: 0 all well, 1 something is damaged (or a named checkpoint is absent),
2 a usage error (one line on stderr, no traceback). Each subcommand's module is
imported only when it runs, so ``statekeep ls`` loads no more than listing needs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from statekeep._cli._common import USAGE, UsageError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (no usage block) and exit 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see: {self.prog} --help)")


def _parser() -> argparse.ArgumentParser:
    top = _Parser(
        prog="statekeep",
        description="See, verify and prune what statekeep saved.",
        epilog="Exit status: 0 all well, 1 something damaged, 2 usage error.",
    )
    top.add_argument("--version", action="store_true", help="print the version and exit")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def json_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = sub.add_parser("ls", help="list the states of a states directory, newest last")
    p.add_argument(
        "target", metavar="DIR_OR_URL", help="a states directory, s3://... or file://... remote"
    )
    p.add_argument("--verify", action="store_true", help="check every file of every state")
    json_flag(p)
    p.set_defaults(run=("_snapshots", "cmd_ls"))

    p = sub.add_parser("show", help="print a state's manifest: files, sizes, checksums")
    p.add_argument("state", metavar="STATE", help="a state directory")
    json_flag(p)
    p.set_defaults(run=("_snapshots", "cmd_show"))

    p = sub.add_parser("verify", help="check states against their manifests")
    p.add_argument("target", metavar="DIR_OR_URL", help="a states directory, one state, or a URL")
    p.add_argument("states", metavar="STATE", nargs="*", help="names of states in DIR")
    json_flag(p)
    p.set_defaults(run=("_snapshots", "cmd_verify"))

    p = sub.add_parser("prune", help="remove states by the keeper's rules, once")
    p.add_argument("target", metavar="DIR", help="a states directory")
    p.add_argument("--keep", "--keep-last", metavar="N", help="keep the newest N")
    p.add_argument(
        "--keep-every", metavar="DURATION", action="append", default=[],
        help="keep the newest state in each DURATION (30m, 1h, 1d, 1w)",
    )  # fmt: skip
    p.add_argument(
        "--keep-best", metavar="METRIC:N[:min|max]", action="append", default=[],
        help="keep the N best states by a metadata value (default min)",
    )  # fmt: skip
    p.add_argument("--policy", metavar="SPEC", help="terms, e.g. 'last:3,every:1h,best:loss:2'")
    p.add_argument("--pattern", default="*.state", help="names of states (default: *.state)")
    p.add_argument("--dry-run", action="store_true", help="say what would go; remove nothing")
    json_flag(p)
    p.set_defaults(run=("_snapshots", "cmd_prune"))

    cp = sub.add_parser("checkpoints", help="checkpoints in a directory, sqlite, s3 or postgres")
    csub = cp.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    url_help = "a checkpoint directory, sqlite:///FILE, s3://BUCKET/PREFIX or postgresql://..."

    p = csub.add_parser("ls", help="list checkpoints, oldest first")
    p.add_argument("url", metavar="URL", help=url_help)
    p.add_argument("--verify", action="store_true", help="read every checkpoint in full")
    json_flag(p)
    p.set_defaults(run=("_checkpoints", "cmd_ls"))

    p = csub.add_parser("show", help="print one session's checkpoint")
    p.add_argument("url", metavar="URL", help=url_help)
    p.add_argument("session", metavar="SESSION")
    json_flag(p)
    p.set_defaults(run=("_checkpoints", "cmd_show"))

    p = csub.add_parser("rm", help="delete sessions' checkpoints")
    p.add_argument("url", metavar="URL", help=url_help)
    p.add_argument("sessions", metavar="SESSION", nargs="+")
    json_flag(p)
    p.set_defaults(run=("_checkpoints", "cmd_rm"))

    p = csub.add_parser("prune", help="delete checkpoints older than an age")
    p.add_argument("url", metavar="URL", help=url_help)
    p.add_argument("--older-than", metavar="AGE", required=True, help="e.g. 12h, 7d, 2w")
    p.add_argument("--dry-run", action="store_true", help="say what would go; remove nothing")
    json_flag(p)
    p.set_defaults(run=("_checkpoints", "cmd_prune"))
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command with ``argv`` (default: the process's arguments); return the exit status."""
    import importlib

    try:
        args = _parser().parse_args(argv)
        if args.version:
            from statekeep import __version__

            print(f"statekeep {__version__}")
            return 0
        if getattr(args, "run", None) is None:
            missing = "ACTION" if args.command == "checkpoints" else "COMMAND"
            raise UsageError(f"missing {missing} (see: statekeep --help)")
        module, name = args.run
        run = getattr(importlib.import_module(f"statekeep._cli.{module}"), name)
        status: int = run(args)
        sys.stdout.flush()
    except UsageError as exc:
        print(f"statekeep: error: {' '.join(str(exc).split())}", file=sys.stderr)  # one line
        return USAGE
    except BrokenPipeError:  # `statekeep ls DIR | head`: the reader left; so do we
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130
    return status
