"""NaN and the infinities: what each op of the interpreter computes with them (README, "NaN
and infinity": PyTorch's semantics where PyTorch and IEEE arithmetic agree, the limits for
the smooth activations), where onnxruntime agrees and where it differs by design, and how
--compare tells a difference of op semantics from a bug."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from conftest import run_cnnc
from helpers import ort_session

import cnnc
from cnnc import cli
from cnnc.backends import kernels
from cnnc.compare import (
    agree,
    first_divergence,
    known_difference,
    max_difference,
    same_nonfinite,
    tolerance,
)

NAN, INF = np.nan, np.inf
LOWEST = np.finfo(np.float32).min


def compile0(layers: str, shape: str) -> cnnc.Model:
    return cnnc.compile(f"network n(x: {shape}) {{ {layers} }}", opt_level=0)


def base(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def onnxruntime(model: cnnc.Model, x: np.ndarray) -> np.ndarray:
    return ort_session(model.to_onnx()).run(None, {"x": x})[0]


# ---- pooling, against windows gathered one by one -----------------------------------------


def windows_2d(x, k, s, pads, ceil=False, dilation=1):
    """For each output (i, j) of one channel map, the input values of its window (padding
    left out) and how many taps fell on padding."""
    h, w = x.shape
    t, left, b, r = pads
    span = dilation * (k - 1) + 1
    rounding = math.ceil if ceil else math.floor
    oh = rounding((h + t + b - span) / s) + 1
    ow = rounding((w + left + r - span) / s) + 1
    if ceil:  # a last window that starts in the trailing padding is dropped
        oh -= (oh - 1) * s >= h + t
        ow -= (ow - 1) * s >= w + left
    out = {}
    for i in range(oh):
        for j in range(ow):
            rows = [i * s - t + dilation * a for a in range(k)]
            cols = [j * s - left + dilation * c for c in range(k)]
            inside = [x[p, q] for p in rows for q in cols if 0 <= p < h and 0 <= q < w]
            out[i, j] = (inside, k * k - len(inside), k * k)
    return out, (oh, ow)


def max_of(values):
    """Max as PyTorch's max pooling: NaN wins."""
    return NAN if any(math.isnan(v) for v in values) else max(values)


def pooled(x, k, s, pads, reduce, ceil=False, dilation=1):
    n, c = x.shape[:2]
    result = None
    for item in range(n):
        for ch in range(c):
            wins, shape = windows_2d(x[item, ch], k, s, pads, ceil, dilation)
            if result is None:
                result = np.empty((n, c, *shape), np.float32)
            for (i, j), window in wins.items():
                result[item, ch, i, j] = reduce(*window)
    return result


def nonfinite_map(shape=(1, 2, 7, 7)) -> np.ndarray:
    """A map with NaN in a corner (on the padding border) and inside, +inf and -inf inside
    and on the border, and a 2×2 corner of nothing but -inf."""
    x = base(shape)
    x[0, 0, 0, 0] = NAN
    x[0, 0, 3, 4] = NAN
    x[0, 1, 2, 2] = INF
    x[0, 1, 6, 6] = INF
    x[0, 0, 5, 1] = -INF
    x[0, 1, 0:2, 5:7] = -INF
    return x


MAXPOOLS = [
    ("maxpool(2)", 2, 2, (0, 0, 0, 0), False, 1),
    ("maxpool(3, stride=2, pad=1)", 3, 2, (1, 1, 1, 1), False, 1),
    ("maxpool(2, ceil=true)", 2, 2, (0, 0, 0, 0), True, 1),
    ("maxpool(3, stride=2, pad=1, ceil=true)", 3, 2, (1, 1, 1, 1), True, 1),
    ("maxpool(2, stride=1, dilation=2)", 2, 1, (0, 0, 0, 0), False, 2),
]


