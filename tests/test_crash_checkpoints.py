"""kill -9 during checkpoint save loops: a load afterwards returns a whole, recent value."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import WORKERS, long_campaign
from crashworkers.checkpoint_worker import SESSION, check_value, open_storage
from servers import PostgresServer, S3Server
from statekeep import _atomic

SHORT_KILLS = 30
LONG_KILLS = 150
REMOTE_KILLS = 100  # per remote backend, in the default suite


def campaign(
    backend: str,
    path: Path | str,
    kills: int,
    seed: int,
    env: dict[str, str],
    opener: Callable[[], Any] | None = None,
) -> tuple[list[int], int]:
    """Kill ``kills`` save loops at random moments; check the checkpoint after each.

    Returns how many saves each child had reported before it died, and (file backend)
    how many kills left a half-written temp file behind, i.e. landed inside a write.
    """
    rng = random.Random(seed)
    zygote = subprocess.Popen(
        [sys.executable, str(WORKERS / "checkpoint_worker.py"), "zygote", backend, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    assert zygote.stdin is not None
    assert zygote.stdout is not None
    reported: list[int] = []
    mid_write = 0
    checker = opener() if opener is not None else None
    try:
        for round_ in range(kills):
            base = (round_ + 1) * 1_000_000
            durable = backend == "sqlite" or round_ % 2 == 0
            zygote.stdin.write(f"go {base} {rng.randrange(1 << 30)} {int(durable)}\n")
            zygote.stdin.flush()
            kind, pid_text = zygote.stdout.readline().split()
            assert kind == "pid"
            pid = int(pid_text)
            last = -1
            wanted = rng.randrange(1, 6)
            while True:
                line = zygote.stdout.readline().split()
                assert line, "the zygote died"
                if line[0] == "saved":
                    last = int(line[1])
                    wanted -= 1
                    if wanted == 0:
                        # picks the moment of the kill inside the next save(s)
                        time.sleep(rng.uniform(0, 0.02))
                        os.kill(pid, signal.SIGKILL)
                elif line[0] == "exit":
                    status = int(line[2])
                    break
            assert os.WIFSIGNALED(status), f"child {pid} was not killed: status {status}"
            assert last >= base
            private = Path(path)  # work entries live in the directory, privately named
            work = (
                [p for p in private.iterdir() if _atomic.is_private(p.name)]
                if backend == "file"
                else []
            )
            if any(p.suffix == ".work" for p in work):
                mid_write += 1
            if checker is not None:  # a remote storage: one client for every check
                # the server may still complete the save that was in flight when the
                # client died: reads after the kill only ever move forward
                gen = check_value(checker.load(SESSION))
                (info,) = checker.list_checkpoints()
                later = check_value(checker.load(SESSION))
                assert gen <= info.metadata["gen"] <= later, "reads went back in time"
                gen = later
            else:
                with open_storage(backend, str(path)) as storage:
                    gen = check_value(storage.load(SESSION))
                    (info,) = storage.list_checkpoints()
                assert info.metadata == {"gen": gen}, "metadata and data from different saves"
            assert gen >= last, f"round {round_}: loaded gen {gen} is older than returned {last}"
            assert gen < base + 1_000_000, f"round {round_}: gen {gen} from a later round?"
            if backend == "file":
                stale = [
                    p.name
                    for p in private.iterdir()
                    if _atomic.is_private(p.name) and p.name.endswith(".work")
                ]
                assert stale == [], f"a killed save's temp file was not reclaimed: {stale}"
            reported.append(last - base + 1)
        zygote.stdin.write("quit\n")
        zygote.stdin.flush()
    finally:
        zygote.stdin.close()
        if zygote.wait(timeout=60) != 0:
            zygote.kill()
        zygote.stdout.close()
        if checker is not None:
            checker.close()
    return reported, mid_write


def target(backend: str, tmp_path: Path) -> Path:
    return tmp_path / "ckpt" if backend == "file" else tmp_path / "ckpt.sqlite"


class TestCrashDuringSaves:
    """Each SIGKILL leaves a whole checkpoint no older than the last save that returned."""

    @pytest.mark.parametrize("backend", ["file", "sqlite"])
    def test_short_campaign(
        self, backend: str, tmp_path: Path, worker_env: dict[str, str], crash_report: list[str]
    ) -> None:
        reported, mid_write = campaign(
            backend, target(backend, tmp_path), SHORT_KILLS, 1234, worker_env
        )
        assert len(reported) == SHORT_KILLS
        if backend == "file":
            assert mid_write > 0, "no kill landed inside a write: the campaign proves nothing"
        inside = f" ({mid_write} inside a file write)" if backend == "file" else ""
        crash_report.append(f"checkpoints/{backend}: {SHORT_KILLS} kills{inside}, all loads whole")

    @pytest.mark.crash
    @pytest.mark.parametrize("backend", ["file", "sqlite"])
    def test_long_campaign(
        self, backend: str, tmp_path: Path, worker_env: dict[str, str], crash_report: list[str]
    ) -> None:
        kills = LONG_KILLS if long_campaign() else SHORT_KILLS
        seed = random.SystemRandom().randrange(1 << 30)
        reported, mid_write = campaign(backend, target(backend, tmp_path), kills, seed, worker_env)
        assert len(reported) == kills
        crash_report.append(
            f"checkpoints/{backend}: {kills} kills (seed {seed}; {mid_write} inside a file write), "
            f"{sum(reported)} saves returned, all loads whole"
        )


class TestCrashDuringRemoteSaves:
    """kill -9 of a client mid-save on S3 and PostgreSQL: never a partial or older value."""

    def test_s3(
        self,
        s3_server: S3Server,
        s3_bucket: str,
        worker_env: dict[str, str],
        crash_report: list[str],
    ) -> None:
        from statekeep import S3CheckpointStorage

        url = f"s3://{s3_bucket}/crash"
        env = {**worker_env, **s3_server.env()}
        reported, _ = campaign(
            "s3",
            url,
            REMOTE_KILLS,
            4321,
            env,
            lambda: S3CheckpointStorage(url, client=s3_server.client()),
        )
        assert len(reported) == REMOTE_KILLS
        crash_report.append(
            f"checkpoints/s3: {REMOTE_KILLS} kills, {sum(reported)} saves returned, all loads whole"
        )

    def test_postgres(
        self,
        postgres_server: PostgresServer,
        postgres_db: str,
        worker_env: dict[str, str],
        crash_report: list[str],
    ) -> None:
        from statekeep import PostgresCheckpointStorage

        reported, _ = campaign(
            "postgres",
            postgres_db,
            REMOTE_KILLS,
            8765,
            worker_env,
            lambda: PostgresCheckpointStorage(postgres_db),
        )
        assert len(reported) == REMOTE_KILLS
        crash_report.append(
            f"checkpoints/postgres: {REMOTE_KILLS} kills, {sum(reported)} saves returned, "
            "all loads whole"
        )
