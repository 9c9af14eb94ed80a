"""The interpreter on graphs a training step is made of: parameters fed as graph inputs at
every run (cnnc.ir.transform.params_to_inputs), float64 copies of a network for
finite-difference checks (cnnc.ir.transform.cast_graph), and inputs and outputs without
a batch axis (a weight, a learning rate, a scalar loss) next to batched ones."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_agree
from test_tables import SAMPLES

import cnnc
from cnnc.backends import kernels
from cnnc.backends.interpreter import Interpreter
from cnnc.errors import InputError, UsageError
from cnnc.ir.graph import Graph
from cnnc.ir.transform import cast_graph, params_to_inputs
from cnnc.ir.types import TensorType
from cnnc.ir.verify import verify


def _close(actual: np.ndarray, expected: np.ndarray, rtol: float, what: str = "") -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, err_msg=what)


def _param_arrays(graph: Graph) -> list[np.ndarray]:
    return [p.data for p in graph.params.values()]


# ---- (a) parameters as graph inputs ----------------------------------------------------------


@pytest.mark.parametrize("opt_level", [0, 2])
@pytest.mark.parametrize("op", sorted(SAMPLES))
def test_params_as_inputs_run_as_the_params_do(op, opt_level):
    model = cnnc.compile(SAMPLES[op], opt_level=opt_level)
    graph = model.graph
    fed = params_to_inputs(graph)
    verify(fed)
    assert [v.name for v in fed.inputs] == [v.name for v in graph.inputs] + list(graph.params)
    assert [v.type for v in fed.inputs[len(graph.inputs) :]] == [
        p.type for p in graph.params.values()
    ]
    assert not fed.params
    xs = model.random_inputs(3, seed=1)
    expected = Interpreter(graph, threads=2).run(*xs)
    actual = Interpreter(fed, threads=2).run(*xs, *_param_arrays(graph))
    for a, e in zip(actual, expected, strict=True):
        _close(a, e, 1e-6, op)


def test_params_to_inputs_takes_the_chosen_params_and_checks_their_arrays():
    graph = cnnc.compile("network n(x: 3x6x6) { conv(4, 3) -> bn -> fc(5) }", opt_level=0).graph
    fed = params_to_inputs(graph, ["conv1.weight", "fc1.bias"])
    # In graph.params order, whatever order the caller names them in.
    assert [v.name for v in fed.inputs] == ["x", "conv1.weight", "fc1.bias"]
    assert "conv1.bias" in fed.params and "conv1.weight" not in fed.params
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
    w, b = graph.params["conv1.weight"].data, graph.params["fc1.bias"].data
    expected = Interpreter(graph).run(x)[0]
    interpreter = Interpreter(fed)
    np.testing.assert_array_equal(interpreter.run(x, w, b)[0], expected)
    # A new weight array gives a new result at once: nothing is cached by the interpreter.
    doubled = interpreter.run(x, 2 * w, b)[0]
    assert not np.allclose(doubled, expected)
    # A parameter input has no batch axis: its first dimension is checked like the rest.
    with pytest.raises(InputError, match=r"conv1.weight expects f32\[4,3,3,3\]") as e:
        interpreter.run(x, w[:2], b)
    assert "(4, 3, 3, 3)" in e.value.hint
    with pytest.raises(InputError, match=r"fc1\.bias"):
        interpreter.run(x, w, b.astype(np.float64))
    with pytest.raises(UsageError, match="no parameter nope"):
        params_to_inputs(graph, ["nope"])


# ---- (b) float64 -----------------------------------------------------------------------------


@pytest.mark.parametrize("op", sorted(SAMPLES))
def test_float64_copy_computes_in_float64(op):
    model = cnnc.compile(SAMPLES[op], opt_level=0)
    wide = cast_graph(model.graph, "f64")
    verify(wide)
    assert all(v.type.dtype == "f64" for v in wide.inputs)
    assert all(p.type.dtype == "f64" for p in wide.params.values())
    assert all(v.type.dtype == "f64" for n in wide.nodes for v in n.outputs)
    xs = model.random_inputs(2, seed=1)
    narrow = Interpreter(model.graph, threads=2).run(*xs)
    xs64 = [x.astype(np.float64) for x in xs]
    outputs = Interpreter(wide, threads=2).run(*xs64)
    for a, e in zip(outputs, narrow, strict=True):
        assert a.dtype == np.float64, op
        assert_agree(a, e.astype(np.float64), op)
    # Float64 all the way through: central differences along a random direction of the
    # inputs and the weights (fed as inputs) agree at steps 1e-4 and 1e-7. A float32 round
    # trip anywhere would swamp the second (float32's resolution is 6e-8).
    fed = Interpreter(params_to_inputs(wide), threads=2)
    point = xs64 + [p.data for p in wide.params.values()]
    rng = np.random.default_rng(2)
    direction = [rng.standard_normal(x.shape) for x in point]

    def derivative(h: float) -> np.ndarray:
        def at(step: float) -> np.ndarray:
            ys = fed.run(*[x + step * d for x, d in zip(point, direction, strict=True)])
            return np.concatenate([y.ravel() for y in ys])

        return (at(h) - at(-h)) / (2 * h)

    coarse, fine = derivative(1e-4), derivative(1e-7)
    assert np.abs(coarse - fine).max() <= 1e-5 * np.abs(coarse).max(), op


def test_cast_graph_refuses_other_types_and_leaves_integers():
    graph = Graph("g")
    x = graph.add_input("x", TensorType("f32", ("N", 3)))
    graph.add_input("labels", TensorType("i64", ("N",)))
    graph.outputs = [graph.add_node("relu", [x], name="r").output]
    wide = cast_graph(graph, "f64")
    assert [str(v.type) for v in wide.inputs] == ["f64[N,3]", "i64[N]"]
    with pytest.raises(UsageError, match="cannot cast a graph to 'f16'"):
        cast_graph(graph, "f16")


# ---- conv, fc and linear against float64 NumPy -----------------------------------------------


def _conv_reference(x, w, b, attrs):
    """Direct convolution in float64: a sum over the kernel taps."""
    rank = w.ndim - 2
    if rank == 1:
        x, w = x[:, :, None], w[:, :, None]
        pads = (0, attrs["pads"][0], 0, attrs["pads"][1])
        stride, dilation = (1, *attrs["stride"]), (1, *attrs["dilation"])
    else:
        pads, stride, dilation = attrs["pads"], attrs["stride"], attrs["dilation"]
    groups = attrs["groups"]
    n, _, h, wd = x.shape
    k, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    oh = (h + pads[0] + pads[2] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd + pads[1] + pads[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    y = np.zeros((n, k, oh, ow))
    kg = k // groups
    for g in range(groups):
        for i in range(kh):
            for j in range(kw):
                rows = slice(i * dilation[0], i * dilation[0] + (oh - 1) * stride[0] + 1, stride[0])
                cols = slice(j * dilation[1], j * dilation[1] + (ow - 1) * stride[1] + 1, stride[1])
                patch = xp[:, g * cg : (g + 1) * cg, rows, cols]
                y[:, g * kg : (g + 1) * kg] += np.einsum(
                    "nchw,kc->nkhw", patch, w[g * kg : (g + 1) * kg, :, i, j]
                )
    if b is not None:
        y += b[:, None, None]
    return y[:, :, 0] if rank == 1 else y


def _conv_transpose_reference(x, w, b, attrs, out_shape):
    """Transposed convolution in float64: every input pixel's taps added where they land."""
    if w.ndim == 3:  # 1-D: as 2-D on a map of height 1
        lifted = {**attrs, "stride": (1, *attrs["stride"]), "dilation": (1, *attrs["dilation"])}
        lifted["pads"] = (0, attrs["pads"][0], 0, attrs["pads"][1])
        y = _conv_transpose_reference(x[:, :, None], w[:, :, None], b, lifted, (1, *out_shape))
        return y[:, :, 0]
    groups, (sh, sw), (dh, dw) = attrs["groups"], attrs["stride"], attrs["dilation"]
    top, left = attrs["pads"][0], attrs["pads"][1]
    n, c, h, wd = x.shape
    _, kg, kh, kw = w.shape
    cg = c // groups
    oh, ow = out_shape
    full = np.zeros(
        (n, groups * kg, top + oh + (kh - 1) * dh + sh * h, left + ow + (kw - 1) * dw + sw * wd)
    )
    for g in range(groups):
        xs = x[:, g * cg : (g + 1) * cg]
        for i in range(kh):
            for j in range(kw):
                taps = w[g * cg : (g + 1) * cg, :, i, j]  # [cg, kg]
                part = np.einsum("nchw,ck->nkhw", xs, taps)
                rows = slice(i * dh, i * dh + (h - 1) * sh + 1, sh)
                cols = slice(j * dw, j * dw + (wd - 1) * sw + 1, sw)
                full[:, g * kg : (g + 1) * kg, rows, cols] += part
    y = full[:, :, top : top + oh, left : left + ow]
    return y + b[:, None, None] if b is not None else y


