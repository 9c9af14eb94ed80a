"""ONNX model -> IR: initializers become parameters, ONNX attribute forms become IR attributes."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.inliner
from google.protobuf.message import DecodeError
from onnx import helper, numpy_helper

from cnnc import limits, preprocess
from cnnc.errors import CnncError, ModelFileError, first_line
from cnnc.frontend import onnx_names, onnx_patterns, onnx_shapes
from cnnc.frontend.onnx_shapes import Dim
from cnnc.ir.graph import Graph, Value
from cnnc.ir.types import BATCH, TensorType, dtype_name, format_dims
from cnnc.limits import INT64_MAX, tensor_bytes
from cnnc.ops.activation import FUNCTION_NAMES
from cnnc.ops.norm import scale_shape
from cnnc.ops.pool import adaptive_avg_matrix, adaptive_max_windows
from cnnc.ops.resize import LINEAR_MODES, NEAREST_MODES, nearest_indices, upsample_sizes
from cnnc.ops.tensor import PAD_MODES

_DTYPES = {onnx.TensorProto.FLOAT: "f32"}


class Importer:
    """State of one import: the graph being built and the ONNX names already translated."""

    def __init__(self, model: onnx.ModelProto, where: str):
        self.model = model
        self.where = where
        self.graph = Graph(model.graph.name or Path(where).stem)
        self.values: dict[str, Value] = {}
        self.constants: dict[str, np.ndarray] = {}
        # Integer tensors computed from sizes known only at run time (onnx_shapes).
        self.shapes: dict[str, np.ndarray] = {}
        # Slices that crop some spatial axes to a value's size: (ref, {axis: offset}).
        self.crops: dict[Value, tuple[Value, dict[int, int]]] = {}
        # Index tensors running over the batch (Range(0, N, 1) and what follows it), and
        # values flattened to one axis batch included: read only by a Gather that gives the
        # flattened value back (dynamo's as_strided).
        self.indices: dict[str, onnx_shapes.Indices] = {}
        self.flat: dict[str, Value] = {}
        self.sequences: dict[str, list[Value]] = {}  # SplitToSequence's parts
        self.min_input: tuple[int, ...] = ()  # declared sizes of a fully convolutional model
        self.consumers: dict[str, int] = {}  # how many nodes read each ONNX name
        self.constant_bytes = 0  # initializers' and folded constants' bytes (param_bytes)
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)

    def fail(
        self, node: onnx.NodeProto | None, message: str, hint: str | None = None
    ) -> ModelFileError:
        at = (
            f"{self.where}: node {node.name or next(iter(node.output), '?')} ({node.op_type})"
            if node
            else self.where
        )
        return ModelFileError(message, at, hint)

    def value(self, node: onnx.NodeProto, name: str) -> Value:
        if name in self.values:
            return self.values[name]
        if name in self.constants:
            return self.param(name, self.constants[name])
        if name in self.shapes:
            dims = [d for d in self.shapes[name].flat if isinstance(d, Dim) and d.known is None]
            raise self.fail(
                node,
                f"input {name!r} is a shape computed from {dims[0].describe()}, which is known "
                "only at run time; cnnc reads computed shapes as sizes only (Reshape, Slice, "
                "Split, Pad)",
            )
        if name in self.flat:
            raise self.fail(
                node,
                f"input {name!r} is %{self.flat[name].name} flattened to one axis, batch "
                "included; cnnc reads such a tensor only through a Gather that gives it back "
                "in its own shape (the dynamo exporter's as_strided)",
            )
        if name in self.sequences:
            raise self.fail(
                node,
                f"input {name!r} is a sequence of tensors (SplitToSequence); cnnc reads its "
                "elements only through SequenceAt at constant positions",
            )
        if name in self.indices:
            raise self.fail(
                node,
                f"input {name!r} holds indices that run over the batch (from Range); cnnc "
                "reads them only as a Gather's indices into a flattened tensor",
            )
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

    def derived(self, name: str, array: np.ndarray) -> Value:
        """A new parameter computed from the model's tensors (not an initializer as it is),
        named ``name`` or, if that is taken, a variant of it."""
        value = self.graph.add_param(
            self.graph.unique_name(name), array.shape, dtype=dtype_name(array.dtype)
        )
        value.set_data(array)
        return value

    def constant(self, node: onnx.NodeProto, name: str) -> np.ndarray:
        """A constant input: an initializer, a folded node, or a computed shape whose sizes
        are all known at import."""
        if name in self.shapes:
            try:
                return onnx_shapes.materialize(self.shapes[name])
            except onnx_shapes.RuntimeSize as e:
                raise onnx_shapes.runtime_size_error(self, node, e.dim) from None
        if name not in self.constants:
            raise self.fail(node, f"input {name!r} must be a constant (an initializer)")
        return self.constants[name]

    def sizes(self, node: onnx.NodeProto, name: str) -> list[int | Dim]:
        """A constant or computed integer input, flattened: ints, and Dims for the sizes
        known only at run time (the batch size; the caller decides where one may stand)."""
        if name in self.shapes:
            return [
                d if isinstance(d, Dim) and d.known is None else int(onnx_shapes.number(d))
                for d in self.shapes[name].reshape(-1)
            ]
        return [int(v) for v in self.constant(node, name).reshape(-1)]

    def add(
        self,
        node: onnx.NodeProto,
        op: str,
        inputs: list[Value],
        attrs: dict[str, Any] | None = None,
        outputs: int = 1,
    ) -> None:
        """Add the IR node for an ONNX node; its first ``outputs`` outputs keep their ONNX
        names."""
        base = node.name or node.output[0]
        name = self.graph.unique_name(base)
        names = list(node.output[:outputs])
        try:
            ir = self.graph.add_node(
                op,
                inputs,
                attrs,
                name=name,
                output_names=[name if o == base else o for o in names],
            )
        except CnncError as e:
            raise self.fail(node, e.message, e.hint) from None
        for onnx_name, value in zip(names, ir.outputs, strict=True):
            self.values[onnx_name] = value

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


def _transpose_padding(
    imp: Importer,
    node,
    attrs,
    x: Value,
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A ConvTranspose's explicit pads (begin..., end...) and output padding. Given an output
    size (its ``output_shape``, or input × stride for auto_pad SAME_UPPER and SAME_LOWER),
    the pads crop what it computes to that size as the ONNX spec says: the odd row at the
    end for SAME_UPPER, at the beginning otherwise; an output_shape a few rows larger than
    what it computes (fewer than the stride) has them at the end, as output padding."""
    rank = len(kernel)
    output_pad = tuple(attrs.get("output_padding", (0,) * rank))
    auto_pad = _decoded(attrs).get("auto_pad", "NOTSET") or "NOTSET"
    if auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        raise imp.fail(node, f"auto_pad={auto_pad} is not an ONNX padding mode")
    output_shape = attrs.get("output_shape")
    if output_shape is None and auto_pad in ("NOTSET", "VALID"):
        pads = attrs.get("pads", (0,) * 2 * rank) if auto_pad == "NOTSET" else (0,) * 2 * rank
        return tuple(pads), output_pad
    spatial = [int(d) for d in x.type.spatial]
    if output_shape is None:
        sizes = [size * s for size, s in zip(spatial, stride, strict=True)]
    elif len(output_shape) == rank:
        sizes = [int(d) for d in output_shape]
    else:
        raise imp.fail(
            node,
            f"output_shape {list(output_shape)} has {len(output_shape)} sizes; ONNX gives one "
            f"per spatial axis ({rank})",
        )
    begins, ends, extra = [], [], []
    axes = zip(sizes, spatial, kernel, stride, dilation, output_pad, strict=True)
    for size, n, k, s, d, p in axes:
        total = s * (n - 1) + p + d * (k - 1) + 1 - size
        if total < 0 and output_shape is None:
            raise imp.fail(
                node,
                f"auto_pad={auto_pad} asks for an output of input × stride, "
                f"{format_dims(sizes)}, larger than the {size + total} this ConvTranspose "
                "computes along an axis: onnxruntime and onnx.reference disagree on what "
                "that computes",
                hint="give explicit pads and output_padding",
            )
        if total < 0 and p - total >= s:
            raise imp.fail(
                node,
                f"output_shape {format_dims(sizes)} is {-total} larger than the "
                f"{size + total} this ConvTranspose computes along an axis: as output "
                f"padding, {p - total} rows, not smaller than the stride {s}",
                hint="output_shape may exceed the computed size by less than the stride",
            )
        small = max(total, 0) // 2
        begins.append(small if auto_pad == "SAME_UPPER" else max(total, 0) - small)
        ends.append(max(total, 0) - begins[-1])
        extra.append(p + max(-total, 0))
    return (*begins, *ends), tuple(extra)


