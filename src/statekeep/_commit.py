"""Committing a directory: build privately, checksum and fsync, seal, rename into place.

The one path by which a snapshot becomes visible. A :class:`BuildDir` is a locked work
entry of the private folder (see :mod:`statekeep._atomic`); :meth:`BuildDir.commit`
checksums (and with ``durable`` fsyncs) everything in it, writes the manifest last,
and renames it to its final name, never over an existing one.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType

from statekeep import _atomic, _checksum
from statekeep._manifest import MANIFEST_NAME, Entry, Manifest
from statekeep._sequence import SequenceCounter, next_sequence

__all__ = ["BuildDir", "build_manifest"]


def build_manifest(directory: str | Path, *, sequence: int, durable: bool) -> Manifest:
    """Checksum (and with ``durable`` fsync) everything below ``directory``."""
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
    return Manifest(datetime.now(timezone.utc), sequence, tuple(entries))


class BuildDir:
    """A directory under construction in ``root``'s private folder.

    Nothing inside it is visible in ``root`` until :meth:`commit` renames it into
    place. Leaving the ``with`` block without committing removes it.

    Args:
        root: the directory the build is committed into.
        durable: fsync everything before and after the rename.
        counter: the store's sequence counter (held open between saves); without one,
            the counter file is opened for this commit only.
    """

    def __init__(
        self, root: str | Path, *, durable: bool, counter: SequenceCounter | None = None
    ) -> None:
        self.root = root
        self.durable = durable
        self._private = f"{root}/{_atomic.PRIVATE_DIR}"
        self._counter = counter
        self._work, made = _atomic.new_work(root, is_dir=True, durable=durable)
        if made and counter is not None:
            counter.close()  # its file went with the old folder: open the new one
        self.spath = self._work.spath
        self.path = Path(self.spath)

    def commit(self, final: str | Path) -> Manifest:
        """Write the manifest, make everything durable, and rename to ``final``.

        Raises:
            StateExistsError: ``final`` already exists; it is left untouched.
        """
        counter = self._counter
        sequence = counter.next() if counter is not None else next_sequence(self._private)
        manifest = build_manifest(self.spath, sequence=sequence, durable=self.durable)
        fd = os.open(f"{self.spath}/{MANIFEST_NAME}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _atomic.write_all(fd, [manifest.to_bytes()])
            if self.durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        if self.durable:
            os.fsync(self._work.fd)  # the build directory itself
        _atomic.rename_noreplace(self.spath, final)
        self._work.release()
        if self.durable:
            _atomic.fsync_dir(os.path.dirname(final) or ".")
        return manifest

    def abort(self) -> None:
        if self._work.fd >= 0:
            self._work.discard()

    def __enter__(self) -> BuildDir:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()
