"""Ops that move or pass data without arithmetic: ``dropout``, ``reshape``, ``transpose``."""

from __future__ import annotations

import math
from typing import Any

from cnnc.errors import ShapeError
from cnnc.ir.types import TensorType, format_dims
from cnnc.ops.base import Attr, Layer, LayerContext, OpDef, register_layer, register_op


class Dropout(OpDef):
    """Identity at inference; kept in the IR so that exported models show where it was."""

    name = "dropout"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        return [inputs[0]]

    def describe(self, node) -> str:
        return f"p={node.attrs['ratio']:g}"


register_op(Dropout())


def build_dropout(ctx: LayerContext, x):
    ratio = ctx["ratio"]
    if not 0 <= ratio < 1:
        raise ctx.error(f"dropout probability must be in [0, 1), got {ratio}", "ratio")
    return ctx.node("dropout", [x], {"ratio": float(ratio)})


register_layer(
    Layer(
        "dropout",
        (Attr("ratio", "float", 0.5, positional=True, doc="probability of dropping in training"),),
        build_dropout,
        "Identity at inference (the probability is recorded for the exported model).",
    )
)


class Reshape(OpDef):
    """attr ``shape``: the new sizes of every axis but the batch, which is kept."""

    name = "reshape"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        (x,) = inputs
        shape = tuple(attrs["shape"])
        if any(not isinstance(d, int) or d < 1 for d in shape):
            raise ShapeError(f"reshape sizes must be positive integers, got {shape}")
        if math.prod(shape) != x.numel_per_item():
            raise ShapeError(
                f"reshape to {format_dims(shape)} needs {math.prod(shape)} values per item, "
                f"but the input {x} has {x.numel_per_item()}"
            )
        return [x.with_shape((x.shape[0], *shape))]

    def describe(self, node) -> str:
        return "to " + format_dims(node.attrs["shape"])

    def fixed_size(self, node) -> str | None:
        return f"fixes every size of its output ({format_dims(node.attrs['shape'])})"


class Transpose(OpDef):
    """attr ``perm``: output axis i is input axis perm[i]; the batch axis stays first."""

    name = "transpose"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        (x,) = inputs
        perm = tuple(attrs["perm"])
        if sorted(perm) != list(range(x.rank)) or perm[0] != 0:
            raise ShapeError(
                f"transpose needs a permutation of the axes 1..{x.rank - 1} of {x}, got "
                f"{perm[1:]} (the batch axis stays first)"
            )
        return [x.with_shape(tuple(x.shape[i] for i in perm))]

    def describe(self, node) -> str:
        return "perm=" + ",".join(str(p) for p in node.attrs["perm"])


register_op(Reshape())
register_op(Transpose())


def build_reshape(ctx: LayerContext, x):
    shape = ctx["shape"]
    shape = shape if isinstance(shape, tuple) else (shape,)
    per_item = x.type.numel_per_item()
    if shape.count(-1) > 1 or any(d == 0 or d < -1 for d in shape):
        raise ctx.error("reshape sizes must be positive, with at most one -1", "shape")
    if -1 in shape:
        known = -math.prod(shape)
        if per_item % known:
            raise ctx.error(
                f"reshape to {shape} cannot hold the {per_item} values of {x.type}", "shape"
            )
        shape = tuple(per_item // known if d == -1 else d for d in shape)
    return ctx.node("reshape", [x], {"shape": shape})


def build_transpose(ctx: LayerContext, x):
    perm = ctx["perm"]
    perm = perm if isinstance(perm, tuple) else (perm,)
    if sorted(perm) != list(range(1, x.type.rank)):
        raise ctx.error(
            f"transpose needs a permutation of the axes 1..{x.type.rank - 1} of {x.type}, "
            f"got {perm}",
            "perm",
        )
    return ctx.node("transpose", [x], {"perm": (0, *perm)})


register_layer(
    Layer(
        "reshape",
        (Attr("shape", "ints", positional=True, doc="sizes of the axes after the batch"),),
        build_reshape,
        "Gives the values of each item a new shape (C, H, W order kept): reshape((3, 8, 28, 28)); "
        "one size may be -1.",
    )
)
register_layer(
    Layer(
        "transpose",
        (Attr("perm", "ints", positional=True, doc="which input axis each output axis is"),),
        build_transpose,
        "Permutes the axes after the batch, numbered from 1: transpose((2, 1, 3, 4)) swaps the "
        "first two (ShuffleNet's channel shuffle).",
    )
)
