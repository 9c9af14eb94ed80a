"""Normalization: batch normalization at inference (``bn``, a per-channel scale and shift from
four tensors) and local response normalization across channels (``lrn``, AlexNet)."""

from __future__ import annotations

from typing import Any

import numpy as np

from cnnc.errors import ShapeError
from cnnc.ir.types import TensorType
from cnnc.ops.base import Attr, Layer, LayerContext, OpDef, register_layer, register_op
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

    def describe(self, node) -> str:
        return f"eps={node.attrs['epsilon']:g}"


register_op(BatchNorm())


def channel_scale_shift(node) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel scale s and shift t of a bn or affine node: y = x·s + t."""
    if node.op == "affine":
        return node.inputs[1].data, node.inputs[2].data
    weight, bias, mean, var = (v.data for v in node.inputs[1:])
    scale = weight / np.sqrt(var + np.float32(node.attrs["epsilon"]))
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