def _reference(graph: Graph, x: np.ndarray, params: dict[str, np.ndarray]) -> np.ndarray:
    """The float64 NumPy result of a graph of one conv, conv_transpose, fc or linear (an
    fc's input flattened first)."""
    (node,) = [n for n in graph.nodes if n.op != "flatten"]
    w = params[node.inputs[1].name]
    b = params[node.inputs[2].name] if len(node.inputs) > 2 else None
    if node.op == "conv":
        return _conv_reference(x, w, b, node.attrs)
    if node.op == "conv_transpose":
        return _conv_transpose_reference(x, w, b, node.attrs, node.output.shape[2:])
    if node.op == "fc":
        return x.reshape(len(x), -1) @ w.T + (0 if b is None else b)
    moved = np.moveaxis(x, node.attrs["axis"], -1) @ w.T + (0 if b is None else b)
    return np.moveaxis(moved, -1, node.attrs["axis"])


# Each hits one path of the conv kernels (kernels.py): checked below that it does.
LAYERS = {
    "winograd": "network n(x: 128x28x28) { conv(128, 3, pad=1) }",
    "depthwise taps": "network n(x: 8x56x56) { conv(8, 3, pad=1, groups=8) }",
    "depthwise im2col": "network n(x: 8x9x9) { conv(8, 3, stride=2, groups=8) }",
    "grouped": "network n(x: 6x9x9) { conv(4, 3, pad=(1, 0, 2, 1), groups=2) }",
    "1-D": "network n(x: 3x20) { conv(4, 5, stride=2, pad=1) }",
    "dilated": "network n(x: 3x12x12) { conv(5, 3, dilation=2, pad=1) }",
    "wide": "network n(x: 3x10x120) { conv(4, 3) }",
    "pointwise": "network n(x: 6x7x7) { conv(5, 1, bias=false) }",
    "whole map": "network n(x: 3x5x5) { conv(7, 5) }",
    "transpose stride 2": "network n(x: 4x5x5) { conv_transpose(6, 3, stride=2, pad=1, "
    "output_pad=1, groups=2) }",
    "transpose stride 3 dilated": "network n(x: 3x4x6) { conv_transpose(2, 2, stride=3, "
    "dilation=2) }",
    "transpose 1-D": "network n(x: 3x7) { conv_transpose(4, 4, stride=2, pad=1) }",
    "fc": "network n(x: 3x4x4) { fc(5) }",
    "linear channels": "network n(x: 6x5x5) { linear(4) }",
    "linear last": "network n(x: 6x5x5) { linear(3, axis=-1, bias=false) }",
}


