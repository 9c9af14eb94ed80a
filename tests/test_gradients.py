"""The gradient rules of the non-spatial ops (cnnc/train/rules.py), each checked against
central finite differences of the same graph's loss in float64 (tests/gradcheck.py), at
batch 1 and 3, on shapes drawn from a seeded generator; the derivatives of the activations
at their kinks (PyTorch's conventions); the ONNX forms of the gradient ops added for them;
and that every forward op has a rule. The spatial ops are in test_gradients_spatial.py."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from gradcheck import GradientMismatch, check
from helpers import assert_agree, ort_session

from cnnc import weights
from cnnc.backends.interpreter import Interpreter
from cnnc.backends.onnx_export import to_onnx
from cnnc.backends.train_kernels import _derivative
from cnnc.frontend.lower import lower
from cnnc.frontend.parser import parse
from cnnc.ir.graph import Graph
from cnnc.ir.types import TensorType
from cnnc.ops import all_ops
from cnnc.ops.train import TRAINING_OPS
from cnnc.train.autodiff import GRADIENTS
from cnnc.train.step import build_step, gradient_graph, training_forward

BATCHES = (1, 3)
SAMPLES = 12  # entries compared per gradient (all of them in a smaller tensor)


def shape(name: str, rank: int = 2, channels: tuple[int, int] = (1, 5)) -> str:
    """A C×H×W (rank 2) or C×L (rank 1) shape drawn from a generator seeded by ``name``:
    C in ``channels``, H and W in 2..5, L in 2..8."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    c = int(rng.integers(channels[0], channels[1] + 1))
    spatial = rng.integers(2, 6, 2) if rank == 2 else rng.integers(2, 9, 1)
    return "x".join(str(d) for d in (c, *spatial))


def net(body: str, name: str, rank: int = 2, channels: tuple[int, int] = (1, 5)) -> str:
    return f"network n(x: {shape(name, rank, channels)}) {{ {body} }}"


# ---- every element-wise activation ---------------------------------------------------------

# (layer, spread of the inputs): wide enough to reach hardswish's and hardsigmoid's flat
# parts, clip's bounds and softplus's region past beta·x = 20.
ACTIVATIONS = {
    "relu": ("relu", 1.0),
    "leaky_relu": ("leaky_relu(0.2)", 1.0),
    "clip": ("clip(-0.5, 0.7)", 1.0),
    "relu6": ("relu6", 5.0),
    "sigmoid": ("sigmoid", 2.0),
    "tanh": ("tanh", 1.0),
    "silu": ("silu", 2.0),
    "hardsigmoid": ("hardsigmoid", 5.0),
    "hardsigmoid_onnx": ("hardsigmoid(alpha=0.2, beta=0.4)", 4.0),
    "hardswish": ("hardswish", 5.0),
    "gelu": ("gelu", 2.0),
    "gelu_tanh": ("gelu(tanh)", 2.0),
    "mish": ("mish", 2.0),
    "elu": ("elu(0.7)", 2.0),
    "softplus": ("softplus", 2.0),
    "softplus_beta": ("softplus(4)", 8.0),
}


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("rank", [2, 1])
@pytest.mark.parametrize("case", sorted(ACTIVATIONS))
def test_activation(case, rank, batch):
    layer, spread = ACTIVATIONS[case]
    source = net(layer, f"{case}{rank}", rank)
    # the loss grows with the spread, and so does its rounding error: a wider step
    assert check(source, batch=batch, spread=spread, samples=SAMPLES, h=1e-6 * spread) > 0