@importer("ConvTranspose")
def _conv_transpose(imp: Importer, node, attrs) -> None:
    inputs = _inputs(imp, node)
    if not all(v.is_param for v in inputs[1:]):
        raise imp.fail(
            node,
            "a ConvTranspose whose weights are computed is not supported",
            hint="cnnc transposed convolutions have constant weights (initializers)",
        )
    x, weight = inputs[0], inputs[1]
    kernel = tuple(weight.shape[2:])
    rank = len(kernel)
    if tuple(attrs.get("kernel_shape", kernel)) != kernel:
        raise imp.fail(
            node,
            f"kernel_shape {list(attrs['kernel_shape'])} does not match the weight {weight.type}",
        )
    for name, size in (("strides", rank), ("dilations", rank), ("output_padding", rank)):
        if name in attrs and len(attrs[name]) != size:
            raise imp.fail(
                node, f"{name} {list(attrs[name])} has {len(attrs[name])} values, not {size}"
            )
    if "pads" in attrs and len(attrs["pads"]) != 2 * rank:
        raise imp.fail(node, f"pads {list(attrs['pads'])} has {len(attrs['pads'])} values")
    stride = tuple(attrs.get("strides", (1,) * rank))
    dilation = tuple(attrs.get("dilations", (1,) * rank))
    pads, output_pad = _transpose_padding(imp, node, attrs, x, kernel, stride, dilation)
    ir = {
        "stride": stride,
        "pads": pads,
        "output_pad": output_pad,
        "dilation": dilation,
        "groups": attrs.get("group", 1),
    }
    imp.add(node, "conv_transpose", inputs, ir)


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
        if activation == "clip" and not attrs:
            # ConvClip takes its bounds as inputs 4 and 5 (scalar initializers; one left
            # out is no bound); models written by earlier cnnc give them as attributes.
            for i, (bound, default) in enumerate((("min", -np.inf), ("max", np.inf)), 3):
                name = node.input[i] if len(node.input) > i else ""
                if name and (name not in imp.constants or imp.constants[name].size != 1):
                    raise imp.fail(node, f"ConvClip's {bound} must be a constant scalar")
                act_attrs[bound] = float(imp.constants[name].reshape(())) if name else default
            node = _first_inputs(node, 3)
        fused = {"activation": activation, "activation_attrs": act_attrs}
        _conv(imp, node, conv_attrs, fused)

    return build


def _first_inputs(node: onnx.NodeProto, count: int) -> onnx.NodeProto:
    """A copy of ``node`` with its first ``count`` inputs only."""
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    del copy.input[count:]
    return copy


for _name, (_op, _fixed) in FUNCTION_NAMES.items():
    FUNCTIONS[_name] = _activation_function(_op, _fixed)
    FUNCTIONS["Conv" + _name] = _fused_function(_op, _fixed)


def _drop_path_function(imp: Importer, node, attrs) -> None:
    imp.add(node, "drop_path", [imp.value(node, node.input[0])], {"p": float(attrs.get("p", 0))})


FUNCTIONS["DropPath"] = _drop_path_function


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
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    weight = np.ascontiguousarray(weight * np.float32(alpha))
    x = imp.value(node, node.input[0])
    # A tensor used as it is (torch's and cnnc's fc: transB=1, alpha 1) keeps its name.
    as_is = attrs.get("transB", 0) and alpha == 1.0
    inputs = [
        x,
        imp.param(node.input[1], weight) if as_is else imp.derived(f"{node.input[1]}.fc", weight),
    ]
    if len(node.input) > 2 and node.input[2]:
        if node.input[2] not in imp.constants:
            raise imp.fail(node, "a Gemm whose C input is computed is not supported")
        c = imp.constants[node.input[2]].astype(np.float32) * np.float32(beta)
        try:
            bias = np.broadcast_to(
                c.reshape(-1) if c.ndim == 2 and c.shape[0] == 1 else c, (weight.shape[0],)
            )
        except ValueError:
            raise imp.fail(
                node, f"Gemm's C of shape {c.shape} is not one bias per output"
            ) from None
        bias = np.ascontiguousarray(bias)
        if c.shape == bias.shape and beta == 1.0:
            inputs.append(imp.param(node.input[2], bias))
        else:
            inputs.append(imp.derived(f"{node.input[2]}.fc", bias))
    imp.add(node, "fc", inputs)


@importer("MatMul")
def _matmul(imp: Importer, node, attrs) -> None:
    """x·W with a constant W [F, K] is an fc layer without bias on N×F, and a linear layer
    over the last axis of a larger x (a channels-last map); an Add after it becomes its
    bias."""
    if node.input[1] not in imp.constants or imp.constants[node.input[1]].ndim != 2:
        raise imp.fail(node, "only MatMul by a constant matrix (an fc layer) is supported")
    weight = np.ascontiguousarray(imp.constants[node.input[1]].astype(np.float32).T)
    x = imp.value(node, node.input[0])
    if x.type.rank == 2:
        imp.add(node, "fc", [x, imp.derived(f"{node.input[1]}.fc", weight)])
    else:
        param = imp.derived(f"{node.input[1]}.linear", weight)
        imp.add(node, "linear", [x, param], {"axis": x.type.rank - 1})


def _linear_function(imp: Importer, node, attrs) -> None:
    """cnnc.Linear(x, W [out, in][, b]) with an axis: what the patterns make of a pointwise
    Conv whose weight is an Unsqueeze of a matrix, and of MatMul(x, Transpose(W)) (the forms
    cnnc writes for linear), keeping W as it is."""
    x = imp.value(node, node.input[0])
    inputs = [x, *(imp.value(node, n) for n in node.input[1:] if n)]
    if not all(v.is_param for v in inputs[1:]):
        raise imp.fail(node, "a linear layer whose weights are computed is not supported")
    if x.type.rank == 2:
        imp.add(node, "fc", inputs)
    else:
        imp.add(node, "linear", inputs, {"axis": attrs["axis"] % x.type.rank})


FUNCTIONS["Linear"] = _linear_function


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
    if not axes and attrs.get("noop_with_empty_axes", 0):
        imp.alias(node, x)  # opset 18: no axes and noop_with_empty_axes=1 is the identity
        return
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


# ---- resizing and adaptive pooling ----------------------------------------------------------


def _float32_scale(value: float) -> float:
    """A scale stored as float32, as the shortest decimal that reads back as that float32
    (0.30000001192092896 -> 0.3): the scale the model's author wrote, which cnnc's
    upsample uses in double precision as PyTorch does."""
    return float(str(np.float32(value)))


def _onnx_nearest(size: int, out: int, scale: float, transform: str, rounding: str):
    """The pixels Resize's nearest mode samples along one axis by the ONNX formulas (in
    double precision, as onnx.reference), for scale ``scale`` and output size ``out``."""
    y = np.arange(out, dtype=np.float64)
    if transform == "asymmetric":
        x = y / scale
    elif transform == "half_pixel" or (transform == "pytorch_half_pixel" and out > 1):
        x = (y + 0.5) / scale - 0.5
    elif transform == "pytorch_half_pixel":
        x = np.zeros(out)
    elif transform == "align_corners":
        x = y * (size - 1) / (out - 1) if out > 1 else np.zeros(out)
    else:
        return None
    below = np.floor(x)
    half = x - below == 0.5
    index = {
        "floor": below,
        "ceil": np.ceil(x),
        "round_prefer_floor": np.where(half, below, np.rint(x)),
        "round_prefer_ceil": np.where(half, below + 1, np.rint(x)),
    }.get(rounding)
    return None if index is None else np.clip(index.astype(np.int64), 0, size - 1)


def _nearest_mode(imp: Importer, node, x: Value, ir: dict[str, Any], transform, rounding):
    """The upsample mode that samples what this nearest Resize samples: asymmetric + floor
    is PyTorch's nearest and half_pixel + round_prefer_ceil its nearest_exact (as PyTorch
    exports them); any other pair is accepted where it samples, at this input size, the
    pixels one of them samples. (The canonical pairs are taken as PyTorch's modes even
    where float32 rounding at an exact half or whole coordinate may differ between
    runtimes, but not where PyTorch's 2-D nearest copies or halves an axis by a scale
    other than 1 or 2: the Resize formula samples other pixels there.)"""
    spatial = tuple(x.type.spatial)
    out = upsample_sizes(spatial, ir)
    rank = len(spatial)
    given = ir["scales"] or (None,) * rank
    if (transform, rounding) == ("asymmetric", "floor"):
        for n, o, s in zip(spatial, out, given, strict=True):
            shortcut = (o == n and s != 1) or (o == 2 * n and s != 2)
            if rank == 2 and s is not None and shortcut:
                formula = np.floor(np.arange(o, dtype=np.float32) / np.float32(s))
                ours = nearest_indices(n, o, s, "nearest", rank)
                if not np.array_equal(np.minimum(formula.astype(np.int64), n - 1), ours):
                    raise imp.fail(
                        node,
                        f"Resize nearest by {s:g} from {n} to {o} samples "
                        "floor(i / scale), where PyTorch's 2-D nearest "
                        f"{'copies' if o == n else 'halves'} the axis",
                        hint="give sizes instead of scales",
                    )
        return "nearest"
    if (transform, rounding) == ("half_pixel", "round_prefer_ceil"):
        return "nearest_exact"
    onnx_indices = [
        _onnx_nearest(n, o, s if s is not None else o / n, transform, rounding)
        for n, o, s in zip(spatial, out, given, strict=True)
    ]
    if all(i is not None for i in onnx_indices):
        for mode in NEAREST_MODES:
            ours = [
                nearest_indices(n, o, s, mode, rank)
                for n, o, s in zip(spatial, out, given, strict=True)
            ]
            if all(np.array_equal(a, b) for a, b in zip(ours, onnx_indices, strict=True)):
                return mode
    raise imp.fail(
        node,
        f"Resize nearest with coordinate_transformation_mode={transform} and "
        f"nearest_mode={rounding} samples other pixels than PyTorch's nearest and "
        f"nearest_exact modes here",
        hint="cnnc's nearest is asymmetric + floor, its nearest_exact half_pixel + "
        "round_prefer_ceil",
    )


