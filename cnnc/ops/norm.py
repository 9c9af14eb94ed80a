"""Batch normalization at inference (``bn``): a per-channel scale and shift from four tensors."""

from __future__ import annotations

from typing import Any

from cnnc.errors import ShapeError
from cnnc.ir.types import TensorType
from cnnc.ops.base import Attr, Layer, LayerContext, OpDef, register_layer, register_op


class BatchNorm(OpDef):
    """inputs (x, weight, bias, running_mean, running_var), attr epsilon:
    y = (x - mean) / sqrt(var + epsilon) * weight + bias, per channel (axis 1)."""

    name = "bn"

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
