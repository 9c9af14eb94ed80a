"""Element-wise activations (``relu``, ``leaky_relu``, ``clip`` and ``relu6``, ``sigmoid``,
``tanh``, ``silu``, ``hardswish``, ``hardsigmoid``, ``gelu``, ``mish``, ``elu``,
``softplus``), ``prelu`` with its learned slopes, and ``softmax``.

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
    """An activation's attributes as the dump shows them (``alpha=0.2``, ``min=-1 max=1``,
    ``approximate=tanh``; gelu's exact form says nothing)."""
    if activation_label(op, attrs) != op:
        return ""
    names = ("min", "max") if op == "clip" else attrs
    return " ".join(
        f"{name}={attrs[name]:g}" if isinstance(attrs[name], float) else f"{name}={attrs[name]}"
        for name in names
        if attrs[name] != "none"
    )


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

    def macs(self, node) -> int:
        # The division by the sum (exp is a function, not a multiply-add).
        return node.output.type.numel_per_item()

    def describe(self, node) -> str:
        return f"axis={node.attrs['axis']}"


# Every element-wise op and its formula; attributes keep ONNX's names (LeakyRelu's alpha,
# HardSigmoid's alpha and beta, Gelu's approximate) where ONNX has the op.
ACTIVATIONS = {
    "relu": "max(x, 0)",
    "leaky_relu": "x if x >= 0, else alpha·x",
    "clip": "min(max(x, min), max)",
    "sigmoid": "1 / (1 + exp(-x))",
    "tanh": "tanh(x)",
    "silu": "x · sigmoid(x) (also called swish)",
    "hardsigmoid": "max(0, min(1, alpha·x + beta))",
    "hardswish": "x · max(0, min(1, x/6 + 1/2))",
    "gelu": "x · Φ(x), Φ the standard normal CDF: x/2 · (1 + erf(x/√2)); with "
    "approximate=tanh, x/2 · (1 + tanh(√(2/π) · (x + 0.044715·x³)))",
    "mish": "x · tanh(softplus(x))",
    "elu": "x if x > 0, else alpha · (exp(x) - 1)",
    "softplus": "log(1 + exp(beta·x)) / beta",
}

# Activations a convolution can apply to its own output (fuse-conv-act): every element-wise
# one. (prelu is not element-wise in that sense: it reads a tensor of slopes.)
FUSIBLE = frozenset(ACTIVATIONS)

# The ONNX names of the activations, in model-local functions (domain ``cnnc``): the
# activation alone where ONNX has no such op, and fused with a conv (ConvRelu, ConvSilu).
_CAMEL = {"hardsigmoid": "HardSigmoid", "hardswish": "HardSwish"}


def function_name(op: str, attrs: dict[str, Any]) -> str:
    """The name of an activation in ONNX functions: Relu, LeakyRelu, Silu, Gelu, GeluTanh
    (the tanh approximation is a body of its own where ONNX has no Gelu op)."""
    name = _CAMEL.get(op) or "".join(part.title() for part in op.split("_"))
    return name + ("Tanh" if attrs.get("approximate") == "tanh" else "")


def fused_function_name(activation: str, attrs: dict[str, Any]) -> str:
    """The ONNX function (domain ``cnnc``) of a conv fused with ``activation``: ConvRelu,
    ConvLeakyRelu, ConvClip (relu6 too), ConvSilu, ConvGeluTanh, ..."""
    return "Conv" + function_name(activation, attrs)


# Each activation function name with the activation and the attributes its name implies.
FUNCTION_NAMES: dict[str, tuple[str, dict[str, Any]]] = {
    function_name(op, fixed): (op, fixed)
    for op in ACTIVATIONS
    for fixed in ([{"approximate": "none"}, {"approximate": "tanh"}] if op == "gelu" else [{}])
}


for _name in ACTIVATIONS:
    register_op(Elementwise(_name))

for _name in ("relu", "sigmoid", "tanh", "silu", "hardswish", "mish"):
    register_layer(
        Layer(
            _name,
            (),
            lambda ctx, x, op=_name: ctx.node(op, [x]),
            f"Element-wise {ACTIVATIONS[_name]}.",
        )
    )


def _with_attrs(op: str, *names: str):
    return lambda ctx, x: ctx.node(op, [x], {n: ctx[n] for n in names})


register_layer(
    Layer(
        "hardsigmoid",
        (
            Attr(
                "alpha",
                "float",
                1 / 6,
                doc="slope (PyTorch's 1/6; ONNX's default is 0.2)",
                default_text="1/6",
            ),
            Attr("beta", "float", 0.5, doc="offset"),
        ),
        _with_attrs("hardsigmoid", "alpha", "beta"),
        f"Element-wise {ACTIVATIONS['hardsigmoid']} (torch.nn.Hardsigmoid: alpha 1/6, beta 1/2).",
    )
)
register_layer(
    Layer(
        "gelu",
        (
            Attr(
                "approximate",
                "choice",
                "none",
                positional=True,
                choices=("none", "tanh"),
                doc="none: the exact form with erf; tanh: the tanh approximation",
            ),
        ),
        _with_attrs("gelu", "approximate"),
        f"Element-wise {ACTIVATIONS['gelu']} (torch.nn.GELU).",
    )
)
register_layer(
    Layer(
        "elu",
        (
            Attr(
                "alpha", "float", 1.0, positional=True, doc="the value approached below 0 is -alpha"
            ),
        ),
        _with_attrs("elu", "alpha"),
        f"Element-wise {ACTIVATIONS['elu']} (torch.nn.ELU).",
    )
)


def build_softplus(ctx: LayerContext, x):
    if ctx["beta"] <= 0:
        raise ctx.error(f"softplus beta must be positive, got {ctx['beta']:g}", "beta")
    return ctx.node("softplus", [x], {"beta": ctx["beta"]})


register_layer(
    Layer(
        "softplus",
        (Attr("beta", "float", 1.0, positional=True, doc="sharpness (torch.nn.Softplus's beta)"),),
        build_softplus,
        f"Element-wise {ACTIVATIONS['softplus']} (torch.nn.Softplus).",
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


class PRelu(OpDef):
    """inputs (x, weight [1] or [C]): x where x >= 0, else weight·x, with one slope for every
    channel or one per channel (axis 1), as torch.nn.PReLU and ONNX PRelu."""

    name = "prelu"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        x, slope = inputs
        if x.rank < 2:
            raise ShapeError(f"prelu needs an input with channels N×C…, got {x}")
        if slope.shape not in ((1,), (x.shape[1],)):
            raise ShapeError(
                f"prelu slopes {slope} must be one value or one per channel of {x} "
                f"([1] or [{x.shape[1]}])"
            )
        return [x]


register_op(PRelu())


def build_prelu(ctx: LayerContext, x):
    count, channels = ctx["num_parameters"], x.shape[1]
    if count not in (1, channels):
        raise ctx.error(
            f"prelu num_parameters must be 1 or the {channels} channels, got {count}",
            "num_parameters",
            hint=f"prelu(num_parameters={channels}) learns a slope per channel",
        )
    weight = ctx.param("weight", (count,), ("constant", ctx["init"]))
    return ctx.node("prelu", [x, weight])


register_layer(
    Layer(
        "prelu",
        (
            Attr(
                "num_parameters",
                "int",
                1,
                positional=True,
                minimum=1,
                doc="slopes: 1 (shared), or one per channel",
            ),
            Attr("init", "float", 0.25, doc="the slopes' initial value"),
        ),
        build_prelu,
        "x for x >= 0, else a learned slope · x (torch.nn.PReLU): <name>.weight [num_parameters].",
        has_params=True,
    )
)
