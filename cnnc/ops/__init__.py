"""The ops of the IR and the layers of the language, one module per op family."""

from cnnc.ops import (  # noqa: F401 (register)
    activation,
    conv,
    linear,
    merge,
    norm,
    pool,
    resize,
    tensor,
    train,
)
from cnnc.ops.base import (
    Attr,
    Layer,
    LayerContext,
    OpDef,
    all_layers,
    all_ops,
    get_layer,
    get_op,
)

__all__ = [
    "Attr",
    "Layer",
    "LayerContext",
    "OpDef",
    "all_layers",
    "all_ops",
    "get_layer",
    "get_op",
]
