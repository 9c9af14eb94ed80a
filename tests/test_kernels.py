"""Every interpreter kernel agrees with onnxruntime and onnx.reference on random inputs."""

from __future__ import annotations

import functools
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import onnx
import onnx.inliner
import pytest
from helpers import ATOL, RTOL, ort_session
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

import cnnc
from cnnc.backends import onnx_export
from cnnc.ops import get_op


@dataclass(frozen=True)
class Case:
    """A one-network program: its input shape, its layers, how large its inputs are."""

    shape: str
    layers: str
    scale: float = 1.0
    opt_level: int = 0

    @property
    def source(self) -> str:
        return f"network t(x: {self.shape}) {{\n    {self.layers}\n}}\n"


def case(name: str, shape: str, layers: str, scale: float = 1.0, opt_level: int = 0):
    return pytest.param(Case(shape, layers, scale, opt_level), id=name)


CONV_CASES = [
    case("conv2d", "3x9x9", "conv(4, kernel=3)"),
    case("conv2d-rectangular-kernel-and-stride", "3x9x10", "conv(4, kernel=(3, 2), stride=(1, 2))"),
    case("conv2d-pad-top-only", "3x7x7", "conv(4, kernel=3, pad=(1, 0, 0, 0))"),
    case("conv2d-pad-left-only", "3x7x7", "conv(4, kernel=3, pad=(0, 1, 0, 0))"),
    case("conv2d-pad-bottom-only", "3x7x7", "conv(4, kernel=3, pad=(0, 0, 1, 0))"),
    case("conv2d-pad-right-only", "3x7x7", "conv(4, kernel=3, pad=(0, 0, 0, 1))"),
    case("conv2d-pad-h-and-w", "3x7x7", "conv(4, kernel=3, pad=(2, 1))"),
    case(
        "conv2d-asymmetric-pads-stride-dilation",
        "3x9x9",
        "conv(4, kernel=3, stride=2, pad=(1, 0, 2, 1), dilation=2)",
    ),
    case("conv2d-pad-valid", "3x7x7", "conv(4, kernel=3, pad=valid)"),
    case("conv2d-same-odd-kernel", "3x7x7", "conv(4, kernel=3, pad=same)"),
    case("conv2d-same-even-kernel", "3x7x7", "conv(4, kernel=4, pad=same)"),
    case("conv2d-same-odd-kernel-stride2", "3x8x8", "conv(4, kernel=3, stride=2, pad=same)"),
    case("conv2d-same-even-kernel-stride2", "3x9x9", "conv(4, kernel=2, stride=2, pad=same)"),
    case(
        "conv2d-same-stride3-dilation2",
        "3x10x10",
        "conv(4, kernel=3, stride=3, dilation=2, pad=same)",
    ),
    case("conv2d-stride-larger-than-kernel", "3x10x10", "conv(4, kernel=2, stride=3)"),
    case("conv2d-dilation", "3x9x9", "conv(4, kernel=3, dilation=2)"),
    case("conv2d-dilation-per-axis", "3x9x11", "conv(4, kernel=3, dilation=(1, 3), pad=1)"),
    case("conv2d-groups", "4x7x7", "conv(6, kernel=3, groups=2)"),
    case("conv2d-depthwise", "4x7x7", "conv(4, kernel=3, groups=4, pad=1)"),
    case("conv2d-depthwise-multiplier2", "4x7x7", "conv(8, kernel=3, groups=4, stride=2)"),
    case("conv2d-no-bias", "3x7x7", "conv(4, kernel=3, bias=false)"),
    case("conv2d-1x1", "5x6x6", "conv(3, kernel=1)"),
    case("conv2d-1x1-stride2", "5x7x7", "conv(3, kernel=1, stride=2)"),
    case("conv2d-1x1-padded", "5x6x6", "conv(3, kernel=1, pad=1)"),
    case("conv2d-pads-wider-than-kernel", "3x5x5", "conv(4, kernel=2, pad=(3, 0, 1, 4))"),
    case("conv2d-1x1-groups", "4x6x6", "conv(6, kernel=1, groups=2, bias=false)"),
    case("conv1d", "3x12", "conv(4, kernel=3)"),
    case("conv1d-pad-begin-only", "3x12", "conv(4, kernel=3, pad=(2, 0))"),
    case("conv1d-pad-end-only", "3x12", "conv(4, kernel=3, pad=(0, 1))"),
    case("conv1d-same-odd-kernel-stride2", "3x12", "conv(4, kernel=5, stride=2, pad=same)"),
    case("conv1d-same-even-kernel", "3x11", "conv(4, kernel=4, pad=same)"),
    case("conv1d-stride-larger-than-kernel", "3x13", "conv(4, kernel=2, stride=4)"),
    case("conv1d-dilation", "3x12", "conv(4, kernel=3, dilation=3, pad=1)"),
    case("conv1d-depthwise", "4x12", "conv(4, kernel=3, groups=4)"),
    case(
        "conv1d-groups-stride-dilation", "4x15", "conv(6, kernel=2, stride=2, dilation=3, groups=2)"
    ),
    case("conv1d-no-bias", "3x12", "conv(4, kernel=3, bias=false)"),
    case("conv1d-1x1-stride2", "5x11", "conv(3, kernel=1, stride=2)"),
]

