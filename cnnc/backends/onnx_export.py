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
from onnx import TensorProto, helper, numpy_helper

from cnnc import __version__
from cnnc.errors import InternalError, UsageError
from cnnc.ir.graph import Graph, Node, Value

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

    def __init__(self, graph: Graph, opset: int):
        self.graph = graph
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def node(
        self, op_type: str, inputs: list[str], outputs: list[str], name: str, **attrs: Any
    ) -> None:
        """Add an ONNX node of the default domain."""
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, **attrs))

    def constant(self, name: str, array: np.ndarray) -> str:
        """Add an initializer that is not an IR parameter (for example Dropout's ratio)."""
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

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


@emitter("conv")
def _conv(e: Emitter, node: Node) -> None:
    attrs = _window_attrs(node, node.inputs[1].shape[2:])
    e.node(
        "Conv",
        _names(node.inputs),
        _names(node.outputs),
        node.name,
        group=node.attrs["groups"],
        **attrs,
    )


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


@emitter("softmax")
def _softmax(e: Emitter, node: Node) -> None:
    e.node("Softmax", _names(node.inputs), _names(node.outputs), node.name, axis=node.attrs["axis"])


@emitter("flatten")
def _flatten(e: Emitter, node: Node) -> None:
    e.node("Flatten", _names(node.inputs), _names(node.outputs), node.name, axis=1)


@emitter("dropout")
def _dropout(e: Emitter, node: Node) -> None:
    ratio = e.constant(f"{node.name}.ratio", np.array(node.attrs["ratio"], dtype=np.float32))
    e.node("Dropout", [node.inputs[0].name, ratio], _names(node.outputs), node.name)


for _op, _onnx in {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh"}.items():
    emitter(_op)(
        lambda e, node, t=_onnx: e.node(t, _names(node.inputs), _names(node.outputs), node.name)
    )


# ---- model ----------------------------------------------------------------------------------


def _value_info(v: Value) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(v.name, _ELEM[v.type.dtype], list(v.type.shape))


def to_onnx(graph: Graph, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """The ONNX model of a graph (not yet checked: :func:`save` checks what it writes)."""
    check_opset(opset)
    e = Emitter(graph, opset)
    for node in graph.nodes:
        fn = EMITTERS.get(node.op)
        if fn is None:
            raise UsageError(f"node {node.name}: op {node.op} has no ONNX form", node.loc)
        fn(e, node)
    initializers = [numpy_helper.from_array(p.data, p.name) for p in graph.params.values()]
    outputs = {id(v) for v in graph.outputs}
    value_info = [_value_info(v) for n in graph.nodes for v in n.outputs if id(v) not in outputs]
    onnx_graph = helper.make_graph(
        e.nodes,
        graph.name,
        [_value_info(v) for v in graph.inputs],
        [_value_info(v) for v in graph.outputs],
        initializer=initializers + e.initializers,
        value_info=value_info,
    )
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(
        onnx_graph,
        opset_imports=opsets,
        producer_name="cnnc",
        producer_version=__version__,
        ir_version=helper.find_min_ir_version_for(opsets),
        doc_string=f"network {graph.name}, compiled by cnnc {__version__} ({graph.opt_level})",
    )
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
