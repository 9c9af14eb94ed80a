"""The gradients of the spatial and structural ops (cnnc/train/rules.py) against central
finite differences in float64 (tests/gradcheck.py), on small random shapes covering
padding on each side, stride larger than the kernel, dilation, groups, ceil mode, 1-D,
and batch 1 and more; the new gradient ops in onnxruntime against the interpreter; and
max pooling's choice among equal maxima."""

from __future__ import annotations

import numpy as np
import pytest

from cnnc import weights
from cnnc.backends.interpreter import Interpreter
from cnnc.backends.onnx_export import to_onnx
from cnnc.frontend.lower import lower
from cnnc.frontend.parser import parse
from cnnc.train.autodiff import backward
from tests.gradcheck import GradientMismatch, check
from tests.helpers import assert_agree, ort_session

# name: (network, batch). Each network's output is the op under test (after a layer with
# weights where the op's input should vary with more than x).
CASES: dict[str, tuple[str, int]] = {
    # conv: the rule of main, checked here on its edge cases
    "conv pads on each side, stride 2": (
        "t(x: 3x7x8) { conv(4, 3, pad=(0, 1, 2, 1), stride=2) }",
        1,
    ),
    "conv stride 3 > kernel 2": ("t(x: 2x8x7) { conv(3, 2, stride=3) }", 3),
    "conv stride (2, 1), kernel (3, 2)": (
        "t(x: 2x7x6) { conv(3, (3, 2), stride=(2, 1), pad=1) }",
        2,
    ),
    "conv dilation 2": ("t(x: 2x9x8) { conv(3, 3, dilation=2, pad=(2, 0, 1, 1)) }", 2),
    "conv groups 2": ("t(x: 4x6x5) { conv(6, 3, groups=2, pad=1) }", 2),
    "conv depthwise": ("t(x: 4x6x5) { conv(4, 3, groups=4, stride=2, pad=(1, 0, 0, 1)) }", 3),
    "conv depthwise x2": ("t(x: 3x5x5) { conv(6, 3, groups=3, bias=false) }", 1),
    "conv no bias": ("t(x: 3x5x6) { conv(4, 3, bias=false, pad=1) }", 2),
    "conv 1-D": ("t(x: 3x11) { conv(4, 3, stride=2, pad=(2, 0), dilation=2) }", 3),
    "conv 1-D stride > kernel, groups": ("t(x: 4x10) { conv(2, 1, stride=3, groups=2) }", 1),
    # conv_transpose
    "conv_transpose stride 2, pads, output_pad, groups": (
        "t(x: 4x3x4) { conv_transpose(6, 3, stride=2, pad=(1, 0, 0, 1), output_pad=1, groups=2) }",
        2,
    ),
    "conv_transpose output_pad > stride (dilation 3)": (
        "t(x: 3x3x4) { conv_transpose(2, 2, dilation=3, output_pad=2) }",
        1,
    ),
    "conv_transpose stride 3 > kernel 2": ("t(x: 2x3x3) { conv_transpose(3, 2, stride=3) }", 3),
    "conv_transpose depthwise": (
        "t(x: 3x4x4) { conv_transpose(3, 3, stride=2, pad=1, groups=3, bias=false) }",
        2,
    ),
    "conv_transpose 1-D": (
        "t(x: 3x5) { conv_transpose(2, 3, stride=2, pad=(1, 0), output_pad=1, bias=false) }",
        2,
    ),
    # maxpool: the rule of main
    "maxpool pads on each side, ceil": (
        "t(x: 2x7x6) { maxpool(3, stride=2, pad=(1, 0, 0, 1), ceil=true) }",
        2,
    ),
    "maxpool dilation 2": ("t(x: 2x8x7) { maxpool(2, stride=1, dilation=2) }", 1),
    "maxpool stride 3 > kernel 2": ("t(x: 2x8x8) { maxpool(2, stride=3) }", 3),
    "maxpool 1-D ceil, pad": ("t(x: 2x9) { maxpool(3, stride=2, pad=(1, 0), ceil=true) }", 2),
    # avgpool
    "avgpool count_include_pad, ceil": (
        "t(x: 2x7x6) { avgpool(3, stride=2, pad=1, ceil=true) }",
        2,
    ),
    "avgpool exclude pad, ceil": (
        "t(x: 2x7x6) { avgpool(3, stride=2, pad=(1, 0, 0, 1), ceil=true, "
        "count_include_pad=false) }",
        1,
    ),
    "avgpool stride 3 > kernel 2": ("t(x: 2x8x9) { avgpool(2, stride=3) }", 3),
    "avgpool 1-D": ("t(x: 2x9) { avgpool(4, stride=2, pad=(2, 1), ceil=true) }", 2),
    "avgpool 1-D exclude pad": (
        "t(x: 2x8) { avgpool(3, stride=2, pad=1, count_include_pad=false) }",
        1,
    ),
    # global and adaptive pooling
    "gap": ("t(x: 3x4x5) { gap }", 2),
    "gap 1-D": ("t(x: 3x6) { gap }", 1),
    "global_maxpool": ("t(x: 3x4x5) { global_maxpool }", 2),
    "global_maxpool 1-D": ("t(x: 3x6) { global_maxpool }", 1),
    "adaptive_avgpool overlapping": ("t(x: 2x7x5) { adaptive_avgpool((3, 4)) }", 2),
    "adaptive_avgpool larger": ("t(x: 2x3x4) { adaptive_avgpool((5, 4)) }", 1),
    "adaptive_avgpool 1-D": ("t(x: 2x10) { adaptive_avgpool(4) }", 3),
    "adaptive_maxpool overlapping": ("t(x: 2x7x5) { adaptive_maxpool((3, 4)) }", 2),
    "adaptive_maxpool larger": ("t(x: 2x3x4) { adaptive_maxpool((5, 6)) }", 1),
    "adaptive_maxpool 1-D": ("t(x: 2x10) { adaptive_maxpool(4) }", 3),
    # upsample
    "upsample nearest 2": ("t(x: 2x3x4) { upsample(scale=2) }", 2),
    "upsample nearest 1.5, 2.5": ("t(x: 2x3x4) { upsample(scale=(1.5, 2.5)) }", 1),
    "upsample nearest_exact size": (
        "t(x: 2x4x5) { upsample(size=(6, 3), mode=nearest_exact) }",
        2,
    ),
    "upsample nearest 1-D 1.1": ("t(x: 2x5) { upsample(scale=1.1) }", 1),
    "upsample nearest_exact 1-D": ("t(x: 2x5) { upsample(scale=1.7, mode=nearest_exact) }", 2),
    "upsample bilinear scale": (
        "t(x: 2x3x4) { upsample(scale=(1.5, 2.3), mode=bilinear) }",
        2,
    ),
    "upsample bilinear align_corners": (
        "t(x: 2x3x4) { upsample(size=(5, 7), mode=bilinear, align_corners=true) }",
        1,
    ),
    "upsample bilinear down": ("t(x: 2x5x6) { upsample(size=(3, 4), mode=bilinear) }", 2),
    "upsample linear 1-D": ("t(x: 2x5) { upsample(scale=2.5, mode=linear) }", 3),
    "upsample linear 1-D align_corners": (
        "t(x: 2x5) { upsample(size=8, mode=linear, align_corners=true) }",
        1,
    ),
    # pad, crop, slice, split, concat
    "pad constant per side, negative crops": ("t(x: 2x5x6) { pad((1, -2, 0, 3)) }", 2),
    "pad constant value": ("t(x: 2x4x4) { pad(2, value=-1.5) }", 1),
    "pad reflect": ("t(x: 2x5x6) { pad((1, 2, 3, 0), reflect) }", 2),
    "pad edge": ("t(x: 2x5x6) { pad((2, 0, 1, 3), edge) }", 1),
    "pad 1-D reflect": ("t(x: 2x7) { pad((3, 1), reflect) }", 2),
    "pad 1-D edge": ("t(x: 2x4) { pad((0, 3), edge) }", 1),
    "pad 1-D constant crop": ("t(x: 2x7) { pad((-2, 1)) }", 3),
    "crop": ("t(x: 3x4x4) { u = x -> upsample(scale=2)\n u -> crop(x, offset=(1, 3)) }", 2),
    "crop 1-D": ("t(x: 3x4) { u = x -> upsample(scale=3)\n u -> crop(x, offset=5) }", 1),
    "slice channels": ("t(x: 5x3x3) { slice(1, -1) }", 2),
    "slice columns": ("t(x: 2x4x5) { slice(-3, 100, axis=3) }", 1),
    "slice 1-D": ("t(x: 2x7) { slice(2, 5, axis=2) }", 3),
    "slice features": ("t(x: 2x3x3) { flatten -> slice(4, 13) }", 2),
    "split all used": ("t(x: 5x3x3) { a, b, c = x -> split((2, 1, 2))\n concat(c, a, b) }", 2),
    "split one unused": ("t(x: 5x3x3) { a, b, c = x -> split((2, 1, 2))\n add(a, c) }", 1),
    "split 1-D": ("t(x: 4x5) { a, b = x -> split(2)\n concat(b, a, b) }", 3),
    "concat": ("t(x: 3x4x4) { a = x -> conv(3, 1)\n b = x -> conv(2, 1)\n concat(a, b, a) }", 2),
    "concat 1-D": ("t(x: 3x6) { a = x -> slice(0, 2)\n concat(x, a) }", 1),
}


