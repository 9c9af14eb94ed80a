"""conv_transpose, PyTorch's ConvTranspose1d/2d: its kernel against onnxruntime and
onnx.reference, its compile-time checks, fold-bn into it, and its ONNX and program round
trips."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
from helpers import ATOL, RTOL, assert_agree, ort_session
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import cnnc
from cnnc.backends import kernels, onnx_export, parallel
from cnnc.backends.interpreter import Interpreter
from cnnc.errors import CnncError, LayerError, ModelFileError, ShapeError
from cnnc.frontend.onnx_import import load_onnx
from cnnc.ops import get_op


def program(shape: str, layers: str) -> str:
    return f"network t(x: {shape}) {{\n    {layers}\n}}\n"


def case(name: str, shape: str, layers: str):
    return pytest.param(program(shape, layers), id=name)


CASES = [
    case("stride1", "3x6x6", "conv_transpose(4, 3)"),
    # stride 1 runs as a convolution by the flipped kernels (a conv's input gradient)
    case("stride1-pads", "3x6x6", "conv_transpose(4, 3, pad=(1, 0, 2, 1))"),
    case("stride1-winograd", "16x12x12", "conv_transpose(16, 3, pad=1)"),
    case("stride1-groups", "4x6x6", "conv_transpose(6, 3, pad=1, groups=2)"),
    case("stride1-depthwise", "8x6x6", "conv_transpose(8, 3, pad=1, groups=8)"),
    case("stride1-pad-beyond-the-reach", "3x6x6", "conv_transpose(4, 2, pad=(2, 0))"),
    case("conv1d-stride1", "3x7", "conv_transpose(4, 3, pad=(0, 2), bias=false)"),
    # stride 1 onto a much larger output runs as a product and a scatter of the taps
    case("stride1-scatter-lenet", "16x10x10", "conv_transpose(6, 5, pad=0)"),
    case(
        "stride1-scatter-pads-dilation",
        "4x4x5",
        "conv_transpose(6, 3, pad=(1, 0, 0, 2), dilation=2)",
    ),
    case("stride1-scatter-groups", "4x3x3", "conv_transpose(6, 3, groups=2)"),
    case("stride1-scatter-depthwise", "4x3x3", "conv_transpose(4, 4, groups=4, bias=false)"),
    case("conv1d-stride1-scatter", "3x4", "conv_transpose(4, 5, pad=(1, 0))"),
    case(
        "stride2-pad1-output_pad1", "3x5x5", "conv_transpose(4, 3, stride=2, pad=1, output_pad=1)"
    ),
    case("pad-top-only", "3x5x5", "conv_transpose(4, 3, stride=2, pad=(1, 0, 0, 0))"),
    case("pad-left-only", "3x5x5", "conv_transpose(4, 3, stride=2, pad=(0, 1, 0, 0))"),
    case("pad-bottom-only", "3x5x5", "conv_transpose(4, 3, stride=2, pad=(0, 0, 1, 0))"),
    case("pad-right-only", "3x5x5", "conv_transpose(4, 3, stride=2, pad=(0, 0, 0, 1))"),
    case("pad-h-and-w", "3x5x6", "conv_transpose(4, 4, stride=2, pad=(1, 2))"),
    case("pads-beyond-the-kernel", "3x6x6", "conv_transpose(4, 2, stride=3, pad=(3, 1, 2, 4))"),
    case(
        "asymmetric-pads-stride-dilation",
        "3x5x6",
        "conv_transpose(4, 3, stride=2, pad=(1, 0, 2, 1), dilation=2)",
    ),
    case("stride-larger-than-kernel", "3x5x5", "conv_transpose(4, 2, stride=3)"),
    case("1x1-stride2", "3x5x5", "conv_transpose(4, 1, stride=2)"),
    case("rectangular-kernel-and-stride", "3x5x6", "conv_transpose(4, (3, 2), stride=(1, 3))"),
    case("dilation", "3x6x6", "conv_transpose(4, 3, dilation=2)"),
    case("dilation-sharing-the-stride", "3x6x6", "conv_transpose(4, 3, stride=2, dilation=2)"),
    case("output_pad-per-axis", "3x5x5", "conv_transpose(4, 3, stride=(2, 3), output_pad=(1, 2))"),
    case("groups", "4x5x5", "conv_transpose(6, 3, stride=2, groups=2)"),
    case("groups-one-kernel-each", "4x5x5", "conv_transpose(2, 3, stride=2, groups=2)"),
    case("depthwise", "4x5x5", "conv_transpose(4, 4, stride=2, pad=1, groups=4)"),
    case("depthwise-multiplier2", "4x5x5", "conv_transpose(8, 3, stride=2, groups=4)"),
    case("no-bias", "3x5x5", "conv_transpose(4, 3, stride=2, bias=false)"),
    case("rows-of-fewer-blocks-than-the-stride", "3x3x2", "conv_transpose(4, 8, stride=4)"),
    case(
        "rows-of-fewer-blocks-than-the-stride-cropped",
        "3x3x2",
        "conv_transpose(4, 8, stride=4, pad=(1, 2, 3, 1))",
    ),
    case("unet-k2-s2", "8x6x6", "conv_transpose(4, 2, stride=2)"),
    case("dcgan-k4-s2-p1", "8x6x6", "conv_transpose(4, 4, stride=2, pad=1)"),
    case("fcn32s-k64-s32", "21x3x3", "conv_transpose(21, 64, stride=32, pad=16, bias=false)"),
    case("conv1d", "3x7", "conv_transpose(4, 3)"),
    case(
        "conv1d-stride-pads-output_pad",
        "3x7",
        "conv_transpose(4, 3, stride=2, pad=(2, 0), output_pad=1)",
    ),
    case("conv1d-stride-larger-than-kernel", "3x7", "conv_transpose(4, 2, stride=4, pad=(0, 3))"),
    case("conv1d-dilation", "3x7", "conv_transpose(4, 3, stride=2, dilation=3)"),
    case("conv1d-groups", "4x7", "conv_transpose(6, 4, stride=3, pad=1, groups=2)"),
    case("conv1d-depthwise-no-bias", "4x7", "conv_transpose(4, 3, stride=2, groups=4, bias=false)"),
]

# Cases that onnx.reference (onnx 1.23) computes otherwise; each is pinned down below.
REFERENCE_RAISES = {
    "groups",
    "groups-one-kernel-each",
    "conv1d-groups",
    "depthwise-multiplier2",
    "stride1-groups",
    "stride1-scatter-groups",
}
REFERENCE_BIAS = {
    "depthwise",
    "stride1-depthwise",
}  # it adds the first group's bias to every channel
# It computes it right, in minutes: its col2im is a Python loop over 4096 taps' pixels.
REFERENCE_SLOW = {"fcn32s-k64-s32"}
BATCHES = pytest.mark.parametrize("batch", [1, 3], ids=["batch1", "batch3"])


@functools.cache
def compiled(source: str, opt_level: int = 0) -> cnnc.Model:
    return cnnc.compile(source, opt_level=opt_level)


def batch_input(source: str, batch: int) -> np.ndarray:
    return compiled(source).random_input(batch, seed=batch)


def run_onnxruntime(model: cnnc.Model, x: np.ndarray, **export) -> np.ndarray:
    return ort_session(model.to_onnx(**export)).run(None, {"x": x})[0]


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)


# ---- the kernel ------------------------------------------------------------------------------


@BATCHES
@pytest.mark.parametrize("source", CASES)
def test_interpreter_matches_onnxruntime(source, batch):
    x = batch_input(source, batch)
    assert_close(compiled(source).run(x), run_onnxruntime(compiled(source), x))


@BATCHES
@pytest.mark.parametrize(
    "source", [p for p in CASES if p.id not in REFERENCE_RAISES | REFERENCE_BIAS | REFERENCE_SLOW]
)
def test_interpreter_matches_onnx_reference(source, batch):
    x = batch_input(source, batch)
    reference = ReferenceEvaluator(compiled(source).to_onnx()).run(None, {"x": x})[0]
    assert_close(compiled(source).run(x), reference)


@pytest.mark.parametrize("source", [p for p in CASES if p.id in REFERENCE_RAISES])
def test_onnx_reference_fails_on_groups_of_several_channels(source):
    with pytest.raises(ValueError):
        ReferenceEvaluator(compiled(source).to_onnx()).run(None, {"x": batch_input(source, 1)})


@pytest.mark.parametrize("source", [p for p in CASES if p.id in REFERENCE_BIAS])
def test_onnx_reference_adds_the_first_groups_bias_to_every_channel(source):
    model, x = compiled(source), batch_input(source, 2)
    bias = model.graph.params["conv_transpose1.bias"].data.reshape(1, -1, 1, 1)
    reference = ReferenceEvaluator(model.to_onnx()).run(None, {"x": x})[0]
    assert_close(reference, model.run(x) - bias + bias[:, :1])


@pytest.mark.parametrize(
    "layer",
    [
        "conv_transpose(6, 64, stride=32, pad=16, bias=false)",  # FCN-32s: kernels shared
        "conv_transpose(6, 8, stride=4, pad=(2, 1, 3, 0), groups=6)",  # depthwise: groups
        "conv_transpose(6, 2, stride=2)",  # U-Net: no crop
        "conv_transpose(6, 16, stride=8)",  # row phase by row phase, no crop
    ],
    ids=["fcn32s", "depthwise", "unet", "row-phases"],
)
def test_layers_split_between_threads_and_into_blocks_of_rows(monkeypatch, layer):
    source = program("6x3x4", layer)
    model = compiled(source)
    x = batch_input(source, 3)
    expected = run_onnxruntime(model, x)
    monkeypatch.setattr(parallel, "MIN_PARALLEL_MACS", 1)
    monkeypatch.setattr(parallel, "MIN_PARALLEL_ELEMENTS", 1)
    assert_close(Interpreter(model.graph, threads=2).run(x)[0], expected)
    # One row of blocks at a time: each row's columns, product, phases and crop.
    monkeypatch.setattr(kernels, "COLUMN_BLOCK_BYTES", 1024)
    assert_close(Interpreter(model.graph, threads=2).run(x)[0], expected)


def test_fcn32s_upsampling_of_a_7x7_score_map_gives_224x224():
    source = program("21x7x7", "conv_transpose(21, 64, stride=32, pad=16, bias=false)")
    model = compiled(source)
    assert model.graph.outputs[0].type.shape == ("N", 21, 224, 224)
    x = batch_input(source, 1)
    assert_close(model.run(x), run_onnxruntime(model, x))


def test_a_kernel_of_ones_spreads_each_input_value_over_its_window():
    model = cnnc.compile(program("1x2x2", "c: conv_transpose(1, 3, stride=2, bias=false)"))
    model.graph.params["c.weight"].set_data(np.ones((1, 1, 3, 3), np.float32))
    y = model.run(np.array([[[[1, 10], [100, 1000]]]], np.float32))[0, 0]
    expected = np.array(
        [
            [1, 1, 11, 10, 10],
            [1, 1, 11, 10, 10],
            [101, 101, 1111, 1010, 1010],
            [100, 100, 1100, 1000, 1000],
            [100, 100, 1100, 1000, 1000],
        ],
        np.float32,
    )
    np.testing.assert_array_equal(y, expected)


@pytest.mark.parametrize(
    ("shape", "layer", "output_pad"),
    [
        # Pads at the end would crop what output_pad adds: they are at the beginning here.
        ("3x5x5", "conv_transpose(4, 3, stride=2, pad=(1, 2, 0, 0){})", "1"),
        # PyTorch's rule allows output padding below the dilation, beyond the stride.
        ("3x5x5", "conv_transpose(4, 3, dilation=2{})", "(1, 0)"),
        ("3x6", "conv_transpose(4, 3, stride=3, dilation=4{})", "3"),
    ],
    ids=["stride", "dilation", "1d-dilation"],
)
def test_output_pad_adds_rows_and_columns_holding_the_bias_alone(shape, layer, output_pad):
    padded = cnnc.compile(program(shape, "up: " + layer.format(f", output_pad={output_pad}")))
    plain = cnnc.compile(program(shape, "up: " + layer.format("")))
    x = plain.random_input(2)
    y, y_padded = plain.run(x), padded.run(x)
    extra = tuple(a - b for a, b in zip(y_padded.shape, y.shape, strict=True))
    assert extra == (
        (0, 0, 1, 0) if output_pad == "(1, 0)" else (0, 0, *(int(output_pad),) * (y.ndim - 2))
    )
    inside = tuple(slice(0, size) for size in y.shape)
    np.testing.assert_allclose(y_padded[inside], y, rtol=1e-6, atol=1e-6)
    bias = plain.graph.params["up.bias"].data.reshape(1, -1, *(1,) * (y.ndim - 2))
    outside = y_padded.copy()
    outside[inside] = np.nan
    holds = np.isnan(outside) | (outside == np.broadcast_to(bias, y_padded.shape))
    assert holds.all()


def test_export_refuses_output_padding_not_smaller_than_the_stride():
    model = compiled(program("3x5x5", "up: conv_transpose(4, 3, dilation=2, output_pad=1)"))
    with pytest.raises(CnncError) as info:
        model.to_onnx()
    assert info.value.message.startswith(
        "node up: output_pad 1x1 not smaller than the stride 1x1 (ONNX runtimes require "
        "output_padding < strides) cannot be expressed in ONNX opset 17"
    )


# ---- the language ----------------------------------------------------------------------------


def test_output_size_is_in_minus_1_times_stride_minus_pads_plus_dilated_kernel_plus_output_pad():
    model = compiled(
        program(
            "3x5x7",
            "conv_transpose(4, (3, 4), stride=(2, 3), pad=(1, 0, 2, 1), dilation=(2, 1), "
            "output_pad=(1, 2))",
        )
    )
    # (5 − 1)·2 − 1 − 2 + 2·2 + 1 + 1 = 11;  (7 − 1)·3 − 0 − 1 + 1·3 + 2 + 1 = 23
    assert model.graph.outputs[0].type.shape == ("N", 4, 11, 23)


def test_weights_have_pytorchs_layout_and_fan_in():
    graph = compiled(program("256x4x4", "up: conv_transpose(64, 4, stride=2, groups=2)")).graph
    weight, bias = graph.params["up.weight"], graph.params["up.bias"]
    assert weight.shape == (256, 32, 4, 4) and bias.shape == (64,)
    # PyTorch's fan-in of a ConvTranspose weight is weight.size(1) · k·k = 32·16, not 256·16.
    assert weight.init == ("he_normal", 32 * 16) and bias.init == ("uniform", 32 * 16)
    assert abs(weight.data.std() / np.sqrt(2 / 512) - 1) < 0.02
    assert np.abs(bias.data).max() <= 1 / np.sqrt(512)


def test_the_dump_shows_the_window_output_padding_and_groups():
    model = compiled(
        program(
            "4x5x5", "up: conv_transpose(6, 3, stride=2, pad=(1, 0, 0, 1), output_pad=1, groups=2)"
        )
    )
    (node,) = model.graph.nodes
    op = get_op("conv_transpose")
    assert op.label(node) == "conv_transpose2d"
    assert op.describe(node) == "k=3x3 s=2 p=1,0,0,1 op=1 g=2"
    assert op.macs(node) == 5 * 5 * 4 * 3 * 3 * 3
    assert "conv_transpose2d(%x, up.weight, up.bias)" in model.dump()
    one_d = compiled(program("4x5", "conv_transpose(6, 3, stride=2, output_pad=1)")).graph.nodes[0]
    assert (op.label(one_d), op.describe(one_d)) == ("conv_transpose1d", "k=3 s=2 op=1")


def compile_error(shape: str, layer: str) -> CnncError:
    with pytest.raises(CnncError) as info:
        cnnc.compile(program(shape, layer))
    return info.value


@pytest.mark.parametrize(
    ("shape", "layer", "kind", "at", "message", "hint"),
    [
        (
            "3x5x5",
            "conv_transpose(4, 4, stride=2, pad=same)",
            LayerError,
            "pad=same",
            "conv_transpose takes no pad=same",
            "for an output of input × stride, write pad=1",
        ),
        (
            "3x5x5",
            "conv_transpose(4, 3, stride=2, pad=same)",
            LayerError,
            "pad=same",
            "conv_transpose takes no pad=same",
            "write pad=(0, 0, 1, 1)",
        ),
        (
            "3x5",
            "conv_transpose(4, 1, stride=3, pad=same)",
            LayerError,
            "pad=same",
            "conv_transpose takes no pad=same",
            "write pad=0, output_pad=2",
        ),
        (
            "3x5x5",
            "conv_transpose(4, 3, stride=2, output_pad=2)",
            LayerError,
            "output_pad=",
            "conv_transpose output_pad 2 on axis 1 must be smaller than its stride 2 or its "
            "dilation 1",
            "output_pad is at most max(stride, dilation) − 1",
        ),
        (
            "3x5x5",
            "conv_transpose(4, 3, stride=(1, 2), output_pad=(0, 2))",
            LayerError,
            "output_pad=",
            "conv_transpose output_pad 2 on axis 2 must be smaller",
            None,
        ),
        (
            "3x5x5",
            "conv_transpose(4, 3, groups=2)",
            LayerError,
            "groups=",
            "groups=2 does not divide the 3 input channels",
            "use a divisor of 3",
        ),
        (
            "4x5x5",
            "conv_transpose(3, 3, groups=2)",
            LayerError,
            "groups=",
            "groups=2 does not divide the 3 output channels",
            None,
        ),
        (
            "3x1x1",
            "conv_transpose(4, 1, pad=1)",
            ShapeError,
            "conv_transpose",
            "conv_transpose pads 1 crop its whole 1x1 output (input f32[N,3,1,1]) to -1x-1",
            "use less padding",
        ),
        (
            "3x5x5",
            "conv_transpose(4, (3, 3, 3))",
            LayerError,
            "(3, 3, 3)",
            "kernel has 3 values but the input has 2 spatial axes",
            None,
        ),
        (
            "3x5x5",
            "conv_transpose(4, 3, pad=(1, 2, 3))",
            LayerError,
            "pad=",
            "pad has 3 values",
            None,
        ),
        (
            "3x5x5",
            "fc(8) -> conv_transpose(4, 3)",
            LayerError,
            "conv_transpose",
            "conv_transpose needs a feature map",
            None,
        ),
    ],
    ids=[
        "same-even",
        "same-odd",
        "same-1d-stride-larger-than-kernel",
        "output_pad-not-below-stride",
        "output_pad-second-axis",
        "groups-in",
        "groups-out",
        "output-smaller-than-1",
        "kernel-rank",
        "pad-values",
        "after-fc",
    ],
)
def test_mistakes_are_errors_at_their_place(shape, layer, kind, at, message, hint):
    error = compile_error(shape, layer)
    assert isinstance(error, kind)
    assert (error.location.line, error.location.col) == (2, 5 + layer.index(at))
    assert error.message.startswith(message), error.message
    if hint is not None:
        assert hint in error.hint


# ---- passes ----------------------------------------------------------------------------------

FOLDS = [
    case("bn", "4x5x5", "up: conv_transpose(6, 3, stride=2, pad=1) -> bn"),
    case(
        "bn-groups-no-bias",
        "4x5x5",
        "up: conv_transpose(6, 3, stride=2, groups=2, bias=false) -> bn",
    ),
    case("bn-depthwise", "4x5x5", "up: conv_transpose(8, 4, stride=2, pad=1, groups=4) -> bn"),
    case("affine-1d", "4x7", "up: conv_transpose(6, 3, stride=2, groups=2) -> relu -> affine"),
]


@pytest.mark.parametrize("source", FOLDS[:3])
def test_fold_bn_folds_a_bn_into_the_conv_transpose_before_it(source):
    model = compiled(source, 2)
    assert [n.op for n in model.graph.nodes] == ["conv_transpose"]
    assert model.graph.params["up.bias"].shape == (model.graph.outputs[0].shape[1],)


@pytest.mark.parametrize("source", FOLDS)
def test_folding_into_a_conv_transpose_leaves_the_outputs_unchanged(source):
    x = batch_input(source, 2)
    expected = compiled(source).run(x)
    folded = compiled(source, 2)
    assert_agree(folded.run(x), expected)
    assert_agree(run_onnxruntime(folded, x), expected)


def test_an_activation_after_a_conv_transpose_is_not_fused():
    model = compiled(program("4x5x5", "conv_transpose(4, 2, stride=2) -> relu"), 2)
    assert [n.op for n in model.graph.nodes] == ["conv_transpose", "relu"]


# ---- ONNX ------------------------------------------------------------------------------------


@pytest.mark.parametrize("opset", sorted({13, 17, onnx_export.max_opset()}))
def test_export_writes_convtranspose_with_pads_and_output_padding_never_output_shape(opset):
    model = compiled(
        program(
            "4x5x5", "up: conv_transpose(6, 3, stride=2, pad=(1, 0, 0, 1), output_pad=1, groups=2)"
        )
    )
    proto = model.to_onnx(opset=opset)
    onnx.checker.check_model(proto, full_check=True)
    (node,) = proto.graph.node
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert (node.op_type, node.name, list(node.input)) == (
        "ConvTranspose",
        "up",
        ["x", "up.weight", "up.bias"],
    )
    assert attrs == {
        "kernel_shape": [3, 3],
        "strides": [2, 2],
        "pads": [1, 0, 0, 1],
        "output_padding": [1, 1],
        "group": 2,
    }


@pytest.mark.parametrize("source", CASES)
def test_export_and_import_give_the_same_node(source):
    model = compiled(source)
    back = load_onnx(model.to_onnx())
    (node,), (original,) = back.nodes, model.graph.nodes
    assert node.op == "conv_transpose"
    assert node.attrs == original.attrs
    assert [v.shape for v in node.inputs] == [v.shape for v in original.inputs]


@pytest.mark.parametrize("source", CASES[::3])
def test_a_decompiled_program_computes_the_same(source):
    model = compiled(source)
    text, weights = model.to_program()
    assert "conv_transpose(" in text
    back = cnnc.compile(text, opt_level=0)
    for name, array in weights.items():
        back.graph.params[name].set_data(array)
    x = batch_input(source, 2)
    np.testing.assert_array_equal(back.run(x), model.run(x))


def test_a_decompiled_layer_says_everything_it_computes():
    model = compiled(
        program(
            "4x5x5",
            "up: conv_transpose(6, (3, 2), stride=2, pad=(1, 0, 0, 1), output_pad=(1, 0), "
            "dilation=(1, 2), groups=2, bias=false)",
        )
    )
    text, _ = model.to_program()
    assert (
        "up: conv_transpose(6, (3, 2), stride=2, pad=(1, 0, 0, 1), dilation=(1, 2), "
        "output_pad=(1, 0), groups=2, bias=false)"
    ) in text


W = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
B = np.random.default_rng(1).standard_normal(3).astype(np.float32)


def one_node(attrs: dict, x_shape=(4, 5, 5), weight=W, bias=B, opset=17) -> onnx.ModelProto:
    inputs = ["x", "w"] + (["b"] if bias is not None else [])
    node = helper.make_node("ConvTranspose", inputs, ["y"], name="up", **attrs)
    initializers = [numpy_helper.from_array(weight, "w")]
    if bias is not None:
        initializers.append(numpy_helper.from_array(bias, "b"))
    graph = helper.make_graph(
        [node],
        "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * (len(x_shape) + 1))],
        initializer=initializers,
    )
    opsets = [helper.make_opsetid("", opset)]
    return helper.make_model(
        graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets)
    )


def imported_agrees(proto: onnx.ModelProto, x_shape=(4, 5, 5), reference: bool = True):
    graph = load_onnx(proto)
    model = cnnc.Model(graph)
    x = np.random.default_rng(3).standard_normal((2, *x_shape), dtype=np.float32)
    ours = model.run(x)
    assert_close(ours, ort_session(proto).run(None, {"x": x})[0])
    if reference:
        assert_close(ours, ReferenceEvaluator(proto).run(None, {"x": x})[0])
    return graph.nodes[0]


@pytest.mark.parametrize(
    ("attrs", "pads", "output_pad"),
    [
        ({"strides": [2, 2], "pads": [1, 0, 2, 1]}, (1, 0, 2, 1), (0, 0)),
        ({"strides": [2, 2], "auto_pad": "VALID"}, (0, 0, 0, 0), (0, 0)),
        # 11 computed, 10 wanted: the odd row at the end for SAME_UPPER, at the start otherwise
        ({"strides": [2, 2], "auto_pad": "SAME_UPPER"}, (0, 0, 1, 1), (0, 0)),
        ({"strides": [2, 2], "auto_pad": "SAME_LOWER"}, (1, 1, 0, 0), (0, 0)),
        ({"strides": [2, 3], "output_shape": [9, 12]}, (1, 2, 1, 1), (0, 0)),
        ({"strides": [2, 2], "output_shape": [10, 8]}, (1, 2, 0, 1), (0, 0)),
        (
            {"strides": [2, 2], "output_shape": [10, 11], "output_padding": [1, 1]},
            (1, 1, 1, 0),
            (1, 1),
        ),
        (
            {"strides": [3, 2], "output_padding": [2, 1], "dilations": [1, 2]},
            (0, 0, 0, 0),
            (2, 1),
        ),
        # 15x11 computed: the rows beyond are output padding (fewer than the stride).
        ({"strides": [3, 2], "output_shape": [17, 12]}, (0, 0, 0, 0), (2, 1)),
        ({"strides": [3, 2], "output_shape": [14, 12]}, (1, 0, 0, 0), (0, 1)),
    ],
    ids=[
        "pads",
        "valid",
        "same-upper",
        "same-lower",
        "output_shape-even",
        "output_shape-odd",
        "output_shape-with-output_padding",
        "output_padding-dilations",
        "output_shape-larger",
        "output_shape-larger-and-smaller",
    ],
)
def test_imported_convtranspose_forms_become_explicit_pads(attrs, pads, output_pad):
    proto = one_node(attrs)
    # onnx.reference computes no output_shape (its col2im check fails).
    node = imported_agrees(proto, reference="output_shape" not in attrs)
    assert node.attrs["pads"] == pads
    assert node.attrs["output_pad"] == output_pad


def test_an_imported_grouped_1d_convtranspose_without_bias_agrees():
    weight = np.random.default_rng(0).standard_normal((6, 2, 4)).astype(np.float32)
    proto = one_node(
        {"strides": [3], "pads": [1, 2], "group": 3, "kernel_shape": [4]},
        (6, 7),
        weight,
        None,
    )
    node = imported_agrees(proto, (6, 7), reference=False)
    assert node.attrs["groups"] == 3 and node.output.shape == ("N", 6, 19)


@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        (
            {"strides": [2, 2], "output_shape": [13, 11]},
            "output_shape 13x11 is 2 larger than the 11 this ConvTranspose computes along an "
            "axis: as output padding, 2 rows, not smaller than the stride 2",
        ),
        (
            {"strides": [4, 4], "kernel_shape": [3, 3], "auto_pad": "SAME_LOWER"},
            "auto_pad=SAME_LOWER asks for an output of input × stride, 20x20, larger than the "
            "19 this ConvTranspose computes along an axis: onnxruntime and onnx.reference "
            "disagree",
        ),
        (
            {"strides": [2, 2], "output_padding": [2, 0]},
            "conv_transpose output_pad 2 on axis 1 must be smaller than its stride 2",
        ),
        ({"kernel_shape": [2, 2]}, "kernel_shape [2, 2] does not match the weight"),
        ({"output_shape": [1, 3, 10, 10]}, "output_shape [1, 3, 10, 10] has 4 sizes"),
        ({"strides": [2, 2], "output_padding": [1]}, "output_padding [1] has 1 values, not 2"),
    ],
    ids=[
        "output_shape-too-large",
        "same-negative-padding",
        "output_padding",
        "kernel_shape",
        "output_shape-rank",
        "output_padding-rank",
    ],
)
def test_convtranspose_forms_cnnc_cannot_express_are_errors_at_the_node(attrs, message):
    with pytest.raises(ModelFileError) as info:
        load_onnx(one_node(attrs))
    assert "node up (ConvTranspose)" in str(info.value.where)
    assert info.value.message.startswith(message), info.value.message


def test_a_convtranspose_with_a_computed_weight_is_refused():
    proto = one_node({})
    proto.graph.input.append(helper.make_tensor_value_info("w2", TensorProto.FLOAT, [4, 3, 3, 3]))
    proto.graph.node[0].input[1] = "w2"
    with pytest.raises(ModelFileError) as info:
        load_onnx(proto)
    assert info.value.message == "a ConvTranspose whose weights are computed is not supported"


def test_a_fully_convolutional_network_that_upsamples_reports_its_fractional_stride():
    model = cnnc.compile(
        program("3x16x16", "conv(8, 3, stride=2) -> conv_transpose(4, 8, stride=4, pad=2)"),
        fully_conv=True,
    )
    # An output cell reads 8 // 4 + 1 = 2 cells of the conv, 2 input pixels apart.
    assert model.fully_conv_report((20, 20)).splitlines()[:2] == [
        "fully convolutional: output stride 1/2x1/2, receptive field 5x5 (each output cell "
        "scores one 5x5 window; windows are 1/2x1/2 apart)",
        "an input of 20x20 gives a score map [N,4,36,36]",
    ]
