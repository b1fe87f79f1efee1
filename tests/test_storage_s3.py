"""S3CheckpointStorage against a real S3 server (SeaweedFS on 127.0.0.1, tests/servers.py)."""

from __future__ import annotations

import errno
import hashlib
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import botocore.exceptions
import pytest

from servers import S3Server, free_ports
from statekeep import CorruptCheckpointError, S3CheckpointStorage, StorageError
from statekeep.testing import PersistentCheckpointStorageContract


@pytest.fixture
def url(s3_bucket: str) -> str:
    return f"s3://{s3_bucket}/runs/a"


class TestS3Contract(PersistentCheckpointStorageContract):
    """The whole conformance suite, against the real server."""

    @pytest.fixture
    def make_storage(self, url: str, s3_server: S3Server) -> Callable[[], S3CheckpointStorage]:
        # a client per storage: the contract also calls this in forked processes
        return lambda: S3CheckpointStorage(url, client=s3_server.client())

    @pytest.fixture
    def make_failing_storage(self, s3_server: S3Server) -> Callable[[], S3CheckpointStorage]:
        dead = S3Server.__new__(S3Server)  # the same settings, on a port nobody listens on
        dead.endpoint = f"http://127.0.0.1:{free_ports(1)[0]}"
        return lambda: S3CheckpointStorage(
            "s3://bucket", client=dead.client(connect_timeout=1, read_timeout=2)
        )


