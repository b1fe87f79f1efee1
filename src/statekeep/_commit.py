"""Committing a directory: build privately, checksum and fsync, seal, rename into place.

The one path by which a snapshot becomes visible. A :class:`BuildDir` is a locked work
entry of the target directory itself (``.statekeep-<token>.work``, see
:mod:`statekeep._atomic`); :meth:`BuildDir.commit` checksums (and with ``durable``
fsyncs) everything in it, takes the directory's next commit sequence, writes the
manifest last, and renames the build to its final name, never over an existing one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

from statekeep import _atomic, _checksum
from statekeep._manifest import MANIFEST_NAME, Entry, Manifest, check_metadata
from statekeep._sequence import SequenceCounter

__all__ = ["BuildDir", "build_manifest", "scan_entries"]


def scan_entries(directory: str | Path, *, durable: bool) -> tuple[Entry, ...]:
    """Checksum (and with ``durable`` fsync) everything below ``directory``.

    Raises:
        ValueError: something below ``directory`` is neither a regular file nor a
            directory (a link, a FIFO, a device); the message names it.
    """
    root = str(directory)
    entries: list[Entry] = []
    for relpath, entry in _checksum.scan(root):
        if entry.is_dir(follow_symlinks=False):
            if durable:
                _atomic.fsync_dir(entry.path)
            entries.append(Entry(relpath, True))
        elif entry.is_file(follow_symlinks=False):
            size, crc = _checksum.checksum_file(entry.path, sync=durable)
            entries.append(Entry(relpath, False, size, crc))
        else:
            raise ValueError(
                f"{entry.path} is neither a regular file nor a directory;"
                " a state may hold only files and directories"
            )
    return tuple(entries)


def build_manifest(directory: str | Path, *, sequence: int, durable: bool) -> Manifest:
    """A manifest of everything below ``directory`` (see :func:`scan_entries`)."""
    entries = scan_entries(directory, durable=durable)
    return Manifest(datetime.now(timezone.utc), sequence, entries)


class BuildDir:
    """A directory under construction in ``root``, under a private name.

    Nothing inside it is visible as a state until :meth:`commit` renames it into
    place. Leaving the ``with`` block without committing removes it.

    Args:
        root: the directory the build is committed into (created if missing).
        durable: fsync everything before and after the rename.
        counter: the store's sequence counter (holding ``root`` open between saves);
            without one, ``root`` is opened for this commit only.
    """

    def __init__(
        self, root: str | Path, *, durable: bool, counter: SequenceCounter | None = None
    ) -> None:
        self.root = root
        self.durable = durable
        self._counter = counter
        self._work, made = _atomic.new_work(root, is_dir=True, durable=durable)
        if made and counter is not None:
            counter.close()  # root was (re)created: reopen the directory that is there now
        self.spath = self._work.spath
        self.path = Path(self.spath)

    def commit(self, final: str | Path, *, metadata: Mapping[str, Any] | None = None) -> Manifest:
        """Write the manifest, make everything durable, and rename to ``final``.

        ``metadata`` (a JSON object) is recorded in the manifest, under its seal.

        Raises:
            TypeError, ValueError: ``metadata`` is not JSON-ready (the message names
                the key); nothing was written.
            StateExistsError: ``final`` already exists; it is left untouched.
            StorageError: with ``durable``, ``final`` was committed but syncing its
                directory afterwards failed: the state is there, its durability unknown.
        """
        meta = check_metadata(metadata)
        entries = scan_entries(self.spath, durable=self.durable)
        counter = self._counter if self._counter is not None else SequenceCounter(self.root)
        try:
            with counter.take() as sequence:
                manifest = Manifest(datetime.now(timezone.utc), sequence, entries, metadata=meta)
                raw = manifest.to_bytes()
                _atomic.create_file(f"{self.spath}/{MANIFEST_NAME}", [raw], durable=self.durable)
                if self.durable:
                    _atomic.full_fsync(self._work.fd)  # the build directory itself
                _atomic.rename_noreplace(self.spath, final)
        finally:
            if counter is not self._counter:
                counter.close()
        self._work.release()
        if self.durable:
            _atomic.sync_parent_after_commit(final, "state")
        return dataclasses.replace(manifest, seal=int(raw[raw.rfind(b" ") + 1 : -3]))

    def abort(self, cause: BaseException | None = None) -> None:
        """Remove the build (nothing if it was committed); see :meth:`Work.discard`."""
        if self._work.fd >= 0:
            self._work.discard(cause)

    def __enter__(self) -> BuildDir:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort(exc)