def _network(body: str) -> str:
    name, rest = body.split("(", 1)
    return f"network {name}({rest}"


@pytest.mark.parametrize("case", list(CASES))
def test_gradient_agrees_with_central_differences(case):
    source, batch = CASES[case]
    # up to 160 entries of each gradient (most tensors here have fewer), in float64
    count = check(_network(source), batch=batch, seed=1, samples=160, h=1e-6, rtol=1e-5)
    assert count > 0


def test_a_wrong_rule_is_caught():
    """The check fails when a rule is wrong: avgpool's divisor counting the padding where
    the network excludes it (the rule of the other setting)."""
    from cnnc.train import autodiff

    source = _network(CASES["avgpool exclude pad, ceil"][0])
    right = autodiff.GRADIENTS["avgpool"]

    def wrong(g):
        g.node.attrs["count_include_pad"] = True
        try:
            return right(g)
        finally:
            g.node.attrs["count_include_pad"] = False

    autodiff.GRADIENTS["avgpool"] = wrong
    try:
        with pytest.raises(GradientMismatch):
            check(source, batch=1, seed=1, samples=48)
    finally:
        autodiff.GRADIENTS["avgpool"] = right


# ---- the backward graph alone: onnxruntime and ties ----------------------------------------


def backward_graph(body: str, dtype_seed: int = 0):
    """The network ``body`` followed by the nodes of the gradient of its input, given the
    gradient ``dy`` of its output as a second input (float32, weights not differentiated)."""
    graph = lower(parse(_network(body)), None)
    weights.initialize(graph, dtype_seed)
    x, out = graph.inputs[0], graph.outputs[0]
    dy = graph.add_input("dy", out.type)
    grads = backward(graph, list(graph.nodes), {id(out): dy}, [x])
    graph.outputs = [grads[id(x)]]
    return graph


