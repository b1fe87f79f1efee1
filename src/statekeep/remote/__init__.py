"""Object storage for snapshots: the :class:`Remote` protocol and its two implementations.

``StateStore(..., remote=...)`` publishes each committed state through a :class:`Remote`
(files first, the manifest last, create-only) and restores from it on a fresh machine.
:class:`S3Remote` talks to S3 or anything speaking its API (``pip install statekeep[s3]``);
:class:`DirectoryRemote` keeps the same commit rule on a mounted (shared or network) disk.
"""

from __future__ import annotations

import os

from statekeep.remote._base import Remote, RemoteObject, Source, check_key
from statekeep.remote._directory import DirectoryRemote
from statekeep.remote._s3 import S3Remote

__all__ = [
    "DirectoryRemote",
    "Remote",
    "RemoteObject",
    "S3Remote",
    "Source",
    "check_key",
    "open_remote",
]


def open_remote(url_or_path: str | os.PathLike[str] | Remote) -> Remote:
    """A :class:`Remote` for ``s3://bucket/prefix``, a ``file://`` URL or a local path.

    A :class:`Remote` passed in is returned as it is.

    Raises:
        ValueError: the URL's scheme is not one statekeep knows.
    """
    if isinstance(url_or_path, os.PathLike):
        return DirectoryRemote(url_or_path)
    if not isinstance(url_or_path, str):
        if isinstance(url_or_path, Remote):
            return url_or_path
        raise TypeError(
            f"remote must be a URL, a path or a Remote, not {type(url_or_path).__name__}"
        )
    if url_or_path.startswith("s3://"):
        return S3Remote(url_or_path)
    if url_or_path.startswith("file://"):
        return DirectoryRemote(url_or_path[len("file://") :])
    if "://" in url_or_path:
        scheme = url_or_path.split("://", 1)[0]
        raise ValueError(
            f"remote {url_or_path!r}: unknown scheme {scheme!r} (use s3://, file:// or a path)"
        )
    return DirectoryRemote(url_or_path)
