"""The fork server both crash workers share: one import, then a fork per kill.

``serve(save_loop)`` reads ``go BASE SEED DURABLE`` lines on stdin. For each it forks a
child that runs ``save_loop(base, seed, durable)`` until it is killed, and writes
``pid PID`` after the fork and ``exit PID STATUS`` once the child is reaped, so every
line a child writes comes before its ``exit`` line. ``quit`` (or end of input) ends it.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable


def emit(line: str) -> None:
    """Write one line to stdout in one system call (atomic for short lines on a pipe)."""
    os.write(1, (line + "\n").encode())


def serve(save_loop: Callable[[int, int, bool], None]) -> None:
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            return
        base, seed, durable = int(cmd[1]), int(cmd[2]), cmd[3] == "1"
        pid = os.fork()
        if pid == 0:  # the child: save until killed
            code = 0
            try:
                save_loop(base, seed, durable)
            except BaseException:
                traceback.print_exc()
                code = 3
            os._exit(code)
        emit(f"pid {pid}")
        _, status = os.waitpid(pid, 0)
        emit(f"exit {pid} {status}")