@pytest.mark.parametrize("layer, k, s, pads, ceil, dilation", MAXPOOLS)
def test_max_pooling_propagates_nan_and_padding_never_wins(layer, k, s, pads, ceil, dilation):
    x = nonfinite_map()
    ours = compile0(layer, "2x7x7").run(x)
    expected = pooled(x, k, s, pads, lambda v, pad, n: max_of(v), ceil, dilation)
    np.testing.assert_array_equal(ours, expected)  # NaN where expected's NaN, values exact
    assert np.isnan(ours[0, 0, 0, 0])  # the corner NaN, on the padding border
    if pads[0]:
        # The window of the corner of -inf, the rest of it padding: -inf, not a padding value.
        assert ours[0, 1, 0, -1] == -INF


def test_one_d_max_pooling_propagates_nan_and_keeps_minus_infinity():
    x = np.array([[[NAN, 1, 2, -INF, -INF, 3, 4, INF, 0]]], np.float32)
    ours = compile0("maxpool(3, stride=2, pad=1)", "1x9").run(x)
    # Windows [pad, NaN, 1], [1, 2, -inf], [-inf, -inf, 3], [3, 4, inf], [inf, 0, pad].
    np.testing.assert_array_equal(ours, [[[NAN, 2, 3, INF, INF]]])
    only_minus_inf = np.array([[[-INF, -INF, -INF]]], np.float32)
    np.testing.assert_array_equal(
        compile0("maxpool(2, stride=1, pad=1)", "1x3").run(only_minus_inf), [[[-INF] * 4]]
    )


@pytest.mark.parametrize("include_pad", [True, False])
def test_average_pooling_follows_ieee_sums_window_by_window(include_pad):
    x = nonfinite_map()
    x[0, 1, 4, 4], x[0, 1, 4, 5] = INF, -INF  # one window holds +inf and -inf
    layer = f"avgpool(3, stride=2, pad=1, count_include_pad={str(include_pad).lower()})"
    ours = compile0(layer, "2x7x7").run(x)

    def mean(values, pad, n):
        return (
            math.fsum(values) / (n if include_pad else n - pad)
            if all(math.isfinite(v) for v in values)
            else float(np.sum(np.array(values, np.float64)))
        )

    with np.errstate(invalid="ignore"):
        expected = pooled(x, 3, 2, (1, 1, 1, 1), mean)
    assert same_nonfinite(ours, expected)
    finite = np.isfinite(expected)
    np.testing.assert_allclose(ours[finite], expected[finite], rtol=1e-6, atol=1e-6)
    assert np.isnan(ours[0, 1, 2, 2])  # inf + (-inf)
    assert np.isnan(ours[0, 0, 0, 0]) and ours[0, 1, 1, 1] == INF


def test_global_pools_per_channel():
    x = nonfinite_map()
    gap = compile0("gap", "2x7x7").run(x)
    gmp = compile0("global_maxpool", "2x7x7").run(x)
    assert np.isnan(gap[0, 0, 0, 0]) and np.isnan(gap[0, 1, 0, 0])  # NaN; inf + -inf
    assert np.isnan(gmp[0, 0, 0, 0]) and gmp[0, 1, 0, 0] == INF
    y = base((1, 2, 5, 5))
    y[0, 0, 1, 1] = -INF
    np.testing.assert_array_equal(
        compile0("global_maxpool", "2x5x5").run(y)[:, :, 0, 0], y.max(axis=(2, 3))
    )
    assert compile0("gap", "2x5x5").run(y)[0, 0, 0, 0] == -INF
    assert np.isfinite(compile0("gap", "2x5x5").run(y)[0, 1, 0, 0])


