"""IR -> ONNX: standard ops only, names from the program, a symbolic batch axis, checked models."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from cnnc import __version__
from cnnc.errors import InternalError, UsageError
from cnnc.ir.graph import Graph, Node, Value
from cnnc.ops.activation import ACTIVATIONS, FUNCTION_NAMES, function_name, fused_function_name

MIN_OPSET = 13
DEFAULT_OPSET = 17
# Protobuf cannot hold a message over 2 GiB; larger models keep their weights in a side file.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

_ELEM = {
    "f32": TensorProto.FLOAT,
    "f64": TensorProto.DOUBLE,
    "i64": TensorProto.INT64,
    "i32": TensorProto.INT32,
    "bool": TensorProto.BOOL,
}


@cache
def onnxruntime_max_opset() -> int | None:
    """The newest default-domain opset the installed onnxruntime runs, or None without it."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    for opset in range(onnx.defs.onnx_opset_version(), MIN_OPSET - 1, -1):
        probe = _probe_model(opset)
        try:
            ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        except Exception:
            continue
        return opset
    return None


def _probe_model(opset: int) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    opsets = [helper.make_opsetid("", opset)]
    return helper.make_model(
        graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets)
    )


def max_opset() -> int:
    """The newest opset cnnc emits: what both onnx and onnxruntime (if installed) support."""
    newest = onnx.defs.onnx_opset_version()
    ort_max = onnxruntime_max_opset()
    return min(newest, ort_max) if ort_max is not None else newest


def check_opset(opset: int) -> None:
    """Raise UsageError unless ``opset`` is in the supported range."""
    high = max_opset()
    if not MIN_OPSET <= opset <= high:
        try:
            import onnxruntime as ort

            runtimes = f"onnx {onnx.__version__} and onnxruntime {ort.__version__}"
        except ImportError:
            runtimes = f"onnx {onnx.__version__}"
        raise UsageError(
            f"opset {opset} is not supported: cnnc emits opsets {MIN_OPSET} to {high} "
            f"(the newest that {runtimes} support)",
            hint=f"use --opset {DEFAULT_OPSET} (the default) or one from {MIN_OPSET} to {high}",
        )


# ---- emitters -------------------------------------------------------------------------------


class Emitter:
    """Collects the ONNX nodes and initializers of one graph."""

    def __init__(self, graph: Graph, opset: int, inline_functions: bool = False):
        self.graph = graph
        self.opset = opset
        self.inline_functions = inline_functions
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.functions: dict[str, onnx.FunctionProto] = {}

    def node(
        self,
        op_type: str,
        inputs: list[str],
        outputs: list[str],
        name: str,
        domain: str = "",
        **attrs: Any,
    ) -> None:
        """Add an ONNX node (of the default domain unless ``domain`` says otherwise)."""
        self.nodes.append(
            helper.make_node(op_type, inputs, outputs, name=name, domain=domain or None, **attrs)
        )

    def constant(self, name: str, array: np.ndarray) -> str:
        """Add an initializer that is not an IR parameter (for example Dropout's ratio),
        under ``name`` or, if the graph has that name already, a variant of it."""
        taken = {v.name for v in self.graph.params.values()} | {i.name for i in self.initializers}
        unique, n = name, 2
        while unique in taken:
            unique, n = f"{name}.{n}", n + 1
        self.initializers.append(numpy_helper.from_array(np.asarray(array), unique))
        return unique

    def call(
        self,
        function: onnx.FunctionProto,
        inputs: list[str],
        outputs: list[str],
        name: str,
        attrs: dict[str, Any],
    ) -> None:
        """A call of a model-local function (defined once per model), or with
        ``inline_functions`` its body, named ``<name>/<op>`` and computing ``<name>/<value>``,
        with the call's attributes in place of the references to them."""
        if not self.inline_functions:
            self.functions.setdefault(function.name, function)
            self.node(function.name, inputs, outputs, name, domain=FUNCTION_DOMAIN, **attrs)
            return
        actual = {
            **dict(zip(function.input, inputs, strict=False)),
            **dict(zip(function.output, outputs, strict=True)),
        }
        for i, body_node in enumerate(function.node):
            node = onnx.NodeProto()
            node.CopyFrom(body_node)
            node.input[:] = [actual.get(v, f"{name}/{v}") if v else "" for v in node.input]
            node.output[:] = [actual.get(v, f"{name}/{v}") for v in node.output]
            node.name = name if set(node.output) & set(outputs) else f"{name}/{i}.{node.op_type}"
            for attr in node.attribute:
                if attr.ref_attr_name:
                    attr.CopyFrom(helper.make_attribute(attr.name, attrs[attr.ref_attr_name]))
            self.nodes.append(node)

    def refuse(self, node: Node, what: str) -> UsageError:
        return UsageError(
            f"node {node.name}: {what} cannot be expressed in ONNX opset {self.opset}", node.loc
        )


