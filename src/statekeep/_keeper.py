"""LatestStatesKeeper: prunes all but the newest states, now or in the background."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from types import TracebackType

from statekeep import _atomic
from statekeep._store import Scanned, scan_dirs

__all__ = ["LatestStatesKeeper", "select_for_removal"]

logger = logging.getLogger("statekeep")


def select_for_removal(states: list[Scanned], max_keep: int) -> list[Scanned]:
    """Which of ``states`` (oldest first) go so that the newest ``max_keep`` stay.

    ``max_keep < 0`` keeps everything; ``0`` removes everything.
    """
    if max_keep < 0:
        return []
    return states[: max(len(states) - max_keep, 0)]


class LatestStatesKeeper:
    """Keeps only the newest ``max_keep`` state directories matching a pattern.

    Order is by the time in each state's manifest, or the directory's mtime when it
    has none (states written by older tools). Only directories count; saves in
    progress are invisible to it. Removal renames a state out of sight before
    deleting it, so a crash never leaves a half-removed state that looks committed.

    Args:
        states_dir: the directory to prune; created (with a warning) if missing.
        state_name_pattern: a ``fnmatch`` pattern for the names of state directories.
        max_keep: how many to keep; negative keeps all, zero removes all.
        cleanup_interval: seconds between background passes.

    Raises:
        ValueError: ``cleanup_interval`` is negative, or the pattern holds a ``/``.
    """

    def __init__(
        self,
        states_dir: str | Path,
        state_name_pattern: str = "*.state",
        max_keep: int = 10,
        cleanup_interval: float = 60.0,
    ) -> None:
        if cleanup_interval < 0:
            raise ValueError(f"cleanup_interval must be >= 0, got {cleanup_interval!r}")
        if "/" in state_name_pattern or "\\" in state_name_pattern:
            raise ValueError(
                f"state_name_pattern {state_name_pattern!r} must match names in states_dir,"
                " not paths"
            )
        self.states_dir = Path(states_dir)
        self.state_name_pattern = state_name_pattern
        self.max_keep = max_keep
        self.cleanup_interval = cleanup_interval
        if not self.states_dir.is_dir():
            logger.warning("statekeep: states_dir %s does not exist; creating it", self.states_dir)
            self.states_dir.mkdir(parents=True, exist_ok=True)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._running = False
        self._guard = threading.Lock()

    def cleanup(self) -> list[Path]:
        """Remove all but the newest ``max_keep`` matching states; return those removed.

        A state that cannot be removed is logged and skipped; the others still go. Each
        pass also reclaims what killed saves left in the private folder (never a save
        that is still running), so a long-lived process does not accumulate debris.
        """
        _atomic.sweep(self.states_dir)
        states = scan_dirs(self.states_dir, self.state_name_pattern)
        removed: list[Path] = []
        for state in select_for_removal(states, self.max_keep):
            try:
                _atomic.discard_committed(self.states_dir, state.path)
            except FileNotFoundError:
                continue  # somebody else removed it
            except OSError as exc:
                logger.error("statekeep: could not remove state %s: %s", state.path, exc)
                continue
            logger.info("statekeep: removed old state %s", state.path)
            removed.append(state.path)
        return removed

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.cleanup()
            except Exception:
                logger.exception("statekeep: cleanup of %s failed; will retry", self.states_dir)
            self._stop.wait(self.cleanup_interval)

    def start(self, background: bool = True) -> None:
        """Start pruning every ``cleanup_interval`` seconds.

        With ``background=False`` this blocks until :meth:`stop` is called from another
        thread. Calling it while already running does nothing.
        """
        with self._guard:
            if self._running:
                return
            self._running = True
            self._stop.clear()
            if background:
                self._thread = threading.Thread(
                    target=self._loop, name="statekeep-keeper", daemon=True
                )
                self._thread.start()
                return
        try:
            self._loop()
        finally:
            with self._guard:
                self._running = False

    def stop(self) -> None:
        """Stop pruning; returns as soon as a pass in progress ends. Idempotent."""
        self._stop.set()
        with self._guard:
            thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._guard:
            if thread is not None:
                self._running = False

    def __enter__(self) -> LatestStatesKeeper:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
