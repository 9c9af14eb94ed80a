"""The training step in ONNX: every training op's export agrees with its interpreter kernel,
and whole steps (LeNet-5 with SGD, Adam and AdamW; a network with batch norm and dropout)
give in onnxruntime the new parameters, state and loss that the interpreter gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import assert_agree, ort_session

from cnnc import weights
from cnnc.backends.interpreter import Interpreter
from cnnc.backends.onnx_export import EMITTERS, max_opset, to_onnx
from cnnc.backends.train_export import TRAIN_MIN_OPSET, check_training_opset
from cnnc.errors import UsageError
from cnnc.frontend.lower import lower
from cnnc.frontend.parser import parse
from cnnc.ir.graph import Graph
from cnnc.ir.types import TensorType
from cnnc.ops.activation import ACTIVATIONS
from cnnc.ops.train import TRAINING_OPS
from cnnc.train.step import Optimizer, build_step

OPSETS = sorted({TRAIN_MIN_OPSET, 17, max_opset()})


def _forward(source: str) -> Graph:
    graph = lower(parse(source), None)
    weights.initialize(graph, 0)
    return graph


def _one_node(op: str, inputs: list[tuple[str, TensorType]], attrs: dict) -> Graph:
    graph = Graph(f"{op}_test")
    values = [graph.add_input(name, t) for name, t in inputs]
    graph.outputs = list(graph.add_node(op, values, attrs, name=op).outputs)
    return graph


def _both(graph: Graph, feeds: dict[str, np.ndarray], opset: int = 17):
    """The graph's outputs in the interpreter and in onnxruntime (after the full check).
    One thread: the interpreter would split the batch of a one-op graph whose outputs all
    have a batch axis between threads, but bn_train and the losses' gradients mix the items
    (a training step has a loss without one, so it never splits)."""
    ours = Interpreter(graph, threads=1).run(*[feeds[v.name] for v in graph.inputs])
    model = to_onnx(graph, opset)
    onnx.checker.check_model(model, full_check=True)
    theirs = ort_session(model).run(None, feeds)
    return ours, theirs, model


def _check(graph: Graph, feeds: dict[str, np.ndarray], opsets=(17,)) -> None:
    for opset in opsets:
        ours, theirs, _ = _both(graph, feeds, opset)
        for v, a, b in zip(graph.outputs, ours, theirs, strict=True):
            assert a.dtype == b.dtype, f"%{v.name}: {a.dtype} and {b.dtype}"
            assert_agree(a, b, f"{graph.name} %{v.name} at opset {opset}")


def _f(shape, rng, scale=1.0, dtype=np.float32) -> np.ndarray:
    return (scale * rng.standard_normal(shape)).astype(dtype)


def test_every_training_op_has_an_emitter():
    assert sorted(TRAINING_OPS - set(EMITTERS)) == []


def test_opsets_below_16_are_refused():
    check_training_opset(TRAIN_MIN_OPSET)
    graph = _one_node(
        "reduce_sum", [("x", TensorType("f32", ("N", 3)))], {"axes": (0,), "keepdims": False}
    )
    with pytest.raises(UsageError, match="opset 16 or newer"):
        to_onnx(graph, 15)


# ---- one op at a time -------------------------------------------------------------------------

CONVS = [
    # input, the layer: groups and asymmetric pads, dilation, stride above the kernel, 1-D,
    # depthwise, and a last window that leaves pixels unread
    ("4x9x11", "conv(6, 3, stride=2, pad=(1, 0, 2, 1), groups=2)"),
    ("3x10x9", "conv(4, 3, dilation=2, pad=(2, 1))"),
    ("2x11x11", "conv(3, 2, stride=3, dilation=2, pad=(0, 1, 1, 0))"),
    ("3x17", "conv(4, 3, stride=2, dilation=2, pad=(2, 1))"),
    ("4x8x8", "conv(4, 3, stride=2, pad=1, groups=4)"),
    ("6x12x7", "conv(6, (3, 2), stride=(2, 3), groups=3)"),
    # kernels of more than 9 taps take the other form (a Conv by dy)
    ("4x13x12", "conv(6, 5, stride=2, dilation=(1, 2), pad=(2, 0, 1, 3), groups=2)"),
    ("3x30", "conv(4, 11, stride=3, pad=(4, 2))"),
    ("3x9x9", "conv(3, (2, 5), groups=3)"),
    # more output channels than positions: the columns move and one MatMul sums the batch
    ("3x4x4", "conv(20, 3, pad=1)"),
    ("4x3x3", "conv(12, 3, pad=(1, 0, 1, 2), groups=2)"),
    ("3x5", "conv(8, 3, stride=2)"),
]


@pytest.mark.parametrize(("shape", "layer"), CONVS)
def test_conv_grad_weight(shape, layer):
    forward = _forward(f"network n(x: {shape}) {{ {layer} }}")
    conv = forward.nodes[0]
    x, w = conv.inputs[0], conv.inputs[1]
    attrs = {k: conv.attrs[k] for k in ("stride", "pads", "dilation", "groups")}
    attrs["kernel"] = tuple(w.shape[2:])
    graph = _one_node("conv_grad_weight", [("x", x.type), ("dy", conv.output.type)], attrs)
    rng = np.random.default_rng(1)
    feeds = {"x": _f((2, *x.shape[1:]), rng), "dy": _f((2, *conv.output.shape[1:]), rng)}
    _check(graph, feeds, OPSETS)


@pytest.mark.parametrize(
    ("shape", "layer", "summed"),
    [("4x8x8", "conv(6, 3, pad=1)", True), ("4x4x4", "conv(20, 3, pad=1, groups=2)", False)],
)
def test_conv_grad_weight_sums_the_items_only_where_the_products_are_smaller(shape, layer, summed):
    """A MatMul per item and a sum over the batch where dy has fewer channels than positions;
    otherwise the columns move to [g, C/g·taps, N·positions] and one MatMul per group sums."""
    forward = _forward(f"network n(x: {shape}) {{ {layer} }}")
    conv = forward.nodes[0]
    attrs = {k: conv.attrs[k] for k in ("stride", "pads", "dilation", "groups")}
    attrs["kernel"] = tuple(conv.inputs[1].shape[2:])
    inputs = [("x", conv.inputs[0].type), ("dy", conv.output.type)]
    graph = _one_node("conv_grad_weight", inputs, attrs)
    ops = [n.op_type for n in to_onnx(graph, 17).graph.node]
    assert ops.count("MatMul") == 1
    assert ("ReduceSum" in ops) == summed


def test_reduce_sum():
    rng = np.random.default_rng(2)
    t = TensorType("f32", ("N", 3, 4, 5))
    for axes, keep in (((0, 2, 3), False), ((1,), True), ((0,), False)):
        graph = _one_node("reduce_sum", [("x", t)], {"axes": axes, "keepdims": keep})
        _check(graph, {"x": _f((2, 3, 4, 5), rng)}, OPSETS)


@pytest.mark.parametrize(("trans_a", "trans_b"), [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_matmul(trans_a, trans_b):
    a_shape = (5, 3) if trans_a else (3, 5)
    b_shape = (4, 5) if trans_b else (5, 4)
    inputs = [("a", TensorType("f32", a_shape)), ("b", TensorType("f32", b_shape))]
    graph = _one_node("matmul", inputs, {"trans_a": bool(trans_a), "trans_b": bool(trans_b)})
    rng = np.random.default_rng(3)
    _check(graph, {"a": _f(a_shape, rng), "b": _f(b_shape, rng)})


POOLS = [
    # input, the layer, whether its windows tile the map (the mask form in ONNX; the
    # others take MaxPool's Indices and ScatterElements)
    ("3x8x8", "maxpool(2)", True),
    ("4x6x6", "maxpool(3)", True),
    ("3x8", "maxpool(4)", True),
    ("3x9x8", "maxpool(2)", False),  # a row no window reaches
    ("3x9x9", "maxpool(3, stride=2, pad=1, ceil=true)", False),  # overlapping windows add up
    ("2x9x10", "maxpool(2, stride=1, dilation=2, pad=(1, 0, 0, 1))", False),
    ("3x11", "maxpool(3, stride=2, pad=1, ceil=true)", False),
    ("2x7x7", "maxpool(3, stride=1)", False),
    ("16x32x32", "maxpool(3, stride=2, pad=1)", False),  # ResNet's stem pool
    ("16x29x29", "maxpool(3, stride=2, ceil=true)", False),  # GoogLeNet's: the last window
    ("16x14x14", "maxpool(3, stride=1, pad=1)", False),  # reaches past the map; Inception's
]


@pytest.mark.parametrize(("shape", "layer", "tiled"), POOLS)
@pytest.mark.parametrize("ties", [False, True])
def test_maxpool_grad(shape, layer, tiled, ties):
    forward = _forward(f"network n(x: {shape}) {{ {layer} }}")
    pool = forward.nodes[0]
    x = pool.inputs[0]
    attrs = {k: pool.attrs[k] for k in ("kernel", "stride", "pads", "dilation", "ceil")}
    graph = _one_node("maxpool_grad", [("x", x.type), ("dy", pool.output.type)], attrs)
    rng = np.random.default_rng(4)
    for batch in (1, 2):
        dims = (batch, *x.shape[1:])
        # With ties (values 0, 1 and 2), each window's gradient must go to the same input
        # in both: the first of its largest.
        xs = rng.integers(0, 3, dims).astype(np.float32) if ties else _f(dims, rng)
        _check(graph, {"x": xs, "dy": _f((batch, *pool.output.shape[1:]), rng)}, OPSETS)
    nodes = to_onnx(graph, 17).graph.node
    assert ("ScatterElements" not in {n.op_type for n in nodes}) == tiled
    indices = [n for n in nodes if n.op_type == "MaxPool" and len(n.output) == 2]
    assert bool(indices) == (not tiled)


def test_maxpool_grad_of_a_padded_window_never_takes_the_padding():
    """Windows whose inputs are all negative, at the map's border: the padding must not win
    them (a form that reads the taps by a Conv sees 0 there); each gradient goes to a real
    input, the first of its largest, as in the interpreter."""
    forward = _forward("network n(x: 4x9x9) { maxpool(3, stride=2, pad=1, ceil=true) }")
    pool = forward.nodes[0]
    attrs = {k: pool.attrs[k] for k in ("kernel", "stride", "pads", "dilation", "ceil")}
    graph = _one_node("maxpool_grad", [("x", pool.inputs[0].type), ("dy", pool.output.type)], attrs)
    rng = np.random.default_rng(6)
    xs = -rng.integers(1, 3, (2, 4, 9, 9)).astype(np.float32)  # -1 and -2: ties below 0
    dy = _f((2, *pool.output.shape[1:]), rng)
    ours, theirs, _ = _both(graph, {"x": xs, "dy": dy})
    assert_agree(theirs[0], ours[0], "maxpool_grad on negative inputs")
    assert np.isclose(ours[0].sum(), dy.sum(), rtol=1e-5)  # no gradient lost to padding


def test_maxpool_grad_with_minus_inf_inputs_agrees():
    """-inf inputs (a pad by -inf that fuse-pad leaves before a ceil-mode pool) never win a
    window that holds a finite input, and do not disturb the choice among the others: a
    form that reads the taps by a Conv of one-hot weights would get NaN there (0·inf)."""
    forward = _forward("network n(x: 4x11x11) { maxpool(3, stride=2, ceil=true) }")
    pool = forward.nodes[0]
    attrs = {k: pool.attrs[k] for k in ("kernel", "stride", "pads", "dilation", "ceil")}
    graph = _one_node("maxpool_grad", [("x", pool.inputs[0].type), ("dy", pool.output.type)], attrs)
    rng = np.random.default_rng(7)
    xs = rng.integers(0, 3, (2, 4, 11, 11)).astype(np.float32)
    xs[:, :, 0, :] = -np.inf  # a row and a column of -inf, as a pad by -inf leaves them
    xs[:, :, :, -1] = -np.inf
    _check(graph, {"x": xs, "dy": _f((2, *pool.output.shape[1:]), rng)})


def test_maxpool_grad_in_float64_takes_the_indices():
    """onnxruntime has no float64 Resize: a float64 pool that tiles its map takes the
    indices form, and agrees, ties included."""
    x = TensorType("f64", ("N", 3, 6, 6))
    dy = TensorType("f64", ("N", 3, 3, 3))
    attrs = {"kernel": (2, 2), "stride": (2, 2), "pads": (0,) * 4, "dilation": (1, 1)}
    graph = _one_node("maxpool_grad", [("x", x), ("dy", dy)], {**attrs, "ceil": False})
    rng = np.random.default_rng(5)
    xs = rng.integers(0, 3, (2, 3, 6, 6)).astype(np.float64)
    _check(graph, {"x": xs, "dy": _f((2, 3, 3, 3), rng, dtype=np.float64)})
    assert "ScatterElements" in {n.op_type for n in to_onnx(graph, 17).graph.node}


ACTIVATION_LAYERS = [
    "relu",
    "leaky_relu(0.2)",
    "clip(-0.5, 1.5)",
    "clip(0, 6)",
    "sigmoid",
    "tanh",
    "silu",
    "hardsigmoid",
    "hardswish",
    "gelu",
    "gelu(tanh)",
    "mish",
    "elu(0.7)",
    "softplus",
    "softplus(2)",
]


def test_every_activation_has_a_case():
    assert {layer.split("(")[0] for layer in ACTIVATION_LAYERS} == set(ACTIVATIONS)


@pytest.mark.parametrize("layer", ACTIVATION_LAYERS)
def test_activation_grad(layer):
    forward = _forward(f"network n(x: 3x5x5) {{ {layer} }}")
    act = forward.nodes[0]
    attrs = {"activation": act.op, "activation_attrs": dict(act.attrs)}
    t = act.inputs[0].type
    graph = _one_node("activation_grad", [("x", t), ("dy", t)], attrs)
    rng = np.random.default_rng(5)
    _check(graph, {"x": _f((4, 3, 5, 5), rng, 3.0), "dy": _f((4, 3, 5, 5), rng)})


def test_losses():
    rng = np.random.default_rng(6)
    logits, labels = TensorType("f32", ("N", 7)), TensorType("i64", ("N",))
    feeds = {"logits": _f((5, 7), rng, 3.0), "labels": rng.integers(0, 7, 5)}
    for op in ("softmax_cross_entropy", "softmax_cross_entropy_grad"):
        graph = _one_node(op, [("logits", logits), ("labels", labels)], {})
        _check(graph, feeds, OPSETS)
    t = TensorType("f32", ("N", 3, 4))
    feeds = {"pred": _f((2, 3, 4), rng), "target": _f((2, 3, 4), rng)}
    for op in ("mse_loss", "mse_loss_grad"):
        _check(_one_node(op, [("pred", t), ("target", t)], {}), feeds, OPSETS)


@pytest.mark.parametrize(
    ("shape", "batch", "dtype"),
    [
        ((4, 5, 6), 3, "f32"),
        ((4,), 5, "f32"),
        ((3, 7), 2, "f32"),
        ((4,), 1, "f32"),
        ((3, 4, 5), 2, "f64"),
    ],
)
def test_batch_norm(shape, batch, dtype):
    # batch 1 of [N, 4]: one item per channel, whose unbiased variance is the biased one
    rng = np.random.default_rng(7)
    channels = shape[0]
    x = TensorType(dtype, ("N", *shape))
    c = TensorType(dtype, (channels,))
    np_dtype = x.numpy_dtype
    stats = [("running_mean", c), ("running_var", c)]
    graph = _one_node(
        "bn_train",
        [("x", x), ("weight", c), ("bias", c), *stats],
        {"epsilon": 1e-5, "momentum": 0.1},
    )
    feeds = {
        "x": _f((batch, *shape), rng, 2.0, dtype=np_dtype) + 1.0,
        "weight": _f((channels,), rng, dtype=np_dtype),
        "bias": _f((channels,), rng, dtype=np_dtype),
        "running_mean": _f((channels,), rng, dtype=np_dtype),
        "running_var": np.abs(_f((channels,), rng, dtype=np_dtype)) + 0.5,
    }
    _check(graph, feeds, OPSETS)
    ours = Interpreter(graph, threads=1).run(*feeds.values())
    inputs = [("x", x), ("weight", c), ("mean", c), ("invstd", c), ("dy", x)]
    grad = _one_node("bn_grad", inputs, {})
    grad_feeds = {
        "x": feeds["x"],
        "weight": feeds["weight"],
        "mean": ours[1],
        "invstd": ours[2],
        "dy": _f((batch, *shape), rng, dtype=np_dtype),
    }
    _check(grad, grad_feeds, OPSETS)


SGDS = [
    {"momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0},
    {"momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 0.01},
    {"momentum": 0.9, "dampening": 0.1, "nesterov": False, "weight_decay": 0.0},
    {"momentum": 0.9, "dampening": 0.0, "nesterov": True, "weight_decay": 1e-4},
]


@pytest.mark.parametrize("attrs", SGDS)
@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_sgd_update(attrs, dtype):
    rng = np.random.default_rng(8)
    t = TensorType(dtype, (3, 4))
    inputs = [("param", t), ("grad", t), ("lr", TensorType("f32", ()))]
    if attrs["momentum"]:
        inputs.append(("buf", t))
    graph = _one_node("sgd_update", inputs, attrs)
    np_dtype = t.numpy_dtype
    feeds = {name: _f((3, 4), rng, dtype=np_dtype) for name, _ in inputs}
    feeds["lr"] = np.array(0.1, np.float32)
    _check(graph, feeds)


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_adam_update(decoupled, dtype):
    rng = np.random.default_rng(9)
    t = TensorType(dtype, (5,))
    scalar = TensorType("f32", ())
    inputs = [("param", t), ("grad", t), ("m", t), ("v", t), ("step", scalar), ("lr", scalar)]
    attrs = {"beta1": 0.8, "beta2": 0.99, "eps": 1e-6, "weight_decay": 0.05}
    graph = _one_node("adam_update", inputs, {**attrs, "decoupled": decoupled})
    np_dtype = t.numpy_dtype
    feeds = {
        "param": _f((5,), rng, dtype=np_dtype),
        "grad": _f((5,), rng, dtype=np_dtype),
        "m": _f((5,), rng, 0.1, np_dtype),
        "v": np.abs(_f((5,), rng, 0.1, np_dtype)),
        "step": np.array(3.0, np.float32),
        "lr": np.array(0.01, np.float32),
    }
    _check(graph, feeds, OPSETS)


# ---- whole steps ------------------------------------------------------------------------------

LENET = (Path(__file__).parent.parent / "examples" / "lenet5.cnn").read_text()
# The convolutions before a bn have no bias, as in torchvision: such a bias's gradient is 0
# up to rounding, which Adam's normalised step would turn into steps of lr in random
# directions, different in every engine.
BN_DROPOUT = """
block res(c) {
    y = in -> conv(c, 3, pad=1, bias=false) -> bn -> relu -> drop_path(0.25)
    add(in, y)
}
network n(image: 3x12x12) {
    conv(8, 3, stride=2, pad=(1, 0, 1, 0), bias=false) -> bn -> relu
    res(8)
    conv(8, 3, pad=2, dilation=2, groups=2, bias=false) -> bn -> silu -> maxpool(2)
    dropout(0.3) -> fc(10)
}
"""


def _feeds(step, forward: Graph, batch: int, seed: int) -> dict[str, np.ndarray]:
    """Every input of a training step: the network's weights, zero optimizer state (as
    torch.optim starts), a random batch, labels, a learning rate and dropout masks."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {n: forward.params[n].data for n in step.params}
    feeds.update({n: forward.params[n].data for n in step.statistics})
    feeds.update(step.initial_optimizer_state())
    for name in step.data:
        shape = next(v.shape for v in forward.inputs if v.name == name)
        feeds[name] = _f((batch, *shape[1:]), rng)
    classes = forward.outputs[0].shape[1]
    feeds[step.target] = rng.integers(0, classes, batch)
    feeds[step.lr] = np.array(0.05, np.float32)
    feeds.update(step.draw_masks(batch, rng))
    return feeds


