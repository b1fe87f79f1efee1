"""The ``statekeep`` command, run as a subprocess on real stores and storages."""

from __future__ import annotations

import inspect
import json
import os
import pty
import random
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

import statekeep
from statekeep._atomic import is_private
from statekeep._manifest import MANIFEST_NAME

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
TIMEOUT = 60  # seconds for one command: a hang fails the test instead of stalling it


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    env.pop("COLUMNS", None)
    return env


def run(
    *args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None, **kw: Any
) -> subprocess.CompletedProcess[str]:
    """``python -m statekeep ARGS`` to completion, its output captured."""
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    kw.setdefault("timeout", TIMEOUT)
    return subprocess.run(
        [sys.executable, "-m", "statekeep", *map(str, args)],
        cwd=cwd,
        env={**_env(), **(env or {})},
        text=True,
        check=False,
        **kw,
    )


def usage_error(done: subprocess.CompletedProcess[str], *words: str) -> None:
    """Exit 2, nothing on stdout, one line on stderr naming ``words``, no traceback."""
    assert done.returncode == 2, done
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("statekeep: error: ")
    for word in words:
        assert word in lines[0]


class Blob(statekeep.PersistentStateMixin):
    def __init__(self, size: int = 2000) -> None:
        self.size = size

    def save_state(self, path: Path) -> None:
        path.write_bytes(bytes(range(256)) * (self.size // 256) + b"x" * (self.size % 256))


def make_store(root: Path, count: int, size: int = 2000) -> list[Path]:
    """``count`` committed states named step-1.state ... step-N.state, oldest first."""
    store = statekeep.StateStore(root, durable=False)
    store.register("model", Blob(size))
    store.register("optim", Blob(100))
    paths = []
    for i in range(1, count + 1):
        store.state_name_format = f"step-{i}.state"
        paths.append(store.save_state())
    return paths


@pytest.fixture
def states(tmp_path: Path) -> Path:
    root = tmp_path / "states"
    make_store(root, 3)
    return root


def flip_bit(path: Path, offset: int = 10) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x01]))


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory that user ``nobody`` can traverse (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="statekeep-cli-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def run_as_nobody(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """The command in a forked child that runs as user ``nobody`` when we are root.

    Root ignores ``chmod 000``; ``nobody`` cannot, and cannot exec this venv's Python
    either, so the child runs ``main()`` from what this process has already imported.
    """
    argv = [str(a) for a in args]
    if os.geteuid() != 0:
        return run(*argv)
    from statekeep._cli import main

    with tempfile.TemporaryDirectory() as tmp:
        out, err = open(Path(tmp, "out"), "w+"), open(Path(tmp, "err"), "w+")  # noqa: SIM115
        with out, err:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                code = 70
                try:
                    sys.stdout, sys.stderr = out, err
                    os.setgroups([])
                    os.setgid(65534)
                    os.setuid(65534)
                    code = main(argv)
                except BaseException:
                    import traceback

                    traceback.print_exc(file=err)
                finally:
                    out.flush()
                    err.flush()
                    os._exit(code)
            pidfd = os.pidfd_open(pid)
            try:
                ready, _, _ = select.select([pidfd], [], [], TIMEOUT)
            finally:
                os.close(pidfd)
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail(f"statekeep {argv} as nobody did not finish in {TIMEOUT}s")
            _, status = os.waitpid(pid, 0)
            out.seek(0)
            err.seek(0)
            return subprocess.CompletedProcess(
                argv, os.waitstatus_to_exitcode(status), out.read(), err.read()
            )


class TestLs:
    """`statekeep ls` lists every state, newest last, with its status."""

    def test_healthy_store_lists_each_state_newest_last(self, states: Path) -> None:
        done = run("ls", states)
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""
        lines = done.stdout.splitlines()
        assert lines[0].split() == ["NAME", "SEQ", "TIME", "SIZE", "STATUS", "METADATA"]
        names = [line.split()[0] for line in lines[1:]]
        assert names == ["step-1.state", "step-2.state", "step-3.state"]
        seqs = [int(line.split()[1]) for line in lines[1:]]
        assert seqs == sorted(seqs)
        assert len(set(seqs)) == 3
        assert all("2.1 KB" in line and "unverified" in line for line in lines[1:])

    def test_time_is_local(self, states: Path) -> None:
        listed = json.loads(run("ls", states, "--json").stdout)["states"][0]
        utc = datetime.fromisoformat(listed["created_at"])
        for zone, hours in [("UTC0", 0), ("JST-9", 9), ("EST+5", -5)]:  # POSIX TZ: no tzdata
            done = run("ls", states, env={"TZ": zone})
            shown = " ".join(done.stdout.splitlines()[1].split()[2:4])
            local = (utc + timedelta(hours=hours)).strftime("%Y-%m-%d %H:%M:%S")
            assert shown == local, zone

    def test_verify_marks_each_state(self, states: Path) -> None:
        done = run("ls", states, "--verify")
        assert done.returncode == 0, done.stderr
        assert [line.split()[-1] for line in done.stdout.splitlines()[1:]] == ["verified"] * 3

    def test_json_shape(self, states: Path) -> None:
        done = run("ls", states, "--json")
        assert done.returncode == 0, done.stderr
        body = json.loads(done.stdout)
        assert body["states_dir"] == str(states)
        first = body["states"][0]
        assert set(first) == {
            "name",
            "path",
            "sequence",
            "created_at",
            "size_bytes",
            "status",
            "problem",
            "metadata",
            "location",
        }
        assert first["name"] == "step-1.state"
        assert first["path"] == str(states / "step-1.state")
        assert first["size_bytes"] == 2100
        assert first["status"] == "unverified"
        assert first["problem"] is None
        assert first["location"] == "local"
        assert first["created_at"].endswith("+00:00")
        info = {i.path.name: i for i in statekeep.StateStore(states).list_states()}
        assert first["created_at"] == info["step-1.state"].created_at.isoformat()

    def test_flipped_bit_is_damaged_only_when_verifying(self, states: Path) -> None:
        flip_bit(states / "step-2.state" / "model")
        assert run("ls", states).returncode == 0  # the manifest alone cannot see it
        done = run("ls", states, "--verify", "--json")
        assert done.returncode == 1
        status = {s["name"]: s["status"] for s in json.loads(done.stdout)["states"]}
        assert status == {
            "step-1.state": "verified",
            "step-2.state": "damaged",
            "step-3.state": "verified",
        }
        assert "step-2.state" in done.stderr
        assert "model" in done.stderr

    def test_missing_manifest_is_listed_as_damaged(self, states: Path) -> None:
        (states / "step-3.state" / MANIFEST_NAME).unlink()
        done = run("ls", states)
        assert done.returncode == 1
        lines = [line.split() for line in done.stdout.splitlines()[1:]]
        # with no manifest it has no sequence: listed before every state that has one
        assert [line[0] for line in lines] == ["step-3.state", "step-1.state", "step-2.state"]
        assert lines[0][1:] == ["-", "-", "-", "damaged"]
        assert "step-3.state has no manifest" in done.stderr
        assert "Traceback" not in done.stderr

    def test_empty_dir_lists_nothing(self, tmp_path: Path) -> None:
        statekeep.StateStore(tmp_path / "empty")
        done = run("ls", tmp_path / "empty")
        assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
        done = run("ls", tmp_path / "empty", "--json")
        assert json.loads(done.stdout)["states"] == []

    def test_nonexistent_is_a_usage_error(self, tmp_path: Path) -> None:
        usage_error(run("ls", tmp_path / "nope"), str(tmp_path / "nope"), "no such")

    def test_a_file_in_place_of_the_dir_is_a_usage_error(self, tmp_path: Path) -> None:
        (tmp_path / "file").write_text("not a dir")
        usage_error(run("ls", tmp_path / "file"), "not a states directory")

    def test_a_dir_of_other_things_is_not_a_store(self, tmp_path: Path) -> None:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        usage_error(run("ls", tmp_path), "not a statekeep states directory")

    def test_a_file_of_other_things_is_not_a_store(self, tmp_path: Path) -> None:
        (tmp_path / "notes.txt").write_text("hello")
        usage_error(run("ls", tmp_path), "not a statekeep states directory")

    def test_a_state_given_for_its_dir_says_so(self, states: Path) -> None:
        usage_error(run("ls", states / "step-1.state"), "is a state", "statekeep show")

    def test_unreadable_dir_is_a_usage_error(self, nobody_dir: Path) -> None:
        root = nobody_dir / "states"
        make_store(root, 1)
        root.chmod(0)
        usage_error(run_as_nobody("ls", root), str(root), "Permission denied")

    def test_unreadable_manifest_is_damaged_not_a_crash(self, nobody_dir: Path) -> None:
        root = nobody_dir / "states"
        make_store(root, 2)
        for p in [root, *root.iterdir()]:
            p.chmod(0o755)
        (root / "step-1.state" / MANIFEST_NAME).chmod(0)
        done = run_as_nobody("ls", root)
        assert done.returncode == 1, done
        assert "Traceback" not in done.stderr
        assert "step-1.state" in done.stderr
        assert done.stdout.splitlines()[-1].split()[0] == "step-2.state"

    def test_symlinks_are_never_followed(self, states: Path, tmp_path: Path) -> None:
        outside = tmp_path / "outside"
        make_store(outside, 1)
        (states / "link.state").symlink_to(outside / "step-1.state")
        done = run("ls", states, "--json")
        assert [s["name"] for s in json.loads(done.stdout)["states"]] == [
            "step-1.state",
            "step-2.state",
            "step-3.state",
        ]
        model = states / "step-2.state" / "model"
        model.unlink()
        model.symlink_to(outside / "step-1.state" / "model")  # same bytes, but a link
        done = run("verify", states, "step-2.state")
        assert done.returncode == 1
        assert "model should be a regular file" in done.stdout

    def test_a_state_pruned_while_verifying_is_not_damage(self, states: Path) -> None:
        from statekeep._cli import _snapshots

        rows = _snapshots._rows(str(states))  # listed: all three are there
        shutil.rmtree(states / "step-2.state")  # then a keeper removes one
        left = _snapshots._verify_rows(rows, show_progress=False)
        assert [(r.name, r.status) for r in left] == [
            ("step-1.state", "verified"),
            ("step-3.state", "verified"),
        ]

    def test_fifo_manifest_does_not_hang(self, states: Path) -> None:
        manifest = states / "step-2.state" / MANIFEST_NAME
        manifest.unlink()
        os.mkfifo(manifest)
        done = run("ls", states, timeout=20)  # a hang fails here
        assert done.returncode == 1
        assert "step-2.state" in done.stderr


class TestCommand:
    """The command's entry points, usage errors and pipes."""

    def test_console_script_names_main(self) -> None:
        text = (ROOT / "pyproject.toml").read_text()
        assert '[project.scripts]\nstatekeep = "statekeep._cli:main"' in text
        from statekeep._cli import main

        assert main(["--version"]) == 0

    def test_ls_and_verify_do_not_import_pydantic(self, states: Path) -> None:
        """Start-up is most of a small listing: the snapshot commands load no pydantic."""
        code = (
            "import sys\n"
            "from statekeep._cli import main\n"
            "assert main(['ls', sys.argv[1]]) == 0\n"
            "assert main(['verify', sys.argv[1]]) == 0\n"
            "loaded = sorted(m for m in sys.modules if m.startswith('pydantic'))\n"
            "assert not loaded, loaded\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", code, str(states)],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        assert done.returncode == 0, done.stderr

    def test_no_command_is_a_usage_error(self) -> None:
        usage_error(run(), "COMMAND")
        usage_error(run("checkpoints"), "ACTION")
        usage_error(run("frobnicate"), "frobnicate")

    def test_help_exits_zero(self) -> None:
        done = run("--help")
        assert done.returncode == 0
        for command in ("ls", "show", "verify", "prune", "checkpoints"):
            assert command in done.stdout

    def test_reader_leaving_early_is_no_error(self, tmp_path: Path) -> None:
        make_store(tmp_path / "s", 300, size=10)
        proc = subprocess.Popen(
            [sys.executable, "-m", "statekeep", "ls", str(tmp_path / "s")],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None
        assert proc.stderr is not None
        proc.stdout.readline()
        proc.stdout.close()  # like `| head -1`
        err = proc.stderr.read()
        proc.stderr.close()
        assert proc.wait(TIMEOUT) == 0
        assert b"Traceback" not in err


class TestShow:
    """`statekeep show` prints a state's manifest."""

    def test_files_sizes_checksums(self, states: Path) -> None:
        done = run("show", states / "step-2.state")
        assert done.returncode == 0, done.stderr
        out = done.stdout
        assert f"state     {states / 'step-2.state'}" in out
        assert "size      2.1 KB in 2 files" in out
        import zlib

        crc = zlib.crc32((states / "step-2.state" / "model").read_bytes())
        model = next(line for line in out.splitlines() if line.endswith(" model"))
        assert model.split() == ["file", "2000", f"{crc:08x}", "model"]

    def test_json_shape(self, states: Path) -> None:
        done = run("show", states / "step-1.state", "--json")
        body = json.loads(done.stdout)
        assert set(body) == {
            "path",
            "name",
            "format_version",
            "sequence",
            "created_at",
            "size_bytes",
            "metadata",
            "files",
        }
        assert body["name"] == "step-1.state"
        assert body["size_bytes"] == 2100
        assert [f["path"] for f in body["files"]] == ["model", "optim"]
        assert body["files"][0]["size"] == 2000
        assert len(body["files"][0]["crc32"]) == 8

    def test_damaged_manifest_exits_1(self, states: Path) -> None:
        manifest = states / "step-1.state" / MANIFEST_NAME
        manifest.write_bytes(manifest.read_bytes()[:-20])
        done = run("show", states / "step-1.state")
        assert done.returncode == 1
        assert done.stdout == ""
        assert "malformed" in done.stderr
        assert "Traceback" not in done.stderr

    def test_manifest_that_is_a_directory_exits_1(self, states: Path) -> None:
        manifest = states / "step-1.state" / MANIFEST_NAME
        manifest.unlink()
        manifest.mkdir()
        done = run("show", states / "step-1.state")
        assert done.returncode == 1
        assert f"{MANIFEST_NAME} is " in done.stderr  # "is a directory", "is not a regular file"

    def test_nonexistent_and_file_are_usage_errors(self, states: Path) -> None:
        usage_error(run("show", states / "step-9.state"), "no such state")
        usage_error(run("show", states / "step-1.state" / "model"), "not a state")


class TestVerify:
    """`statekeep verify` checks every file and says what is damaged and why."""

    def test_healthy(self, states: Path) -> None:
        done = run("verify", states)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[-1] == "3 states checked, 0 damaged"
        assert done.stderr == ""

    def test_flipped_bit(self, states: Path) -> None:
        flip_bit(states / "step-1.state" / "optim", 3)
        done = run("verify", states)
        assert done.returncode == 1
        bad = [line for line in done.stdout.splitlines() if line.startswith("DAMAGED")]
        assert len(bad) == 1
        assert "step-1.state" in bad[0]
        assert "optim has CRC-32" in bad[0]
        assert done.stdout.splitlines()[-1] == "3 states checked, 1 damaged"

    def test_truncated_file(self, states: Path) -> None:
        model = states / "step-3.state" / "model"
        model.write_bytes(model.read_bytes()[:-1])
        done = run("verify", states, "--json")
        assert done.returncode == 1
        body = json.loads(done.stdout)
        assert (body["checked"], body["damaged"]) == (3, 1)
        bad = [s for s in body["states"] if s["status"] == "damaged"]
        assert bad[0]["name"] == "step-3.state"
        assert "model is 1999 bytes, manifest says 2000" in bad[0]["problem"]

    def test_missing_manifest(self, states: Path) -> None:
        (states / "step-2.state" / MANIFEST_NAME).unlink()
        done = run("verify", states)
        assert done.returncode == 1
        assert "DAMAGED  step-2.state: state" in done.stdout
        assert "has no manifest" in done.stdout

    def test_named_states_only(self, states: Path) -> None:
        flip_bit(states / "step-1.state" / "model")
        done = run("verify", states, "step-2.state", "step-3.state")
        assert done.returncode == 0, done.stdout
        assert "2 states checked, 0 damaged" in done.stdout
        assert run("verify", states, "step-1.state").returncode == 1
        usage_error(run("verify", states, "step-7.state"), "step-7.state")

    def test_one_state_by_its_path(self, states: Path) -> None:
        done = run("verify", states / "step-2.state")
        assert done.returncode == 0
        assert "1 state checked, 0 damaged" in done.stdout
        flip_bit(states / "step-2.state" / "model")
        assert run("verify", states / "step-2.state").returncode == 1

    def test_one_state_by_its_path_reports_as_by_its_dir(self, states: Path) -> None:
        by_path = run("verify", states / "step-2.state", "--json")
        by_dir = run("verify", states, "step-2.state", "--json")
        assert by_path.returncode == by_dir.returncode == 0, by_path.stderr + by_dir.stderr
        one = json.loads(by_path.stdout)["states"]
        assert one == json.loads(by_dir.stdout)["states"]
        assert [(r["name"], r["status"]) for r in one] == [("step-2.state", "verified")]

    def test_unreadable_file_is_damaged_not_a_crash(self, nobody_dir: Path) -> None:
        root = nobody_dir / "states"
        make_store(root, 2)
        for p in [root, *root.iterdir()]:
            p.chmod(0o755)
        for p in root.glob("*/*"):
            p.chmod(0o644)
        (root / "step-2.state" / "model").chmod(0)
        done = run_as_nobody("verify", root)
        assert done.returncode == 1, done
        assert "Traceback" not in done.stderr
        assert "DAMAGED  step-2.state" in done.stdout
        assert "ok       step-1.state" in done.stdout

    def test_progress_on_a_terminal_only(self, states: Path) -> None:
        piped = run("verify", states)
        assert piped.stderr == ""
        leader, follower = pty.openpty()
        try:
            done = run("verify", states, stderr=follower)
            os.close(follower)
            follower = -1
            chunks = []
            while True:
                try:
                    chunk = os.read(leader, 4096)
                except OSError:  # EIO: the terminal's other end is closed
                    break
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            if follower >= 0:
                os.close(follower)
            os.close(leader)
        assert done.returncode == 0
        shown = b"".join(chunks).decode()
        assert "checked 6.3 KB / 6.3 KB (3/3 states)" in shown
        assert "checked 2.1 KB / 6.3 KB (1/3 states)" in shown


class TestPrune:
    """`statekeep prune` applies the keeper's rules once."""

    def test_keep_removes_the_oldest(self, states: Path) -> None:
        done = run("prune", states, "--keep", "2")
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == ["removed  step-1.state", "removed 1, kept 2"]
        assert sorted(p.name for p in states.iterdir() if not p.name.startswith(".")) == [
            "step-2.state",
            "step-3.state",
        ]

    def test_dry_run_removes_nothing(self, states: Path) -> None:
        before = sorted(os.listdir(states))
        done = run("prune", states, "--keep", "1", "--dry-run", "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {
            "dry_run": True,
            "removed": ["step-1.state", "step-2.state"],
            "kept": ["step-3.state"],
        }
        assert sorted(os.listdir(states)) == before

    def test_pattern_chooses_the_states(self, states: Path) -> None:
        done = run("prune", states, "--keep", "1", "--pattern", "nothing-*", "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"dry_run": False, "removed": [], "kept": []}
        done = run("prune", states, "--keep", "1", "--pattern", "step-[12].state", "--json")
        assert json.loads(done.stdout)["removed"] == ["step-1.state"]
        assert (states / "step-3.state").is_dir()

    def test_prune_killed_midway_leaves_only_whole_states(self, tmp_path: Path) -> None:
        """SIGKILL `statekeep prune` among its removals: what stays is whole and verifies."""
        rng = random.Random(12)
        rounds, count, midway = 10, 150, 0
        for round_ in range(rounds):
            root = tmp_path / f"s{round_}"
            paths = make_store(root, count, size=2_000)
            stop_at = rng.randrange(2, count)  # kill once fewer states than this remain
            proc = subprocess.Popen(
                [sys.executable, "-m", "statekeep", "prune", str(root), "--keep", "1"],
                env=_env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + TIMEOUT
            while proc.poll() is None and time.monotonic() < deadline:
                with os.scandir(root) as it:
                    if sum(not is_private(e.name) for e in it) < stop_at:
                        break
            proc.kill()
            proc.wait(TIMEOUT)
            left = sorted(n for n in os.listdir(root) if not is_private(n))
            if proc.returncode == -signal.SIGKILL and 1 < len(left) < count:
                midway += 1
            assert paths[-1].name in left  # the newest is never removed
            done = run("ls", root, "--verify", "--json")  # nothing half-removed is visible
            assert done.returncode == 0, done.stderr
            assert {s["status"] for s in json.loads(done.stdout)["states"]} == {"verified"}
            assert run("prune", root, "--keep", "1").returncode == 0  # and it finishes
            assert [n for n in os.listdir(root) if not is_private(n)] == [paths[-1].name]
        print(f"prune killed among its removals in {midway} of {rounds} rounds")
        assert midway >= rounds // 2, "too few kills landed among the removals"

    def test_ls_verify_racing_a_prune_never_reports_damage(self, tmp_path: Path) -> None:
        """`ls --verify` while another process prunes: 0, and only states that verify."""
        for round_ in range(10):
            root = tmp_path / f"s{round_}"
            paths = make_store(root, 60, size=20_000)
            pruner = subprocess.Popen(
                [sys.executable, "-m", "statekeep", "prune", str(root), "--keep", "1"],
                env=_env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                done = run("ls", root, "--verify", "--json")
            finally:
                _, err = pruner.communicate(timeout=TIMEOUT)
            assert pruner.returncode == 0, err
            assert done.returncode == 0, done.stderr
            listed = json.loads(done.stdout)["states"]
            assert {s["status"] for s in listed} == {"verified"}
            assert listed[-1]["name"] == paths[-1].name

    def test_bad_rules_are_usage_errors(self, states: Path) -> None:
        before = sorted(os.listdir(states))
        usage_error(run("prune", states), "needs a rule")
        usage_error(run("prune", states, "--keep", "0"), "at least 1")
        usage_error(run("prune", states, "--keep", "two"), "whole number")
        usage_error(run("prune", states, "--keep-every", "1 fortnight"), "not a duration")
        usage_error(run("prune", states, "--keep-every", "0h"), "longer than zero")
        usage_error(run("prune", states, "--keep-best", "loss"), "METRIC:N")
        usage_error(run("prune", states, "--keep-best", "loss:2:median"), "min or max")
        usage_error(run("prune", states, "--policy", "newest:3"), "not a term")
        usage_error(run("prune", states, "--policy", " , "), "empty")
        usage_error(run("prune", states.parent / "nope", "--keep", "1"), "no such")
        assert sorted(os.listdir(states)) == before

    def test_policy_keeps_best_and_newest(self, tmp_path: Path) -> None:
        root = tmp_path / "states"
        store = statekeep.StateStore(root, durable=False)
        store.register("model", Blob(10))
        for step, loss in enumerate([0.9, 0.2, 0.5, 0.1, 0.7, 0.8], 1):
            store.state_name_format = f"step-{step}.state"
            store.save_state(metadata={"step": step, "loss": loss})
        done = run("prune", root, "--policy", "best:loss:2,last:1", "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["kept"] == ["step-2.state", "step-4.state", "step-6.state"]
        done = run("prune", root, "--keep-best", "loss:1:max", "--dry-run")
        assert "would remove  step-4.state" in done.stdout


def _checkpoints(root: Path) -> Path:
    storage = statekeep.FileCheckpointStorage(root, durable=False)
    storage.save("alpha", {"row": 41}, metadata={"owner": "etl"})
    storage.save("beta", {"row": 7, "tags": ["x"]})
    return root


class TestCheckpoints:
    """`statekeep checkpoints` over a directory and over sqlite."""

    def test_ls_directory(self, tmp_path: Path) -> None:
        root = _checkpoints(tmp_path / "ck")
        done = run("checkpoints", "ls", root)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0].split() == ["SESSION", "TIME", "SIZE", "STATUS", "METADATA"]
        assert [line.split()[0] for line in lines[1:]] == ["alpha", "beta"]
        assert lines[1].endswith("owner=etl")
        body = json.loads(run("checkpoints", "ls", root, "--json", "--verify").stdout)
        assert body["problems"] == []
        assert body["checkpoints"][0] == {
            "session_id": "alpha",
            "timestamp": body["checkpoints"][0]["timestamp"],
            "size_bytes": 10,
            "metadata": {"owner": "etl"},
            "status": "verified",
        }

    def test_ls_sqlite(self, tmp_path: Path) -> None:
        db = tmp_path / "c.db"
        with statekeep.SQLiteCheckpointStorage(db) as storage:
            storage.save("s1", {"a": 1})
        done = run("checkpoints", "ls", f"sqlite:///{db}", "--json")
        assert done.returncode == 0, done.stderr
        assert [c["session_id"] for c in json.loads(done.stdout)["checkpoints"]] == ["s1"]
        rel = run("checkpoints", "ls", "sqlite:///c.db", "--json", cwd=tmp_path)
        assert rel.returncode == 0, rel.stderr

    def test_damaged_checkpoint(self, tmp_path: Path) -> None:
        root = _checkpoints(tmp_path / "ck")
        flip_bit(root / "beta.ckpt", (root / "beta.ckpt").stat().st_size - 4)
        assert run("checkpoints", "ls", root).returncode == 0  # headers are intact
        done = run("checkpoints", "ls", root, "--verify")
        assert done.returncode == 1
        assert "beta" in done.stderr
        assert "checksum" in done.stderr
        shown = run("checkpoints", "show", root, "beta")
        assert shown.returncode == 1
        assert "corrupt" in shown.stderr
        (root / "alpha.ckpt").write_bytes(b"garbage\n")
        done = run("checkpoints", "ls", root)
        assert done.returncode == 1
        assert "alpha.ckpt" in done.stderr

    def test_show(self, tmp_path: Path) -> None:
        root = _checkpoints(tmp_path / "ck")
        done = run("checkpoints", "show", root, "alpha")
        assert done.returncode == 0, done.stderr
        assert "metadata  owner=etl" in done.stdout
        assert json.loads(done.stdout.split("data:\n", 1)[1]) == {"row": 41}
        body = json.loads(run("checkpoints", "show", root, "beta", "--json").stdout)
        assert body["data"] == {"row": 7, "tags": ["x"]}
        assert body["session_id"] == "beta"
        missing = run("checkpoints", "show", root, "gamma")
        assert missing.returncode == 1
        assert "gamma" in missing.stderr

    def test_rm(self, tmp_path: Path) -> None:
        root = _checkpoints(tmp_path / "ck")
        done = run("checkpoints", "rm", root, "alpha", "gamma")
        assert done.returncode == 1
        assert done.stdout == "removed  alpha\n"
        assert "gamma" in done.stderr
        assert sorted(n for n in os.listdir(root) if not is_private(n)) == ["beta.ckpt"]
        done = run("checkpoints", "rm", root, "beta", "alpha", "--json")
        assert done.returncode == 1
        assert json.loads(done.stdout) == {"removed": ["beta"], "missing": ["alpha"]}
        assert sorted(n for n in os.listdir(root) if not is_private(n)) == []

    def test_session_ids_that_escape_are_refused(self, tmp_path: Path) -> None:
        root = _checkpoints(tmp_path / "ck")
        (tmp_path / "victim.ckpt").write_text("keep me")
        for action in ("show", "rm"):
            done = run("checkpoints", action, root, "../victim")
            assert done.returncode in (1, 2), done
            assert "Traceback" not in done.stderr
        assert (tmp_path / "victim.ckpt").read_text() == "keep me"

    def test_prune_older_than(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        root = _checkpoints(tmp_path / "ck")
        stamps = inspect.getmodule(statekeep.FileCheckpointStorage.save)  # where its clock is
        long_ago = datetime.now(timezone.utc) - timedelta(days=8)
        with monkeypatch.context() as patch:
            patch.setattr(stamps, "_now", lambda: long_ago)  # only to write an old checkpoint
            statekeep.FileCheckpointStorage(root, durable=False).save("old", {"row": 1})
        before = sorted(n for n in os.listdir(root) if not is_private(n))
        done = run("checkpoints", "prune", root, "--older-than", "7d", "--dry-run", "--json")
        assert json.loads(done.stdout) == {"dry_run": True, "removed": 1, "sessions": ["old"]}
        assert sorted(n for n in os.listdir(root) if not is_private(n)) == before
        assert run("checkpoints", "prune", root, "--older-than", "9d").stdout.endswith(
            "removed 0 checkpoints older than 9d\n"
        )
        done = run("checkpoints", "prune", root, "--older-than", "7d")
        assert done.returncode == 0, done.stderr
        assert done.stdout.endswith("removed 1 checkpoint older than 7d\n")
        assert sorted(n for n in os.listdir(root) if not is_private(n)) == [
            "alpha.ckpt",
            "beta.ckpt",
        ]

    def test_usage_errors(self, tmp_path: Path) -> None:
        usage_error(run("checkpoints", "ls", tmp_path / "nope"), "no such")
        usage_error(run("checkpoints", "ls", "sqlite:///" + str(tmp_path / "x.db")), "no such")
        assert not (tmp_path / "x.db").exists()
        (tmp_path / "junk.db").write_text("not sqlite")
        usage_error(run("checkpoints", "ls", f"sqlite:///{tmp_path}/junk.db"), "not a database")
        usage_error(run("checkpoints", "ls", f"sqlite:///{tmp_path}"), "is a directory")
        usage_error(run("checkpoints", "ls", "ftp://host/x"), "unknown scheme 'ftp'")
        usage_error(run("checkpoints", "prune", tmp_path, "--older-than", "soon"), "duration")

    def test_missing_extra_names_the_pip_command(self) -> None:
        code = (
            "import sys; sys.modules['boto3'] = None; sys.modules['psycopg'] = None\n"
            "from statekeep._cli import main\n"
            "sys.exit(main(sys.argv[1:]))"
        )
        for url, extra in [("s3://bucket/p", "s3"), ("postgresql://localhost/db", "postgres")]:
            done = subprocess.run(
                [sys.executable, "-c", code, "checkpoints", "ls", url],
                env=_env(),
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
                check=False,
            )
            usage_error(done, f"pip install 'statekeep[{extra}]'")


DOC = ROOT / "docs" / "command-line.md"
_BLOCK = re.compile(r"```(python|console)\n(.*?)```", re.S)
_CLOCK = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(\.\d+)?(\+00:00)?")


def _session(body: str) -> list[tuple[str, str]]:
    """A console block as (command, what it printed) pairs."""
    pairs: list[tuple[str, str]] = []
    for line in body.splitlines(keepends=True):
        if line.startswith("$ "):
            pairs.append((line[2:].strip(), ""))
        else:
            assert pairs, f"{DOC.name}: output before any command: {line!r}"
            pairs[-1] = (pairs[-1][0], pairs[-1][1] + line)
    return pairs


def _play(body: str, cwd: Path, status: list[int]) -> str:
    """Run a console block's commands in ``cwd``; return the block as it should read."""
    out = []
    for command, _ in _session(body):
        argv = shlex.split(command)
        if argv == ["echo", "$?"]:
            printed = f"{status[-1]}\n"
        else:
            assert argv[0] == "statekeep", f"{DOC.name}: only statekeep runs here: {command}"
            done = run(*argv[1:], cwd=cwd)
            assert "Traceback" not in done.stderr, done.stderr
            printed = done.stdout + done.stderr
            status.append(done.returncode)
        out.append(f"$ {command}\n{printed}")
    return "".join(out)


def test_the_session_in_the_docs_is_what_the_command_prints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/command-line.md: its Python blocks run, then each command's output matches.

    ``STATEKEEP_UPDATE_DOCS=1`` rewrites the page with what the commands print now.
    """
    monkeypatch.chdir(tmp_path)
    text = DOC.read_text()
    status = [0]
    namespace: dict[str, object] = {"__name__": "docs"}  # shared by the page's blocks
    rebuilt, pos, stale = [], 0, []
    for match in _BLOCK.finditer(text):
        kind, body = match.groups()
        if kind == "python":
            exec(compile(body, str(DOC), "exec"), namespace)
            continue
        actual = _play(body, tmp_path, status)
        if _CLOCK.sub("<time>", actual) != _CLOCK.sub("<time>", body):
            stale.append((body, actual))
        rebuilt += [text[pos : match.start(2)], actual]
        pos = match.end(2)
    rebuilt.append(text[pos:])
    if os.environ.get("STATEKEEP_UPDATE_DOCS") == "1":
        DOC.write_text("".join(rebuilt))
        return
    for shown, printed in stale:
        assert printed == shown, f"{DOC.name} is stale (STATEKEEP_UPDATE_DOCS=1 rewrites it)"
    assert status.count(0) < len(status), "the session shows no failing command"


class TestRemote:
    """`statekeep ls` and `verify` over snapshots published to a remote (a directory here)."""

    @pytest.fixture
    def remote_url(self, tmp_path: Path) -> str:
        url = f"file://{tmp_path / 'remote'}"
        store = statekeep.StateStore(tmp_path / "states", durable=False, remote=url)
        store.register("model", Blob(2000))
        store.register("optim", Blob(100))
        for i in (1, 2):
            store.state_name_format = f"step-{i}.state"
            store.save_state()  # committed locally, then published
        return url

    def test_ls(self, remote_url: str) -> None:
        done = run("ls", remote_url, "--json")
        assert done.returncode == 0, done.stderr
        states = json.loads(done.stdout)["states"]
        assert [s["name"] for s in states] == ["step-1.state", "step-2.state"]
        assert {s["location"] for s in states} == {"remote"}
        assert states[0]["path"] == f"{remote_url}/step-1.state"
        assert states[0]["size_bytes"] == 2100

    def test_verify_reads_every_remote_file(self, remote_url: str) -> None:
        done = run("verify", remote_url)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "2 states checked, 0 damaged" in done.stdout
        root = Path(remote_url[len("file://") :])
        (model,) = root.glob("data/step-2.state/*/model")
        flip_bit(model)
        done = run("verify", remote_url, "--json")
        assert done.returncode == 1
        bad = [s for s in json.loads(done.stdout)["states"] if s["status"] == "damaged"]
        assert [s["name"] for s in bad] == ["step-2.state"]
        assert "model has CRC-32" in bad[0]["problem"]
        model.write_bytes(model.read_bytes()[:-1])
        done = run("ls", remote_url, "--verify")
        assert done.returncode == 1
        assert "model is 1999 bytes, manifest says 2000" in done.stderr

    def test_show(self, remote_url: str, tmp_path: Path) -> None:
        remote = run("show", f"{remote_url}/step-1.state", "--json")
        assert remote.returncode == 0, remote.stderr
        local = run("show", tmp_path / "states" / "step-1.state", "--json")
        mine, theirs = json.loads(remote.stdout), json.loads(local.stdout)
        assert mine["files"] == theirs["files"]
        assert mine["sequence"] == theirs["sequence"]
        usage_error(run("show", f"{remote_url}/step-9.state"), "no such state")
        manifest = Path(remote_url[len("file://") :]) / "states" / "step-2.state"
        manifest.write_bytes(manifest.read_bytes()[:-3])
        done = run("show", f"{remote_url}/step-2.state")
        assert done.returncode == 1
        assert "malformed" in done.stderr or "checksum" in done.stderr

    def test_bad_urls(self, tmp_path: Path) -> None:
        usage_error(run("ls", "gopher://x/y"), "gopher")


class TestRemoteCheckpoints:
    """`statekeep checkpoints` over S3 and PostgreSQL, against real servers on 127.0.0.1."""

    def test_s3(self, s3_server: Any, s3_bucket: str) -> None:
        server = s3_server
        url = f"s3://{s3_bucket}/ck"
        storage = statekeep.S3CheckpointStorage(url, client=server.client())
        storage.save("alpha", {"row": 41}, metadata={"owner": "etl"})
        storage.save("beta", {"row": 7})
        env = server.env()
        done = run("checkpoints", "ls", url, "--json", "--verify", env=env)
        assert done.returncode == 0, done.stderr
        body = json.loads(done.stdout)
        assert [c["session_id"] for c in body["checkpoints"]] == ["alpha", "beta"]
        assert body["checkpoints"][0]["metadata"] == {"owner": "etl"}
        shown = run("checkpoints", "show", url, "alpha", "--json", env=env)
        assert json.loads(shown.stdout)["data"] == {"row": 41}
        assert run("checkpoints", "rm", url, "beta", env=env).returncode == 0
        assert [i.session_id for i in storage.list_checkpoints()] == ["alpha"]

    def test_postgres(self, postgres_db: str) -> None:
        conninfo = postgres_db
        storage = statekeep.PostgresCheckpointStorage(conninfo)
        storage.save("alpha", {"row": 41})
        storage.close()
        fields = dict(part.split("=", 1) for part in conninfo.split())
        url = f"postgresql://{fields['user']}@{fields['host']}:{fields['port']}/{fields['dbname']}"
        for target in (url, conninfo):
            done = run("checkpoints", "ls", target, "--json")
            assert done.returncode == 0, done.stderr
            assert [c["session_id"] for c in json.loads(done.stdout)["checkpoints"]] == ["alpha"]

    def test_server_down_is_a_usage_error(self) -> None:
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        done = run("checkpoints", "ls", f"postgresql://nobody@127.0.0.1:{port}/x")
        usage_error(done, f"127.0.0.1:{port}/x")