def _resize_targets(imp: Importer, node, x: Value, attrs) -> dict[str, Any]:
    """Resize's scales or sizes as the IR's ``scales`` or ``size`` of the spatial axes;
    batch and channels must keep their sizes."""
    names = list(node.input) + [""] * 4
    given = {}
    for key, name in (("scales", names[2]), ("sizes", names[3])):
        if name and key == "sizes":
            # Sizes may carry the batch size, computed from Shape(x) at run time.
            sizes = imp.sizes(node, name)
            if sizes:
                given[key] = np.array(sizes, dtype=object)
        elif name:
            value = imp.constant(node, name).reshape(-1)
            if value.size:
                given[key] = value
    if len(given) != 1:
        raise imp.fail(node, "Resize needs exactly one of scales and sizes")
    ((key, value),) = given.items()
    rank = x.type.rank
    axes = attrs.get("axes")
    if axes is not None:
        axes = [a + rank if a < 0 else a for a in axes]
        full = [1.0] * rank if key == "scales" else list(x.type.shape)
        for a, v in zip(axes, value.tolist(), strict=True):
            full[a] = v
    elif value.size != rank:
        raise imp.fail(node, f"Resize {key} has {value.size} values for a rank-{rank} input")
    else:
        full = value.tolist()
    if key == "scales":
        if full[0] != 1 or full[1] != 1:
            raise imp.fail(
                node,
                f"Resize scales {[float(s) for s in full]} resize the batch or channel axis: "
                "cnnc resizes spatial axes only",
            )
        return {"scales": tuple(_float32_scale(s) for s in full[2:]), "size": None}
    policy = attrs.get("keep_aspect_ratio_policy", "stretch")
    if policy != "stretch":
        raise imp.fail(
            node,
            f"Resize with keep_aspect_ratio_policy={policy} is not supported: cnnc resizes "
            "to the sizes given (stretch)",
        )
    if (
        isinstance(full[0], Dim)
        and full[0].is_batch
        and full[0].value.type.shape[0] == x.type.shape[0]
    ):
        full[0] = x.type.shape[0]  # the batch size of a value of this graph: x's
    if any(isinstance(d, Dim) for d in full):
        raise onnx_shapes.runtime_size_error(imp, node, next(d for d in full if isinstance(d, Dim)))
    if full[:2] != list(x.type.shape[:2]):
        raise imp.fail(
            node,
            f"Resize sizes {full} change the batch or channel axis of "
            f"{x.type}: cnnc resizes spatial axes only",
        )
    return {"scales": None, "size": tuple(int(s) for s in full[2:])}


@importer("Resize")
def _resize(imp: Importer, node, attrs) -> None:
    """Resize as an upsample: nearest (asymmetric + floor), nearest_exact (half_pixel +
    round_prefer_ceil), linear and bilinear (half_pixel, or pytorch_half_pixel where no
    output size is 1, and align_corners), by constant scales or sizes. Resize-10 (opset 10)
    is the old Upsample."""
    a = _decoded(attrs)
    x = imp.value(node, node.input[0])
    if imp.opset < 11:
        _integer_nearest(imp, node, x, a.get("mode", "nearest"), imp.constant(node, node.input[1]))
        return
    if x.type.rank not in (3, 4):
        raise imp.fail(
            node, f"Resize of {x.type} is not supported: cnnc resizes N×C×L and N×C×H×W maps"
        )
    mode = a.get("mode", "nearest")
    transform = a.get("coordinate_transformation_mode", "half_pixel")
    if mode not in ("nearest", "linear"):
        raise imp.fail(
            node,
            f"Resize mode {mode} is not supported: cnnc's upsample has nearest, "
            "nearest_exact, linear and bilinear",
        )
    if a.get("antialias", 0):
        raise imp.fail(node, "Resize with antialias=1 is not supported (PyTorch's antialias)")
    if transform == "tf_crop_and_resize":
        raise imp.fail(node, "Resize with tf_crop_and_resize (a crop by its roi) is not supported")
    ir = {"mode": mode, "align_corners": False, **_resize_targets(imp, node, x, a)}
    spatial = tuple(x.type.spatial)
    if mode == "nearest":
        rounding = a.get("nearest_mode", "round_prefer_floor")
        ir["mode"] = _nearest_mode(imp, node, x, ir, transform, rounding)
    else:
        ir["mode"] = LINEAR_MODES[len(spatial)]
        out = upsample_sizes(spatial, ir)
        if transform == "align_corners":
            ir["align_corners"] = True
            if ir["scales"] is not None and any(
                not (np.float32(s) * np.float64(n)).is_integer()
                for n, s in zip(spatial, ir["scales"], strict=True)
            ):
                raise imp.fail(
                    node,
                    "Resize linear with align_corners by scales whose products with the input "
                    "sizes are not whole: the ONNX formula divides by scale · size - 1, "
                    "onnxruntime and PyTorch by the output size - 1",
                    hint="give sizes instead of scales",
                )
        elif transform == "pytorch_half_pixel" and any(
            o == 1 and n > 1 for n, o in zip(spatial, out, strict=True)
        ):
            raise imp.fail(
                node,
                "Resize linear with pytorch_half_pixel and an output size of 1 samples the "
                "first pixel, where PyTorch's linear modes take the middle",
            )
        elif transform not in ("half_pixel", "pytorch_half_pixel"):
            raise imp.fail(
                node,
                f"Resize linear with coordinate_transformation_mode={transform} is not "
                "supported: PyTorch's linear modes are half_pixel (align_corners=false) and "
                "align_corners",
            )
    imp.add(node, "upsample", [x], ir)


def _integer_nearest(imp: Importer, node, x: Value, mode: str, scales: np.ndarray) -> None:
    """The old Upsample (and Resize-10): by scales, coordinates x / scale. Only nearest by
    whole numbers is imported, where every reading of the op (and PyTorch's nearest)
    repeats each pixel that many times."""
    scales = [float(s) for s in np.asarray(scales).reshape(-1)]
    if mode != "nearest":
        raise imp.fail(
            node,
            f"{node.op_type} mode {mode} is not supported: it maps coordinates "
            "asymmetrically (x / scale), as no PyTorch linear mode does",
        )
    if len(scales) != x.type.rank or x.type.rank not in (3, 4) or scales[:2] != [1, 1]:
        raise imp.fail(
            node,
            f"{node.op_type} scales {scales} of {x.type}: cnnc resizes the spatial axes of "
            "N×C×L and N×C×H×W maps only",
        )
    if any(s < 1 or not s.is_integer() for s in scales[2:]):
        raise imp.fail(
            node,
            f"{node.op_type} nearest by {scales[2:]} is not supported: cnnc imports nearest "
            "upsampling by whole numbers (each pixel repeated), where every reading of the op "
            "agrees",
        )
    ir = {"mode": "nearest", "align_corners": False, "scales": tuple(scales[2:]), "size": None}
    spatial = tuple(x.type.spatial)
    for n, s in zip(spatial, scales[2:], strict=True):
        repeat = np.arange(int(n * s)) // int(s)
        if not np.array_equal(nearest_indices(n, int(n * s), s, "nearest", len(spatial)), repeat):
            raise imp.fail(node, f"{node.op_type} by {s} of {n}: cnnc's nearest differs here")
    imp.add(node, "upsample", [x], ir)


@importer("Upsample")
def _upsample(imp: Importer, node, attrs) -> None:
    a = _decoded(attrs)
    x = imp.value(node, node.input[0])
    scales = a["scales"] if "scales" in a else imp.constant(node, node.input[1])
    _integer_nearest(imp, node, x, a.get("mode", "nearest"), scales)


def _tables(imp: Importer, node, x: Value) -> list[np.ndarray]:
    tables = [imp.constant(node, name) for name in node.input[1:]]
    if x.type.rank not in (3, 4) or len(tables) != x.type.rank - 2:
        raise imp.fail(node, f"{node.op_type} takes one table per spatial axis of {x.type}")
    return tables


def _matching(imp: Importer, node, tables: list[np.ndarray], expected: list[np.ndarray]) -> None:
    for table, wanted in zip(tables, expected, strict=True):
        if table.shape != wanted.shape or not np.allclose(table, wanted, rtol=0, atol=1e-7):
            raise imp.fail(
                node,
                f"the constant tables of this {node.op_type} call are not the ones cnnc "
                "writes for its sizes",
            )


def _upsample_function(imp: Importer, node, attrs) -> None:
    x = imp.value(node, node.input[0])
    tables = _tables(imp, node, x)
    ir = {
        "mode": attrs.get("mode"),
        "align_corners": False,
        "scales": tuple(_float32_scale(s) for s in attrs["scales"]) if "scales" in attrs else None,
        "size": tuple(int(s) for s in attrs["size"]) if "size" in attrs else None,
    }
    form = "size" if node.op_type.startswith("UpsampleSize") else "scales"
    if ir["mode"] not in NEAREST_MODES or ir[form] is None:
        raise imp.fail(
            node, f"{node.op_type} needs the attributes mode (nearest or nearest_exact) and {form}"
        )
    spatial = tuple(x.type.spatial)
    given = ir["scales"] or (None,) * len(spatial)
    expected = [
        nearest_indices(n, o, s, ir["mode"], len(spatial))
        for n, o, s in zip(spatial, upsample_sizes(spatial, ir), given, strict=True)
    ]
    _matching(imp, node, tables, expected)
    imp.add(node, "upsample", [x], ir)


