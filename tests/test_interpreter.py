"""The interpreter's fast paths (Winograd, blocked and wide im2col, in-place ops) and plan."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest
from conftest import EXAMPLES, run_cnnc
from helpers import assert_agree, ort_session

import cnnc
import cnnc.backends.kernels as kernels
from cnnc.backends import parallel


def agrees_with_onnxruntime(text: str, batch: int = 2) -> cnnc.Model:
    model = cnnc.compile(text, opt_level=2)
    x = model.random_input(batch, seed=batch)
    expected = ort_session(cnnc.compile(text, opt_level=0).to_onnx()).run(None, {"x": x})[0]
    assert_agree(model.run(x), expected)
    return model


WINOGRAD_CASES = [
    "conv(8, 3, pad=1)",
    "conv(8, 3)",
    "conv(8, 3, pad=(0, 1, 2, 0))",
    "conv(8, 3, pad=1, bias=false) -> relu",
    "conv(8, 3, pad=2) -> sigmoid",
]


@pytest.mark.parametrize("layer", WINOGRAD_CASES)
@pytest.mark.parametrize("size", [6, 7], ids=["even", "odd"])
def test_winograd_convolutions_agree_with_onnxruntime(layer, size, monkeypatch):
    monkeypatch.setattr(kernels, "WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(kernels, "WINOGRAD_MIN_PIXELS", 1)
    monkeypatch.setattr(kernels, "COLUMN_BLOCK_BYTES", 4096)  # several blocks of tile rows
    model = agrees_with_onnxruntime(f"network n(x: 5x{size}x{size}) {{ {layer} }}", batch=3)
    conv = model.graph.nodes[0]
    assert kernels._winograd_applies(conv, conv.inputs[1].data)


def test_winograd_is_chosen_for_wide_maps_with_many_channels():
    model = cnnc.compile("network n(x: 256x28x28) { conv(256, 3, pad=1) }")
    conv = model.graph.nodes[0]
    assert kernels._winograd_applies(conv, conv.inputs[1].data)
    small = cnnc.compile("network n(x: 64x28x28) { conv(64, 3, pad=1) }").graph.nodes[0]
    assert not kernels._winograd_applies(small, small.inputs[1].data)


@pytest.mark.parametrize(
    "layer",
    [
        "conv(8, 3, pad=1)",  # wide layout, few kernels
        "conv(40, 3, pad=1)",  # strided im2col
        "conv(40, 3, stride=2, pad=(1, 0, 0, 1), dilation=2)",
        "conv(40, (1, 3), pad=(0, 1), groups=5)",
        "conv(40, 3, pad=1, bias=false) -> tanh",
    ],
)
def test_im2col_in_many_small_blocks_agrees_with_onnxruntime(layer, monkeypatch):
    monkeypatch.setattr(kernels, "COLUMN_BLOCK_BYTES", 2048)
    agrees_with_onnxruntime(f"network n(x: 5x9x11) {{ {layer} }}", batch=3)


def test_the_wide_layout_is_used_for_wide_maps(monkeypatch):
    monkeypatch.setattr(kernels, "WIDE_MIN_WIDTH", 1)
    agrees_with_onnxruntime(
        "network n(x: 6x9x12) { conv(40, 3, pad=(2, 0, 1, 1), dilation=(1, 2)) }"
    )


def test_an_fc_made_a_conv_and_a_pointwise_conv_take_their_shortcuts():
    agrees_with_onnxruntime("network n(x: 4x5x5) { fc(7) -> relu -> fc(3) }", batch=3)
    agrees_with_onnxruntime("network n(x: 6x5x5) { conv(4, 1, groups=2) -> relu }", batch=3)


@pytest.mark.parametrize(
    "layer",
    [
        "conv(6, 3, stride=2, pad=1, groups=6) -> relu6",
        "conv(6, 3, pad=1, groups=6) -> relu6",
        "conv(6, (3, 2), pad=(2, 0, 1, 1), dilation=(1, 2), groups=6, bias=false)",
        "conv(6, 5, pad=same, groups=6) -> leaky_relu(0.1)",
    ],
)
@pytest.mark.parametrize("taps", [False, True], ids=["im2col", "taps"])
def test_depthwise_convolutions_agree_with_onnxruntime(layer, taps, monkeypatch):
    monkeypatch.setattr(kernels, "DEPTHWISE_TAPS_MIN_PIXELS", 1 if taps else 10**9)
    model = agrees_with_onnxruntime(f"network n(x: 6x9x11) {{ {layer} }}", batch=3)
    conv = model.graph.nodes[0]
    stride_one = conv.attrs["stride"] == (1, 1)
    assert kernels._depthwise_applies(conv, conv.inputs[1].data) == (taps and stride_one)


def test_a_1d_depthwise_convolution_sums_its_taps(monkeypatch):
    monkeypatch.setattr(kernels, "DEPTHWISE_TAPS_MIN_PIXELS", 1)
    agrees_with_onnxruntime("network n(x: 4x17) { conv(4, 3, pad=(2, 1), dilation=2, groups=4) }")


@pytest.fixture
def split_everything(monkeypatch):
    """Every kernel shares its work between the threads, however small; returns the set of
    workers that ran a task."""
    monkeypatch.setattr(parallel, "MIN_PARALLEL_ELEMENTS", 1)
    monkeypatch.setattr(parallel, "MIN_PARALLEL_MACS", 1)
    workers: set[int] = set()
    pool_map = parallel.Pool.map

    def recording_map(self, task, count):
        started: set[int] = set()
        overlap = threading.Condition()

        def recorded(i, worker):
            workers.add(worker)
            with overlap:  # each thread waits until another has a task too: they overlap
                started.add(worker)
                overlap.notify_all()
                if self.threads > 1 and count > 1:
                    overlap.wait_for(lambda: len(started) > 1, timeout=5)
            task(i, worker)

        pool_map(self, recorded, count)

    monkeypatch.setattr(parallel.Pool, "map", recording_map)
    return workers


SPLIT_CASES = [
    ("5x9x11", "conv(8, 3, pad=1) -> relu"),  # wide layout, row blocks
    ("5x9x11", "conv(40, 3, stride=2, pad=(1, 0, 0, 1), dilation=2) -> tanh"),  # strided im2col
    ("5x9x11", "conv(40, (1, 3), pad=(0, 1), groups=5)"),
    ("6x9x9", "conv(130, 3, pad=1, bias=false) -> relu"),  # one block: kernels split
    ("6x9x9", "conv(130, 3, stride=2, pad=1) -> sigmoid"),
    ("6x5x5", "conv(130, 1) -> relu -> conv(7, 1)"),  # pointwise: kernels, then columns
    ("6x9x9", "conv(6, 3, pad=1, groups=6) -> relu6"),  # depthwise
    ("5x7x7", "conv(8, 3, pad=1) -> maxpool(3, stride=2, pad=1) -> avgpool(2, ceil=true)"),
    ("4x5x5", "fc(7) -> relu -> fc(3)"),  # whole-map conv, then a 1×1
    ("3x8", "conv(4, 3, pad=1) -> relu -> flatten -> fc(5)"),
]


@pytest.mark.parametrize(("shape", "layers"), SPLIT_CASES)
@pytest.mark.parametrize("threads", [2, 3])
def test_kernels_split_between_threads_agree_with_onnxruntime(
    shape, layers, threads, split_everything, monkeypatch
):
    monkeypatch.setattr(kernels, "COLUMN_BLOCK_BYTES", 4096)  # several blocks per layer
    text = f"network n(x: {shape}) {{ {layers} }}"
    model = cnnc.compile(text, opt_level=2)
    model.interpreter.threads = threads
    x = model.random_input(2, seed=threads)
    expected = ort_session(cnnc.compile(text, opt_level=0).to_onnx()).run(None, {"x": x})[0]
    assert_agree(model.run(x), expected)
    assert len(split_everything) > 1


@pytest.mark.parametrize("threads", [2, 3])
def test_winograd_tiles_split_between_threads_agree_with_onnxruntime(
    threads, split_everything, monkeypatch
):
    monkeypatch.setattr(kernels, "WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(kernels, "WINOGRAD_MIN_PIXELS", 1)
    monkeypatch.setattr(kernels, "COLUMN_BLOCK_BYTES", 4096)
    text = "network n(x: 5x11x11) { conv(8, 3, pad=1) -> relu -> conv(6, 3) }"
    model = cnnc.compile(text, opt_level=2)
    model.interpreter.threads = threads
    x = model.random_input(3)
    expected = ort_session(cnnc.compile(text, opt_level=0).to_onnx()).run(None, {"x": x})[0]
    assert_agree(model.run(x), expected)
    assert len(split_everything) > 1


def test_an_example_gives_the_same_answer_on_one_thread_and_on_two():
    model = cnnc.compile(EXAMPLES / "resnet18.cnn")
    x = model.random_input(1)
    two = cnnc.compile(EXAMPLES / "resnet18.cnn")
    model.interpreter.threads, two.interpreter.threads = 1, 2
    assert_agree(two.run(x), model.run(x))


def test_small_weight_matrices_multiply_column_chunks(monkeypatch):
    monkeypatch.setattr(kernels, "SMALL_PRODUCT_MACS", 2000)  # chunks of a few columns
    calls = []
    matmul = kernels._matmul

    def recording(weights, x, out):
        calls.append(x.shape[-1] >= 2 * (2000 // (weights.shape[-2] * weights.shape[-1])))
        matmul(weights, x, out)

    monkeypatch.setattr(kernels, "_matmul", recording)
    agrees_with_onnxruntime("network n(x: 3x9x11) { conv(6, 3, pad=1) -> relu }", batch=3)
    agrees_with_onnxruntime("network n(x: 3x9x11) { conv(5, (2, 3), stride=2) -> conv(4, 1) }")
    assert any(calls)


@pytest.mark.parametrize(("batch", "split"), [(4, True), (3, False), (9, True)])
def test_a_batch_runs_in_shares_one_per_thread(batch, split, monkeypatch):
    text = "network n(x: 3x12x12) { conv(6, 3, pad=1) -> relu -> maxpool(2) -> fc(5) }"
    model = cnnc.compile(text)
    model.interpreter.threads = 2
    shares = []
    steps = model.interpreter._steps

    def recording(env, free, timer=None):
        shares.append(next(x.shape[0] for x in env if x is not None))
        steps(env, free, timer)

    monkeypatch.setattr(model.interpreter, "_steps", recording)
    x = model.random_input(batch)
    expected = ort_session(cnnc.compile(text, opt_level=0).to_onnx()).run(None, {"x": x})[0]
    assert_agree(model.run(x), expected)
    assert sorted(shares) == ([batch // 2, batch - batch // 2] if split else [batch])
    shares.clear()
    _, values = model.interpreter.run_all(x)  # keeps every value: one share
    assert shares == [batch] and len(next(iter(values.values()))) == batch


def test_a_task_that_fails_on_another_thread_fails_the_map():
    pool = parallel.Pool(2)
    done = []

    def task(i, worker):
        if i == 5:
            raise ValueError("task 5 failed")
        done.append(i)

    with pytest.raises(ValueError, match="task 5 failed"):
        pool.map(task, 40)
    assert sorted(done) == [i for i in range(40) if i != 5]  # the others all finished


def test_the_interpreter_never_writes_into_the_callers_input():
    model = cnnc.compile("network n(x: 3x8x8) { relu -> bn -> add(x, x) }")
    x = model.random_input(2)
    before = x.copy()
    model.run(x)
    np.testing.assert_array_equal(x, before)


def test_in_place_ops_do_not_overwrite_a_value_still_seen_through_a_view():
    # flatten(y) is a view of y: relu may not run in place on y while that view lives.
    text = """network n(x: 3x4x4) {
        y = conv(2, 1)
        a = y -> flatten
        b = y -> relu -> flatten
        add(a, b)
    }"""
    model = agrees_with_onnxruntime(text)
    steps = {s.node.op: s.in_place for s in model.interpreter.steps}
    assert steps["relu"] is False
    assert steps["add"] is True


def test_run_all_keeps_every_value_intact():
    model = cnnc.compile(EXAMPLES / "resnet18.cnn", opt_level=0)
    x = model.random_input(1)
    outputs, values = model.interpreter.run_all(x)
    np.testing.assert_array_equal(outputs[0], model.run(x))
    add = next(n for n in model.graph.nodes if n.op == "add")
    np.testing.assert_allclose(
        values[add.output.name], values[add.inputs[0].name] + values[add.inputs[1].name], rtol=1e-6
    )


def test_running_a_program_imports_neither_onnx_nor_onnxruntime():
    script = (
        "import sys; from cnnc.cli import main; "
        f"assert main(['run', {str(EXAMPLES / 'lenet5.cnn')!r}]) == 0; "
        "assert 'onnx' not in sys.modules and 'onnxruntime' not in sys.modules, "
        "sorted(m for m in sys.modules if m.startswith('onnx'))"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_bench_reports_every_figure_as_json():
    proc = run_cnnc(
        "bench",
        EXAMPLES / "lenet5.cnn",
        "--batch",
        "4",
        "--repeat",
        "2",
        "--warmup",
        "1",
        "--reference",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report["timings"]) == {"numpy", "onnxruntime", "onnx.reference"}
    for timing in report["timings"].values():
        assert len(timing["runs_s"]) == 2
        assert timing["min_s"] <= timing["median_s"] <= timing["max_s"]
        assert timing["gflops"] > 0
    assert report["agree"] is True
    assert report["macs_per_item"] == 416_530  # the final softmax counts 1 per class
    assert report["interpreter_over_onnxruntime"] > 0
    assert report["peak_bytes"] > 0


def test_bench_profiles_every_node_in_both_backends(tmp_path):
    proc = run_cnnc(
        "bench",
        EXAMPLES / "lenet5.cnn",
        "--repeat",
        "2",
        "--warmup",
        "1",
        "--profile",
        "--json",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    nodes = json.loads(proc.stdout)["nodes"]
    model = cnnc.compile(EXAMPLES / "lenet5.cnn")
    assert sorted(row[0] for row in nodes) == sorted(n.name for n in model.graph.nodes)
    assert [row[2] for row in nodes] == sorted((row[2] for row in nodes), reverse=True)
    ops = {row[0]: row[1] for row in nodes}
    assert ops["c1"] == "conv+relu" and ops["c1.maxpool"] == "maxpool"
    # onnxruntime's profiler times every conv and pool under the name of our node
    timed = {row[0] for row in nodes if row[3] is not None and row[3] > 0}
    assert {"c1", "c2", "c1.maxpool", "c2.maxpool", "f1", "f2", "f3"} <= timed
    assert list(tmp_path.iterdir()) == []  # the profiler's file is gone


def test_bench_prints_the_slowest_nodes():
    proc = run_cnnc("bench", EXAMPLES / "lenet5.cnn", "--repeat", "2", "--profile")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("slowest nodes")))
    assert lines[start + 1].split() == ["interpreter", "onnxruntime", "ratio", "node"]
    assert any(line.endswith(" c1 (conv+relu)") for line in lines[start + 2 :])


def test_bench_prints_a_table_with_the_ratios():
    proc = run_cnnc("bench", EXAMPLES / "tutorial_conv.cnn", "--repeat", "2", "--warmup", "0")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("tutorial_conv (-O2), batch 1, ")
    assert lines[2].startswith("numpy interpreter ") and lines[3].startswith("onnxruntime ")
    assert lines[4].startswith("interpreter / onnxruntime: ")
    assert lines[-1].startswith("outputs agree (rtol 0.0001, atol 1e-05 + 0.0001·max|y|)")