# What PyTorch's backward gives at each kink (measured with torch 2.14 in float64:
# relu, leaky_relu, hardtanh, clamp, relu6, hardsigmoid, hardswish, elu).
KINKS = [
    ("relu", {}, 0.0, 0.0),
    ("leaky_relu", {"alpha": 0.2}, 0.0, 0.2),
    ("clip", {"min": 0.0, "max": 6.0}, 0.0, 0.0),
    ("clip", {"min": 0.0, "max": 6.0}, 6.0, 0.0),
    ("clip", {"min": -0.5, "max": 1.5}, -0.5, 0.0),
    ("clip", {"min": -0.5, "max": 1.5}, 1.5, 0.0),
    ("hardsigmoid", {"alpha": 1 / 6, "beta": 0.5}, -3.0, 0.0),
    ("hardsigmoid", {"alpha": 1 / 6, "beta": 0.5}, 3.0, 0.0),
    ("hardswish", {}, -3.0, 0.0),
    ("hardswish", {}, 3.0, 1.0),
    ("elu", {"alpha": 0.7}, 0.0, 0.7),
]


@pytest.mark.parametrize(("op", "attrs", "x", "expected"), KINKS)
def test_derivative_at_a_kink_is_pytorchs(op, attrs, x, expected):
    for dtype in (np.float32, np.float64):
        value = _derivative(op, attrs)(np.array([x], dtype))
        assert float(value[0]) == pytest.approx(expected, abs=1e-7), (op, attrs, x)


def test_derivatives_keep_the_dtype_through_activation_grad():
    for op, attrs, *_ in KINKS:
        g = Graph("g")
        x = g.add_input("x", TensorType("f64", ("N", 3)))
        dy = g.add_input("dy", TensorType("f64", ("N", 3)))
        node = g.add_node(
            "activation_grad", [x, dy], {"activation": op, "activation_attrs": attrs}, name="d"
        )
        g.outputs = [node.output]
        (out,) = Interpreter(g, threads=1).run(np.ones((2, 3)) * 0.25, np.ones((2, 3)))
        assert out.dtype == np.float64, op


# ---- the other non-spatial ops -----------------------------------------------------------

