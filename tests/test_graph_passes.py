"""cse, fuse-transpose-reshape and fuse-pad on small programs and small ONNX models: what
each leaves, what it refuses, and that the outputs stay those of the original (in the
interpreter and in onnxruntime); and the pass report of `cnnc compile --report`."""

from __future__ import annotations

import math
import os

import numpy as np
import onnx
import pytest
from helpers import assert_agree, ort_session
from onnx import TensorProto, helper, numpy_helper

import cnnc
from cnnc.cli import main

RNG = np.random.default_rng(0)
W = RNG.standard_normal((4, 4, 3, 3)).astype(np.float32)
LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend/test/data/light")


def onnx_model(tmp_path, nodes, inits=None, shape=(2, 4, 8, 8), outputs=("y",)):
    """A model of one input x, saved; onnx's shape inference types its outputs."""
    graph = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, list("abcd")) for o in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.output]}
    for out in model.graph.output:
        out.CopyFrom(types[out.name])
    onnx.checker.check_model(model)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    return path


def optimized(path, **kwargs) -> tuple[cnnc.Model, list[str]]:
    """The -O2 model (or the passes given), checked against onnxruntime running the
    original file, in the interpreter and in onnxruntime; and its ops."""
    model = cnnc.load(path, **kwargs)
    x = RNG.standard_normal(model.graph.inputs[0].shape).astype(np.float32)
    original = ort_session(onnx.load(path))
    expected = original.run(None, {"x": x})
    ours = model.run_all_outputs(x)
    theirs = ort_session(model.to_onnx()).run(None, {"x": x})
    for e, a, b in zip(expected, ours, theirs, strict=True):
        assert_agree(a, e, "interpreter")
        assert_agree(b, e, "onnxruntime")
    return model, [n.op for n in model.graph.nodes]


def ops_of(text: str, **kwargs) -> tuple[cnnc.Model, list[str]]:
    """A program compiled at -O2 (or with the passes given), checked against -O0 in the
    interpreter and in onnxruntime; and its ops."""
    model = cnnc.compile(text, **kwargs)
    reference = cnnc.compile(text, opt_level=0, weights=kwargs.get("weights"))
    x = RNG.standard_normal((2, *model.graph.inputs[0].shape[1:])).astype(np.float32)
    expected = reference.run(x)
    assert_agree(model.run(x), expected, "interpreter")
    theirs = ort_session(model.to_onnx()).run(None, {model.input_names[0]: x})[0]
    assert_agree(theirs, expected, "onnxruntime")
    return model, [n.op for n in model.graph.nodes]


# ---- fuse-transpose-reshape -----------------------------------------------------------------


def transposes(first, second):
    return [
        helper.make_node("Transpose", ["x"], ["t"], perm=first),
        helper.make_node("Transpose", ["t"], ["u"], perm=second),
        helper.make_node("Relu", ["u"], ["y"]),
    ]


def test_two_transposes_become_one_of_their_composed_permutation(tmp_path):
    model, ops = optimized(onnx_model(tmp_path, transposes([0, 2, 3, 1], [0, 2, 1, 3])))
    assert ops == ["transpose", "relu"]
    # axis i of the result is axis p[q[i]] of x: (0,2,3,1)[(0,2,1,3)] = (0,3,2,1)
    assert model.graph.nodes[0].attrs["perm"] == (0, 3, 2, 1)


def test_two_transposes_that_cancel_go(tmp_path):
    # A swap of the height and the width, twice (channels-first knows only moves to last).
    _, ops = optimized(onnx_model(tmp_path, transposes([0, 1, 3, 2], [0, 1, 3, 2])))
    assert ops == ["relu"]


def test_a_transpose_that_other_nodes_read_stays(tmp_path):
    nodes = [*transposes([0, 2, 3, 1], [0, 2, 1, 3]), helper.make_node("Sigmoid", ["t"], ["z"])]
    _, ops = optimized(onnx_model(tmp_path, nodes, outputs=("y", "z")))
    assert ops.count("transpose") == 2


def test_a_reshape_round_trip_goes_and_reshapes_in_a_row_become_one(tmp_path):
    shapes = {"s1": np.array([2, 4, 64], np.int64), "s2": np.array([2, 4, 8, 8], np.int64)}
    trip = [
        helper.make_node("Reshape", ["x", "s1"], ["t"]),
        helper.make_node("Reshape", ["t", "s2"], ["u"]),
        helper.make_node("Relu", ["u"], ["y"]),
    ]
    assert optimized(onnx_model(tmp_path, trip, shapes))[1] == ["relu"]
    shapes["s2"] = np.array([2, 16, 16], np.int64)
    model, ops = optimized(onnx_model(tmp_path, trip, shapes))
    assert ops == ["reshape", "relu"]
    assert model.graph.nodes[0].inputs[0] is model.graph.inputs[0]
    assert model.graph.nodes[0].attrs["shape"] == (16, 16)