EMITTERS: dict[str, Callable[[Emitter, Node], None]] = {}


def emitter(op: str):
    """Register how IR op ``op`` becomes ONNX nodes."""

    def register(fn: Callable[[Emitter, Node], None]):
        EMITTERS[op] = fn
        return fn

    return register


def _names(values: list[Value]) -> list[str]:
    return [v.name for v in values]


def _window_attrs(node: Node, kernel: tuple[int, ...]) -> dict[str, Any]:
    a = node.attrs
    attrs = {"kernel_shape": list(kernel), "strides": list(a["stride"]), "pads": list(a["pads"])}
    if any(d != 1 for d in a.get("dilation", ())):
        attrs["dilations"] = list(a["dilation"])
    return attrs


FUNCTION_DOMAIN = "cnnc"
MIN_INPUT_KEY = "cnnc.min_input_shape"
_CONV_ATTRS = {
    "kernel_shape": AttributeProto.INTS,
    "strides": AttributeProto.INTS,
    "pads": AttributeProto.INTS,
    "dilations": AttributeProto.INTS,
    "group": AttributeProto.INT,
}


def _ref(name: str, kind: int = AttributeProto.FLOAT, refers_to: str | None = None):
    """An attribute of a function body's node that takes the call's attribute ``refers_to``."""
    attr = helper.make_attribute_ref(name, kind)
    attr.ref_attr_name = refers_to or name
    return attr


def _node(op: str, inputs: list[str], outputs: list[str], *refs, **attrs) -> onnx.NodeProto:
    node = helper.make_node(op, inputs, outputs, **attrs)
    node.attribute.extend(refs)
    return node


def _constant(output: str, value: float | None = None, ref: str | None = None):
    """A Constant node of one float: ``value``, or the call's float attribute ``ref``."""
    if ref is not None:
        return _node("Constant", [], [output], _ref("value_float", refers_to=ref))
    return helper.make_node("Constant", [], [output], value_float=float(value))


# ---- activations --------------------------------------------------------------------------

# IR activations that are one standard ONNX op, from the opset that has it. IR attributes
# keep ONNX's names (clip's bounds are inputs in ONNX and have rules of their own).
ACTIVATION_OPS = {
    "relu": ("Relu", 1),
    "leaky_relu": ("LeakyRelu", 1),
    "clip": ("Clip", 1),
    "sigmoid": ("Sigmoid", 1),
    "tanh": ("Tanh", 1),
    "elu": ("Elu", 1),
    "hardsigmoid": ("HardSigmoid", 1),
    "hardswish": ("HardSwish", 14),
    "mish": ("Mish", 18),
    "gelu": ("Gelu", 20),
    "softplus": ("Softplus", 1),  # beta 1 only: ONNX's Softplus has no beta
}
CLIP_BOUNDS = ("min", "max")


def standard_activation(op: str, attrs: dict[str, Any], opset: int) -> str | None:
    """The standard ONNX op computing this activation at ``opset``, or None (silu has none;
    gelu before opset 20, hardswish before 14, mish before 18, softplus with a beta)."""
    entry = ACTIVATION_OPS.get(op)
    if entry is None or opset < entry[1] or (op == "softplus" and attrs["beta"] != 1):
        return None
    return entry[0]