MAXPOOL_CASES = [
    case("maxpool2d", "3x8x8", "maxpool(2)"),
    case("maxpool2d-floor-drops-partial-window", "3x9x9", "maxpool(2)"),
    case("maxpool2d-ceil-adds-partial-window", "3x9x9", "maxpool(2, ceil=true)"),
    case("maxpool2d-ceil-without-partial-window", "3x8x8", "maxpool(2, ceil=true)"),
    case("maxpool2d-overlapping-ceil", "3x8x8", "maxpool(3, stride=2, ceil=true)"),
    case("maxpool2d-padded", "3x8x8", "maxpool(3, stride=2, pad=1)"),
    case("maxpool2d-pad-top-only", "3x7x7", "maxpool(2, stride=1, pad=(1, 0, 0, 0))"),
    case("maxpool2d-pad-left-only", "3x7x7", "maxpool(2, stride=1, pad=(0, 1, 0, 0))"),
    case("maxpool2d-pad-bottom-only", "3x7x7", "maxpool(2, stride=1, pad=(0, 0, 1, 0))"),
    case("maxpool2d-pad-right-only", "3x7x7", "maxpool(2, stride=1, pad=(0, 0, 0, 1))"),
    case(
        "maxpool2d-asymmetric-pads-ceil",
        "3x8x9",
        "maxpool(3, stride=2, pad=(1, 0, 2, 1), ceil=true)",
    ),
    case("maxpool2d-ceil-drops-window-in-padding", "3x5x5", "maxpool(2, pad=1, ceil=true)"),
    case("maxpool2d-same", "3x7x7", "maxpool(3, stride=2, pad=same)"),
    case("maxpool2d-stride-larger-than-kernel", "3x10x10", "maxpool(2, stride=3)"),
    case("maxpool2d-stride-larger-than-kernel-ceil", "3x10x10", "maxpool(2, stride=3, ceil=true)"),
    case("maxpool2d-dilation", "3x9x9", "maxpool(2, stride=1, dilation=2)"),
    case("maxpool2d-dilation-ceil", "3x9x9", "maxpool(2, stride=2, dilation=2, ceil=true)"),
    case("maxpool2d-dilation-padded", "3x8x8", "maxpool(3, stride=2, dilation=(2, 1), pad=1)"),
    case("maxpool1d", "3x9", "maxpool(2)"),
    case("maxpool1d-ceil-adds-partial-window", "3x9", "maxpool(2, ceil=true)"),
    case("maxpool1d-pad-begin-only", "3x9", "maxpool(3, stride=2, pad=(1, 0))"),
    case("maxpool1d-stride1-padded", "3x9", "maxpool(2, stride=1, pad=(1, 0))"),
    case("maxpool1d-pad-end-only", "3x9", "maxpool(3, stride=2, pad=(0, 2))"),
    case("maxpool1d-dilation", "3x12", "maxpool(3, stride=2, dilation=2, ceil=true)"),
]