def _adaptive_function(op: str):
    def build(imp: Importer, node, attrs) -> None:
        x = imp.value(node, node.input[0])
        tables = _tables(imp, node, x)
        spatial = tuple(x.type.spatial)
        if op == "adaptive_maxpool":
            size = tuple(t.shape[0] for t in tables)
            expected = [adaptive_max_windows(n, o) for n, o in zip(spatial, size, strict=True)]
        else:
            # [L, out] in 1-D; [out_h, h] and [w, out_w] in 2-D (MatMul's sides).
            size = (
                (tables[-1].shape[1],)
                if len(tables) == 1
                else (tables[0].shape[0], tables[1].shape[1])
            )
            pools = [adaptive_avg_matrix(n, o) for n, o in zip(spatial, size, strict=True)]
            expected = [pools[0].T] if len(pools) == 1 else [pools[0], pools[1].T]
        _matching(imp, node, tables, expected)
        imp.add(node, op, [x], {"size": size})

    return build


for _rank in (1, 2):
    FUNCTIONS[f"UpsampleScale{_rank}d"] = _upsample_function
    FUNCTIONS[f"UpsampleSize{_rank}d"] = _upsample_function
    FUNCTIONS[f"AdaptiveAvgPool{_rank}d"] = _adaptive_function("adaptive_avgpool")
    FUNCTIONS[f"AdaptiveMaxPool{_rank}d"] = _adaptive_function("adaptive_maxpool")


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
    params = [imp.derived(f"{name}.scale", scale), imp.derived(f"{name}.shift", shift)]
    imp.add(node, "affine", [x, *params])


def _scale(imp: Importer, node, x: Value, name: str, c: np.ndarray, vector: np.ndarray) -> None:
    """Mul by a per-channel constant: a scale, whose weight is that constant when it has the
    scale's layout [C, 1, ..., 1] (ConvNeXt's layer_scale keeps its name)."""
    shape = scale_shape(x.type)
    if c.shape == shape:
        weight = imp.param(name, np.ascontiguousarray(c))
    else:
        weight = imp.derived(f"{node.name or node.output[0]}.scale", vector.reshape(shape))
    imp.add(node, "scale", [x, weight])


@importer("Add", "Sum", "Sub", "Mul", "Div")
def _arithmetic(imp: Importer, node, attrs) -> None:
    """Add, Sum, Sub, Mul and Div of computed values that broadcast are the IR's element-wise
    ops; Mul by a per-channel constant is a scale, and Add, Sub and Div by one an affine; Add
    of a bias after a MatMul is that fc's (or linear layer's) bias."""
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
        return _fc_bias(imp, node, x, constant[0], c)
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
        _scale(imp, node, x, constant[0], c, vector)
    else:
        _affine(imp, node, x, 1 / vector, None)


def _absorbs_bias(imp: Importer, x: Value, c: np.ndarray) -> bool:
    """Whether Add(x, c) is the bias of the fc (or the linear layer over the last axis) that
    computes x: one value per output, along that axis."""
    layer = x.producer
    if layer is None or len(layer.inputs) != 2 or imp.consumers.get(x.name, 0) != 1:
        return False
    outputs = x.type.shape[-1]
    if layer.op == "fc":
        return c.size == outputs and c.squeeze().ndim <= 1
    return (
        layer.op == "linear"
        and layer.attrs["axis"] == x.type.rank - 1
        and c.size == outputs
        and c.ndim <= x.type.rank
        and c.shape[-1] == outputs
    )


def _fc_bias(imp: Importer, node, x: Value, source: str, c: np.ndarray) -> None:
    layer = x.producer
    if c.ndim == 1:
        bias = imp.param(source, c)
    else:
        bias = imp.derived(
            f"{node.name or node.output[0]}.bias", np.ascontiguousarray(c.reshape(-1))
        )
    new = imp.graph.replace_node(layer, layer.op, [*layer.inputs, bias], layer.attrs)
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
    if kind == "sparse_value":
        imp.constants[node.output[0]] = _dense(imp, node, value)
        return
    if kind not in kinds:
        raise imp.fail(
            node,
            f"a Constant given by {kind} is not supported: cnnc computes with numbers only",
        )
    imp.constants[node.output[0]] = kinds[kind](value)


def _dense(imp: Importer, node, sparse: onnx.SparseTensorProto) -> np.ndarray:
    """A sparse tensor written out: zeros but at its indices (flat, or one row per element),
    within the limit on constants' bytes."""
    values = numpy_helper.to_array(sparse.values)
    dims = [int(d) for d in sparse.dims]
    if any(d < 0 for d in dims):
        raise imp.fail(node, f"a sparse Constant with negative dimensions {dims}")
    size = math.prod(dims) * values.dtype.itemsize
    if size > FOLD_LIMIT_BYTES:
        raise imp.fail(
            node,
            f"this sparse Constant is a tensor of shape {dims} ({size:,} bytes) written out; "
            f"cnnc makes constants of at most {FOLD_LIMIT_BYTES:,} bytes",
        )
    imp.constant_bytes += size
    _check_constant_bytes(imp, node, imp.constant_bytes, dims)
    dense = np.zeros(dims, values.dtype)
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
    if indices.ndim == 2:  # [count, rank]: one row of coordinates per value
        dense[tuple(indices.T)] = values
    else:
        dense.reshape(-1)[indices] = values
    return dense


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
    epsilon = float(attrs.get("epsilon", 1e-5))
    mean, var = (imp.constants.get(n) for n in node.input[3:5])
    if (
        epsilon == 0
        and mean is not None
        and var is not None
        and not mean.any()
        and (var == 1).all()
    ):
        # x · scale + B exactly: how cnnc exports an affine (one node, faster than Mul, Add).
        imp.add(node, "affine", [imp.value(node, n) for n in node.input[:3]])
        return
    imp.add(node, "bn", _inputs(imp, node), {"epsilon": epsilon})


def _along(c: np.ndarray | None, shape: tuple, keep: int | None) -> np.ndarray | None:
    """The values of a constant broadcast (from the right, as ONNX's Mul does) against
    ``shape``, along its axis ``keep`` (or its one value, keep None), if it is constant along
    every other axis; else None."""
    if c is None:
        return None
    while c.ndim > len(shape) and c.shape[0] == 1:
        c = c[0]
    try:
        full = np.broadcast_to(c, shape)
    except ValueError:
        return None
    rows = full.reshape(1, -1) if keep is None else np.moveaxis(full, keep, 0)
    rows = rows.reshape(rows.shape[0], -1)
    if not (rows == rows[:, :1]).all():
        return None
    return np.ascontiguousarray(rows[:, 0], dtype=np.float32)


def _normalization(
    imp: Importer, node, x: Value, op: str, attrs: dict[str, Any], vectors: list, size: int
) -> None:
    """Add a layernorm or groupnorm whose weight and bias are ``vectors`` (None: ones, zeros;
    one value: repeated ``size`` times). An initializer used as it is keeps its name;
    otherwise the tensors are ``<node>.weight`` and ``<node>.bias``."""
    base = node.name or node.output[0]
    params = []
    for i, (vector, default) in enumerate(zip(vectors, (1.0, 0.0), strict=True)):
        source = node.input[i + 1] if len(node.input) > i + 1 else ""
        if vector is None:
            vector = np.full(size, default, np.float32)
        elif vector.size == 1 and size != 1:
            vector = np.full(size, vector[0], np.float32)
        original = imp.constants.get(source) if source else None
        if original is not None and original.shape == vector.shape:
            params.append(imp.param(source, vector))
        else:
            params.append(imp.derived(f"{base}.{('weight', 'bias')[i]}", vector))
    imp.add(node, op, [x, *params], attrs)


def _constants(imp: Importer, node) -> list[np.ndarray | None]:
    """The scale and bias inputs (None where left out)."""
    return [
        imp.constant(node, n).astype(np.float32) if n else None
        for n in [*node.input[1:3], "", ""][:2]
    ]