def _gelu_body(tanh: bool) -> list[onnx.NodeProto]:
    """x/2 · (1 + erf(x/√2)), or x/2 · (1 + tanh(√(2/π) · (x + 0.044715·x³)))."""
    if tanh:
        inner = [
            _node("Mul", ["X", "X"], ["x2"]),
            _node("Mul", ["x2", "X"], ["x3"]),
            _constant("k", 0.044715),
            _node("Mul", ["x3", "k"], ["kx3"]),
            _node("Add", ["X", "kx3"], ["u"]),
            _constant("c", float(np.sqrt(2 / np.pi))),
            _node("Mul", ["u", "c"], ["v"]),
            _node("Tanh", ["v"], ["g"]),
        ]
    else:
        inner = [
            _constant("c", float(1 / np.sqrt(2))),
            _node("Mul", ["X", "c"], ["v"]),
            _node("Erf", ["v"], ["g"]),
        ]
    return [
        *inner,
        _constant("one", 1.0),
        _node("Add", ["g", "one"], ["g1"]),
        _node("Mul", ["X", "g1"], ["xg"]),
        _constant("half", 0.5),
        _node("Mul", ["xg", "half"], ["Y"]),
    ]


def activation_body(op: str, attrs: dict[str, Any], opset: int) -> list[onnx.NodeProto]:
    """The nodes computing activation ``op`` from ``X`` into ``Y`` inside a model-local
    function, its attributes taken from the call's (those its name does not fix)."""
    if op == "clip":
        bounds = [_constant(b, ref=b) for b in CLIP_BOUNDS]
        return [*bounds, _node("Clip", ["X", *CLIP_BOUNDS], ["Y"])]
    if op == "softplus":
        return [
            _constant("beta", ref="beta"),
            _node("Mul", ["X", "beta"], ["bx"]),
            _node("Softplus", ["bx"], ["s"]),
            _node("Div", ["s", "beta"], ["Y"]),
        ]
    standard = standard_activation(op, attrs, opset)
    if standard is not None:
        refs = [_ref(a) for a in attrs if op != "gelu"]
        fixed = {"approximate": attrs["approximate"]} if op == "gelu" else {}
        return [_node(standard, ["X"], ["Y"], *refs, **fixed)]
    if op == "silu":
        return [_node("Sigmoid", ["X"], ["s"]), _node("Mul", ["X", "s"], ["Y"])]
    if op == "hardswish":
        gate = helper.make_node("HardSigmoid", ["X"], ["h"], alpha=1 / 6, beta=0.5)
        return [gate, _node("Mul", ["X", "h"], ["Y"])]
    if op == "mish":
        return [
            _node("Softplus", ["X"], ["s"]),
            _node("Tanh", ["s"], ["t"]),
            _node("Mul", ["X", "t"], ["Y"]),
        ]
    if op == "gelu":
        return _gelu_body(attrs["approximate"] == "tanh")
    raise InternalError(f"activation {op} has no ONNX body")


def _call_attrs(op: str, attrs: dict[str, Any]) -> dict[str, Any]:
    """The attributes a call passes to an activation's function: those its name does not fix."""
    fixed = FUNCTION_NAMES[function_name(op, attrs)][1]
    return {k: v for k, v in attrs.items() if k not in fixed}


def _activation(e: Emitter, op: str, attrs: dict[str, Any], x: str, y: str, name: str) -> None:
    """An activation: its standard ONNX op, or a call of a model-local function. Clip's
    finite bounds become the scalar initializers ``<name>.min`` and ``<name>.max`` (an
    infinite one is left out: no bound)."""
    if op == "clip":
        bounds = [
            e.constant(f"{name}.{b}", np.array(attrs[b], dtype=np.float32))
            if np.isfinite(attrs[b])
            else ""
            for b in CLIP_BOUNDS
        ]
        while bounds and not bounds[-1]:
            bounds.pop()
        e.node("Clip", [x, *bounds], [y], name)
        return
    standard = standard_activation(op, attrs, e.opset)
    if standard is not None:
        e.node(standard, [x], [y], name, **({} if op == "softplus" else attrs))
        return
    call_attrs = _call_attrs(op, attrs)
    function = model_function(
        function_name(op, attrs),
        ["X"],
        ["Y"],
        activation_body(op, attrs, e.opset),
        list(call_attrs),
        e.opset,
        f"{ACTIVATIONS[op]} ({op})",
    )
    e.call(function, [x], [y], name, call_attrs)