def _one_step(source: str, optimizer: Optimizer, batch: int = 4):
    forward = _forward(source)
    step = build_step(forward, optimizer=optimizer)
    feeds = _feeds(step, forward, batch, seed=10)
    ours, theirs, model = _both(step.graph, feeds)
    return step, feeds, ours, theirs, model


def _assert_step_agrees(step, ours, theirs) -> None:
    names = [v.name for v in step.graph.outputs]
    assert names[: len(step.state)] == [f"{n}.new" for n in step.state]
    assert names[len(step.state)] == "loss"
    for name, a, b in zip(names, ours, theirs, strict=True):
        assert_agree(a, b, f"{step.graph.name} %{name}")


OPTIMIZERS = {
    "sgd": Optimizer("sgd", momentum=0.9, nesterov=True, weight_decay=1e-4),
    "adam": Optimizer("adam", weight_decay=1e-3),
    "adamw": Optimizer("adamw", betas=(0.8, 0.99), weight_decay=0.01),
}


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_lenet_step_agrees(kind):
    step, feeds, ours, theirs, _ = _one_step(LENET, OPTIMIZERS[kind])
    _assert_step_agrees(step, ours, theirs)
    # The step changed every parameter (the comparison above is not of unchanged inputs).
    for i, name in enumerate(step.params):
        assert not np.array_equal(ours[i], feeds[name]), name