AVGPOOL_CASES = [
    case("avgpool2d", "3x8x8", "avgpool(2)"),
    case("avgpool2d-floor-drops-partial-window", "3x9x9", "avgpool(2)"),
    case("avgpool2d-ceil-adds-partial-window", "3x9x9", "avgpool(2, ceil=true)"),
    case("avgpool2d-ceil-without-partial-window", "3x8x8", "avgpool(2, ceil=true)"),
    case("avgpool2d-overlapping-ceil", "3x8x8", "avgpool(3, stride=2, ceil=true)"),
    case("avgpool2d-padded-include-pad", "3x8x8", "avgpool(3, stride=2, pad=1)"),
    case(
        "avgpool2d-padded-exclude-pad",
        "3x8x8",
        "avgpool(3, stride=2, pad=1, count_include_pad=false)",
    ),
    case("avgpool2d-pad-top-only", "3x7x7", "avgpool(2, stride=1, pad=(1, 0, 0, 0))"),
    case("avgpool2d-pad-left-only", "3x7x7", "avgpool(2, stride=1, pad=(0, 1, 0, 0))"),
    case("avgpool2d-pad-bottom-only", "3x7x7", "avgpool(2, stride=1, pad=(0, 0, 1, 0))"),
    case("avgpool2d-pad-right-only", "3x7x7", "avgpool(2, stride=1, pad=(0, 0, 0, 1))"),
    case(
        "avgpool2d-asymmetric-pads-exclude-pad",
        "3x8x9",
        "avgpool(3, stride=2, pad=(1, 0, 2, 1), count_include_pad=false)",
    ),
    case(
        "avgpool2d-ceil-padded-include-pad",
        "3x8x8",
        "avgpool(3, stride=2, pad=1, ceil=true)",
    ),
    case(
        "avgpool2d-ceil-padded-exclude-pad",
        "3x8x8",
        "avgpool(3, stride=2, pad=1, ceil=true, count_include_pad=false)",
    ),
    case(
        "avgpool2d-ceil-unpadded-exclude-pad",
        "3x9x9",
        "avgpool(2, ceil=true, count_include_pad=false)",
    ),
    case("avgpool2d-ceil-drops-window-in-padding", "3x5x5", "avgpool(2, pad=1, ceil=true)"),
    case(
        "avgpool2d-same-exclude-pad",
        "3x7x8",
        "avgpool(3, stride=2, pad=same, count_include_pad=false)",
    ),
    case("avgpool2d-stride-larger-than-kernel", "3x10x10", "avgpool(2, stride=3)"),
    case("avgpool2d-stride-larger-than-kernel-ceil", "3x10x10", "avgpool(2, stride=3, ceil=true)"),
    case("avgpool1d", "3x9", "avgpool(3)"),
    case("avgpool1d-ceil-adds-partial-window", "3x10", "avgpool(3, ceil=true)"),
    case("avgpool1d-pad-begin-only", "3x9", "avgpool(3, stride=2, pad=(1, 0))"),
    case(
        "avgpool1d-pad-end-only-exclude-pad",
        "3x9",
        "avgpool(3, stride=2, pad=(0, 2), count_include_pad=false)",
    ),
]