def test_a_reshape_then_a_flatten_is_one_flatten_and_transposes_of_ones_are_reshapes():
    text = """network n(x: 3x8x8) {
        conv(6, 3) -> gap -> transpose((2, 3, 1)) -> reshape((2, 3)) -> flatten -> sigmoid
    }"""
    _, ops = ops_of(text)
    # gap -> N×6×1×1, the transpose moves only axes of size 1: one flatten is left (which
    # fc-to-conv then moves after the sigmoid).
    assert sorted(ops) == ["conv", "flatten", "gap", "sigmoid"]


def test_a_transpose_of_ones_with_no_reshape_beside_it_stays():
    # Made fully convolutional, the gap's 1×1 would grow and the transpose move values.
    text = "network n(x: 3x8x8) { conv(6, 3) -> gap -> transpose((2, 3, 1)) -> sigmoid }"
    assert ops_of(text)[1] == ["conv", "gap", "transpose", "sigmoid"]


def test_a_channel_shuffle_keeps_its_reshape_transpose_reshape():
    text = """network n(x: 4x3x3) {
        reshape((2, 2, 3, 3)) -> transpose((2, 1, 3, 4)) -> reshape((4, 3, 3)) -> relu
    }"""
    _, ops = ops_of(text)
    assert ops == ["reshape", "transpose", "reshape", "relu"]


# ---- fuse-pad -------------------------------------------------------------------------------


def pad_then(tmp_path, op, amounts, mode="constant", value=None, **attrs):
    """Pad (top, left, bottom, right) then the op."""
    inputs = ["x", "p"] + (["v"] if value is not None else [])
    inits = {"p": np.array([0, 0, *amounts[:2], 0, 0, *amounts[2:]], np.int64), "W": W}
    if value is not None:
        inits["v"] = np.array(value, np.float32)
    after = ["t", "W"] if op == "Conv" else ["t"]
    nodes = [
        helper.make_node("Pad", inputs, ["t"], mode=mode),
        helper.make_node(op, after, ["y"], **attrs),
    ]
    return onnx_model(tmp_path, nodes, inits)


def test_a_zero_pad_before_a_conv_becomes_its_padding_side_by_side(tmp_path):
    model, ops = optimized(pad_then(tmp_path, "Conv", [0, 1, 2, 3], pads=[1, 1, 1, 1]))
    assert ops == ["conv"]
    assert model.graph.nodes[0].attrs["pads"] == (1, 2, 3, 4)


@pytest.mark.parametrize(
    ("op", "attrs", "value"),
    [
        ("AveragePool", {"kernel_shape": [3, 3], "count_include_pad": 0}, None),
        ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2]}, -math.inf),
    ],
    ids=["avgpool", "maxpool"],
)
def test_a_pad_of_the_pools_own_fill_fuses_into_it(tmp_path, op, attrs, value):
    model, ops = optimized(pad_then(tmp_path, op, [1, 2, 2, 1], value=value, **attrs))
    assert ops == [op.lower().replace("averagepool", "avgpool")]
    node = model.graph.nodes[0]
    assert node.attrs["pads"] == (1, 2, 2, 1)
    assert node.op == "maxpool" or node.attrs["count_include_pad"]


@pytest.mark.parametrize(
    ("op", "amounts", "mode", "value", "attrs"),
    [
        ("Conv", [1, 1, 1, 1], "reflect", None, {}),
        ("Conv", [1, 1, 1, 1], "edge", None, {}),
        ("Conv", [1, 1, 1, 1], "constant", 1.0, {}),
        ("Conv", [1, -1, 1, 1], "constant", None, {}),
        ("MaxPool", [1, 1, 1, 1], "constant", None, {"kernel_shape": [3, 3]}),
        ("MaxPool", [1, 1, 1, 1], "constant", -math.inf, {"kernel_shape": [2, 2], "ceil_mode": 1}),
        ("MaxPool", [2, 1, 1, 1], "constant", -math.inf, {"kernel_shape": [2, 2]}),
        (
            "AveragePool",
            [1, 1, 1, 1],
            "constant",
            None,
            {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 0},
        ),
    ],
    ids=[
        "reflect", "edge", "value-1", "crop", "maxpool-zero", "maxpool-ceil",
        "maxpool-pad-reaching-kernel", "avgpool-excluding-its-own-pad",
    ],
)  # fmt: skip
def test_a_pad_that_cannot_fuse_stays(tmp_path, op, amounts, mode, value, attrs):
    _, ops = optimized(pad_then(tmp_path, op, amounts, mode, value, **attrs))
    assert ops[0] == "pad"


def test_a_pad_read_twice_stays():
    text = """network n(x: 3x8x8) {
        p = x -> pad((0, 1, 2, 1))
        a = p -> conv(4, 3)
        b = p -> avgpool(3, stride=1) -> conv(4, 1)
        add(a, b)
    }"""
    _, ops = ops_of(text)
    assert ops.count("pad") == 1


# ---- cse ------------------------------------------------------------------------------------