# name -> (program, keyword arguments of check), each run at batch 1 and 3 unless it says
# otherwise (``batches``).
CASES: dict[str, tuple[str, dict]] = {
    # prelu: one slope, one per channel; maps, 1-D maps, N×F
    "prelu_shared": (net("prelu", "prelu1"), {}),
    "prelu_per_channel": (net("prelu(3)", "prelu3", channels=(3, 3)), {}),
    "prelu_1d": (net("prelu(4)", "prelu1d", 1, (4, 4)), {}),
    "prelu_features": (net("fc(5) -> prelu(5)", "prelu_f"), {}),
    "prelu_features_shared": (net("fc(5) -> prelu", "prelu_fs"), {}),
    # softmax over any axis
    "softmax_channels": (net("softmax", "sm1"), {}),
    "softmax_height": (net("softmax(2)", "sm2"), {}),
    "softmax_last": (net("softmax(-1)", "sm3"), {}),
    "softmax_1d_length": (net("softmax(2)", "sm4", 1), {}),
    "softmax_features": (net("fc(4) -> softmax", "sm5"), {}),
    # bn in training mode (bn_train and bn_grad); 1-D; N×F; in inference mode
    "bn": (net("bn", "bn2"), {}),
    "bn_1d": (net("bn", "bn1", 1), {}),
    "bn_after_conv": (net("conv(4, 3, pad=1) -> bn -> relu", "bnc"), {}),
    # (at batch 1 an N×F batch norm has one value per channel: PyTorch refuses it)
    "bn_features": (net("fc(4) -> bn", "bnf"), {"batches": (3,)}),
    "bn_inference": (net("bn", "bni"), {"training": False}),
    "bn_inference_1d": (net("conv(3, 1) -> bn", "bni1", 1), {"training": False}),
    # per-channel scales and shifts
    "affine": (net("affine", "af2"), {}),
    "affine_1d": (net("affine", "af1", 1), {}),
    "affine_features": (net("fc(4) -> affine", "aff"), {}),
    "scale": (net("scale", "sc2"), {}),
    "scale_1d": (net("scale", "sc1", 1), {}),
    "scale_features": (net("fc(4) -> layer_scale: scale", "scf"), {}),
    # layer norm over the channels, the last axis, another axis
    "layernorm": (net("layernorm", "ln1", channels=(2, 6)), {}),
    "layernorm_last": (net("layernorm(axis=-1)", "ln2"), {}),
    "layernorm_height": (net("layernorm(axis=2, eps=0.01)", "ln3"), {}),
    "layernorm_1d": (net("layernorm", "ln4", 1, (2, 6)), {}),
    "layernorm_1d_last": (net("layernorm(axis=-1)", "ln5", 1), {}),
    # group norm: groups of several channels, instance norm (groups = C), one group
    "groupnorm": ("network n(x: 6x3x4) { groupnorm(3) }", {}),
    "groupnorm_instance": ("network n(x: 4x3x3) { groupnorm(4, eps=0.1) }", {}),
    "groupnorm_one_group": (net("groupnorm(1)", "gn1", channels=(2, 5)), {}),
    "groupnorm_1d": ("network n(x: 6x7) { groupnorm(2) }", {}),
    # local response norm (odd sizes in the language; even ones below, on the IR)
    "lrn": ("network n(x: 7x3x4) { lrn(3, alpha=0.5, beta=0.75, k=1.5) }", {}),
    "lrn_wide": ("network n(x: 3x3x3) { lrn(5, alpha=0.8, beta=0.6, k=1) }", {}),
    "lrn_1d": ("network n(x: 6x5) { lrn(5, alpha=0.4, beta=0.9, k=2) }", {}),
    # linear over the channels, the last axis, a middle axis; with and without bias
    "linear": (net("linear(4)", "li1"), {}),
    "linear_no_bias": (net("linear(3, bias=false)", "li2"), {}),
    "linear_last": (net("linear(4, axis=-1)", "li3"), {}),
    "linear_middle": (net("linear(2, axis=2, bias=false)", "li4"), {}),
    "linear_1d": (net("linear(4)", "li5", 1), {}),
    "linear_1d_last": (net("linear(3, axis=-1)", "li6", 1), {}),
    "linear_rank5": (
        "network n(x: 4x6x6) { reshape((2, 2, 3, 12)) -> linear(3, axis=3) }",
        {},
    ),
    # fc, with and without bias, after a map (flatten) and after fc
    "fc": (net("fc(4) -> fc(3)", "fc1"), {}),
    "fc_no_bias": (net("fc(3, bias=false)", "fc2", 1), {}),
    # flatten, reshape, transpose
    "flatten": (net("flatten -> fc(3)", "fl"), {}),
    "reshape": ("network n(x: 4x6x6) { reshape((2, 2, 36)) -> affine }", {}),
    "transpose": ("network n(x: 4x6x6) { reshape((2, 3, 24)) -> transpose((3, 1, 2)) }", {}),
    "transpose_1d": (net("transpose((2, 1)) -> affine", "tr1", 1), {}),
    # dropout and drop_path: multiplications by mask inputs; p = 0 stays the identity
    "dropout": (net("dropout(0.3) -> affine", "do1"), {}),
    "dropout_zero": (net("dropout(0) -> affine", "do0"), {}),
    "drop_path": ("network n(x: 3x4x4) { y = x -> conv(3, 1) -> drop_path(0.5)  add(x, y) }", {}),
    "drop_path_zero": ("network n(x: 3x4x4) { y = x -> affine -> drop_path(0)  add(x, y) }", {}),
    "drop_path_always": ("network n(x: 3x4x4) { y = x -> affine -> drop_path(1)  add(x, y) }", {}),
    # add (n-ary, broadcasting), sub, mul, div broadcasting both ways
    "add": ("network n(x: 3x4x5) { s = x -> gap  add(x, s, x) }", {}),
    "add_small_first": ("network n(x: 3x4x5) { s = x -> gap  t = x -> affine  add(s, x, t) }", {}),
    "sub": ("network n(x: 3x4x5) { s = x -> gap  sub(x, s) }", {}),
    "sub_small_first": ("network n(x: 3x4x5) { s = x -> gap  sub(s, x) }", {}),
    "mul": ("network n(x: 3x4x5) { s = x -> gap -> sigmoid  mul(x, s) }", {}),
    "mul_small_first": ("network n(x: 3x4x5) { s = x -> gap  mul(s, x) }", {}),
    "mul_three": ("network n(x: 3x4x5) { s = x -> gap  t = x -> tanh  mul(x, s, t) }", {}),
    "mul_same": ("network n(x: 3x4x5) { mul(x, x) }", {}),
    "div": ("network n(x: 3x4x5) { s = x -> gap -> sigmoid  div(x, s) }", {}),
    "div_small_first": ("network n(x: 3x4x5) { s = x -> gap  t = x -> sigmoid  div(s, t) }", {}),
    "div_1d": ("network n(x: 3x7) { s = x -> gap  t = x -> sigmoid  div(s, t) }", {}),
}


