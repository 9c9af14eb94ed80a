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
from cnnc.ops.activation import fused_function_name

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


# IR activation ops and their ONNX ops; IR attributes keep ONNX's attribute names, except
# clip's bounds, which ONNX Clip takes as inputs.
ACTIVATION_OPS = {
    "relu": "Relu",
    "leaky_relu": "LeakyRelu",
    "clip": "Clip",
    "sigmoid": "Sigmoid",
    "tanh": "Tanh",
}
CLIP_BOUNDS = ("min", "max")
FUNCTION_DOMAIN = "cnnc"
MIN_INPUT_KEY = "cnnc.min_input_shape"
_CONV_ATTRS = {
    "kernel_shape": AttributeProto.INTS,
    "strides": AttributeProto.INTS,
    "pads": AttributeProto.INTS,
    "dilations": AttributeProto.INTS,
    "group": AttributeProto.INT,
}


def _activation(e: Emitter, op: str, attrs: dict[str, Any], x: str, y: str, name: str) -> None:
    """The ONNX node of an activation; clip's finite bounds become the scalar initializers
    ``<name>.min`` and ``<name>.max`` (an infinite one is left out: no bound)."""
    if op != "clip":
        e.node(ACTIVATION_OPS[op], [x], [y], name, **attrs)
        return
    bounds = [
        e.constant(f"{name}.{b}", np.array(attrs[b], dtype=np.float32))
        if np.isfinite(attrs[b])
        else ""
        for b in CLIP_BOUNDS
    ]
    while bounds and not bounds[-1]:
        bounds.pop()
    e.node("Clip", [x, *bounds], [y], name)


def _function_activation(activation: str, act_attrs: dict[str, Any]) -> list[onnx.NodeProto]:
    """The activation inside a fused function, reading its attributes from the call's: as
    attribute references, or for Clip, Constant nodes whose value refers to ``min``/``max``."""
    if activation != "clip":
        act = helper.make_node(ACTIVATION_OPS[activation], ["T"], ["Y"])
        act.attribute.extend(helper.make_attribute_ref(a, AttributeProto.FLOAT) for a in act_attrs)
        return [act]
    nodes = []
    for bound in CLIP_BOUNDS:
        value = helper.make_attribute_ref("value_float", AttributeProto.FLOAT)
        value.ref_attr_name = bound
        constant = helper.make_node("Constant", [], [bound])
        constant.attribute.append(value)
        nodes.append(constant)
    return [*nodes, helper.make_node("Clip", ["T", *CLIP_BOUNDS], ["Y"])]


def _fused_function(e: Emitter, activation: str, act_attrs: dict[str, Any]) -> str:
    """The model-local function Conv+activation: standard Conv and activation ops, whose
    attributes refer to the call's, so one function serves every such conv."""
    name = fused_function_name(activation)
    if name not in e.functions:
        conv = helper.make_node("Conv", ["X", "W", "B"], ["T"])
        conv.attribute.extend(helper.make_attribute_ref(a, t) for a, t in _CONV_ATTRS.items())
        e.functions[name] = helper.make_function(
            FUNCTION_DOMAIN,
            name,
            ["X", "W", "B"],
            ["Y"],
            [conv, *_function_activation(activation, act_attrs)],
            [helper.make_opsetid("", e.opset)],
            attributes=[*_CONV_ATTRS, *act_attrs],
            doc_string=f"Conv followed by {ACTIVATION_OPS[activation]} (cnnc fuse-conv-act)",
        )
    return name


@emitter("conv")
def _conv(e: Emitter, node: Node) -> None:
    attrs = {**_window_attrs(node, node.inputs[1].shape[2:]), "group": node.attrs["groups"]}
    inputs, outputs = _names(node.inputs), _names(node.outputs)
    activation = node.attrs.get("activation")
    if activation is None:
        e.node("Conv", inputs, outputs, node.name, **attrs)
        return
    act_attrs = node.attrs["activation_attrs"]
    if e.inline_functions:
        pre = f"{node.name}.preact"
        e.node("Conv", inputs, [pre], f"{node.name}.conv", **attrs)
        _activation(e, activation, act_attrs, pre, outputs[0], node.name)
        return
    attrs.setdefault("dilations", [1] * len(attrs["kernel_shape"]))
    function = _fused_function(e, activation, act_attrs)
    call_inputs = inputs if len(inputs) == 3 else [*inputs, ""]
    e.node(function, call_inputs, outputs, node.name, domain=FUNCTION_DOMAIN, **attrs, **act_attrs)


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


for _op in ACTIVATION_OPS:
    emitter(_op)(
        lambda e, node, op=_op: _activation(
            e, op, node.attrs, node.inputs[0].name, node.output.name, node.name
        )
    )


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
