"""Merges of branches: element-wise arithmetic between computed values (``add`` for residual
connections, ``mul`` for squeeze-and-excitation, ``sub``, ``div``), broadcasting as PyTorch
does, and channel ``concat``."""

from __future__ import annotations

from typing import Any

from cnnc.errors import ShapeError
from cnnc.ir.types import TensorType
from cnnc.ops.base import Attr, Layer, LayerContext, OpDef, register_layer, register_op


def _shape(t: TensorType) -> str:
    return "(" + ",".join(str(d) for d in t.shape) + ")"


# The axes of a value, as messages name them.
_AXES = {2: ("batch", "features"), 3: ("batch", "channels", "length")}
_AXES[4] = ("batch", "channels", "height", "width")


def broadcast_shape(op: str, inputs: list[TensorType]) -> tuple:
    """The shape of an element-wise op's output: on every axis the inputs' sizes are equal,
    or 1 where one input is repeated across the others (N×C×H×W with N×C×1×1 is a
    squeeze-and-excitation scale); inputs have one rank, as PyTorch's channel-first
    tensors of one kind do."""
    first = inputs[0]
    shape = list(first.shape)
    for other in inputs[1:]:
        if other.rank != first.rank:
            raise ShapeError(
                f"{op} needs inputs of one rank, got {_shape(first)} and {_shape(other)}",
                hint="a scale per channel of a feature map is N×C×1×1: reshape an N×C value "
                "with reshape((C, 1, 1))",
            )
        for axis, (a, b) in enumerate(zip(shape, other.shape, strict=True)):
            if a == b or b == 1:
                continue
            if a == 1:
                shape[axis] = b
                continue
            names = _AXES.get(first.rank, ())
            where = f"the {names[axis]}" if axis < len(names) else f"axis {axis}"
            raise ShapeError(
                f"{op} needs shapes that broadcast, got {_shape(first)} and {_shape(other)}: "
                f"{where} differ ({a} and {b}), and neither is 1",
                hint="a residual branch that changes channels or size needs a projection "
                "(a 1x1 conv with the same stride) on its shortcut"
                if op == "add"
                else "on each axis the sizes must be equal, or one of them 1",
            )
    return tuple(shape)


class Elementwise(OpDef):
    """The element-wise ``op`` of two (or, for add and mul, more) tensors that broadcast."""

    def __init__(self, name: str, variadic: bool):
        self.name = name
        self.variadic = variadic

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        if len(inputs) < 2 or (len(inputs) > 2 and not self.variadic):
            raise ShapeError(
                f"{self.name} takes {'two or more' if self.variadic else 'two'} inputs"
            )
        return [inputs[0].with_shape(broadcast_shape(self.name, inputs))]

    def macs(self, node) -> int:
        # A product or quotient per output element and input after the first; a sum or
        # difference does no multiplication.
        if self.name in ("add", "sub"):
            return 0
        return (len(node.inputs) - 1) * node.output.type.numel_per_item()


# Element-wise arithmetic between computed values; add and mul take any number of inputs,
# applied left to right.
ARITHMETIC = {"add": True, "mul": True, "sub": False, "div": False}


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


for _op, _variadic in ARITHMETIC.items():
    register_op(Elementwise(_op, _variadic))
register_op(Concat())


def _build_merge(op: str, most: int | None = None):
    def build(ctx: LayerContext, x):
        inputs = ctx["inputs"]
        if len(inputs) < 2 or (most is not None and len(inputs) > most):
            exactly = "two" if most == 2 else "at least two"
            raise ctx.error(
                f"{op} needs {exactly} values, got {len(inputs)}", hint=f"for example {op}(a, b)"
            )
        return ctx.node(op, list(inputs))

    return build


_DOCS = {
    "add": "Element-wise sum of values that broadcast: add(y, shortcut) (a residual "
    "connection), add(x, bias_map).",
    "mul": "Element-wise product of values that broadcast: mul(x, s) with s N×C×1×1 scales "
    "each channel (squeeze-and-excitation).",
    "sub": "Element-wise difference a - b of two values that broadcast.",
    "div": "Element-wise quotient a / b of two values that broadcast.",
}
for _op, _variadic in ARITHMETIC.items():
    register_layer(
        Layer(
            _op,
            (
                Attr(
                    "inputs",
                    "values",
                    positional=True,
                    doc="the values, in order",
                    default_text=None if _variadic else "a, b",
                ),
            ),
            _build_merge(_op, None if _variadic else 2),
            _DOCS[_op],
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
