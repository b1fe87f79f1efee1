"""Child processes for the crash and concurrency tests.

Kept to the standard library and ``statekeep._store`` so that it starts fast.

``zygote STATES_DIR``
    Reads ``go BASE SEED DURABLE`` lines on stdin. For each it forks a child that saves
    states of several components in a loop until it is killed, writing
    ``saved GEN PATH`` on stdout as each ``save_state`` returns. The zygote writes
    ``pid PID`` after the fork and ``exit PID STATUS`` once the child is reaped, so
    every line of a child comes before its ``exit`` line. ``quit`` ends it.
``writer STATES_DIR TAG COUNT BASE``
    Saves COUNT states named ``...-TAG.state`` and writes ``saved GEN PATH`` for each.
``count STATES_DIR N MODE``
    Takes N numbers of the directory's commit counter (MODE ``xattr``: the extended
    attribute; ``scan``: as without attributes, committing a tiny state with each) once
    a line arrives on stdin (after it wrote ``ready``), and writes ``got N1 N2 ...``.
``hold STATES_DIR``
    Opens a work entry in the store's directory, writes ``held PATH``, and waits
    on stdin (to be killed while holding it).
``hold-fork STATES_DIR``
    The same, but first forks a child that waits on stdin too (and outlives it);
    writes ``held PATH CHILD_PID``.

Every file a save writes starts with the save's generation number (``GEN\\n``) and
continues with a pattern derived from it, so :func:`check_state` can tell a state that
mixes two saves from a consistent one.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

try:  # imported by the tests as part of the crashworkers package
    from crashworkers._zygote import emit, serve
except ImportError:  # run as a script, with this folder on sys.path
    from _zygote import emit, serve  # type: ignore[no-redef]

# Top-level names a complete state holds ("empty" writes nothing).
EXPECTED = frozenset({"big", "model.optim.pt", "model.pt", "small", "tree"})
MANIFEST = ".statekeep-manifest.json"
_CHUNK = 64 * 1024


def payload(gen: int, size: int) -> bytes:
    pattern = b"%d," % gen
    return (pattern * (size // len(pattern) + 1))[:size]


def write_file(path: Path, gen: int, size: int) -> None:
    with open(path, "wb", buffering=0) as f:
        f.write(b"%d\n" % gen)
        body = payload(gen, size)
        for start in range(0, size, _CHUNK):
            f.write(body[start : start + _CHUNK])


def check_state(path: Path) -> int:
    """Return the generation of a complete, unmixed state; raise AssertionError otherwise."""
    names = set(os.listdir(path)) - {MANIFEST}
    if names != EXPECTED:
        raise AssertionError(f"state {path} holds {sorted(names)}, expected {sorted(EXPECTED)}")
    gens: dict[int, str] = {}
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            if name == MANIFEST:
                continue
            file = Path(dirpath, name)
            data = file.read_bytes()
            head, _, body = data.partition(b"\n")
            gen = int(head)
            if body != payload(gen, len(body)):
                raise AssertionError(f"state {path}: {file} does not hold generation {gen}'s data")
            gens.setdefault(gen, str(file))
    if len(gens) != 1:
        raise AssertionError(f"state {path} mixes generations {gens}")
    if not os.listdir(path / "tree"):
        raise AssertionError(f"state {path}: tree/ is empty")
    return next(iter(gens))


def make_store(states_dir: str, seed: int, durable: bool, name_format: str | None = None):  # type: ignore[no-untyped-def]
    """A StateStore with five components of varying size sharing one generation number."""
    from statekeep._store import PersistentStateMixin, StateStore

    rng = random.Random(seed)
    current = [0]

    class File(PersistentStateMixin):
        def __init__(self, max_size: int) -> None:
            self.max_size = max_size

        def save_state(self, path: Path) -> None:
            write_file(path, current[0], rng.randrange(self.max_size))

    class Tree(PersistentStateMixin):
        def save_state(self, path: Path) -> None:
            path.mkdir()
            (path / "sub").mkdir()
            for i in range(rng.randrange(1, 5)):
                write_file(path / f"part{i}", current[0], rng.randrange(8192))
            write_file(path / "sub" / "leaf", current[0], rng.randrange(100))

    class Siblings(PersistentStateMixin):
        def save_state(self, path: Path) -> None:
            write_file(path.with_name(path.name + ".pt"), current[0], rng.randrange(200_000))
            write_file(path.with_name(path.name + ".optim.pt"), current[0], rng.randrange(50_000))

    kwargs = {} if name_format is None else {"state_name_format": name_format}
    store = StateStore(states_dir, durable=durable, **kwargs)
    store.register("small", File(4096))
    store.register("tree", Tree())
    store.register("empty", PersistentStateMixin())
    store.register("model", Siblings())
    store.register("big", File(1 << 20))
    return store, current


def save_loop(states_dir: str, base: int, seed: int, durable: bool, count: int) -> None:
    store, current = make_store(states_dir, seed, durable)
    for i in range(count):
        current[0] = base + i
        path = store.save_state()
        emit(f"saved {current[0]} {path}")


def zygote(states_dir: str) -> None:
    import statekeep._store  # noqa: F401  (imported once, before forking)

    serve(lambda base, seed, durable: save_loop(states_dir, base, seed, durable, 100_000))


def writer(states_dir: str, tag: str, count: int, base: int) -> None:
    store, current = make_store(
        states_dir, base, True, name_format=f"%Y-%m-%d_%H-%M-%S,%f-{tag}.state"
    )
    for i in range(count):
        current[0] = base + i
        emit(f"saved {current[0]} {store.save_state()}")


def hold(states_dir: str, fork: bool = False) -> None:
    from statekeep import _atomic

    _atomic.make_root(states_dir, durable=False)
    work = _atomic.Work(states_dir, is_dir=True)
    (work.path / "half-written").write_bytes(b"x" * 100)
    if fork:  # a child that outlives us, holding copies of our descriptors
        ready, told = os.pipe()
        child = os.fork()
        if child == 0:
            # fork() returns here only after the at-fork hooks ran: say so, then wait
            os.write(told, b"x")
            sys.stdin.read()
            os._exit(0)
        os.close(told)
        os.read(ready, 1)  # "held" only once the child's hooks have let go of the lock
        os.close(ready)
        emit(f"held {work.path} {child}")
    else:
        emit(f"held {work.path}")
    sys.stdin.read()


def count(states_dir: str, n: int, mode: str) -> None:
    """Take ``n`` sequence numbers; ``scan`` mode commits a tiny state with each one."""
    from statekeep import _commit, _sequence

    if mode == "scan":
        _sequence._HAS_XATTR = False  # as on a filesystem without user xattrs
    counter = _sequence.SequenceCounter(states_dir)
    got = []
    emit("ready")
    sys.stdin.readline()  # start together with the other processes
    for i in range(n):
        if mode == "scan":
            with _commit.BuildDir(states_dir, durable=False, counter=counter) as build:
                (build.path / "x").write_bytes(b"x")
                got.append(build.commit(f"{states_dir}/{os.getpid()}-{i}.state").sequence)
        else:
            got.append(counter.next())
    emit("got " + " ".join(map(str, got)))


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "zygote":
        zygote(args[0])
    elif mode == "writer":
        writer(args[0], args[1], int(args[2]), int(args[3]))
    elif mode == "hold":
        hold(args[0])
    elif mode == "hold-fork":
        hold(args[0], fork=True)
    elif mode == "count":
        count(args[0], int(args[1]), args[2])
    else:
        sys.exit(f"unknown mode {mode!r}")
