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


def test_the_ratio_to_torch_pairs_the_backends_round_by_round():
    """A machine slower in one round slows both backends of that round: the ratio is the
    median of the rounds' own ratios, not one backend's best round over the other's."""
    from cnnc.bench_train import TrainReport, TrainRow

    report = TrainReport("m.cnn", 8, 2, 5, 3)
    for backend, medians in (("onnxruntime", [130, 260, 140]), ("torch", [100, 200, 70])):
        report.rows.append(
            TrainRow(backend, min(medians), 1.0, 2**20, 2**20, round_medians=medians)
        )
    assert report.round_ratios("onnxruntime") == [1.3, 1.3, 2.0]
    assert report.ratio("onnxruntime") == 1.3  # the best rounds' 130 / 70 would say 1.86
    assert report.ratio("numpy") is None
    assert "1.30 (1.30–2.00)" in report.render()
    assert report.to_dict()["round_ratios_to_torch"]["onnxruntime"] == [1.3, 1.3, 2.0]


def test_bench_train_refuses_a_batch_no_backend_could_hold():
    """Refused before any backend's process starts: one message, no child's traceback."""
    proc = run_cnnc("bench", "examples/lenet5.cnn", "--train", "--batch", "100000000")
    assert proc.returncode == 1
    assert "running lenet5 on a batch of 100,000,000 needs about" in proc.stderr
    assert "Traceback" not in proc.stderr and "child" not in proc.stderr
