"""The boto3 plumbing that both S3 parts share: small PUTs and one session per environment.

Used by :mod:`statekeep.storage._s3` (checkpoints) and :mod:`statekeep.remote._s3`
(snapshots). It imports nothing else of statekeep but the fork registry, so importing
the snapshot remote never loads the checkpoint storages (nor pydantic).
"""

from __future__ import annotations

import os
import threading
from typing import Any

from statekeep import _fork

__all__ = ["SMALL_PUT", "env_session", "put_small"]


def _boto3() -> Any:
    try:
        import boto3
    except ImportError as exc:
        raise ImportError(
            "statekeep's S3 support needs boto3: pip install statekeep[s3]", name=exc.name
        ) from exc
    return boto3


# Bodies up to this size are sent without ``Expect: 100-continue``. botocore asks for it
# on every PUT, which costs a round trip of its own (headers, wait for "100 Continue",
# then the body): for a small body, sending it at once is cheaper than asking first.
SMALL_PUT = 1 << 20
_small = threading.local()  # set while this thread sends one of statekeep's small PUTs


def _drop_expect(request: Any, **_: Any) -> None:
    if getattr(_small, "on", False):
        del request.headers["Expect"]  # not a signed header: the signature stays valid


def put_small(client: Any, **params: Any) -> Any:
    """``client.put_object(**params)`` for a body of at most :data:`SMALL_PUT` bytes,
    sent in one go, without the ``Expect: 100-continue`` round trip.

    Only statekeep's own PUTs are changed: the hook added to the client (once) acts
    only inside this call, in this thread; every other request of the client is as it
    was. Used for create-only writes (:class:`~statekeep.remote.S3Remote`), where a
    request that lands after its sender died is harmless, and for small checkpoint
    saves, which are conditional on the ETag last seen (such a request is refused).
    """
    client.meta.events.register(
        "before-send.s3.PutObject", _drop_expect, unique_id="statekeep-small-put"
    )
    _small.on = True
    try:
        return client.put_object(**params)
    finally:
        _small.on = False


# What boto3 reads from the environment to find a server and credentials.
_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)


class _Sessions:
    """One boto3 session per state of the environment, shared by the clients made from it.

    ``boto3.client()`` uses boto3's default session, which resolves credentials once per
    process: a client made after the environment changed would still use the old ones.
    A new session per client would see the change but costs about 100 ms (it loads the
    service model again). So a session is reused while the AWS variables stay the same.
    """

    def __init__(self) -> None:
        self._lock = _fork.new_lock()
        self._made: tuple[tuple[str | None, ...], Any] | None = None
        _fork.on_fork_child(self._after_fork)

    def _after_fork(self) -> None:
        self._lock = _fork.new_lock()

    def get(self) -> Any:
        boto3 = _boto3()
        env = tuple(os.environ.get(name) for name in _ENV)
        with self._lock:  # a boto3 session is not thread-safe: one client made at a time
            if self._made is None or self._made[0] != env:
                self._made = (env, boto3.session.Session())
            return self._made[1]


_SESSIONS = _Sessions()


def env_session() -> Any:
    """The boto3 session for the environment as it is now (see :class:`_Sessions`)."""
    return _SESSIONS.get()
