"""The package as users get it: a wheel that carries its grammar, and a lint-clean tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest
from conftest import EXAMPLES, ROOT


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (path,) = out.glob("cnnc-*.whl")
    return path


def test_the_wheel_carries_the_grammar_inside_the_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "cnnc/grammar/cnn.lark" in names
    assert "cnnc/cli.py" in names
    assert "cnnc/viz/graph.js" in names  # the folding script that cnnc graph inlines
    # The class names of --labels imagenet|digits.
    assert {"cnnc/viz/labels/imagenet.txt", "cnnc/viz/labels/digits.txt"} <= set(names)


def test_a_non_editable_install_compiles_from_any_directory(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--quiet",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(EXAMPLES / "lenet5.cnn", elsewhere)
    env = {**os.environ, "PYTHONPATH": str(target)}
    script = (
        "import cnnc, sys; assert cnnc.__file__.startswith(sys.argv[1]), cnnc.__file__; "
        "from cnnc.cli import main; sys.exit(main(['compile', 'lenet5.cnn']))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(target)],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert (elsewhere / "lenet5.onnx").stat().st_size > 200_000


def test_ruff_finds_nothing_to_fix():
    ruff = shutil.which("ruff", path=os.path.dirname(sys.executable)) or "ruff"
    check = subprocess.run(
        [ruff, "check", "cnnc", "tests"], cwd=ROOT, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout
    fmt = subprocess.run(
        [ruff, "format", "--check", "cnnc", "tests"], cwd=ROOT, capture_output=True, text=True
    )
    assert fmt.returncode == 0, fmt.stdout


def readme_command(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    block = text.split(f"<!-- {marker} -->\n```sh\n", 1)[1]
    return block.split("\n```", 1)[0]


def test_ci_runs_the_readme_test_command_in_a_fresh_virtualenv():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-1] == readme_command("test-command")
    assert "rm -rf .venv" in ci
    assert " -e " not in ci[-1]


def test_every_layer_is_documented_in_the_readme_with_its_signature():
    from cnnc.ops import all_layers

    text = (ROOT / "README.md").read_text()
    for layer in all_layers().values():
        assert f"| `{layer.keyword}` | `{layer.signature}` |" in text


def test_the_readme_shows_the_golden_O2_dump_of_lenet5():
    text = (ROOT / "README.md").read_text()
    golden = (ROOT / "tests" / "golden" / "lenet5.O2.dump").read_text()
    block = text.split("LeNet-5 at `-O2` (`tests/golden/lenet5.O2.dump`):\n\n```\n", 1)[1]
    assert block.split("```", 1)[0] == golden
