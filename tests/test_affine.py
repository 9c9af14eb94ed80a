"""Per-channel scales and shifts (bn, affine, scale): merge-affine, fold-affine, their ONNX
forms (one Mul, one Add, nothing, one BatchNormalization), and exports that leave no
initializer unread and pass the full ONNX check at the IR version they declare."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import EXAMPLES
from helpers import assert_agree, ort_session
from onnx import helper

import cnnc
from cnnc.backends import onnx_export


def compiled(text: str, passes: list[str]) -> tuple[cnnc.Model, cnnc.Model]:
    """The program unoptimized, and after ``passes`` (the same weights: they are seeded)."""
    return cnnc.compile(text, opt_level=0), cnnc.compile(text, passes=passes)


def ops(model: cnnc.Model) -> list[str]:
    return [n.op for n in model.graph.nodes]


def onnx_ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def unread_initializers(model: onnx.ModelProto) -> list[str]:
    read = {name for n in model.graph.node for name in n.input}
    read |= {v.name for v in model.graph.output}
    return [t.name for t in model.graph.initializer if t.name not in read]


def assert_same_network(before: cnnc.Model, after: cnnc.Model) -> onnx.ModelProto:
    """After the passes the network computes what it did, in the interpreter and exported
    to onnxruntime, on a random batch of 2; returns the export."""
    x = before.random_input(batch=2, seed=3)
    expected = before.run(x)
    assert_agree(after.run(x), expected, "interpreter")
    exported = after.to_onnx()
    onnx.checker.check_model(exported, full_check=True)
    assert unread_initializers(exported) == []
    assert_agree(ort_session(exported).run(None, {"image": x})[0], expected, "onnxruntime")
    return exported


# ---- merge-affine ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chain", "merged"),
    [
        ("affine -> affine -> scale", ["affine"]),
        ("scale -> scale", ["scale"]),
        ("bn -> affine -> scale", ["bn"]),
        ("affine -> bn", ["bn"]),
        ("scale -> bn -> bn", ["bn"]),
    ],
)
def test_consecutive_per_channel_ops_merge_into_one(chain, merged):
    before, after = compiled(f"network n(image: 4x5x5) {{ {chain} -> relu }}", ["merge-affine"])
    assert ops(after) == [*merged, "relu"]
    exported = assert_same_network(before, after)
    assert onnx_ops(exported) == [{"affine": "BatchNormalization", "bn": "BatchNormalization",
                                   "scale": "Mul"}[merged[0]], "Relu"]  # fmt: skip


def test_a_value_read_twice_between_two_affines_keeps_them_apart():
    text = "network n(image: 4x5x5) {\n a = affine\n b = a -> affine\n add(a, b)\n}"
    before, after = compiled(text, ["merge-affine"])
    assert ops(after) == ["affine", "affine", "add"]
    assert_same_network(before, after)


# ---- fold-affine ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layers", "left"),
    [
        ("affine -> conv(6, 3)", ["conv"]),
        ("bn -> conv(6, 3, stride=2, bias=false)", ["conv"]),
        ("scale -> conv(6, 3, pad=1)", ["conv"]),
        ("affine -> conv(6, 3, groups=2)", ["conv"]),
        ("scale -> conv(4, 3, pad=1, groups=4)", ["conv"]),  # depthwise, padded
        ("affine -> conv(4, 3, groups=4)", ["conv"]),  # depthwise
        ("affine -> fc(7)", ["flatten", "fc"]),
        ("gap -> flatten -> affine -> fc(7, bias=false)", ["gap", "flatten", "fc"]),
        ("affine -> linear(7)", ["linear"]),
        ("scale -> conv_transpose(3, 2, stride=2)", ["conv_transpose"]),
    ],
)
def test_an_affine_before_a_layer_folds_into_its_weights(layers, left):
    before, after = compiled(f"network n(image: 4x6x6) {{ {layers} }}", ["fold-affine"])
    assert ops(after) == left
    assert_same_network(before, after)


@pytest.mark.parametrize(
    "layers",
    [
        "affine -> conv(6, 3, pad=1)",  # padding: a shift of the padded zeros is not exact
        "bn -> conv(4, 3, pad=1, groups=4)",
        "affine -> conv_transpose(3, 2, stride=2)",  # a shift sums over fewer taps at the borders
        "\n a = affine\n b = a -> conv(6, 1)\n c = a -> conv(6, 1)\n add(b, c)\n",  # two readers
    ],
)
def test_a_shift_that_would_not_fold_exactly_stays(layers):
    before, after = compiled(f"network n(image: 4x6x6) {{ {layers} }}", ["fold-affine"])
    assert ops(after) == ops(before)
    assert_same_network(before, after)


def test_the_O2_pipeline_leaves_one_bn_of_a_bn_mul_add_and_no_affine_before_a_conv():
    text = "network n(image: 4x6x6) { bn -> scale -> affine -> relu -> affine -> conv(6, 3) }"
    before, after = compiled(text, None)
    assert ops(after) == ["bn", "relu", "conv"]
    assert_same_network(before, after)


# ---- the ONNX forms of an affine --------------------------------------------------------------


def affine_model(scale, shift, after: str = "-> relu") -> cnnc.Model:
    model = cnnc.compile(f"network n(image: 4x3x3) {{ a: affine {after} }}", opt_level=0)
    model.graph.params["a.weight"].set_data(np.asarray(scale, np.float32))
    model.graph.params["a.bias"].set_data(np.asarray(shift, np.float32))
    return model


@pytest.mark.parametrize(
    ("scale", "shift", "form"),
    [
        ([1, 2, 3, 4], [0, 0, 0, 0], ["Mul", "Relu"]),
        ([1, 1, 1, 1], [0, -1, 0, 2], ["Add", "Relu"]),
        ([1, 1, 1, 1], [0, 0, 0, 0], ["Relu"]),
        ([1, 2, 3, 4], [0, -1, 0, 2], ["BatchNormalization", "Relu"]),
    ],
)
def test_an_affine_exports_as_one_mul_one_add_nothing_or_one_batch_norm(scale, shift, form):
    model = affine_model(scale, shift)
    exported = model.to_onnx()
    assert onnx_ops(exported) == form
    onnx.checker.check_model(exported, full_check=True)
    assert unread_initializers(exported) == []
    x = model.random_input(batch=2)
    assert_agree(ort_session(exported).run(None, {"image": x})[0], model.run(x))


def test_an_identity_affine_that_is_the_output_is_an_identity_node():
    model = affine_model([1, 1, 1, 1], [0, 0, 0, 0], after="")
    exported = model.to_onnx()
    assert onnx_ops(exported) == ["Identity"]
    assert [v.name for v in exported.graph.output] == [model.graph.outputs[0].name]
    x = model.random_input(batch=2)
    assert_agree(ort_session(exported).run(None, {"image": x})[0], x)


def test_a_mul_keeps_the_parameters_name_in_the_shape_that_broadcasts():
    exported = affine_model([1, 2, 3, 4], [0, 0, 0, 0]).to_onnx()
    (weight,) = exported.graph.initializer
    assert weight.name == "a.weight" and list(weight.dims) == [4, 1, 1]


# ---- every export: no unread initializer, the IR version its opsets and functions need ----


def _skeleton_unread(graph) -> list[str]:
    """The initializers of the graph's export that no node reads, without computing them."""
    model, tensors = onnx_export.skeleton(graph)
    read = {name for n in model.graph.node for name in n.input}
    read |= {v.name for v in model.graph.output}
    return [t.name for t in tensors if t.name not in read]


def test_no_example_exports_an_initializer_that_no_node_reads_at_O0_or_O2():
    # Each example compiled once: its -O0 graph, then the same graph optimized in place.
    unread = {}
    for path in sorted(EXAMPLES.glob("*.cnn")):
        model = cnnc.compile(path, opt_level=0)
        unread[f"{path.stem} -O0"] = _skeleton_unread(model.graph)
        cnnc.api.optimize(model.graph, 2)
        unread[f"{path.stem} -O2"] = _skeleton_unread(model.graph)
    assert {k: v for k, v in unread.items() if v} == {}


@pytest.mark.parametrize("opset", [13, 14, 15, 17])
def test_a_model_with_functions_declares_an_ir_version_that_has_them(opset):
    model = cnnc.compile("network n(image: 3x8x8) { conv(4, 3) -> silu -> affine }")
    exported = model.to_onnx(opset=opset)
    assert exported.functions  # conv+silu is a model-local function
    opsets = [helper.make_opsetid("", opset)]
    assert exported.ir_version == max(8, helper.find_min_ir_version_for(opsets))
    onnx.checker.check_model(exported, full_check=True)
    x = model.random_input(batch=1)
    assert_agree(ort_session(exported).run(None, {"image": x})[0], model.run(x))