ONNX_CASES = {
    "axis_matmul (upsample bilinear)": "t(x: 3x4x5) { upsample(scale=(1.5, 2), mode=bilinear) }",
    "axis_matmul (upsample 1-D)": "t(x: 3x5) { upsample(scale=2.5, mode=linear) }",
    "axis_matmul (adaptive_avgpool)": "t(x: 3x7x5) { adaptive_avgpool((3, 4)) }",
    "axis_matmul (pad reflect)": "t(x: 3x5x6) { pad((1, 2, 3, 0), reflect) }",
    "axis_matmul (pad 1-D edge)": "t(x: 3x6) { pad((2, 1), edge) }",
    "adaptive_maxpool_grad": "t(x: 3x7x5) { adaptive_maxpool((3, 4)) }",
    "adaptive_maxpool_grad 1-D": "t(x: 3x7) { adaptive_maxpool(9) }",
    "slice_grad": "t(x: 5x3x3) { slice(1, -1) }",
    "slice_grad 1-D": "t(x: 2x7) { slice(2, 5, axis=2) }",
    "avgpool (mul, conv_transpose, pad)": (
        "t(x: 3x7x6) { avgpool(3, stride=2, pad=(1, 0, 0, 1), ceil=true, count_include_pad=false) }"
    ),
    "conv_transpose (conv)": (
        "t(x: 4x3x4) { conv_transpose(6, 3, stride=2, pad=(1, 0, 0, 1), output_pad=1, "
        "dilation=2, groups=2) }"
    ),
    "crop (pad)": "t(x: 3x4x4) { u = x -> upsample(scale=2)\n u -> crop(x, offset=(1, 3)) }",
    "split and concat": "t(x: 5x3x3) { a, b, c = x -> split((2, 1, 2))\n concat(c, a) }",
}


