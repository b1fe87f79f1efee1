"""RecoverableState: a pydantic model that persists itself to a CheckpointStorage."""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Literal, TypeVar

import pydantic
from typing_extensions import Self

from statekeep._fork import on_fork_child
from statekeep._recoverable_hooks import AutoPersist
from statekeep._recoverable_schema import Migration, check_schema, decode_state, encode_state
from statekeep.errors import StateValidationError, StateVersionError
from statekeep.storage._base import CheckpointStorage

__all__ = ["DEFAULT_STATE_DIR", "STATE_DIR_ENV", "RecoverableState", "default_state_dir"]

TModel = TypeVar("TModel", bound=pydantic.BaseModel)

DEFAULT_STATE_DIR = ".statekeep-state"
"""Where a RecoverableState without a storage persists, relative to the working directory."""
STATE_DIR_ENV = "STATEKEEP_STATE_DIR"
"""The environment variable that overrides :data:`DEFAULT_STATE_DIR`."""

_logger = logging.getLogger("statekeep")


def default_state_dir() -> Path:
    """``$STATEKEEP_STATE_DIR`` when set and not empty, else ``./.statekeep-state``."""
    return Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)


class RecoverableState(Generic[TModel]):
    """A pydantic model that is loaded from, and saved to, a :class:`CheckpointStorage`.

    The model lives in :attr:`current_value` between :meth:`initialize` and
    :meth:`teardown`. Persisting dumps it under a lock; with ``persist_interval`` set, a
    daemon thread does that every so many seconds, so mutate the value only inside
    ``with state.update() as value:`` (which holds the same lock) and the thread never
    saves a half-made change.

    Args:
        default_state: the value to start from when nothing is persisted; a deep copy
            is used, the instance itself is never mutated.
        persist_state_key: the storage session under which the value is kept; may be
            empty only while persistence is disabled.
        persistence_enabled: when False, nothing is read or written (and giving
            ``storage`` or ``persist_interval`` anyway logs one warning).
        storage: where to persist; by default a ``FileCheckpointStorage`` in
            ``$STATEKEEP_STATE_DIR`` (else ``./.statekeep-state``), created on
            :meth:`initialize` and closed on :meth:`teardown`. A storage you pass is
            never closed for you.
        persist_interval: seconds between autosaves by a daemon thread; None for none.
        logger: where to log; by default the ``statekeep`` logger.
        schema_version: the version of the model's persisted form (starts at 1).
        migrations: ``{v: f}`` where ``f`` turns a version-``v`` state dict into a
            version-``v + 1`` one; applied in order from the persisted version.
        on_invalid: ``"raise"`` (default) raises :class:`StateValidationError` when the
            persisted value does not validate; ``"reset"`` logs a warning and starts
            from the default instead. A persisted version that is too new always raises
            :class:`StateVersionError`.
        persist_on_exit: also persist at normal interpreter exit and on SIGTERM (the
            SIGTERM handler is installed only when initialized from the main thread;
            it hands the save to a helper thread, never doing I/O itself, and passes
            the signal on to the handler it replaced).

    The persisted record is the model's own JSON dump (``{"root": dump}`` for a
    ``RootModel`` whose dump is not an object), with the schema version in the
    checkpoint's metadata. :meth:`initialize` reads both with the storage's
    ``load_with_info`` (one read of one save) when it has one, as every built-in storage
    does; a storage with only the five protocol methods is read with ``load`` and then
    ``list_checkpoints`` (a listing of every checkpoint, and a save in between could
    pair one save's data with another's schema version). The autosave thread holds the
    state weakly: a state dropped without :meth:`teardown` is collected and its thread
    stops. In a child made by ``fork()`` the state's calls work, but it neither autosaves
    nor runs exit hooks.

    Raises:
        TypeError: ``default_state`` is not a pydantic model, or ``storage`` does not
            implement the CheckpointStorage protocol.
        ValueError: an empty key, a ``persist_interval`` that is not a positive finite
            number, an unknown ``on_invalid``, or migrations that could never apply.
    """

    def __init__(
        self,
        *,
        default_state: TModel,
        persist_state_key: str,
        persistence_enabled: bool = False,
        storage: CheckpointStorage | None = None,
        persist_interval: float | None = None,
        logger: logging.Logger | None = None,
        schema_version: int = 1,
        migrations: Mapping[int, Migration] | None = None,
        on_invalid: Literal["raise", "reset"] = "raise",
        persist_on_exit: bool = False,
    ) -> None:
        if not isinstance(default_state, pydantic.BaseModel):
            raise TypeError(
                f"default_state must be a pydantic model, not {type(default_state).__name__}"
            )
        if not isinstance(persist_state_key, str):
            raise TypeError(
                f"persist_state_key must be a str, not {type(persist_state_key).__name__}"
            )
        if "\0" in persist_state_key or (persistence_enabled and not persist_state_key):
            raise ValueError(
                f"persist_state_key must be a non-empty str without NUL when persistence is "
                f"enabled, not {persist_state_key!r}"
            )
        if storage is not None and not isinstance(storage, CheckpointStorage):
            raise TypeError(
                f"storage must implement CheckpointStorage, {type(storage).__name__} does not"
            )
        if persist_interval is not None and (
            isinstance(persist_interval, bool)
            or not isinstance(persist_interval, (int, float))
            or not math.isfinite(persist_interval)
            or persist_interval <= 0
        ):
            raise ValueError(
                f"persist_interval must be a positive number of seconds or None, "
                f"not {persist_interval!r}"
            )
        if on_invalid not in ("raise", "reset"):
            raise ValueError(f"on_invalid must be 'raise' or 'reset', not {on_invalid!r}")
        migrations = {} if migrations is None else migrations
        check_schema(schema_version, migrations)

        self._default = default_state.model_copy(deep=True)
        self._model: type[TModel] = type(default_state)
        self._key = persist_state_key
        self._enabled = bool(persistence_enabled)
        self._given_storage = storage
        self._log = logger if logger is not None else _logger
        self._schema_version = schema_version
        self._migrations = dict(migrations)
        self._on_invalid = on_invalid

        self._lock = threading.RLock()  # guards the value; the autosave takes it to dump
        self._io_lock = threading.Lock()  # serializes writes; never held while taking _lock
        self._state: TModel | None = None
        self._active = False
        self._storage: CheckpointStorage | None = None
        self._owns_storage = False
        self._seq = 0  # snapshot counter, under _lock
        self._saved_seq = 0  # newest snapshot written, under _io_lock
        self._auto = AutoPersist(
            self._persist_now,
            name=persist_state_key,
            interval=persist_interval if self._enabled else None,
            on_exit=bool(persist_on_exit) and self._enabled,
            log=self._log,
        )
        if not self._enabled and (storage is not None or persist_interval is not None):
            given = " and ".join(
                name
                for name, value in (("storage", storage), ("persist_interval", persist_interval))
                if value is not None
            )
            self._log.warning(
                "RecoverableState %r: %s given but persistence_enabled is False, so nothing "
                "will be loaded or saved; pass persistence_enabled=True to persist",
                persist_state_key,
                given,
            )
        on_fork_child(self._after_fork)

    @property
    def current_value(self) -> TModel:
        """The live model. Raises RuntimeError before :meth:`initialize`."""
        if self._state is None:
            raise RuntimeError(
                f"RecoverableState {self._key!r} has not been initialized; call initialize()"
            )
        return self._state

    def initialize(self) -> TModel:
        """Load the persisted value, else a deep copy of the default; start autosave.

        Calling it again while initialized returns the current value and changes
        nothing (in particular, no second autosave thread).

        Raises:
            StateValidationError: the persisted value does not validate and
                ``on_invalid`` is ``"raise"``.
            StateVersionError: the persisted schema version is newer than
                ``schema_version`` or has no migration path.
        """
        with self._lock:
            if self._active:
                return self.current_value
            if not self._enabled:
                self._state = self._default.model_copy(deep=True)
                self._active = True
                return self._state
            storage = self._open_storage()
            try:
                self._state = self._load(storage)
            except BaseException:
                self._close_storage()
                raise
            self._active = True
            self._auto.start(self)
            return self._state

    def _load(self, storage: CheckpointStorage) -> TModel:
        found = self._read(storage)
        if found is None:
            return self._default.model_copy(deep=True)
        record, metadata = found
        try:
            return decode_state(
                self._key, record, metadata, self._model, self._schema_version, self._migrations
            )
        except StateVersionError:
            raise
        except StateValidationError as exc:
            if self._on_invalid == "raise":
                raise
            self._log.warning("%s; on_invalid='reset': starting from the default state", exc)
            return self._default.model_copy(deep=True)

    def _read(
        self, storage: CheckpointStorage
    ) -> tuple[Mapping[str, Any], Mapping[str, Any] | None] | None:
        """This key's data and metadata (where the schema version is kept), or None.

        A storage with ``load_with_info`` (every built-in one) gives both from one read
        of one save. Any other lists its checkpoints after loading: two reads, so a save
        in between could pair one save's data with another's schema version.
        """
        load_with_info = getattr(storage, "load_with_info", None)
        if callable(load_with_info):
            found = load_with_info(self._key)
            if found is None:
                return None
            data, info = found
            return data, info.metadata
        record = storage.load(self._key)
        return None if record is None else (record, self._metadata(storage))

    def _metadata(self, storage: CheckpointStorage) -> Mapping[str, Any] | None:
        """The metadata of this key's checkpoint, found by listing every checkpoint."""
        for info in storage.list_checkpoints():
            if info.session_id == self._key:
                return info.metadata
        return None

    @contextmanager
    def update(self) -> Iterator[TModel]:
        """Hold the lock the autosave takes and yield :attr:`current_value` to mutate.

        ``with state.update() as value: value.a += 1; value.b += 1`` is persisted either
        before or after both changes, never between them. Re-entrant.
        """
        with self._lock:
            yield self.current_value

    def persist_state(self, event_data: object = None) -> None:
        """Save a snapshot of the current value now; a no-op when persistence is disabled.

        Args:
            event_data: ignored; accepted so that the method can be wired as an event
                listener, as crawlee does with its ``PERSIST_STATE`` event.

        Raises:
            RuntimeError: not initialized (or already torn down).
        """
        if self._enabled:
            self._persist_now()

    def _persist_now(self) -> None:
        with self._lock:
            if not self._active or self._storage is None:
                raise RuntimeError(
                    f"RecoverableState {self._key!r} is not initialized; nothing to persist"
                )
            storage = self._storage
            data, metadata = encode_state(self.current_value, self._schema_version)
            self._seq += 1
            seq = self._seq
        with self._io_lock:
            if seq <= self._saved_seq:
                return  # a newer snapshot is already written
            storage.save(self._key, data, metadata=metadata)
            self._saved_seq = seq

    def reset(self) -> None:
        """Go back to a deep copy of the default and remove the persisted value.

        Raises:
            RuntimeError: persistence is enabled and the state is not initialized.
        """
        with self._lock:
            if self._enabled and (not self._active or self._storage is None):
                raise RuntimeError(f"RecoverableState {self._key!r} is not initialized")
            self._state = self._default.model_copy(deep=True)
            self._seq += 1
            if self._enabled and self._storage is not None:
                with self._io_lock:
                    self._storage.delete(self._key)
                    self._saved_seq = self._seq

    def teardown(self) -> None:
        """Stop the autosave thread and exit hooks, persist once more, close own storage.

        :attr:`current_value` stays readable afterwards; :meth:`initialize` starts over
        (loading what was persisted). Idempotent.
        """
        if not self._active:
            return
        self._auto.stop()
        try:
            if self._enabled:
                self.persist_state()
        finally:
            with self._lock:
                self._active = False
                self._close_storage()

    def __enter__(self) -> Self:
        self.initialize()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.teardown()

    def _after_fork(self) -> None:
        # In a child made by fork() only the forking thread exists: a lock held by the
        # autosave thread (or any other) at that instant would never be released.
        self._lock = threading.RLock()
        self._io_lock = threading.Lock()

    # -- storage -------------------------------------------------------------------

    def _open_storage(self) -> CheckpointStorage:
        if self._given_storage is not None:
            self._storage, self._owns_storage = self._given_storage, False
        else:
            from statekeep.storage._file import FileCheckpointStorage

            self._storage, self._owns_storage = FileCheckpointStorage(default_state_dir()), True
        return self._storage

    def _close_storage(self) -> None:
        storage, owned = self._storage, self._owns_storage
        self._storage, self._owns_storage = None, False
        if owned and storage is not None:
            close = getattr(storage, "close", None)
            if close is not None:
                close()