class TestStoredForm:
    """What lands in the bucket: one object per session, hashed key, self-checking."""

    def test_one_object_under_the_prefix_with_a_hashed_key(
        self, url: str, s3_client: Any, s3_bucket: str
    ) -> None:
        storage = S3CheckpointStorage(url, client=s3_client)
        storage.save("../../etc/passwd", {"x": 1})
        keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket)["Contents"]]
        digest = hashlib.sha256(b"../../etc/passwd").hexdigest()
        assert keys == [f"runs/a/{digest}.ckpt"]
        body = s3_client.get_object(Bucket=s3_bucket, Key=keys[0])["Body"].read()
        assert body.split(b"\n")[1] == b'{"x":1}'

    def test_other_objects_and_deeper_prefixes_are_not_listed(
        self, url: str, s3_client: Any, s3_bucket: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        storage = S3CheckpointStorage(url, client=s3_client)
        storage.save("mine", {})
        S3CheckpointStorage(f"{url}/deeper", client=s3_client).save("deeper", {})
        s3_client.put_object(Bucket=s3_bucket, Key="runs/a/readme.txt", Body=b"hi")
        assert [i.session_id for i in storage.list_checkpoints()] == ["mine"]
        assert caplog.text == "", "objects of a deeper prefix were read as damaged checkpoints"

    def test_prefixes_do_not_see_each_other(self, s3_bucket: str, s3_client: Any) -> None:
        one = S3CheckpointStorage(f"s3://{s3_bucket}/one", client=s3_client)
        two = S3CheckpointStorage(f"s3://{s3_bucket}", client=s3_client)
        one.save("s", {"where": 1})
        two.save("s", {"where": 2})
        assert one.load("s") == {"where": 1}
        assert two.load("s") == {"where": 2}
        assert [i.session_id for i in two.list_checkpoints()] == ["s"]


class TestDamage:
    """A damaged object raises CorruptCheckpointError naming it; listing skips it."""

    @pytest.mark.parametrize(
        "damage",
        [
            lambda b: b[:-5],
            lambda b: b[: len(b) // 2],
            lambda b: b.replace(b'"x":1', b'"x":7'),
            lambda b: b"",
            lambda b: b"not a checkpoint",
            lambda b: b.replace(b"statekeep-checkpoint", b"statekeep-checkpoinT"),
        ],
        ids=["tail", "half", "flipped-payload", "empty", "garbage", "header"],
    )
    def test_damaged_object(
        self, url: str, s3_client: Any, s3_bucket: str, damage: Callable[[bytes], bytes]
    ) -> None:
        storage = S3CheckpointStorage(url, client=s3_client)
        storage.save("victim", {"x": 1, "pad": "p" * 100})
        storage.save("healthy", {"y": 2})
        key = storage._name("victim")
        blob = s3_client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
        s3_client.put_object(Bucket=s3_bucket, Key=key, Body=damage(blob))
        with pytest.raises(CorruptCheckpointError, match=key):
            storage.load("victim")
        listed = [i.session_id for i in storage.list_checkpoints()]
        assert "healthy" in listed
        if damage(blob).startswith(blob.split(b"\n")[0] + b"\n"):
            assert "victim" in listed  # header intact: listed, load still refuses
        else:
            assert "victim" not in listed

    def test_an_object_moved_to_another_sessions_key(
        self, url: str, s3_client: Any, s3_bucket: str
    ) -> None:
        storage = S3CheckpointStorage(url, client=s3_client)
        storage.save("a", {"who": "a"})
        storage.save("b", {"who": "b"})
        s3_client.copy_object(
            Bucket=s3_bucket,
            Key=storage._name("b"),
            CopySource={"Bucket": s3_bucket, "Key": storage._name("a")},
        )
        with pytest.raises(CorruptCheckpointError, match="holds session 'a'"):
            storage.load("b")
        assert [i.session_id for i in storage.list_checkpoints()] == ["a"]


class TestListing:
    """Listing pages through LIST and reads only the headers."""

    def test_more_than_one_page(self, url: str, s3_client: Any) -> None:
        storage = S3CheckpointStorage(url, client=s3_client)
        with ThreadPoolExecutor(8) as pool:  # setup only: the PUTs in parallel
            list(
                pool.map(
                    lambda n: storage._write(storage._name(f"s{n}"), _blob(f"s{n}")), range(1005)
                )
            )
        infos = storage.list_checkpoints()
        assert len(infos) == 1005
        assert {i.session_id for i in infos} == {f"s{n}" for n in range(1005)}

    def test_never_a_whole_object(self, url: str, s3_client: Any) -> None:
        storage = S3CheckpointStorage(url, client=s3_client)
        storage.save("big", {"rows": list(range(200_000))}, metadata={"m": "x" * 5000})
        ranges: list[str | None] = []
        real = s3_client.get_object

        def spy(**kw: Any) -> Any:
            ranges.append(kw.get("Range"))
            return real(**kw)

        s3_client.get_object = spy
        try:
            (info,) = storage.list_checkpoints()
        finally:
            del s3_client.get_object
        assert dict(info.metadata) == {"m": "x" * 5000}
        assert ranges, "listing read no header"
        assert None not in ranges, f"listing downloaded a whole object: {ranges}"


def _blob(key: str) -> bytes:
    from datetime import datetime, timezone

    from statekeep.storage._envelope import pack

    return pack(key, b"{}", b"{}", datetime.now(timezone.utc))


class TestFailures:
    """Backend failures are StorageError with the botocore error as __cause__."""

    def test_a_missing_bucket(self, s3_server: S3Server, s3_client: Any) -> None:
        # reads only: SeaweedFS creates a missing bucket on the first PUT
        storage = S3CheckpointStorage("s3://no-such-bucket-here/x", client=s3_client)
        with pytest.raises(StorageError, match="no-such-bucket-here") as caught:
            storage.load("s")
        assert isinstance(caught.value.__cause__, botocore.exceptions.ClientError)
        assert caught.value.errno == errno.ENOENT
        with pytest.raises(StorageError) as caught:
            storage.list_checkpoints()
        assert caught.value.__cause__ is not None
        with pytest.raises(StorageError):
            storage.exists("s")

    def test_wrong_credentials(self, s3_server: S3Server, s3_bucket: str) -> None:
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=s3_server.endpoint,
            aws_access_key_id=s3_server.access_key,
            aws_secret_access_key="wrong",
            region_name="us-east-1",
        )
        storage = S3CheckpointStorage(f"s3://{s3_bucket}", client=client)
        with pytest.raises(StorageError) as caught:
            storage.save("s", {})
        assert isinstance(caught.value.__cause__, botocore.exceptions.ClientError)
        assert caught.value.errno == errno.EACCES

    def test_each_default_client_reads_the_environment(
        self, s3_server: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A storage made without a client uses the credentials in the environment now,
        not those a first client of the process found (boto3's default session)."""
        for name, value in s3_server.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        with pytest.raises(StorageError) as caught:
            S3CheckpointStorage(f"s3://{s3_bucket}").save("s", {})
        assert caught.value.errno == errno.EACCES
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
        storage = S3CheckpointStorage(f"s3://{s3_bucket}")
        storage.save("s", {"ok": True})
        assert storage.load("s") == {"ok": True}
        storage.close()

    def test_one_session_while_the_environment_stays(self) -> None:
        """Clients made from an unchanged environment share one boto3 session (a new
        session loads the service model again: about 100 ms)."""
        from statekeep._s3client import env_session

        assert env_session() is env_session()

    def test_a_dead_endpoint_fails_within_the_timeout(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        (port,) = free_ports(1)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        storage = S3CheckpointStorage("s3://bucket")  # the default client: short timeouts
        done = threading.Event()
        errors: list[BaseException] = []

        def call() -> None:
            try:
                storage.save("s", {})
            except BaseException as exc:
                errors.append(exc)
            done.set()

        threading.Thread(target=call, daemon=True).start()
        assert done.wait(20), "a save to a dead endpoint hung"
        assert isinstance(errors[0], StorageError), errors
        assert errors[0].__cause__ is not None
        storage.close()


class TestSmallPuts:
    """``put_small`` (S3Remote's create-only PUTs and small conditional checkpoint saves)
    skips botocore's ``Expect: 100-continue`` round trip; the client's other requests,
    and a save too large for it, keep it."""

    def test_expect_only_where_it_pays(self, url: str, s3_client: Any, s3_bucket: str) -> None:
        from statekeep._s3client import put_small

        sent: list[tuple[str, bool]] = []

        def record(request: Any, **_: Any) -> None:
            sent.append((request.url.rsplit("/", 1)[-1], "Expect" in request.headers))

        storage = S3CheckpointStorage(url, client=s3_client)
        s3_client.meta.events.register_last("before-send.s3.PutObject", record)
        try:
            put_small(s3_client, Bucket=s3_bucket, Key="small", Body=b"x" * 1000)
            s3_client.put_object(Bucket=s3_bucket, Key="theirs", Body=b"x" * 1000)
            storage.save("s", {"v": "x" * 1000})
            storage.save("s", {"v": "x" * (1 << 20)})
        finally:
            s3_client.meta.events.unregister("before-send.s3.PutObject", record)
        name = storage._name("s").rsplit("/", 1)[-1]
        assert sent == [("small", False), ("theirs", True), (name, False), (name, True)]
        body = s3_client.get_object(Bucket=s3_bucket, Key="small")["Body"].read()
        assert body == b"x" * 1000
        assert storage.load("s") == {"v": "x" * (1 << 20)}


class TestConflictRetry:
    """AWS's 409 ConditionalRequestConflict on a PUT is retried; other errors are not."""

    def stubbed(self, errors: list[tuple[str, int]], succeed: bool) -> tuple[Any, Any]:
        import boto3
        from botocore.stub import Stubber

        client = boto3.client(
            "s3",
            region_name="us-east-1",
            aws_access_key_id="x",
            aws_secret_access_key="y",
            endpoint_url="http://127.0.0.1:9",  # never contacted: the stubber answers
        )
        stub = Stubber(client)
        for code, status in errors:  # each try asks for the key's ETag first (absent)
            stub.add_client_error("head_object", "404", http_status_code=404)
            stub.add_client_error("put_object", code, http_status_code=status)
        if succeed:
            stub.add_client_error("head_object", "404", http_status_code=404)
            stub.add_response("put_object", {"ETag": '"e"'})
        stub.activate()
        return client, stub

    def test_conflicts_are_retried(self) -> None:
        conflict = ("ConditionalRequestConflict", 409)
        client, stub = self.stubbed([conflict, conflict], succeed=True)
        assert S3CheckpointStorage("s3://b", client=client).save("s", {}) is True
        stub.assert_no_pending_responses()

    def test_endless_conflicts_end_in_storage_error(self) -> None:
        client, _ = self.stubbed([("ConditionalRequestConflict", 409)] * 5, succeed=False)
        with pytest.raises(StorageError, match="ConditionalRequestConflict"):
            S3CheckpointStorage("s3://b", client=client).save("s", {})

    def test_other_errors_are_not_retried(self) -> None:
        client, stub = self.stubbed([("AccessDenied", 403)], succeed=True)
        with pytest.raises(StorageError, match="AccessDenied") as caught:
            S3CheckpointStorage("s3://b", client=client).save("s", {})
        assert caught.value.errno == errno.EACCES
        with pytest.raises(AssertionError):
            stub.assert_no_pending_responses()  # the success answer was never asked for

    def test_a_server_without_conditional_writes_gets_plain_puts(self) -> None:
        from botocore.stub import ANY

        client, stub = self.stubbed([("NotImplemented", 501)], succeed=False)
        plain = {"Bucket": "b", "Key": ANY, "Body": ANY, "ContentType": "application/json"}
        stub.add_response("put_object", {"ETag": '"e1"'}, expected_params=plain)
        stub.add_response("put_object", {"ETag": '"e2"'}, expected_params=plain)
        storage = S3CheckpointStorage("s3://b", client=client)
        assert storage.save("s", {"n": 1}) is True
        assert storage.save("s", {"n": 2}) is True  # no HEAD, no condition from then on
        stub.assert_no_pending_responses()


class TestConditionalSaves:
    """Each save is conditional on the ETag this storage last saw, so a save still in
    flight when its process died cannot land over a newer save made after it."""

    @staticmethod
    def requests(client: Any) -> list[str]:
        sent: list[str] = []

        def record(request: Any, **_: Any) -> None:
            sent.append(request.method)

        client.meta.events.register_last("before-send.s3", record)
        return sent

    def test_a_dead_writers_late_put_does_not_land_over_a_newer_save(
        self, url: str, s3_server: S3Server
    ) -> None:
        import http.client
        import urllib.parse

        dying = s3_server.client()
        held: list[Any] = []

        class Killed(ConnectionResetError):  # what a client sees of a dropped request
            pass

        def hold(request: Any, **_: Any) -> None:
            if request.method == "PUT" and held == []:
                held.append(request)  # signed and sent, as far as this client knows...
                raise Killed  # ...and then its process died before the answer came

        old = S3CheckpointStorage(url, client=dying)
        old.save("run", {"step": 1})
        dying.meta.events.register_last("before-send.s3.PutObject", hold)
        with pytest.raises(StorageError):
            old.save("run", {"step": 2})
        (request,) = held
        new = S3CheckpointStorage(url, client=s3_server.client())  # the restarted program
        assert new.load("run") == {"step": 1}
        new.save("run", {"step": 3})
        # the dead writer's request reaches the server only now
        where = urllib.parse.urlsplit(request.url)
        connection = http.client.HTTPConnection(where.hostname, where.port, timeout=10)
        headers = {k: v for k, v in request.headers.items() if k.lower() != "expect"}
        body = request.body if isinstance(request.body, bytes) else request.body.read()
        try:
            connection.request("PUT", f"{where.path}?{where.query}", body=body, headers=headers)
            status = connection.getresponse().status
        finally:
            connection.close()
        assert new.load("run") == {"step": 3}, f"the late PUT landed (HTTP {status})"
        assert status == 412
        assert S3CheckpointStorage(url, client=s3_server.client()).load("run") == {"step": 3}

    def test_live_writers_still_go_over_each_other(self, url: str, s3_server: S3Server) -> None:
        one = S3CheckpointStorage(url, client=s3_server.client())
        two = S3CheckpointStorage(url, client=s3_server.client())
        one.save("s", {"by": "one", "n": 1})
        two.save("s", {"by": "two", "n": 1})
        one.save("s", {"by": "one", "n": 2})  # one's ETag is stale: 412, then again
        assert two.load("s") == {"by": "one", "n": 2}
        two.delete("s")
        one.save("s", {"by": "one", "n": 3})  # after a delete by another writer
        assert two.load("s") == {"by": "one", "n": 3}
        two.save("s", {"by": "two", "n": 2})
        assert one.load("s") == {"by": "two", "n": 2}

    def test_a_save_after_a_save_or_load_is_one_request(
        self, url: str, s3_server: S3Server
    ) -> None:
        S3CheckpointStorage(url, client=s3_server.client()).save("s", {"n": 0})
        client = s3_server.client()
        sent = self.requests(client)
        storage = S3CheckpointStorage(url, client=client)
        storage.save("s", {"n": 1})  # first save of the key here: its ETag asked once
        assert sent == ["HEAD", "PUT"]
        sent.clear()
        storage.save("s", {"n": 2})
        assert sent == ["PUT"]
        fresh = S3CheckpointStorage(url, client=client)
        sent.clear()
        assert fresh.load("s") == {"n": 2}
        fresh.save("s", {"n": 3})  # the load's ETag serves
        assert sent == ["GET", "PUT"]

    def test_remembered_etags_are_bounded(
        self, url: str, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import statekeep.storage._s3 as s3_module

        monkeypatch.setattr(s3_module, "_ETAGS_KEPT", 2)
        storage = S3CheckpointStorage(url, client=s3_server.client())
        for n in range(5):  # a process that saves many sessions
            storage.save(f"s{n}", {"n": n})
            assert len(storage._etags) <= 2
        sent = self.requests(storage.client)
        storage.save("s0", {"n": 10})  # forgotten: its ETag is asked again, then saved
        assert sent == ["HEAD", "PUT"]
        assert storage.load("s0") == {"n": 10}