@pytest.mark.parametrize(
    ("case", "batch"),
    [(case, b) for case in sorted(CASES) for b in CASES[case][1].get("batches", BATCHES)],
)
def test_gradient(case, batch):
    source, kwargs = CASES[case]
    kwargs = {k: v for k, v in kwargs.items() if k != "batches"}
    assert check(source, batch=batch, samples=SAMPLES, **kwargs) > 0


def param_operand(op: str, first: bool) -> Graph:
    """x [N, 3, 4, 5] ``op`` a parameter [1, 3, 1, 1] (on the left when ``first``), the way
    an IR graph may hold one; then an affine so that both feed a parameter."""
    g = Graph("n")
    x = g.add_input("x", TensorType("f32", ("N", 3, 4, 5)))
    p = g.add_param("p", (1, 3, 1, 1), ("bn_scale", 3))
    if op == "div" and first:  # a denominator away from 0
        x = g.add_node("sigmoid", [x], name="s").output
    y = g.add_node(op, [p, x] if first else [x, p], name="m").output
    w = g.add_param("a.weight", (3,), ("bn_scale", 3))
    b = g.add_param("a.bias", (3,), ("bn_shift", 3))
    g.outputs = [g.add_node("affine", [y, w, b], name="a").output]
    return g


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("first", [False, True])
@pytest.mark.parametrize("op", ["add", "sub", "mul", "div"])
def test_arithmetic_with_a_parameter_operand(op, first, batch):
    # a parameter denominator stays away from 0: bn_scale's initial values are near 1
    # p, a.weight and a.bias have 3 values each; x has more than SAMPLES
    assert check(param_operand(op, first), batch=batch, samples=SAMPLES) == 3 * 3 + SAMPLES


def lrn_graph(size: int, channels: int) -> Graph:
    """An lrn of any size, even ones too (imported models have them)."""
    g = Graph("n")
    x = g.add_input("x", TensorType("f32", ("N", channels, 3, 2)))
    attrs = {"size": size, "alpha": 0.7, "beta": 0.75, "bias": 1.2}
    g.outputs = [g.add_node("lrn", [x], attrs, name="l").output]
    return g


@pytest.mark.parametrize(("size", "channels"), [(4, 6), (2, 3), (6, 2)])
def test_lrn_of_an_even_size(size, channels):
    for batch in BATCHES:
        assert check(lrn_graph(size, channels), batch=batch, samples=SAMPLES) == SAMPLES


def test_a_slightly_wrong_rule_is_caught():
    """The check fails on a rule 0.1% off: lrn's gradient with beta 0.1% too large."""
    original = GRADIENTS["lrn"]

    def wrong(g):
        attrs = {**g.attrs, "beta": g.attrs["beta"] * 1.001}
        return [g.emit("lrn_grad", [g.x(), g.dy()], attrs)]

    GRADIENTS["lrn"] = wrong
    try:
        with pytest.raises(GradientMismatch, match="central difference"):
            check(lrn_graph(3, 6), batch=2)
    finally:
        GRADIENTS["lrn"] = original
    assert check(lrn_graph(3, 6), batch=2) > 0


# ---- dropout masks and p = 0 ---------------------------------------------------------------


