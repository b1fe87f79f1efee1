"""Remote storages when the server dies: kill -9 mid-save, restart, and down at start."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from crashworkers.checkpoint_worker import check_value, make_value
from servers import PostgresServer, S3Server
from statekeep import PostgresCheckpointStorage, S3CheckpointStorage, StorageError

SESSION = "fault"


def kill_mid_save(storage: Any, kill: Callable[[], None]) -> tuple[int, StorageError]:
    """Save in a loop in a thread; kill the server while it runs.

    Returns the last generation whose save returned, and the error the loop ended with.
    """
    first_saved = threading.Event()
    done = threading.Event()
    last = [-1]
    failure: list[BaseException] = []

    def loop() -> None:
        try:
            for gen in range(1_000_000):
                storage.save(SESSION, make_value(gen, 30_000), metadata={"gen": gen})
                last[0] = gen
                first_saved.set()
        except BaseException as exc:
            failure.append(exc)
        finally:
            first_saved.set()
            done.set()

    threading.Thread(target=loop, daemon=True).start()
    assert first_saved.wait(60), "no save returned"
    kill()
    assert done.wait(60), "a save hung after the server was killed"
    assert failure, "the save loop ended without an error"
    assert isinstance(failure[0], StorageError), repr(failure[0])
    assert failure[0].__cause__ is not None
    return last[0], failure[0]


class TestServerKilledMidSave:
    """The save raises StorageError; after a restart the previous value is whole."""

    def test_s3(self, own_s3_server: S3Server) -> None:
        bucket = own_s3_server.new_bucket()
        client = own_s3_server.client(connect_timeout=1, read_timeout=5)
        storage = S3CheckpointStorage(f"s3://{bucket}", client=client)
        last, _ = kill_mid_save(storage, own_s3_server.kill)
        with pytest.raises(StorageError):
            storage.load(SESSION)  # still down
        own_s3_server.start()
        gen = check_value(storage.load(SESSION))
        assert gen >= last
        storage.save(SESSION, make_value(gen + 1, 10))  # the same client works again
        assert check_value(storage.load(SESSION)) == gen + 1

    def test_postgres(self, own_postgres_server: PostgresServer) -> None:
        conninfo = own_postgres_server.new_database()
        storage = PostgresCheckpointStorage(conninfo)
        last, _ = kill_mid_save(storage, own_postgres_server.kill)
        with pytest.raises(StorageError):
            storage.load(SESSION)  # still down
        own_postgres_server.start()
        gen = check_value(storage.load(SESSION))  # the storage reconnects by itself
        assert gen >= last
        storage.save(SESSION, make_value(gen + 1, 10))
        assert check_value(storage.load(SESSION)) == gen + 1
        storage.close()


class TestServerDownAtStart:
    """A server that is down fails the first call with StorageError within the timeout."""

    def test_s3(self, own_s3_server: S3Server) -> None:
        bucket = own_s3_server.new_bucket()
        client = own_s3_server.client(connect_timeout=1, read_timeout=2)
        own_s3_server.kill()
        storage = S3CheckpointStorage(f"s3://{bucket}", client=client)
        started = time.monotonic()
        with pytest.raises(StorageError) as caught:
            storage.list_checkpoints()
        assert time.monotonic() - started < 15
        assert caught.value.__cause__ is not None

    def test_postgres(self, own_postgres_server: PostgresServer) -> None:
        conninfo = own_postgres_server.new_database()
        own_postgres_server.kill()
        started = time.monotonic()
        with pytest.raises(StorageError) as caught:
            PostgresCheckpointStorage(conninfo)
        assert time.monotonic() - started < 15
        assert caught.value.__cause__ is not None
