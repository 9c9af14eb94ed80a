"""The element-wise activations of today's networks: every kernel against its formula in
float64 over the whole range (where exp overflows, where tanh saturates), NaN and the
infinities, against onnxruntime at each opset's ONNX form, and fused into a conv."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import assert_agree, ort_session

import cnnc
from cnnc.backends.kernels import ELEMENTWISE, erf
from cnnc.backends.onnx_export import max_opset

ERF = np.vectorize(math.erf)


def softplus(x, beta=1.0):
    return np.logaddexp(0, beta * x) / beta


# Each activation (a layer, its IR attributes) and its formula in float64.
FORMULAS = {
    "sigmoid": ({}, lambda x: 1 / (1 + np.exp(-x))),
    "silu": ({}, lambda x: x / (1 + np.exp(-x))),
    "hardsigmoid": ({"alpha": 1 / 6, "beta": 0.5}, lambda x: np.clip(x / 6 + 0.5, 0, 1)),
    "hardswish": ({}, lambda x: x * np.clip(x / 6 + 0.5, 0, 1)),
    "gelu": ({"approximate": "none"}, lambda x: x / 2 * (1 + ERF(x / np.sqrt(2)))),
    "gelu_tanh": (
        {"approximate": "tanh"},
        lambda x: x / 2 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))),
    ),
    "mish": ({}, lambda x: x * np.tanh(softplus(x))),
    "elu": ({"alpha": 0.7}, lambda x: np.where(x > 0, x, 0.7 * np.expm1(np.minimum(x, 0)))),
    "softplus": ({"beta": 1.0}, softplus),
    "softplus_beta": ({"beta": 2.5}, lambda x: softplus(x, 2.5)),
}
WIDE = np.concatenate([np.linspace(-40, 40, 40_001), [-1e30, 1e30]])


@pytest.mark.parametrize("name", FORMULAS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_kernel_computes_its_formula_over_the_whole_line(name, dtype):
    attrs, formula = FORMULAS[name]
    op = name.split("_")[0]
    x = WIDE.astype(dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = formula(x.astype(np.float64))
        ours = ELEMENTWISE[op](attrs)(x.copy())
    assert ours.dtype == dtype
    # float32 rounding of values up to 40 in magnitude; float64 to the erf polynomial.
    tolerance = 4e-6 if dtype == np.float32 else 2e-7 * 40
    finite = np.isfinite(expected)
    np.testing.assert_allclose(ours[finite], expected[finite], rtol=1e-6, atol=tolerance)


# Each activation's limits at -inf and +inf: what the kernel gives there (README, NaN and
# infinity), though x·gate(x) in IEEE arithmetic is -inf·0 = NaN (PyTorch's silu, mish,
# gelu and hardswish give NaN at -inf).
LIMITS = {
    "sigmoid": (0.0, 1.0), "silu": (0.0, np.inf), "hardsigmoid": (0.0, 1.0),
    "hardswish": (0.0, np.inf), "gelu": (0.0, np.inf), "gelu_tanh": (0.0, np.inf),
    "mish": (0.0, np.inf), "elu": (-0.7, np.inf), "softplus": (0.0, np.inf),
    "softplus_beta": (0.0, np.inf),
}  # fmt: skip


@pytest.mark.parametrize("name", FORMULAS)
def test_nan_stays_nan_and_infinities_give_the_limits(name):
    attrs, _ = FORMULAS[name]
    run = ELEMENTWISE[name.split("_")[0]](attrs)
    big = np.finfo(np.float32).max
    x = np.array([np.nan, -np.inf, np.inf, -big, big], np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # as the interpreter runs them
        results = [run(x.copy()), run(x.copy(), out=np.empty_like(x)), run(x[::-1].copy())[::-1]]
    for ours in results:
        assert np.isnan(ours[0])
        assert (ours[1], ours[2]) == pytest.approx(LIMITS[name], abs=1e-6)
        # Float32's largest values are finite and far out: the same limits, but finite
        # where the function grows (no overflow in the middle: softplus(2.5) of 3.4e38 is
        # 3.4e38 itself, as PyTorch's linear branch gives).
        low, high = LIMITS[name]
        assert ours[3] == pytest.approx(low, abs=1e-6)
        assert ours[4] == (big if high == np.inf else pytest.approx(high))


@pytest.mark.parametrize("name", FORMULAS)
def test_in_place_and_into_a_strided_view_give_the_same_values(name):
    attrs, _ = FORMULAS[name]
    run = ELEMENTWISE[name.split("_")[0]](attrs)
    x = np.random.default_rng(0).standard_normal((3, 8, 6), dtype=np.float32) * 4
    expected = run(x.copy())
    in_place = x.copy()
    run(in_place, out=in_place)
    np.testing.assert_array_equal(in_place, expected)
    target = np.zeros((8, 3, 6), np.float32)
    run(x.transpose(1, 0, 2), out=target)
    np.testing.assert_array_equal(target, expected.transpose(1, 0, 2))


def test_erf_is_within_its_documented_error_in_float64():
    x = np.linspace(-6, 6, 100_001)
    assert np.abs(erf(x) - ERF(x)).max() < 1.5e-7


LAYERS = {
    "silu": "silu", "hardsigmoid": "hardsigmoid", "hardswish": "hardswish", "gelu": "gelu",
    "gelu_tanh": "gelu(tanh)", "mish": "mish", "elu": "elu(0.7)", "softplus": "softplus",
    "softplus_beta": "softplus(2.5)",
}  # fmt: skip


@pytest.mark.parametrize("opset", sorted({13, 17, 18, 20, max_opset()}))
@pytest.mark.parametrize("name", LAYERS)
def test_alone_and_fused_into_a_conv_it_agrees_with_onnxruntime(name, opset):
    # The activation alone, then after a conv (fused at -O2).
    text = f"network n(x: 3x9x9) {{ {LAYERS[name]} -> conv(4, 3) -> {LAYERS[name]} }}"
    for level in (0, 2):
        model = cnnc.compile(text, opt_level=level)
        x = model.random_input(2) * 5
        theirs = ort_session(model.to_onnx(opset=opset)).run(None, {"x": x})[0]
        assert_agree(model.run(x), theirs, f"{name} at opset {opset}, -O{level}")
    assert model.graph.nodes[1].attrs.get("activation") == name.split("_")[0]
