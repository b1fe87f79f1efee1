"""When a RecoverableState persists on its own: an autosave thread, atexit, SIGTERM.

The SIGTERM hook never takes the signal away from the application: it remembers the
handler it replaced and hands the signal on to it. A Python handler is called, an
ignored signal stays ignored, and the default action (terminate) is re-raised so the
process still dies by SIGTERM, as its parent expects.

The handler itself does no I/O and takes no lock. A Python signal handler runs in the
main thread between two bytecodes, possibly while that thread holds a storage's lock
(a ``StateManager`` saving to the same SQLite database, say); persisting from there
would wait for that lock forever. So the handler only queues the work for one hand-off
thread (``queue.SimpleQueue.put`` is re-entrant and never blocks) and returns; the main
thread carries on and releases its locks while the hand-off thread persists. Then:

- default action: the handler has already put SIGTERM back to ``SIG_DFL``; the hand-off
  thread, once every state is persisted (or after ``SIGTERM_GRACE`` seconds at most),
  sends SIGTERM to the process, which dies by it;
- an ignored SIGTERM stays ignored;
- the application's own Python handler is called at once, by the handler, in the main
  thread (Python calls handlers nowhere else). It usually makes the program exit, and
  the exit hook then persists once more after the main thread has let go of its locks.

Stacked hooks (several states) are walked in one go: each active one is persisted once.

The autosave thread holds its state only weakly: a state dropped without
``teardown()`` is collected, and its thread stops.

In a child made by ``fork()`` neither the hooks nor the autosave thread run: they would
write the parent's key from two processes. The child's own calls still work.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import weakref
from collections.abc import Callable
from queue import SimpleQueue
from types import FrameType
from typing import Any

from statekeep._fork import on_fork_child

__all__ = ["AutoPersist", "SigtermHook"]

_logger = logging.getLogger("statekeep")

Persist = Callable[[], None]

_RELEASE_WAIT = 1.0  # seconds teardown waits for an idle SIGTERM helper to end


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _start_deaf(thread: threading.Thread) -> None:
    """Start ``thread`` with SIGTERM blocked in it, so the kernel never delivers it there.

    A process-directed signal goes to any thread that does not block it; taken by one of
    ours, it would leave a main thread that waits on a lock asleep, its Python handler
    never run. The new thread inherits the mask it is started with.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _Handoff:
    """The one thread per process that does the SIGTERM hooks' work outside the handler.

    It runs only while at least one hook is installed. Jobs come in through a
    ``SimpleQueue`` (safe to ``put`` from a signal handler) and run in order.
    """

    def __init__(self) -> None:
        # install/uninstall only; re-entrant because teardown() may run in a signal handler
        # that interrupted the main thread inside install or uninstall
        self._guard = threading.RLock()
        self._users = 0
        self._pid = 0
        self._jobs: SimpleQueue[Callable[[], None] | None] = SimpleQueue()
        self._thread: threading.Thread | None = None
        self.dying = False  # SIGTERM's default action is under way
        on_fork_child(self._after_fork)

    def acquire(self) -> None:
        """One more hook is installed: make sure the thread runs in this process."""
        with self._guard:
            self._users += 1
            if self._thread is None:
                self._pid = os.getpid()
                self._jobs = SimpleQueue()
                self._thread = threading.Thread(
                    target=_handoff_loop,
                    args=(self._jobs,),
                    name="statekeep-sigterm",
                    daemon=True,
                )
                _start_deaf(self._thread)

    def release(self) -> None:
        """One hook fewer; the last one stops the thread once its queued jobs are done.

        It waits for the thread a bounded time only: ``teardown()`` may be called from
        the application's own SIGTERM handler, while a queued save waits for a lock the
        interrupted main thread holds; the thread then ends once that save is done.
        """
        thread = None
        with self._guard:
            self._users -= 1
            if self._users <= 0 and self._thread is not None:
                self._users = 0
                self._jobs.put(None)
                thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(_RELEASE_WAIT)

    def submit(self, work: Callable[[], None]) -> None:
        """Run ``work`` in the hand-off thread. Safe in a signal handler."""
        self._jobs.put(work)

    def _after_fork(self) -> None:
        # The thread does not exist in the child; hooks do nothing there (see module).
        self._guard = threading.RLock()
        self._users = 0
        self._thread = None
        self._jobs = SimpleQueue()
        self.dying = False


def _handoff_loop(jobs: SimpleQueue[Callable[[], None] | None]) -> None:
    while True:
        work = jobs.get()
        if work is None:
            return
        try:
            work()
        except Exception:  # pragma: no cover - work() logs its own failures
            _logger.exception("statekeep: persisting on SIGTERM failed")


def _terminate() -> None:
    """SIGTERM's default action, from the hand-off thread (``SIG_DFL`` is already set)."""
    os.kill(os.getpid(), signal.SIGTERM)


SIGTERM_GRACE = 30.0
"""Seconds the saves on SIGTERM may take before the default action happens anyway.

A save that cannot finish (a storage that hangs, a main thread that never lets go of
the state's lock) must not keep a process alive that was told to terminate. Every save
is atomic, so terminating in the middle of one keeps the previous value.
"""


def _persist_then_terminate(works: list[Callable[[], None]]) -> Callable[[], None]:
    def job() -> None:
        deadline = threading.Timer(SIGTERM_GRACE, _terminate)
        deadline.daemon = True
        deadline.name = "statekeep-sigterm-deadline"
        deadline.start()  # SIGTERM is blocked in this thread, so in the timer's too
        for work in works:
            work()
        _terminate()

    return job


_handoff = _Handoff()


