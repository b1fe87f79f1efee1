"""S3Remote: the remote protocol on S3 or any server that speaks its API (SeaweedFS, MinIO).

Create-only writes are conditional requests (``If-None-Match: *``), on a single PUT and
on the completion of a multipart upload alike, so two machines writing one key end with
one winner and a 412 for the other. Large objects go up in parts, a bounded number in
flight, read from the source in order: memory stays at a few parts whatever the size.
botocore is imported only when an S3Remote is made (``pip install statekeep[s3]``).
"""

from __future__ import annotations

import builtins
import contextlib
import errno
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import datetime, timedelta, timezone
from typing import Any, NoReturn

from statekeep import _fork
from statekeep._s3client import SMALL_PUT, env_session, put_small
from statekeep.errors import StateExistsError, StorageError
from statekeep.remote._base import RemoteObject, Source, check_key

__all__ = ["S3Remote"]

PART_SIZE = 8 << 20
MAX_IN_FLIGHT = 4


def _read_exact(source: Source, size: int, key: str) -> bytes:
    data = source.read(size)
    if len(data) != size:  # a raw file may return short reads: finish them
        chunks = [data]
        got = len(data)
        while got < size:
            more = source.read(size - got)
            if not more:
                raise StorageError(f"put of {key!r}: the source ended {size - got} bytes short")
            chunks.append(more)
            got += len(more)
        data = b"".join(chunks)
    return data


