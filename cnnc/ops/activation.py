"""Element-wise activations (``relu``, ``sigmoid``, ``tanh``) and ``softmax``."""

from __future__ import annotations

from typing import Any

from cnnc.errors import ShapeError
from cnnc.ir.types import TensorType
from cnnc.ops.base import Attr, Layer, LayerContext, OpDef, register_layer, register_op


class Elementwise(OpDef):
    """An op applied to each element: the output type is the input type."""

    def __init__(self, name: str):
        self.name = name

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        return [inputs[0]]


class Softmax(OpDef):
    """exp(x) / sum(exp(x)) along ``axis`` (ONNX Softmax, opset 13 and later)."""

    name = "softmax"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        (x,) = inputs
        if not -x.rank <= attrs["axis"] < x.rank:
            raise ShapeError(f"softmax axis {attrs['axis']} is out of range for {x}")
        return [x]

    def describe(self, node) -> str:
        return f"axis={node.attrs['axis']}"


ACTIVATIONS = {
    "relu": "max(x, 0)",
    "sigmoid": "1 / (1 + exp(-x))",
    "tanh": "tanh(x)",
}

# Activations a convolution can apply to its own output (fuse-conv-act).
FUSIBLE = frozenset(ACTIVATIONS)


def fused_function_name(activation: str) -> str:
    """The ONNX function (domain ``cnnc``) of a conv fused with ``activation``: ConvRelu, ..."""
    return "Conv" + "".join(part.title() for part in activation.split("_"))


for _name, _formula in ACTIVATIONS.items():
    register_op(Elementwise(_name))
    register_layer(
        Layer(
            _name,
            (),
            lambda ctx, x, op=_name: ctx.node(op, [x]),
            f"Element-wise {_formula}.",
        )
    )

register_op(Softmax())


def build_softmax(ctx: LayerContext, x):
    axis = ctx["axis"]
    if not -x.type.rank <= axis < x.type.rank:
        raise ctx.error(f"softmax axis {axis} is out of range for its input {x.type}", "axis")
    if axis in (0, -x.type.rank):
        raise ctx.error(
            "softmax over the batch axis would make each item depend on the others",
            "axis",
            hint="use axis=1, the channels",
        )
    return ctx.node("softmax", [x], {"axis": axis})


register_layer(
    Layer(
        "softmax",
        (Attr("axis", "int", 1, positional=True, doc="the axis that sums to 1 (the channels)"),),
        build_softmax,
        "Class probabilities: exp(x) normalised to sum to 1 along the axis.",
    )
)
