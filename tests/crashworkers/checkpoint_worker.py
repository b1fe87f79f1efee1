"""Child processes for the checkpoint crash and cross-process tests.

``zygote BACKEND PATH``
    Reads ``go BASE SEED DURABLE`` lines on stdin. For each it forks a child that saves
    session ``crash`` in a loop until it is killed, writing ``saved GEN`` on stdout as
    each ``save`` returns. The zygote writes ``pid PID`` after the fork and
    ``exit PID STATUS`` once the child is reaped, so every line of a child comes before
    its ``exit`` line. ``quit`` ends it.
``writer BACKEND PATH SESSION WRITER COUNT``
    Saves COUNT values of WRITER to SESSION, then writes ``done WRITER``.

BACKEND is ``file``, ``sqlite``, ``s3`` (PATH an ``s3://`` URL, the server and
credentials in ``AWS_*`` environment variables) or ``postgres`` (PATH a conninfo).
Every value is built by :func:`make_value` from its
generation number and :func:`check_value` tells a whole value from a mix of two.
"""

from __future__ import annotations

import random
import sys
import zlib
from typing import Any

try:  # imported by the tests as part of the crashworkers package
    from crashworkers._zygote import emit, serve
except ImportError:  # run as a script, with this folder on sys.path
    from _zygote import emit, serve  # type: ignore[no-redef]

SESSION = "crash"


def make_value(gen: int, size: int) -> dict[str, Any]:
    """A value whose every part depends on ``gen`` (sizes vary so kills land mid-write)."""
    rows = [gen] * size
    return {
        "gen": gen,
        "rows": rows,
        "text": f"{gen}," * size,
        "crc": zlib.crc32(b"%d/%d" % (gen, size)),
    }


def check_value(value: dict[str, Any] | None) -> int:
    """Return the generation of a whole value; raise AssertionError otherwise."""
    if value is None:
        raise AssertionError("no checkpoint although a save had returned")
    gen, size = value["gen"], len(value["rows"])
    if value != make_value(gen, size):
        raise AssertionError(f"checkpoint mixes generations: gen {gen}, size {size}")
    return int(gen)


def open_storage(backend: str, path: str, durable: bool = True) -> Any:
    if backend == "file":
        from statekeep.storage._file import FileCheckpointStorage

        return FileCheckpointStorage(path, durable=durable)
    if backend == "sqlite":
        from statekeep.storage._sqlite import SQLiteCheckpointStorage

        return SQLiteCheckpointStorage(path)
    if backend == "s3":
        from statekeep.storage._s3 import S3CheckpointStorage

        return S3CheckpointStorage(path)
    if backend == "postgres":
        from statekeep.storage._postgres import PostgresCheckpointStorage

        return PostgresCheckpointStorage(path)
    raise SystemExit(f"unknown backend {backend!r}")


def save_loop(backend: str, path: str, base: int, seed: int, durable: bool) -> None:
    rng = random.Random(seed)
    storage = open_storage(backend, path, durable)
    for i in range(1_000_000):
        gen = base + i
        storage.save(SESSION, make_value(gen, rng.randrange(1, 20_000)), metadata={"gen": gen})
        emit(f"saved {gen}")


def zygote(backend: str, path: str) -> None:
    import statekeep.storage  # noqa: F401  (imported once, before forking)

    if backend == "s3":
        from statekeep.storage._s3 import default_client

        default_client().close()  # loads boto3's service models once, for every child
    elif backend == "postgres":
        import psycopg  # noqa: F401

    serve(lambda base, seed, durable: save_loop(backend, path, base, seed, durable))


def writer(backend: str, path: str, session: str, who: int, count: int) -> None:
    with open_storage(backend, path) as storage:
        for i in range(count):
            storage.save(session, make_value(who * 1_000_000 + i, 100 + 37 * who))
    emit(f"done {who}")


def run_writers(
    backend: str, path: str, sessions: list[str], count: int, env: dict[str, str]
) -> list[str]:
    """Run one ``writer`` process per session (writer ``i`` saves ``sessions[i]``) at once.

    Returns what each printed; raises if one failed.
    """
    import subprocess

    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "writer", backend, path, session, str(who), str(count)],
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        for who, session in enumerate(sessions)
    ]
    outputs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"writer {proc.args} exited {proc.returncode}"
        outputs.append(out.strip())
    return outputs


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "zygote":
        zygote(args[0], args[1])
    elif mode == "writer":
        writer(args[0], args[1], args[2], int(args[3]), int(args[4]))
    else:
        sys.exit(f"unknown mode {mode!r}")