def test_the_layers_hit_their_paths():
    def weight(text):
        return cnnc.compile(text, opt_level=0).graph.nodes[0]

    node = weight(LAYERS["winograd"])
    assert kernels._winograd_applies(node, node.inputs[1].data)
    node = weight(LAYERS["depthwise taps"])
    assert kernels._depthwise_applies(node, node.inputs[1].data)
    node = weight(LAYERS["depthwise im2col"])
    assert not kernels._depthwise_applies(node, node.inputs[1].data)


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_float64_and_runtime_weights_against_numpy(layer):
    model = cnnc.compile(LAYERS[layer], opt_level=0)
    graph = model.graph
    rng = np.random.default_rng(5)
    x32 = rng.standard_normal((2, *graph.inputs[0].shape[1:])).astype(np.float32)
    x64 = x32.astype(np.float64)
    params64 = {name: p.data.astype(np.float64) for name, p in graph.params.items()}
    expected = _reference(graph, x64, params64)
    narrow = Interpreter(graph, threads=2).run(x32)[0]
    wide_graph = cast_graph(graph, "f64")
    wide = Interpreter(wide_graph, threads=2).run(x64)[0]
    assert narrow.dtype == np.float32 and wide.dtype == np.float64
    error32 = np.abs(narrow - expected).max()
    error64 = np.abs(wide - expected).max()
    assert error64 < 1e-12 * np.abs(expected).max()
    assert error64 < error32 / 1000, (error64, error32)
    # The weights fed at run time, in float32 and in float64, give the same results.
    fed = Interpreter(params_to_inputs(graph), threads=2)
    _close(fed.run(x32, *_param_arrays(graph))[0], narrow, 1e-6, layer)
    fed64 = Interpreter(params_to_inputs(wide_graph), threads=2)
    _close(fed64.run(x64, *params64.values())[0], wide, 1e-12, layer)


