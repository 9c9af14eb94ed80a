"""Convolution (1-D and 2-D, strided, padded, dilated, grouped) and its transpose: the ``conv``
and ``conv_transpose`` layers and ops."""

from __future__ import annotations

from math import prod
from typing import Any

from cnnc.errors import ShapeError
from cnnc.ir.types import TensorType, format_dims
from cnnc.ops.activation import activation_label, activation_text
from cnnc.ops.base import Attr, Layer, LayerContext, OpDef, register_layer, register_op
from cnnc.ops.common import (
    LAYOUTS,
    conv_out_channels_check,
    describe_window,
    pad_text,
    resolve_pads,
    windowed_shape,
)


def feature_map_rank(ctx: LayerContext, x_type: TensorType, keyword: str) -> int:
    """The number of spatial axes of a feature map input; an error for anything else."""
    rank = x_type.rank - 2
    if rank not in (1, 2):
        raise ctx.error(
            f"{keyword} needs a feature map N×C×L or N×C×H×W, but its input is {x_type}",
            hint=f"{keyword} cannot follow fc, flatten or softmax",
        )
    return rank


class Conv(OpDef):
    """inputs (x, weight[, bias]); attrs stride, pads, dilation, groups (ONNX Conv), and
    after fuse-conv-act ``activation`` (an activation op) with its ``activation_attrs``."""

    name = "conv"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        x, w = inputs[0], inputs[1]
        groups = attrs["groups"]
        if w.rank != x.rank:
            raise ShapeError(f"conv weight {w} does not fit input {x}")
        if x.shape[1] != w.shape[1] * groups:
            raise ShapeError(
                f"conv weight {w} with groups={groups} expects {w.shape[1] * groups} input "
                f"channels, but the input {x} has {x.shape[1]}"
            )
        if len(inputs) > 2 and inputs[2].shape != (w.shape[0],):
            raise ShapeError(f"conv bias {inputs[2]} does not match {w.shape[0]} output channels")
        kernel = tuple(w.shape[2:])
        out = windowed_shape("conv", x, kernel, attrs["stride"], attrs["pads"], attrs["dilation"])
        return [x.with_shape((x.shape[0], w.shape[0], *out))]

    def macs(self, node) -> int:
        w = node.inputs[1].type.shape
        return prod(node.output.type.shape[1:]) * prod(w[1:])

    def label(self, node) -> str:
        conv = f"conv{node.inputs[1].type.rank - 2}d"
        act = node.attrs.get("activation")
        return f"{conv}+{activation_label(act, node.attrs['activation_attrs'])}" if act else conv

    def describe(self, node) -> str:
        a = node.attrs
        text = describe_window(
            tuple(node.inputs[1].shape[2:]), a["stride"], a["pads"], a["dilation"]
        )
        text += f" g={a['groups']}" if a["groups"] != 1 else ""
        act = a.get("activation")
        act_text = activation_text(act, a["activation_attrs"]) if act else ""
        return f"{text} {act_text}" if act_text else text


register_op(Conv())