def model_function(
    name: str,
    inputs: list[str],
    outputs: list[str],
    body: list[onnx.NodeProto],
    attributes: list[str],
    opset: int,
    doc: str,
) -> onnx.FunctionProto:
    """A model-local function of domain ``cnnc``: a body of standard ops."""
    return helper.make_function(
        FUNCTION_DOMAIN,
        name,
        inputs,
        outputs,
        body,
        [helper.make_opsetid("", opset)],
        attributes=attributes,
        doc_string=doc,
    )


def _fused_function(e: Emitter, activation: str, act_attrs: dict[str, Any]) -> onnx.FunctionProto:
    """The model-local function Conv+activation: standard Conv and activation ops, whose
    attributes refer to the call's, so one function serves every such conv."""
    conv = helper.make_node("Conv", ["X", "W", "B"], ["T"])
    conv.attribute.extend(helper.make_attribute_ref(a, t) for a, t in _CONV_ATTRS.items())
    body = activation_body(activation, act_attrs, e.opset)
    for node in body:
        node.input[:] = ["T" if i == "X" else i for i in node.input]
    return model_function(
        fused_function_name(activation, act_attrs),
        ["X", "W", "B"],
        ["Y"],
        [conv, *body],
        [*_CONV_ATTRS, *_call_attrs(activation, act_attrs)],
        e.opset,
        f"Conv followed by {activation} (cnnc fuse-conv-act)",
    )


@emitter("conv")
def _conv(e: Emitter, node: Node) -> None:
    attrs = {**_window_attrs(node, node.inputs[1].shape[2:]), "group": node.attrs["groups"]}
    inputs, outputs = _names(node.inputs), _names(node.outputs)
    activation = node.attrs.get("activation")
    if activation is None:
        e.node("Conv", inputs, outputs, node.name, **attrs)
        return
    act_attrs = node.attrs["activation_attrs"]
    attrs.setdefault("dilations", [1] * len(attrs["kernel_shape"]))
    call_inputs = inputs if len(inputs) == 3 else [*inputs, ""]
    call_attrs = {**attrs, **_call_attrs(activation, act_attrs)}
    e.call(_fused_function(e, activation, act_attrs), call_inputs, outputs, node.name, call_attrs)


@emitter("fc")
def _fc(e: Emitter, node: Node) -> None:
    e.node("Gemm", _names(node.inputs), _names(node.outputs), node.name, transB=1)


@emitter("maxpool")
def _maxpool(e: Emitter, node: Node) -> None:
    e.node(
        "MaxPool",
        _names(node.inputs),
        _names(node.outputs),
        node.name,
        ceil_mode=int(node.attrs["ceil"]),
        **_window_attrs(node, node.attrs["kernel"]),
    )


@emitter("avgpool")
def _avgpool(e: Emitter, node: Node) -> None:
    attrs = _window_attrs(node, node.attrs["kernel"])
    if "dilations" in attrs and e.opset < 19:
        raise e.refuse(node, "a dilated avgpool (ONNX AveragePool has dilations from opset 19)")
    e.node(
        "AveragePool",
        _names(node.inputs),
        _names(node.outputs),
        node.name,
        ceil_mode=int(node.attrs["ceil"]),
        count_include_pad=int(node.attrs["count_include_pad"]),
        **attrs,
    )


@emitter("gap")
def _gap(e: Emitter, node: Node) -> None:
    e.node("GlobalAveragePool", _names(node.inputs), _names(node.outputs), node.name)


@emitter("global_maxpool")
def _global_maxpool(e: Emitter, node: Node) -> None:
    e.node("GlobalMaxPool", _names(node.inputs), _names(node.outputs), node.name)


