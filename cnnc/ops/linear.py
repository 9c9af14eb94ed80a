"""Fully connected layers (``fc``) and the ``flatten`` that feeds them."""

from __future__ import annotations

from typing import Any

from cnnc.errors import ShapeError
from cnnc.ir.types import TensorType
from cnnc.ops.base import Attr, Layer, LayerContext, OpDef, register_layer, register_op


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