OTHER_CASES = [
    case("gap2d", "3x5x6", "gap"),
    case("gap1d", "3x7", "gap"),
    case("relu2d", "3x5x5", "relu"),
    case("relu-after-fc", "2x3", "fc(5) -> relu"),
    case("sigmoid2d", "3x5x5", "sigmoid"),
    case("sigmoid-large-magnitude", "3x5x5", "sigmoid", scale=50.0),
    case("sigmoid1d", "3x7", "sigmoid"),
    case("tanh2d", "3x5x5", "tanh"),
    case("tanh-large-magnitude", "3x5x5", "tanh", scale=50.0),
    case("softmax-over-channels", "4x3x3", "softmax"),
    case("softmax-axis2", "4x3x5", "softmax(axis=2)"),
    case("softmax-axis3", "4x3x5", "softmax(axis=3)"),
    case("softmax-last-axis-negative", "4x3x5", "softmax(axis=-1)"),
    case("softmax-large-magnitude", "4x3x3", "softmax", scale=50.0),
    case("softmax-1d-map-along-length", "4x6", "softmax(axis=2)"),
    case("softmax-after-fc", "3x4x4", "fc(7) -> softmax"),
    case("flatten2d", "3x4x5", "flatten"),
    case("flatten1d", "3x7", "flatten"),
    case("fc-after-feature-map", "3x4x4", "fc(5)"),
    case("fc-after-1d-feature-map", "3x7", "fc(5)"),
    case("fc-no-bias", "3x4x4", "fc(5, bias=false)"),
    case("fc-after-flatten", "3x4x4", "flatten -> fc(5)"),
    case("fc-after-fc", "2x4", "fc(6) -> fc(4, bias=false)"),
    case("dropout", "3x5x5", "dropout(0.3)"),
    case("dropout-after-fc", "2x3", "fc(4) -> dropout"),
    case("bn2d", "4x5x5", "bn"),
    case("bn1d", "4x7", "bn(eps=0.001)", scale=3.0),
    case("global_maxpool2d", "3x5x6", "global_maxpool"),
    case("global_maxpool1d", "3x7", "global_maxpool"),
    case("leaky_relu2d", "3x5x5", "leaky_relu"),
    case("leaky_relu-alpha0-is-relu", "3x5x5", "leaky_relu(0)"),
    case("leaky_relu-alpha0.2", "3x5x5", "leaky_relu(0.2)"),
    case("leaky_relu-alpha-above-1", "3x5x5", "leaky_relu(alpha=1.5)"),
    case("leaky_relu1d", "3x7", "leaky_relu(0.2)"),
    case("leaky_relu-after-fc", "2x3", "fc(5) -> leaky_relu(0.2)"),
    case("relu6", "3x5x5", "relu6", scale=5.0),
    case("relu6-1d", "3x7", "relu6", scale=5.0),
    case("clip2d", "3x5x5", "clip(-0.5, 0.25)"),
    case("clip-negative-range", "3x5x5", "clip(-2, -1)"),
    case("clip-min-equals-max", "3x5x5", "clip(0.5, 0.5)"),
    case("clip-after-fc", "2x3", "fc(5) -> clip(-0.1, 0.1)"),
]

# onnx.reference normalises only the first N channels of an LRN, N the batch size (see below).
LRN_CASES = [
    case("lrn2d-size3", "3x4x5", "lrn(3, alpha=0.5, beta=0.75, k=2)"),
    case("lrn2d-alexnet-defaults", "3x4x4", "lrn(5)", scale=30.0),
    case("lrn2d-size1-is-per-channel", "3x4x4", "lrn(1, alpha=0.5)"),
    case("lrn2d-size5-on-6-channels", "6x3x3", "lrn(5, alpha=0.5, beta=0.75, k=2)"),
    case("lrn2d-size-larger-than-channels", "3x4x4", "lrn(7, alpha=0.5, beta=1.5, k=1)"),
    case("lrn2d-one-channel", "1x4x4", "lrn(3, alpha=0.5)"),
    case("lrn1d", "3x7", "lrn(3, alpha=0.5, beta=0.5, k=1)"),
    case("lrn-after-relu", "6x4x4", "relu -> lrn(5, alpha=0.1)", scale=3.0),
]

