"""Shared fixtures: where the examples are, and how to run the installed ``cnnc`` command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CNNC = Path(sys.executable).parent / "cnnc"


def run_cnnc(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the installed ``cnnc`` console script; returns the finished process."""
    return subprocess.run(
        [str(CNNC), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600
    )


@pytest.fixture
def cnnc_cli():
    return run_cnnc


@pytest.fixture
def write_program(tmp_path):
    """Write program text to a file in a temporary directory; returns its path."""

    def write(text: str, name: str = "model.cnn") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write