@importer("LayerNormalization")
def _layer_normalization(imp: Importer, node, attrs) -> None:
    """LayerNormalization normalizes over every axis from ``axis`` on, its scale and bias
    broadcast against those axes. Over one axis (the others of size 1) it is a layernorm;
    over the channels and positions of a map with a scale and bias per channel, a groupnorm
    of one group; over the positions of each channel with one scale and bias, a groupnorm
    of a group per channel. Anything else normalizes over several axes with a scale that
    differs along them: an error."""
    if any(o and imp.consumers.get(o, 0) for o in node.output[1:]):
        raise imp.fail(node, "LayerNormalization's Mean and InvStdDev outputs are not supported")
    x = imp.value(node, node.input[0])
    rank, epsilon = x.type.rank, float(attrs.get("epsilon", 1e-5))
    axis = attrs.get("axis", -1)
    if not -rank <= axis < rank or axis % rank == 0:
        raise imp.fail(
            node,
            f"LayerNormalization from axis {axis} of {x.type} would normalize across the "
            "batch: cnnc normalizes each item on its own",
        )
    axis %= rank
    shape = tuple(x.type.shape[axis:])
    wide = [a for a in range(axis, rank) if x.type.shape[a] != 1]
    if len(wide) <= 1:
        target = wide[0] if wide else rank - 1
        op, keep, size = "layernorm", target - axis, x.type.shape[target]
        ir: dict[str, Any] = {"axis": target, "epsilon": epsilon}
    else:
        channels = x.type.shape[1]
        op, keep, size = "groupnorm", 0 if axis == 1 else None, channels
        ir = {"groups": 1 if axis == 1 else channels, "epsilon": epsilon}
    constants = _constants(imp, node)
    vectors = [_along(c, shape, keep) for c in constants]
    fits = axis <= 2 or op == "layernorm"
    if not fits or any(
        c is not None and v is None for c, v in zip(constants, vectors, strict=True)
    ):
        raise imp.fail(
            node,
            f"LayerNormalization over the axes {axis}..{rank - 1} of {x.type} is not "
            "supported: cnnc normalizes over one axis, or over each item or channel as a "
            "whole with a scale and bias per channel",
        )
    _normalization(imp, node, x, op, ir, vectors, size)


def _layernorm_function(imp: Importer, node, attrs) -> None:
    """cnnc.LayerNorm(x, scale, bias) over one axis (the last unless ``axis`` says otherwise),
    the scale and bias broadcast against x as Mul and Add do: cnnc's function before opset 17,
    and the older exporters' pattern."""
    x = imp.value(node, node.input[0])
    axis = attrs.get("axis", -1) % x.type.rank
    if axis == 0:
        raise imp.fail(node, "a layer normalization across the batch axis is not supported")
    constants = _constants(imp, node)
    vectors = [_along(c, tuple(x.type.shape[1:]), axis - 1) for c in constants]
    if any(c is not None and v is None for c, v in zip(constants, vectors, strict=True)):
        raise imp.fail(node, f"the scale and bias are not one value per index of axis {axis}")
    ir = {"axis": axis, "epsilon": float(attrs["epsilon"])}
    _normalization(imp, node, x, "layernorm", ir, vectors, x.type.shape[axis])


