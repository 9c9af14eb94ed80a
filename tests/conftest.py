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


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """How many of ONNX's backend tests ran, and how many were refused and why."""
    items = getattr(config, "_onnx_cases", None)
    if not items:
        return
    run, refused, reasons = items
    terminalreporter.write_sep("-", "ONNX backend test suite")
    terminalreporter.write_line(f"{run} cases run, {refused} excluded and checked to be refused:")
    for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"  {count:3d}  {reason}")


def pytest_collection_modifyitems(session, config, items):
    run = refused = 0
    reasons: dict[str, int] = {}
    for item in items:
        name = getattr(item, "originalname", "")
        if name == "test_backend_case_passes":
            run += 1
        elif name == "test_excluded_case_is_refused_with_a_clear_error":
            refused += 1
            reason = item.module.EXCLUDED[item.callspec.params["name"]]
            reasons[reason] = reasons.get(reason, 0) + 1
    if run or refused:
        config._onnx_cases = (run, refused, reasons)
