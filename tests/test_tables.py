"""Every op has a rule in every table that applies to it: its layer in the language, its
shape rule, its interpreter kernel, its ONNX export, its ONNX import and its line in a
decompiled program. One sample program per op exercises all of them at once."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import assert_agree, ort_session

import cnnc
from cnnc.backends.kernels import KERNELS
from cnnc.backends.onnx_export import EMITTERS, max_opset
from cnnc.backends.program import WRITERS
from cnnc.frontend.onnx_import import load_onnx
from cnnc.ops import all_ops
from cnnc.ops.train import TRAINING_OPS

# One program per IR op that makes that op (at -O0, or at -O2 for the fused forms).
SAMPLES: dict[str, str] = {
    "conv": "network n(x: 3x9x9) { conv(4, 3, stride=2, pad=(1, 0, 2, 1)) }",
    "conv_transpose": (
        "network n(x: 4x5x5) { conv_transpose(6, 3, stride=2, pad=(1, 0, 0, 1), output_pad=1, "
        "groups=2) }"
    ),
    "fc": "network n(x: 3x4x4) { fc(5) }",
    "flatten": "network n(x: 3x4x4) { flatten }",
    "maxpool": "network n(x: 3x9x9) { maxpool(3, stride=2, pad=1, ceil=true) }",
    "avgpool": "network n(x: 3x9x9) { avgpool(3, stride=2, pad=1, count_include_pad=false) }",
    "gap": "network n(x: 3x5x7) { gap }",
    "global_maxpool": "network n(x: 3x5x7) { global_maxpool }",
    "relu": "network n(x: 3x5x5) { relu }",
    "leaky_relu": "network n(x: 3x5x5) { leaky_relu(0.2) }",
    "clip": "network n(x: 3x5x5) { clip(-0.5, 1.5) }",
    "sigmoid": "network n(x: 3x5x5) { sigmoid }",
    "tanh": "network n(x: 3x5x5) { tanh }",
    "silu": "network n(x: 3x5x5) { silu }",
    "hardsigmoid": "network n(x: 3x5x5) { hardsigmoid }",
    "hardswish": "network n(x: 3x5x5) { hardswish }",
    "gelu": "network n(x: 3x5x5) { a = x -> gelu  b = x -> gelu(tanh)  add(a, b) }",
    "mish": "network n(x: 3x5x5) { mish }",
    "elu": "network n(x: 3x5x5) { elu(0.7) }",
    "softplus": "network n(x: 3x5x5) { a = x -> softplus  b = x -> softplus(2)  add(a, b) }",
    "prelu": "network n(x: 3x5x5) { a = x -> prelu  b = x -> prelu(3)  add(a, b) }",
    "softmax": "network n(x: 3x5x5) { softmax }",
    "bn": "network n(x: 3x5x5) { conv(4, 1) -> relu -> bn }",
    "affine": "network n(x: 3x5x5) { relu -> affine }",
    "lrn": "network n(x: 6x5x5) { lrn(3) }",
    "layernorm": "network n(x: 6x5x5) { a = x -> layernorm(eps=0.01)  b = x -> layernorm(axis=-1)"
    "  add(a, b) }",
    "groupnorm": "network n(x: 6x5x5) { a = x -> groupnorm(2)  b = x -> groupnorm(6)  add(a, b) }",
    "linear": "network n(x: 6x5x5) { a = x -> linear(6)  b = x -> linear(5, axis=-1, bias=false)"
    "  add(a, b) }",
    "scale": "network n(x: 6x5x5) { relu -> layer_scale: scale }",
    "add": "network n(x: 3x5x5) { s = x -> gap  add(x, s, x) }",
    "mul": "network n(x: 3x5x5) { s = x -> gap -> sigmoid  mul(x, s) }",
    "sub": "network n(x: 3x5x5) { s = x -> gap  sub(x, s) }",
    "div": "network n(x: 3x5x5) { s = x -> sigmoid  div(x, s) }",
    "concat": "network n(x: 3x5x5) { a = x -> relu  concat(x, a) }",
    "dropout": "network n(x: 3x5x5) { dropout(0.3) }",
    "reshape": "network n(x: 4x6x6) { reshape((2, 2, 36)) }",
    "transpose": "network n(x: 4x6x6) { reshape((2, 2, 36)) -> transpose((2, 1, 3)) }",
    "drop_path": "network n(x: 3x5x5) { y = x -> conv(3, 1) -> drop_path(0.2)  add(x, y) }",
    "pad": "network n(x: 3x6x7) { pad((1, 0, 2, 3), reflect) -> pad(1, edge) -> "
    "pad((2, -1), value=0.5) }",
    "split": "network n(x: 6x4x4) { a, b, c = x -> split((1, 2, 3))  d = a -> relu  "
    "concat(c, d, b) }",
    "slice": "network n(x: 6x5x5) { slice(1, -1) -> slice(-3, 100, axis=3) }",
    "crop": "network n(x: 3x6x6) { conv(4, 3, pad=3) -> crop(x, offset=(2, 1)) }",
    "upsample": "network n(x: 3x5x7) {"
    " a = x -> upsample(scale=(2, 1.5), mode=bilinear) -> upsample(size=(7, 7))"
    " b = x -> upsample(size=(14, 7), mode=nearest_exact)"
    " -> upsample(scale=(0.5, 1), mode=bilinear, align_corners=true)  add(a, b) }",
    "adaptive_avgpool": "network n(x: 3x5x7) {"
    " a = x -> adaptive_avgpool((3, 4))  b = x -> adaptive_avgpool(1)  mul(a, b) }",
    "adaptive_maxpool": "network n(x: 3x5x7) {"
    " a = x -> adaptive_maxpool((7, 9))  b = x -> adaptive_maxpool(1)  add(a, b) }",
}

# What an op imports back as when that is not itself: a crop of fixed sizes exports as a
# Slice with constant bounds, which is a slice (a crop to sizes known at run time only, in
# a fully convolutional network, exports with Shape and imports back as a crop).
IMPORTS_AS = {"crop": "slice"}

# Ops left out of a table, with the reason. The training ops (gradients, losses, optimizer
# updates) are made only by the training-step transformation, never by a program: no
# language layer, no line of a decompiled program (the step is decompiled as the network
# it trains). Their interpreter and ONNX rules are checked here and in test_training.py.
NOT_IN_TABLE: dict[str, dict[str, str]] = {
    "language": {op: "made only by the training-step transformation" for op in TRAINING_OPS},
    "onnx": {},
    "program": {op: "made only by the training-step transformation" for op in TRAINING_OPS},
}

FORWARD_OPS = set(all_ops()) - TRAINING_OPS


def test_every_op_has_a_sample_program():
    assert sorted(FORWARD_OPS - set(SAMPLES)) == []
    assert sorted(set(SAMPLES) - FORWARD_OPS) == []


@pytest.mark.parametrize(
    ("table", "rules"),
    [("interpreter", KERNELS), ("onnx", EMITTERS), ("program", WRITERS)],
)
def test_every_op_has_a_rule_in_each_table(table, rules):
    exceptions = NOT_IN_TABLE.get(table, {})
    assert sorted(set(all_ops()) - set(rules) - set(exceptions)) == []


def _ops(graph) -> set[str]:
    return {n.op for n in graph.nodes}


@pytest.mark.parametrize("op", sorted(SAMPLES))
def test_each_op_compiles_runs_exports_imports_and_decompiles(op):
    model = cnnc.compile(SAMPLES[op], opt_level=0)
    assert op in _ops(model.graph)
    xs = model.random_inputs(2, seed=3)
    ours = model.run_all_outputs(*xs)
    for opset in sorted({13, 17, max_opset()}):
        proto = model.to_onnx(opset=opset)
        onnx.checker.check_model(proto, full_check=True)
        theirs = ort_session(proto).run(None, dict(zip(model.input_names, xs, strict=True)))
        for a, b in zip(ours, theirs, strict=True):
            assert_agree(a, b, f"{op} at opset {opset}")
        back = IMPORTS_AS.get(op, op)
        assert back in _ops(load_onnx(proto)), f"{op} does not import back at opset {opset}"
    text, weights = model.to_program()
    back = cnnc.compile(text, opt_level=0)
    assert op in _ops(back.graph)
    for name, array in weights.items():
        back.graph.params[name].set_data(array)
    for a, b in zip(back.run_all_outputs(*xs), ours, strict=True):
        np.testing.assert_array_equal(a, b)
