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
from cnnc.frontend import onnx_names, onnx_patterns
from cnnc.ir.graph import Graph, Value
from cnnc.ir.types import BATCH, TensorType, dtype_name
from cnnc.ops.activation import FUNCTION_NAMES

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
        self.consumers: dict[str, int] = {}  # how many nodes read each ONNX name
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)

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


def _window(imp: Importer, node, attrs, kernel: tuple[int, ...], x: Value) -> dict[str, Any]:
    """Stride, pads and dilation of a Conv or pool; auto_pad becomes explicit pads."""
    rank = len(kernel)
    stride = tuple(attrs.get("strides", (1,) * rank))
    dilation = tuple(attrs.get("dilations", (1,) * rank))
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("NOTSET", ""):
        pads = tuple(attrs.get("pads", (0,) * 2 * rank))
    elif auto_pad == "VALID":
        pads = (0,) * 2 * rank
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for size, k, s_, d in zip(x.type.spatial, kernel, stride, dilation, strict=True):
            out = -(-int(size) // s_)
            total = max((out - 1) * s_ + d * (k - 1) + 1 - int(size), 0)
            small, large = total // 2, total - total // 2
            begins.append(small if auto_pad == "SAME_UPPER" else large)
            ends.append(large if auto_pad == "SAME_UPPER" else small)
        pads = (*begins, *ends)
    else:
        raise imp.fail(node, f"auto_pad={auto_pad} is not an ONNX padding mode")
    return {"stride": stride, "pads": pads, "dilation": dilation}


@importer("Conv")
def _conv(imp: Importer, node, attrs, fused: dict[str, Any] | None = None) -> None:
    inputs = _inputs(imp, node)
    if not all(v.is_param for v in inputs[1:]):
        raise imp.fail(
            node,
            "a Conv whose weights are computed is not supported",
            hint="cnnc convolutions have constant weights (initializers)",
        )
    kernel = tuple(inputs[1].shape[2:])
    window = _window(imp, node, attrs, kernel, inputs[0])
    ir = {**window, "groups": attrs.get("group", 1), **(fused or {})}
    imp.add(node, "conv", inputs, ir)


FUNCTION_DOMAIN = "cnnc"
MIN_INPUT_KEY = "cnnc.min_input_shape"

# cnnc's own model-local functions (domain cnnc), by name: how each call becomes IR. A
# function of another name, or of another domain, is inlined (its body imported).
FUNCTIONS: dict[str, Callable[[Importer, onnx.NodeProto, dict[str, Any]], None]] = {}


def _decoded(attrs: dict[str, Any]) -> dict[str, Any]:
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}


def _activation_function(op: str, fixed: dict[str, Any]):
    def build(imp: Importer, node, attrs) -> None:
        ir = {**fixed, **{k: float(v) for k, v in attrs.items()}}
        imp.add(node, op, [imp.value(node, node.input[0])], ir)

    return build


def _fused_function(activation: str, fixed: dict[str, Any]):
    def build(imp: Importer, node, attrs) -> None:
        conv_attrs = {
            k: attrs.pop(k)
            for k in ("kernel_shape", "strides", "pads", "dilations", "group")
            if k in attrs
        }
        act_attrs = {**fixed, **{k: float(v) for k, v in attrs.items()}}
        fused = {"activation": activation, "activation_attrs": act_attrs}
        _conv(imp, node, conv_attrs, fused)

    return build


for _name, (_op, _fixed) in FUNCTION_NAMES.items():
    FUNCTIONS[_name] = _activation_function(_op, _fixed)
    FUNCTIONS["Conv" + _name] = _fused_function(_op, _fixed)


