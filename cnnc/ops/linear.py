"""Fully connected layers (``fc``) and the ``flatten`` that feeds them, and ``linear``, the same
product applied at every position of a map over one axis (ConvNeXt's pointwise layers)."""

from __future__ import annotations

from typing import Any

from cnnc.errors import ShapeError
from cnnc.ir.types import TensorType
from cnnc.ops.base import Attr, Layer, LayerContext, OpDef, register_layer, register_op
from cnnc.ops.common import resolve_axis


class FullyConnected(OpDef):
    """inputs (x [N, F], weight [K, F][, bias [K]]): y = x @ weight.T + bias."""

    name = "fc"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        x, w = inputs[0], inputs[1]
        if x.rank != 2:
            raise ShapeError(f"fc needs an input N×F, got {x}")
        if w.rank != 2 or w.shape[1] != x.shape[1]:
            raise ShapeError(f"fc weight {w} does not fit input {x}: expected [K,{x.shape[1]}]")
        if len(inputs) > 2 and inputs[2].shape != (w.shape[0],):
            raise ShapeError(f"fc bias {inputs[2]} does not match {w.shape[0]} outputs")
        return [x.with_shape((x.shape[0], w.shape[0]))]

    def macs(self, node) -> int:
        k, f = node.inputs[1].shape
        return k * f


class Flatten(OpDef):
    """N×C×H×W -> N×(C·H·W), in C, H, W order (ONNX Flatten with axis=1)."""

    name = "flatten"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        (x,) = inputs
        if x.rank < 2:
            raise ShapeError(f"flatten needs an input with a batch axis, got {x}")
        return [x.with_shape((x.shape[0], x.numel_per_item()))]


register_op(FullyConnected())
register_op(Flatten())


def build_fc(ctx: LayerContext, x):
    if x.type.rank > 2:
        x = ctx.node("flatten", [x], suffix=".flatten")
    features, out = x.shape[1], ctx["out"]
    inputs = [x, ctx.param("weight", (out, features), ("he_normal", features))]
    if ctx["bias"]:
        inputs.append(ctx.param("bias", (out,), ("uniform", features)))
    return ctx.node("fc", inputs)


register_layer(
    Layer(
        "fc",
        (
            Attr("out", "int", positional=True, minimum=1, doc="number of units"),
            Attr("bias", "bool", True, doc="add a learned bias per unit"),
        ),
        build_fc,
        "Fully connected layer. After a feature map it first flattens it in C, H, W order. "
        "Weights <name>.weight [out, in] and <name>.bias [out], as torch.nn.Linear.",
        has_params=True,
    )
)
register_layer(
    Layer(
        "flatten",
        (),
        lambda ctx, x: ctx.node("flatten", [x]),
        "N×C×H×W -> N×(C·H·W), in C, H, W order.",
    )
)


class Linear(OpDef):
    """inputs (x, weight [K, C][, bias [K]]), attr axis: at every position (every index of
    the other axes), the C values along ``axis`` become K values, weight · v + bias, as
    torch.nn.Linear applied to the last axis of a channels-last map; over axis 1 of a map,
    a 1×1 convolution."""

    name = "linear"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        x, w = inputs[0], inputs[1]
        axis = attrs["axis"]
        if x.rank < 2 or not 0 < axis < x.rank:
            raise ShapeError(f"linear axis {axis} is not an axis after the batch of {x}")
        if w.rank != 2 or w.shape[1] != x.shape[axis]:
            raise ShapeError(
                f"linear weight {w} does not fit the {x.shape[axis]} values along axis {axis} "
                f"of {x}: expected [K,{x.shape[axis]}]"
            )
        if len(inputs) > 2 and inputs[2].shape != (w.shape[0],):
            raise ShapeError(f"linear bias {inputs[2]} does not match {w.shape[0]} outputs")
        shape = list(x.shape)
        shape[axis] = w.shape[0]
        return [x.with_shape(tuple(shape))]

    def macs(self, node) -> int:
        return node.output.type.numel_per_item() * node.inputs[1].shape[1]

    def describe(self, node) -> str:
        return f"axis={node.attrs['axis']}"


register_op(Linear())


def build_linear(ctx: LayerContext, x):
    axis = resolve_axis(ctx, x.type, "linear")
    features, out = x.shape[axis], ctx["out"]
    inputs = [x, ctx.param("weight", (out, features), ("he_normal", features))]
    if ctx["bias"]:
        inputs.append(ctx.param("bias", (out,), ("uniform", features)))
    # On N×F there are no positions: the layer is an fc, and the IR says so.
    op = "fc" if x.type.rank == 2 else "linear"
    return ctx.node(op, inputs, {} if op == "fc" else {"axis": axis})


register_layer(
    Layer(
        "linear",
        (
            Attr("out", "int", positional=True, minimum=1, doc="outputs at each position"),
            Attr("bias", "bool", True, doc="add a learned bias per output"),
            Attr(
                "axis",
                "int",
                1,
                doc="the axis transformed at each position: 1, the channels (an imported "
                "channels-last map has the last, -1)",
            ),
        ),
        build_linear,
        "A linear layer at every position of a map, over its channels (ConvNeXt's pointwise "
        "layers, torch.nn.Linear on a channels-last map): no flatten; a 1×1 convolution "
        "after -O2; on N×F an fc. Weights <name>.weight [out, C] and <name>.bias [out].",
        has_params=True,
    )
)
