"""RecoverableState never hangs: SIGTERM under a held storage lock, fork, a dropped state.

Each hang is bounded by a timeout that fails the test (never a skip).
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import weakref
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from statekeep import MemoryCheckpointStorage, RecoverableState, SQLiteCheckpointStorage

WAIT = 30.0
SRC = str(Path(__file__).resolve().parent.parent / "src")


def run_python(script: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


# A StateManager saves to the same SQLite storage in the main thread, in a tight loop: a
# SIGTERM almost always lands while the main thread holds the storage's (non-reentrant)
# lock. A handler that persisted right there waited for that lock forever (issue 8.6).
SHARED_SQLITE = textwrap.dedent(
    """
    import sys
    from pydantic import BaseModel
    from statekeep import (
        ExecutionContext, RecoverableState, SQLiteCheckpointStorage, StateManager,
    )

    class Count(BaseModel):
        n: int = 0

    storage = SQLiteCheckpointStorage(sys.argv[1])
    manager = StateManager(storage, checkpoint_interval=1)
    state = RecoverableState(default_state=Count(), persist_state_key="job",
                             persistence_enabled=True, storage=storage, persist_on_exit=True)
    state.initialize()
    context = ExecutionContext()
    while True:
        with state.update() as value:
            value.n += 1
        context.complete_rows(context.last_processed_row + 1)
        manager.save_checkpoint(context)
        if value.n == 50:
            print("ready", flush=True)
    """
)


class TestSigtermWithSharedStorage:
    """Issue 8.6: SIGTERM while the main thread holds the storage's lock."""

    RUNS = 12

    def test_dies_by_sigterm_with_the_final_value_persisted(self, tmp_path: Path) -> None:
        env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
        hung = 0
        for run in range(self.RUNS):
            database = tmp_path / f"run{run}.sqlite"
            child = subprocess.Popen(
                [sys.executable, "-c", SHARED_SQLITE, str(database)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            try:
                assert child.stdout is not None
                assert child.stdout.readline() == "ready\n", child.communicate(timeout=WAIT)
                child.send_signal(signal.SIGTERM)
                try:
                    _, err = child.communicate(timeout=20)
                except subprocess.TimeoutExpired:
                    hung += 1
                    continue
            finally:
                if child.poll() is None:
                    child.kill()
                    child.communicate()
            assert child.returncode == -signal.SIGTERM, err
            with SQLiteCheckpointStorage(database) as storage:
                persisted = storage.load("job")
            assert persisted is not None, f"run {run}: the SIGTERM persist was lost"
            assert persisted["n"] >= 50, persisted
        assert hung == 0, f"{hung} of {self.RUNS} processes hung on SIGTERM"


# The autosave thread saves every millisecond to durable files, so a fork() lands in the
# middle of a save most of the time. Each child persists and tears down (issue 8.7).
FORKS = textwrap.dedent(
    """
    import json, os, select, signal, sys
    from pydantic import BaseModel
    from statekeep import FileCheckpointStorage, RecoverableState

    class Count(BaseModel):
        n: int = 0

    count = int(sys.argv[2])
    storage = FileCheckpointStorage(sys.argv[1])
    state = RecoverableState(default_state=Count(), persist_state_key="job",
                             persistence_enabled=True, storage=storage, persist_interval=0.001)
    state.initialize()
    ok = hung = failed = 0
    for i in range(count):
        with state.update() as value:
            value.n = i
        pid = os.fork()
        if pid == 0:
            try:
                state.persist_state()
                state.teardown()
                alive = [t.name for t in __import__("threading").enumerate()]
                os._exit(0 if alive == ["MainThread"] else 3)
            except BaseException:
                os._exit(2)
        fd = os.pidfd_open(pid)
        try:
            ready, _, _ = select.select([fd], [], [], 5.0)
        finally:
            os.close(fd)
        if not ready:
            hung += 1
            os.kill(pid, signal.SIGKILL)
            if hung == 3:
                os.waitpid(pid, 0)
                break  # enough to fail; each hang costs the full bound
        _, status = os.waitpid(pid, 0)
        if ready:
            if os.waitstatus_to_exitcode(status) == 0:
                ok += 1
            else:
                failed += 1
    state.teardown()
    print(json.dumps({"ok": ok, "hung": hung, "failed": failed, "forks": i + 1}))
    """
)


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs os.pidfd_open (Linux)")
class TestFork:
    """Issue 8.7: a child forked while the autosave thread saves can persist and tear down."""

    def test_hundred_forks_mid_save(self, tmp_path: Path) -> None:
        result = run_python(FORKS, str(tmp_path / "ckpt"), "100", timeout=240)
        assert result.returncode == 0, result.stderr
        counts = json.loads(result.stdout)
        assert counts == {"ok": 100, "hung": 0, "failed": 0, "forks": 100}


class Count(BaseModel):
    n: int = 0


def autosave_threads(key: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"statekeep-autosave-{key}"]


class TestDroppedWithoutTeardown:
    """Issue 8.13: the autosave thread does not keep a dropped state alive, and stops."""

    def test_collected_and_thread_stops(self) -> None:
        key = "dropped-long-interval"
        state: Any = RecoverableState(
            default_state=Count(),
            persist_state_key=key,
            persistence_enabled=True,
            storage=MemoryCheckpointStorage(),
            persist_interval=3600,  # the thread would sleep an hour before noticing
        )
        state.initialize()
        (thread,) = autosave_threads(key)
        alive = weakref.ref(state)
        del state
        gc.collect()
        assert alive() is None, "the autosave thread keeps the state alive"
        thread.join(WAIT)
        assert not thread.is_alive(), "the autosave thread outlived its state"
        assert autosave_threads(key) == []

    def test_collected_while_saving_often(self) -> None:
        key = "dropped-busy"
        saved = threading.Event()

        class Signalling(MemoryCheckpointStorage):
            def save(self, *args: Any, **kwargs: Any) -> bool:
                result = super().save(*args, **kwargs)
                saved.set()
                return result

        state: Any = RecoverableState(
            default_state=Count(),
            persist_state_key=key,
            persistence_enabled=True,
            storage=Signalling(),
            persist_interval=0.001,
        )
        state.initialize()
        assert saved.wait(WAIT)
        (thread,) = autosave_threads(key)
        alive = weakref.ref(state)
        del state
        gc.collect()
        thread.join(WAIT)
        assert not thread.is_alive()
        assert alive() is None


class TestTeardownFromTheApplicationsHandler:
    """A graceful-shutdown handler that calls teardown() itself neither hangs nor loses."""

    @pytest.mark.parametrize("inside_update", [False, True])
    def test_no_hang(self, inside_update: bool) -> None:
        storage = MemoryCheckpointStorage()
        state = RecoverableState(
            default_state=Count(),
            persist_state_key="graceful",
            persistence_enabled=True,
            storage=storage,
            persist_on_exit=True,
        )
        done: list[int] = []

        def handler(signum: int, frame: object) -> None:
            state.teardown()
            done.append(signum)

        original = signal.signal(signal.SIGTERM, handler)
        try:
            state.initialize()
            with state.update() as value:
                value.n = 5
                if inside_update:
                    os.kill(os.getpid(), signal.SIGTERM)
                    for _ in range(1000):  # bytecodes for the handler to run in
                        pass
            if not inside_update:
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(1000):
                    pass
        finally:
            signal.signal(signal.SIGTERM, original)
        assert done == [signal.SIGTERM]
        assert storage.load("graceful") == {"n": 5}
        for helper in [t for t in threading.enumerate() if t.name == "statekeep-sigterm"]:
            helper.join(WAIT)
            assert not helper.is_alive()


# A save that never finishes: the storage's save blocks forever.
STUCK_SAVE = textwrap.dedent(
    """
    import threading
    from pydantic import BaseModel
    import statekeep._recoverable_hooks as hooks
    from statekeep import MemoryCheckpointStorage, RecoverableState

    hooks.SIGTERM_GRACE = 0.5

    class Stuck(MemoryCheckpointStorage):
        def save(self, *args, **kwargs):
            threading.Event().wait()

    class Count(BaseModel):
        n: int = 0

    state = RecoverableState(default_state=Count(), persist_state_key="job",
                             persistence_enabled=True, storage=Stuck(), persist_on_exit=True)
    state.initialize()
    print("ready", flush=True)
    threading.Event().wait()
    """
)


class TestSigtermGrace:
    """A save on SIGTERM that never ends does not keep the process alive."""

    def test_terminated_after_the_grace_period(self) -> None:
        env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
        child = subprocess.Popen(
            [sys.executable, "-c", STUCK_SAVE],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == "ready\n", child.communicate(timeout=WAIT)
            child.send_signal(signal.SIGTERM)
            _, err = child.communicate(timeout=WAIT)
        finally:
            if child.poll() is None:
                child.kill()
                child.communicate()
        assert child.returncode == -signal.SIGTERM, err


# The parent persists on exit and on SIGTERM; a forked child changes its copy and exits
# normally (atexit runs), then another is terminated by SIGTERM. Neither may write the
# parent's key: only the parent's own teardown does.
FORKED_HOOKS = textwrap.dedent(
    """
    import os, signal, sys
    from pydantic import BaseModel
    from statekeep import FileCheckpointStorage, RecoverableState

    class Count(BaseModel):
        n: int = 0

    storage = FileCheckpointStorage(sys.argv[1], durable=False)
    state = RecoverableState(default_state=Count(), persist_state_key="job",
                             persistence_enabled=True, storage=storage, persist_on_exit=True)
    state.initialize()
    with state.update() as value:
        value.n = 1
    state.persist_state()
    for how in ("exit", "sigterm"):
        pid = os.fork()
        if pid == 0:
            with state.update() as value:
                value.n = 99
            if how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            sys.exit(0)
        _, status = os.waitpid(pid, 0)
        print(how, os.waitstatus_to_exitcode(status), storage.load("job")["n"], flush=True)
    """
)


class TestForkedChildHooks:
    """A forked child inherits the value, not the hooks: it never writes the parent's key."""

    def test_child_exit_and_sigterm_do_not_persist(self, tmp_path: Path) -> None:
        result = run_python(FORKED_HOOKS, str(tmp_path / "ckpt"), timeout=WAIT)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == ["exit 0 1", f"sigterm {-signal.SIGTERM} 1"]
