"""Finding the peers: pamiq-core under a Python >= 3.12, ondine, diskcache, sqlitedict."""

from __future__ import annotations

import glob
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from _harness import Case

HERE = Path(__file__).resolve().parent
PEER_VENVS = HERE.parent / ".nox"  # git-ignored; reused between runs


def _is_312(exe: str) -> bool:
    try:
        done = subprocess.run(
            [exe, "-c", "import sys; print(sys.version_info >= (3, 12))"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except OSError:
        return False
    return done.returncode == 0 and done.stdout.strip() == "True"


def find_python312() -> str | None:
    """A working interpreter >= 3.12: this one, one on PATH, or one pyenv installed."""
    candidates = [sys.executable] if sys.version_info >= (3, 12) else []
    for name in ("python3.13", "python3.12", "python3.14"):
        found = shutil.which(name)
        if found:
            candidates.append(found)  # may be a pyenv shim that refuses to run: tried below
    pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates += sorted(glob.glob(f"{pyenv_root}/versions/3.1[2-9]*/bin/python3"), reverse=True)
    return next((exe for exe in candidates if _is_312(exe)), None)


PAMIQ_VERSION = "0.4.0"  # the version whose state_persistence statekeep is compatible with
_CHECK_PAMIQ = (
    "import importlib.metadata, pamiq_core.state_persistence;"
    f" assert importlib.metadata.version('pamiq-core') == {PAMIQ_VERSION!r}"
)


def pamiq_python() -> tuple[str | None, str]:
    """An interpreter with pamiq-core 0.4.0 (installed into a bench venv if need be), or why not."""
    exe = find_python312()
    if exe is None:
        return None, "no Python >= 3.12 found (pamiq-core requires it)"
    check = [exe, "-c", _CHECK_PAMIQ]
    if subprocess.run(check, capture_output=True, check=False).returncode == 0:
        return exe, exe
    venv = PEER_VENVS / "bench-pamiq-core"
    py = venv / "bin" / "python"
    if not py.exists() or not _is_312(str(py)):
        made = subprocess.run(
            [exe, "-m", "venv", "--clear", str(venv)], capture_output=True, text=True, check=False
        )
        if made.returncode:
            return None, f"could not create a venv with {exe}: {made.stderr.strip()[-200:]}"
    check[0] = str(py)
    if subprocess.run(check, capture_output=True, check=False).returncode:
        print(f"installing pamiq-core {PAMIQ_VERSION} into {venv} ...", file=sys.stderr)
        inst = subprocess.run(
            [str(py), "-m", "pip", "install", "-q", f"pamiq-core=={PAMIQ_VERSION}"],
            capture_output=True,
            text=True,
            check=False,
        )
        if inst.returncode:
            return (
                None,
                f"pip install pamiq-core=={PAMIQ_VERSION} failed: {inst.stderr.strip()[-300:]}",
            )
    return str(py), f"{py} ({exe}), pamiq-core {PAMIQ_VERSION}"


class PamiqWorker:
    """The pamiq-core cases, run one sample at a time in a subprocess."""

    def __init__(self, python: str, tmp: Path, repeat: int) -> None:
        self.proc = subprocess.Popen(
            [python, str(HERE / "_pamiq_worker.py"), str(tmp), str(repeat)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            self.close()
            raise RuntimeError("pamiq-core worker failed to start")

    def sample(self, key: str) -> float:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(key + "\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def case(self, key: str, label: str, **kw: object) -> Case:
        return Case(key, label, lambda: self.sample(key), **kw)  # type: ignore[arg-type]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def import_peer(module: str) -> tuple[object | None, str]:
    """Import a peer module, or say why it cannot be (its import error, shortened)."""
    try:
        return importlib.import_module(module), ""
    except Exception as exc:  # any import-time failure means "skipped", with the reason
        return None, f"{type(exc).__name__}: {exc}"
