"""S3CheckpointStorage: one object per session in an S3 bucket (``pip install statekeep[s3]``).

Each object is the self-checking blob of the file backend (header line with session id,
time, size, CRC-32 and metadata, then the JSON data), written with one whole-object PUT,
which S3 makes visible atomically: a reader sees the old value or the new one, and two
machines writing one session end with one of their values, whole.

Every save is a conditional PUT (``If-Match`` the ETag this storage last saw for the key,
or ``If-None-Match: *`` when there was none), so a save still in flight when its process
died cannot land over a newer save made after it: the server refuses it (412), and a
live writer that gets 412 reads the current ETag and sends its save again. The ETag
comes from this storage's own last save or load of the key, else from one HEAD. A
server that ignores the headers gives plain last-writer-wins, as before; one that
answers 501 to them gets unconditional PUTs from then on. Object keys are
``<prefix><sha256 of the session id>.ckpt`` so any id is a safe key; the header holds
the id and is checked on every read. Listing is one LIST call per 1,000 keys plus a
ranged GET of each header, in parallel (up to 16 at once, no more than the client's
connection pool); it never downloads whole objects.

boto3 is imported when a storage is constructed, never by ``import statekeep``.
"""

from __future__ import annotations

import errno
import hashlib
import random
import time
from collections.abc import Iterable
from typing import Any

from statekeep import _fork
from statekeep._s3client import SMALL_PUT, env_session, put_small
from statekeep.storage._base import BaseCheckpointStorage

__all__ = ["S3CheckpointStorage", "parse_s3_url", "put_small"]

SUFFIX = ".ckpt"
_HEAD_BYTES = 4096  # one ranged GET holds the header unless its metadata is large
_CONFLICT_RETRIES = 5  # 409 ConditionalRequestConflict in a row
_STALE_RETRIES = 32  # 412 in a row: other live writers kept saving the key first
_THREADS = 16  # parallel header reads while listing
_ETAGS_KEPT = 4096  # ETags remembered per storage
_HTTP_ERRNO = {403: errno.EACCES, 404: errno.ENOENT, 503: errno.EAGAIN, 507: errno.ENOSPC}
_MISSING = frozenset({"NoSuchKey"})