class S3Remote:
    """A :class:`~statekeep.remote.Remote` in an S3 bucket, under a key prefix.

    Args:
        url: ``s3://bucket`` or ``s3://bucket/prefix``.
        client: a boto3 S3 client; without one, a client is made from the environment
            (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ... as boto3 reads them).
        part_size: objects larger than this go up in parts of this size (>= 5 MiB).
        max_in_flight: parts of one object uploaded or downloaded at once.

    Raises:
        ValueError: ``url`` is not an ``s3://`` URL with a bucket.
        ImportError: boto3 is not installed and no client was given.
    """

    def __init__(
        self,
        url: str,
        *,
        client: Any | None = None,
        part_size: int = PART_SIZE,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        if not url.startswith("s3://") or not url[5:].split("/", 1)[0]:
            raise ValueError(f"S3 URL {url!r} must look like s3://bucket/prefix")
        bucket, _, prefix = url[5:].partition("/")
        prefix = prefix.strip("/")
        if prefix:
            check_key(prefix)
        self.url = url
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.part_size = max(part_size, 5 << 20)
        self.max_in_flight = max(max_in_flight, 1)
        try:
            import botocore.exceptions  # type: ignore[import-untyped,unused-ignore]
        except ImportError as exc:  # pragma: no cover - boto3 is a test dependency
            raise ImportError("S3Remote needs boto3: pip install statekeep[s3]") from exc
        self._client_error = botocore.exceptions.ClientError
        self._boto_error = botocore.exceptions.BotoCoreError
        self._own_client = client is None
        self._client = client if client is not None else self._new_client()
        if self._own_client:
            _fork.on_fork_child(self._forget_client)

    def _new_client(self) -> Any:
        import botocore.config  # type: ignore[import-untyped,unused-ignore]

        config = botocore.config.Config(max_pool_connections=4 * self.max_in_flight)
        return env_session().client("s3", config=config)  # the environment as it is now

    def _forget_client(self) -> None:
        # A forked child must not share the parent's connections: it makes its own client
        # on first use (not here: a fork handler takes no locks the parent may hold).
        self._client = None

    @property
    def client(self) -> Any:
        """The boto3 client (one made by this remote is remade in a forked child)."""
        if self._client is None:
            self._client = self._new_client()
        return self._client

    def __repr__(self) -> str:
        return f"S3Remote({self.url!r})"

    def _where(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"

    def _raise(self, op: str, key: str, exc: BaseException) -> NoReturn:
        """Map a botocore (or transport) error to statekeep's, once, here."""
        where = self._where(key)
        if isinstance(exc, self._client_error):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "PreconditionFailed" or status == 412:
                raise StateExistsError(errno.EEXIST, f"object {where} already exists", where)
            if code in ("NoSuchKey", "NotFound", "404") or status == 404:
                raise FileNotFoundError(errno.ENOENT, f"object {where} does not exist", where)
            raise StorageError(f"S3 {op} of {where} failed: {code} {err.get('Message', '')}")
        raise StorageError(f"S3 {op} of {where} failed: {exc}")

    def _errors(self) -> tuple[type[BaseException], ...]:
        return (self._client_error, self._boto_error, OSError)

    def put_if_absent(self, key: str, source: Source, size: int) -> None:
        """Create ``key`` from ``size`` bytes of ``source``; see the :class:`Remote` protocol."""
        full = self.prefix + check_key(key)
        if size <= self.part_size:
            body = _read_exact(source, size, key)
            try:
                params = {"Bucket": self.bucket, "Key": full, "Body": body, "IfNoneMatch": "*"}
                if size <= SMALL_PUT:  # sent at once, without Expect: 100-continue
                    put_small(self.client, **params)
                else:
                    self.client.put_object(**params)
            except self._errors() as exc:
                self._conflict("put", key, exc)
            return
        self._put_multipart(key, full, source, size)

    def _conflict(self, op: str, key: str, exc: BaseException) -> NoReturn:
        """Map a failed create-only write (a 409 is a loss if the other's object is there)."""
        code = (
            exc.response.get("Error", {}).get("Code")
            if isinstance(exc, self._client_error)
            else None
        )
        if code == "ConditionalRequestConflict":
            try:
                self.client.head_object(Bucket=self.bucket, Key=self.prefix + key)
            except self._errors():
                pass
            else:
                where = self._where(key)
                raise StateExistsError(errno.EEXIST, f"object {where} already exists", where)
        self._raise(op, key, exc)

    def _put_multipart(self, key: str, full: str, source: Source, size: int) -> None:
        try:
            upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=full)[
                "UploadId"
            ]
        except self._errors() as exc:
            self._raise("put", key, exc)
        etags: builtins.list[dict[str, Any]] = []
        try:
            with ThreadPoolExecutor(self.max_in_flight, "statekeep-s3-put") as pool:
                pending: set[Future[dict[str, Any]]] = set()
                done = 0
                number = 0
                while done < size:
                    if len(pending) >= self.max_in_flight:
                        # first wait, then read: at most max_in_flight parts held. Wait
                        # for any part, not the oldest: each part that ends makes room
                        # at once (waiting in order left a slot idle behind a slow one)
                        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                        etags.extend(f.result() for f in finished)
                    n = min(self.part_size, size - done)
                    body = _read_exact(source, n, key)
                    done += n
                    number += 1
                    pending.add(pool.submit(self._upload_part, full, upload_id, number, body))
                    del body
                etags.extend(f.result() for f in pending)
            etags.sort(key=lambda part: int(part["PartNumber"]))
            self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=full,
                UploadId=upload_id,
                MultipartUpload={"Parts": etags},
                IfNoneMatch="*",
            )
        except BaseException as exc:
            with contextlib.suppress(Exception):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
            if isinstance(exc, self._errors()) and not isinstance(exc, StorageError):
                self._conflict("put", key, exc)
            raise

    def _upload_part(self, full: str, upload_id: str, number: int, body: bytes) -> dict[str, Any]:
        resp = self.client.upload_part(
            Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number, Body=body
        )
        return {"PartNumber": number, "ETag": resp["ETag"]}

    def get(self, key: str, *, start: int = 0, length: int | None = None) -> bytes:
        """The bytes of ``key`` (a range of them); see the :class:`Remote` protocol."""
        full = self.prefix + check_key(key)
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": full}
        if length == 0:
            return b""
        if length is not None:
            kwargs["Range"] = f"bytes={start}-{start + length - 1}"
        elif start:
            kwargs["Range"] = f"bytes={start}-"
        try:
            body = self.client.get_object(**kwargs)["Body"]
            try:
                return bytes(body.read())
            finally:
                body.close()
        except self._errors() as exc:
            if isinstance(exc, self._client_error):
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status == 416 or exc.response.get("Error", {}).get("Code") == "InvalidRange":
                    return b""  # the range starts past the end
            self._raise("get", key, exc)

    def list(self, prefix: str, *, start_after: str = "") -> Iterator[RemoteObject]:
        """Objects under ``prefix``, by key, page by page; see the :class:`Remote` protocol."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix + prefix}
        if start_after:
            kwargs["StartAfter"] = self.prefix + start_after
        cut = len(self.prefix)
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(**kwargs):
                for obj in page.get("Contents", ()):
                    modified = obj["LastModified"].astimezone(timezone.utc)
                    yield RemoteObject(obj["Key"][cut:], int(obj["Size"]), modified)
        except self._errors() as exc:
            self._raise("list", prefix, exc)

    def delete(self, keys: Iterable[str]) -> None:
        """Delete ``keys``, a thousand per request; see the :class:`Remote` protocol."""
        batch: builtins.list[dict[str, str]] = []
        for key in keys:
            batch.append({"Key": self.prefix + check_key(key)})
            if len(batch) == 1000:
                self._delete_batch(batch)
                batch = []
        if batch:
            self._delete_batch(batch)

    def _delete_batch(self, batch: builtins.list[dict[str, str]]) -> None:
        first = batch[0]["Key"][len(self.prefix) :]
        try:
            resp = self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
            )
        except self._errors() as exc:
            self._raise("delete", first, exc)
        errors = [e for e in resp.get("Errors", ()) if e.get("Code") != "NoSuchKey"]
        if errors:
            e = errors[0]
            raise StorageError(
                f"S3 delete of s3://{self.bucket}/{e.get('Key')} failed: {e.get('Code')}"
                f" {e.get('Message', '')} ({len(errors)} keys failed)"
            )

    def abort_incomplete(self, older_than: timedelta) -> int:
        """Abort multipart uploads under the prefix begun longer ago than ``older_than``."""
        cutoff = datetime.now(timezone.utc) - older_than
        aborted = 0
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self.prefix
            )
            for page in pages:
                for up in page.get("Uploads", ()):
                    if up["Initiated"].astimezone(timezone.utc) < cutoff:
                        self.client.abort_multipart_upload(
                            Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"]
                        )
                        aborted += 1
        except self._errors() as exc:
            self._raise("abort_incomplete", "", exc)
        return aborted
