"""Pooling: ``maxpool``, ``avgpool`` (windowed), ``gap`` and ``global_maxpool`` (global)."""

from __future__ import annotations

from typing import Any

from cnnc.errors import ShapeError
from cnnc.ir.types import TensorType, format_dims
from cnnc.ops.base import Attr, Layer, LayerContext, OpDef, register_layer, register_op
from cnnc.ops.common import describe_window, resolve_pads, windowed_shape
from cnnc.ops.conv import feature_map_rank


class Pool(OpDef):
    """attrs kernel, stride, pads, dilation, ceil (and count_include_pad for avgpool)."""

    def __init__(self, name: str):
        self.name = name

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        (x,) = inputs
        kernel, pads = attrs["kernel"], attrs["pads"]
        rank = len(kernel)
        if any(pads[i] >= k or pads[i + rank] >= k for i, k in enumerate(kernel)):
            raise ShapeError(
                f"{self.name} padding {','.join(map(str, pads))} must be smaller than its "
                f"kernel {format_dims(kernel)} on every side",
                hint="a window made only of padding has no value; pad less",
            )
        out = windowed_shape(
            self.name, x, kernel, attrs["stride"], pads, attrs["dilation"], attrs["ceil"]
        )
        return [x.with_shape((*x.shape[:2], *out))]

    def label(self, node) -> str:
        return f"{self.name}{len(node.attrs['kernel'])}d"

    def describe(self, node) -> str:
        a = node.attrs
        text = describe_window(a["kernel"], a["stride"], a["pads"], a["dilation"])
        if a["ceil"]:
            text += " ceil"
        if self.name == "avgpool" and any(a["pads"]) and not a["count_include_pad"]:
            text += " exclude-pad"
        return text


class GlobalPool(OpDef):
    """The mean (``gap``) or maximum (``global_maxpool``) over all spatial positions:
    N×C×H×W -> N×C×1×1, N×C×L -> N×C×1 (ONNX GlobalAveragePool, GlobalMaxPool)."""

    def __init__(self, name: str):
        self.name = name

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        (x,) = inputs
        if x.rank < 3:
            raise ShapeError(f"{self.name} needs a feature map N×C×L or N×C×H×W, got {x}")
        return [x.with_shape((*x.shape[:2], *(1,) * (x.rank - 2)))]


for _op in (Pool("maxpool"), Pool("avgpool"), GlobalPool("gap"), GlobalPool("global_maxpool")):
    register_op(_op)


def _pool_attrs(ctx: LayerContext, x, keyword: str) -> dict[str, Any]:
    rank = feature_map_rank(ctx, x.type, keyword)
    kernel = ctx.spatial("kernel", rank)
    stride = kernel if ctx["stride"] is None else ctx.spatial("stride", rank)
    dilation = ctx.spatial("dilation", rank) if "dilation" in ctx.args else (1,) * rank
    pads = resolve_pads(ctx, "pad", x.type, kernel, stride, dilation)
    return {
        "kernel": kernel,
        "stride": stride,
        "pads": pads,
        "dilation": dilation,
        "ceil": ctx["ceil"],
    }


def build_maxpool(ctx: LayerContext, x):
    return ctx.node("maxpool", [x], _pool_attrs(ctx, x, "maxpool"))


def build_avgpool(ctx: LayerContext, x):
    attrs = _pool_attrs(ctx, x, "avgpool")
    attrs["count_include_pad"] = ctx["count_include_pad"]
    return ctx.node("avgpool", [x], attrs)


def _build_global(op: str):
    def build(ctx: LayerContext, x):
        feature_map_rank(ctx, x.type, op)
        return ctx.node(op, [x])

    return build


_WINDOW = (
    Attr("kernel", "ints", positional=True, minimum=1, doc="window size: k, or (kh, kw)"),
    Attr("stride", "ints", None, minimum=1, doc="step between windows", default_text="kernel"),
    Attr("pad", "pad", 0, minimum=0, doc="padding, smaller than the kernel: see Padding"),
)
_CEIL = Attr("ceil", "bool", False, doc="round the output size up (a partial last window)")

register_layer(
    Layer(
        "maxpool",
        (
            *_WINDOW,
            Attr("dilation", "ints", 1, minimum=1, doc="spacing between window taps"),
            _CEIL,
        ),
        build_maxpool,
        "Maximum over each window; padding never wins (it is -inf).",
    )
)
register_layer(
    Layer(
        "avgpool",
        (
            *_WINDOW,
            _CEIL,
            Attr(
                "count_include_pad",
                "bool",
                True,
                doc="padding counts in the divisor (PyTorch's default)",
            ),
        ),
        build_avgpool,
        "Mean over each window.",
    )
)
register_layer(
    Layer(
        "gap",
        (),
        _build_global("gap"),
        "Global average pooling: the mean of each channel, N×C×H×W -> N×C×1×1; "
        "the tutorial's replacement for FC layers.",
    )
)
register_layer(
    Layer(
        "global_maxpool",
        (),
        _build_global("global_maxpool"),
        "Global max pooling: the maximum of each channel, N×C×H×W -> N×C×1×1.",
    )
)