def build_conv(ctx: LayerContext, x):
    rank = feature_map_rank(ctx, x.type, "conv")
    out, groups, channels = ctx["out"], ctx["groups"], x.shape[1]
    conv_out_channels_check(ctx, channels, out, groups)
    kernel = ctx.spatial("kernel", rank)
    stride = ctx.spatial("stride", rank)
    dilation = ctx.spatial("dilation", rank)
    pads = resolve_pads(ctx, "pad", x.type, kernel, stride, dilation)
    fan_in = channels // groups * prod(kernel)
    inputs = [x, ctx.param("weight", (out, channels // groups, *kernel), ("he_normal", fan_in))]
    if ctx["bias"]:
        inputs.append(ctx.param("bias", (out,), ("uniform", fan_in)))
    attrs = {"stride": stride, "pads": pads, "dilation": dilation, "groups": groups}
    return ctx.node("conv", inputs, attrs)


register_layer(
    Layer(
        "conv",
        (
            Attr(
                "out", "int", positional=True, minimum=1, doc="number of kernels (output channels)"
            ),
            Attr("kernel", "ints", positional=True, minimum=1, doc="kernel size: k, or (kh, kw)"),
            Attr("stride", "ints", 1, minimum=1, doc="step between windows"),
            Attr("pad", "pad", 0, minimum=0, doc="zero padding: see Padding"),
            Attr("dilation", "ints", 1, minimum=1, doc="spacing between kernel taps"),
            Attr("groups", "int", 1, minimum=1, doc="channel groups (groups=C is depthwise)"),
            Attr("bias", "bool", True, doc="add a learned bias per output channel"),
        ),
        build_conv,
        "Convolution, 1-D or 2-D following the input's rank. Weights <name>.weight "
        "[out, C/groups, kh, kw] (OIHW; OIL in 1-D) and <name>.bias [out].",
        has_params=True,
    )
)


# ---- transposed convolution -------------------------------------------------------------------


OUTPUT_PAD_HINT = "output_pad is at most max(stride, dilation) − 1 on each axis"


def output_pad_problem(
    output_pad: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...]
) -> str | None:
    """What is wrong with a transposed convolution's output padding, or None. PyTorch's rule:
    smaller than the stride or the dilation of its axis (output_pad picks one of the output
    sizes that a convolution with that stride maps back to the size of the input)."""
    for axis, (p, s, d) in enumerate(zip(output_pad, stride, dilation, strict=True)):
        if p >= max(s, d):
            where = f" on axis {axis + 1}" if len(output_pad) > 1 else ""
            return (
                f"conv_transpose output_pad {p}{where} must be smaller than its stride {s} "
                f"or its dilation {d}"
            )
    return None


def conv_transpose_sizes(
    spatial: tuple[int, ...],
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    pads: tuple[int, ...],
    dilation: tuple[int, ...],
    output_pad: tuple[int, ...],
) -> tuple[int, ...]:
    """Output sizes of a transposed convolution: per axis
    (in − 1)·stride − pad_begin − pad_end + dilation·(k − 1) + output_pad + 1."""
    rank = len(kernel)
    return tuple(
        (size - 1) * s - pads[i] - pads[i + rank] + d * (k - 1) + p + 1
        for i, (size, k, s, d, p) in enumerate(
            zip(spatial, kernel, stride, dilation, output_pad, strict=True)
        )
    )


class ConvTranspose(OpDef):
    """inputs (x, weight [C_in, out/groups, k...], bias [out]); attrs stride, pads (ONNX order:
    begin..., end...), output_pad, dilation, groups (ONNX ConvTranspose; PyTorch's
    ConvTranspose1d/2d). Each input pixel adds its channels' weights, scaled by its value,
    into a window of the output at ``stride`` times its position; ``pads`` then crop the
    result and ``output_pad`` extends it at the end."""

    name = "conv_transpose"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        x, w = inputs[0], inputs[1]
        groups = attrs["groups"]
        rank = x.rank - 2
        if rank not in LAYOUTS:
            raise ShapeError(f"conv_transpose needs an input N×C×L or N×C×H×W, got {x}")
        if w.rank != x.rank:
            raise ShapeError(f"conv_transpose weight {w} does not fit input {x}")
        if x.shape[1] != w.shape[0]:
            raise ShapeError(
                f"conv_transpose weight {w} expects {w.shape[0]} input channels, but the "
                f"input {x} has {x.shape[1]}"
            )
        if w.shape[0] % groups:
            raise ShapeError(
                f"conv_transpose groups={groups} does not divide the {w.shape[0]} input channels"
            )
        channels = w.shape[1] * groups
        if len(inputs) > 2 and inputs[2].shape != (channels,):
            raise ShapeError(
                f"conv_transpose bias {inputs[2]} does not match {channels} output channels"
            )
        spatial = tuple(x.spatial)
        if not all(isinstance(d, int) for d in spatial):
            raise ShapeError(f"conv_transpose needs known spatial sizes, got {x}")
        kernel = tuple(w.shape[2:])
        stride, pads, dilation = attrs["stride"], attrs["pads"], attrs["dilation"]
        output_pad = attrs["output_pad"]
        problem = output_pad_problem(output_pad, stride, dilation)
        if problem:
            raise ShapeError(problem, hint=OUTPUT_PAD_HINT)
        out = conv_transpose_sizes(spatial, kernel, stride, pads, dilation, output_pad)
        if any(size < 1 for size in out):
            full = conv_transpose_sizes(
                spatial, kernel, stride, (0,) * 2 * rank, dilation, output_pad
            )
            raise ShapeError(
                f"conv_transpose pads {pad_text(pads)} crop its whole {format_dims(full)} "
                f"output (input {x}) to {format_dims(out)}",
                hint="use less padding",
            )
        return [x.with_shape((x.shape[0], channels, *out))]

    def macs(self, node) -> int:
        w = node.inputs[1].type.shape
        return prod(node.inputs[0].type.spatial) * prod(w)

    def label(self, node) -> str:
        return f"conv_transpose{node.inputs[1].type.rank - 2}d"

    def describe(self, node) -> str:
        a = node.attrs
        text = describe_window(
            tuple(node.inputs[1].shape[2:]), a["stride"], a["pads"], a["dilation"]
        )
        output_pad = a["output_pad"]
        if any(output_pad):
            same = len(set(output_pad)) == 1
            text += f" op={output_pad[0] if same else format_dims(output_pad)}"
        return text + (f" g={a['groups']}" if a["groups"] != 1 else "")


register_op(ConvTranspose())


def _same_hint(kernel, stride, dilation) -> str:
    """Explicit padding for an output of input × stride (what ONNX's SAME_UPPER computes)."""
    begins, ends, extra = [], [], []
    for k, s, d in zip(kernel, stride, dilation, strict=True):
        total = d * (k - 1) + 1 - s
        begins.append(max(total, 0) // 2)
        ends.append(max(total, 0) - max(total, 0) // 2)
        extra.append(max(-total, 0))
    text = f"pad={pad_text((*begins, *ends))}"
    if any(extra):
        text += f", output_pad={extra[0] if len(set(extra)) == 1 else tuple(extra)}"
    return f"for an output of input × stride, write {text}"


def build_conv_transpose(ctx: LayerContext, x):
    rank = feature_map_rank(ctx, x.type, "conv_transpose")
    out, groups, channels = ctx["out"], ctx["groups"], x.shape[1]
    conv_out_channels_check(ctx, channels, out, groups)
    kernel = ctx.spatial("kernel", rank)
    stride = ctx.spatial("stride", rank)
    dilation = ctx.spatial("dilation", rank)
    output_pad = ctx.spatial("output_pad", rank)
    if ctx["pad"] == "same":
        raise ctx.error(
            "conv_transpose takes no pad=same: its output size is set by its padding, "
            "(in − 1)·stride − pads + dilation·(kernel − 1) + output_pad + 1",
            "pad",
            hint=_same_hint(kernel, stride, dilation),
        )
    pads = resolve_pads(ctx, "pad", x.type, kernel, stride, dilation)
    problem = output_pad_problem(output_pad, stride, dilation)
    if problem:
        raise ctx.error(problem, "output_pad", hint=OUTPUT_PAD_HINT)
    # PyTorch's fan-in of a ConvTranspose weight: weight.size(1) · prod(kernel).
    fan_in = out // groups * prod(kernel)
    weight = ctx.param("weight", (channels, out // groups, *kernel), ("he_normal", fan_in))
    inputs = [x, weight]
    if ctx["bias"]:
        inputs.append(ctx.param("bias", (out,), ("uniform", fan_in)))
    attrs = {
        "stride": stride,
        "pads": pads,
        "output_pad": output_pad,
        "dilation": dilation,
        "groups": groups,
    }
    return ctx.node("conv_transpose", inputs, attrs)


register_layer(
    Layer(
        "conv_transpose",
        (
            Attr("out", "int", positional=True, minimum=1, doc="output channels"),
            Attr("kernel", "ints", positional=True, minimum=1, doc="kernel size: k, or (kh, kw)"),
            Attr("stride", "ints", 1, minimum=1, doc="upsampling factor: output step per input"),
            Attr("pad", "pad", 0, minimum=0, doc="rows and columns cropped from the output"),
            Attr(
                "output_pad",
                "ints",
                0,
                minimum=0,
                doc="rows and columns added at the output's end (smaller than stride)",
            ),
            Attr("dilation", "ints", 1, minimum=1, doc="spacing between kernel taps"),
            Attr("groups", "int", 1, minimum=1, doc="channel groups"),
            Attr("bias", "bool", True, doc="add a learned bias per output channel"),
        ),
        build_conv_transpose,
        "Transposed convolution (PyTorch's ConvTranspose1d/2d), 1-D or 2-D following the "
        "input's rank. Weights <name>.weight [C, out/groups, kh, kw] and <name>.bias [out].",
        has_params=True,
    )
)