@pytest.mark.parametrize("case", list(ONNX_CASES))
def test_gradient_ops_agree_in_onnxruntime(case):
    graph = backward_graph(ONNX_CASES[case])
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, *graph.inputs[0].shape[1:])).astype(np.float32)
    dy = rng.standard_normal((2, *graph.inputs[1].shape[1:])).astype(np.float32)
    (expected,) = Interpreter(graph, threads=1).run(x, dy)
    (actual,) = ort_session(to_onnx(graph)).run(None, {"x": x, "dy": dy})
    assert np.abs(expected).max() > 0
    assert_agree(actual, expected, case)


def _first_maxima(x: np.ndarray, dy: np.ndarray, windows) -> np.ndarray:
    """The gradient that gives each window's dy to the first of its largest entries (each
    window a list of flat indices into x[n, c], in the order a kernel scans it)."""
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1)
    dx = np.zeros_like(flat)
    for i, window in enumerate(windows):
        for b in range(n):
            for ch in range(c):
                values = flat[b, ch, window]
                dx[b, ch, window[int(np.argmax(values))]] += dy.reshape(n, c, -1)[b, ch, i]
    return dx.reshape(x.shape)


def _pool_windows(size, kernel, stride, pad):
    """The windows (flat indices, padding left out) of a 2-D max pool of ``size`` by a
    square kernel, stride and padding on every side."""
    h, w = size
    out = [(s + 2 * pad - kernel) // stride + 1 for s in size]
    windows = []
    for i in range(out[0]):
        for j in range(out[1]):
            rows = range(i * stride - pad, i * stride - pad + kernel)
            cols = range(j * stride - pad, j * stride - pad + kernel)
            windows.append([r * w + q for r in rows if 0 <= r < h for q in cols if 0 <= q < w])
    return windows


@pytest.mark.parametrize(
    ("body", "kernel", "stride", "pad"),
    [
        ("t(x: 2x4x4) { maxpool(2) }", 2, 2, 0),
        ("t(x: 2x5x5) { maxpool(3, stride=1, pad=1) }", 3, 1, 1),
        ("t(x: 2x6x6) { maxpool(3, stride=2, pad=1) }", 3, 2, 1),
    ],
)
def test_maxpool_gradient_goes_to_the_first_maximum_on_ties(body, kernel, stride, pad):
    """On a constant map every entry of a window is a maximum: the gradient goes to the
    first (row-major) of each window, as PyTorch's (tests/compare_ties_torch.py, outside the
    suite: the same gradient on these maps and on maps with a few tied values)."""
    graph = backward_graph(body)
    rng = np.random.default_rng(0)
    shape = (2, *graph.inputs[0].shape[1:])
    for x in (np.full(shape, 0.5, np.float32), rng.integers(0, 2, shape).astype(np.float32)):
        dy = rng.standard_normal((2, *graph.inputs[1].shape[1:])).astype(np.float32)
        (dx,) = Interpreter(graph, threads=1).run(x, dy)
        windows = _pool_windows(shape[2:], kernel, stride, pad)
        np.testing.assert_allclose(dx, _first_maxima(x, dy, windows), rtol=1e-6, atol=1e-6)


def test_global_and_adaptive_maxpool_gradients_go_to_the_first_maximum_on_ties():
    rng = np.random.default_rng(0)
    for body, size in (
        ("t(x: 2x4x5) { global_maxpool }", (1, 1)),
        ("t(x: 2x5x7) { adaptive_maxpool((3, 4)) }", (3, 4)),
    ):
        graph = backward_graph(body)
        shape = (2, 2, 5 if size != (1, 1) else 4, 7 if size != (1, 1) else 5)
        x = rng.integers(0, 2, shape).astype(np.float32)
        dy = rng.standard_normal((2, 2, *size)).astype(np.float32)
        (dx,) = Interpreter(graph, threads=1).run(x, dy)
        h, w = shape[2:]
        windows = []
        for i in range(size[0]):
            r0, r1 = (i * h) // size[0], -((-(i + 1) * h) // size[0])
            for j in range(size[1]):
                c0, c1 = (j * w) // size[1], -((-(j + 1) * w) // size[1])
                windows.append([r * w + c for r in range(r0, r1) for c in range(c0, c1)])
        np.testing.assert_allclose(dx, _first_maxima(x, dy, windows), rtol=1e-6, atol=1e-6)
        if size != (1, 1):  # (maxpool_grad's ONNX form is another branch's)
            # onnxruntime's ArgMax picks the first maximum too
            (ort_dx,) = ort_session(to_onnx(graph)).run(None, {"x": x, "dy": dy})
            np.testing.assert_allclose(ort_dx, dx, rtol=1e-6, atol=1e-6)


def _maxpool_grad_reference(x: np.ndarray, dy: np.ndarray, k: int) -> np.ndarray:
    """Window by window: each window's gradient to its first largest input (row-major)."""
    dx = np.zeros_like(x)
    n, c, oh, ow = dy.shape
    for b, ch, i, j in np.ndindex(n, c, oh, ow):
        window = x[b, ch, i * k : (i + 1) * k, j * k : (j + 1) * k]
        r, s = np.unravel_index(np.argmax(window), window.shape)
        dx[b, ch, i * k + r, j * k + s] += dy[b, ch, i, j]
    return dx


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 2, 9, 7), (1, 1, 4, 4)])
def test_maxpool_grad_of_windows_that_tile_the_map_goes_to_the_first_maximum(shape):
    """maxpool(2) (kernel = stride, no padding) takes its own path in the kernel: on maps
    full of ties and on leftover rows and columns it gives what a window-by-window loop
    gives."""
    from cnnc.backends.kernels import KERNELS
    from cnnc.ir.graph import Node

    rng = np.random.default_rng(1)
    x = rng.integers(0, 3, shape).astype(np.float64)  # many ties
    attrs = {"kernel": (2, 2), "stride": (2, 2), "pads": (0, 0, 0, 0), "dilation": (1, 1)}
    node = Node("maxpool_grad", "m", [], {**attrs, "ceil": False}, None)
    dy = rng.standard_normal((shape[0], shape[1], shape[2] // 2, shape[3] // 2))
    got = KERNELS["maxpool_grad"](node)(x, dy)
    np.testing.assert_array_equal(got, _maxpool_grad_reference(x, dy, 2))
