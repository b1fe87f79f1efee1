"""DirectoryRemote: the remote protocol on a mounted (shared or network) directory.

The same commit rule as on object storage: an object is written to a private temp
file, fsynced, and then *linked* to its key, which fails if the key exists (create-only
without a lock, even between machines sharing the disk, as far as the filesystem
honours ``link``). Paths are walked one directory at a time with ``O_NOFOLLOW``, so a
symlink planted inside the remote can never lead a read or write outside it.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
import secrets
import stat
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

from statekeep import _atomic
from statekeep.errors import StateExistsError, StorageError
from statekeep.remote._base import RemoteObject, Source, check_key

__all__ = ["DirectoryRemote"]

INCOMING = ".statekeep-incoming"  # temp files of puts in progress (never a key)
_CHUNK = 1 << 20
_O_DIR = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class DirectoryRemote:
    """A :class:`~statekeep.remote.Remote` kept in a directory (created if missing).

    Args:
        path: the directory; every key is a path below it.
        durable: fsync each object and the directory that names it before a put returns.
    """

    def __init__(self, path: str | os.PathLike[str], *, durable: bool = True) -> None:
        self.root = Path(path)
        self.durable = durable
        try:
            (self.root / INCOMING).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"remote directory {self.root} cannot be created: {exc}") from exc

    def __repr__(self) -> str:
        return f"DirectoryRemote({str(self.root)!r})"

    def _parts(self, key: str) -> list[str]:
        parts = check_key(key).split("/")
        if parts[0] == INCOMING:
            raise ValueError(f"object key {key!r} is not allowed: {INCOMING} is reserved")
        return parts

    def _open_dir(self, parts: builtins.list[str], *, create: bool) -> int:
        """An fd of the directory ``parts`` below the root, walked without following links."""
        fd = os.open(self.root, _O_DIR)
        try:
            for part in parts:
                try:
                    nfd = os.open(part, _O_DIR | _O_NOFOLLOW, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, dir_fd=fd)
                    if self.durable:
                        os.fsync(fd)
                    nfd = os.open(part, _O_DIR | _O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _fail(self, op: str, key: str, exc: OSError) -> StorageError:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            why = "a path component is a symlink or not a directory; refusing to follow it"
            return StorageError(exc.errno, f"{op} of {key!r} in {self.root} failed: {why}")
        return StorageError(exc.errno, f"{op} of {key!r} in {self.root} failed: {exc}")

    def put_if_absent(self, key: str, source: Source, size: int) -> None:
        """Create ``key`` from ``size`` bytes of ``source``; see the :class:`Remote` protocol."""
        parts = self._parts(key)
        tmp = f"{self.root}/{INCOMING}/{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                left = size
                while left:
                    chunk = source.read(min(left, _CHUNK))
                    if not chunk:
                        raise StorageError(
                            f"put of {key!r} in {self.root}: the source ended"
                            f" {left} bytes short of {size}"
                        )
                    _atomic.write_all(fd, [chunk])
                    left -= len(chunk)
                if self.durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            for attempt in range(3):
                parent = self._open_dir(parts[:-1], create=True)
                try:
                    os.link(tmp, parts[-1], dst_dir_fd=parent)
                    if self.durable:
                        os.fsync(parent)
                    return
                except FileExistsError:
                    raise StateExistsError(
                        errno.EEXIST, f"object {key!r} already exists in {self.root}", key
                    ) from None
                except FileNotFoundError:
                    if attempt == 2:  # a delete kept removing the emptied parent
                        raise
                finally:
                    os.close(parent)
        except (StorageError, StateExistsError):
            raise
        except OSError as exc:
            raise self._fail("put", key, exc) from exc
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def get(self, key: str, *, start: int = 0, length: int | None = None) -> bytes:
        """The bytes of ``key`` (a range of them); see the :class:`Remote` protocol."""
        parts = self._parts(key)
        try:
            parent = self._open_dir(parts[:-1], create=False)
            try:
                fd = os.open(parts[-1], os.O_RDONLY | _O_NOFOLLOW, dir_fd=parent)
            finally:
                os.close(parent)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise StorageError(f"get of {key!r} in {self.root}: not a regular file")
                want = max(st.st_size - start, 0) if length is None else length
                chunks: list[bytes] = []
                while want > 0:
                    chunk = os.pread(fd, min(want, 16 * _CHUNK), start)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    start += len(chunk)
                    want -= len(chunk)
                return b"".join(chunks)
            finally:
                os.close(fd)
        except FileNotFoundError:
            raise FileNotFoundError(f"object {key!r} does not exist in {self.root}") from None
        except StorageError:
            raise
        except OSError as exc:
            raise self._fail("get", key, exc) from exc

    def list(self, prefix: str, *, start_after: str = "") -> Iterator[RemoteObject]:
        """Objects under ``prefix``, by key; see the :class:`Remote` protocol."""
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        found: builtins.list[RemoteObject] = []
        try:
            fd = self._open_dir(self._parts(base) if base else [], create=False)
        except (FileNotFoundError, NotADirectoryError):
            return iter(())
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return iter(())  # a symlink is never part of the remote
            raise self._fail("list", prefix, exc) from exc
        try:
            self._walk(fd, base, prefix, start_after, found)
        except OSError as exc:
            raise self._fail("list", prefix, exc) from exc
        finally:
            os.close(fd)
        found.sort(key=lambda o: o.key)
        return iter(found)

    def _walk(
        self, fd: int, rel: str, prefix: str, after: str, out: builtins.list[RemoteObject]
    ) -> None:
        with os.scandir(fd) as it:
            entries = list(it)
        for entry in entries:
            key = f"{rel}/{entry.name}" if rel else entry.name
            if not rel and entry.name == INCOMING:
                continue
            if entry.is_dir(follow_symlinks=False):
                if not (key.startswith(prefix) or prefix.startswith(key + "/")):
                    continue
                try:
                    sub = os.open(entry.name, _O_DIR | _O_NOFOLLOW, dir_fd=fd)
                except FileNotFoundError:
                    continue
                try:
                    self._walk(sub, key, prefix, after, out)
                finally:
                    os.close(sub)
            elif entry.is_file(follow_symlinks=False) and key.startswith(prefix) and key > after:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                modified = datetime.fromtimestamp(st.st_mtime, timezone.utc)
                out.append(RemoteObject(key, st.st_size, modified))

    def delete(self, keys: Iterable[str]) -> None:
        """Delete ``keys``; see the :class:`Remote` protocol."""
        for key in keys:
            parts = self._parts(key)
            try:
                try:
                    parent = self._open_dir(parts[:-1], create=False)
                except FileNotFoundError:
                    continue
                try:
                    os.unlink(parts[-1], dir_fd=parent)
                except FileNotFoundError:
                    continue
                finally:
                    os.close(parent)
            except OSError as exc:
                raise self._fail("delete", key, exc) from exc
            self._prune_empty(parts[:-1])

    def _prune_empty(self, parts: builtins.list[str]) -> None:
        """Remove the emptied directories of a deleted key, deepest first."""
        while parts:
            try:
                parent = self._open_dir(parts[:-1], create=False)
            except OSError:
                return
            try:
                os.rmdir(parts[-1], dir_fd=parent)
            except OSError:
                return  # not empty (or gone): leave it and its parents
            finally:
                os.close(parent)
            parts = parts[:-1]

    def abort_incomplete(self, older_than: timedelta) -> int:
        """Remove temp files of puts that began longer ago than ``older_than``; return how many."""
        cutoff = time.time() - older_than.total_seconds()
        removed = 0
        try:
            entries = list(os.scandir(self.root / INCOMING))
        except OSError as exc:
            raise StorageError(f"listing {self.root / INCOMING} failed: {exc}") from exc
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StorageError(f"removing {entry.path} failed: {exc}") from exc
        return removed