class SigtermHook:
    """A SIGTERM handler that queues ``work`` for the hand-off thread, then chains on.

    ``work`` runs in the hand-off thread, never in the handler.
    """

    def __init__(self, work: Callable[[], None]) -> None:
        self._work = work
        self._previous: Any = None
        self._active = False
        self._pid = os.getpid()

    def install(self) -> None:
        """Become the SIGTERM handler (main thread only), remembering the current one."""
        self._previous = signal.getsignal(signal.SIGTERM)
        self._pid = os.getpid()
        _handoff.acquire()
        signal.signal(signal.SIGTERM, self)
        self._active = True

    def uninstall(self) -> None:
        """Stop queueing work; give the signal back if nobody chained after us.

        When another handler was installed on top of this one, restoring ours would
        remove it, so the hook stays in place as a pure pass-through instead.
        """
        if not self._active:
            return
        self._active = False
        if self._pid == os.getpid():
            _handoff.release()
        previous = signal.SIG_DFL if self._previous is None else self._previous
        current: object = signal.getsignal(signal.SIGTERM)
        if _in_main_thread() and current is self:
            signal.signal(signal.SIGTERM, previous)

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        # Inside the signal handler: queue, never wait. Walk down through the hooks of
        # other states stacked beneath this one, so each is persisted, in one pass.
        works: list[Callable[[], None]] = []
        handler: Any = self
        while isinstance(handler, SigtermHook):
            if handler._active and handler._pid == os.getpid():
                works.append(handler._work)
            handler = handler._previous
        if handler is signal.SIG_IGN:
            for work in works:
                _handoff.submit(work)
        elif callable(handler):
            for work in works:
                _handoff.submit(work)
            handler(signum, frame)
        elif works:
            # The default action (SIG_DFL, or a handler not set from Python): die by
            # SIGTERM once persisted. A second SIGTERM meanwhile kills at once.
            signal.signal(signum, signal.SIG_DFL)
            _handoff.dying = True
            _handoff.submit(_persist_then_terminate(works))
        else:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


def _autosave_loop(
    persist: weakref.WeakMethod[Persist],
    stop: threading.Event,
    interval: float,
    name: str,
    log: logging.Logger,
) -> None:
    """Persist every ``interval`` s until stopped or until the state is collected."""
    while not stop.wait(interval):
        method = persist()
        if method is None:
            return  # the state was dropped without teardown()
        try:
            method()
        except Exception:
            log.exception("RecoverableState %r: persisting failed", name)
        del method  # hold the state only while persisting


class AutoPersist:
    """Calls ``persist`` every ``interval`` seconds, and at exit and on SIGTERM if asked.

    ``persist`` must be a bound method; the autosave thread holds it weakly. The exit
    hooks hold it strongly while installed (a state asked to persist at exit lives until
    then, or until ``stop()``). Failures of ``persist`` are logged, never raised into the
    thread or the handler.
    """

    def __init__(
        self,
        persist: Persist,
        *,
        name: str,
        interval: float | None,
        on_exit: bool,
        log: logging.Logger,
    ) -> None:
        self._persist_ref: weakref.WeakMethod[Persist] = weakref.WeakMethod(persist)
        self._name = name
        self._interval = interval
        self._on_exit = on_exit
        self._log = log
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sigterm: SigtermHook | None = None
        self._exit_hook: Callable[[], None] | None = None
        self._pid = os.getpid()
        on_fork_child(self._after_fork)

    @property
    def thread(self) -> threading.Thread | None:
        """The running autosave thread, if any."""
        return self._thread

    def start(self, owner: object) -> None:
        """Start the autosave thread and install the exit hooks that were asked for.

        ``owner`` is the object whose collection stops the autosave thread.
        """
        self._pid = os.getpid()
        if self._interval is not None:
            self._stop = stop = threading.Event()
            self._thread = threading.Thread(
                target=_autosave_loop,
                args=(self._persist_ref, stop, self._interval, self._name, self._log),
                name=f"statekeep-autosave-{self._name}",
                daemon=True,
            )
            weakref.finalize(owner, stop.set)
            _start_deaf(self._thread)
        if self._on_exit:
            method = self._persist_ref()
            if method is None:  # pragma: no cover - the owner is alive while starting
                return
            persist = method

            def exit_hook() -> None:
                if os.getpid() == self._pid:
                    self._quietly(persist)
                    if _handoff.dying:  # the main thread ended before the hand-off did
                        _terminate()

            self._exit_hook = exit_hook
            atexit.register(exit_hook)
            if _in_main_thread():
                self._sigterm = SigtermHook(self._persist_for_signal)
                self._sigterm.install()
            else:
                self._log.warning(
                    "RecoverableState %r was initialized outside the main thread: it "
                    "persists at exit, but not on SIGTERM",
                    self._name,
                )

    def stop(self) -> None:
        """Stop the thread (waiting for a save in progress) and remove the exit hooks."""
        hook, self._sigterm = self._sigterm, None
        if hook is not None:
            hook.uninstall()
        exit_hook, self._exit_hook = self._exit_hook, None
        if exit_hook is not None:
            atexit.unregister(exit_hook)
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _quietly(self, persist: Persist) -> None:
        try:
            persist()
        except Exception:
            self._log.exception("RecoverableState %r: persisting failed", self._name)

    def _persist_for_signal(self) -> None:
        """The hand-off thread's job: persist, unless stopped meanwhile."""
        method = self._persist_ref()
        if method is not None and self._sigterm is not None:
            self._quietly(method)

    def _after_fork(self) -> None:
        # Only the forking thread survives; the autosave thread and any hand-off are
        # gone. The child does not autosave (see the module docstring).
        self._thread = None
        self._stop = threading.Event()
