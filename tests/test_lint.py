"""Lint and type check as part of the unit suite, so a change that breaks either fails here
and not first in review.

Both tools run from the repository root with this interpreter (``python -m``), so they are the
versions installed with the test extras, reading the configuration in ``pyproject.toml``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# what ruff checks: the daemon, the example plugins, the tests and the benchmarks
RUFF_PATHS = ["meshd", "plugins", "tests", "bench"]


def _run_clean(*args: str) -> None:
    """Run ``python -m <args>``; a non-zero exit fails the test with the tool's own output."""
    result = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                            text=True, check=False)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {result.returncode}:\n"
                    f"{result.stdout}{result.stderr}", pytrace=False)


def test_ruff_is_clean() -> None:
    _run_clean("ruff", "check", *RUFF_PATHS)


def test_mypy_is_clean() -> None:
    # what to check (meshd/) and the mypy-zope plugin come from [tool.mypy] in pyproject.toml
    _run_clean("mypy")
