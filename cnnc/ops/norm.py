"""Normalization: batch normalization at inference (``bn``, a per-channel scale and shift from
four tensors), layer normalization over the channels of each position (``layernorm``,
ConvNeXt), group normalization (``groupnorm``), local response normalization across
channels (``lrn``, AlexNet), and learned per-channel scales and shifts (``affine``,
``scale``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from cnnc.errors import ShapeError
from cnnc.ir.types import TensorType
from cnnc.ops.base import Attr, Layer, LayerContext, OpDef, register_layer, register_op
from cnnc.ops.common import resolve_axis
from cnnc.ops.conv import feature_map_rank


class BatchNorm(OpDef):
    """inputs (x, weight, bias, running_mean, running_var), attr epsilon:
    y = (x - mean) / sqrt(var + epsilon) * weight + bias, per channel (axis 1)."""

    name = "bn"
    statistics = (3, 4)

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        x = inputs[0]
        if x.rank < 2:
            raise ShapeError(f"bn needs an input with channels N×C…, got {x}")
        for p in inputs[1:]:
            if p.shape != (x.shape[1],):
                raise ShapeError(f"bn parameter {p} does not match the {x.shape[1]} channels")
        return [x]

    def macs(self, node) -> int:
        # At inference x·s + t, s and t per channel, computed once from the statistics.
        return node.output.type.numel_per_item()

    def describe(self, node) -> str:
        return f"eps={node.attrs['epsilon']:g}"


register_op(BatchNorm())


# The ops that scale and shift each channel (x·s + t): channel_scale_shift reads them.
CHANNEL_NORMS = ("bn", "affine", "scale")


def has_constant_params(node) -> bool:
    """Whether every input of ``node`` after x is a parameter with its values (not a value of
    the run, as a training step's parameters are)."""
    return all(v.is_param and v.has_data for v in node.inputs[1:])


def channel_scale_shift(node) -> tuple[np.ndarray, np.ndarray | None]:
    """The per-channel scale s and shift t of a bn, affine or scale node: y = x·s + t (no
    shift, None, for a scale)."""
    if node.op == "scale":
        return node.inputs[1].data.reshape(-1), None
    if node.op == "affine":
        return node.inputs[1].data, node.inputs[2].data
    weight, bias, mean, var = (v.data for v in node.inputs[1:])
    scale = weight / np.sqrt(var + var.dtype.type(node.attrs["epsilon"]))
    return scale, bias - mean * scale


# Random BN statistics are not the identity, so that folding them is visible and tested.
_BN_PARAMS = (
    ("weight", "bn_scale"),
    ("bias", "bn_shift"),
    ("running_mean", "bn_shift"),
    ("running_var", "bn_scale"),
)


def build_bn(ctx: LayerContext, x):
    channels = x.shape[1]
    params = [ctx.param(suffix, (channels,), (init, channels)) for suffix, init in _BN_PARAMS]
    return ctx.node("bn", [x, *params], {"epsilon": ctx["eps"]})


register_layer(
    Layer(
        "bn",
        (Attr("eps", "float", 1e-5, minimum=0, doc="added to the variance"),),
        build_bn,
        "Batch normalization (inference) over the channels, after a conv or an fc. "
        "Tensors <name>.weight, .bias, .running_mean, .running_var [C], as torch.nn.BatchNorm.",
        has_params=True,
    )
)


class LocalResponseNorm(OpDef):
    """ONNX LRN, attrs size, alpha, beta, bias (the language's k):
    y = x / (bias + alpha / size * s) ** beta, where s at channel c is the sum of x² over
    channels c - floor((size-1)/2) .. c + ceil((size-1)/2) that exist.

    For odd sizes this is torch.nn.LocalResponseNorm (with k = bias). For even sizes the
    window has one channel more after c than before; PyTorch puts it before instead, and
    onnxruntime runs odd sizes only, so the language refuses even sizes (imported models
    may have them).
    """

    name = "lrn"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        (x,) = inputs
        if x.rank < 3:
            raise ShapeError(f"lrn needs a feature map N×C×L or N×C×H×W, got {x}")
        return [x]

    def macs(self, node) -> int:
        # The square of each value, its window's sum times alpha/size, the division.
        return 3 * node.output.type.numel_per_item()

    def describe(self, node) -> str:
        a = node.attrs
        return f"size={a['size']} alpha={a['alpha']:g} beta={a['beta']:g} k={a['bias']:g}"


register_op(LocalResponseNorm())


def build_lrn(ctx: LayerContext, x):
    feature_map_rank(ctx, x.type, "lrn")
    size = ctx["size"]
    if size % 2 == 0:
        raise ctx.error(
            f"lrn size must be odd, got {size}: an even window cannot be centred on its channel "
            "(ONNX puts the extra channel after it, PyTorch before) and onnxruntime runs odd "
            "sizes only",
            "size",
            hint=f"use {size - 1} or {size + 1}",
        )
    attrs = {"size": size, "alpha": ctx["alpha"], "beta": ctx["beta"], "bias": ctx["k"]}
    return ctx.node("lrn", [x], attrs)


register_layer(
    Layer(
        "lrn",
        (
            Attr("size", "int", positional=True, minimum=1, doc="channels in each window (odd)"),
            Attr("alpha", "float", 1e-4, doc="scale of the sum of squares (divided by size)"),
            Attr("beta", "float", 0.75, doc="exponent"),
            Attr("k", "float", 1.0, doc="added before the exponent (ONNX LRN's bias)"),
        ),
        build_lrn,
        "Local response normalization across channels (AlexNet): each value divided by "
        "(k + alpha/size · the sum of squares of the size channels around it) ** beta, "
        "as torch.nn.LocalResponseNorm and ONNX LRN.",
    )
)


class Affine(OpDef):
    """inputs (x, weight, bias): y = x · weight + bias per channel (axis 1) — a batch norm
    whose statistics are folded in, or an imported Mul/Add by a per-channel constant."""

    name = "affine"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        x = inputs[0]
        if x.rank < 2:
            raise ShapeError(f"affine needs an input with channels N×C…, got {x}")
        for p in inputs[1:]:
            if p.shape != (x.shape[1],):
                raise ShapeError(f"affine parameter {p} does not match the {x.shape[1]} channels")
        return [x]

    def macs(self, node) -> int:
        return node.output.type.numel_per_item()  # x·weight + bias


register_op(Affine())


def build_affine(ctx: LayerContext, x):
    channels = x.shape[1]
    weight = ctx.param("weight", (channels,), ("bn_scale", channels))
    bias = ctx.param("bias", (channels,), ("bn_shift", channels))
    return ctx.node("affine", [x, weight, bias])


register_layer(
    Layer(
        "affine",
        (),
        build_affine,
        "A learned scale and shift per channel: x · <name>.weight + <name>.bias [C]. "
        "-O2 folds it into a conv or fc before it.",
        has_params=True,
    )
)


class Scale(OpDef):
    """inputs (x, weight [C, 1, ..., 1]): y = x · weight, one factor per channel (axis 1).

    The weight has PyTorch's broadcasting layout (ConvNeXt's ``layer_scale`` is [C, 1, 1]
    for an N×C×H×W map; [C] for N×C), so that it multiplies the map as it lies, in the
    interpreter and as ONNX Mul.
    """

    name = "scale"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        x, weight = inputs
        if x.rank < 2:
            raise ShapeError(f"scale needs an input with channels N×C…, got {x}")
        if weight.shape != scale_shape(x):
            raise ShapeError(
                f"scale weight {weight} does not fit {x}: expected "
                f"[{','.join(str(d) for d in scale_shape(x))}]"
            )
        return [x]

    def macs(self, node) -> int:
        return node.output.type.numel_per_item()  # x·weight


register_op(Scale())


def scale_shape(x: TensorType) -> tuple:
    """The shape of a scale's weight for input ``x``: [C, 1, ..., 1], one 1 per spatial axis."""
    return (x.shape[1], *(1,) * (x.rank - 2))


def build_scale(ctx: LayerContext, x):
    # The tensor is the layer itself (<name>, as ConvNeXt's layer_scale), so the node that
    # multiplies by it needs another name: <name>.mul. Value and node names share one
    # namespace in the IR.
    if ctx.graph.unique_name(ctx.name) != ctx.name:
        raise ctx.error(
            f"scale names its tensor {ctx.name!r} after the layer, but that name is taken",
            hint="label this scale with a name of its own",
        )
    shape = scale_shape(x.type)
    weight = ctx.graph.add_param(ctx.name, shape, ("bn_scale", shape[0]))
    return ctx.node("scale", [x, weight], suffix=".mul")


register_layer(
    Layer(
        "scale",
        (),
        build_scale,
        "A learned scale per channel without shift: x · <name>, the tensor named after the "
        "layer itself and shaped [C, 1, 1] ([C, 1] in 1-D), as ConvNeXt's layer_scale. The "
        "node is <name>.mul. -O2 folds it into a conv, fc or linear before it.",
        has_params=True,
    )
)


def normalization_macs(node) -> int:
    """A layernorm's or groupnorm's multiply-adds: 3 per element, the square for the
    variance, the multiplication by 1/σ, and the weight's (with the bias added)."""
    return 3 * node.output.type.numel_per_item()


class LayerNorm(OpDef):
    """inputs (x, weight [C], bias [C]), attrs axis, epsilon: at every position (every index
    of the other axes), y = (x - mean) / sqrt(var + epsilon) · weight + bias, mean and
    (biased) variance over the C values along ``axis``, as torch.nn.LayerNorm over the last
    axis of a channels-last map and torchvision's LayerNorm2d over axis 1."""

    name = "layernorm"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        x = inputs[0]
        axis = attrs["axis"]
        if x.rank < 2 or not 0 < axis < x.rank:
            raise ShapeError(f"layernorm axis {axis} is not an axis after the batch of {x}")
        for p in inputs[1:]:
            if p.shape != (x.shape[axis],):
                raise ShapeError(
                    f"layernorm parameter {p} does not match the {x.shape[axis]} values "
                    f"along axis {axis} of {x}"
                )
        return [x]

    def describe(self, node) -> str:
        return f"axis={node.attrs['axis']} eps={node.attrs['epsilon']:g}"

    def macs(self, node) -> int:
        return normalization_macs(node)


register_op(LayerNorm())


def build_layernorm(ctx: LayerContext, x):
    axis = resolve_axis(ctx, x.type, "layernorm")
    size = x.shape[axis]
    weight = ctx.param("weight", (size,), ("bn_scale", size))
    bias = ctx.param("bias", (size,), ("bn_shift", size))
    return ctx.node("layernorm", [x, weight, bias], {"axis": axis, "epsilon": ctx["eps"]})


register_layer(
    Layer(
        "layernorm",
        (
            Attr("eps", "float", 1e-5, minimum=0, doc="added to the variance"),
            Attr(
                "axis",
                "int",
                1,
                doc="the axis normalized at each position: 1, the channels (an imported "
                "channels-last map has the last, -1)",
            ),
        ),
        build_layernorm,
        "Layer normalization over the channels at each position (ConvNeXt): (x - mean) / "
        "sqrt(var + eps) · weight + bias. Tensors <name>.weight and <name>.bias [C], as "
        "torch.nn.LayerNorm(C) on a channels-last map and torchvision's LayerNorm2d.",
        has_params=True,
    )
)


class GroupNorm(OpDef):
    """inputs (x, weight [C], bias [C]), attrs groups, epsilon: the channels split into
    ``groups`` runs of C/groups; each item's run, with all its positions, is normalized by
    its mean and (biased) variance, then scaled and shifted per channel, as
    torch.nn.GroupNorm (groups = C is instance normalization, groups = 1 normalizes each
    item as a whole)."""

    name = "groupnorm"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        x = inputs[0]
        groups = attrs["groups"]
        if x.rank < 2:
            raise ShapeError(f"groupnorm needs an input with channels N×C…, got {x}")
        if groups < 1 or x.shape[1] % groups:
            raise ShapeError(f"groupnorm groups={groups} does not divide the {x.shape[1]} channels")
        for p in inputs[1:]:
            if p.shape != (x.shape[1],):
                raise ShapeError(
                    f"groupnorm parameter {p} does not match the {x.shape[1]} channels"
                )
        return [x]

    def describe(self, node) -> str:
        return f"g={node.attrs['groups']} eps={node.attrs['epsilon']:g}"

    def macs(self, node) -> int:
        return normalization_macs(node)


register_op(GroupNorm())


def build_groupnorm(ctx: LayerContext, x):
    channels, groups = x.shape[1], ctx["groups"]
    if channels % groups:
        divisors = [d for d in range(1, channels + 1) if channels % d == 0]
        raise ctx.error(
            f"groupnorm groups={groups} does not divide the {channels} channels",
            "groups",
            hint="use a divisor of " + str(channels) + ": " + ", ".join(map(str, divisors)),
        )
    weight = ctx.param("weight", (channels,), ("bn_scale", channels))
    bias = ctx.param("bias", (channels,), ("bn_shift", channels))
    return ctx.node("groupnorm", [x, weight, bias], {"groups": groups, "epsilon": ctx["eps"]})


register_layer(
    Layer(
        "groupnorm",
        (
            Attr("groups", "int", positional=True, minimum=1, doc="groups of channels (divides C)"),
            Attr("eps", "float", 1e-5, minimum=0, doc="added to the variance"),
        ),
        build_groupnorm,
        "Group normalization (torch.nn.GroupNorm(groups, C)): each group of C/groups "
        "channels of an item normalized over its values, then · weight + bias per channel. "
        "Tensors <name>.weight and <name>.bias [C].",
        has_params=True,
    )
)