def _forward(source: str) -> Graph:
    forward = lower(parse(source), None)
    weights.initialize(forward, 0)
    return forward


def test_dropout_and_drop_path_are_masks_in_a_training_step_and_identities_at_p_0():
    source = (
        "network n(x: 3x4x4) { a = x -> dropout(0.3)  b = x -> dropout(0)  "
        "c = x -> affine -> drop_path(0.2)  d = x -> drop_path(0)  add(a, b, c, d) }"
    )
    gg = gradient_graph(_forward(source))
    masks = {m.name: m for m in gg.masks}
    assert sorted((m.p, m.per_item) for m in gg.masks) == [(0.2, (1, 1, 1)), (0.3, (3, 4, 4))]
    ops = [n.op for n in gg.graph.nodes]
    assert ops.count("dropout") == 1 and ops.count("drop_path") == 1  # the two of p = 0
    forward_users = {
        n.op for n in gg.graph.nodes for v in n.inputs if v.name in masks and not n.note
    }
    assert forward_users == {"mul"}


def test_the_gradient_through_a_mask_is_the_mask():
    gg = gradient_graph(_forward("network n(x: 3x4x4) { dropout(0.5) }"), dtype="f64")
    rng = np.random.default_rng(0)
    (mask,) = gg.masks
    x = rng.standard_normal((2, 3, 4, 4))
    targets = rng.standard_normal((2, 3, 4, 4))
    m = (rng.random((2, 3, 4, 4)) >= 0.5) * 2.0
    feeds = {"x": x, "targets": targets, mask.name: m}
    outs = Interpreter(gg.graph, threads=1).run(*[feeds[v.name] for v in gg.graph.inputs])
    grad = dict(zip([v.name for v in gg.graph.outputs], outs, strict=True))[gg.gradients["x"]]
    # loss = mean((x·m − t)²): dx = 2·(x·m − t)·m / count
    np.testing.assert_allclose(grad, 2 * (x * m - targets) * m / x.size, rtol=1e-12)
    assert set(np.unique(m)) == {0.0, 2.0}


def test_a_drop_path_of_p_1_drops_everything():
    step = build_step(
        _forward("network n(x: 3x4x4) { y = x -> affine -> drop_path(1)  add(x, y) }")
    )
    masks = step.draw_masks(4, np.random.default_rng(0))
    (mask,) = masks.values()
    assert mask.shape == (4, 1, 1, 1)
    assert not mask.any() and np.isfinite(mask).all()


# ---- ONNX forms of the gradient ops added here -------------------------------------------


def grad_op_graph(op: str, dims: tuple, attrs: dict, weight: int | None, dtype: str) -> Graph:
    g = Graph("g")
    x = g.add_input("x", TensorType(dtype, ("N", *dims)))
    inputs = [x]
    if weight is not None:
        inputs.append(g.add_input("w", TensorType(dtype, (weight,))))
    inputs.append(g.add_input("dy", TensorType(dtype, ("N", *dims))))
    g.outputs = list(g.add_node(op, inputs, attrs, name="n").outputs)
    return g


GRAD_OPS = [
    ("layernorm_grad", (6, 3, 4), {"axis": 1, "epsilon": 1e-5}, 6),
    ("layernorm_grad", (6, 3, 4), {"axis": 3, "epsilon": 1e-5}, 4),
    ("layernorm_grad", (6, 5), {"axis": 2, "epsilon": 1e-2}, 5),
    ("groupnorm_grad", (6, 3, 4), {"groups": 2, "epsilon": 1e-5}, 6),
    ("groupnorm_grad", (6, 5), {"groups": 6, "epsilon": 1e-5}, 6),
    ("lrn_grad", (6, 3, 4), {"size": 3, "alpha": 0.5, "beta": 0.75, "bias": 1.5}, None),
    ("lrn_grad", (7, 5), {"size": 4, "alpha": 0.5, "beta": 0.6, "bias": 1.0}, None),
    ("lrn_grad", (2, 5), {"size": 5, "alpha": 0.5, "beta": 0.6, "bias": 1.0}, None),
]


