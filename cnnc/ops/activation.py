"""Element-wise activations (``relu``, ``leaky_relu``, ``clip`` and ``relu6``, ``sigmoid``,
``tanh``) and ``softmax``.

``relu6`` is not an op of its own: it is ``clip`` with min 0 and max 6, which the dump
calls relu6. Clip's bounds are float attributes in the IR where ONNX Clip takes them as
inputs; a side without a bound (an imported Clip may leave one out, the language always
gives both) is -inf or inf.
"""

from __future__ import annotations

from typing import Any

from cnnc.errors import ShapeError
from cnnc.ir.types import TensorType
from cnnc.ops.base import Attr, Layer, LayerContext, OpDef, register_layer, register_op


def activation_label(op: str, attrs: dict[str, Any]) -> str:
    """How the dump names an activation: its op, except ``relu6`` for a clip to [0, 6]."""
    if op == "clip" and (attrs["min"], attrs["max"]) == (0, 6):
        return "relu6"
    return op


def activation_text(op: str, attrs: dict[str, Any]) -> str:
    """An activation's attributes as the dump shows them (``alpha=0.2``, ``min=-1 max=1``)."""
    if activation_label(op, attrs) != op:
        return ""
    names = ("min", "max") if op == "clip" else attrs
    return " ".join(f"{name}={attrs[name]:g}" for name in names)


class Elementwise(OpDef):
    """An op applied to each element: the output type is the input type."""

    def __init__(self, name: str):
        self.name = name

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        return [inputs[0]]

    def label(self, node) -> str:
        return activation_label(self.name, node.attrs)

    def describe(self, node) -> str:
        return activation_text(self.name, node.attrs)


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


# Every element-wise op and its formula; attributes keep ONNX's names (LeakyRelu's alpha).
ACTIVATIONS = {
    "relu": "max(x, 0)",
    "leaky_relu": "x if x >= 0, else alpha·x",
    "clip": "min(max(x, min), max)",
    "sigmoid": "1 / (1 + exp(-x))",
    "tanh": "tanh(x)",
}

# Activations a convolution can apply to its own output (fuse-conv-act).
FUSIBLE = frozenset(ACTIVATIONS)


def fused_function_name(activation: str) -> str:
    """The ONNX function (domain ``cnnc``) of a conv fused with ``activation``: ConvRelu,
    ConvLeakyRelu, ConvClip (relu6 too), ..."""
    return "Conv" + "".join(part.title() for part in activation.split("_"))


for _name in ACTIVATIONS:
    register_op(Elementwise(_name))

for _name in ("relu", "sigmoid", "tanh"):
    register_layer(
        Layer(
            _name,
            (),
            lambda ctx, x, op=_name: ctx.node(op, [x]),
            f"Element-wise {ACTIVATIONS[_name]}.",
        )
    )

register_layer(
    Layer(
        "leaky_relu",
        (
            Attr(
                "alpha",
                "float",
                0.01,
                positional=True,
                doc="slope for negative x (torch.nn.LeakyReLU's negative_slope)",
            ),
        ),
        lambda ctx, x: ctx.node("leaky_relu", [x], {"alpha": ctx["alpha"]}),
        "Element-wise x for x >= 0, alpha·x below (ONNX LeakyRelu).",
    )
)


def build_clip(ctx: LayerContext, x):
    low, high = ctx["min"], ctx["max"]
    if low > high:
        raise ctx.error(
            f"clip min {low:g} is larger than its max {high:g}",
            "max",
            hint="give the lower bound first: clip(min, max)",
        )
    return ctx.node("clip", [x], {"min": low, "max": high})


register_layer(
    Layer(
        "clip",
        (
            Attr("min", "float", positional=True, doc="the lower bound"),
            Attr("max", "float", positional=True, doc="the upper bound, at least min"),
        ),
        build_clip,
        "Element-wise min(max(x, min), max) (ONNX Clip, torch.clamp).",
    )
)
register_layer(
    Layer(
        "relu6",
        (),
        lambda ctx, x: ctx.node("clip", [x], {"min": 0.0, "max": 6.0}),
        "Element-wise min(max(x, 0), 6) (MobileNet v2): clip(0, 6).",
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
