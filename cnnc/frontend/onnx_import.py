"""ONNX model -> IR: initializers become parameters, ONNX attribute forms become IR attributes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.inliner
from google.protobuf.message import DecodeError
from onnx import helper, numpy_helper

from cnnc.errors import CnncError, ModelFileError
from cnnc.ir.graph import Graph, Value
from cnnc.ir.types import BATCH, TensorType, dtype_name
from cnnc.ops.activation import FUSIBLE, fused_function_name

_DTYPES = {onnx.TensorProto.FLOAT: "f32"}


class Importer:
    """State of one import: the graph being built and the ONNX names already translated."""

    def __init__(self, model: onnx.ModelProto, where: str):
        self.model = model
        self.where = where
        self.graph = Graph(model.graph.name or Path(where).stem)
        self.values: dict[str, Value] = {}
        self.constants: dict[str, np.ndarray] = {}
        self.min_input: tuple[int, ...] = ()  # declared sizes of a fully convolutional model

    def fail(
        self, node: onnx.NodeProto | None, message: str, hint: str | None = None
    ) -> ModelFileError:
        at = (
            f"{self.where}: node {node.name or node.output[0]} ({node.op_type})"
            if node
            else self.where
        )
        return ModelFileError(message, at, hint)

    def value(self, node: onnx.NodeProto, name: str) -> Value:
        if name in self.values:
            return self.values[name]
        if name in self.constants:
            return self.param(name, self.constants[name])
        raise self.fail(node, f"input {name!r} is not defined before this node")

    def param(self, name: str, array: np.ndarray) -> Value:
        """The parameter holding an initializer (made on first use)."""
        if name not in self.values:
            value = self.graph.add_param(
                self.graph.unique_name(name), array.shape, dtype=dtype_name(array.dtype)
            )
            value.set_data(array)
            self.values[name] = value
        return self.values[name]

    def constant(self, node: onnx.NodeProto, name: str) -> np.ndarray:
        if name not in self.constants:
            raise self.fail(node, f"input {name!r} must be a constant (an initializer)")
        return self.constants[name]

    def add(
        self,
        node: onnx.NodeProto,
        op: str,
        inputs: list[Value],
        attrs: dict[str, Any] | None = None,
    ) -> None:
        """Add the IR node for an ONNX node; its output keeps the ONNX output name."""
        base = node.name or node.output[0]
        try:
            ir = self.graph.add_node(
                op,
                inputs,
                attrs,
                name=self.graph.unique_name(base),
                output_names=[self.graph.unique_name(node.output[0])]
                if node.output[0] != base
                else None,
            )
        except CnncError as e:
            raise self.fail(node, e.message, e.hint) from None
        self.values[node.output[0]] = ir.output

    def alias(self, node: onnx.NodeProto, value: Value) -> None:
        self.values[node.output[0]] = value


IMPORTERS: dict[str, Callable[[Importer, onnx.NodeProto, dict[str, Any]], None]] = {}


def importer(*op_types: str):
    """Register how ONNX ops become IR nodes."""

    def register(fn):
        for t in op_types:
            IMPORTERS[t] = fn
        return fn

    return register


def _inputs(imp: Importer, node: onnx.NodeProto) -> list[Value]:
    return [imp.value(node, n) for n in node.input if n]


def _window(imp: Importer, node, attrs, kernel: tuple[int, ...]) -> dict[str, Any]:
    rank = len(kernel)
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise imp.fail(
            node,
            f"auto_pad={attrs['auto_pad']} is not supported yet",
            hint="export the model with explicit pads",
        )
    return {
        "stride": tuple(attrs.get("strides", (1,) * rank)),
        "pads": tuple(attrs.get("pads", (0,) * 2 * rank)),
        "dilation": tuple(attrs.get("dilations", (1,) * rank)),
    }


@importer("Conv")
def _conv(imp: Importer, node, attrs, fused: dict[str, Any] | None = None) -> None:
    inputs = _inputs(imp, node)
    kernel = tuple(inputs[1].shape[2:])
    ir = {**_window(imp, node, attrs, kernel), "groups": attrs.get("group", 1), **(fused or {})}
    imp.add(node, "conv", inputs, ir)


FUNCTION_DOMAIN = "cnnc"
MIN_INPUT_KEY = "cnnc.min_input_shape"
FUSED = {fused_function_name(act): act for act in FUSIBLE}


def _fused_conv(imp: Importer, node: onnx.NodeProto, activation: str) -> None:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    conv_attrs = {
        k: attrs.pop(k)
        for k in ("kernel_shape", "strides", "pads", "dilations", "group")
        if k in attrs
    }
    _conv(imp, node, conv_attrs, {"activation": activation, "activation_attrs": attrs})


@importer("Gemm")
def _gemm(imp: Importer, node, attrs) -> None:
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        raise imp.fail(node, "Gemm with transA, alpha or beta is not supported yet")
    weight = imp.constant(node, node.input[1])
    if not attrs.get("transB", 0):
        weight = np.ascontiguousarray(weight.T)  # IR fc weights are [out, in], as torch.nn.Linear
    x = imp.value(node, node.input[0])
    bias = [imp.value(node, node.input[2])] if len(node.input) > 2 and node.input[2] else []
    imp.add(node, "fc", [x, imp.param(node.input[1], weight), *bias])


@importer("MaxPool", "AveragePool")
def _pool(imp: Importer, node, attrs) -> None:
    kernel = tuple(attrs["kernel_shape"])
    ir = {
        **_window(imp, node, attrs, kernel),
        "kernel": kernel,
        "ceil": bool(attrs.get("ceil_mode", 0)),
    }
    if node.op_type == "AveragePool":
        ir["count_include_pad"] = bool(attrs.get("count_include_pad", 0))
    if len(node.output) > 1 and node.output[1]:
        raise imp.fail(node, "MaxPool's Indices output is not supported")
    imp.add(node, "maxpool" if node.op_type == "MaxPool" else "avgpool", _inputs(imp, node), ir)


@importer("GlobalAveragePool")
def _gap(imp: Importer, node, attrs) -> None:
    imp.add(node, "gap", _inputs(imp, node))


@importer("GlobalMaxPool")
def _global_maxpool(imp: Importer, node, attrs) -> None:
    imp.add(node, "global_maxpool", _inputs(imp, node))


@importer("Relu", "Sigmoid", "Tanh")
def _elementwise(imp: Importer, node, attrs) -> None:
    imp.add(node, node.op_type.lower(), _inputs(imp, node))


@importer("LeakyRelu")
def _leaky_relu(imp: Importer, node, attrs) -> None:
    imp.add(node, "leaky_relu", _inputs(imp, node), {"alpha": float(attrs.get("alpha", 0.01))})


@importer("Clip")
def _clip(imp: Importer, node, attrs) -> None:
    # Opset 11 made the bounds inputs; before, they were attributes. A missing one is no bound.
    bounds = {"min": -np.inf, "max": np.inf}
    for i, bound in enumerate(bounds, start=1):
        if bound in attrs:
            bounds[bound] = float(attrs[bound])
        elif len(node.input) > i and node.input[i]:
            value = imp.constant(node, node.input[i])
            if value.size != 1:
                raise imp.fail(node, f"Clip's {bound} must be a scalar, got shape {value.shape}")
            bounds[bound] = float(value.reshape(()))
    imp.add(node, "clip", [imp.value(node, node.input[0])], bounds)


@importer("LRN")
def _lrn(imp: Importer, node, attrs) -> None:
    ir = {
        "size": attrs["size"],
        "alpha": float(attrs.get("alpha", 1e-4)),
        "beta": float(attrs.get("beta", 0.75)),
        "bias": float(attrs.get("bias", 1.0)),
    }
    imp.add(node, "lrn", _inputs(imp, node), ir)


def _merged(imp: Importer, node: onnx.NodeProto) -> list[Value]:
    """The inputs of a merge, which must all be computed values: the IR adds and joins
    branches of the network, not constants."""
    inputs = _inputs(imp, node)
    for v in inputs:
        if v.is_param:
            raise imp.fail(
                node,
                f"input {v.name!r} is a constant; cnnc merges computed values only",
                hint="fold the constant into the layer before (a conv's bias, say)",
            )
    return inputs


@importer("Add", "Sum")
def _add(imp: Importer, node, attrs) -> None:
    inputs = _merged(imp, node)
    if len(inputs) == 1:
        imp.alias(node, inputs[0])
    else:
        imp.add(node, "add", inputs)


@importer("Concat")
def _concat(imp: Importer, node, attrs) -> None:
    inputs = _merged(imp, node)
    rank = inputs[0].type.rank
    if attrs["axis"] not in (1, 1 - rank):
        raise imp.fail(
            node,
            f"Concat along axis {attrs['axis']} of a rank-{rank} tensor is not supported: "
            "cnnc joins channels only (axis 1)",
        )
    if len(inputs) == 1:
        imp.alias(node, inputs[0])
    else:
        imp.add(node, "concat", inputs)


@importer("Constant")
def _constant(imp: Importer, node, attrs) -> None:
    # Exporters write small constants (Clip's bounds, say) as nodes rather than initializers.
    kinds = {
        "value": numpy_helper.to_array,
        "value_float": lambda v: np.array(v, dtype=np.float32),
        "value_floats": lambda v: np.array(v, dtype=np.float32),
        "value_int": lambda v: np.array(v, dtype=np.int64),
        "value_ints": lambda v: np.array(v, dtype=np.int64),
    }
    ((kind, value),) = attrs.items()
    if kind not in kinds:
        raise imp.fail(node, f"a Constant given by {kind} is not supported")
    imp.constants[node.output[0]] = kinds[kind](value)


@importer("Softmax")
def _softmax(imp: Importer, node, attrs) -> None:
    imp.add(node, "softmax", _inputs(imp, node), {"axis": attrs.get("axis", -1)})


@importer("Flatten")
def _flatten(imp: Importer, node, attrs) -> None:
    if attrs.get("axis", 1) != 1:
        raise imp.fail(node, f"Flatten with axis={attrs['axis']} is not supported (only axis=1)")
    imp.add(node, "flatten", _inputs(imp, node))


@importer("BatchNormalization")
def _bn(imp: Importer, node, attrs) -> None:
    if attrs.get("training_mode", 0) or len(node.output) > 1:
        raise imp.fail(node, "BatchNormalization in training mode is not supported")
    imp.add(node, "bn", _inputs(imp, node), {"epsilon": float(attrs.get("epsilon", 1e-5))})


@importer("Dropout")
def _dropout(imp: Importer, node, attrs) -> None:
    ratio = (
        float(imp.constant(node, node.input[1])) if len(node.input) > 1 and node.input[1] else 0.5
    )
    imp.add(node, "dropout", [imp.value(node, node.input[0])], {"ratio": ratio})


# ---- the model ------------------------------------------------------------------------------


def _read(path: Path) -> onnx.ModelProto:
    try:
        model = onnx.load(str(path))
    except FileNotFoundError:
        raise ModelFileError("model file not found", str(path)) from None
    except (DecodeError, OSError, ValueError, RuntimeError) as e:
        raise ModelFileError(
            f"not a readable ONNX model ({e.__class__.__name__}: {e})", str(path)
        ) from None
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFileError(f"the model fails the ONNX checker: {first}", str(path)) from None
    return model


def _input_type(imp: Importer, vi: onnx.ValueInfoProto) -> TensorType:
    t = vi.type.tensor_type
    if t.elem_type not in _DTYPES:
        raise imp.fail(
            None,
            f"input {vi.name} has element type "
            f"{onnx.TensorProto.DataType.Name(t.elem_type)}; only float is supported",
        )
    dims: list = [BATCH]
    for i, d in enumerate(t.shape.dim[1:], start=1):
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif i - 1 < len(imp.min_input):
            dims.append(imp.min_input[i - 1])
        else:
            raise imp.fail(
                None,
                f"input {vi.name} has a symbolic size {d.dim_param or '?'} at axis {i}; "
                "cnnc needs every size but the batch",
                hint="export the model with a fixed input size",
            )
    return TensorType(_DTYPES[t.elem_type], tuple(dims))


def load_onnx(path: str | Path) -> Graph:
    """Import an ONNX model file into a verified IR graph."""
    from cnnc.ir.verify import verify

    path = Path(path)
    model = _read(path)
    # Other producers' model-local functions are their bodies; cnnc's own fused
    # Conv+activation functions become fused convs again.
    others = [(f.domain, f.name) for f in model.functions if f.domain != FUNCTION_DOMAIN]
    if others:
        model = onnx.inliner.inline_selected_functions(model, others)
    imp = Importer(model, str(path))
    props = {p.key: p.value for p in model.metadata_props}
    if MIN_INPUT_KEY in props:
        imp.min_input = tuple(int(d) for d in props[MIN_INPUT_KEY].split("x"))
        imp.graph.flexible_spatial = True
    g = model.graph
    for init in g.initializer:
        imp.constants[init.name] = numpy_helper.to_array(init, base_dir=str(path.parent))
    for vi in g.input:
        if vi.name not in imp.constants:
            imp.values[vi.name] = imp.graph.add_input(vi.name, _input_type(imp, vi))
    for node in g.node:
        if node.domain == FUNCTION_DOMAIN and node.op_type in FUSED:
            _fused_conv(imp, node, FUSED[node.op_type])
            continue
        fn = IMPORTERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if fn is None:
            raise imp.fail(
                node,
                f"op {node.domain + '.' if node.domain else ''}{node.op_type} is not supported",
                hint="supported ops: " + ", ".join(sorted(IMPORTERS)),
            )
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        fn(imp, node, attrs)
    imp.graph.outputs = [imp.value(None, o.name) for o in g.output]
    imp.graph.opt_level = "imported"
    verify(imp.graph)
    return imp.graph
