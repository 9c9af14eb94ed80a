"""What runs when: dump and summary never draw a weight nor run the network; batch-norm
calibration stays within its bounds; the ONNX file is streamed, one weight at a time, and
is what the whole model would serialize to; the compile benchmark; the cheap verify."""

from __future__ import annotations

import gc
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import EXAMPLES
from onnx import numpy_helper

import cnnc
from cnnc import weights
from cnnc.backends import onnx_export
from cnnc.cli import main
from cnnc.errors import InternalError
from cnnc.ir.verify import verify

BN_NET = """network bnnet(x: 3x16x16) {
    c1: conv(8, 3, pad=1) -> bn -> relu -> maxpool(2)
    c2: conv(8, 3, pad=1) -> bn -> relu
    gap -> fc(4)
}"""


@pytest.fixture
def nothing_runs(monkeypatch):
    """Drawing a weight or calibrating fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a weight was drawn or the network ran")

    monkeypatch.setattr(weights, "draw", refuse)
    monkeypatch.setattr(weights, "pieces", refuse)
    monkeypatch.setattr(weights, "_values", refuse)
    monkeypatch.setattr(weights, "_calibrate", refuse)


@pytest.mark.parametrize(
    "args",
    [
        ["dump"],
        ["dump", "-O0"],
        ["summary"],
        ["summary", "--tensors", "-O2"],
        ["summary", "--fully-conv", "--input-size", "32x32"],
    ],
)
def test_dump_and_summary_never_draw_weights_nor_run_the_network(
    args, nothing_runs, write_program, capsys
):
    path = write_program(BN_NET)
    assert main([args[0], str(path), *args[1:]]) == 0
    out = capsys.readouterr().out
    assert "c2" in out
    if "--tensors" in args:
        assert "c1.running_var" in out or "c2.weight" in out


def test_the_draw_guard_is_real_compiling_draws_and_calibrates(write_program, monkeypatch):
    calls = {"draw": 0, "values": 0, "calibrate": 0}
    draw, values, calibrate = weights.draw, weights._values, weights._calibrate

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(weights, "draw", counted("draw", draw))
    monkeypatch.setattr(weights, "_values", counted("values", values))
    monkeypatch.setattr(weights, "_calibrate", counted("calibrate", calibrate))
    path = write_program(BN_NET)
    assert main(["compile", str(path), "-o", str(path.with_suffix(".onnx"))]) == 0
    # Both bns are measured in one run; each parameter drawn for calibration and export
    # (every random value, of a whole tensor or of a chunk, comes from _values).
    assert calls["calibrate"] == 1
    assert calls["draw"] >= 6
    assert calls["values"] >= calls["draw"]


def test_a_model_computes_statistics_once_when_first_needed():
    model = cnnc.compile(BN_NET, opt_level=0)
    assert model.calibration.runs == 0
    model.dump(), model.summary(), model.tensors(), model.param_count()
    assert model.calibration.runs == 0
    assert all(p._data is None for p in model.graph.params.values())
    model.run(model.random_input(2))
    model.run(model.random_input(2))
    assert model.calibration.runs == 1


def test_statistics_do_not_change_when_passes_fold_the_bns_first():
    # -O2 folds the bns (and rescales the conv weights) before anything is computed.
    folded = cnnc.compile(BN_NET)
    plain = cnnc.compile(BN_NET, opt_level=0)
    assert "bn" not in {n.op for n in folded.graph.nodes}
    x = plain.random_input(3)
    np.testing.assert_allclose(folded.run(x), plain.run(x), rtol=1e-4, atol=1e-5)


def _normalized_stds(model, x) -> list[float]:
    """The std of each bn's input, normalized by the statistics it holds."""
    _, values = model.interpreter.run_all(x)
    stds = []
    for node in model.graph.nodes:
        if node.op == "bn":
            mean, var = (v.data.reshape(1, -1, 1, 1) for v in node.inputs[3:5])
            stds.append(float(((values[node.inputs[0].name] - mean) / np.sqrt(var)).std()))
    return stds


DEEP = """block cbr(c) { in -> conv(c, 3, pad=1) -> bn -> relu }
network deep(x: 8x24x24) { cbr(8) * 30  gap }"""


def test_a_deep_network_keeps_the_scale_of_its_activations():
    model = cnnc.compile(DEEP, opt_level=0)
    assert "batch of 4 items of 8x24x24" in model.calibration.note()
    stds = _normalized_stds(model, model.random_input(4, seed=5))
    assert len(stds) == 30
    assert all(0.8 < s < 1.25 for s in stds), stds