def two_convs(tmp_path, second):
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "W2"], ["b"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["c"]),
        helper.make_node("Relu", ["b"], ["d"]),
        helper.make_node("Add", ["c", "d"], ["y"]),
    ]
    return onnx_model(tmp_path, nodes, {"W": W, "W2": second})


def test_two_convs_with_identical_weights_and_what_follows_them_become_one(tmp_path):
    model, ops = optimized(two_convs(tmp_path, W.copy()))
    assert ops == ["conv", "add"]  # conv+relu, read twice by the add
    add = model.graph.nodes[1]
    assert add.inputs[0] is add.inputs[1]
    assert len(model.graph.params) == 1


def test_convs_whose_weights_differ_in_one_bit_stay_two(tmp_path):
    other = W.copy()
    other.view(np.uint32)[1, 2, 0, 1] ^= 1
    _, ops = optimized(two_convs(tmp_path, other))
    assert ops == ["conv", "conv", "add"]


def test_random_weights_are_never_equal_and_never_drawn_to_find_out(monkeypatch):
    import cnnc.weights

    drawn = []
    draw = cnnc.weights.draw
    monkeypatch.setattr(
        cnnc.weights, "draw", lambda name, *a, **k: drawn.append(name) or draw(name, *a, **k)
    )
    text = """network n(x: 3x8x8) {
        a = x -> conv(4, 3) -> relu
        b = x -> conv(4, 3) -> relu
        add(a, b)
    }"""
    model = cnnc.compile(text)
    assert [n.op for n in model.graph.nodes] == ["conv", "conv", "add"]
    assert drawn == []
    model.run(model.random_input())  # the weights are drawn when the network runs
    assert len(drawn) == 4


def test_a_program_with_identical_trained_weights_keeps_one_conv(tmp_path):
    text = """network n(x: 3x8x8) {
        a = x -> c1: conv(4, 3, pad=1)
        b = x -> c2: conv(4, 3, pad=1)
        concat(a, b)
    }"""
    w, b = RNG.standard_normal((4, 3, 3, 3)), RNG.standard_normal(4)
    weights = tmp_path / "w.npz"
    np.savez(weights, **{"c1.weight": w, "c1.bias": b, "c2.weight": w, "c2.bias": b})
    _, ops = ops_of(text, weights=weights)
    assert ops == ["conv", "concat"]


def test_cse_leaves_dropouts_and_two_outputs_alone():
    text = """network n(x: 3x4x4) -> (a, b) {
        d = x -> dropout
        e = x -> dropout
        add(d, e)
        a = x -> relu
        b = x -> relu
    }"""
    model = cnnc.compile(text, passes=["cse"])
    assert [n.op for n in model.graph.nodes] == ["dropout", "dropout", "add", "relu", "relu"]


# ---- the pass report --------------------------------------------------------------------------


def test_compile_report_of_shufflenet_says_what_each_pass_did(tmp_path, capsys):
    out = tmp_path / "s.onnx"
    source = os.path.join(LIGHT, "light_shufflenet.onnx")
    assert main(["compile", source, "-o", str(out), "--report"]) == 0
    err = capsys.readouterr().err.splitlines()
    lines = {line.split()[0]: line.split(None, 1)[1] for line in err[1:]}
    assert err[0] == "passes on shufflenet (-O2):"
    assert lines["remove-identity"] == "no change"
    assert lines["fold-bn"].startswith("-49 bn; rewrote 49 conv; parameters 248 -> 296 tensors")
    assert lines["fuse-conv-act"] == "-17 relu; rewrote 17 conv"
    assert lines["total"].startswith("nodes 203 -> 137 (-49 bn; -17 relu; -1 fc; +1 conv)")
    written = onnx.load(out, load_external_data=False)
    sizes = f"{len(written.graph.node)} nodes, {len(written.graph.initializer)} initializers"
    assert f"-> {out} {sizes}" in lines["onnx:"]
    assert lines["onnx:"].startswith(f"{source} 446 nodes, ")


def test_the_report_goes_to_stderr_when_the_model_goes_to_stdout(tmp_path, capfdbinary):
    path = pad_then(tmp_path, "Conv", [0, 1, 2, 3])
    assert main(["compile", str(path), "-o", "-", "--report"]) == 0
    captured = capfdbinary.readouterr()
    model = onnx.load_from_string(captured.out)
    assert [n.op_type for n in model.graph.node] == ["Conv"]
    err = captured.err.decode()
    assert "fuse-pad                -1 pad; rewrote 1 conv" in err
    assert "-> standard output 1 node, 1 initializer (576 B)" in err


def test_the_api_returns_the_report_with_the_model(tmp_path):
    model = cnnc.load(two_convs(tmp_path, W.copy()), report=True)
    changes = {p.name: p for p in model.pass_report.passes}
    assert list(changes) == model.graph.pipeline
    assert dict(changes["cse"].removed) == {"conv": 1}
    assert changes["dce"].params_before.tensors == 2 and changes["dce"].params_after.tensors == 1
    assert cnnc.load(two_convs(tmp_path, W.copy())).pass_report is None
