"""Shared fixtures, and the switch that keeps the long kill -9 campaign out of the default run."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import servers

# before any test imports it, so the contract's asserts explain themselves
pytest.register_assert_rewrite("statekeep.testing")

WORKERS = Path(__file__).parent / "crashworkers"
_CRASH_REPORT = pytest.StashKey[list[str]]()


def long_campaign() -> bool:
    """True when the long crash campaign was asked for (``nox -s crash``)."""
    return os.environ.get("STATEKEEP_CRASH_CAMPAIGN") == "long"


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_CRASH_REPORT] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect (not skip) ``crash``-marked tests unless the long campaign was requested."""
    if long_campaign() or "crash" in (config.option.markexpr or ""):
        return
    keep = [item for item in items if item.get_closest_marker("crash") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    lines = config.stash.get(_CRASH_REPORT, [])
    if lines:
        terminalreporter.section("crash campaigns")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture
def crash_report(request: pytest.FixtureRequest) -> list[str]:
    """Lines appended here are printed in the terminal summary."""
    return request.config.stash[_CRASH_REPORT]


@pytest.fixture
def states_dir(tmp_path: Path) -> Path:
    """A not-yet-existing directory for a store or keeper."""
    return tmp_path / "states"


@pytest.fixture
def worker_cmd() -> list[str]:
    """The command that runs tests/crashworkers/snapshot_worker.py."""
    return [sys.executable, str(WORKERS / "snapshot_worker.py")]


@pytest.fixture
def worker_env() -> dict[str, str]:
    """The environment for worker subprocesses: no coverage tracing (they die by SIGKILL)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("COV_CORE_", "COVERAGE_")) and k != "PYTHONWARNINGS"
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


def commit(states_dir: Path, files: dict[str, bytes], name: str = "a.state", **kw: bool) -> Path:
    """Commit ``files`` (relative path -> bytes) as a state named ``name``; return its path."""
    from statekeep import _commit

    with _commit.BuildDir(states_dir, durable=kw.get("durable", True)) as build:
        for rel, data in files.items():
            path = build.path / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        build.commit(states_dir / name)
    return states_dir / name


# --- real servers on 127.0.0.1 (tests/servers.py) -------------------------------------


def _started(start: Callable[[], Any]) -> Any:
    from servers import ServerUnavailable, unavailable

    try:
        return start()
    except (ServerUnavailable, ImportError, OSError, subprocess.SubprocessError) as exc:
        unavailable(str(exc))


@pytest.fixture(scope="session")
def s3_server() -> Iterator[servers.S3Server]:
    """One SeaweedFS S3 server for the session (``.endpoint``, ``.access_key``, ``.secret_key``)."""
    server = _started(servers.start_s3)
    yield server
    servers.discard(server)


@pytest.fixture
def s3_bucket(s3_server: servers.S3Server) -> str:
    """A fresh, empty bucket on the session's S3 server."""
    return s3_server.new_bucket()


@pytest.fixture
def s3_client(s3_server: servers.S3Server) -> Any:
    """A boto3 client for the session's S3 server (short timeouts, two attempts at most)."""
    return s3_server.client()


@pytest.fixture
def own_s3_server() -> Iterator[servers.S3Server]:
    """A private S3 server for one test, which may ``kill()`` and ``start()`` it."""
    server = _started(servers.start_s3)
    yield server
    servers.discard(server)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[servers.PostgresServer]:
    """One PostgreSQL server for the session (``.conninfo(dbname)``)."""
    server = _started(servers.start_postgres)
    yield server
    servers.discard(server)


@pytest.fixture
def postgres_db(postgres_server: servers.PostgresServer) -> str:
    """The conninfo of a fresh database on the session's PostgreSQL server."""
    return postgres_server.new_database()


@pytest.fixture
def own_postgres_server() -> Iterator[servers.PostgresServer]:
    """A private PostgreSQL server for one test, which may ``kill()`` and ``start()`` it."""
    server = _started(servers.start_postgres)
    yield server
    servers.discard(server)