def test_a_relu_before_a_maxpool_runs_after_it_with_the_same_step(monkeypatch):
    """The step computes relu(maxpool(x)) for maxpool(relu(x)): the same loss and new
    parameters as the step in the network's order, bit for bit, on integer maps full of
    ties, zeros and windows without a positive value; onnxruntime agrees. A relu with a
    second use stays where it is."""
    from cnnc.train import step as step_module

    source = """network n(x: 2x8x8) {
        conv(4, 3, pad=1, bias=false) -> relu -> maxpool(2)
        conv(4, 3, pad=1, bias=false) -> relu -> maxpool(2, stride=1)
        fc(3)
    }"""
    forward = _forward(source)
    rng = np.random.default_rng(11)
    for p in forward.params.values():
        p.set_data(rng.integers(-1, 2, p.shape).astype(np.float32))
    swapped = build_step(forward, optimizer=OPTIMIZERS["sgd"])
    ops = [n.op for n in swapped.graph.nodes]
    assert ops[:6] == ["conv", "maxpool", "relu", "conv", "maxpool", "relu"]
    monkeypatch.setattr(step_module, "_relus_before_maxpools", lambda forward: set())
    kept = build_step(forward, optimizer=OPTIMIZERS["sgd"])
    assert [n.op for n in kept.graph.nodes][:6] == ["conv", "relu", "maxpool"] * 2
    feeds = _feeds(swapped, forward, 3, seed=12)
    feeds["x"] = rng.integers(-2, 3, feeds["x"].shape).astype(np.float32)
    ours, theirs, _ = _both(swapped.graph, feeds)
    reference = Interpreter(kept.graph, threads=1).run(*[feeds[v.name] for v in kept.graph.inputs])
    for v, a, b in zip(swapped.graph.outputs, ours, reference, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=v.name)
    _assert_step_agrees(swapped, ours, theirs)

    shared = """network n(x: 2x8x8) {
        r = x -> conv(4, 3, pad=1) -> relu
        p = r -> maxpool(3, stride=1, pad=1)
        add(r, p)
    }"""
    ops = [n.op for n in build_step(_forward(shared), loss="mse").graph.nodes]
    assert ops[:3] == ["conv", "relu", "maxpool"]