def _put_object(client: Any, **params: Any) -> Any:
    return client.put_object(**params)


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix/")``.

    Raises:
        ValueError: ``url`` is not an ``s3://`` URL with a bucket name.
    """
    if not isinstance(url, str) or not url.startswith("s3://"):
        raise ValueError(f"expected an s3://bucket/prefix URL, got {url!r}")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"the URL {url!r} names no bucket")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def _boto3() -> Any:
    try:
        import boto3
        import botocore.exceptions
    except ImportError as exc:
        raise ImportError(
            "S3CheckpointStorage needs boto3: pip install statekeep[s3]", name=exc.name
        ) from exc
    return boto3, botocore.exceptions


def default_client() -> Any:
    """A boto3 S3 client configured from the environment, with short timeouts.

    Connect within 5 s, read within 30 s, and three attempts in all, so a dead
    endpoint fails in seconds instead of hanging.
    """
    from botocore.config import Config

    return env_session().client(
        "s3",
        config=Config(
            connect_timeout=5,
            read_timeout=30,
            retries={"max_attempts": 3, "mode": "standard"},
            max_pool_connections=_THREADS,
        ),
    )


class S3CheckpointStorage(BaseCheckpointStorage):
    """Keeps each session's checkpoint as one object under ``s3://bucket/prefix``.

    Args:
        url: ``s3://bucket`` or ``s3://bucket/prefix``.
        client: A boto3 S3 client. Without one, a client is made from the environment
            (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
            ``AWS_DEFAULT_REGION``, ... as boto3 reads them) with a 5 s connect and 30 s
            read timeout. A client you pass is used as it is: give it timeouts too.

    Every botocore error becomes :class:`~statekeep.StorageError` (``__cause__`` the
    original, ``errno`` ``EACCES``/``ENOENT``/... where the HTTP status says so); a damaged
    object raises :class:`~statekeep.CorruptCheckpointError`. Thread-safe.

    Raises:
        ImportError: boto3 is not installed (``pip install statekeep[s3]``).
        ValueError: ``url`` is not an ``s3://`` URL.
    """

    def __init__(self, url: str, *, client: Any | None = None) -> None:
        self.bucket, self.prefix = parse_s3_url(url)
        _, exceptions = _boto3()
        self._exceptions = exceptions
        self._client_error = exceptions.ClientError
        self._errors = (exceptions.BotoCoreError, exceptions.ClientError, OSError)
        self._own_client = client is None
        self._client = default_client() if client is None else client
        # no more threads than the client has pooled connections (urllib3 would discard
        # the extra connections, with a warning each)
        pool = getattr(getattr(self._client, "meta", None), "config", None)
        self._list_threads = min(_THREADS, getattr(pool, "max_pool_connections", None) or 10)
        # object name -> the ETag this storage last saw ("" = absent); a save is
        # conditional on it (see the module's docstring)
        self._etags: dict[str, str] = {}
        self._conditional = True
        _fork.on_fork_child(self._after_fork)

    def _after_fork(self) -> None:
        # a client's pooled connections are the parent's sockets: a child makes its own
        if self._own_client:
            self._client = None

    @property
    def client(self) -> Any:
        """The boto3 client in use."""
        if self._client is None:
            self._client = default_client()
        return self._client

    def _name(self, key: str) -> str:
        return f"{self.prefix}{hashlib.sha256(key.encode()).hexdigest()}{SUFFIX}"

    def _place(self, name: str) -> str:
        return f"s3://{self.bucket}/{name}"

    def _code(self, exc: BaseException) -> tuple[str, int]:
        response = getattr(exc, "response", None) or {}
        code = str(response.get("Error", {}).get("Code", ""))
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return code, status

    def _missing(self, exc: BaseException) -> bool:
        # NoSuchBucket is a 404 too, and an error
        return isinstance(exc, self._client_error) and self._code(exc)[0] in _MISSING

    def _errno(self, exc: BaseException) -> int | None:
        if isinstance(exc, self._client_error):
            return _HTTP_ERRNO.get(self._code(exc)[1])
        ex = self._exceptions
        if isinstance(exc, (ex.ConnectTimeoutError, ex.ReadTimeoutError)):
            return errno.ETIMEDOUT
        if isinstance(exc, ex.EndpointConnectionError):
            return errno.ECONNREFUSED
        if isinstance(exc, ex.ConnectionClosedError):
            return errno.ECONNRESET
        return super()._errno(exc)

    def _get_range(self, name: str, first: int, last: int | None) -> bytes | None:
        span = f"bytes={first}-" if last is None else f"bytes={first}-{last}"
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=name, Range=span)
        except self._client_error as exc:
            if self._missing(exc):
                return None
            if self._code(exc)[1] == 416:  # the object ended before ``first``
                return b""
            raise
        with response["Body"] as body:
            return bytes(body.read())

    def _read(self, name: str) -> bytes | None:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=name)
        except self._client_error as exc:
            if self._missing(exc):
                self._etags[name] = ""
                return None
            raise
        self._seen(name, response)
        with response["Body"] as body:
            return bytes(body.read())

    def _etag(self, name: str) -> str:
        """The key's ETag now, "" when absent."""
        try:
            response = self.client.head_object(Bucket=self.bucket, Key=name)
        except self._client_error as exc:
            # HEAD's 404 has no body to tell a missing key from a missing bucket: the
            # PUT that follows says which (NoSuchBucket is raised from there)
            if self._code(exc)[1] == 404:
                return ""
            raise
        return str(response.get("ETag", ""))

    def _seen(self, name: str, response: Any) -> None:
        tag = response.get("ETag")
        if tag:
            if len(self._etags) >= _ETAGS_KEPT:  # a process reading many sessions: forget
                self._etags.clear()  # them all (each costs one HEAD at its next save)
            self._etags[name] = tag

    def _read_head(self, name: str) -> bytes | None:
        head = self._get_range(name, 0, _HEAD_BYTES - 1)
        if head is None or b"\n" in head or len(head) < _HEAD_BYTES:
            return head
        rest = self._get_range(name, _HEAD_BYTES, None)  # a large header: the rest at once
        return None if rest is None else head + rest

    def _has(self, key: str) -> bool:
        # a one-byte GET, not HEAD: HEAD's 404 has no body to tell NoSuchKey from NoSuchBucket
        return self._get_range(self._name(key), 0, 0) is not None

    def _write(self, name: str, blob: bytes) -> None:
        conflicts = stale = 0
        while True:
            condition: dict[str, str] = {}
            if self._conditional:
                tag = self._etags.get(name)
                if tag is None:  # neither saved nor loaded here yet: ask the server
                    tag = self._etag(name)
                condition = {"IfMatch": tag} if tag else {"IfNoneMatch": "*"}
            try:
                # a small body goes at once, without Expect: 100-continue's round trip:
                # if it lands after its sender died, the condition has it refused
                put = put_small if condition and len(blob) <= SMALL_PUT else _put_object
                response = put(
                    self.client,
                    Bucket=self.bucket,
                    Key=name,
                    Body=blob,
                    ContentType="application/json",
                    **condition,
                )
            except self._client_error as exc:
                code, status = self._code(exc)
                self._etags.pop(name, None)  # whatever happened, ask again next time
                if code == "ConditionalRequestConflict":
                    # AWS: a PUT racing another write of the key; send it again
                    conflicts += 1
                    if conflicts == _CONFLICT_RETRIES:
                        raise
                    time.sleep(0.05 * 2 ** (conflicts - 1))
                elif condition and (status == 412 or code == "PreconditionFailed"):
                    # another writer saved the key since this storage last saw it: a
                    # live one, so this save goes over it (a dead one's would not)
                    stale += 1
                    if stale == _STALE_RETRIES:
                        raise
                    time.sleep(random.uniform(0, 0.001 * 2 ** min(stale, 6)))
                elif condition and (status == 501 or code == "NotImplemented"):
                    self._conditional = False  # a server without conditional writes
                elif condition and tag and self._missing(exc):
                    pass  # If-Match on a key deleted meanwhile (AWS): ask again
                else:
                    raise
                continue
            self._seen(name, response)
            return

    def _remove(self, name: str) -> bool:
        # DELETE answers 204 whether or not the key existed: ask first
        if self._get_range(name, 0, 0) is None:
            return False
        self.client.delete_object(Bucket=self.bucket, Key=name)
        self._etags[name] = ""
        return True

    def _names(self) -> Iterable[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix, PaginationConfig={"PageSize": 1000}
        )
        names = []
        for page in pages:
            for item in page.get("Contents", []):
                name = item["Key"]
                if name.endswith(SUFFIX) and "/" not in name[len(self.prefix) :]:
                    names.append(name)
        return names

    def _close(self) -> None:
        if self._own_client and self._client is not None:
            self._client.close()

    def __repr__(self) -> str:
        return f"S3CheckpointStorage('s3://{self.bucket}/{self.prefix}')"
