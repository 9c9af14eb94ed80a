"""IR -> ONNX: standard ops only, names from the program, a symbolic batch axis, checked models."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from cnnc import __version__, preprocess
from cnnc.errors import InternalError, OutputError, UsageError
from cnnc.ir.graph import Graph, Node, Value
from cnnc.ir.types import format_dims
from cnnc.ops.activation import ACTIVATIONS, FUNCTION_NAMES, function_name, fused_function_name
from cnnc.ops.pool import adaptive_avg_matrix, adaptive_is_uniform, adaptive_max_windows
from cnnc.ops.resize import NEAREST_MODES, nearest_indices

MIN_OPSET = 13
DEFAULT_OPSET = 17
# A general affine (neither scale one nor shift zero) is one BatchNormalization (mean 0,
# variance 1, epsilon 0), not Mul then Add: see README, "ONNX export".
AFFINE_AS_BN = True
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


# Every onnx and onnxruntime that cnnc requires (onnx 1.16, onnxruntime 1.17) run these
# opsets, so checking one of them needs no probe (which imports onnxruntime: a third of a
# second of every compile).
ALWAYS_SUPPORTED = 20


def check_opset(opset: int) -> None:
    """Raise UsageError unless ``opset`` is in the supported range."""
    if MIN_OPSET <= opset <= ALWAYS_SUPPORTED:
        return
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
        # The nodes are made in place in the model's graph: a model of 10,000 nodes then
        # never copies them (helper.make_graph and make_model copy each node twice).
        self.model = onnx.ModelProto()
        self.nodes = self.model.graph.node
        self.initializers: list[onnx.TensorProto] = []
        self.functions: dict[str, onnx.FunctionProto] = {}
        # Every value name of the ONNX graph, so that the values an emitter adds (an LRN's
        # 2-D view, an affine's product) never take the name of one the program gave.
        self.taken = {v.name for v in graph.inputs} | set(graph.params)
        self.taken |= {v.name for n in graph.nodes for v in n.outputs}
        # Node names too must be unique (onnxruntime refuses a model otherwise): a node an
        # emitter adds (``<node>.lrn``) gives way to the IR node of that name.
        self.ir_node_names = {n.name for n in graph.nodes}
        self.node_names: set[str] = set()
        self.current: str | None = None  # the IR node being emitted
        # Values no node computes, by the value their readers read instead (an identity
        # affine's output by its input), resolved when the graph is done.
        self.aliases: dict[str, str] = {}
        # Parameters read in another shape ([C] as [C, 1, 1] by a Mul): (name, shape) by
        # the name the readers use until the graph is done (see Emitter.finish).
        self.reshaped: dict[tuple[str, tuple], str] = {}
        self._shared: dict[tuple, str] = {}

    def fresh(self, name: str) -> str:
        """A name no value of the model has: ``name``, or ``name.2``, ``name.3``, ..."""
        unique, n = name, 2
        while unique in self.taken:
            unique, n = f"{name}.{n}", n + 1
        self.taken.add(unique)
        return unique

    def node(
        self,
        op_type: str,
        inputs: list[str],
        outputs: list[str],
        name: str,
        domain: str = "",
        **attrs: Any,
    ) -> None:
        """Add an ONNX node (of the default domain unless ``domain`` says otherwise): what
        helper.make_node makes, with each attribute made once per value and copied."""
        if name and (
            name in self.node_names or (name in self.ir_node_names and name != self.current)
        ):
            wish, n = name, 2
            while name in self.node_names or name in self.ir_node_names:
                name, n = f"{wish}.{n}", n + 1
        self.node_names.add(name)
        node = self.nodes.add()
        node.CopyFrom(_template(op_type, domain, attrs))
        node.input.extend(inputs)
        node.output.extend(outputs)
        if name:
            node.name = name

    def constant(self, name: str, array: np.ndarray) -> str:
        """Add an initializer that is not an IR parameter (for example Dropout's ratio),
        under ``name`` or, if the graph has that name already, a variant of it."""
        unique = self.fresh(name)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), unique))
        return unique

    def shared_constant(self, name: str, array: np.ndarray) -> str:
        """A constant initializer that every node asking for the same values reads: one
        ``affine.ones`` of 64 values for all the nodes of 64 channels that need it."""
        array = np.ascontiguousarray(array).reshape(np.shape(array))  # a scalar stays one
        key = (name, array.dtype.str, array.shape, array.tobytes())
        if key not in self._shared:
            self._shared[key] = self.constant(name, array)
        return self._shared[key]

    def alias(self, value: Value, same: Value) -> None:
        """``value`` is ``same``: no node computes it, its readers read ``same`` (a network
        output, which must be some node's output, is an Identity of it)."""
        if value in self.graph.outputs:
            self.node("Identity", [same.name], [value.name], self.current or value.name)
        else:
            self.aliases[value.name] = self.aliases.get(same.name, same.name)

    def per_channel(self, node: Node, v: Value, role: str) -> str:
        """``v``, a vector of one value per channel of ``node``'s input x, shaped [C, 1, ...]
        to broadcast against x as ONNX Mul and Add do. A parameter that no node reads as a
        vector is written in that shape under its own name; otherwise the reshaped copy is
        the initializer ``<node>.<role>``. A value of the run (a training step feeds its
        parameters) is reshaped in the model."""
        per_channel = (v.shape[0], *(1,) * (node.inputs[0].type.rank - 2))
        if not v.is_param:
            shape = self.constant(f"{node.name}.{role}_shape", np.array(per_channel, np.int64))
            out = self.fresh(f"{node.name}.{role}")
            self.node("Reshape", [v.name, shape], [out], f"{node.name}.{role}")
            return out
        if v.shape == per_channel:
            return v.name
        key = (v.name, per_channel)
        if key not in self.reshaped:
            self.reshaped[key] = self.fresh(f"{node.name}.{role}")
        return self.reshaped[key]

    def finish(self, tensors: list[Tensor]) -> list[Tensor]:
        """Resolve the aliases and reshaped parameters in the nodes' inputs, and return the
        initializers the model needs: ``tensors`` (the parameters') and the constants the
        emitters added, without any that no node reads (onnxruntime warns "Removing
        initializer" of each, and a file should not carry weights nothing uses)."""
        by_name = {t.name: t for t in tensors}
        read = {name for n in self.nodes for name in n.input}
        outputs = {v.name for v in self.graph.outputs}
        reshapes: dict[str, int] = {}
        for name, _ in self.reshaped:
            reshapes[name] = reshapes.get(name, 0) + 1
        renames = dict(self.aliases)
        for (name, shape), placeholder in self.reshaped.items():
            param = by_name[name]
            if placeholder not in read:
                continue
            if name not in read and name not in outputs and reshapes[name] == 1:
                # The parameter itself, in the shape its readers want, under its own name.
                renames[placeholder] = name
                by_name[name] = param.reshaped(shape)
            else:
                by_name[placeholder] = param.reshaped(shape, placeholder)
        if renames:
            for n in self.nodes:
                if any(i in renames for i in n.input):
                    n.input[:] = [renames.get(i, i) for i in n.input]
        read = {name for n in self.nodes for name in n.input} | outputs
        written = [*by_name.values(), *(Tensor.of_proto(t) for t in self.initializers)]
        return [t for t in written if t.name in read]

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
        # A call may leave trailing optional inputs out (a conv without bias).
        actual = {
            **dict(zip(function.input, inputs, strict=False)),
            **dict(zip(function.output, outputs, strict=True)),
        }
        for i, body_node in enumerate(function.node):
            node = self.nodes.add()
            node.CopyFrom(body_node)
            node.input[:] = [actual.get(v, f"{name}/{v}") if v else "" for v in node.input]
            node.output[:] = [actual.get(v, f"{name}/{v}") for v in node.output]
            node.name = name if set(node.output) & set(outputs) else f"{name}/{i}.{node.op_type}"
            for attr in node.attribute:
                if attr.ref_attr_name:
                    attr.CopyFrom(helper.make_attribute(attr.name, attrs[attr.ref_attr_name]))
            self.node_names.add(node.name)

    def refuse(self, node: Node, what: str) -> UsageError:
        return UsageError(
            f"node {node.name}: {what} cannot be expressed in ONNX opset {self.opset}", node.loc
        )


_ATTRIBUTES: dict[tuple, onnx.AttributeProto] = {}
_TEMPLATES: dict[tuple, onnx.NodeProto] = {}


def _template(op_type: str, domain: str, attrs: dict[str, Any]) -> onnx.NodeProto:
    """A node of ``op_type`` in ``domain`` with ``attrs`` (those that are not None, in
    the order of their names) and nothing else, remembered when the attributes are ints,
    floats, strings or lists of them: the nodes of a network of 10,000 convs are copies
    of a handful (one copy costs less than building the attributes again)."""
    key: list | None = [op_type, domain]
    for name, value in attrs.items():
        kind = type(value)
        if kind is list or kind is tuple:
            # The types of the items too: [1, 2] and [1.0, 2.0] make different attributes.
            items = tuple(value)
            key.append((name, items, tuple(map(type, items))))
        elif kind is int or kind is float or kind is str or kind is bool or value is None:
            key.append((name, kind, value))
        else:  # an array, a tensor, a graph: made each time
            key = None
            break
    if key is not None:
        try:
            key = tuple(key)
            template = _TEMPLATES.get(key)
        except TypeError:  # an item of a list that is no key
            key, template = None, None
        if template is not None:
            return template
    template = onnx.NodeProto(op_type=op_type)
    if domain:
        template.domain = domain
    if attrs:
        template.attribute.extend(
            _attribute(k, value) for k, value in sorted(attrs.items()) if value is not None
        )
    if key is not None:
        if len(_TEMPLATES) > 10_000:
            _TEMPLATES.clear()
        _TEMPLATES[key] = template
    return template


def _attribute(key: str, value: Any) -> onnx.AttributeProto:
    """helper.make_attribute(key, value), remembered for values of ints, floats and strings
    (a network of 10,000 convs has a handful of distinct kernel sizes and paddings)."""
    if isinstance(value, list | tuple) and all(type(v) is int for v in value):
        cache_key = (key, "ints", tuple(value))
    elif type(value) in (int, float, str):
        cache_key = (key, type(value).__name__, value)
    else:
        return helper.make_attribute(key, value)
    attribute = _ATTRIBUTES.get(cache_key)
    if attribute is None:
        if len(_ATTRIBUTES) > 10_000:
            _ATTRIBUTES.clear()
        attribute = _ATTRIBUTES[cache_key] = helper.make_attribute(key, value)
    return attribute


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
    if activation == "clip":
        # The bounds are inputs (scalar initializers shared by every call), not Constant
        # nodes made from the call's attributes: inlined, each call is then Conv and Clip.
        body = [helper.make_node("Clip", ["T", *CLIP_BOUNDS], ["Y"])]
        inputs, attributes = ["X", "W", "B", *CLIP_BOUNDS], list(_CONV_ATTRS)
    else:
        body = activation_body(activation, act_attrs, e.opset)
        for node in body:
            node.input[:] = ["T" if i == "X" else i for i in node.input]
        inputs = ["X", "W", "B"]
        attributes = [*_CONV_ATTRS, *_call_attrs(activation, act_attrs)]
    return model_function(
        fused_function_name(activation, act_attrs),
        inputs,
        ["Y"],
        [conv, *body],
        attributes,
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
    if activation == "clip":
        # An infinite bound is no bound: the input is left out.
        call_inputs += [
            e.shared_constant(f"clip.{b}", np.array(act_attrs[b], np.float32))
            if np.isfinite(act_attrs[b])
            else ""
            for b in CLIP_BOUNDS
        ]
        while call_inputs[-1] == "":
            call_inputs.pop()
        call_attrs = attrs
    else:
        call_attrs = {**attrs, **_call_attrs(activation, act_attrs)}
    e.call(_fused_function(e, activation, act_attrs), call_inputs, outputs, node.name, call_attrs)


@emitter("conv_transpose")
def _conv_transpose(e: Emitter, node: Node) -> None:
    # Explicit pads and output_padding, never output_shape: the model says what it computes.
    attrs = {**_window_attrs(node, node.inputs[1].shape[2:]), "group": node.attrs["groups"]}
    output_pad, stride = node.attrs["output_pad"], node.attrs["stride"]
    if any(p >= s for p, s in zip(output_pad, stride, strict=True)):
        # PyTorch allows output padding below the dilation; onnxruntime and onnx.reference
        # refuse any that is not below the stride.
        raise e.refuse(
            node,
            f"output_pad {format_dims(output_pad)} not smaller than the stride "
            f"{format_dims(stride)} (ONNX runtimes require output_padding < strides)",
        )
    if any(output_pad):
        attrs["output_padding"] = list(output_pad)
    if _transpose_as_flipped_conv(e, node):
        return
    e.node("ConvTranspose", _names(node.inputs), _names(node.outputs), node.name, **attrs)


def _columns_ratio(node: Node) -> float:
    """For a conv_transpose of a kernel of more than one tap, how many times more column
    entries the flipped Conv's im2col builds (input channels × output pixels) than
    ConvTranspose's col2im adds up (output channels × input pixels); 0 when unknown."""
    x, w, y = node.inputs[0], node.inputs[1], node.output
    dims = [*x.shape[2:], *y.shape[2:]]
    if np.prod(w.shape[2:]) == 1 or not all(isinstance(d, int) for d in dims):
        return 0.0
    return (w.shape[0] * np.prod(y.shape[2:])) / (y.shape[1] * np.prod(x.shape[2:]))


# A transposed convolution whose output maps are this small keeps its ConvTranspose: the
# flip of the weights (a Slice with negative steps, which onnxruntime copies value by value)
# costs more than the Conv saves. onnxruntime 1.32, 2 threads, batch 8, ResNet-18's input
# gradients, ConvTranspose against the flipped Conv with its flip: 512 channels of 7×7 12.5
# against 19.6 ms, 256 of 14×14 10.7 against 12.5 ms, 128 of 28×28 13.2 against 11.1 ms.
FLIP_MIN_PIXELS = 14 * 14


def _map_pixels(value: Value) -> int:
    """The pixels of one map of ``value`` (0 when a size is not known)."""
    dims = value.shape[2:]
    return int(np.prod(dims)) if all(isinstance(d, int) for d in dims) else 0


def _transpose_as_flipped_conv(e: Emitter, node: Node) -> bool:
    """A stride 1 transposed convolution of one group whose weights are values of the run
    (a convolution's input gradient in a training step) as the Conv by its kernels
    transposed and flipped, padded by dilation·(k − 1) − pad: onnxruntime's Conv is faster
    than its ConvTranspose there (ResNet-18's 3×3 input gradients at batch 8, 2 threads, the
    flip included: 64 channels of 56×56 13.3 against 15.2 ms, 128 of 28×28 11.1 against
    13.2 ms) — unless its im2col is twice ConvTranspose's col2im or more, where the Conv's
    input has more channels or a smaller map than its output (LeNet-5's second convolution,
    16 channels of 10×10 to 6 of 14×14 by 5×5, batch 64: ConvTranspose 1.1 ms, the Conv 9.7
    ms on one thread), or its maps are of FLIP_MIN_PIXELS or fewer. A model with constant
    weights keeps its ConvTranspose (what it says is what it computes). True if it wrote
    the Conv."""
    a = node.attrs
    weight = node.inputs[1]
    kernel = tuple(weight.shape[2:])
    rank = len(kernel)
    if weight.is_param or a["groups"] != 1 or any(s != 1 for s in a["stride"]):
        return False
    if _columns_ratio(node) >= 2 or _map_pixels(node.output) <= FLIP_MIN_PIXELS:
        return False
    reach = [d * (k - 1) for d, k in zip(a["dilation"], kernel, strict=True)]
    pads = [reach[i] - a["pads"][i] for i in range(rank)]
    pads += [reach[i] - a["pads"][rank + i] + a["output_pad"][i] for i in range(rank)]
    if min(pads) < 0:
        return False
    swapped = e.fresh(f"{node.name}.weight_t")
    e.node("Transpose", [weight.name], [swapped], swapped, perm=[1, 0, *range(2, rank + 2)])
    ends = np.iinfo(np.int64).min
    bounds = [
        e.constant(f"{node.name}.{what}", np.array(values, np.int64))
        for what, values in (
            ("flip_starts", [-1] * rank),
            ("flip_ends", [ends] * rank),
            ("flip_axes", list(range(2, rank + 2))),
            ("flip_steps", [-1] * rank),
        )
    ]
    flipped = e.fresh(f"{node.name}.weight_flipped")
    e.node("Slice", [swapped, *bounds], [flipped], flipped)
    attrs = {"kernel_shape": list(kernel), "strides": [1] * rank, "pads": pads}
    if any(d != 1 for d in a["dilation"]):
        attrs["dilations"] = list(a["dilation"])
    inputs = [node.inputs[0].name, flipped, *_names(node.inputs[2:])]
    e.node("Conv", inputs, _names(node.outputs), node.name, **attrs)
    return True


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


# ---- resizing and adaptive pooling ----------------------------------------------------------

# How Resize reproduces each upsample mode: (mode, coordinate_transformation_mode,
# nearest_mode). half_pixel (not pytorch_half_pixel) is PyTorch's rule for align_corners=false
# at every output size: pytorch_half_pixel samples pixel 0 for an output of size 1, PyTorch
# the middle of the input.
RESIZE_MODES = {
    "nearest": ("nearest", "asymmetric", "floor"),
    "nearest_exact": ("nearest", "half_pixel", "round_prefer_ceil"),
    "linear": ("linear", "half_pixel", None),
    "bilinear": ("linear", "half_pixel", None),
}
# Float32 neighbours of a scale tried, each way, for one that onnxruntime computes exactly.
SCALE_SEARCH_ULPS = 8


def ort_resize_size(size: int, scale: np.float32) -> int:
    """The output size onnxruntime's Resize computes: the float32 product, truncated."""
    return int(np.float32(scale) * np.float32(size))


# onnxruntime's half_pixel coordinate is not the float32 formula to the last bit: measured,
# coordinates up to a dozen float32 steps below a half are sometimes rounded up. One
# within this many steps of a half (and not on it) is taken as unpredictable.
HALF_PIXEL_MARGIN_ULPS = 32


def ort_nearest_indices(size: int, out: int, scale: np.float32, mode: str) -> np.ndarray | None:
    """The pixels onnxruntime's nearest Resize samples along one axis for a float32 scale,
    or None where that cannot be predicted. ``nearest`` (asymmetric + floor): x / scale,
    a float32 division, floored (measured to match onnxruntime at every coordinate, on
    whole numbers too). ``nearest_exact`` (half_pixel + round_prefer_ceil): (x + 0.5) /
    scale - 0.5 rounded half up, unpredictable near a half (see HALF_PIXEL_MARGIN_ULPS)."""
    f32 = np.float32
    if mode == "nearest":
        index = np.floor(np.arange(out, dtype=f32) / f32(scale))
    else:
        source = (np.arange(out) + 0.5) / float(f32(scale)) - 0.5
        from_half = source - (np.floor(source - 0.5) + 0.5)
        step = np.spacing(np.maximum(np.abs(source), 0.5).astype(f32)).astype(np.float64)
        near = (from_half != 0) & (
            np.minimum(from_half, 1 - from_half) < HALF_PIXEL_MARGIN_ULPS * step
        )
        if near.any():
            return None
        index = np.floor(source + 0.5)
    return np.clip(index.astype(np.int64), 0, size - 1)


def _scale_candidates(wanted: float):
    """float32 values nearest ``wanted``: its float32 first, then one ulp each way, ..."""
    base = np.float32(wanted)
    yield base
    up = down = base
    for _ in range(SCALE_SEARCH_ULPS):
        up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(0))
        yield down
        yield up


def _sizes_are_exact(node: Node) -> bool:
    """Whether Resize to the node's output sizes samples what it samples: always in the
    linear modes; in the nearest modes, where onnxruntime's float32 coordinates (x divided
    by the float32 out / size) give PyTorch's pixels (x times its float32 size / out)."""
    a = node.attrs
    spatial = tuple(node.inputs[0].type.spatial)
    out = tuple(node.output.type.spatial)
    if a["mode"] not in NEAREST_MODES or spatial == out:
        return True
    for n, o in zip(spatial, out, strict=True):
        theirs = ort_nearest_indices(n, o, np.float32(o) / np.float32(n), a["mode"])
        if theirs is None or not np.array_equal(
            theirs, nearest_indices(n, o, None, a["mode"], len(spatial))
        ):
            return False
    return True


def resize_scales(node: Node, flexible: bool = False) -> list[np.float32] | None:
    """Float32 scales per spatial axis with which ONNX Resize computes this upsample node,
    or None if no scales do (a nearest sampling onnxruntime's arithmetic cannot reproduce).

    Resize derives the output size from the scale (floor(scale · size): in double in onnx's
    shape inference, in float32 in onnxruntime) and maps output to input coordinates by
    dividing by it in float32, where PyTorch multiplies by its float32 ratio. So each axis
    takes the float32 nearest the scale (or to out / size for a size) for which both output
    sizes are right and, in the nearest modes, every sampled pixel is PyTorch's; an axis
    that keeps its pixels takes 1. ``flexible`` (a fully convolutional network, whose input
    size is not known): the scales as given.
    """
    a = node.attrs
    if flexible:
        return [np.float32(s) for s in a["scales"]]
    spatial = tuple(node.inputs[0].type.spatial)
    out = tuple(node.output.type.spatial)
    nearest = a["mode"] in NEAREST_MODES
    rank = len(spatial)
    given = a["scales"] or (None,) * rank
    if nearest and spatial == out:
        # onnxruntime copies a tensor whose shape does not change, whatever the scales.
        same = all(
            np.array_equal(nearest_indices(n, n, s, a["mode"], rank), np.arange(n))
            for n, s in zip(spatial, given, strict=True)
        )
        return [np.float32(1)] * rank if same else None
    scales = []
    for n, o, s in zip(spatial, out, given, strict=True):
        wanted = nearest_indices(n, o, s, a["mode"], rank) if nearest else None
        if n == o and (wanted is None or np.array_equal(wanted, np.arange(n))):
            scales.append(np.float32(1))
            continue
        for scale in _scale_candidates(s if s is not None else o / n):
            if math.floor(float(scale) * n) != o or ort_resize_size(n, scale) != o:
                continue
            theirs = None if wanted is None else ort_nearest_indices(n, o, scale, a["mode"])
            if wanted is None or (theirs is not None and np.array_equal(theirs, wanted)):
                scales.append(scale)
                break
        else:
            return None
    return scales


def _spatial_attrs(node: Node) -> dict[str, Any]:
    a = node.attrs
    if a["size"] is not None:
        return {"mode": a["mode"], "size": list(a["size"])}
    return {"mode": a["mode"], "scales": [float(s) for s in a["scales"]]}


AXIS_NAMES = {1: ("",), 2: ("_rows", "_cols")}


def _gather_body(rank: int, reduce: bool, opset: int) -> list[onnx.NodeProto]:
    """Y from X by a Gather along each spatial axis i by the index table I<i>; with
    ``reduce``, each Gather's window axis (after the gathered one) is reduced by ReduceMax."""
    body, value = [], "X"
    for i in range(rank):
        last = i == rank - 1
        gathered = f"G{i}" if reduce or not last else "Y"
        body.append(helper.make_node("Gather", [value, f"I{i}"], [gathered], axis=2 + i))
        value = gathered
        if reduce:
            value = "Y" if last else f"R{i}"
            if opset < 18:
                body.append(
                    helper.make_node("ReduceMax", [gathered], [value], axes=[3 + i], keepdims=0)
                )
            else:
                body.append(helper.make_node("Constant", [], [f"A{i}"], value_ints=[3 + i]))
                body.append(helper.make_node("ReduceMax", [gathered, f"A{i}"], [value], keepdims=0))
    return body


def _call_with_tables(
    e: Emitter,
    node: Node,
    function: onnx.FunctionProto,
    kind: str,
    tables: list[np.ndarray],
    attrs: dict[str, Any],
) -> None:
    """Call ``function`` on the node's input and one constant table per spatial axis,
    initializers ``<node>.<kind>`` (1-D) or ``<node>.<kind>_rows`` and ``_cols`` (2-D)."""
    names = [
        e.constant(f"{node.name}.{kind}{suffix}", np.ascontiguousarray(table))
        for suffix, table in zip(AXIS_NAMES[len(tables)], tables, strict=True)
    ]
    e.call(function, [node.inputs[0].name, *names], [node.output.name], node.name, attrs)


@emitter("upsample")
def _upsample(e: Emitter, node: Node) -> None:
    """Resize: to the output sizes for a size or align_corners (see _sizes_are_exact), else
    by scales (see resize_scales); a nearest sampling that onnxruntime's Resize cannot
    reproduce either way is a call of the function UpsampleScale1d/2d or UpsampleSize1d/2d
    (domain cnnc): a Gather of the source pixels along each axis (initializers
    <node>.indices[_rows|_cols]), its call attributes the upsample's mode and scales or
    size."""
    a = node.attrs
    flexible = e.graph.flexible_spatial
    by_size = a["size"] is not None or a["align_corners"]
    if flexible and by_size:
        what = "to a fixed size" if a["size"] is not None else "with align_corners"
        raise e.refuse(node, f"an upsample {what} in a fully convolutional network")
    mode, transform, nearest_mode = RESIZE_MODES[a["mode"]]
    attrs = {"mode": mode, "coordinate_transformation_mode": transform}
    if a["align_corners"]:
        attrs["coordinate_transformation_mode"] = "align_corners"
    if nearest_mode:
        attrs["nearest_mode"] = nearest_mode
    x, y = node.inputs[0].name, node.output.name
    # With align_corners, onnxruntime divides by the output size - 1 as PyTorch does, but
    # the ONNX formula (and onnx.reference) by scale · size - 1 unrounded: sizes agree.
    if by_size and _sizes_are_exact(node):
        if e.opset >= 18:
            attrs["axes"] = list(range(2, node.output.type.rank))
        e.node("Resize", [x, "", "", _resize_sizes(e, node)], [y], node.name, **attrs)
        return
    scales = resize_scales(node, flexible)
    if scales is not None:
        full = e.constant(f"{node.name}.scales", np.array([1, 1, *scales], np.float32))
        e.node("Resize", [x, "", full], [y], node.name, **attrs)
        return
    spatial, out = node.inputs[0].type.spatial, node.output.type.spatial
    rank = len(spatial)
    given = a["scales"] or (None,) * rank
    tables = [
        nearest_indices(n, o, s, a["mode"], rank)
        for n, o, s in zip(spatial, out, given, strict=True)
    ]
    attrs = _spatial_attrs(node)
    form = "Size" if a["size"] is not None else "Scale"
    function = model_function(
        f"Upsample{form}{rank}d",
        ["X", *(f"I{i}" for i in range(rank))],
        ["Y"],
        _gather_body(rank, False, e.opset),
        list(attrs),
        e.opset,
        "PyTorch's nearest upsampling (cnnc upsample): the source pixels gathered along "
        "each spatial axis; the call's attributes are the upsample's",
    )
    _call_with_tables(e, node, function, "indices", tables, attrs)


def _resize_sizes(e: Emitter, node: Node) -> str:
    """Resize's sizes input for the node's output sizes: from opset 18 the spatial sizes
    (for the attribute axes, which the caller adds); before, the batch and channel sizes
    of the input (by Shape, as PyTorch exports it: the batch axis is symbolic), then them."""
    sizes = e.constant(f"{node.name}.sizes", np.array(node.output.type.spatial, np.int64))
    if e.opset >= 18:
        return sizes
    x = node.inputs[0].name
    head = e.fresh(f"{node.name}.shape")
    if e.opset >= 15:
        e.node("Shape", [x], [head], head, start=0, end=2)
    else:
        every = e.fresh(f"{head}.all")
        e.node("Shape", [x], [every], every)
        bounds = [
            e.constant(f"{node.name}.{bound}", np.array([v], np.int64))
            for bound, v in (("start", 0), ("end", 2))
        ]
        e.node("Slice", [every, *bounds], [head], head)
    full = e.fresh(f"{node.name}.full_sizes")
    e.node("Concat", [head, sizes], [full], full, axis=0)
    return full


def _adaptive_uniform(e: Emitter, node: Node, standard: str, global_op: str) -> bool:
    """An adaptive pool whose windows divide every axis evenly as the standard pool
    (kernel = stride = in / out, or the global pool for an output of 1); False otherwise."""
    spatial, size = tuple(node.inputs[0].type.spatial), tuple(node.attrs["size"])
    if e.graph.flexible_spatial or not adaptive_is_uniform(spatial, size):
        return False
    inputs, outputs = _names(node.inputs), _names(node.outputs)
    if all(o == 1 for o in size):
        e.node(global_op, inputs, outputs, node.name)
        return True
    kernel = [n // o for n, o in zip(spatial, size, strict=True)]
    e.node(standard, inputs, outputs, node.name, kernel_shape=kernel, strides=kernel)
    return True


def _refuse_flexible(e: Emitter, node: Node) -> None:
    if e.graph.flexible_spatial:
        raise e.refuse(node, f"{node.op} in a fully convolutional network")


@emitter("adaptive_avgpool")
def _adaptive_avgpool(e: Emitter, node: Node) -> None:
    """AveragePool or GlobalAveragePool when the windows are uniform; otherwise the function
    AdaptiveAvgPool1d/2d (domain cnnc): MatMul by the constant pooling matrix of each axis
    (initializers <node>.pool, or <node>.pool_rows [oh, h] and <node>.pool_cols [w, ow])."""
    if _adaptive_uniform(e, node, "AveragePool", "GlobalAveragePool"):
        return
    _refuse_flexible(e, node)
    spatial, size = node.inputs[0].type.spatial, node.attrs["size"]
    pools = [adaptive_avg_matrix(n, o) for n, o in zip(spatial, size, strict=True)]
    if len(pools) == 1:
        body = [helper.make_node("MatMul", ["X", "P0"], ["Y"])]
        tables = [pools[0].T]
    else:
        body = [
            helper.make_node("MatMul", ["X", "P1"], ["T"]),
            helper.make_node("MatMul", ["P0", "T"], ["Y"]),
        ]
        tables = [pools[0], pools[1].T]
    function = model_function(
        f"AdaptiveAvgPool{len(pools)}d",
        ["X", *(f"P{i}" for i in range(len(pools)))],
        ["Y"],
        body,
        [],
        e.opset,
        "PyTorch's adaptive average pooling (cnnc adaptive_avgpool): products by the "
        "pooling matrices of the axes",
    )
    _call_with_tables(e, node, function, "pool", tables, {})


@emitter("adaptive_maxpool")
def _adaptive_maxpool(e: Emitter, node: Node) -> None:
    """MaxPool or GlobalMaxPool when the windows are uniform; otherwise the function
    AdaptiveMaxPool1d/2d (domain cnnc): along each axis, Gather of each window's indices
    (initializer <node>.windows[_rows|_cols] [out, longest window], a short window
    repeating its last index) and ReduceMax over the window."""
    if _adaptive_uniform(e, node, "MaxPool", "GlobalMaxPool"):
        return
    _refuse_flexible(e, node)
    spatial, size = node.inputs[0].type.spatial, node.attrs["size"]
    tables = [adaptive_max_windows(n, o) for n, o in zip(spatial, size, strict=True)]
    function = model_function(
        f"AdaptiveMaxPool{len(tables)}d",
        ["X", *(f"I{i}" for i in range(len(tables)))],
        ["Y"],
        _gather_body(len(tables), True, e.opset),
        [],
        e.opset,
        "PyTorch's adaptive max pooling (cnnc adaptive_maxpool): along each axis, each "
        "window's pixels gathered and reduced by ReduceMax",
    )
    _call_with_tables(e, node, function, "windows", tables, {})


@emitter("lrn")
def _lrn(e: Emitter, node: Node) -> None:
    (x,), (y,) = _names(node.inputs), _names(node.outputs)
    if node.inputs[0].type.rank != 3:
        e.node("LRN", [x], [y], node.name, **node.attrs)
        return
    # onnxruntime's LRN takes N×C×H×W only: a 1-D map N×C×L runs as N×C×L×1.
    axes = e.constant(f"{node.name}.axes", np.array([3], dtype=np.int64))
    view, normalized = e.fresh(f"{node.name}.2d"), e.fresh(f"{node.name}.lrn")
    e.node("Unsqueeze", [x, axes], [view], f"{node.name}.unsqueeze")
    e.node("LRN", [view], [normalized], f"{node.name}.lrn", **node.attrs)
    e.node("Squeeze", [normalized, axes], [y], node.name)


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


def affine_statistics(e: Emitter, channels: int, dtype) -> tuple[str, str]:
    """The mean (zeros) and variance (ones) initializers of a BatchNormalization that
    computes x · scale + shift, shared by every such node of ``channels`` channels."""
    return (
        e.shared_constant("affine.zeros", np.zeros(channels, dtype)),
        e.shared_constant("affine.ones", np.ones(channels, dtype)),
    )


@emitter("affine")
def _affine(e: Emitter, node: Node) -> None:
    """x · weight + bias per channel: one Mul when the shift is zero, one Add when the scale
    is one, nothing (the users read x) when both, and otherwise one BatchNormalization of
    mean 0, variance 1 and epsilon 0, which computes x · weight + bias exactly (see
    AFFINE_AS_BN)."""
    x, weight, bias = node.inputs
    unit = weight.is_param and weight.has_data and not np.any(weight.data != 1)
    zero = bias.is_param and bias.has_data and not np.any(bias.data)
    if unit and zero:
        e.alias(node.output, x)
        return
    if unit or zero:
        op, v = ("Add", bias) if unit else ("Mul", weight)
        e.node(op, [x.name, e.per_channel(node, v, "shift" if unit else "scale")],
               _names(node.outputs), node.name)  # fmt: skip
        return
    if AFFINE_AS_BN and weight.is_param and bias.is_param:
        mean, var = affine_statistics(e, x.type.shape[1], x.type.numpy_dtype)
        e.node(
            "BatchNormalization",
            [x.name, weight.name, bias.name, mean, var],
            _names(node.outputs),
            node.name,
            epsilon=0.0,
        )
        return
    scale, shift = e.per_channel(node, weight, "scale"), e.per_channel(node, bias, "shift")
    scaled = e.fresh(f"{node.name}.scaled")
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
    last, result = e.fresh(f"{node.name}.last"), e.fresh(f"{node.name}.result")
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
        kernel = e.fresh(f"{node.name}.kernel")
        e.node("Unsqueeze", [weight.name, axes], [kernel], f"{node.name}.unsqueeze")
        inputs = [x.name, kernel, *_names(bias)]
        e.node("Conv", inputs, [node.output.name], node.name, kernel_shape=[1] * (rank - 2))
        return
    transposed = e.fresh(f"{node.name}.weight_t")
    e.node("Transpose", [weight.name], [transposed], f"{node.name}.transpose", perm=[1, 0])

    def emit(source: str, target: str, name: str) -> None:
        if not bias:
            e.node("MatMul", [source, transposed], [target], name)
            return
        product = e.fresh(f"{name}.product")
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


@emitter("drop_path")
def _drop_path(e: Emitter, node: Node) -> None:
    # ONNX has no stochastic depth: a function whose body is the identity it is at
    # inference, carrying p so that the model shows where it was and imports back.
    function = model_function(
        "DropPath",
        ["X"],
        ["Y"],
        [helper.make_node("Identity", ["X"], ["Y"])],
        ["p"],
        e.opset,
        "Stochastic depth (drop_path): drops a residual branch per item with probability p "
        "in training; the identity at inference",
    )
    e.call(function, _names(node.inputs), _names(node.outputs), node.name, {"p": node.attrs["p"]})


@emitter("pad")
def _pad(e: Emitter, node: Node) -> None:
    a = node.attrs
    rank = len(a["pads"]) // 2
    # ONNX pads every axis: none on the batch and the channels.
    pads = [0, 0, *a["pads"][:rank], 0, 0, *a["pads"][rank:]]
    inputs = [node.inputs[0].name, e.constant(f"{node.name}.pads", np.array(pads, np.int64))]
    if a["mode"] == "constant" and a["value"] != 0:
        inputs.append(e.constant(f"{node.name}.value", np.array(a["value"], np.float32)))
    e.node("Pad", inputs, _names(node.outputs), node.name, mode=a["mode"])


@emitter("split")
def _split(e: Emitter, node: Node) -> None:
    # Explicit sizes at every opset (opset 18's num_outputs rounds as torch.chunk does, but
    # sizes say the same thing to every reader).
    sizes = e.constant(f"{node.name}.split", np.array(node.attrs["sizes"], np.int64))
    e.node("Split", [node.inputs[0].name, sizes], _names(node.outputs), node.name, axis=1)


_INT64 = np.iinfo(np.int64)


def _int64s(name: str, e: Emitter, values) -> str:
    clamped = [min(max(int(v), _INT64.min), _INT64.max) for v in values]
    return e.constant(name, np.array(clamped, np.int64))


@emitter("slice")
def _slice(e: Emitter, node: Node) -> None:
    a = node.attrs
    inputs = [
        node.inputs[0].name,
        _int64s(f"{node.name}.starts", e, [a["start"]]),
        _int64s(f"{node.name}.ends", e, [a["end"]]),
        _int64s(f"{node.name}.axes", e, [a["axis"]]),
    ]
    e.node("Slice", inputs, _names(node.outputs), node.name)


@emitter("crop")
def _crop(e: Emitter, node: Node) -> None:
    x, ref = node.inputs
    offset = np.array(node.attrs["offset"], np.int64)
    starts = e.constant(f"{node.name}.starts", offset)
    axes = e.constant(f"{node.name}.axes", np.arange(2, x.type.rank, dtype=np.int64))
    if not e.graph.flexible_spatial:
        ends = e.constant(f"{node.name}.ends", offset + np.array(ref.type.spatial, np.int64))
    else:
        # A fully convolutional network's sizes are known at run time only: the ends are
        # ref's spatial sizes then, plus the offset.
        shape, sizes, ends = (
            e.fresh(f"{node.name}.{v}") for v in ("ref_shape", "ref_size", "ends")
        )
        e.node("Shape", [ref.name], [shape], f"{node.name}.shape")
        first = e.constant(f"{node.name}.first", np.array([2], np.int64))
        last = e.constant(f"{node.name}.last", np.array([x.type.rank], np.int64))
        e.node("Slice", [shape, first, last], [sizes], f"{node.name}.spatial")
        e.node("Add", [sizes, starts], [ends], f"{node.name}.ends")
    e.node("Slice", [x.name, starts, ends, axes], _names(node.outputs), node.name)


# ---- the gradient ops of the spatial and structural ops (cnnc/train/rules.py) -------------


@emitter("axis_matmul")
def _axis_matmul(e: Emitter, node: Node) -> None:
    # one MatMul per spatial axis: m · x for the axis before the last, x · mᵀ for the last
    current = node.inputs[0].name
    matrices = node.inputs[1:]
    for i, m in enumerate(matrices):
        last = i == len(matrices) - 1
        out = node.output.name if last else e.fresh(f"{node.name}.axis{i}")
        if last:
            transposed = e.fresh(f"{node.name}.m{i}T")
            e.node("Transpose", [m.name], [transposed], f"{node.name}.m{i}T", perm=[1, 0])
            e.node("MatMul", [current, transposed], [out], node.name)
        else:
            e.node("MatMul", [m.name, current], [out], f"{node.name}.axis{i}")
        current = out


@emitter("slice_grad")
def _slice_grad(e: Emitter, node: Node) -> None:
    a = node.attrs
    rank = node.inputs[0].type.rank
    pads = [0] * (2 * rank)
    pads[a["axis"]] = a["start"]
    pads[rank + a["axis"]] = a["size"] - a["stop"]
    inputs = [node.inputs[0].name, e.constant(f"{node.name}.pads", np.array(pads, np.int64))]
    e.node("Pad", inputs, _names(node.outputs), node.name, mode="constant")


@emitter("adaptive_maxpool_grad")
def _adaptive_maxpool_grad(e: Emitter, node: Node) -> None:
    # The windows gathered from the flattened map ([N, C, P, K] by a table of flat
    # indices), the first largest of each (ArgMax), its flat index, and dy added there
    # (ScatterElements with reduction add, opset 16).
    from cnnc.backends.train_kernels import adaptive_max_table

    if e.opset < 16:
        raise e.refuse(node, "the gradient of adaptive_maxpool (ScatterElements add)")
    x, dy = node.inputs
    name = node.name
    table = adaptive_max_table(tuple(x.type.spatial), tuple(node.attrs["size"]))
    count, taps = table.shape
    flat_shape = e.constant(f"{name}.flat_shape", np.array([0, 0, -1], np.int64))
    v = {k: e.fresh(f"{name}.{k}") for k in ("xf", "windows", "first", "at", "index", "dyf")}
    v.update({k: e.fresh(f"{name}.{k}") for k in ("shape", "zeros", "dxf", "xshape")})
    e.node("Reshape", [x.name, flat_shape], [v["xf"]], f"{name}.xf")
    windows = e.constant(f"{name}.table", table.astype(np.int64))
    e.node("Gather", [v["xf"], windows], [v["windows"]], f"{name}.windows", axis=2)
    e.node("ArgMax", [v["windows"]], [v["first"]], f"{name}.first", axis=3, keepdims=0)
    base = e.constant(f"{name}.base", np.arange(count, dtype=np.int64) * taps)
    e.node("Add", [v["first"], base], [v["at"]], f"{name}.at")
    flat_table = e.constant(f"{name}.flat_table", table.reshape(-1).astype(np.int64))
    e.node("Gather", [flat_table, v["at"]], [v["index"]], f"{name}.index", axis=0)
    e.node("Reshape", [dy.name, flat_shape], [v["dyf"]], f"{name}.dyf")
    e.node("Shape", [v["xf"]], [v["shape"]], f"{name}.shape")
    zero = numpy_helper.from_array(np.zeros(1, dy.type.numpy_dtype))
    e.node("ConstantOfShape", [v["shape"]], [v["zeros"]], f"{name}.zeros", value=zero)
    e.node(
        "ScatterElements",
        [v["zeros"], v["index"], v["dyf"]],
        [v["dxf"]],
        f"{name}.scatter",
        axis=2,
        reduction="add",
    )
    e.node("Shape", [x.name], [v["xshape"]], f"{name}.xshape")
    e.node("Reshape", [v["dxf"], v["xshape"]], _names(node.outputs), name)


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
    shaped = e.fresh(f"{slope.name}.per_channel")
    e.node("Unsqueeze", [slope.name, axes], [shaped], f"{node.name}.unsqueeze")
    e.node("PRelu", [x.name, shaped], _names(node.outputs), node.name)


# ---- gradients of the normalizations (training graphs; cnnc/ops/train.py) ------------------
# layernorm_grad, groupnorm_grad and lrn_grad in standard ops of every opset cnnc writes
# (ReduceSum takes its axes as an input from opset 13), in the dtype of their inputs.


class _Steps:
    """Adds the ONNX nodes of one IR node, each computing a fresh ``<node>.<suffix>``."""

    def __init__(self, e: Emitter, node: Node):
        self.e, self.node = e, node
        self.dtype = node.inputs[0].type.numpy_dtype

    def __call__(
        self, op_type: str, inputs: list[str], suffix: str, out: str | None = None, **attrs
    ):
        name = f"{self.node.name}.{suffix}"
        out = out or self.e.fresh(name)
        self.e.node(op_type, inputs, [out], name, **attrs)
        return out

    def const(self, suffix: str, value) -> str:
        return self.e.constant(f"{self.node.name}.{suffix}", np.asarray(value, self.dtype))

    def ints(self, suffix: str, values) -> str:
        return self.e.constant(f"{self.node.name}.{suffix}", np.asarray(values, np.int64))

    def reduce_sum(self, x: str, axes, suffix: str, keepdims: bool = True, out=None) -> str:
        axes_name = self.ints(f"{suffix}_axes", list(axes))
        return self("ReduceSum", [x, axes_name], suffix, out, keepdims=int(keepdims))

    def normalized(self, x: str, axes, count: int, epsilon: float) -> tuple[str, str, str]:
        """x̂ = (x − mean) / sqrt(var + epsilon) over ``axes`` (``count`` values), its
        1/sqrt(var + epsilon), and the constant 1/count."""
        share = self.const("share", 1.0 / count)
        mean = self("Mul", [self.reduce_sum(x, axes, "sum"), share], "mean")
        centred = self("Sub", [x, mean], "centred")
        square = self("Mul", [centred, centred], "square")
        var = self("Mul", [self.reduce_sum(square, axes, "sum_square"), share], "var")
        shifted = self("Add", [var, self.const("epsilon", epsilon)], "shifted")
        invstd = self("Reciprocal", [self("Sqrt", [shifted], "std")], "invstd")
        return self("Mul", [centred, invstd], "xhat"), invstd, share

    def normalization_dx(self, g, xhat, invstd, share, axes, out=None) -> str:
        """invstd · (g − mean(g) − x̂ · mean(g · x̂)) over ``axes``."""
        mean_g = self("Mul", [self.reduce_sum(g, axes, "sum_g"), share], "mean_g")
        gx = self("Mul", [g, xhat], "gx")
        mean_gx = self("Mul", [self.reduce_sum(gx, axes, "sum_gx"), share], "mean_gx")
        centred = self("Sub", [g, mean_g], "g_centred")
        along = self("Mul", [xhat, mean_gx], "along")
        return self("Mul", [self("Sub", [centred, along], "dxhat"), invstd], "dx", out)


@emitter("layernorm_grad")
def _layernorm_grad(e: Emitter, node: Node) -> None:
    x, weight, dy = node.inputs
    dx, dweight, dbias = _names(node.outputs)
    axis, rank = node.attrs["axis"], x.type.rank
    step = _Steps(e, node)
    xhat, invstd, share = step.normalized(x.name, [axis], x.shape[axis], node.attrs["epsilon"])
    along_axis = step.ints("weight_shape", [-1, *(1,) * (rank - 1 - axis)])
    g = step("Mul", [dy.name, step("Reshape", [weight.name, along_axis], "weight")], "g")
    step.normalization_dx(g, xhat, invstd, share, [axis], out=dx)
    others = [a for a in range(rank) if a != axis]
    step.reduce_sum(step("Mul", [dy.name, xhat], "dy_xhat"), others, "dweight", False, dweight)
    step.reduce_sum(dy.name, others, "dbias", False, dbias)


@emitter("groupnorm_grad")
def _groupnorm_grad(e: Emitter, node: Node) -> None:
    x, weight, dy = node.inputs
    dx, dweight, dbias = _names(node.outputs)
    groups, rank = node.attrs["groups"], x.type.rank
    spatial = x.shape[2:]
    if not all(isinstance(d, int) for d in spatial):
        raise e.refuse(node, "a group norm's gradient at spatial sizes known only at run time")
    count = x.shape[1] // groups * int(np.prod(spatial, dtype=np.int64))
    step = _Steps(e, node)
    grouped = step.ints("grouped_shape", [0, groups, -1])
    shape = step("Shape", [x.name], "shape")
    xg = step("Reshape", [x.name, grouped], "grouped")
    xhat_g, invstd, share = step.normalized(xg, [2], count, node.attrs["epsilon"])
    xhat = step("Reshape", [xhat_g, shape], "xhat_map")
    per_channel = step.ints("weight_shape", [-1, *(1,) * (rank - 2)])
    g = step("Mul", [dy.name, step("Reshape", [weight.name, per_channel], "weight")], "g")
    g_grouped = step("Reshape", [g, grouped], "g_grouped")
    dxg = step.normalization_dx(g_grouped, xhat_g, invstd, share, [2])
    step("Reshape", [dxg, shape], "dx_map", dx)
    others = [0, *range(2, rank)]
    step.reduce_sum(step("Mul", [dy.name, xhat], "dy_xhat"), others, "dweight", False, dweight)
    step.reduce_sum(dy.name, others, "dbias", False, dbias)


@emitter("lrn_grad")
def _lrn_grad(e: Emitter, node: Node) -> None:
    # y = x · d^−β, d = k + α/size · S(x²), S the sum over channels c − before … c + after:
    # dx = dy · d^−β − 2αβ/size · x · S'(dy · x · d^−β / d), S' over c − after … c + before.
    x, dy = node.inputs
    a = node.attrs
    size, rank, channels = a["size"], x.type.rank, x.shape[1]
    before = (size - 1) // 2
    after = size - 1 - before
    step = _Steps(e, node)

    def window(t: str, lead: int, trail: int, suffix: str) -> str:
        pads = [0] * (2 * rank)
        pads[1], pads[rank + 1] = lead, trail
        padded = step("Pad", [t, step.ints(f"{suffix}_pads", pads)], f"{suffix}_padded")
        total = None
        for offset in range(lead + trail + 1):
            bounds = [
                step.ints(f"{suffix}_{offset}_{end}", [v])
                for end, v in (("start", offset), ("end", offset + channels), ("axis", 1))
            ]
            part = step("Slice", [padded, *bounds], f"{suffix}_{offset}")
            total = part if total is None else step("Add", [total, part], f"{suffix}_to{offset}")
        return total

    square = step("Mul", [x.name, x.name], "square")
    scaled = step(
        "Mul",
        [window(square, before, after, "sum"), step.const("alpha", a["alpha"] / size)],
        "scaled",
    )
    d = step("Add", [scaled, step.const("k", a["bias"])], "d")
    factor = step("Pow", [d, step.const("minus_beta", -a["beta"])], "factor")
    dyx = step("Mul", [dy.name, x.name], "dyx")
    t = step("Div", [step("Mul", [dyx, factor], "dyxf"), d], "t")
    spread = window(t, after, before, "spread")
    direct = step("Mul", [dy.name, factor], "direct")
    coupling = step(
        "Mul",
        [step("Mul", [x.name, spread], "xs"), step.const("c", 2 * a["alpha"] * a["beta"] / size)],
        "coupling",
    )
    step("Sub", [direct, coupling], "dx", node.output.name)


# ---- model ----------------------------------------------------------------------------------


def _value_info(
    v: Value,
    spatial: list | None = None,
    types: dict | None = None,
    info: onnx.ValueInfoProto | None = None,
) -> onnx.ValueInfoProto:
    """A value's type; ``spatial`` replaces its spatial sizes (symbols, or None for unknown).
    ``types`` remembers the TypeProto of each (dtype, shape): a network of 10,000 layers has
    a handful, and copying one costs a tenth of making it. ``info``, when given, is the
    (empty) ValueInfoProto to fill in, for example a new entry of a graph's value_info."""
    shape = list(v.type.shape)
    if spatial is not None and len(shape) > 2:
        shape[2:] = spatial[-(len(shape) - 2) :]
    if types is None:
        made = helper.make_tensor_value_info(v.name, _ELEM[v.type.dtype], shape)
        if info is None:
            return made
        info.CopyFrom(made)
        return info
    key = (v.type.dtype, tuple(shape))
    known = types.get(key)
    if known is None:
        known = types[key] = helper.make_tensor_value_info("", _ELEM[v.type.dtype], shape).type
    if info is None:
        info = onnx.ValueInfoProto()
    info.name = v.name
    info.type.CopyFrom(known)
    return info


def to_onnx(
    graph: Graph, opset: int = DEFAULT_OPSET, inline_functions: bool = False
) -> onnx.ModelProto:
    """The ONNX model of a graph (not yet checked: :func:`save` checks what it writes).

    Fused nodes become calls of model-local functions (domain ``cnnc``) whose bodies
    are standard ops, or with ``inline_functions`` those standard ops themselves. A
    fully convolutional graph gets symbolic spatial sizes on its input and output.
    """
    model, tensors = skeleton(graph, opset, inline_functions)
    model.graph.initializer.extend(t.proto() for t in tensors)
    return model


class Tensor:
    """An initializer whose data is computed when it is written: name, dtype and shape
    are known up front, so a file's lengths are too. ``pieces``, when given, returns
    the data in chunks that threads may compute at once (see :meth:`Value.data_pieces`)."""

    __slots__ = ("_compute", "_pieces", "dtype", "name", "nbytes", "shape")

    def __init__(
        self,
        name: str,
        dtype: np.dtype,
        shape: tuple,
        compute: Callable,
        pieces: Callable[[], list | None] | None = None,
    ):
        self.name, self.dtype, self.shape, self._compute = name, np.dtype(dtype), shape, compute
        self.nbytes = math.prod(self.shape) * self.dtype.itemsize
        self._pieces = pieces

    @classmethod
    def of_proto(cls, tensor: onnx.TensorProto) -> Tensor:
        array = numpy_helper.to_array(tensor)
        return cls(tensor.name, array.dtype, array.shape, lambda: array)

    def reshaped(self, shape: tuple, name: str | None = None) -> Tensor:
        """This tensor in another shape (the same values in order), under ``name``."""
        return Tensor(
            name or self.name,
            self.dtype,
            tuple(shape),
            lambda: np.asarray(self._compute()).reshape(shape),
            self._pieces,
        )

    def array(self) -> np.ndarray:
        """The data, little-endian and contiguous, as from_array writes it."""
        data = np.asarray(self._compute(), dtype=self.dtype.newbyteorder("<"), order="C")
        if data.shape != tuple(self.shape):
            raise InternalError(f"initializer {self.name}: data {data.shape}, type {self.shape}")
        return data

    def parts(self) -> list[tuple[int, Callable[[], np.ndarray]]]:
        """The data as consecutive flat little-endian pieces, each (its bytes, a function
        computing it); the pieces are independent, so threads may compute them at once."""
        if self.nbytes == 0:
            return []
        # A tensor below PARALLEL_BYTES is one piece that the writer computes.
        big = self._pieces is not None and self.nbytes >= PARALLEL_BYTES
        pieces = self._pieces() if big else None
        if pieces is None:
            return [(self.nbytes, lambda: self.array().reshape(-1))]
        little = self.dtype.newbyteorder("<")
        parts = [
            (n * self.dtype.itemsize, lambda fn=fn: np.asarray(fn(None), dtype=little))
            for n, fn in pieces
        ]
        if sum(n for n, _ in parts) != self.nbytes:
            raise InternalError(f"initializer {self.name}: its pieces are not its {self.shape}")
        return parts

    def header(self) -> onnx.TensorProto:
        """The TensorProto without its data."""
        proto = TensorProto(name=self.name, data_type=helper.np_dtype_to_tensor_dtype(self.dtype))
        proto.dims.extend(self.shape)
        return proto

    def proto(self) -> onnx.TensorProto:
        """The whole TensorProto: what numpy_helper.from_array makes of the data."""
        if self.dtype.kind not in "fiub":  # strings and the like: onnx's own conversion
            return numpy_helper.from_array(self.array(), self.name)
        proto = self.header()
        proto.raw_data = self.array().tobytes()
        return proto


def _param_tensor(p: Value) -> Tensor:
    return Tensor(p.name, p.type.numpy_dtype, tuple(p.type.shape), p.compute_data, p.data_pieces)


# Pieces of at least this many bytes are computed on the drawing threads, ahead of the
# writer (smaller ones cost less than a thread hand-off, about 20 µs, and are computed
# by the writer when it reaches them).
PARALLEL_BYTES = 1 << 18


def _write_tensor(f, pieces, name: str, nbytes: int) -> None:
    """Write the next ``nbytes`` of ``pieces`` (one tensor's data, piece by piece, each
    let go once written) to ``f``."""
    written = 0
    while written < nbytes:
        data = next(pieces)
        f.write(data.view(np.uint8))
        written += data.nbytes
        del data
    if written != nbytes:
        raise InternalError(f"initializer {name}: {written} bytes, not {nbytes}")


def _stream(tensors: list[Tensor]):
    """The data of ``tensors`` as their pieces, in order: a piece of ``PARALLEL_BYTES`` or
    more is computed on the drawing threads while the writer writes what comes before
    it, at most two per thread ahead (so at most that many pieces are in memory)."""
    from cnnc.weights import draw_threads

    pool, threads = draw_threads()
    units = [part for t in tensors for part in t.parts()]
    futures: dict[int, Any] = {}
    ahead = 2 * threads
    following = 0  # the next unit to consider handing to a thread
    for i, (nbytes, compute) in enumerate(units):
        following = max(following, i)
        while following < len(units) and len(futures) < ahead:
            if units[following][0] >= PARALLEL_BYTES and threads > 1:
                futures[following] = pool.submit(units[following][1])
            following += 1
        data = futures.pop(i).result() if i in futures else compute()
        if data.nbytes != nbytes:
            raise InternalError(f"a piece of {data.nbytes} bytes, not {nbytes}")
        yield data


# The IR version that first holds model-local functions (onnx.proto, IR_VERSION_2021_7_30).
FUNCTIONS_IR_VERSION = 8


def ir_version(opsets: list, functions: bool) -> int:
    """The IR version a model of these opsets is written in: the oldest that has them all,
    and from 8 (which added model-local functions) when the model defines functions. Opsets
    13 and 14 alone would say 7, where a reader may ignore the functions; onnx's checker does
    not notice."""
    version = helper.find_min_ir_version_for(opsets, ignore_unknown=True)
    return max(version, FUNCTIONS_IR_VERSION) if functions else version


def skeleton(
    graph: Graph, opset: int = DEFAULT_OPSET, inline_functions: bool = False
) -> tuple[onnx.ModelProto, list[Tensor]]:
    """The ONNX model of a graph without its initializers, and those initializers in
    order, each computed when it is asked for (see :func:`to_onnx`)."""
    check_opset(opset)
    e = Emitter(graph, opset, inline_functions)
    for node in graph.nodes:
        fn = EMITTERS.get(node.op)
        if fn is None:
            raise UsageError(f"node {node.name}: op {node.op} has no ONNX form", node.loc)
        e.current = node.name
        fn(e, node)
    tensors = e.finish([_param_tensor(p) for p in graph.params.values()])
    outputs = {id(v) for v in graph.outputs}
    flexible = graph.flexible_spatial
    one_d = graph.inputs[0].type.rank == 3
    sizes, out_sizes = (["L"], ["OL"]) if one_d else (["H", "W"], ["OH", "OW"])
    # What helper.make_graph and make_model would make, field by field, around the nodes
    # the emitter made in place (the same bytes, without copying the nodes twice).
    model = e.model
    onnx_graph = model.graph
    onnx_graph.name = graph.name
    onnx_graph.input.extend(_value_info(v, sizes if flexible else None) for v in graph.inputs)
    onnx_graph.output.extend(
        _value_info(
            v,
            None
            if not flexible
            else out_sizes
            if len(graph.outputs) == 1
            else [f"{d}{i}" for d in out_sizes],
        )
        for i, v in enumerate(graph.outputs)
    )
    types: dict = {}
    spatial = [None, None] if flexible else None
    value_info = onnx_graph.value_info
    for n in graph.nodes:
        for v in n.outputs:
            if id(v) not in outputs and v.name not in e.aliases:
                _value_info(v, spatial, types, value_info.add())
    opsets = [helper.make_opsetid("", opset)]
    if e.functions:
        opsets.append(helper.make_opsetid(FUNCTION_DOMAIN, 1))
    model.ir_version = ir_version(opsets, bool(e.functions))
    model.opset_import.extend(opsets)
    model.functions.extend(e.functions.values())
    model.producer_name = "cnnc"
    model.producer_version = __version__
    model.doc_string = f"network {graph.name}, compiled by cnnc {__version__} ({graph.opt_level})"
    props = {}
    if flexible:
        # The declared input is the smallest the network takes; importing needs its sizes.
        (x,) = graph.inputs
        props[MIN_INPUT_KEY] = "x".join(map(str, x.type.shape[1:]))
    # How an image becomes each input, as the program declared it (cnnc.preprocess).
    for name, normalization in graph.preprocess.items():
        props[preprocess.METADATA_PREFIX + name] = normalization.option_text()
    if props:
        helper.set_model_props(model, props)
    return model, tensors


def save(
    model: onnx.ModelProto, path: str | Path, external_threshold: int = EXTERNAL_DATA_THRESHOLD
) -> list[Path]:
    """Check a model and write it to ``path`` atomically; returns the files written
    (see :func:`write`)."""
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    bare.graph.ClearField("initializer")
    tensors = [Tensor.of_proto(t) for t in model.graph.initializer]
    return write(bare, tensors, path, external_threshold)


def export(
    graph: Graph,
    path: str | Path,
    opset: int = DEFAULT_OPSET,
    inline_functions: bool = False,
    external_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> list[Path]:
    """Check a graph's ONNX model and write it to ``path`` atomically, computing each
    weight as it is written and letting it go after: the model is never whole in
    memory. Returns the files written."""
    model, tensors = skeleton(graph, opset, inline_functions)
    return write(model, tensors, path, external_threshold)


# Tensors of fewer bytes stay in the model when the others go to external data (as onnx's
# save_model with size_threshold=1024) and in the model that the checker sees.
SMALL_TENSOR = 1024


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, length: int) -> bytes:
    """The key and length of a length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(length)


# Field numbers of onnx.proto: ModelProto.graph, GraphProto.initializer, TensorProto.raw_data.
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9


def _external(tensor: Tensor, location: str, offset: int) -> onnx.TensorProto:
    proto = tensor.header()
    proto.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", tensor.nbytes)):
        entry = proto.external_data.add()
        entry.key, entry.value = key, str(value)
    return proto


def _around(message, number: int) -> tuple[bytes, bytes]:
    """A message's serialized fields before and after field ``number`` (protobuf writes
    fields in the order of their numbers). Each field is copied once, and field
    ``number`` (a graph of 10,000 nodes) not at all."""
    before, after = type(message)(), type(message)()
    for fd, value in message.ListFields():
        if fd.number == number:
            continue
        part = before if fd.number < number else after
        repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED
        if repeated:
            getattr(part, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(part, fd.name).CopyFrom(value)
        else:
            setattr(part, fd.name, value)
    return before.SerializeToString(), after.SerializeToString()


def write_embedded(model: onnx.ModelProto, tensors: list, f) -> None:
    """Write ``model`` (whose graph has no initializers) with ``tensors`` as its graph's
    initializers to the binary file ``f``, one tensor at a time, computing each as it
    is written: the bytes of ``SerializeToString()`` of the whole model. A tensor is a
    :class:`Tensor` or a TensorProto."""
    if model.graph.initializer:
        raise InternalError("write_embedded takes a model without initializers")
    head, tail = _around(model, _MODEL_GRAPH)
    graph_head, graph_tail = _around(model.graph, _GRAPH_INITIALIZER)
    records = []
    for t in tensors:
        if isinstance(t, TensorProto):
            body = t.SerializeToString()
            records.append((None, _field(_GRAPH_INITIALIZER, len(body)) + body, 0))
            continue
        # TensorProto's fields dims, data_type and name come before raw_data.
        header = t.header().SerializeToString() + _field(_TENSOR_RAW_DATA, t.nbytes)
        key = _field(_GRAPH_INITIALIZER, len(header) + t.nbytes)
        records.append((t, key + header, t.nbytes))
    graph_length = len(graph_head) + len(graph_tail) + sum(len(r) + n for _, r, n in records)
    f.write(head)
    f.write(_field(_MODEL_GRAPH, graph_length))
    f.write(graph_head)
    pieces = _stream([t for t, _, _ in records if t is not None])
    for t, record, nbytes in records:
        f.write(record)
        _write_tensor(f, pieces, t.name if t is not None else "", nbytes)
    f.write(graph_tail)
    f.write(tail)


def write(
    model: onnx.ModelProto,
    tensors: list[Tensor],
    path: str | Path,
    external_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> list[Path]:
    """Check ``model`` (without initializers) with ``tensors`` as its initializers, then
    write it to ``path`` atomically; returns the files written.

    The checker (full_check) sees the model with its small tensors and the others as
    external data, so the weights are never all in memory; they are computed and
    written one at a time. Models whose weights exceed ``external_threshold`` bytes
    keep them in ``<path>.data`` beside the model (ONNX external data). Nothing is
    left behind if checking or writing fails.
    """
    from cnnc import output

    target = output.target(path)
    weight_bytes = sum(t.nbytes for t in tensors)
    external = weight_bytes > external_threshold
    if external and target.through:
        raise OutputError(
            f"a model of {weight_bytes / 1e9:.1f} GB of weights keeps them in a second file "
            f"beside it, which {target.name} cannot hold",
            target.shown,
            hint="write it to a regular file",
        )
    data_name = target.path.name + ".data" if external else None
    small = {id(t): t.proto() for t in tensors if t.nbytes < SMALL_TENSOR}
    workdir = output.staging_dir(target)
    try:
        # The checker reads a model from a file, its external data beside it.
        # The initializers join the model only while it is serialized (a copy of a model
        # of 10,000 nodes would cost more than the serializing).
        offset = 0
        initializers = model.graph.initializer
        try:
            for t in tensors:
                if id(t) in small:
                    initializers.append(small[id(t)])
                else:
                    initializers.append(_external(t, "check.data", offset))
                    offset += t.nbytes
            checked = model.SerializeToString()
        finally:
            del initializers[:]
        (workdir / "check.data").touch()
        (workdir / "check.onnx").write_bytes(checked)
        del checked
        try:
            onnx.checker.check_model(str(workdir / "check.onnx"), full_check=True)
        except onnx.checker.ValidationError as e:
            raise InternalError(
                f"the emitted model fails the ONNX checker: {e}", target.shown
            ) from None
        staged = workdir / "model.onnx"
        if data_name is None:
            with open(staged, "wb") as f:
                write_embedded(model, [small.get(id(t), t) for t in tensors], f)
        else:
            bare = onnx.ModelProto()
            bare.CopyFrom(model)
            offset = 0
            with open(workdir / data_name, "wb") as f:
                pieces = _stream([t for t in tensors if id(t) not in small])
                for t in tensors:
                    if id(t) in small:
                        bare.graph.initializer.append(small[id(t)])
                        continue
                    bare.graph.initializer.append(_external(t, data_name, offset))
                    _write_tensor(f, pieces, t.name, t.nbytes)
                    offset += t.nbytes
            onnx.save_model(bare, staged)
        written = [Path(path)]
        if data_name is not None:
            output.place(workdir / data_name, output.target(target.path.parent / data_name))
            written.append(target.path.parent / data_name)
        output.place(staged, target)
        return written
    except OSError as e:
        raise OutputError(f"cannot write: {e.strerror or e}", target.shown) from None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# The training ops' emitters register themselves in EMITTERS (imported last: they use this
# module's Emitter and emitter).
from cnnc.backends import train_export  # noqa: E402, F401