def adaptive_reference(x, size, reduce):
    h, w = x.shape[2:]
    out = np.empty((*x.shape[:2], size, size), np.float32)
    for i in range(size):
        for j in range(size):
            rows = slice(i * h // size, -(-(i + 1) * h // size))
            cols = slice(j * w // size, -(-(j + 1) * w // size))
            out[:, :, i, j] = reduce(x[:, :, rows, cols].astype(np.float64), axis=(2, 3))
    return out


@pytest.mark.parametrize("size", [3, 5, 9])
def test_adaptive_pools_reach_only_the_windows_holding_a_nan_or_inf(size):
    # 7 → 3, 5 or 9: overlapping windows, pooled by a matrix product on finite maps.
    x = nonfinite_map()
    avg = compile0(f"adaptive_avgpool({size})", "2x7x7").run(x)
    mx = compile0(f"adaptive_maxpool({size})", "2x7x7").run(x)
    expected_avg = adaptive_reference(x, size, np.mean)
    expected_max = adaptive_reference(x, size, np.max)  # np.max propagates NaN
    assert same_nonfinite(avg, expected_avg) and same_nonfinite(mx, expected_max)
    assert np.isfinite(avg).sum() > 0  # NaN did not reach every window of its axis
    finite = np.isfinite(expected_avg)
    np.testing.assert_allclose(avg[finite], expected_avg[finite], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(mx, expected_max.astype(np.float32))


# ---- convolutions -----------------------------------------------------------------------


def footprint(model: cnnc.Model, x: np.ndarray, pixel) -> np.ndarray:
    """Outputs that depend on input ``pixel``: those that change when it does (finite)."""
    a, b = x.copy(), x.copy()
    a[pixel], b[pixel] = 0.0, 1.0
    return model.run(a) != model.run(b)


CONVS = [
    ("conv(3, 3, pad=1)", "4x9x9"),  # im2col
    ("conv(3, 3, stride=2, pad=1)", "4x9x9"),
    ("conv(3, 1)", "4x9x9"),  # a pointwise product
    ("conv(8, 3, pad=1, groups=8)", "8x56x56"),  # depthwise taps
    ("conv(128, 3, pad=1)", "128x28x28"),  # Winograd's F(2x2, 3x3)
    ("conv(3, 9)", "4x9x9"),  # a kernel covering the map: one product
    ("conv(3, 3, pad=1)", "4x9"),  # 1-D
    ("conv_transpose(3, 2, stride=2)", "4x6x6"),
    ("conv_transpose(3, 3, stride=2, pad=1, output_pad=1)", "4x6x6"),
    ("conv_transpose(4, 4, stride=2, pad=1, groups=2)", "4x6x6"),
    ("conv_transpose(3, 3, stride=3, dilation=2)", "4x6x6"),
    ("conv_transpose(3, 3, stride=2)", "4x9"),
]


@pytest.mark.parametrize("layer, shape", CONVS)
def test_a_nan_pixel_reaches_exactly_the_outputs_its_taps_reach(layer, shape):
    model = compile0(f"l: {layer}", shape)
    x = base((1, *map(int, shape.split("x"))))
    pixel = (0, 1, 0, 0)[: x.ndim] if x.ndim == 4 else (0, 1, 0)
    inner = (0, 2, 4, 3) if x.ndim == 4 else (0, 2, 4)
    reach = footprint(model, x, pixel) | footprint(model, x, inner)
    y = x.copy()
    y[pixel], y[inner] = NAN, NAN
    ours = model.run(y)
    np.testing.assert_array_equal(np.isnan(ours), reach)
    x0 = x.copy()
    x0[pixel] = x0[inner] = 0.0
    np.testing.assert_allclose(ours[~reach], model.run(x0)[~reach], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer, shape", CONVS)
def test_an_infinite_pixel_gives_infinities_signed_by_the_weights(layer, shape):
    model = compile0(f"l: {layer}", shape)
    x = base((1, *map(int, shape.split("x"))))
    pixel = (0, 1, 2, 3) if x.ndim == 4 else (0, 1, 3)
    x0 = x.copy()
    x0[pixel] = 0.0
    unit = x0.copy()
    unit[pixel] = 1.0
    # The sign each output takes from the pixel: that of its weights' sum at the pixel.
    slope = model.run(unit) - model.run(x0)
    x[pixel] = INF
    ours = model.run(x)
    reach = slope != 0
    assert reach.any()
    np.testing.assert_array_equal(ours[reach], np.sign(slope[reach]) * INF)
    np.testing.assert_allclose(ours[~reach], model.run(x0)[~reach], rtol=1e-5, atol=1e-5)


def test_large_finite_values_that_overflow_in_a_conv_give_inf_not_nan():
    # Winograd's transforms subtract pixels: 3e38 − (−3e38) overflows where the direct sum
    # (3e38·w + small terms) need not; the kernel takes the direct path then.
    model = compile0("l: conv(128, 3, pad=1)", "128x28x28")
    x = base((1, 128, 28, 28))
    x[0, 0, 10, 10], x[0, 0, 10, 11] = 3e38, -3e38
    weight = model.graph.params["l.weight"].data
    ours = model.run(x)
    far = ours[:, :, 20:, 20:]
    assert np.isfinite(far).all()
    # The output above the pair: 3e38·(w[.., 1, 1] - w[.., 1, 2]) overflows or not by itself.
    exact = 3e38 * (weight[:, 0, 1, 1].astype(np.float64) - weight[:, 0, 1, 2])
    overflows = np.abs(exact) > np.finfo(np.float32).max
    centre = ours[0, :, 10, 10]
    np.testing.assert_array_equal(np.isinf(centre), overflows)
    assert not np.isnan(centre).any()
    np.testing.assert_allclose(centre[~overflows], exact[~overflows], rtol=1e-4)


def test_fc_and_linear_keep_each_item_apart():
    x = base((3, 6, 1))
    x[1, 2] = NAN
    x[2, 4] = INF
    fc = compile0("l: fc(4)", "6x1")
    w = fc.graph.params["l.weight"].data
    ours = fc.run(x)
    assert np.isfinite(ours[0]).all() and np.isnan(ours[1]).all()
    np.testing.assert_array_equal(ours[2], np.sign(w[:, 4]) * INF)
    lin = compile0("l: linear(4)", "6x3x3")
    y = base((1, 6, 3, 3))
    y[0, 2, 1, 1] = NAN
    out = lin.run(y)
    assert np.isnan(out[0, :, 1, 1]).all() and np.isfinite(np.delete(out.reshape(4, 9), 4, 1)).all()


# ---- element-wise --------------------------------------------------------------------------

EDGES = np.array([NAN, -INF, INF, LOWEST, -np.finfo(np.float32).min, 0.0, -2.0, 7.0], np.float32)
ELEMENTWISE = {
    "relu": [NAN, 0, INF, 0, -LOWEST, 0, 0, 7],
    "relu6": [NAN, 0, 6, 0, 6, 0, 0, 6],
    "clip(-1, 2)": [NAN, -1, 2, -1, 2, 0, -1, 2],
    "leaky_relu(0.5)": [NAN, -INF, INF, LOWEST / 2, -LOWEST, 0, -1, 7],
    "tanh": [NAN, -1, 1, -1, 1, 0, np.tanh(np.float32(-2)), np.tanh(np.float32(7))],
    "sigmoid": [NAN, 0, 1, 0, 1, 0.5, 1 / (1 + np.exp(2)), 1 / (1 + np.exp(-7))],
    "hardsigmoid": [NAN, 0, 1, 0, 1, 0.5, 1 / 6, 1],
    "elu(0.5)": [NAN, -0.5, INF, -0.5, -LOWEST, 0, 0.5 * np.expm1(-2), 7],
    "silu": [NAN, 0, INF, 0, -LOWEST, 0, -2 / (1 + np.exp(2)), 7 / (1 + np.exp(-7))],
    "hardswish": [NAN, 0, INF, 0, -LOWEST, 0, -2 / 6, 7],
    "mish": [NAN, 0, INF, 0, -LOWEST, 0, -2 * np.tanh(np.log1p(np.exp(-2))),
             7 * np.tanh(np.log1p(np.exp(7)))],
    "softplus": [NAN, 0, INF, 0, -LOWEST, np.log(2), np.log1p(np.exp(-2)),
                 7 + np.log1p(np.exp(-7))],
    "softplus(4)": [NAN, 0, INF, 0, -LOWEST, np.log(2) / 4, np.log1p(np.exp(-8)) / 4, 7],
}  # fmt: skip


@pytest.mark.parametrize("layer", ELEMENTWISE)
@pytest.mark.parametrize("fused", [False, True])
def test_activations_keep_nan_and_give_their_limits_at_the_infinities(layer, fused):
    x = EDGES.reshape(1, 1, -1)
    if fused:
        # After a conv of weight 1 and bias 0, fused into it at -O2: the same values.
        model = cnnc.compile(f"network n(x: 1x8) {{ l: conv(1, 1) -> {layer} }}")
        assert model.graph.nodes[0].attrs.get("activation")
        model.graph.nodes[0].inputs[1].data[...] = 1.0
        model.graph.nodes[0].inputs[2].data[...] = 0.0
        model._interpreter = None
    else:
        model = compile0(layer, "1x8")
    ours = model.run(x).ravel()
    expected = np.array(ELEMENTWISE[layer], np.float32)
    assert same_nonfinite(ours, expected)
    np.testing.assert_allclose(ours, expected, rtol=2e-6, atol=1e-7)


def test_prelu_and_softmax():
    prelu = compile0("l: prelu(2)", "2x4")
    prelu.graph.params["l.weight"].data[...] = [0.5, 0.0]
    x = np.array([[[NAN, -INF, INF, -2], [NAN, -INF, INF, -2]]], np.float32)
    # A slope of 0 times -inf is NaN, as PyTorch's weight·x.
    np.testing.assert_array_equal(prelu.run(x), [[[NAN, -INF, INF, -1], [NAN, NAN, INF, -0.0]]])
    softmax = compile0("softmax", "4x1")
    rows = [[0, -INF, 1, 2], [0, INF, 1, 2], [-INF] * 4, [NAN, 0, 1, 2]]
    p = softmax.run(np.array(rows, np.float32)[..., None])[..., 0]
    e = np.exp(np.array([0, 1, 2]) - 2.0)
    np.testing.assert_allclose(p[0], [e[0] / e.sum(), 0, e[1] / e.sum(), e[2] / e.sum()], rtol=1e-6)
    assert p[0, 1] == 0.0
    # inf − inf = NaN: an entry of +inf, or all -inf, makes the row NaN, as in PyTorch.
    assert np.isnan(p[1:]).all()


def test_normalizations_confine_nan_to_their_groups():
    x = base((2, 4, 3, 3))
    x[0, 1, 2, 2] = NAN
    bn = compile0("l: bn", "4x3x3").run(x)
    assert np.isnan(bn).sum() == 1 and np.isnan(bn[0, 1, 2, 2])
    ln = compile0("l: layernorm", "4x3x3").run(x)
    assert np.isnan(ln[0, :, 2, 2]).all() and np.isnan(ln).sum() == 4  # that position's C
    gn = compile0("l: groupnorm(2)", "4x3x3").run(x)
    assert np.isnan(gn[0, :2]).all() and np.isfinite(gn[0, 2:]).all() and np.isfinite(gn[1]).all()


def test_lrn_divides_the_neighbours_of_an_infinity_to_zero():
    x = base((1, 5, 2, 2))
    x[0, 2, 0, 0] = INF
    ours = compile0("lrn(3)", "5x2x2").run(x)
    # The channel itself is inf / inf = NaN; channels 1 and 3 divide by inf: 0; 0 and 4 are
    # outside the window and untouched by it.
    assert np.isnan(ours[0, 2, 0, 0])
    assert ours[0, 1, 0, 0] == 0 and ours[0, 3, 0, 0] == 0
    assert np.isfinite(ours[0, [0, 4], 0, 0]).all() and ours[0, 0, 0, 0] != 0
    assert np.isfinite(ours[0, :, 1]).all()


def test_arithmetic_is_ieee():
    x = np.array([[[INF, 0.0, INF, 1.0, -1.0, 0.0]]], np.float32)
    y = np.array([[[-INF, INF, INF, 0.0, 0.0, 0.0]]], np.float32)
    model = cnnc.compile(
        "network n(a: 1x6, b: 1x6) { s = add(a, b)  d = sub(a, b)  m = mul(a, b)"
        "  q = div(a, b)  concat(s, d, m, q) }",
        opt_level=0,
    )
    s, d, m, q = model.run(x, y)[0]
    np.testing.assert_array_equal(s, [NAN, INF, INF, 1, -1, 0])
    np.testing.assert_array_equal(d, [INF, -INF, NAN, 1, -1, 0])
    np.testing.assert_array_equal(m, [-INF, NAN, INF, 0, -0.0, 0])
    np.testing.assert_array_equal(q, [NAN, 0, NAN, INF, -INF, NAN])


@pytest.mark.parametrize(
    "layer",
    ["pad(1, value=2)", "pad((1, 2, 0, 1), mode=reflect)", "pad(1, mode=edge)",
     "slice(2, 7, axis=3)", "upsample(scale=2)",
     "r = x -> avgpool(2, stride=1)\n x -> crop(r, offset=1)",
     "a, b = x -> split(2)\n concat(b, a)"],
)  # fmt: skip
def test_copies_carry_nan_and_inf_where_they_copy_them(layer):
    x = nonfinite_map()
    ours = compile0(layer, "2x7x7").run(x)
    theirs = onnxruntime(compile0(layer, "2x7x7"), x)
    assert agree(ours, theirs)
    # Every NaN and inf of the output is a copy of one: as many of each kind at most as
    # the input has, times the times a value is copied.
    assert np.isnan(ours).any() and np.isposinf(ours).any() and np.isneginf(ours).any()
    assert set(np.unique(ours[np.isfinite(ours)])) <= set(np.unique(x[np.isfinite(x)])) | {2.0}


# ---- against onnxruntime --------------------------------------------------------------------

AGREEING = [
    "l: conv(3, 3, pad=1)", "l: conv(3, 3, pad=1) -> relu", "l: conv(3, 3, pad=1) -> relu6",
    "l: conv_transpose(3, 3, stride=2, pad=1)", "avgpool(3, stride=2, pad=1)", "gap",
    "relu", "leaky_relu(0.1)", "clip(-1, 2)", "sigmoid", "tanh", "elu", "softplus",
    "hardsigmoid", "softmax", "l: bn", "l: layernorm", "l: groupnorm(2)",
    "upsample(scale=2, mode=bilinear)", "flatten -> l: fc(5)",
]  # fmt: skip


@pytest.mark.parametrize("layers", AGREEING)
def test_onnxruntime_agrees_on_nan_and_inf_inputs(layers):
    x = nonfinite_map()
    for level in (0, 2):
        model = cnnc.compile(f"network n(x: 2x7x7) {{ {layers} }}", opt_level=level)
        ours, theirs = model.run(x), onnxruntime(model, x)
        assert agree(ours, theirs), f"{layers} at -O{level}"
        assert not np.isfinite(ours).all()


# Ops where onnxruntime differs by design, an input shape, and the values that show it.
DIFFERING = {
    # NaN read first in its window: onnxruntime's MaxPool and ReduceMax skip it.
    "maxpool(2)": ("2x7x7", {(0, 0, 2, 2): NAN}),
    "global_maxpool": ("2x7x7", {(0, 0, 2, 2): NAN}),
    "adaptive_maxpool(3)": ("2x7x7", {(0, 0, 2, 2): NAN}),
    # The pooling matrix's 0s: NaN in every window of the axis.
    "adaptive_avgpool(3)": ("2x7x7", {(0, 0, 2, 2): NAN}),
    # gate(-inf) = 0: our limit 0, onnxruntime's -inf·0 = NaN.
    "silu": ("2x7x7", {(0, 0, 3, 3): -INF}),
    "gelu": ("2x7x7", {(0, 0, 3, 3): -INF}),
    "mish": ("2x7x7", {(0, 0, 3, 3): -INF}),
    "hardswish": ("2x7x7", {(0, 0, 3, 3): -INF}),
    # beta·x overflows in the ONNX form only.
    "softplus(4)": ("2x7x7", {(0, 0, 3, 3): 1e38}),
    # onnxruntime's running sum over the channels: inf − inf past the window.
    "lrn(3)": ("5x2x2", {(0, 2, 0, 0): INF}),
    # At the last row and column the second tap has weight 0: inf·0 = NaN for PyTorch and
    # us; onnxruntime leaves that tap out.
    "upsample(size=10, mode=bilinear, align_corners=true)": ("2x7x7", {(0, 0, 6, 6): -INF}),
}


@pytest.mark.parametrize("layer", DIFFERING)
def test_where_onnxruntime_differs_the_op_is_in_the_table(layer):
    shape, values = DIFFERING[layer]
    x = base((1, *map(int, shape.split("x"))))
    for index, value in values.items():
        x[index] = value
    model = compile0(layer, shape)
    ours, theirs = model.run(x), onnxruntime(model, x)
    assert not same_nonfinite(ours, theirs)
    divergence = first_divergence(model.graph, [x])
    assert divergence is not None and divergence.nonfinite
    assert divergence.node == model.graph.nodes[0].name
    assert divergence.known.startswith(layer.split("(")[0] + ": ")


def test_the_table_is_narrow():
    # A nearest upsample, an avgpool and a uniform adaptive_avgpool are not excused.
    for layer in ("upsample(scale=2)", "avgpool(2)", "adaptive_avgpool(2)", "softplus"):
        assert known_difference(compile0(layer, "2x8x8").graph.nodes[0]) is None, layer
    fused = cnnc.compile("network n(x: 2x8x8) { conv(2, 1) -> silu }").graph.nodes[0]
    assert known_difference(fused).startswith("silu: ")


# ---- the comparison -----------------------------------------------------------------------


def test_agreement_counts_nan_and_inf_at_the_same_places():
    a = np.array([1.0, NAN, INF, -INF, 2.0], np.float32)
    assert agree(a, a.copy())
    assert agree(a + np.float32(1e-6), a)
    assert not agree(np.array([1, NAN, INF, -INF, NAN], np.float32), a)  # NaN for 2
    assert not agree(np.array([1, 0, INF, -INF, 2], np.float32), a)  # a finite value for NaN
    assert not agree(np.array([1, NAN, -INF, -INF, 2], np.float32), a)  # the sign of inf
    assert not agree(np.array([1, NAN, INF, -INF, 2.1], np.float32), a)  # a finite value
    # The tolerance scales with the largest finite value, never with inf.
    assert tolerance(a) == pytest.approx(1e-5 + 1e-4 * 2)
    assert max_difference(np.array([1.5, NAN, INF, 0, 2], np.float32), a) == 0.5


def broken_relu(monkeypatch, kernel):
    monkeypatch.setitem(kernels.KERNELS, "relu", lambda node: kernel)


def test_a_finite_disagreement_is_named_at_its_node(monkeypatch):
    broken_relu(monkeypatch, lambda x, out=None: np.maximum(x, 0) + np.float32(0.5))
    model = compile0("c: conv(2, 3, pad=1) -> r: relu -> maxpool(2)", "2x7x7")
    x = nonfinite_map()
    divergence = first_divergence(model.graph, [x])
    assert (divergence.node, divergence.op, divergence.nonfinite) == ("r", "relu", False)
    assert divergence.known is None


def test_a_nonfinite_divergence_outside_the_table_is_not_excused(monkeypatch):
    broken_relu(monkeypatch, lambda x, out=None: np.fmax(x, 0))  # fmax drops NaN
    model = compile0("c: conv(2, 3, pad=1) -> r: relu -> maxpool(2)", "2x7x7")
    divergence = first_divergence(model.graph, [nonfinite_map()])
    assert (divergence.node, divergence.nonfinite, divergence.known) == ("r", True, None)
    assert known_difference(model.graph.nodes[2]).startswith("maxpool: cnnc propagates NaN")


MAXPOOL_NET = "network mp(image: 1x8x8) {\n    maxpool(2) -> c: conv(2, 1)\n}\n"


def nan_input(tmp_path, row=2, col=2):
    x = base((1, 1, 8, 8))
    x[0, 0, row, col] = NAN
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "mp.cnn").write_text(MAXPOOL_NET)
    return tmp_path / "mp.cnn", tmp_path / "x.npy"


def test_compare_names_maxpool_as_op_semantics_and_exits_0(tmp_path):
    program, x = nan_input(tmp_path)
    proc = run_cnnc("run", program, "--input", x, "--compare")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-3].startswith(
        "numpy interpreter and onnxruntime differ: max |difference| where both are finite 0 "
    )
    assert lines[-3].endswith("; 2 NaN and 0 ±inf in our outputs")
    assert lines[-2] == (
        "they first differ at node maxpool1 (maxpool), on NaN/inf: a known difference of op "
        "semantics, not a bug in cnnc"
    )
    assert lines[-1].startswith("  maxpool: cnnc propagates NaN, as PyTorch does;")
    assert "bug in cnnc, please report" not in proc.stdout + proc.stderr


def test_compare_agrees_where_nan_lands_at_the_same_places(tmp_path, capsys):
    # A NaN read last in its 2×2 window: onnxruntime's 2-D MaxPool keeps that one.
    program, x = nan_input(tmp_path, 3, 3)
    assert cli.main(["run", str(program), "--input", str(x), "--compare"]) == 0
    out = capsys.readouterr().out
    assert "numpy interpreter and onnxruntime agree: max |difference| 0 " in out
    assert out.rstrip().endswith("; 2 NaN and 0 ±inf at the same places in both")


def test_compare_reports_a_finite_disagreement_as_a_possible_bug(tmp_path, capsys, monkeypatch):
    broken_relu(monkeypatch, lambda x, out=None: np.maximum(x, 0) + np.float32(0.5))
    (tmp_path / "r.cnn").write_text("network r(image: 1x8x8) { c: conv(2, 3) -> r: relu }")
    assert cli.main(["run", str(tmp_path / "r.cnn"), "--compare", "-O0"]) == 1
    captured = capsys.readouterr()
    assert (
        "numpy interpreter and onnxruntime differ: max |difference| where both are finite 0.5"
        in (captured.out)
    )
    assert captured.err.splitlines()[-1] == (
        "error: the two backends disagree, first at node r (relu), on finite values; "
        "this may be a bug in cnnc, please report it"
    )


def test_the_interpreter_warns_of_nothing_in_any_of_its_threads():
    model = compile0("c: conv(16, 3, pad=1) -> lrn(3) -> softmax", "16x64x64")
    model.interpreter.threads = 2  # the kernels share their work between two threads
    x = base((4, 16, 64, 64))
    x[:, :, ::7, ::5] = INF
    x[:, :, ::9, ::3] = -INF
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = model.run(x)
    assert np.isnan(y).any() and np.isfinite(y).any()


def test_bench_names_the_node_of_a_disagreement(tmp_path, capsys, monkeypatch):
    broken_relu(monkeypatch, lambda x, out=None: np.maximum(x, 0) + np.float32(0.5))
    (tmp_path / "r.cnn").write_text("network r(image: 1x8x8) { c: conv(2, 3) -> r: relu }")
    argv = ["bench", str(tmp_path / "r.cnn"), "-O0", "--repeat", "1", "--warmup", "0"]
    assert cli.main(argv) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: the two backends disagree, first at node r (relu), on finite values; "
        "this may be a bug in cnnc, please report it"
    )


def test_an_imported_clip_without_a_max_is_written_as_relu_and_keeps_inf(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Clip", ["x", "low"], ["y"])],
        "clamp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3])],
        [helper.make_tensor("low", TensorProto.FLOAT, [], [0.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, tmp_path / "clamp.onnx")
    imported = cnnc.load(tmp_path / "clamp.onnx", opt_level=0)
    text, _ = imported.to_program()
    assert "relu" in text and "clip" not in text
    x = np.array([[[INF, -INF, NAN], [1, -1, 0]]], np.float32)
    expected = np.array([[[INF, 0, NAN], [1, 0, 0]]], np.float32)
    np.testing.assert_array_equal(imported.run(x), expected)
    np.testing.assert_array_equal(cnnc.compile(text, opt_level=0).run(x), expected)