def _groupnorm(imp: Importer, node, groups: int, epsilon: float, layout: str) -> None:
    """A groupnorm whose scale and bias are one per channel (layout "channel"), one per group
    ("group", each repeated over its group's channels), or broadcast against x as Mul and Add
    do ("broadcast")."""
    x = imp.value(node, node.input[0])
    channels = x.type.shape[1]
    if x.type.rank < 2 or channels % groups:
        raise imp.fail(node, f"{groups} groups do not divide the channels of {x.type}")
    constants = _constants(imp, node)
    if layout == "broadcast":
        vectors = [_along(c, tuple(x.type.shape[1:]), 0) for c in constants]
    else:
        size = channels if layout == "channel" else groups
        vectors = [
            None if c is None or c.size not in (1, size) else np.broadcast_to(c.reshape(-1), size)
            for c in constants
        ]
        if layout == "group":
            vectors = [v if v is None else np.repeat(v, channels // groups) for v in vectors]
    if any(c is not None and v is None for c, v in zip(constants, vectors, strict=True)):
        raise imp.fail(
            node,
            f"the scale and bias are not one value per {layout.replace('broadcast', 'channel')}",
        )
    vectors = [v if v is None else np.ascontiguousarray(v, np.float32) for v in vectors]
    ir = {"groups": groups, "epsilon": epsilon}
    _normalization(imp, node, x, "groupnorm", ir, vectors, channels)


@importer("GroupNormalization")
def _group_normalization(imp: Importer, node, attrs) -> None:
    """GroupNormalization: its scale and bias are per group at opsets 18 to 20 (each repeated
    over its group's channels), per channel from 21."""
    layout = "channel" if imp.opset >= 21 else "group"
    _groupnorm(imp, node, attrs["num_groups"], float(attrs.get("epsilon", 1e-5)), layout)


@importer("InstanceNormalization")
def _instance_normalization(imp: Importer, node, attrs) -> None:
    """InstanceNormalization is a groupnorm with one group per channel."""
    x = imp.value(node, node.input[0])
    _groupnorm(imp, node, x.type.shape[1], float(attrs.get("epsilon", 1e-5)), "channel")


# cnnc's functions below the opsets of LayerNormalization (17) and GroupNormalization (21),
# and the patterns exporters write for them (torch's GroupNorm broadcasts its γ and β).
FUNCTIONS["LayerNorm"] = _layernorm_function
FUNCTIONS["GroupNorm"] = lambda imp, node, attrs: _groupnorm(
    imp,
    node,
    attrs["groups"],
    float(attrs["epsilon"]),
    "broadcast" if attrs.get("broadcast") else "channel",
)


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


@importer("Expand")
def _expand(imp: Importer, node, attrs) -> None:
    """An Expand that leaves a tensor's shape as it is (a shape of ones, or the tensor's own
    sizes, its batch size included) is the tensor; one that repeats elements is refused."""
    x = imp.value(node, node.input[0])
    target = imp.sizes(node, node.input[1])
    dims = x.type.shape
    start = len(dims) - len(target)  # the axis of x that target[0] lines up with
    same = start >= 0 and all(
        (isinstance(d, Dim) and d.is_batch and start + i == 0)
        or (not isinstance(d, Dim) and d in (1, dims[start + i]))
        for i, d in enumerate(target)
    )
    if not same:
        shown = [d.describe() if isinstance(d, Dim) else d for d in target]
        raise imp.fail(
            node,
            f"Expand of {x.type} to {shown} repeats elements: cnnc broadcasts only inside "
            "elementwise ops",
        )
    imp.alias(node, x)


@importer("CastLike")
def _cast_like(imp: Importer, node, attrs) -> None:
    """CastLike(constant, x): the constant in x's type, a constant (the dynamo exporter
    writes a convolution's zero bias as Expand(CastLike(0, input), ...)). A tensor cast to
    its own type is itself."""
    source, target = node.input[0], node.input[1]
    shape = target in imp.shapes
    dtype = np.dtype(np.int64) if shape else imp.value(node, target).type.numpy_dtype
    if source in imp.constants:
        imp.constants[node.output[0]] = np.asarray(imp.constants[source]).astype(dtype)
        return
    x = imp.value(node, source)
    if x.type.numpy_dtype != dtype:
        raise imp.fail(node, f"CastLike of {x.type} to {dtype} is not supported")
    imp.alias(node, x)


@importer("Identity")
def _identity(imp: Importer, node, attrs) -> None:
    imp.alias(node, imp.value(node, node.input[0]))


def _reshape_to(imp: Importer, node, x: Value, shape: tuple[int, ...]) -> None:
    """Reshape ``x`` to a full shape: flatten, reshape of the axes after the batch, or an error."""
    merges = len(shape) == 1 and x.type.rank > 1 and x.type.numel_per_item() != 1
    if shape[0] != x.type.shape[0] or merges:
        raise imp.fail(
            node,
            f"reshaping {x.type} to {list(shape)} moves the batch axis (or merges it with the "
            "others): cnnc keeps the first axis as it is",
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
    target = imp.sizes(node, node.input[1])
    if attrs.get("allowzero", 0) and 0 in target:
        raise imp.fail(node, "Reshape with allowzero=1 and a zero size is not supported")
    for i, d in enumerate(target):
        if isinstance(d, Dim):
            if i == 0 and d.is_batch:
                target[0] = 0  # the batch size carried through: keep the batch
            else:
                raise onnx_shapes.runtime_size_error(imp, node, d)
    dims = list(x.type.shape)
    # ONNX: 0 copies the input's size on that axis, -1 takes what is left.
    shape = [dims[i] if d == 0 else d for i, d in enumerate(target)]
    if shape.count(-1) > 1:
        raise imp.fail(node, "Reshape with more than one -1 is not valid ONNX")
    if any(isinstance(d, int) and d < -1 for d in shape):
        raise imp.fail(node, f"Reshape to {target} has a negative size other than -1")
    whole = shape[0] == -1 or (
        all(isinstance(d, int) for d in dims) and shape[0] == math.prod(dims)
    )
    if len(shape) == 1 and len(dims) > 1 and x.type.numel_per_item() != 1 and whole:
        # A flat view of everything, batch included: only an identity Gather may read it.
        imp.flat[node.output[0]] = x
        return
    if -1 in shape:
        # Exact integers: int64 products of a hostile shape would overflow.
        batch = dims[0]
        if not isinstance(batch, int):
            # A symbolic batch: -1 can only stand for it, or for the rest of an item.
            if shape[0] == -1:
                shape[0] = batch
            else:
                per_item = math.prod(dims[1:])
                known = math.prod(d for d in shape[1:] if d != -1) or 1
                shape = [per_item // known if d == -1 else d for d in shape]
        else:
            total = math.prod(dims)
            known = math.prod(d for d in shape if d != -1) or 1
            shape = [total // known if d == -1 else d for d in shape]
    _reshape_to(imp, node, x, tuple(shape))


@importer("Gather")
def _gather(imp: Importer, node, attrs) -> None:
    """A Gather from a tensor flattened to one axis (batch included) whose indices give the
    tensor back in its own shape, element for element: how the dynamo exporter writes
    as_strided when the strides are the tensor's own (ConvNeXt's stochastic depth)."""
    data, index = node.input[0], node.input[1]
    if data not in imp.flat:
        raise imp.fail(
            node,
            "Gather of a tensor is not supported: cnnc reads Gather on shapes and constants, "
            "and a Gather that gives back a flattened tensor as it was (as_strided)",
        )
    x = imp.flat[data]
    indices = imp.indices.get(index)
    if indices is None and index in imp.constants:
        indices = np.asarray(imp.constants[index])
    if (
        attrs.get("axis", 0) != 0
        or indices is None
        or not onnx_shapes.is_identity_gather(x, indices)
    ):
        raise imp.fail(
            node,
            f"this Gather picks elements of %{x.name} ({x.type}) flattened to one axis in "
            "another order or shape; cnnc reads it only when it gives the tensor back as it "
            "was (as_strided with the tensor's own sizes and strides)",
        )
    imp.alias(node, x)


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
    if not axes and attrs.get("noop_with_empty_axes", 0):
        imp.alias(node, x)  # opset 18: no axes and noop_with_empty_axes=1 is the identity
        return
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


@importer("Shape")
def _shape(imp: Importer, node, attrs) -> None:
    onnx_shapes.shape_of(imp, node, imp.value(node, node.input[0]), attrs)


@importer("Pad")
def _pad(imp: Importer, node, attrs) -> None:
    """Pad of the spatial axes, constant, reflect or edge; pads (and axes, opset 18) must
    be constants or known sizes, and leave the batch and channel axes alone."""
    x = imp.value(node, node.input[0])
    attrs = _decoded(attrs)
    mode = attrs.get("mode", "constant")
    if mode not in PAD_MODES:
        raise imp.fail(
            node, f"Pad mode {mode} is not supported: cnnc pads with {', '.join(PAD_MODES)}"
        )
    if imp.opset < 11:
        pads, value = list(attrs["pads"]), float(attrs.get("value", 0.0))
        axes = None
    else:
        pads = [int(v) for v in imp.constant(node, node.input[1]).reshape(-1)]
        given = _optional(node, 2)
        value = float(imp.constant(node, given).reshape(-1)[0]) if given else 0.0
        axes = _optional(node, 3)
        axes = [int(a) for a in imp.constant(node, axes).reshape(-1)] if axes else None
    rank = x.type.rank
    axes = [a + rank if a < 0 else a for a in (axes or range(rank))]
    if len(pads) != 2 * len(axes):
        raise imp.fail(node, f"Pad has {len(pads)} pads for {len(axes)} axes")
    begins, ends = [0] * rank, [0] * rank
    for i, axis in enumerate(axes):
        begins[axis], ends[axis] = pads[i], pads[i + len(axes)]
    if any(begins[:2]) or any(ends[:2]):
        raise imp.fail(
            node,
            f"Pad of the batch or channel axis (pads {pads}) is not supported: cnnc pads the "
            "spatial axes",
        )
    ir = {
        "pads": (*begins[2:], *ends[2:]),
        "mode": mode,
        "value": value if mode == "constant" else 0.0,
    }
    imp.add(node, "pad", [x], ir)


def _optional(node: onnx.NodeProto, i: int) -> str | None:
    return node.input[i] if len(node.input) > i and node.input[i] else None


@importer("Split")
def _split(imp: Importer, node, attrs) -> None:
    """Split of the channels: sizes from the split input (an attribute before opset 13),
    from num_outputs (opset 18: torch.chunk's rounding), or equal parts."""
    x = imp.value(node, node.input[0])
    rank, axis = x.type.rank, attrs.get("axis", 0)
    if rank < 2 or axis not in (1, 1 - rank):
        raise imp.fail(
            node,
            f"Split along axis {axis} of {x.type} is not supported: cnnc splits the channels "
            "(axis 1)",
        )
    channels, parts = x.type.shape[1], len(node.output)
    if "split" in attrs:
        sizes = [int(s) for s in attrs["split"]]
    elif _optional(node, 1):
        sizes = [int(s) for s in imp.constant(node, node.input[1]).reshape(-1)]
    elif "num_outputs" in attrs:
        size = -(-channels // attrs["num_outputs"])
        sizes = [max(0, min(size, channels - i * size)) for i in range(parts)]
    elif channels % parts:
        raise imp.fail(node, f"Split of {channels} channels into {parts} equal parts")
    else:
        sizes = [channels // parts] * parts
    if len(sizes) != parts or min(sizes) < 1:
        raise imp.fail(
            node,
            f"Split into sizes {sizes} for {parts} outputs: cnnc splits into one part of at "
            "least one channel per output",
        )
    imp.add(node, "split", [x], {"sizes": tuple(sizes)}, outputs=parts)


@importer("SplitToSequence")
def _split_to_sequence(imp: Importer, node, attrs) -> None:
    """A split of the channels into a sequence by constant sizes (the dynamo exporter's
    torch.chunk without its optimizer): a split whose parts SequenceAt picks."""
    x = imp.value(node, node.input[0])
    rank, axis = x.type.rank, attrs.get("axis", 0)
    if rank < 2 or axis not in (1, 1 - rank) or not _optional(node, 1):
        raise imp.fail(
            node,
            f"SplitToSequence of {x.type} along axis {axis}"
            + ("" if _optional(node, 1) else " without sizes")
            + " is not supported: cnnc splits the channels (axis 1) by given sizes",
        )
    split = imp.constant(node, node.input[1])
    channels = x.type.shape[1]
    if split.ndim == 0:  # parts of that size, the last one smaller
        size = int(split)
        if size < 1:
            raise imp.fail(node, f"SplitToSequence into parts of {size} channels")
        sizes = [min(size, channels - i) for i in range(0, channels, size)]
    else:
        sizes = [int(v) for v in split.reshape(-1)]
    if sum(sizes) != channels or min(sizes, default=0) < 1:
        raise imp.fail(
            node, f"SplitToSequence of {channels} channels into sizes {sizes}: not a split"
        )
    base = node.name or node.output[0]
    ir = imp.graph.add_node(
        "split",
        [x],
        {"sizes": tuple(sizes)},
        name=imp.graph.unique_name(base),
        output_names=[imp.graph.unique_name(f"{node.output[0]}.{i}") for i in range(len(sizes))],
    )
    imp.sequences[node.output[0]] = list(ir.outputs)


@importer("SequenceAt")
def _sequence_at(imp: Importer, node, attrs) -> None:
    if node.input[0] not in imp.sequences:
        raise imp.fail(node, "SequenceAt of a sequence cnnc did not make with SplitToSequence")
    parts = imp.sequences[node.input[0]]
    position = imp.constant(node, node.input[1])
    if position.size != 1:
        raise imp.fail(node, f"SequenceAt position of shape {list(position.shape)}: not one")
    position = int(position.reshape(-1)[0])
    if not -len(parts) <= position < len(parts):
        raise imp.fail(node, f"SequenceAt position {position} of a sequence of {len(parts)}")
    imp.alias(node, parts[position])


# What "to the end" is as a Slice bound: larger than any size.
_END = np.iinfo(np.int64).max


@importer("Slice")
def _slice(imp: Importer, node, attrs) -> None:
    """Slice with step 1 along the channels or spatial axes: one IR slice per axis it
    narrows; ends that are another value's spatial sizes plus the starts are a crop."""
    x = imp.value(node, node.input[0])
    rank = x.type.rank
    if imp.opset < 10:
        starts, ends = list(attrs["starts"]), list(attrs["ends"])
        axes, steps = attrs.get("axes"), None
    else:
        starts = imp.sizes(node, node.input[1])
        ends = (
            list(imp.shapes[node.input[2]].reshape(-1))
            if node.input[2] in imp.shapes
            else imp.sizes(node, node.input[2])
        )
        axes, steps = _optional(node, 3), _optional(node, 4)
        axes = [int(a) for a in imp.constant(node, axes).reshape(-1)] if axes else None
        steps = [int(s) for s in imp.constant(node, steps).reshape(-1)] if steps else None
    axes = [a + rank if a < 0 else a for a in (axes or range(len(starts)))]
    if steps and any(s != 1 for s in steps):
        raise imp.fail(node, f"Slice with steps {steps} is not supported: cnnc slices with step 1")
    crop = _crop_axes(x, starts, ends, axes)
    if crop is not None and _crop(imp, node, x, *crop):
        return
    cuts = []
    for axis, start, end in zip(axes, starts, ends, strict=True):
        start, end = _bound(imp, node, x, axis, start), _bound(imp, node, x, axis, end)
        size = x.type.shape[axis]
        static = axis == 1 or (axis >= 2 and not imp.graph.flexible_spatial)
        if axis == 0:
            if start != 0 or end < (size if isinstance(size, int) else _END):
                raise imp.fail(
                    node,
                    f"Slice {start}:{end} of the batch axis is not supported: cnnc keeps "
                    "the batch axis whole",
                )
            continue
        if static:
            start, end, _ = slice(start, end).indices(size)
            if (start, end) == (0, size):
                continue
        cuts.append((axis, start, end))
    if not cuts:
        imp.alias(node, x)
        return
    base = node.name or node.output[0]
    for i, (axis, start, end) in enumerate(cuts):
        if i == len(cuts) - 1:
            imp.add(node, "slice", [x], {"axis": axis, "start": start, "end": end})
            if crop is not None and len(cuts) == 1:
                imp.crops[imp.values[node.output[0]]] = crop
            break
        # Each axis but the last is a slice of its own, named after the node and the axis.
        step = helper.make_node("Slice", [], [f"{base}.axis{axis}"], name=f"{base}.axis{axis}")
        imp.add(step, "slice", [x], {"axis": axis, "start": start, "end": end})
        x = imp.values[step.output[0]]


def _bound(imp: Importer, node, x: Value, axis: int, bound: int | Dim) -> int:
    """A Slice bound as a number: x's own size on that axis (plus an offset) counts from
    the end, as a negative bound does; another run-time size is an error."""
    if not isinstance(bound, Dim):
        return int(bound)
    if bound.axis == axis and (bound.value is x or axis == 0):
        return bound.offset if bound.offset < 0 else _END
    if bound.known is not None:
        return bound.known
    raise onnx_shapes.runtime_size_error(imp, node, bound)


def _crop_axes(x: Value, starts: list, ends: list, axes: list[int]) -> tuple | None:
    """(ref, {axis: offset}) if on every axis it narrows the Slice starts at an offset and
    ends at the size of one other value ``ref`` plus that offset: part of a crop to ref."""
    if x.type.rank - 2 not in (1, 2) or not axes:
        return None
    offsets, refs = {}, set()
    for axis, start, end in zip(axes, starts, ends, strict=True):
        if not isinstance(end, Dim) or end.axis != axis or axis < 2 or end.value is x:
            return None
        if isinstance(start, Dim) or start != end.offset or end.value.type.rank != x.type.rank:
            return None
        offsets[axis] = int(start)
        refs.add(end.value)
    return (refs.pop(), offsets) if len(refs) == 1 else None


def _crop(imp: Importer, node, x: Value, ref: Value, offsets: dict[int, int]) -> bool:
    """Import a Slice that crops every spatial axis to ref's size as a crop (with the
    Slice of the other axes before it, as torch writes one Slice per axis); False if the
    crop is not complete."""
    earlier = imp.crops.get(x)
    source = x
    if (
        earlier is not None
        and earlier[0] is ref
        and not offsets.keys() & earlier[1].keys()
        and imp.consumers.get(node.input[0], 0) == 1
    ):
        offsets = {**earlier[1], **offsets}
        source = x.producer.inputs[0]
    spatial = list(range(2, x.type.rank))
    if sorted(offsets) != spatial:
        return False
    if source is not x:
        imp.graph.remove_node(x.producer)
    imp.add(node, "crop", [source, ref], {"offset": tuple(offsets[a] for a in spatial)})
    return True


# ---- the model ------------------------------------------------------------------------------


def _read(path: Path) -> onnx.ModelProto:
    where = str(path)
    try:
        if path.is_dir():
            raise ModelFileError("is a directory, not an ONNX model", where)
        if path.exists() and path.stat().st_size == 0:
            raise ModelFileError("not an ONNX model: the file is empty", where)
        # External data is read below, once its places and sizes are checked.
        model = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise ModelFileError("model file not found", where) from None
    except OSError as e:
        raise ModelFileError(f"cannot read the model: {e.strerror or e}", where) from None
    except (DecodeError, ValueError, RuntimeError, onnx.checker.ValidationError) as e:
        raise ModelFileError(
            f"not a readable ONNX model: {first_line(e)}",
            where,
            hint="an ONNX model is a ModelProto protobuf, as onnx.save and torch.onnx.export "
            "write it",
        ) from None
    _load_external_data(model, path.parent, where)
    return _check(model, where)


def _external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    from onnx import external_data_helper

    return [
        t
        for t in external_data_helper._get_all_tensors(model)
        if external_data_helper.uses_external_data(t)
    ]


def _load_external_data(model: onnx.ModelProto, folder: Path, where: str) -> None:
    """Read the external data of ``model``'s tensors from files in ``folder``, after
    checking that each file lies inside the folder, is a regular file, and holds the
    bytes its tensor's dims need (a lying length or dims never allocates)."""
    import stat

    from onnx import external_data_helper

    tensors = _external_tensors(model)
    if not tensors:
        return
    root = folder.resolve()
    for t in tensors:
        info = external_data_helper.ExternalDataInfo(t)
        name, location = t.name, info.location or ""
        target = (root / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(root):
            raise ModelFileError(
                f"initializer {name} keeps its data in {location!r}, outside the model's folder",
                where,
                hint="external data files must lie in the model's folder",
            )
        try:
            st = target.stat()
        except OSError as e:
            raise ModelFileError(
                f"initializer {name}: cannot read its data file {location}: {e.strerror}", where
            ) from None
        if not stat.S_ISREG(st.st_mode):
            raise ModelFileError(
                f"initializer {name}: its data file {location} is not a regular file", where
            )
        try:
            itemsize = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        except (KeyError, ValueError, TypeError):
            itemsize = 0
        if itemsize == 0 or t.data_type == onnx.TensorProto.STRING:
            raise ModelFileError(
                f"initializer {name} has external data of an unsupported type", where
            )
        count = 1
        for d in t.dims:
            count *= d
        needed = count * itemsize
        offset = info.offset or 0
        if info.length is not None and info.length != needed:
            raise ModelFileError(
                f"initializer {name}: its external data length {info.length:,} bytes does "
                f"not match its shape {list(t.dims)} ({needed:,} bytes)",
                where,
            )
        if min(t.dims, default=0) < 0 or offset < 0 or offset + needed > st.st_size:
            raise ModelFileError(
                f"initializer {name}: its shape {list(t.dims)} needs {needed:,} bytes at "
                f"offset {offset:,} of {location}, which holds {st.st_size:,}",
                where,
            )
    try:
        external_data_helper.load_external_data_for_model(model, str(root))
    except (OSError, ValueError, RuntimeError, onnx.checker.ValidationError) as e:
        raise ModelFileError(
            f"cannot read the model's external data: {first_line(e)}", where
        ) from None


# Ops that later onnx releases deprecated at the opsets they came in, but that import reads
# with that opset's meaning: the checker sees the rest of the model without them.
# (GroupNormalization at 18 to 20, whose scale and bias are per group.)
DEPRECATED_BUT_READ = {"GroupNormalization"}


def _checkable(model: onnx.ModelProto) -> onnx.ModelProto:
    if not any(n.op_type in DEPRECATED_BUT_READ for n in model.graph.node):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        if node.op_type in DEPRECATED_BUT_READ and node.domain in ("", "ai.onnx"):
            inputs, outputs = node.input[:1], node.output[:1]
            node.CopyFrom(helper.make_node("Identity", inputs, outputs, name=node.name))
    return copy


def _check(model: onnx.ModelProto, where: str) -> onnx.ModelProto:
    if not model.graph.node and not model.graph.output:
        raise ModelFileError("not an ONNX model: it has no graph", where)
    try:
        onnx.checker.check_model(_checkable(model))
    except (onnx.checker.ValidationError, ValueError) as e:
        # The checker's first line is its message, except where it names a node on the
        # lines after (topological order): then the whole message, on one line.
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
        first = lines[0] if lines else "invalid model"
        if first.endswith("of node:"):
            first = " ".join(lines[:3])
        raise ModelFileError(f"the model fails the ONNX checker: {first}", where) from None
    return model


def _read_normalizations(imp, props: dict[str, str], where: str) -> None:
    """The normalization of each input that cnnc wrote as metadata (cnnc.normalize.NAME)
    when it compiled a program that declares one; a value it cannot read is an error."""
    for key, text in props.items():
        if not key.startswith(preprocess.METADATA_PREFIX):
            continue
        name = key[len(preprocess.METADATA_PREFIX) :]
        value = imp.values.get(name)
        try:
            if value is None or value.type.rank != 4:
                raise CnncError(f"names no image input (N×C×H×W) of {imp.graph.name}")
            normalization = preprocess.parse_option(text)
            normalization.check_channels(value.type.shape[1])
        except CnncError as e:
            raise ModelFileError(f"metadata {key}={text[:60]!r}: {e.message}", where) from None
        imp.graph.preprocess[name] = normalization


def _min_input(text: str, where: str) -> tuple[int, ...]:
    """The smallest input sizes of a fully convolutional model cnnc wrote, from its
    metadata (``3x224x224``): anything else there means the file was edited or damaged."""
    parts = text.split("x")
    if not all(p.isascii() and p.isdigit() and len(p) <= 18 and int(p) > 0 for p in parts):
        raise ModelFileError(
            f"metadata {MIN_INPUT_KEY} is {text[:40]!r}, expected positive sizes such as 3x224x224",
            where,
            hint=f"cnnc writes {MIN_INPUT_KEY} for fully convolutional models; remove the "
            "entry or give the input's sizes without the batch",
        )
    return tuple(int(p) for p in parts)


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
            if d.dim_value < 1:
                raise imp.fail(
                    None, f"input {vi.name} has size {d.dim_value} at axis {i}; sizes are >= 1"
                )
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
    try:
        return TensorType(_DTYPES[t.elem_type], tuple(dims))
    except CnncError as e:
        raise imp.fail(None, f"input {vi.name}: {e.message}", e.hint) from None


# The largest constant that folding a node may make (1 GiB): a few bytes of ONNX
# (ConstantOfShape of [1,1,40000,40000], an outer product) must not allocate gigabytes at
# import. Weights that are that large come as initializers, whose bytes are in the file.
FOLD_LIMIT_BYTES = 1 << 30


def _check_fold_size(
    imp: Importer, node: onnx.NodeProto, model: onnx.ModelProto, feeds: dict[str, np.ndarray]
) -> None:
    """Refuse to fold a node whose outputs onnx's shape inference knows to be larger than
    FOLD_LIMIT_BYTES (small integer inputs, the shapes and repeats, are given as values)."""
    from onnx import shape_inference

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name, array in feeds.items():
        if array.dtype.kind in "iu" and array.size <= 64:
            probe.graph.initializer.append(numpy_helper.from_array(array, name))
    try:
        inferred = shape_inference.infer_shapes(probe, data_prop=True)
    except Exception:  # inference is only a guard here: the evaluator reports real faults
        return
    for out in inferred.graph.output:
        t = out.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if not t.HasField("shape") or None in dims:
            continue
        try:
            itemsize = helper.tensor_dtype_to_np_dtype(t.elem_type).itemsize
        except (KeyError, ValueError, TypeError):
            itemsize = 1
        size = math.prod(dims) * itemsize
        if size > FOLD_LIMIT_BYTES:
            raise imp.fail(
                node,
                f"this constant node would make a tensor of shape {dims} ({size:,} bytes) at "
                f"import; cnnc folds constants of at most {FOLD_LIMIT_BYTES:,} bytes",
            )
        _check_constant_bytes(imp, node, imp.constant_bytes + size, dims)


def _check_constant_bytes(imp: Importer, node: onnx.NodeProto, total: int, dims) -> None:
    """Refuse a folded constant that brings the model's constants (initializers and folded
    nodes together) past the limit param_bytes."""
    if total > limits.current().param_bytes:
        raise limits.exceeded(
            ModelFileError,
            "param_bytes",
            f"with the constant {list(dims)} this node computes, the model's constants take",
            total,
            imp.fail(node, "").where,
            unit="bytes",
        )


def fold(imp: Importer, node: onnx.NodeProto, feeds: dict[str, np.ndarray] | None = None) -> None:
    """Compute a node whose inputs are all constants (weights built by ConstantOfShape,
    Unsqueeze, Mul, ...; or ``feeds``) at import, with onnx.reference."""
    from onnx.reference import ReferenceEvaluator

    if feeds is None:
        feeds = {n: imp.constants[n] for n in node.input if n}
    inputs = [
        helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
        for n, a in feeds.items()
    ]
    outputs = [helper.make_value_info(o, onnx.TypeProto()) for o in node.output if o]
    graph = helper.make_graph([node], "fold", inputs, outputs)
    model = helper.make_model(graph, opset_imports=list(imp.model.opset_import))
    _check_fold_size(imp, node, model, feeds)
    try:
        results = ReferenceEvaluator(model).run(None, feeds)
    except Exception as e:  # whatever the reference raises, the node cannot be computed
        raise imp.fail(node, f"cannot compute this constant node: {e}") from None
    for name, value in zip([o for o in node.output if o], results, strict=True):
        imp.constants[name] = array = np.asarray(value)
        imp.constant_bytes += array.nbytes
        _check_constant_bytes(imp, node, imp.constant_bytes, array.shape)


def _noting_origins(graph: Graph, nodes: list[onnx.NodeProto], origins: dict[str, onnx.NodeProto]):
    """The ONNX nodes to import, one by one; the IR nodes added while one was imported are
    noted as coming from it (by name)."""
    for node in nodes:
        start = len(graph.nodes)
        yield node
        for new in graph.nodes[start:]:
            origins.setdefault(new.name, node)


def _import_node(imp: Importer, node: onnx.NodeProto) -> None:
    """Import one ONNX node: one of cnnc's functions, a constant, a shape computation, a
    node of constants folded now, or an op of IMPORTERS."""
    if node.domain == FUNCTION_DOMAIN and node.op_type in FUNCTIONS:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        FUNCTIONS[node.op_type](imp, node, _decoded(attrs))
        return
    fn = IMPORTERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
    if node.op_type == "Constant" and fn is not None:
        fn(imp, node, {a.name: helper.get_attribute_value(a) for a in node.attribute})
        return
    if node.domain in ("", "ai.onnx") and onnx_shapes.reads_indices(imp, node):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        onnx_shapes.compute_indices(imp, node, attrs)
        return
    if node.domain in ("", "ai.onnx") and onnx_shapes.reads_shape(imp, node):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        onnx_shapes.compute(imp, node, attrs)
        return
    if node.domain in ("", "ai.onnx") and all(n in imp.constants for n in node.input if n):
        fold(imp, node)
        return
    if fn is None:
        raise imp.fail(
            node,
            f"op {node.domain + '.' if node.domain else ''}{node.op_type} is not supported",
            hint="supported ops: " + ", ".join(sorted(IMPORTERS)),
        )
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    fn(imp, node, attrs)


# What a damaged model (an attribute of the wrong type or length, names in bytes that
# are not UTF-8) makes the import code or onnx raise, where no check names the problem.
MALFORMED = (TypeError, ValueError, IndexError, KeyError, AttributeError, OverflowError)
MALFORMED_HINT = (
    "its attributes or inputs are malformed; if onnxruntime runs the model, this is a "
    "bug in cnnc: please report it"
)


def _check_initializer_sizes(imp: Importer, g: onnx.GraphProto) -> None:
    """Refuse initializers whose declared dimensions no array can have, or whose bytes
    together pass the limit ``param_bytes``, before any is read into memory."""
    total = 0
    for init in g.initializer:
        try:
            itemsize = helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        except (KeyError, TypeError, ValueError):
            itemsize = 1  # an unknown type is refused where the tensor is read
        dims = list(init.dims)
        nbytes = tensor_bytes(dims, itemsize)
        if any(d < 0 for d in dims) or nbytes > INT64_MAX:
            raise imp.fail(
                None,
                f"initializer {init.name} has dimensions {format_dims(tuple(dims))}"
                + (" (negative)" if any(d < 0 for d in dims) else f", {nbytes:,} bytes")
                + ": no array can have them (sizes are at most 2**63-1 bytes)",
            )
        total += nbytes
        imp.constant_bytes = total
        if total > limits.current().param_bytes:
            raise limits.exceeded(
                ModelFileError,
                "param_bytes",
                f"with initializer {init.name} [{format_dims(tuple(dims))}], the model's "
                "initializers take",
                total,
                imp.where,
                unit="bytes",
            )


def load_onnx(source: str | Path | onnx.ModelProto, where: str | None = None) -> Graph:
    """Import an ONNX model (a file, or a ModelProto) into a verified IR graph."""
    if isinstance(source, onnx.ModelProto):
        model, base_dir = _check(source, where or "<model>"), None
        where = where or "<model>"
    else:
        path = Path(source)
        model, base_dir, where = _read(path), str(path.parent), str(path)
    try:
        return _import(model, base_dir, where)
    except (*MALFORMED, onnx.checker.ValidationError) as e:
        raise ModelFileError(
            f"cannot import the model: {first_line(e)}", where, hint=MALFORMED_HINT
        ) from e


def _import(model: onnx.ModelProto, base_dir: str | None, where: str) -> Graph:
    from cnnc.ir.verify import verify

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
        imp.min_input = _min_input(props[MIN_INPUT_KEY], where)
        imp.graph.flexible_spatial = True
    g = model.graph
    _check_initializer_sizes(imp, g)
    for init in g.initializer:
        imp.constants[init.name] = numpy_helper.to_array(init, base_dir=base_dir or "")
    nodes = onnx_patterns.rewrite(g, imp.constants)
    for name in [n for node in nodes for n in node.input] + [o.name for o in g.output]:
        imp.consumers[name] = imp.consumers.get(name, 0) + 1
    for vi in g.input:
        if vi.name not in imp.constants:
            imp.values[vi.name] = imp.graph.add_input(vi.name, _input_type(imp, vi))
    _read_normalizations(imp, props, where)
    origins: dict[str, onnx.NodeProto] = {}  # IR node name -> the ONNX node it came from
    for node in _noting_origins(imp.graph, nodes, origins):
        try:
            _import_node(imp, node)
        except MALFORMED as e:
            raise imp.fail(
                node, f"cannot import this node: {first_line(e)}", hint=MALFORMED_HINT
            ) from e
        except ModelFileError:
            raise
        except CnncError as e:
            # A limit reached while building (a shape no array can have, too many parameter
            # bytes) is a fault of the model file, reported at the node.
            raise imp.fail(node, e.message, e.hint) from None
    outputs = []
    for o in g.output:
        if o.name in imp.shapes:
            raise imp.fail(None, f"output {o.name} is a shape; cnnc computes outputs from inputs")
        if o.name in imp.constants and o.name not in imp.values:
            raise imp.fail(
                None, f"output {o.name} is a constant; cnnc computes outputs from inputs"
            )
        outputs.append(imp.value(None, o.name))
    imp.graph.outputs = outputs
    if model.producer_name != "cnnc":
        # cnnc's own models carry the program's names already.
        onnx_names.name_layers(imp.graph, origins, imp.constants)
    imp.graph.opt_level = "imported"
    verify(imp.graph)
    return imp.graph