def test_lenet_step_in_the_onnx_reference_evaluator():
    from onnx.reference import ReferenceEvaluator

    step, feeds, ours, _, model = _one_step(LENET, OPTIMIZERS["sgd"])
    reference = ReferenceEvaluator(model).run(None, feeds)
    _assert_step_agrees(step, ours, reference)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_step_with_batch_norm_and_dropout_agrees(kind):
    step, feeds, ours, theirs, _ = _one_step(BN_DROPOUT, OPTIMIZERS[kind], batch=3)
    assert len(step.masks) == 2 and len(step.statistics) == 6
    # The masks drop something: the same masks in both is what makes them agree.
    assert all((feeds[m.name] == 0).any() for m in step.masks)
    _assert_step_agrees(step, ours, theirs)
    # Each bn_grad reads its forward pass's x − mean: one Sub of each batch norm's input.
    bns = [n for n in step.graph.nodes if n.op == "bn_train"]
    subs = [n for n in to_onnx(step.graph, 17).graph.node if n.op_type == "Sub"]
    for bn in bns:
        assert sum(n.input[0] == bn.inputs[0].name for n in subs) == 1, bn.name


def test_three_steps_in_onnxruntime_lower_the_loss():
    forward = _forward(LENET)
    step = build_step(forward, optimizer=OPTIMIZERS["adam"])
    feeds = _feeds(step, forward, batch=8, seed=11)
    feeds[step.lr] = np.array(1e-3, np.float32)
    session = ort_session(to_onnx(step.graph))
    losses = []
    for _ in range(3):
        out = session.run(None, feeds)
        losses.append(float(out[len(step.state)]))
        feeds.update(zip(step.state, out, strict=False))
    assert feeds["optimizer.step"] == 3
    assert losses[0] > losses[1] > losses[2], losses