def test_runtime_weights_may_be_computed_by_the_graph():
    """A weight that is another node's output (here relu of a fed weight) reaches the
    kernel at run time too, in the batch shares of two threads."""
    graph = cnnc.compile("network n(x: 3x8x8) { conv(4, 3, pad=1) }", opt_level=0).graph
    fed = params_to_inputs(graph, ["conv1.weight"])
    (conv,) = fed.nodes
    weight = fed.inputs[1]
    rectified = fed.add_node("relu", [weight], name="w_relu", index=0).output
    conv.inputs[1] = rectified
    weight.users.remove(conv)
    rectified.users.append(conv)
    verify(fed)
    x = np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype(np.float32)
    w = graph.params["conv1.weight"].data
    graph.params["conv1.weight"].set_data(np.maximum(w, 0))
    expected = Interpreter(graph, threads=1).run(x)[0]
    _close(Interpreter(fed, threads=2).run(x, w)[0], expected, 1e-6)


# ---- (c) inputs and outputs without a batch axis ---------------------------------------------


def _unbatched_graph(scalar_output: bool) -> tuple[Graph, np.ndarray]:
    """y = x · w for a batched x and a weight w [1, 3, 1, 1] fed as an input, plus a
    learning rate lr (f32[]) and labels (i64[N]); with ``scalar_output``, also lr · lr."""
    graph = Graph("g")
    x = graph.add_input("x", TensorType("f32", ("N", 3, 4, 4)))
    lr = graph.add_input("lr", TensorType("f32", ()))
    graph.add_input("labels", TensorType("i64", ("N",)))
    w = graph.add_param("w", (1, 3, 1, 1))
    data = np.array([0.5, -2.0, 3.0], np.float32).reshape(1, 3, 1, 1)
    w.set_data(data)
    y = graph.add_node("mul", [x, w], name="y").output
    graph.outputs = [y]
    if scalar_output:
        graph.outputs.append(graph.add_node("mul", [lr, lr], name="lr2").output)
    return params_to_inputs(graph), data


