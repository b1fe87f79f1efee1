"""The object-store protocol snapshots are published through, and its key rules."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable

__all__ = ["Remote", "RemoteObject", "Source", "check_key"]


@dataclass(frozen=True)
class RemoteObject:
    """One object of a remote, as :meth:`Remote.list` reports it (``modified`` is UTC)."""

    key: str
    size: int
    modified: datetime


class Source(Protocol):
    """**Protocol:** what :meth:`Remote.put_if_absent` reads from (a binary file will do)."""

    def read(self, size: int, /) -> bytes:
        """Up to ``size`` bytes; ``b""`` at the end."""
        ...


@runtime_checkable
class Remote(Protocol):
    """**Protocol:** a flat store of immutable objects that snapshots are published to.

    Keys are ``/``-separated relative paths (see :func:`check_key`). Every method maps
    its backend's failures to :class:`~statekeep.StorageError` once, here at the
    boundary; a missing key is :class:`FileNotFoundError`.
    """

    def put_if_absent(self, key: str, source: Source, size: int) -> None:
        """Create ``key`` from exactly ``size`` bytes read from ``source``, streamed.

        Create-only: the object appears complete or not at all, and never replaces one.

        Raises:
            StateExistsError: ``key`` already exists (it is left untouched).
            StorageError: the backend failed; nothing is visible under ``key``.
        """
        ...

    def get(self, key: str, *, start: int = 0, length: int | None = None) -> bytes:
        """The bytes of ``key`` from ``start``: ``length`` of them, or all to its end.

        A range past the end is cut short (possibly to ``b""``).

        Raises:
            FileNotFoundError: ``key`` does not exist.
            StorageError: the backend failed.
        """
        ...

    def list(self, prefix: str, *, start_after: str = "") -> Iterator[RemoteObject]:
        """Objects whose key starts with ``prefix`` and sorts after ``start_after``, by key.

        Raises:
            StorageError: the backend failed.
        """
        ...

    def delete(self, keys: Iterable[str]) -> None:
        """Delete ``keys`` (in batches); a key that is already gone is fine.

        Raises:
            StorageError: the backend failed.
        """
        ...


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid object key, else raise ``ValueError`` saying why.

    A key is one or more ``/``-separated segments, none of them empty, ``.`` or ``..``,
    without NUL or ``\\``; so no key can address anything outside its remote.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"object key {key!r} is not allowed: it must be a non-empty str")
    if "\0" in key or "\\" in key:
        raise ValueError(f"object key {key!r} is not allowed: it contains NUL or a backslash")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(
                f"object key {key!r} is not allowed: it has an empty, '.' or '..' segment"
            )
    return key
