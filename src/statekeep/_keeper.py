"""LatestStatesKeeper: prunes all but the newest states, now or in the background."""

from __future__ import annotations

import logging
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType

from statekeep import _atomic, _fork, _remote_prune, _scan, _sequence
from statekeep._order import (
    EntryKind,
    KeepLatest,
    RetentionPolicy,
    StateInfo,
    oldest_first,
    plan_removals,
)
from statekeep.errors import CorruptStateError, StorageError
from statekeep.remote import Remote, open_remote

__all__ = ["LatestStatesKeeper"]

logger = logging.getLogger("statekeep")


class _DefaultInt(int):
    """The default of ``max_keep``: tells "left alone" from an explicit ``10``."""


_DEFAULT_MAX_KEEP = _DefaultInt(10)


class LatestStatesKeeper:
    """Keeps the newest states of a directory (or those a policy chooses), pruning the rest.

    Order is the order of commits (each manifest's sequence), never the clock.
    Directories without a manifest (older tools) are ordered by mtime among themselves,
    below every state that has one. Only states that verify count as kept: a damaged,
    unreadable or manifest-less directory never does, and the newest state that verifies
    is never removed (unless ``max_keep=0``). Each state is read in full once per process
    (then remembered by path, sequence and manifest checksum). Only directories count;
    saves in progress are invisible to it. Removal renames a state out of sight before
    deleting it, so a crash never leaves a half-removed state that looks committed, and
    leaves a state that a ``load_state()`` is reading for a later pass.

    Args:
        states_dir: the directory to prune; created (with a warning) if missing.
        state_name_pattern: a ``fnmatch`` pattern for the names of state directories.
        max_keep: how many to keep (shorthand for ``policy=KeepLatest(max_keep)``);
            negative keeps all, zero removes all.
        cleanup_interval: seconds between background passes.
        policy: a :class:`RetentionPolicy` deciding what to keep instead of ``max_keep``.
        remote: a remote the states are published to (a URL, a path or a
            :class:`statekeep.remote.Remote`), pruned by the same rules on each pass:
            manifest first, then the files; debris older than an hour is reclaimed.

    Raises:
        ValueError: ``cleanup_interval`` is negative or NaN, the pattern holds a ``/``, or both
            ``policy`` and an explicit ``max_keep`` are given.
    """

    def __init__(
        self,
        states_dir: str | Path,
        state_name_pattern: str = "*.state",
        max_keep: int = _DEFAULT_MAX_KEEP,
        cleanup_interval: float = 60.0,
        *,
        policy: RetentionPolicy | None = None,
        remote: str | os.PathLike[str] | Remote | None = None,
    ) -> None:
        if not cleanup_interval >= 0:  # NaN too: it would make the loop spin
            raise ValueError(f"cleanup_interval must be >= 0, got {cleanup_interval!r}")
        if "/" in state_name_pattern or "\\" in state_name_pattern:
            raise ValueError(
                f"state_name_pattern {state_name_pattern!r} must match names in states_dir,"
                " not paths"
            )
        if policy is not None and max_keep is not _DEFAULT_MAX_KEEP:
            raise ValueError(
                f"give max_keep ({max_keep!r}) or policy ({policy!r}), not both:"
                f" policy=KeepLatest({max_keep!r}) | ... combines them"
            )
        if policy is not None and not callable(getattr(policy, "keep", None)):
            raise TypeError(f"policy must be a RetentionPolicy, got {policy!r}")
        self.states_dir = Path(states_dir)
        self.state_name_pattern = state_name_pattern
        self.max_keep = int(max_keep)
        self.policy = policy
        self.cleanup_interval = cleanup_interval
        if not self.states_dir.is_dir():
            logger.warning("statekeep: states_dir %s does not exist; creating it", self.states_dir)
            self.states_dir.mkdir(parents=True, exist_ok=True)
        self._infos: dict[tuple[str, int], tuple[StateInfo, int]] = {}
        self._highest = 0  # the highest sequence of a sealed manifest at the last scan
        self.remote = None if remote is None else open_remote(remote)
        self._after_fork()
        _fork.on_fork_child(self._after_fork)

    def _after_fork(self) -> None:
        # In a forked child no thread of the parent runs: start afresh, stopped.
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._running = False
        self._guard = threading.Lock()

    def _rule(self) -> str:
        return f"policy={self.policy!r}" if self.policy is not None else f"max_keep={self.max_keep}"

    def _policy(self) -> RetentionPolicy | None:
        if self.policy is not None:
            return self.policy
        return KeepLatest(self.max_keep) if self.max_keep > 0 else None

    def _states(self) -> tuple[list[StateInfo], dict[Path, int | None]]:
        """Every matching directory as a policy sees it, oldest first; and the seal of
        each one's manifest (None: no manifest, or one that cannot be read)."""
        infos: list[StateInfo] = []
        seals: dict[Path, int | None] = {}
        seen: dict[tuple[str, int], tuple[StateInfo, int]] = {}
        for entry in oldest_first(_scan.scan(self.states_dir, self.state_name_pattern)):
            if entry.kind is not EntryKind.STATE:
                info = _scan.head_info(entry)
                seal: int | None = None
            else:
                key = (entry.path, entry.sequence)
                known = self._infos.get(key)
                if known is None:
                    try:
                        manifest = _scan.read_manifest(entry.path)
                    except FileNotFoundError:
                        continue  # removed while we looked
                    except CorruptStateError as exc:
                        _scan.warn_once(entry.path, exc)
                        known = None
                    else:
                        known = (_scan.info_of(Path(entry.path), manifest), manifest.seal)
                if known is None:
                    info, seal = _scan.head_info(entry), None  # ordered by its head only
                else:
                    seen[key] = known
                    info, seal = known
            infos.append(info)
            seals[info.path] = seal
        self._infos = seen  # forget what is gone
        self._highest = max((key[1] for key in seen), default=0)
        return infos, seals

    def plan(self, now: datetime | None = None) -> list[Path]:
        """What :meth:`cleanup` would remove now, oldest first; removes nothing.

        Local directories only; with a remote, :meth:`plan_remote` names the remote
        states the same pass would remove.
        """
        states, seals = self._states()

        def is_good(s: StateInfo) -> bool:
            seal = seals.get(s.path)
            return seal is not None and _scan.verified(s.path, s.sequence, seal)

        return plan_removals(
            states,
            self._policy(),
            now or datetime.now(timezone.utc),
            is_good,
            remove_all=self.policy is None and self.max_keep == 0,
        )

    def plan_remote(self, now: datetime | None = None) -> list[str]:
        """The names of the remote states :meth:`cleanup` would remove now, oldest first.

        Removes nothing. Apart from :meth:`plan` because remote states are not paths on
        this disk: a name here may also be in :meth:`plan` (a state on both sides), or
        only on the remote. Without a remote, ``[]``. (Debris a pass also reclaims, such
        as files whose manifest never arrived, is not listed: it is no state.)

        Raises:
            StorageError: the remote cannot be reached.
        """
        if self.remote is None:
            return []
        return _remote_prune.plan_prune(self.remote, self._remote_chooser(now))

    def _remote_chooser(self, now: datetime | None = None) -> _remote_prune.Chooser:
        return _remote_prune.by_policy(
            self._policy(),
            self.state_name_pattern,
            now or datetime.now(timezone.utc),
            remove_all=self.policy is None and self.max_keep == 0,
        )

    def cleanup(self) -> list[Path]:
        """Remove what :meth:`plan` names; return those removed, oldest first.

        A state that cannot be removed is logged and skipped; the others still go. Each
        pass also reclaims what killed saves left behind (never a save that is still
        running), so a long-lived process does not accumulate debris.
        """
        _atomic.sweep(self.states_dir)
        removed: list[Path] = []
        planned = self.plan()
        # A state copied in by hand may be numbered above the directory's counter: raise
        # it (to the highest sealed manifest seen), or the saves that follow would be
        # ordered below it and pruned. Only here: plan() writes nothing.
        _sequence.catch_up(self.states_dir, self._highest)
        for path in planned:
            try:
                _atomic.discard_committed(self.states_dir, path)
            except FileNotFoundError:
                continue  # somebody else removed it
            except _atomic.StateInUse:
                logger.debug("statekeep: %s is being loaded; left for a later pass", path)
                continue
            except OSError as exc:  # said once per state and error, not on every pass
                _scan.warn_once(path, exc, "could not remove state %s: %s", logging.ERROR)
                continue
            logger.info("statekeep: removed old state %s", path)
            removed.append(path)
        if self.remote is not None:
            try:
                _remote_prune.prune_remote(self.remote, choose=self._remote_chooser())
            except StorageError as exc:  # the local pass is done; the next pass retries
                logger.error("statekeep: could not prune %r: %s", self.remote, exc)
        return removed

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.cleanup()
            except Exception:
                logger.exception("statekeep: cleanup of %s failed; will retry", self.states_dir)
            # An interval too long for a timed wait (inf, 1e300) means "once": wait
            # for stop() instead of letting the wait's OverflowError kill the thread.
            self._stop.wait(min(self.cleanup_interval, threading.TIMEOUT_MAX))

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
            logger.info(
                "statekeep: keeper started on %s (%s, every %ss)",
                self.states_dir,
                self._rule(),
                self.cleanup_interval,
            )
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
        logger.info("statekeep: keeper stopped on %s", self.states_dir)

    def __enter__(self) -> LatestStatesKeeper:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop, then run one last pass: what was saved inside the block is pruned too."""
        self.stop()
        try:
            self.cleanup()
        except Exception:
            logger.exception("statekeep: last cleanup of %s failed", self.states_dir)
