"""Merges of branches: element-wise ``add`` (residual connections) and channel ``concat``."""

from __future__ import annotations

from typing import Any

from cnnc.errors import ShapeError
from cnnc.ir.types import TensorType
from cnnc.ops.base import Attr, Layer, LayerContext, OpDef, register_layer, register_op


def _shape(t: TensorType) -> str:
    return "(" + ",".join(str(d) for d in t.shape) + ")"


class Add(OpDef):
    """The element-wise sum of two or more tensors of one shape."""

    name = "add"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        first = inputs[0]
        for other in inputs[1:]:
            if other != first:
                raise ShapeError(
                    f"add needs inputs of one shape, got {_shape(first)} and {_shape(other)}",
                    hint="a residual branch that changes channels or size needs a projection "
                    "(a 1x1 conv with the same stride) on its shortcut",
                )
        return [first]


class Concat(OpDef):
    """Tensors joined along the channel axis (axis 1); every other size must match."""

    name = "concat"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        first = inputs[0]
        for other in inputs[1:]:
            if other.rank != first.rank or other.shape[2:] != first.shape[2:]:
                raise ShapeError(
                    f"concat joins channels and needs equal sizes otherwise, got {_shape(first)} "
                    f"and {_shape(other)}",
                    hint="pad or stride the branches so that their spatial sizes match",
                )
        if any(not isinstance(t.shape[1], int) for t in inputs):
            raise ShapeError("concat needs known channel counts")
        channels = sum(t.shape[1] for t in inputs)
        return [first.with_shape((first.shape[0], channels, *first.shape[2:]))]

    def describe(self, node) -> str:
        return "axis=1"


register_op(Add())
register_op(Concat())


def _build_merge(op: str):
    def build(ctx: LayerContext, x):
        inputs = ctx["inputs"]
        if len(inputs) < 2:
            raise ctx.error(
                f"{op} needs at least two values, got {len(inputs)}", hint=f"for example {op}(a, b)"
            )
        return ctx.node(op, list(inputs))

    return build


register_layer(
    Layer(
        "add",
        (Attr("inputs", "values", positional=True, doc="the values to add"),),
        _build_merge("add"),
        "Element-wise sum of values of one shape: add(y, shortcut).",
    )
)
register_layer(
    Layer(
        "concat",
        (Attr("inputs", "values", positional=True, doc="the values to join"),),
        _build_merge("concat"),
        "Joins values along the channels: concat(a, b, c); spatial sizes must match.",
    )
)