# Compiled at -O2: fuse-conv-act makes each conv apply its activation itself.
FUSED_CASES = [
    case("conv2d+relu", "3x7x7", "conv(4, kernel=3, pad=1) -> relu", opt_level=2),
    case("conv2d+sigmoid", "3x7x7", "conv(4, kernel=3, stride=2) -> sigmoid", opt_level=2),
    case("conv1d+tanh", "3x9", "conv(4, kernel=3, bias=false) -> tanh", opt_level=2),
    case("conv2d-1x1+relu", "3x5x5", "conv(4, kernel=1) -> relu", opt_level=2),
    case("conv2d+leaky_relu", "3x7x7", "conv(4, kernel=3, pad=1) -> leaky_relu(0.2)", opt_level=2),
    case("conv1d+leaky_relu-default", "3x9", "conv(4, kernel=3) -> leaky_relu", opt_level=2),
    case("conv2d+relu6", "3x7x7", "conv(4, kernel=3) -> relu6", scale=5.0, opt_level=2),
    case("conv1d+clip", "3x9", "conv(4, kernel=3, stride=2) -> clip(-0.5, 1)", opt_level=2),
]

ALL_CASES = CONV_CASES + MAXPOOL_CASES + AVGPOOL_CASES + OTHER_CASES + LRN_CASES + FUSED_CASES
CASES = {p.id: p.values[0] for p in ALL_CASES}
BATCHES = pytest.mark.parametrize("batch", [1, 3], ids=["batch1", "batch3"])

# Cases where onnx.reference computes something else than onnxruntime, the interpreter's
# oracle; each has a test below that pins down exactly what the reference does instead.
REFERENCE_BUGS = {
    "maxpool2d-pad-left-only": "unit-stride MaxPool reads pads as (top, bottom, left, right)",
    "maxpool2d-pad-bottom-only": "unit-stride MaxPool reads pads as (top, bottom, left, right)",
    "avgpool1d-ceil-adds-partial-window": "ceil mode's extra end padding is split over both ends",
    "maxpool1d-stride1-padded": "unit-stride 1-D MaxPool with pads raises IndexError",
    "global_maxpool1d": "1-D GlobalMaxPool takes the maximum over the channels too",
    **{p.id: "LRN sums squares over the first N channels only, N the batch" for p in LRN_CASES},
    "conv2d+leaky_relu": "LeakyRelu in a function cannot read the call's alpha",
    "conv1d+leaky_relu-default": "LeakyRelu in a function cannot read the call's alpha",
}
REFERENCE_CASES = [p for p in ALL_CASES if p.id not in REFERENCE_BUGS]


@functools.cache
def compiled(c: Case) -> cnnc.Model:
    return cnnc.compile(c.source, opt_level=c.opt_level)


@functools.cache
def session(c: Case, opset: int = onnx_export.DEFAULT_OPSET):
    return ort_session(compiled(c).to_onnx(opset=opset))


def batch_input(c: Case, batch: int) -> np.ndarray:
    return compiled(c).random_input(batch, seed=batch) * np.float32(c.scale)


def run_onnxruntime(c: Case, x: np.ndarray, opset: int = onnx_export.DEFAULT_OPSET):
    return session(c, opset).run(None, {"x": x})[0]


def run_reference(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    # The reference Sigmoid evaluates exp on both branches; it overflows on the one it drops.
    with np.errstate(over="ignore", invalid="ignore"):
        return ReferenceEvaluator(model).run(None, {"x": x})[0]


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)