@emitter("lrn")
def _lrn(e: Emitter, node: Node) -> None:
    (x,), (y,) = _names(node.inputs), _names(node.outputs)
    if node.inputs[0].type.rank != 3:
        e.node("LRN", [x], [y], node.name, **node.attrs)
        return
    # onnxruntime's LRN takes N×C×H×W only: a 1-D map N×C×L runs as N×C×L×1.
    axes = e.constant(f"{node.name}.axes", np.array([3], dtype=np.int64))
    e.node("Unsqueeze", [x, axes], [f"{node.name}.2d"], f"{node.name}.unsqueeze")
    e.node("LRN", [f"{node.name}.2d"], [f"{node.name}.lrn"], f"{node.name}.lrn", **node.attrs)
    e.node("Squeeze", [f"{node.name}.lrn", axes], [y], node.name)


ARITHMETIC_OPS = {"add": "Add", "mul": "Mul", "sub": "Sub", "div": "Div"}


def _arithmetic(e: Emitter, node: Node) -> None:
    # ONNX's ops are binary: a chain, whose partial results are <node>.step2, <node>.step3...
    (y,) = _names(node.outputs)
    partial, *rest = _names(node.inputs)
    for i, x in enumerate(rest, start=2):
        last = i == len(node.inputs)
        out, name = (y, node.name) if last else (f"{node.name}.step{i}",) * 2
        e.node(ARITHMETIC_OPS[node.op], [partial, x], [out], name)
        partial = out


for _op in ARITHMETIC_OPS:
    emitter(_op)(_arithmetic)


@emitter("concat")
def _concat(e: Emitter, node: Node) -> None:
    e.node("Concat", _names(node.inputs), _names(node.outputs), node.name, axis=1)


@emitter("softmax")
def _softmax(e: Emitter, node: Node) -> None:
    e.node("Softmax", _names(node.inputs), _names(node.outputs), node.name, axis=node.attrs["axis"])


@emitter("flatten")
def _flatten(e: Emitter, node: Node) -> None:
    e.node("Flatten", _names(node.inputs), _names(node.outputs), node.name, axis=1)


@emitter("bn")
def _bn(e: Emitter, node: Node) -> None:
    e.node(
        "BatchNormalization",
        _names(node.inputs),
        _names(node.outputs),
        node.name,
        epsilon=node.attrs["epsilon"],
    )


@emitter("affine")
def _affine(e: Emitter, node: Node) -> None:
    x, weight, bias = node.inputs
    per_channel = (-1, *(1,) * (x.type.rank - 2))
    scale = e.constant(f"{node.name}.scale", weight.data.reshape(per_channel))
    shift = e.constant(f"{node.name}.shift", bias.data.reshape(per_channel))
    scaled = f"{node.name}.scaled"
    e.node("Mul", [x.name, scale], [scaled], f"{node.name}.mul")
    e.node("Add", [scaled, shift], _names(node.outputs), node.name)


@emitter("scale")
def _scale(e: Emitter, node: Node) -> None:
    # The weight is [C, 1, ..., 1], which broadcasts against the map as ONNX Mul does.
    e.node("Mul", _names(node.inputs), _names(node.outputs), node.name)


def _to_last(rank: int, axis: int) -> list[int]:
    """The permutation that moves ``axis`` last, the others keeping their order."""
    return [*(a for a in range(rank) if a != axis), axis]


def _over_last_axis(
    e: Emitter, node: Node, emit: Callable[[str, str, str], None], rank: int, axis: int
) -> None:
    """``emit(x, y, name)`` writes an op over the last axis of x; over another axis, x is
    transposed to put it last and the result transposed back (``<node>.to_last``,
    ``<node>.to_first``)."""
    x, y = node.inputs[0].name, node.output.name
    if axis == rank - 1:
        emit(x, y, node.name)
        return
    perm = _to_last(rank, axis)
    last, result = f"{node.name}.last", f"{node.name}.result"
    e.node("Transpose", [x], [last], f"{node.name}.to_last", perm=perm)
    emit(last, result, f"{node.name}.{node.op}")
    e.node("Transpose", [result], [y], node.name, perm=[perm.index(a) for a in range(rank)])


