"""The code passes ruff and mypy as configured in pyproject.toml (so ``./dev test`` and CI run them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent  # the environment's ruff and mypy, installed with the dev group


def run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_finds_nothing():
    result = run(str(BIN / "ruff"), "check", "--no-cache", ".")
    assert result.returncode == 0, f"ruff check . (uv run ruff check --fix fixes some):\n{result.stdout}{result.stderr}"


@pytest.mark.timeout(600)
def test_mypy_finds_nothing():
    result = run(str(BIN / "mypy"))
    assert result.returncode == 0, f"mypy ([tool.mypy] in pyproject.toml):\n{result.stdout}{result.stderr}"