def test_past_its_bounds_calibration_takes_fewer_items_then_smaller_maps(monkeypatch):
    # 30 layers of 8x24x24 cost 4 * 30 * 24 * 24 * 8 * 72 = 40 MMAC; allow 5.
    monkeypatch.setattr(weights, "CALIBRATION_MAX_MACS", 5_000_000)
    model = cnnc.compile(DEEP, opt_level=0)
    graph, batch, what = model.calibration.plan()
    assert batch == 1
    macs, peak = model.calibration._cost(graph, batch)
    assert macs <= 5_000_000 and peak <= weights.CALIBRATION_MAX_BYTES
    (x,) = graph.inputs
    assert x.shape[1] == 8 and x.shape[2] < 24 and x.shape[2] == x.shape[3]
    assert what in model.calibration.note()
    # Measured on smaller maps, the statistics still normalize what reaches each bn.
    stds = _normalized_stds(model, model.random_input(4, seed=5))
    assert all(0.5 < s < 2 for s in stds), stds


def test_a_huge_input_calibrates_within_bounds_and_only_upstream_of_the_bns():
    model = cnnc.compile(
        "network n(x: 3x100000x100000) { conv(8, 3) -> bn -> relu -> conv(4, 3) }", opt_level=0
    )
    graph, batch, what = model.calibration.plan()
    assert batch == 1 and [n.op for n in graph.nodes] == ["conv", "bn"]
    macs, peak = model.calibration._cost(graph, batch)
    assert macs <= weights.CALIBRATION_MAX_MACS and peak <= weights.CALIBRATION_MAX_BYTES
    side = graph.inputs[0].shape[2]
    assert 100 < side < 5000 and what == f"a seeded random batch of 1 item of 3x{side}x{side}"


def test_when_no_size_fits_the_statistics_are_pytorch_s_defaults(monkeypatch):
    monkeypatch.setattr(weights, "CALIBRATION_MAX_BYTES", 10)
    model = cnnc.compile(BN_NET, opt_level=0)
    assert model.calibration.plan() is None
    assert "PyTorch's initial mean 0 and variance 1" in model.calibration.note()
    bn = next(n for n in model.graph.nodes if n.op == "bn")
    np.testing.assert_array_equal(bn.inputs[3].data, np.zeros(8, np.float32))
    np.testing.assert_array_equal(bn.inputs[4].data, np.ones(8, np.float32))
    assert model.calibration.runs == 0


def test_a_layer_fixed_to_its_size_keeps_the_declared_size(monkeypatch):
    # An fc over the flattened map fixes it, and a bn comes after it: no smaller map fits.
    monkeypatch.setattr(weights, "CALIBRATION_MAX_MACS", 1000)
    model = cnnc.compile(
        "network n(x: 2x8x8) { conv(4, 3, pad=1) -> fc(6) -> bn -> relu }", opt_level=0
    )
    assert model.calibration.plan() is None


def test_the_compile_notice_says_how_statistics_are_measured(write_program, capsys):
    path = write_program(BN_NET)
    assert main(["compile", str(path), "-o", str(path.with_suffix(".onnx"))]) == 0
    err = capsys.readouterr().err
    assert "batch-norm statistics measured on a seeded random batch of 4 items of 3x16x16" in err


# ---- the streamed ONNX file ----------------------------------------------------------------


@pytest.mark.parametrize("example", ["lenet5", "cifar_bn", "mobilenet_v3_small"])
def test_the_streamed_file_is_the_serialized_model(example, tmp_path):
    model = cnnc.compile(EXAMPLES / f"{example}.cnn")
    path = tmp_path / "m.onnx"
    assert model.write_onnx(path) == [path]
    whole = onnx_export.to_onnx(model.graph)
    assert path.read_bytes() == whole.SerializeToString()
    onnx.checker.check_model(str(path), full_check=True)
    # The initializers are the parameters, in order, then the exporter's constants.
    names = [t.name for t in onnx.load(str(path)).graph.initializer]
    assert names[: len(model.graph.params)] == list(model.graph.params)
    assert [p.name for p in model.graph.params.values() if p._data is not None] != list(
        model.graph.params
    )  # the export did not keep every weight


@pytest.mark.parametrize("external", [False, True])
def test_big_tensors_are_written_in_chunks_drawn_on_threads(external, monkeypatch, tmp_path):
    monkeypatch.setattr(weights, "CHUNK", 1000)
    monkeypatch.setattr(onnx_export, "PARALLEL_BYTES", 1000)
    monkeypatch.setattr(weights, "DRAW_THREADS", 2)
    monkeypatch.setattr(weights, "_POOL", None)
    program = "network n(x: 4x8x8) { c: conv(8, 3) -> relu  f: fc(300) -> relu  g: fc(10) }"
    model = cnnc.compile(program)
    # fc-to-conv reshapes f.weight (300 x 288, 87 chunks); its chunks still reach the file.
    assert model.graph.params["f.weight"].shape == (300, 8, 6, 6)
    assert len(model.graph.params["f.weight"].data_pieces()) == 87
    path = tmp_path / "m.onnx"
    onnx_export.export(model.graph, path, external_threshold=1000 if external else 2**40)
    assert (tmp_path / "m.onnx.data").exists() == external
    written = {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
    for name, param in model.graph.params.items():  # .data draws each tensor whole
        np.testing.assert_array_equal(written[name], param.data)
    if not external:
        assert path.read_bytes() == onnx_export.to_onnx(model.graph).SerializeToString()


def test_trained_weights_are_written_as_loaded(tmp_path):
    program = "network small(x: 2x8x8) { c1: conv(4, 3, pad=1) -> relu -> maxpool(2)  f1: fc(3) }"
    rng = np.random.default_rng(1)
    shapes = {"c1.weight": (4, 2, 3, 3), "c1.bias": (4,), "f1.weight": (3, 64), "f1.bias": (3,)}
    tensors = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    np.savez(tmp_path / "w.npz", **tensors)
    model = cnnc.compile(program, weights=tmp_path / "w.npz", opt_level=0)
    model.write_onnx(tmp_path / "m.onnx")
    written = {
        t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "m.onnx").graph.initializer
    }
    for name, array in tensors.items():
        np.testing.assert_array_equal(written[name], array)