def _layernorm_function(opset: int) -> onnx.FunctionProto:
    """Layer normalization over the last axis in standard ops, for opsets before
    LayerNormalization (17): the form older exporters write, which import recognizes."""
    body = [
        helper.make_node("ReduceMean", ["X"], ["Mean"], axes=[-1]),
        _node("Sub", ["X", "Mean"], ["Deviation"]),
        _constant("Two", 2.0),
        _node("Pow", ["Deviation", "Two"], ["Square"]),
        helper.make_node("ReduceMean", ["Square"], ["Variance"], axes=[-1]),
        _constant("Epsilon", ref="epsilon"),
        _node("Add", ["Variance", "Epsilon"], ["Shifted"]),
        _node("Sqrt", ["Shifted"], ["Deviation1"]),
        _node("Div", ["Deviation", "Deviation1"], ["Normalized"]),
        _node("Mul", ["Normalized", "Scale"], ["Scaled"]),
        _node("Add", ["Scaled", "B"], ["Y"]),
    ]
    return model_function(
        "LayerNorm",
        ["X", "Scale", "B"],
        ["Y"],
        body,
        ["epsilon"],
        opset,
        "layer normalization over the last axis: (X - mean) / sqrt(var + epsilon) * Scale + B",
    )


@emitter("layernorm")
def _layernorm(e: Emitter, node: Node) -> None:
    # LayerNormalization (opset 17) normalizes over every axis from its axis on: over the
    # channels of a map, they go last and come back. Measured in onnxruntime 1.32 on
    # ConvNeXt's maps (96×56×56 to 768×7×7, batch 1 and 4), those transposes cost less than
    # the ReduceMean/Sub/Pow/.../Add form over axis 1 (0.08 against 0.23 ms at 768×7×7,
    # 0.6 against 0.6-0.8 ms at 96×56×56).
    x, weight, bias = node.inputs
    epsilon = node.attrs["epsilon"]

    def emit(source: str, target: str, name: str) -> None:
        inputs = [source, weight.name, bias.name]
        if e.opset >= 17:
            e.node("LayerNormalization", inputs, [target], name, axis=-1, epsilon=epsilon)
        else:
            e.call(_layernorm_function(e.opset), inputs, [target], name, {"epsilon": epsilon})

    _over_last_axis(e, node, emit, x.type.rank, node.attrs["axis"])


def _groupnorm_function(opset: int) -> onnx.FunctionProto:
    """Group normalization as torch exports it (Reshape to [N, groups, -1],
    InstanceNormalization, Reshape back), then the per-channel weight and bias on an
    [N, C, -1] view (as ONNX's own GroupNormalization-21 body does), for any rank."""
    one = numpy_helper.from_array(np.ones(1, np.float32))
    body = [
        _node("Constant", [], ["Groups"], _ref("value_int", AttributeProto.INT, "groups")),
        helper.make_node("Constant", [], ["Zero"], value_ints=[0]),
        _node("Unsqueeze", ["Groups", "Zero"], ["GroupCount"]),
        helper.make_node("Constant", [], ["Rest"], value_ints=[-1]),
        helper.make_node("Concat", ["Zero", "GroupCount", "Rest"], ["GroupedShape"], axis=0),
        _node("Reshape", ["X", "GroupedShape"], ["Grouped"]),
        helper.make_node("ConstantOfShape", ["GroupCount"], ["Ones"], value=one),
        helper.make_node("ConstantOfShape", ["GroupCount"], ["Zeros"]),
        _node(
            "InstanceNormalization",
            ["Grouped", "Ones", "Zeros"],
            ["Normalized"],
            _ref("epsilon"),
        ),
        _node("Shape", ["X"], ["XShape"]),
        helper.make_node("Constant", [], ["Shape3D"], value_ints=[0, 0, -1]),
        _node("Reshape", ["Normalized", "XShape"], ["Restored"]),
        _node("Reshape", ["Restored", "Shape3D"], ["Channels"]),
        helper.make_node("Constant", [], ["PerChannel"], value_ints=[-1, 1]),
        _node("Reshape", ["Scale", "PerChannel"], ["Scale1"]),
        _node("Reshape", ["B", "PerChannel"], ["B1"]),
        _node("Mul", ["Channels", "Scale1"], ["Scaled"]),
        _node("Add", ["Scaled", "B1"], ["Shifted"]),
        _node("Reshape", ["Shifted", "XShape"], ["Y"]),
    ]
    return model_function(
        "GroupNorm",
        ["X", "Scale", "B"],
        ["Y"],
        body,
        ["groups", "epsilon"],
        opset,
        "group normalization with a weight and bias per channel (torch.nn.GroupNorm)",
    )


