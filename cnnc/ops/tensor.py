"""Ops that move or pass data without arithmetic: ``dropout`` (identity at inference)."""

from __future__ import annotations

from typing import Any

from cnnc.ir.types import TensorType
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
