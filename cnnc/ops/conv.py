"""Convolution (1-D and 2-D, strided, padded, dilated, grouped): the ``conv`` layer and op."""

from __future__ import annotations

from math import prod
from typing import Any

from cnnc.errors import ShapeError
from cnnc.ir.types import TensorType
from cnnc.ops.activation import activation_label, activation_text
from cnnc.ops.base import Attr, Layer, LayerContext, OpDef, register_layer, register_op
from cnnc.ops.common import conv_out_channels_check, describe_window, resolve_pads, windowed_shape


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