@emitter("groupnorm")
def _groupnorm(e: Emitter, node: Node) -> None:
    x = node.inputs[0]
    groups, epsilon = node.attrs["groups"], node.attrs["epsilon"]
    inputs, outputs = _names(node.inputs), _names(node.outputs)
    if groups == x.type.shape[1] and x.type.rank > 2:
        e.node("InstanceNormalization", inputs, outputs, node.name, epsilon=epsilon)
    elif e.opset >= 21:
        # Opset 18's GroupNormalization has a weight and bias per group; 21's per channel.
        e.node("GroupNormalization", inputs, outputs, node.name, num_groups=groups, epsilon=epsilon)
    else:
        attrs = {"groups": groups, "epsilon": epsilon}
        e.call(_groupnorm_function(e.opset), inputs, outputs, node.name, attrs)


@emitter("linear")
def _linear(e: Emitter, node: Node) -> None:
    x, weight, *bias = node.inputs
    rank, axis = x.type.rank, node.attrs["axis"]
    # The weight stays the [out, in] tensor of the state_dict; ONNX gets it in its shape by
    # a node that onnxruntime folds once, at load.
    if axis == 1 and rank > 2:
        axes = e.constant(f"{node.name}.axes", np.arange(2, rank, dtype=np.int64))
        kernel = f"{node.name}.kernel"
        e.node("Unsqueeze", [weight.name, axes], [kernel], f"{node.name}.unsqueeze")
        inputs = [x.name, kernel, *_names(bias)]
        e.node("Conv", inputs, [node.output.name], node.name, kernel_shape=[1] * (rank - 2))
        return
    transposed = f"{node.name}.weight_t"
    e.node("Transpose", [weight.name], [transposed], f"{node.name}.transpose", perm=[1, 0])

    def emit(source: str, target: str, name: str) -> None:
        if not bias:
            e.node("MatMul", [source, transposed], [target], name)
            return
        product = f"{name}.product"
        e.node("MatMul", [source, transposed], [product], f"{name}.matmul")
        e.node("Add", [product, bias[0].name], [target], name)

    _over_last_axis(e, node, emit, rank, axis)


@emitter("reshape")
def _reshape(e: Emitter, node: Node) -> None:
    # 0 keeps the batch size as it comes: no batch size is baked into the model.
    shape = e.constant(f"{node.name}.shape", np.array([0, *node.attrs["shape"]], np.int64))
    e.node("Reshape", [node.inputs[0].name, shape], _names(node.outputs), node.name)


@emitter("transpose")
def _transpose(e: Emitter, node: Node) -> None:
    e.node(
        "Transpose",
        _names(node.inputs),
        _names(node.outputs),
        node.name,
        perm=list(node.attrs["perm"]),
    )


@emitter("dropout")
def _dropout(e: Emitter, node: Node) -> None:
    ratio = e.constant(f"{node.name}.ratio", np.array(node.attrs["ratio"], dtype=np.float32))
    e.node("Dropout", [node.inputs[0].name, ratio], _names(node.outputs), node.name)


for _op in ACTIVATIONS:
    emitter(_op)(
        lambda e, node, op=_op: _activation(
            e, op, node.attrs, node.inputs[0].name, node.output.name, node.name
        )
    )


@emitter("prelu")
def _prelu(e: Emitter, node: Node) -> None:
    # ONNX PRelu broadcasts its slope from the right: one per channel is [C, 1, 1].
    x, slope = node.inputs
    axes = e.constant(f"{node.name}.axes", np.arange(1, x.type.rank - 1, dtype=np.int64))
    shaped = f"{slope.name}.per_channel"
    e.node("Unsqueeze", [slope.name, axes], [shaped], f"{node.name}.unsqueeze")
    e.node("PRelu", [x.name, shaped], _names(node.outputs), node.name)