@pytest.mark.parametrize("scalar_output", [False, True])
def test_unbatched_inputs_and_outputs_with_two_threads(scalar_output):
    graph, w = _unbatched_graph(scalar_output)
    interpreter = Interpreter(graph, threads=2)
    # Split into shares of the batch only when every value keeps its batch axis.
    assert interpreter._splits_batch(6) is not scalar_output
    x = np.random.default_rng(3).standard_normal((6, 3, 4, 4)).astype(np.float32)
    lr = np.array(0.25, np.float32)
    labels = np.arange(6, dtype=np.int64)
    outputs = interpreter.run(x, lr, labels, w)
    np.testing.assert_array_equal(outputs[0], x * w)
    if scalar_output:
        assert outputs[1].shape == () and outputs[1] == np.float32(0.0625)
    # The Python API's run takes them too.
    for a, e in zip(cnnc.Model(graph).run_all_outputs(x, lr, labels, w), outputs, strict=True):
        np.testing.assert_array_equal(a, e)
    # The weight's first axis (1) is not a batch size that must match x's (6).
    with pytest.raises(InputError, match="labels"):
        interpreter.run(x, lr, labels[:5], w)
    with pytest.raises(InputError, match=r"lr expects f32\[\]"):
        interpreter.run(x, np.array([0.25], np.float32), labels, w)
    with pytest.raises(InputError, match=r"labels expects i64\[N\]"):
        interpreter.run(x, lr, labels.astype(np.int32), w)


def test_a_batch_split_passes_a_fed_weight_whole_to_each_share():
    graph = cnnc.compile("network n(x: 3x6x6) { conv(8, 3) -> relu -> fc(5) }").graph
    fed = params_to_inputs(graph)
    x = np.random.default_rng(4).standard_normal((8, 3, 6, 6)).astype(np.float32)
    interpreter = Interpreter(fed, threads=2)
    assert interpreter._splits_batch(8)
    expected = Interpreter(graph, threads=1).run(x)[0]
    _close(interpreter.run(x, *_param_arrays(graph))[0], expected, 1e-6)


def test_parameters_reach_kernels_that_take_every_input():
    """mul(x, p), add(p, x, p), dropout(p): the parameter's array is passed in its place
    (it used to be left out, and mul(x, p) returned x); an in-place relu after a view of a
    parameter writes a copy, never the parameter's own array."""
    graph = Graph("g")
    x = graph.add_input("x", TensorType("f32", (2, 3)))
    p = graph.add_param("p", (2, 3))
    data = np.array([[2, -3, 4], [-1, 5, 0.5]], np.float32)
    p.set_data(data.copy())
    product = graph.add_node("mul", [x, p], name="product").output
    total = graph.add_node("add", [p, x, p], name="total").output
    view = graph.add_node("dropout", [p], {"ratio": 0.5}, name="view").output
    rectified = graph.add_node("relu", [view], name="rectified").output
    graph.outputs = [product, total, rectified]
    verify(graph)
    xs = np.array([[1, 2, 3], [4, 5, 6]], np.float32)
    for threads in (1, 2):
        product_, total_, rectified_ = Interpreter(graph, threads=threads).run(xs)
        np.testing.assert_array_equal(product_, xs * data)
        np.testing.assert_array_equal(total_, data + xs + data)
        np.testing.assert_array_equal(rectified_, np.maximum(data, 0))
        np.testing.assert_array_equal(p.data, data)


def test_a_graph_of_an_op_that_reads_the_whole_batch_never_runs_in_shares():
    """mse_loss_grad divides by the whole batch's size: run in shares of 4 items it would
    come out twice too large, though every value of the graph has a batch axis."""
    graph = Graph("g")
    pred = graph.add_input("pred", TensorType("f32", ("N", 3)))
    target = graph.add_input("target", TensorType("f32", ("N", 3)))
    graph.outputs = [graph.add_node("mse_loss_grad", [pred, target], name="d").output]
    interpreter = Interpreter(graph, threads=2)
    assert not interpreter._splits_batch(8)
    x, t = np.ones((8, 3), np.float32), np.zeros((8, 3), np.float32)
    np.testing.assert_allclose(interpreter.run(x, t)[0], np.full((8, 3), 2 / 24), rtol=1e-6)