# ---- command line and API ---------------------------------------------------------------------

LENET_PATH = Path(__file__).parent.parent / "examples" / "lenet5.cnn"


def test_compile_train_writes_a_step_that_trains_in_onnxruntime(tmp_path, capsys):
    import cnnc
    from cnnc.cli import main

    out = tmp_path / "step.onnx"
    flags = ["--optimizer", "sgd", "--momentum", "0.9", "--nesterov", "--weight-decay", "1e-4"]
    assert main(["compile", str(LENET_PATH), "--train", "-o", str(out), *flags]) == 0
    report = capsys.readouterr().out
    assert report.startswith(f"wrote {out} (") and "61,706 trained values" in report
    assert "sgd (momentum 0.9, nesterov, weight decay 0.0001)" in report
    onnx.checker.check_model(str(out), full_check=True)
    model = onnx.load(str(out))
    assert model.opset_import[0].version == 17
    optimizer = Optimizer("sgd", momentum=0.9, nesterov=True, weight_decay=1e-4)
    step = cnnc.training_step(LENET_PATH, optimizer=optimizer)
    session = ort_session(model)
    assert [i.name for i in session.get_inputs()] == [v.name for v in step.graph.inputs]
    assert [o.name for o in session.get_outputs()] == [v.name for v in step.graph.outputs]
    props = {p.key: p.value for p in model.metadata_props}
    assert props["cnnc.train.state"].split(",") == step.state
    rng = np.random.default_rng(12)
    feeds = {
        **step.initial_state(seed=3),
        "image": _f((5, 1, 28, 28), rng),
        "labels": rng.integers(0, 10, 5),
        "lr": np.array(0.01, np.float32),
    }
    theirs = session.run(None, feeds)
    ours = Interpreter(step.graph).run(*[feeds[v.name] for v in step.graph.inputs])
    _assert_step_agrees(step, ours, theirs)