@importer("Gemm")
def _gemm(imp: Importer, node, attrs) -> None:
    """Gemm(A, B, C) = alpha·A·B + beta·C with a constant B: an fc layer, alpha and beta
    folded into its weight and bias."""
    if attrs.get("transA", 0):
        raise imp.fail(node, "Gemm with transA=1 is not supported (the input must be N×F)")
    if node.input[1] not in imp.constants:
        raise imp.fail(node, "a Gemm whose weights are computed is not supported")
    weight = imp.constants[node.input[1]].astype(np.float32)
    if not attrs.get("transB", 0):
        weight = weight.T  # IR fc weights are [out, in], as torch.nn.Linear
    weight = np.ascontiguousarray(weight * np.float32(attrs.get("alpha", 1.0)))
    x = imp.value(node, node.input[0])
    inputs = [x, imp.param(f"{node.input[1]}.fc", weight)]
    if len(node.input) > 2 and node.input[2]:
        if node.input[2] not in imp.constants:
            raise imp.fail(node, "a Gemm whose C input is computed is not supported")
        c = imp.constants[node.input[2]].astype(np.float32) * np.float32(attrs.get("beta", 1.0))
        try:
            bias = np.broadcast_to(
                c.reshape(-1) if c.ndim == 2 and c.shape[0] == 1 else c, (weight.shape[0],)
            )
        except ValueError:
            raise imp.fail(
                node, f"Gemm's C of shape {c.shape} is not one bias per output"
            ) from None
        inputs.append(imp.param(f"{node.input[2]}.fc", np.ascontiguousarray(bias)))
    imp.add(node, "fc", inputs)


@importer("MatMul")
def _matmul(imp: Importer, node, attrs) -> None:
    """x·W with a constant W [F, K] is an fc layer without bias (an Add after it becomes
    its bias)."""
    if node.input[1] not in imp.constants or imp.constants[node.input[1]].ndim != 2:
        raise imp.fail(node, "only MatMul by a constant matrix (an fc layer) is supported")
    weight = np.ascontiguousarray(imp.constants[node.input[1]].astype(np.float32).T)
    x = imp.value(node, node.input[0])
    imp.add(node, "fc", [x, imp.param(f"{node.input[1]}.fc", weight)])


@importer("MaxPool", "AveragePool")
def _pool(imp: Importer, node, attrs) -> None:
    kernel = tuple(attrs["kernel_shape"])
    ir = {
        **_window(imp, node, attrs, kernel, imp.value(node, node.input[0])),
        "kernel": kernel,
        "ceil": bool(attrs.get("ceil_mode", 0)),
    }
    if attrs.get("storage_order", 0):
        raise imp.fail(node, "MaxPool with storage_order=1 is not supported")
    if node.op_type == "AveragePool":
        ir["count_include_pad"] = bool(attrs.get("count_include_pad", 0))
    if len(node.output) > 1 and node.output[1]:
        raise imp.fail(node, "MaxPool's Indices output is not supported")
    imp.add(node, "maxpool" if node.op_type == "MaxPool" else "avgpool", _inputs(imp, node), ir)


@importer("GlobalAveragePool")
def _gap(imp: Importer, node, attrs) -> None:
    imp.add(node, "gap", _inputs(imp, node))


@importer("ReduceMean", "ReduceMax")
def _reduce(imp: Importer, node, attrs) -> None:
    """The mean or maximum over every spatial axis is gap or global_maxpool (followed by a
    flatten when the reduced axes are dropped): how the dynamo exporter writes
    AdaptiveAvgPool2d(1) and torch.mean(x, (2, 3))."""
    x = imp.value(node, node.input[0])
    axes = attrs.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = imp.constant(node, node.input[1]).reshape(-1).tolist()
    rank = x.type.rank
    spatial = sorted(a + rank if a < 0 else a for a in (axes or range(rank)))
    op = "gap" if node.op_type == "ReduceMean" else "global_maxpool"
    if rank < 3 or spatial != list(range(2, rank)):
        raise imp.fail(
            node,
            f"{node.op_type} over axes {list(axes) if axes is not None else 'all'} of {x.type} "
            f"is not supported: cnnc reduces over every spatial axis ({op})",
        )
    if attrs.get("keepdims", 1):
        imp.add(node, op, [x])
        return
    pooled = imp.graph.add_node(
        op, [x], name=imp.graph.unique_name(f"{node.name or node.output[0]}.pool")
    ).output
    imp.add(node, "flatten", [pooled])


@importer("GlobalMaxPool")
def _global_maxpool(imp: Importer, node, attrs) -> None:
    imp.add(node, "global_maxpool", _inputs(imp, node))


@importer("Relu", "Sigmoid", "Tanh", "HardSwish", "Mish", "Softplus")
def _elementwise(imp: Importer, node, attrs) -> None:
    attrs = {"beta": 1.0} if node.op_type == "Softplus" else {}
    imp.add(node, node.op_type.lower(), _inputs(imp, node), attrs)