@pytest.mark.parametrize("opset", [13, 17, 21])
@pytest.mark.parametrize("dtype", ["f32", "f64"])
@pytest.mark.parametrize(("op", "dims", "attrs", "weight"), GRAD_OPS)
def test_gradient_op_agrees_in_onnxruntime(op, dims, attrs, weight, dtype, opset):
    g = grad_op_graph(op, dims, attrs, weight, dtype)
    rng = np.random.default_rng(0)
    feeds = [
        rng.standard_normal(tuple(3 if isinstance(d, str) else d for d in v.shape)).astype(
            v.type.numpy_dtype
        )
        for v in g.inputs
    ]
    ours = Interpreter(g, threads=1).run(*feeds)
    session = ort_session(to_onnx(g, opset))
    theirs = session.run(None, {v.name: f for v, f in zip(g.inputs, feeds, strict=True)})
    for value, a, b in zip(g.outputs, ours, theirs, strict=True):
        assert a.dtype == b.dtype == g.inputs[0].type.numpy_dtype
        assert_agree(a, b, f"{op} {value.name}")


@pytest.mark.parametrize("dims", [(3, 4, 5), (3, 7), (3,)])
def test_affine_with_weights_fed_at_run_time_agrees_in_onnxruntime(dims):
    # In a training step the weights of an affine (and of its gradient's scale) are inputs.
    g = Graph("g")
    x = g.add_input("x", TensorType("f32", ("N", *dims)))
    w = g.add_input("w", TensorType("f32", (3,)))
    b = g.add_input("b", TensorType("f32", (3,)))
    g.outputs = [g.add_node("affine", [x, w, b], name="a").output]
    rng = np.random.default_rng(0)
    feeds = {
        v.name: rng.standard_normal((2, *dims) if v is x else (3,)).astype(np.float32)
        for v in g.inputs
    }
    (ours,) = Interpreter(g, threads=1).run(*feeds.values())
    (theirs,) = ort_session(to_onnx(g)).run(None, feeds)
    assert_agree(ours, theirs, "affine")
    shape = (1, 3, *(1,) * (len(dims) - 1))
    np.testing.assert_allclose(
        ours, feeds["x"] * feeds["w"].reshape(shape) + feeds["b"].reshape(shape), rtol=1e-6
    )


# ---- every op has a rule ---------------------------------------------------------------------

# Forward ops without a gradient rule, with the reason: none.
NO_GRADIENT: dict[str, str] = {}


def test_every_forward_op_has_a_gradient_rule():
    forward_ops = set(all_ops()) - TRAINING_OPS
    assert sorted(forward_ops - set(GRADIENTS) - set(NO_GRADIENT)) == []
    # an exception for an op that has a rule is stale
    assert sorted(set(NO_GRADIENT) & set(GRADIENTS)) == []


def test_the_ops_of_a_training_steps_forward_pass_have_rules():
    # In training mode bn becomes bn_train (a training op) and a dropout or drop_path a mul
    # by its mask: the ops the backward pass meets, checked above (CASES bn*, dropout,
    # drop_path).
    source = (
        "network n(x: 3x6x6) { a = x -> conv(4, 3, pad=1) -> bn -> relu -> dropout(0.2)  "
        "y = a -> conv(4, 1) -> drop_path(0.1)  add(a, y) -> gap -> fc(3) }"
    )
    forward = _forward(source)
    graph = Graph("step")
    vmap = {id(v): graph.add_input(v.name, v.type) for v in forward.params.values()}
    vmap.update({id(v): graph.add_input(v.name, v.type) for v in forward.inputs})
    nodes, _, masks = training_forward(forward, graph, vmap)
    ops = {n.op for n in nodes}
    assert len(masks) == 2
    assert ops & TRAINING_OPS == {"bn_train"}
    assert "mul" in ops and "bn" not in ops and "dropout" not in ops
    assert sorted(ops - set(GRADIENTS)) == []