def test_an_imported_model_writes_back_the_same_bytes(tmp_path):
    cnnc.compile(EXAMPLES / "lenet5.cnn").to_onnx(tmp_path / "a.onnx")
    imported = cnnc.load(tmp_path / "a.onnx", opt_level=0)
    imported.write_onnx(tmp_path / "b.onnx")
    assert (tmp_path / "b.onnx").read_bytes() == (
        onnx_export.to_onnx(imported.graph).SerializeToString()
    )


def test_streamed_external_data_runs_in_onnxruntime(tmp_path):
    model = cnnc.compile(EXAMPLES / "lenet5.cnn")
    path = tmp_path / "big.onnx"
    written = onnx_export.export(model.graph, path, external_threshold=1000)
    assert written == [path, tmp_path / "big.onnx.data"]
    assert path.stat().st_size < 20_000 < written[1].stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    onnx.checker.check_model(str(path), full_check=True)
    x = model.random_input(2)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"image": x})[0], model.run(x), rtol=1e-4)


def test_compiling_leaves_the_cycle_collector_as_it_found_it(tmp_path):
    assert gc.isenabled()
    cnnc.compile(BN_NET).write_onnx(tmp_path / "m.onnx")
    assert gc.isenabled()
    gc.disable()
    try:
        cnnc.compile(BN_NET)
        assert not gc.isenabled()
    finally:
        gc.enable()


# ---- verify, cheaply -------------------------------------------------------------------------


def test_verify_still_sees_an_attribute_changed_in_place():
    model = cnnc.compile(BN_NET, opt_level=0)
    verify(model.graph)
    conv = model.graph.nodes[0]
    conv.attrs["stride"] = (2, 2)
    with pytest.raises(InternalError, match="c1 \\(conv\\) has output types"):
        verify(model.graph)


def test_verify_still_sees_a_type_changed_in_place():
    model = cnnc.compile(BN_NET, opt_level=0)
    verify(model.graph)
    relu = next(n for n in model.graph.nodes if n.op == "relu")
    relu.output.type = relu.output.type.with_shape((relu.output.shape[0], 9, 16, 16))
    with pytest.raises(InternalError, match="has output types"):
        verify(model.graph)


# ---- the compile benchmark -----------------------------------------------------------------


def test_bench_compile_measures_cnnc_and_the_numpy_floor(write_program, capsys):
    path = write_program("network tiny(x: 1x8x8) { conv(4, 3) -> relu -> gap -> fc(3) }")
    assert main(["bench", str(path), "--compile", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"] == 4 * 9 + 4 + 3 * 4 + 3
    assert report["param_bytes"] == 4 * report["parameters"]
    assert report["file_bytes"] > report["param_bytes"]
    assert len(report["compile_s"]) == len(report["floor_s"]) == 1
    assert report["compile_peak_bytes"] > report["baseline_peak_bytes"] > 0
    assert report["time_over_floor"] == pytest.approx(report["compile_s"][0] / report["floor_s"][0])
    # No torchvision model is called tiny (or torch is missing): the reason is stated.
    assert report["torch"] is None and report["torch_skipped"]


def test_bench_scale_compiles_its_generated_networks():
    from cnnc.bench import bench_scale, render_scale, scale_programs

    programs = scale_programs((2, 3, 4, 1))
    assert [name for name, _ in programs] == [
        "2 convs (* 2)",
        "3 convs (* 3)",
        "4-line written-out relu chain",
        "1 residual blocks (* 1)",
    ]
    counts = [len(cnnc.compile(text, opt_level=0).graph.nodes) for _, text in programs]
    assert counts == [2, 3, 4, 4]
    rows = bench_scale(programs[3:])  # one program in a child process: the rest is the same
    assert [(name, nodes) for name, nodes, _, _ in rows] == [("1 residual blocks (* 1)", 4)]
    assert all(seconds > 0 and peak > 0 for _, _, seconds, peak in rows)
    assert "residual blocks" in render_scale(rows)


def test_bench_scale_takes_no_model(capsys):
    assert main(["bench", str(EXAMPLES / "lenet5.cnn"), "--scale"]) == 1
    assert "give no MODEL" in capsys.readouterr().err