@importer("HardSigmoid")
def _hardsigmoid(imp: Importer, node, attrs) -> None:
    # ONNX's defaults (0.2, 0.5) are Keras's; PyTorch's Hardsigmoid exports alpha=1/6.
    ir = {"alpha": float(attrs.get("alpha", 0.2)), "beta": float(attrs.get("beta", 0.5))}
    imp.add(node, "hardsigmoid", _inputs(imp, node), ir)


@importer("Elu")
def _elu(imp: Importer, node, attrs) -> None:
    imp.add(node, "elu", _inputs(imp, node), {"alpha": float(attrs.get("alpha", 1.0))})


@importer("Gelu")
def _gelu(imp: Importer, node, attrs) -> None:
    approximate = _decoded(attrs).get("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise imp.fail(node, f"Gelu with approximate={approximate!r} is not an ONNX Gelu")
    imp.add(node, "gelu", _inputs(imp, node), {"approximate": approximate})


@importer("PRelu")
def _prelu(imp: Importer, node, attrs) -> None:
    x = imp.value(node, node.input[0])
    if node.input[1] not in imp.constants:
        raise imp.fail(node, "a PRelu whose slopes are computed is not supported")
    slope = imp.constants[node.input[1]].astype(np.float32)
    vector = slope.reshape(1) if slope.size == 1 else _per_channel(imp, node, slope, x)
    channels, last = x.type.shape[1], x.type.shape[-1]
    if vector is None and slope.shape == (channels,) and last not in (channels, 1):
        # PyTorch's TorchScript exporter wrote a per-channel slope as [C], which ONNX's
        # broadcasting would not even accept against N×C×...×W: it meant one per channel.
        vector = slope
    if vector is None:
        raise imp.fail(
            node, f"PRelu slopes of shape {slope.shape} are not one value or one per channel"
        )
    name = node.input[1] if slope.ndim == 1 else f"{node.input[1]}.slopes"
    imp.add(node, "prelu", [x, imp.param(name, np.ascontiguousarray(vector))])


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
    """The inputs of a concat, which must all be computed values: the IR joins branches
    of the network, not constants."""
    inputs = _inputs(imp, node)
    for v in inputs:
        if v.is_param:
            raise imp.fail(
                node,
                f"input {v.name!r} is a constant; cnnc merges computed values only",
                hint="fold the constant into the layer before (a conv's bias, say)",
            )
    return inputs


def _per_channel(imp: Importer, node, c: np.ndarray, x: Value) -> np.ndarray | None:
    """A constant that broadcasts against ``x`` as one value per channel (axis 1), as a
    vector; None if it does not."""
    rank, channels = x.type.rank, x.type.shape[1]
    if c.size == 1:
        return np.full(channels, c.reshape(()), np.float32)
    shape = list(c.shape)
    while len(shape) > rank - 1 and shape[0] == 1:
        shape.pop(0)
    if len(shape) == rank - 1 and shape[0] == channels and all(d == 1 for d in shape[1:]):
        return c.reshape(channels).astype(np.float32)
    return None


def _affine(imp: Importer, node, x: Value, scale: np.ndarray | None, shift: np.ndarray | None):
    channels = x.type.shape[1]
    scale = np.ones(channels, np.float32) if scale is None else scale
    shift = np.zeros(channels, np.float32) if shift is None else shift
    name = node.name or node.output[0]
    imp.add(
        node, "affine", [x, imp.param(f"{name}.scale", scale), imp.param(f"{name}.shift", shift)]
    )


@importer("Add", "Sum", "Sub", "Mul", "Div")
def _arithmetic(imp: Importer, node, attrs) -> None:
    """Add, Sum, Sub, Mul and Div of computed values that broadcast are the IR's element-wise
    ops; Add, Sub, Mul and Div by a per-channel constant are an affine; Add of a bias after a
    MatMul is that fc's bias."""
    names = [n for n in node.input if n]
    constant = [n for n in names if n in imp.constants]
    computed = [n for n in names if n not in imp.constants]
    if not constant:
        inputs = [imp.value(node, n) for n in computed]
        if len(inputs) == 1:
            imp.alias(node, inputs[0])
        else:
            imp.add(node, "add" if node.op_type == "Sum" else node.op_type.lower(), inputs)
        return
    if (
        len(names) != 2
        or len(computed) != 1
        or (node.op_type in ("Sub", "Div") and names[0] in imp.constants)
    ):
        raise imp.fail(
            node,
            f"{node.op_type} is supported between computed values that broadcast, or of a "
            "computed value and a per-channel constant",
        )
    x = imp.value(node, computed[0])
    c = imp.constants[constant[0]].astype(np.float32)
    if node.op_type == "Add" and _absorbs_bias(imp, x, c):
        return _fc_bias(imp, node, x, c)
    vector = _per_channel(imp, node, c, x)
    if vector is None:
        raise imp.fail(
            node,
            f"{node.op_type} by a constant of shape {c.shape} is not one value "
            f"per channel of {x.type}",
        )
    if node.op_type == "Add":
        _affine(imp, node, x, None, vector)
    elif node.op_type == "Sub":
        _affine(imp, node, x, None, -vector)
    elif node.op_type == "Mul":
        _affine(imp, node, x, vector, None)
    else:
        _affine(imp, node, x, 1 / vector, None)


def _absorbs_bias(imp: Importer, x: Value, c: np.ndarray) -> bool:
    fc = x.producer
    return (
        fc is not None
        and fc.op == "fc"
        and len(fc.inputs) == 2
        and imp.consumers.get(x.name, 0) == 1
        and c.size == fc.output.shape[1]
        and c.squeeze().ndim <= 1
    )


def _fc_bias(imp: Importer, node, x: Value, c: np.ndarray) -> None:
    fc = x.producer
    name = node.name or node.output[0]
    bias = imp.param(f"{name}.bias", np.ascontiguousarray(c.reshape(-1)))
    new = imp.graph.replace_node(fc, "fc", [*fc.inputs, bias], fc.attrs)
    imp.alias(node, new.output)


@importer("Concat")
def _concat(imp: Importer, node, attrs) -> None:
    inputs = _merged(imp, node)
    rank = inputs[0].type.rank
    if rank < 2 or attrs["axis"] not in (1, 1 - rank):
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
    (x,) = _inputs(imp, node)
    opset = imp.opset
    axis = attrs.get("axis", -1 if opset >= 13 else 1)
    axis = axis + x.type.rank if axis < 0 else axis
    # Before opset 13 Softmax normalised over all the axes from ``axis`` on: the same as
    # over ``axis`` only if the axes after it have size 1.
    if opset < 13 and any(d != 1 for d in x.type.shape[axis + 1 :]):
        raise imp.fail(
            node,
            f"Softmax (opset {opset}) over the axes {axis}.. of {x.type} is not "
            "supported: cnnc normalises over one axis",
        )
    imp.add(node, "softmax", [x], {"axis": axis})


@importer("BatchNormalization")
def _bn(imp: Importer, node, attrs) -> None:
    outputs = [o for o in node.output[1:] if o and imp.consumers.get(o, 0)]
    if attrs.get("training_mode", 0) or outputs:
        raise imp.fail(node, "BatchNormalization in training mode is not supported")
    if not attrs.get("spatial", 1):
        raise imp.fail(node, "BatchNormalization with spatial=0 is not supported")
    imp.add(node, "bn", _inputs(imp, node), {"epsilon": float(attrs.get("epsilon", 1e-5))})


@importer("Dropout")
def _dropout(imp: Importer, node, attrs) -> None:
    if len(node.input) > 2 and node.input[2] and imp.constants.get(node.input[2], False):
        raise imp.fail(node, "Dropout in training mode is not supported")
    if len(node.output) > 1 and node.output[1] and imp.consumers.get(node.output[1], 0):
        raise imp.fail(node, "Dropout's mask output is not supported")
    ratio = attrs.get("ratio", 0.5)  # an attribute before opset 12, an input after
    if len(node.input) > 1 and node.input[1]:
        ratio = float(imp.constant(node, node.input[1]))
    imp.add(node, "dropout", [imp.value(node, node.input[0])], {"ratio": float(ratio)})


@importer("Identity")
def _identity(imp: Importer, node, attrs) -> None:
    imp.alias(node, imp.value(node, node.input[0]))


def _reshape_to(imp: Importer, node, x: Value, shape: tuple[int, ...]) -> None:
    """Reshape ``x`` to a full shape: flatten, reshape of the axes after the batch, or an error."""
    if shape[0] != x.type.shape[0]:
        raise imp.fail(
            node,
            f"reshaping {x.type} to {list(shape)} moves the batch axis: cnnc "
            "keeps the first axis as it is",
        )
    if len(shape) == 2 and x.type.rank > 2:
        imp.add(node, "flatten", [x])
    elif shape == x.type.shape:
        imp.alias(node, x)
    else:
        imp.add(node, "reshape", [x], {"shape": tuple(int(d) for d in shape[1:])})


@importer("Reshape")
def _reshape(imp: Importer, node, attrs) -> None:
    x = imp.value(node, node.input[0])
    target = [int(d) for d in imp.constant(node, node.input[1]).reshape(-1)]
    if attrs.get("allowzero", 0) and 0 in target:
        raise imp.fail(node, "Reshape with allowzero=1 and a zero size is not supported")
    dims = list(x.type.shape)
    # ONNX: 0 copies the input's size on that axis, -1 takes what is left.
    shape = [dims[i] if d == 0 else d for i, d in enumerate(target)]
    if shape.count(-1) > 1:
        raise imp.fail(node, "Reshape with more than one -1 is not valid ONNX")
    if -1 in shape:
        batch = dims[0]
        if not isinstance(batch, int):
            # A symbolic batch: -1 can only stand for it, or for the rest of an item.
            if shape[0] == -1:
                shape[0] = batch
            else:
                per_item = int(np.prod(dims[1:]))
                known = int(np.prod([d for d in shape[1:] if d != -1]))
                shape = [per_item // known if d == -1 else d for d in shape]
        else:
            total = int(np.prod(dims))
            known = int(np.prod([d for d in shape if d != -1]))
            shape = [total // known if d == -1 else d for d in shape]
    _reshape_to(imp, node, x, tuple(shape))


@importer("Flatten")
def _flatten(imp: Importer, node, attrs) -> None:
    x = imp.value(node, node.input[0])
    axis = attrs.get("axis", 1)
    if axis != 1:
        raise imp.fail(
            node,
            f"Flatten with axis={axis} is not supported: cnnc flattens after "
            "the batch axis (axis=1)",
        )
    imp.add(node, "flatten", [x])


@importer("Unsqueeze", "Squeeze")
def _squeeze(imp: Importer, node, attrs) -> None:
    x = imp.value(node, node.input[0])
    axes = attrs.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = imp.constant(node, node.input[1]).reshape(-1).tolist()
    rank = x.type.rank
    dims = list(x.type.shape)
    if node.op_type == "Unsqueeze":
        out_rank = rank + len(axes)
        for a in sorted(a + out_rank if a < 0 else a for a in axes):
            dims.insert(a, 1)
    else:
        if axes is None:
            axes = [i for i, d in enumerate(dims) if d == 1 and i > 0]
        drop = {a + rank if a < 0 else a for a in axes}
        dims = [d for i, d in enumerate(dims) if i not in drop]
    _reshape_to(imp, node, x, tuple(dims))


@importer("Transpose")
def _transpose(imp: Importer, node, attrs) -> None:
    x = imp.value(node, node.input[0])
    perm = tuple(attrs.get("perm", range(x.type.rank - 1, -1, -1)))
    if perm[0] != 0:
        raise imp.fail(
            node,
            f"Transpose with perm={list(perm)} moves the batch axis: cnnc "
            "keeps the first axis first",
        )
    imp.add(node, "transpose", [x], {"perm": perm})


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
    return _check(model, str(path))


def _check(model: onnx.ModelProto, where: str) -> onnx.ModelProto:
    if not model.graph.node and not model.graph.output:
        raise ModelFileError("not an ONNX model: it has no graph", where)
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFileError(f"the model fails the ONNX checker: {first}", where) from None
    return model


def _input_type(imp: Importer, vi: onnx.ValueInfoProto) -> TensorType:
    t = vi.type.tensor_type
    if t.elem_type not in _DTYPES:
        raise imp.fail(
            None,
            f"input {vi.name} has element type "
            f"{onnx.TensorProto.DataType.Name(t.elem_type)}; only float is supported",
        )
    dims: list = []
    for i, d in enumerate(t.shape.dim):
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif i == 0:
            dims.append(BATCH)
        elif i - 1 < len(imp.min_input):
            dims.append(imp.min_input[i - 1])
        else:
            raise imp.fail(
                None,
                f"input {vi.name} has a symbolic size {d.dim_param or '?'} at axis {i}; "
                "cnnc needs every size but the batch",
                hint="export the model with a fixed input size",
            )
    if not dims:
        raise imp.fail(None, f"input {vi.name} is a scalar; cnnc takes tensors with a batch axis")
    return TensorType(_DTYPES[t.elem_type], tuple(dims))


def _fold(imp: Importer, node: onnx.NodeProto) -> None:
    """Compute a node whose inputs are all constants (weights built by ConstantOfShape,
    Unsqueeze, Mul, ...) at import, with onnx.reference."""
    from onnx.reference import ReferenceEvaluator

    feeds = {n: imp.constants[n] for n in node.input if n}
    inputs = [
        helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
        for n, a in feeds.items()
    ]
    outputs = [helper.make_value_info(o, onnx.TypeProto()) for o in node.output if o]
    graph = helper.make_graph([node], "fold", inputs, outputs)
    model = helper.make_model(graph, opset_imports=list(imp.model.opset_import))
    try:
        results = ReferenceEvaluator(model).run(None, feeds)
    except Exception as e:  # whatever the reference raises, the node cannot be computed
        raise imp.fail(node, f"cannot compute this constant node: {e}") from None
    for name, value in zip([o for o in node.output if o], results, strict=True):
        imp.constants[name] = np.asarray(value)


def _noting_origins(graph: Graph, nodes: list[onnx.NodeProto], origins: dict[str, onnx.NodeProto]):
    """The ONNX nodes to import, one by one; the IR nodes added while one was imported are
    noted as coming from it (by name)."""
    for node in nodes:
        start = len(graph.nodes)
        yield node
        for new in graph.nodes[start:]:
            origins.setdefault(new.name, node)


def load_onnx(source: str | Path | onnx.ModelProto, where: str | None = None) -> Graph:
    """Import an ONNX model (a file, or a ModelProto) into a verified IR graph."""
    from cnnc.ir.verify import verify

    if isinstance(source, onnx.ModelProto):
        model, base_dir = _check(source, where or "<model>"), None
        where = where or "<model>"
    else:
        path = Path(source)
        model, base_dir, where = _read(path), str(path.parent), str(path)
    # Other producers' model-local functions are their bodies; cnnc's own functions (fused
    # convs, activations ONNX has no op for) become IR ops again.
    others = [
        (f.domain, f.name)
        for f in model.functions
        if f.domain != FUNCTION_DOMAIN or f.name not in FUNCTIONS
    ]
    if others:
        model = onnx.inliner.inline_selected_functions(model, others)
    imp = Importer(model, where)
    props = {p.key: p.value for p in model.metadata_props}
    if MIN_INPUT_KEY in props:
        imp.min_input = tuple(int(d) for d in props[MIN_INPUT_KEY].split("x"))
        imp.graph.flexible_spatial = True
    g = model.graph
    for init in g.initializer:
        imp.constants[init.name] = numpy_helper.to_array(init, base_dir=base_dir or "")
    nodes = onnx_patterns.rewrite(g, imp.constants)
    for name in [n for node in nodes for n in node.input] + [o.name for o in g.output]:
        imp.consumers[name] = imp.consumers.get(name, 0) + 1
    for vi in g.input:
        if vi.name not in imp.constants:
            imp.values[vi.name] = imp.graph.add_input(vi.name, _input_type(imp, vi))
    origins: dict[str, onnx.NodeProto] = {}  # IR node name -> the ONNX node it came from
    for node in _noting_origins(imp.graph, nodes, origins):
        if node.domain == FUNCTION_DOMAIN and node.op_type in FUNCTIONS:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            FUNCTIONS[node.op_type](imp, node, _decoded(attrs))
            continue
        fn = IMPORTERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if node.op_type == "Constant" and fn is not None:
            fn(imp, node, {a.name: helper.get_attribute_value(a) for a in node.attribute})
            continue
        if node.domain in ("", "ai.onnx") and all(n in imp.constants for n in node.input if n):
            _fold(imp, node)
            continue
        if fn is None:
            raise imp.fail(
                node,
                f"op {node.domain + '.' if node.domain else ''}{node.op_type} is not supported",
                hint="supported ops: " + ", ".join(sorted(IMPORTERS)),
            )
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        fn(imp, node, attrs)
    outputs = []
    for o in g.output:
        if o.name in imp.constants and o.name not in imp.values:
            raise imp.fail(
                None, f"output {o.name} is a constant; cnnc computes outputs from inputs"
            )
        outputs.append(imp.value(None, o.name))
    imp.graph.outputs = outputs
    onnx_names.name_layers(imp.graph, origins, imp.constants)
    imp.graph.opt_level = "imported"
    verify(imp.graph)
    return imp.graph