# ---- model ----------------------------------------------------------------------------------


def _value_info(v: Value, spatial: list | None = None) -> onnx.ValueInfoProto:
    """A value's type; ``spatial`` replaces its spatial sizes (symbols, or None for unknown)."""
    shape = list(v.type.shape)
    if spatial is not None and len(shape) > 2:
        shape[2:] = spatial[-(len(shape) - 2) :]
    return helper.make_tensor_value_info(v.name, _ELEM[v.type.dtype], shape)


def to_onnx(
    graph: Graph, opset: int = DEFAULT_OPSET, inline_functions: bool = False
) -> onnx.ModelProto:
    """The ONNX model of a graph (not yet checked: :func:`save` checks what it writes).

    Fused nodes become calls of model-local functions (domain ``cnnc``) whose bodies
    are standard ops, or with ``inline_functions`` those standard ops themselves. A
    fully convolutional graph gets symbolic spatial sizes on its input and output.
    """
    check_opset(opset)
    e = Emitter(graph, opset, inline_functions)
    for node in graph.nodes:
        fn = EMITTERS.get(node.op)
        if fn is None:
            raise UsageError(f"node {node.name}: op {node.op} has no ONNX form", node.loc)
        fn(e, node)
    initializers = [numpy_helper.from_array(p.data, p.name) for p in graph.params.values()]
    outputs = {id(v) for v in graph.outputs}
    flexible = graph.flexible_spatial
    one_d = graph.inputs[0].type.rank == 3
    value_info = [
        _value_info(v, [None, None] if flexible else None)
        for n in graph.nodes
        for v in n.outputs
        if id(v) not in outputs
    ]
    sizes, out_sizes = (["L"], ["OL"]) if one_d else (["H", "W"], ["OH", "OW"])
    onnx_graph = helper.make_graph(
        e.nodes,
        graph.name,
        [_value_info(v, sizes if flexible else None) for v in graph.inputs],
        [_value_info(v, out_sizes if flexible else None) for v in graph.outputs],
        initializer=initializers + e.initializers,
        value_info=value_info,
    )
    opsets = [helper.make_opsetid("", opset)]
    if e.functions:
        opsets.append(helper.make_opsetid(FUNCTION_DOMAIN, 1))
    model = helper.make_model(
        onnx_graph,
        opset_imports=opsets,
        producer_name="cnnc",
        producer_version=__version__,
        ir_version=helper.find_min_ir_version_for(opsets, ignore_unknown=True),
        functions=list(e.functions.values()),
        doc_string=f"network {graph.name}, compiled by cnnc {__version__} ({graph.opt_level})",
    )
    if flexible:
        # The declared input is the smallest the network takes; importing needs its sizes.
        (x,) = graph.inputs
        helper.set_model_props(model, {MIN_INPUT_KEY: "x".join(map(str, x.type.shape[1:]))})
    return model


def save(
    model: onnx.ModelProto, path: str | Path, external_threshold: int = EXTERNAL_DATA_THRESHOLD
) -> list[Path]:
    """Check a model and write it to ``path`` atomically; returns the files written.

    Models whose weights exceed ``external_threshold`` bytes keep them in
    ``<path>.data`` beside the model (ONNX external data). Nothing is left
    behind if checking or writing fails.
    """
    path = Path(path)
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    data_name = path.name + ".data" if weight_bytes > external_threshold else None
    workdir = Path(tempfile.mkdtemp(prefix=".cnnc-", dir=path.parent))
    try:
        staged = workdir / path.name
        if data_name is None:
            onnx.save_model(model, staged)
        else:
            onnx.save_model(
                model,
                staged,
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
        try:
            onnx.checker.check_model(str(staged), full_check=True)
        except onnx.checker.ValidationError as e:
            raise InternalError(
                f"the emitted model fails the ONNX checker: {e}", str(path)
            ) from None
        written = [path]
        if data_name is not None:
            os.replace(workdir / data_name, path.parent / data_name)
            written.append(path.parent / data_name)
        os.replace(staged, path)
        return written
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
