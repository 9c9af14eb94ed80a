"""`cnnc bench --train`: one training step timed in each backend, in processes of their own
(README, "Speed of training"). Times are never asserted; what the rows say is."""

from __future__ import annotations

import importlib.util
import json

from conftest import run_cnnc


def test_bench_train_runs_the_same_step_in_every_backend():
    proc = run_cnnc(
        "bench",
        "examples/lenet5.cnn",
        "--train",
        "--batch",
        "4",
        "--repeat",
        "1",
        "--rounds",
        "1",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    rows = {row["backend"]: row for row in report["rows"]}
    assert set(rows) == {"numpy", "onnxruntime", "torch"}
    assert report["batch"] == 4
    numpy, ort = rows["numpy"], rows["onnxruntime"]
    # the same weights, batch and labels: the first step's loss is the same number
    assert abs(numpy["first_loss"] - ort["first_loss"]) <= 1e-5 * abs(numpy["first_loss"])
    for row in (numpy, ort):
        assert row["ms_per_step"] > 0
        assert row["peak_bytes"] >= row["setup_bytes"] > 0
    if importlib.util.find_spec("torch") is None:
        assert rows["torch"]["note"] == "not installed"
        assert report["ratio_to_torch"] == {"numpy": None, "onnxruntime": None}
    else:
        assert abs(rows["torch"]["first_loss"] - numpy["first_loss"]) <= 1e-4


def test_bench_train_refuses_an_onnx_model(tmp_path):
    model = tmp_path / "m.onnx"
    assert run_cnnc("compile", "examples/lenet5.cnn", "-o", model).returncode == 0
    proc = run_cnnc("bench", model, "--train")
    assert proc.returncode == 1
    assert "--train times the training step of a program (.cnn)" in proc.stderr
    assert "Traceback" not in proc.stderr
