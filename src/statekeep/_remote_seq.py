"""The commit sequence shared by every machine publishing to one remote.

Each number is claimed with a create-only marker ``seq/<20-digit n>``, so two machines
never take the same one and the sequences of their states compare.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator

from statekeep import _sequence
from statekeep._remote_states import SEQ
from statekeep.errors import StateExistsError, StorageError
from statekeep.remote._base import Remote

__all__ = ["RemoteCounter", "claim_sequence", "seq_key"]

logger = logging.getLogger("statekeep")


def seq_key(n: int) -> str:
    return f"{SEQ}{n:020d}"


def claim_sequence(remote: Remote, start: int) -> int:
    """Claim the next commit sequence >= ``start`` above every number claimed on ``remote``.

    One LIST (markers from ``start`` up: the keeper leaves few) and one create-only PUT;
    a lost race moves on to the next number.

    Raises:
        StorageError: the remote failed.
    """
    n = max(start, 1)
    for _ in range(1000):
        for obj in remote.list(SEQ, start_after=seq_key(n - 1)):
            tail = obj.key[len(SEQ) :]
            if tail.isdigit():
                n = max(n, int(tail) + 1)
        try:
            remote.put_if_absent(seq_key(n), io.BytesIO(b""), 0)
        except StateExistsError:
            n += 1
            continue
        return n
    raise StorageError(f"could not claim a commit sequence on {remote!r} in 1000 tries")


class RemoteCounter(_sequence.SequenceCounter):
    """The store's sequence counter, with each number claimed on the remote.

    The number is above every local one and every one claimed on the remote, so
    sequences compare across machines. If the remote cannot be reached the number is
    still above every local one (the publish that follows then fails and says so).
    """

    def __init__(self, root: str, remote: Remote) -> None:
        super().__init__(root)
        self._remote = remote
        self._floor = -1

    @contextlib.contextmanager
    def take(self) -> Iterator[int]:
        with super().take() as local:
            if self._floor < 0:
                self._floor = _sequence.highest_committed(self._root)
            start = max(local, self._floor + 1)
            try:
                n = claim_sequence(self._remote, start)
            except StorageError as exc:
                logger.warning("statekeep: could not claim a sequence on %r: %s", self._remote, exc)
                n = start
            self._floor = n
            yield n
        if n > local:
            self.raise_to(n)  # the local counter never hands out a number below it again