def one_node_model(node, x_shape, initializers=(), opset: int = 17) -> onnx.ModelProto:
    """A hand-built ONNX model of one node that reads the input ``x``."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape])
    y = helper.make_tensor_value_info(
        node.output[0], TensorProto.FLOAT, [None] * (len(x_shape) + 1)
    )
    graph = helper.make_graph([node], "t", [x], [y], initializer=list(initializers))
    opsets = [helper.make_opsetid("", opset)]
    return helper.make_model(
        graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets)
    )


@BATCHES
@pytest.mark.parametrize("c", ALL_CASES)
def test_interpreter_matches_onnxruntime(c, batch):
    x = batch_input(c, batch)
    assert_close(compiled(c).run(x), run_onnxruntime(c, x))


@BATCHES
@pytest.mark.parametrize("c", REFERENCE_CASES)
def test_interpreter_matches_onnx_reference(c, batch):
    x = batch_input(c, batch)
    assert_close(compiled(c).run(x), run_reference(compiled(c).to_onnx(), x))


@BATCHES
@pytest.mark.parametrize(
    "opset", [onnx_export.MIN_OPSET, onnx_export.max_opset()], ids=["oldest", "newest"]
)
@pytest.mark.parametrize("c", MAXPOOL_CASES + AVGPOOL_CASES)
def test_pooling_matches_onnxruntime_at_both_ends_of_the_opset_range(c, opset, batch):
    x = batch_input(c, batch)
    assert_close(compiled(c).run(x), run_onnxruntime(c, x, opset))


@pytest.mark.parametrize("c", FUSED_CASES)
def test_fused_cases_run_one_conv_that_applies_its_activation(c):
    (node,) = compiled(c).graph.nodes
    activation = c.layers.rsplit("-> ", 1)[1].split("(")[0]
    assert (node.op, get_op("conv").label(node).split("+")[1]) == ("conv", activation)


@BATCHES
@pytest.mark.parametrize(
    ("written", "read_as"),
    [
        ("maxpool2d-pad-left-only", "maxpool2d-pad-bottom-only"),
        ("maxpool2d-pad-bottom-only", "maxpool2d-pad-left-only"),
    ],
)
def test_onnx_reference_reads_unit_stride_maxpool_pads_as_top_bottom_left_right(
    written, read_as, batch
):
    x = batch_input(CASES[written], batch)
    reference = run_reference(compiled(CASES[written]).to_onnx(), x)
    assert_close(reference, run_onnxruntime(CASES[read_as], x))
    assert reference.shape != run_onnxruntime(CASES[written], x).shape


@BATCHES
def test_onnx_reference_shifts_ceil_mode_avgpool_windows_by_half_the_extra_padding(batch):
    c = CASES["avgpool1d-ceil-adds-partial-window"]
    x = batch_input(c, batch)
    # The last window needs 2 columns after x[..., 9]; the reference puts one before x[..., 0].
    reference = run_reference(compiled(c).to_onnx(), x)
    assert_close(reference[..., 0], (x[..., 0] + x[..., 1]) / 3)
    assert_close(run_onnxruntime(c, x)[..., 0], x[..., :3].mean(axis=-1))


@BATCHES
def test_onnx_reference_fails_on_a_padded_unit_stride_1d_maxpool(batch):
    c = CASES["maxpool1d-stride1-padded"]
    with pytest.raises(IndexError):
        run_reference(compiled(c).to_onnx(), batch_input(c, batch))


@BATCHES
def test_onnx_reference_takes_a_1d_global_maxpool_over_channels_and_length(batch):
    # onnx/onnx#7682: it reduces the last two axes, which for N×C×L are C and L.
    c = CASES["global_maxpool1d"]
    x = batch_input(c, batch)
    reference = run_reference(compiled(c).to_onnx(), x)
    assert_close(reference, x.max(axis=(1, 2)).reshape(batch, 1))
    assert_close(run_onnxruntime(c, x), x.max(axis=2, keepdims=True))


@pytest.mark.parametrize("c", LRN_CASES)
def test_onnx_reference_computes_lrn_right_when_the_batch_equals_the_channels(c):
    # onnx/onnx#7805: its loop over the channels runs over range(N) instead of range(C).
    x = batch_input(c, compiled(c).graph.inputs[0].shape[1])
    assert_close(compiled(c).run(x), run_reference(compiled(c).to_onnx(), x))


@BATCHES
def test_onnx_reference_leaves_lrn_channels_past_the_batch_size_unnormalised(batch):
    c = CASES["lrn2d-size5-on-6-channels"]  # alpha=0.5, beta=0.75, k=2, on 6 > 3 channels
    x = batch_input(c, batch)
    reference = run_reference(compiled(c).to_onnx(), x)
    assert_close(reference[:, :batch], compiled(c).run(x)[:, :batch])
    assert_close(reference[:, batch:], x[:, batch:] / np.float32(2**0.75))


@pytest.mark.parametrize("name", ["conv2d+leaky_relu", "conv1d+leaky_relu-default"])
def test_onnx_reference_runs_a_fused_leaky_relu_only_once_its_function_is_inlined(name):
    # Its unary ops drop the linked attributes of a function call: LeakyRelu gets no alpha.
    c = CASES[name]
    model = compiled(c).to_onnx()
    x = batch_input(c, 3)
    with pytest.raises(TypeError, match="linked attributes"):
        run_reference(model, x)
    inlined = onnx.inliner.inline_local_functions(model)
    assert_close(compiled(c).run(x), run_reference(inlined, x))


# Only ONNX AveragePool (opset 19) has dilations: the language's avgpool has none.
DILATED_AVGPOOLS = [
    pytest.param(
        (3, 7, 8),
        {"kernel_shape": [2, 3], "strides": [1, 2], "pads": [1, 2, 0, 1], "dilations": [2, 2]},
        id="padded",
    ),
    pytest.param(
        (3, 8, 8),
        {"kernel_shape": [3, 3], "strides": [2, 2], "dilations": [2, 2], "ceil_mode": 1},
        id="ceil-adds-partial-window",
    ),
    pytest.param(
        (3, 9),
        {"kernel_shape": [3], "strides": [2], "pads": [2, 1], "dilations": [3], "ceil_mode": 1},
        id="1d-padded-ceil",
    ),
]


@BATCHES
@pytest.mark.parametrize("count_include_pad", [0, 1], ids=["exclude-pad", "include-pad"])
@pytest.mark.parametrize(("shape", "attrs"), DILATED_AVGPOOLS)
def test_imported_dilated_avgpool_matches_onnxruntime_and_onnx_reference(
    tmp_path, shape, attrs, count_include_pad, batch
):
    pool = helper.make_node(
        "AveragePool", ["x"], ["y"], count_include_pad=count_include_pad, **attrs
    )
    model = one_node_model(pool, shape, opset=19)
    onnx.save(model, tmp_path / "avgpool.onnx")
    x = np.random.default_rng(batch).standard_normal((batch, *shape), dtype=np.float32)
    ours = cnnc.load(tmp_path / "avgpool.onnx", opt_level=0).run(x)
    assert_close(ours, ort_session(model).run(None, {"x": x})[0])
    assert_close(ours, run_reference(model, x))


NO_ONNX_SCRIPT = """
import sys

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("onnx", "onnxruntime"):
            raise ImportError(f"{name} is blocked")

sys.meta_path.insert(0, Blocked())
import cnnc

SOURCE = '''network t(x: 3x12x12) {
    conv(8, kernel=3, pad=1) -> relu -> maxpool(2, ceil=true) -> lrn(3)
    conv(8, kernel=3, stride=2, groups=8) -> sigmoid -> avgpool(2, pad=1)
    conv(8, kernel=1) -> leaky_relu -> conv(8, kernel=1) -> relu6 -> clip(-1, 1) -> global_maxpool
    conv(4, kernel=1) -> bn -> tanh -> gap -> dropout -> fc(10) -> softmax
}'''
for opt_level in (0, 2):
    model = cnnc.compile(SOURCE, opt_level=opt_level)
    assert model.run(model.random_input(2)).shape == (2, 10)
assert not {"onnx", "onnxruntime"} & set(sys.modules)
print("ran without onnx")
"""


def test_the_interpreter_runs_without_onnx_or_onnxruntime():
    done = subprocess.run(
        [sys.executable, "-c", NO_ONNX_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "ran without onnx\n"
