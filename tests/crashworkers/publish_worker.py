"""Child processes for the kill -9 tests of publishing to a remote (tests/test_remote_crash.py).

``zygote STATES_DIR REMOTE``: reads ``go BASE SEED DURABLE`` lines (see ``_zygote``); each
forked child commits states ``<gen>.state`` locally and publishes them to REMOTE (a path,
or ``s3://bucket/prefix`` with the endpoint and keys in the environment) until it is
killed, writing ``saved GEN PATH`` as each save (commit + publish) returns.

``writer STATES_DIR REMOTE TAG COUNT``: commits and publishes COUNT states (no kill).

``repair STATES_DIR REMOTE``: loads the newest state, whose local copy is damaged (see
:func:`repair`).

Every file starts with the generation and continues with a pattern derived from it
(``snapshot_worker.payload``), so a restored state that mixes saves is caught.
"""

from __future__ import annotations

import random
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from statekeep.remote import Remote

try:
    from crashworkers._zygote import emit, serve
    from crashworkers.snapshot_worker import write_file
except ImportError:  # run as a script, with this folder on sys.path
    from _zygote import emit, serve  # type: ignore[no-redef]
    from snapshot_worker import write_file  # type: ignore[no-redef]


def save_loop(states_dir: str, remote: Remote, base: int, seed: int, durable: bool) -> None:
    from statekeep import _commit, _publish

    rng = random.Random(seed)
    publisher = _publish.Publisher(remote, states_dir, durable=durable)
    counter = publisher.counter()
    for gen in range(base, base + 100_000):
        final = f"{states_dir}/{gen}.state"
        with _commit.BuildDir(states_dir, durable=durable, counter=counter) as b:
            write_file(b.path / "small", gen, rng.randrange(4096))
            (b.path / "tree" / "sub").mkdir(parents=True)
            for i in range(rng.randrange(1, 4)):
                write_file(b.path / "tree" / f"part{i}", gen, rng.randrange(8192))
            write_file(b.path / "tree" / "sub" / "leaf", gen, rng.randrange(100))
            write_file(b.path / "big", gen, rng.randrange(1 << 20))
            b.commit(final)
        publisher.publish(final)
        emit(f"saved {gen} {final}")


def writer(states_dir: str, remote_url: str, tag: str, count: int) -> None:
    """Commit and publish ``count`` states named ``<gen>-<tag>.state``; never killed."""
    from statekeep import _commit, _publish
    from statekeep.remote import open_remote

    publisher = _publish.Publisher(open_remote(remote_url), states_dir, durable=False)
    counter = publisher.counter()
    for gen in range(count):
        final = f"{states_dir}/{gen}-{tag}.state"
        with _commit.BuildDir(states_dir, durable=False, counter=counter) as b:
            write_file(b.path / "small", gen, 100 + gen)
            write_file(b.path / "big", gen, 50_000)
            b.commit(final)
        publisher.publish(final)
        emit(f"saved {gen} {final}")


def repair(states_dir: str, remote_url: str) -> None:
    """Open a store on STATES_DIR (whose newest local copy is damaged), say ``ready``,
    wait for ``go``, then load: the remote copy replaces the damaged one. Killed at a
    random moment of that by tests/test_remote_crash.py."""
    from pathlib import Path

    from statekeep import PersistentStateMixin, StateStore

    class Blob(PersistentStateMixin):
        def load_state(self, path: Path) -> None:
            for part in sorted(path.iterdir()):
                part.read_bytes()

    store = StateStore(states_dir, remote=remote_url)
    store.register("blob", Blob())
    emit("ready")
    sys.stdin.readline()
    emit(f"loaded {store.load_latest_state()}")


def zygote(states_dir: str, remote_url: str) -> None:
    import statekeep._publish  # noqa: F401  (imported once, before forking)
    from statekeep.remote import open_remote

    # Made once, before forking: a boto3 client opens no connection until its first
    # request, which each child makes itself (the zygote never uses it).
    remote = open_remote(remote_url)
    serve(lambda base, seed, durable: save_loop(states_dir, remote, base, seed, durable))


if __name__ == "__main__":
    if sys.argv[1] == "zygote":
        zygote(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "repair":
        repair(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "writer":
        writer(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        sys.exit(f"unknown mode {sys.argv[1]!r}")
