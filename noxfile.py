"""Developer tasks. `nox` alone runs what CI runs: tests, lint, typing, docs, examples."""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.sessions = ["lint", "typing", "docs", "examples", "tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

ROOT = Path(__file__).parent
PYPROJECT = nox.project.load_toml(ROOT / "pyproject.toml")


def group(name: str) -> list[str]:
    return list(nox.project.dependency_groups(PYPROJECT, name))


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite with coverage (the crash tests run a short campaign here)."""
    session.install("-e", ".", *group("test"))
    session.run("coverage", "erase")
    session.run(
        "pytest",
        "--cov",
        "--cov-report=term",
        *session.posargs,
        env={"COVERAGE_PROCESS_START": str(ROOT / "pyproject.toml")},
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
    session.install("-e", ".", *group("typing"))
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
    session.install("-e", ".", *group("bench"))
    session.run("python", str(ROOT / "bench" / "run.py"), *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: the quickstart demo on the local disk."""
    session.install("-e", ".")
    session.run("python", str(ROOT / "examples" / "quickstart.py"))


if os.environ.get("CI") == "true":
    nox.options.error_on_external_run = True
