"""When a RecoverableState persists on its own: an autosave thread, atexit, SIGTERM.

The SIGTERM hook never takes the signal away from the application: it remembers the
handler it replaced and hands the signal on to it. A Python handler is called, an
ignored signal stays ignored, and the default action (terminate) is re-raised so the
process still dies by SIGTERM, as its parent expects.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

__all__ = ["AutoPersist", "SigtermHook"]


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class SigtermHook:
    """A SIGTERM handler that calls ``on_signal(proceed)``; ``proceed()`` chains on."""

    def __init__(self, on_signal: Callable[[Callable[[], None]], None]) -> None:
        self._on_signal = on_signal
        self._previous: Any = None
        self._active = False

    def install(self) -> None:
        """Become the SIGTERM handler (main thread only), remembering the current one."""
        self._previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self)
        self._active = True

    def uninstall(self) -> None:
        """Stop calling ``on_signal``; give the signal back if nobody chained after us.

        When another handler was installed on top of this one, restoring ours would
        remove it, so the hook stays in place as a pure pass-through instead.
        """
        self._active = False
        previous = signal.SIG_DFL if self._previous is None else self._previous
        current: object = signal.getsignal(signal.SIGTERM)
        if _in_main_thread() and current is self:
            signal.signal(signal.SIGTERM, previous)

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self._active:
            self._on_signal(lambda: self._chain(signum, frame))
        else:
            self._chain(signum, frame)

    def _chain(self, signum: int, frame: FrameType | None) -> None:
        previous = self._previous
        if previous is signal.SIG_IGN:
            return
        if callable(previous):
            previous(signum, frame)
            return
        # SIG_DFL, or a handler not set from Python (None): let the default action run.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


class AutoPersist:
    """Calls ``persist`` every ``interval`` seconds, and at exit and on SIGTERM if asked.

    Failures of ``persist`` are logged, never raised into the thread or the handler.
    """

    def __init__(
        self,
        persist: Callable[[], None],
        *,
        name: str,
        interval: float | None,
        on_exit: bool,
        log: logging.Logger,
    ) -> None:
        self._persist = persist
        self._name = name
        self._interval = interval
        self._on_exit = on_exit
        self._log = log
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sigterm: SigtermHook | None = None
        self._main_depth = 0  # the main thread is inside a critical section
        self._deferred: Callable[[], None] | None = None

    @property
    def thread(self) -> threading.Thread | None:
        """The running autosave thread, if any."""
        return self._thread

    def start(self) -> None:
        """Start the autosave thread and install the exit hooks that were asked for."""
        if self._interval is not None:
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=self._run,
                args=(self._stop, self._interval),
                name=f"statekeep-autosave-{self._name}",
                daemon=True,
            )
            self._thread.start()
        if self._on_exit:
            atexit.register(self.persist_quietly)
            if _in_main_thread():
                self._sigterm = SigtermHook(self._on_sigterm)
                self._sigterm.install()
            else:
                self._log.warning(
                    "RecoverableState %r was initialized outside the main thread: it "
                    "persists at exit, but not on SIGTERM",
                    self._name,
                )

    def stop(self) -> None:
        """Stop the thread (waiting for a save in progress) and remove the exit hooks."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        if self._on_exit:
            atexit.unregister(self.persist_quietly)
        hook, self._sigterm = self._sigterm, None
        if hook is not None:
            hook.uninstall()

    def persist_quietly(self) -> None:
        """Persist, logging instead of raising on failure."""
        try:
            self._persist()
        except Exception:
            self._log.exception("RecoverableState %r: persisting failed", self._name)

    def _run(self, stop: threading.Event, interval: float) -> None:
        while not stop.wait(interval):
            self.persist_quietly()

    @contextmanager
    def critical(self) -> Iterator[None]:
        """A section during which a SIGTERM in this (main) thread waits for its end.

        A signal handler runs in the main thread between two bytecodes: if that thread is
        inside ``update()`` or a write, persisting from the handler would save a half
        update or re-enter the storage, so the handler's work is deferred to the end.
        """
        if not _in_main_thread():
            yield
            return
        self._main_depth += 1
        try:
            yield
        finally:
            self._main_depth -= 1
            if self._main_depth == 0 and self._deferred is not None:
                deferred, self._deferred = self._deferred, None
                deferred()

    def _on_sigterm(self, proceed: Callable[[], None]) -> None:
        if self._main_depth:
            self._deferred = lambda: self._on_sigterm(proceed)
            return
        self.persist_quietly()
        proceed()
