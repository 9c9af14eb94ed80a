"""Pooling: ``maxpool``, ``avgpool`` (windowed), ``gap`` and ``global_maxpool`` (global),
``adaptive_avgpool`` and ``adaptive_maxpool`` (to an output size, PyTorch's windows)."""

from __future__ import annotations

from typing import Any

import numpy as np

from cnnc.errors import ShapeError
from cnnc.ir.types import TensorType, format_dims
from cnnc.ops.base import Attr, Layer, LayerContext, OpDef, register_layer, register_op
from cnnc.ops.common import describe_window, resolve_pads, windowed_shape
from cnnc.ops.conv import feature_map_rank


def pool_macs(node) -> int:
    """An average pool's multiply-adds: the division of each window's sum, one per output
    element; a max pool compares and does none."""
    return node.output.type.numel_per_item() if "avg" in node.op or node.op == "gap" else 0


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

    def macs(self, node) -> int:
        return pool_macs(node)

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

    def macs(self, node) -> int:
        return pool_macs(node)


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


# ---- adaptive pooling -----------------------------------------------------------------------


def adaptive_windows(size: int, out: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, stops) of PyTorch's adaptive pooling windows along one axis: output i covers
    floor(i · size / out) to ceil((i + 1) · size / out). Windows overlap when they do not
    divide the axis evenly, and when the output is larger than the input."""
    i = np.arange(out)
    return (i * size) // out, -((-(i + 1) * size) // out)


def adaptive_avg_matrix(size: int, out: int, dtype=np.float32) -> np.ndarray:
    """The pooling matrix [out, size] (float32 unless said) of adaptive average pooling along
    one axis: row i holds 1 / (window length) over window i."""
    starts, stops = adaptive_windows(size, out)
    columns = np.arange(size)
    inside = (columns >= starts[:, None]) & (columns < stops[:, None])
    return (inside / (stops - starts)[:, None]).astype(dtype)


def adaptive_max_windows(size: int, out: int) -> np.ndarray:
    """The int64 indices [out, longest window] of each adaptive window along one axis, a
    shorter window repeating its last index (which changes no maximum)."""
    starts, stops = adaptive_windows(size, out)
    longest = int((stops - starts).max())
    return np.minimum(starts[:, None] + np.arange(longest), stops[:, None] - 1)


def adaptive_is_uniform(spatial: tuple[int, ...], out: tuple[int, ...]) -> bool:
    """Whether every window has the same size and windows do not overlap (each input size a
    multiple of its output size): a windowed pool with kernel = stride = size / out."""
    return all(s % o == 0 for s, o in zip(spatial, out, strict=True))


class AdaptivePool(OpDef):
    """attr ``size`` (an output size per spatial axis): the mean (``adaptive_avgpool``) or
    maximum (``adaptive_maxpool``) over PyTorch's adaptive windows (adaptive_windows), as
    torch.nn.AdaptiveAvgPool1d/2d and AdaptiveMaxPool1d/2d."""

    def __init__(self, name: str):
        self.name = name

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        (x,) = inputs
        size = tuple(attrs["size"])
        if x.rank not in (3, 4):
            raise ShapeError(f"{self.name} needs a feature map N×C×L or N×C×H×W, got {x}")
        if len(size) != x.rank - 2:
            raise ShapeError(f"{self.name} size {format_dims(size)} does not fit {x}")
        if min(size) < 1:
            raise ShapeError(f"{self.name} size {format_dims(size)} must be positive")
        return [x.with_shape((*x.shape[:2], *size))]

    def macs(self, node) -> int:
        return pool_macs(node)

    def label(self, node) -> str:
        return f"{self.name}{len(node.attrs['size'])}d"

    def describe(self, node) -> str:
        return f"size={format_dims(node.attrs['size'])}"


for _op in (AdaptivePool("adaptive_avgpool"), AdaptivePool("adaptive_maxpool")):
    register_op(_op)


def _build_adaptive(op: str):
    def build(ctx: LayerContext, x):
        rank = feature_map_rank(ctx, x.type, op)
        return ctx.node(op, [x], {"size": tuple(ctx.spatial("size", rank))})

    return build


_ADAPTIVE_SIZE = Attr(
    "size", "ints", positional=True, minimum=1, doc="the output size: s, or (h, w)"
)
register_layer(
    Layer(
        "adaptive_avgpool",
        (_ADAPTIVE_SIZE,),
        _build_adaptive("adaptive_avgpool"),
        "Mean over PyTorch's adaptive windows, giving an output of the size given whatever "
        "the input's (torch.nn.AdaptiveAvgPool2d): output i covers floor(i·in/out) to "
        "ceil((i+1)·in/out). adaptive_avgpool(1) computes what gap does.",
    )
)
register_layer(
    Layer(
        "adaptive_maxpool",
        (_ADAPTIVE_SIZE,),
        _build_adaptive("adaptive_maxpool"),
        "Maximum over PyTorch's adaptive windows (torch.nn.AdaptiveMaxPool2d): output i "
        "covers floor(i·in/out) to ceil((i+1)·in/out).",
    )
)
