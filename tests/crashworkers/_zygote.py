"""The fork server both crash workers share: one import, then a fork per kill.

``serve(save_loop)`` reads ``go BASE SEED DURABLE`` lines on stdin. For each it forks a
child that runs ``save_loop(base, seed, durable)`` until it is killed, and writes
``pid PID`` after the fork and ``exit PID STATUS`` once the child is reaped.

The order of the lines is a protocol, not luck: the child shares stdout with the
zygote, so it waits (on a pipe of its own) until the zygote has written the ``pid``
line before it runs anything that could write. Every line of a child therefore comes
after its ``pid`` line and before its ``exit`` line. ``quit`` (or end of input) ends it.
"""

from __future__ import annotations

import contextlib
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
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: wait for the pid line to be out, then save until killed
            os.close(go_w)
            code = 0
            try:
                if os.read(go_r, 1) != b"g":
                    os._exit(4)  # the zygote died before writing our pid line
                os.close(go_r)
                save_loop(base, seed, durable)
            except BaseException:
                traceback.print_exc()
                code = 3
            os._exit(code)
        os.close(go_r)
        emit(f"pid {pid}")
        with contextlib.suppress(BrokenPipeError):  # the child was killed before it started
            os.write(go_w, b"g")
        os.close(go_w)
        _, status = os.waitpid(pid, 0)
        emit(f"exit {pid} {status}")
