"""nox sessions: ``nox -l`` lists them. torch is pinned to the local CPU build first."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True
TORCH = "torch==2.13.0"
LOWEST_TORCH = "torch==2.7.1"  # keep in step with pyproject's torch>=2.7


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite (asyncio and uvloop per async test, a trio smoke test, 2-rank runs)."""
    session.install(TORCH)
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff, including its flake8-async (ASYNC) rules."""
    session.install("ruff")
    session.run("ruff", "check", "aiodcp", "tests", "examples")
    session.run("ruff", "format", "--check", "aiodcp", "tests", "examples")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict and pyright on the package."""
    session.install(TORCH)
    session.install("-e", ".[dev]", "pyright")
    session.run("mypy")
    session.run("pyright", "aiodcp")


@nox.session
def examples(session: nox.Session) -> None:
    """Run every example at a small size."""
    session.install(TORCH)
    session.install("-e", ".[test]")
    session.run(
        "python", "-m", "pytest", "-q", "tests/test_examples_cli.py", "tests/test_notebook.py"
    )


@nox.session
def mutants(session: nox.Session) -> None:
    """Break a copy of aiodcp with each named mutant; its targeted tests must fail."""
    session.install(TORCH)
    session.install("-e", ".[test]")
    session.run("python", "scripts/mutants.py", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """The side-by-side benchmark against DCP (see README)."""
    session.install(TORCH)
    session.install("-e", ".")
    session.run("python", "-m", "aiodcp", "bench", *session.posargs)


@nox.session
def smoke(session: nox.Session) -> None:
    """The built wheel in a fresh venv with its declared dependencies only (no numpy)."""
    session.run("bash", "scripts/smoke_install.sh", TORCH, external=True)


@nox.session
def lowest(session: nox.Session) -> None:
    """The same smoke on the lowest torch aiodcp declares (a CUDA wheel set from PyPI)."""
    session.run("bash", "scripts/smoke_install.sh", LOWEST_TORCH, external=True)