def test_compile_train_refuses_what_does_not_apply(tmp_path, capsys):
    from cnnc.cli import main

    out = tmp_path / "step.onnx"
    cases = [
        (["--train", "--opset", "15"], "needs ONNX opset 16 or newer"),
        (
            ["--train", "--weights", str(tmp_path / "w.npz")],
            "--weights does not apply with --train",
        ),
        (["--train", "--optimizer", "adam", "--momentum", "0.9"], "--momentum does not apply"),
        (["--momentum", "0.9"], "--momentum applies to a training step"),
    ]
    for flags, message in cases:
        assert main(["compile", str(LENET_PATH), "-o", str(out), *flags]) == 1
        captured = capsys.readouterr()
        assert message in captured.err and "Traceback" not in captured.err, flags
        assert not out.exists()


def test_dump_train_prints_the_step(capsys):
    from cnnc.cli import main

    assert main(["dump", str(LENET_PATH), "--train", "--optimizer", "adamw"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("network lenet5_train  (-O1: remove-identity, dce)")
    assert text.count("= adamw_update(") == 10
    # the relu before each maxpool runs after it (cnnc/train/step.py)
    assert "= maxpool2d(%c1)" in text
    assert "= relu(%c1.maxpool.max)" in text
    assert "conv_grad_weight(%image, %c1.maxpool.max.grad)" in text


def test_training_step_is_built_before_passes_and_cleaned_up_after():
    import cnnc

    source = "network n(x: 3x8x8) { conv(4, 3) -> relu -> dropout(0) -> gap -> fc(5) }"
    cleaned = cnnc.training_step(source)
    kept = cnnc.training_step(source, clean_up=False)
    ops = [n.op for n in kept.graph.nodes]
    assert "dropout" in ops and "dropout" not in [n.op for n in cleaned.graph.nodes]
    # fuse-conv-act never ran: the relu is its own node, whose gradient needs its input
    assert "relu" in ops and "activation_grad" in ops
    feeds = {**cleaned.initial_state(), "x": np.ones((2, 3, 8, 8), np.float32)}
    feeds.update({"labels": np.array([1, 4]), "lr": np.array(0.1, np.float32)})
    before = Interpreter(kept.graph).run(*[feeds[v.name] for v in kept.graph.inputs])
    after = Interpreter(cleaned.graph).run(*[feeds[v.name] for v in cleaned.graph.inputs])
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)


def test_initial_state_takes_a_weights_file(tmp_path):
    import cnnc

    fresh = cnnc.training_step(BN_DROPOUT, optimizer="sgd").initial_state(seed=5)
    assert np.array_equal(fresh["bn1.running_var"], np.ones(8, np.float32))
    assert np.array_equal(fresh["bn1.weight"], np.ones(8, np.float32))
    rng = np.random.default_rng(13)
    given = {name: _f(a.shape, rng) for name, a in fresh.items()}
    np.savez(tmp_path / "w.npz", **given)
    step = cnnc.training_step(BN_DROPOUT, optimizer="adam", weights=tmp_path / "w.npz")
    state = step.initial_state()
    assert sorted(state) == sorted([*given, *step.optimizer_state])
    for name, array in given.items():
        np.testing.assert_array_equal(state[name], array)
    assert not any(state[name].any() for name in step.optimizer_state)


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "attrs", "flipped"),
    [
        ((6, 15, 15), (6, 4, 3, 3), {"pads": (1, 1, 1, 1)}, True),
        ((6, 14, 16), (6, 3, 3, 2), {"pads": (2, 0, 1, 1), "dilation": (1, 2)}, True),
        ((6, 200), (6, 4, 4), {"pads": (0, 3)}, True),
        # maps of 14×14 or fewer pixels keep ConvTranspose (the flip would cost more)
        ((6, 14, 14), (6, 4, 3, 3), {"pads": (1, 1, 1, 1)}, False),
        ((6, 7), (6, 4, 4), {"pads": (0, 3)}, False),
        # the Conv's im2col would be 4 times ConvTranspose's col2im (8 channels of 5×5 to 2
        # of 7×7)
        ((8, 5, 5), (8, 2, 3, 3), {"pads": (0, 0, 0, 0)}, False),
        ((4, 5, 5), (4, 3, 3, 3), {"pads": (1, 1, 1, 1), "groups": 2}, False),  # 2 groups
        ((4, 5, 5), (4, 3, 2, 2), {"pads": (3, 0, 0, 0)}, False),  # pad beyond the reach
        ((4, 5, 5), (4, 3, 3, 3), {"pads": (1, 1, 1, 1), "stride": (2, 2)}, False),
    ],
)
def test_a_transposed_convolution_of_fed_weights_exports_and_agrees(
    x_shape, w_shape, attrs, flipped
):
    """A convolution's input gradient (conv_transpose of weights that are inputs of the run)
    exports at stride 1 and one group, onto maps of more than 14×14 pixels, as the Conv by
    the transposed, flipped kernels; every form agrees with the interpreter, a bias
    included."""
    rank = len(x_shape) - 1
    full = {"stride": (1,) * rank, "dilation": (1,) * rank, "groups": 1, **attrs}
    full["output_pad"] = (0,) * rank
    groups = full["groups"]
    inputs = [
        ("x", TensorType("f32", ("N", *x_shape))),
        ("w", TensorType("f32", w_shape)),
        ("b", TensorType("f32", (w_shape[1] * groups,))),
    ]
    graph = _one_node("conv_transpose", inputs, full)
    rng = np.random.default_rng(7)
    feeds = {"x": _f((2, *x_shape), rng), "w": _f(w_shape, rng), "b": _f(inputs[2][1].shape, rng)}
    _check(graph, feeds)
    ops = {n.op_type for n in to_onnx(graph, 17).graph.node}
    assert ("ConvTranspose" not in ops) == flipped
