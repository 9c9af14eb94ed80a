"""Shapes an ONNX model computes at run time, followed at import so that what they compute
becomes IR attributes.

Exporters compute sizes inside the graph where an axis is dynamic: torch writes
ShuffleNet v2's channel shuffle as Shape(x) -> Gather -> Unsqueeze -> Concat -> Reshape,
the batch size taken from x at run time, and its chunk as Shape -> Gather -> Add -> Div
-> ... -> Split. The importer keeps such integer tensors as arrays whose elements are
ints or Dims (one size of an IR value, plus an offset) and computes with them:

    Shape(x)                                [Dim(x, 0), Dim(x, 1), ...]  (known sizes kept)
    Gather, Slice, Concat, Unsqueeze,       move elements
      Squeeze, Reshape, Expand, Identity,
      Cast to an integer type
    Add, Sub of a Dim and an int            a Dim with an offset (Shape(ref)[2:] + 19)
    any arithmetic on known sizes           ints
    any other node whose sizes are known    computed with onnx.reference

An array with no Dim left is an ordinary constant. Consumers read them: Reshape (the batch
size at position 0 keeps the batch: ONNX's 0), Slice (an end Shape(ref) + offset on every
spatial axis is a crop to ref, an end of x's own size is "to the end"), Split's sizes,
Pad's pads, and any importer through Importer.constant. A size known only at run time
(the symbolic batch, or a fully convolutional network's spatial sizes) used as a number
is an error naming the node: cnnc never bakes a run-time size into the IR.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from cnnc.ir.graph import Value
from cnnc.ops.tensor import SPATIAL_AXES

if TYPE_CHECKING:
    from cnnc.frontend.onnx_import import Importer


@dataclass(frozen=True, eq=False)
class Dim:
    """The size of ``value`` on ``axis`` plus ``offset``; ``known`` is that number when the
    import knows it (every size but the batch, in a network of fixed spatial sizes)."""

    value: Value
    axis: int
    offset: int = 0
    known: int | None = None

    @property
    def is_batch(self) -> bool:
        """Whether this is the batch size itself, known only at run time."""
        return self.axis == 0 and self.offset == 0 and self.known is None

    def shifted(self, by: int) -> Dim:
        known = None if self.known is None else self.known + by
        return Dim(self.value, self.axis, self.offset + by, known)

    def describe(self) -> str:
        if self.axis == 0:
            what = "the batch size"
        else:
            names = ("channels", *SPATIAL_AXES.get(self.value.type.rank - 2, ()))
            name = names[self.axis - 1] if self.axis - 1 < len(names) else f"axis {self.axis}"
            what = f"the {name} of %{self.value.name} in a fully convolutional network"
        return what + (f" {self.offset:+d}" if self.offset else "")


class RuntimeSize(Exception):
    """A computation needs, as a number, a size known only at run time."""

    def __init__(self, dim: Dim):
        super().__init__(dim.describe())
        self.dim = dim


class NotSymbolic(Exception):
    """The node is not one this module follows with Dims (it may still be computable)."""


def number(d: Any) -> int:
    """``d`` as a number: an int, or a Dim whose size is known."""
    if isinstance(d, Dim):
        if d.known is None:
            raise RuntimeSize(d)
        return d.known
    return d


def _add(a: Any, b: Any) -> Any:
    if isinstance(a, Dim) and not isinstance(b, Dim):
        return a.shifted(number(b)) if _is_int(b) else number(a) + b
    if isinstance(b, Dim) and not isinstance(a, Dim):
        return _add(b, a)
    return number(a) + number(b)


def _sub(a: Any, b: Any) -> Any:
    if isinstance(a, Dim) and isinstance(b, Dim):
        if a.value is b.value and a.axis == b.axis:
            return a.offset - b.offset  # the same size on both sides cancels
        return number(a) - number(b)
    if isinstance(a, Dim) and _is_int(b):
        return a.shifted(-b)
    return number(a) - number(b)


def _div(a: Any, b: Any) -> Any:
    a, b = number(a), number(b)
    if _is_int(a) and _is_int(b):
        # ONNX divides integers truncating toward zero, as C does.
        quotient = abs(a) // abs(b)
        return quotient if (a >= 0) == (b > 0) else -quotient
    return a / b


def _is_int(v: Any) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _known(fn: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    return lambda a, b: fn(number(a), number(b))


_ARITHMETIC: dict[str, Callable[[Any, Any], Any]] = {
    "Add": _add,
    "Sub": _sub,
    "Mul": _known(operator.mul),
    "Div": _div,
    "Mod": _known(operator.mod),
    "Max": _known(max),
    "Min": _known(min),
}
_INTEGER_TYPES = {
    onnx.TensorProto.INT64,
    onnx.TensorProto.INT32,
    onnx.TensorProto.INT16,
    onnx.TensorProto.INT8,
    onnx.TensorProto.UINT64,
    onnx.TensorProto.UINT32,
    onnx.TensorProto.UINT16,
    onnx.TensorProto.UINT8,
}


def has_dims(array: np.ndarray) -> bool:
    return array.dtype == object and any(isinstance(d, Dim) for d in array.flat)


def materialize(array: np.ndarray) -> np.ndarray:
    """An array of Dims and ints as int64 numbers; RuntimeSize if one is not known."""
    if array.dtype != object:
        return array
    return np.array([number(d) for d in array.flat], np.int64).reshape(array.shape)


def shape_of(imp: Importer, node: onnx.NodeProto, x: Value, attrs: dict[str, Any]) -> None:
    """ONNX Shape of an IR value: one Dim per axis (opset 15's start and end select some)."""
    flexible = imp.graph.flexible_spatial
    dims = []
    for axis, size in enumerate(x.type.shape):
        runtime = not isinstance(size, int) or (flexible and axis >= 2)
        dims.append(Dim(x, axis, 0, None if runtime else size))
    rank = len(dims)
    start, end = attrs.get("start", 0), attrs.get("end", rank)
    start, end, _ = slice(start, end).indices(rank)
    array = np.empty(max(end - start, 0), object)
    array[:] = dims[start:end]
    imp.shapes[node.output[0]] = array


# ---- nodes computing on shapes ------------------------------------------------------------


def _ints(array: np.ndarray | None) -> list[int]:
    return [] if array is None else [int(v) for v in materialize(array).reshape(-1)]


def _gather(node, attrs, data, indices):
    return np.take(data, materialize(indices), axis=attrs.get("axis", 0))


def _unsqueeze(node, attrs, data, axes=None):
    axes = attrs.get("axes") or _ints(axes)
    rank = data.ndim + len(axes)
    for axis in sorted(a + rank if a < 0 else a for a in axes):
        data = np.expand_dims(data, axis)
    return data


def _squeeze(node, attrs, data, axes=None):
    axes = attrs.get("axes") or _ints(axes)
    if not axes:
        return np.squeeze(data)
    return np.squeeze(data, axis=tuple(a + data.ndim if a < 0 else a for a in axes))


def _concat(node, attrs, *arrays):
    return np.concatenate(arrays, axis=attrs["axis"])


def _slice(node, attrs, data, starts=None, ends=None, axes=None, steps=None):
    starts = attrs.get("starts") or _ints(starts)
    ends = attrs.get("ends") or _ints(ends)
    axes = attrs.get("axes") or _ints(axes) or list(range(len(starts)))
    steps = _ints(steps) or [1] * len(starts)
    index = [slice(None)] * data.ndim
    for axis, start, end, step in zip(axes, starts, ends, steps, strict=True):
        index[axis] = slice(start, end, step)
    return data[tuple(index)]


def _reshape(node, attrs, data, shape):
    target = _ints(shape)
    target = [data.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return data.reshape(target)


def _expand(node, attrs, data, shape):
    target = np.broadcast_shapes(data.shape, tuple(_ints(shape)))
    return np.broadcast_to(data, target).copy()


def _cast(node, attrs, data):
    if attrs["to"] not in _INTEGER_TYPES:
        raise NotSymbolic
    return data


def _shape(node, attrs, data):
    rank = data.ndim
    start, end, _ = slice(attrs.get("start", 0), attrs.get("end", rank)).indices(rank)
    return np.array(data.shape[start:end], np.int64)


def _arithmetic(fn: Callable[[Any, Any], Any]):
    elementwise = np.frompyfunc(fn, 2, 1)

    def compute(node, attrs, *arrays):
        # Sizes are integers: arithmetic with floats (a scale) is computed on known sizes.
        if any(a.dtype != object for a in arrays):
            raise NotSymbolic
        result = arrays[0]
        for other in arrays[1:]:
            result = elementwise(result, other)
        return np.asarray(result, dtype=object)

    return compute


SHAPE_OPS: dict[str, Callable[..., np.ndarray]] = {
    "Identity": lambda node, attrs, data: data,
    "Cast": _cast,
    "Gather": _gather,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Concat": _concat,
    "Slice": _slice,
    "Reshape": _reshape,
    "Expand": _expand,
    "Shape": _shape,
    **{op: _arithmetic(fn) for op, fn in _ARITHMETIC.items()},
}


def reads_shape(imp: Importer, node: onnx.NodeProto) -> bool:
    """Whether a node computes on shapes only: it reads a shape with Dims, and otherwise
    constants."""
    names = [n for n in node.input if n]
    return any(n in imp.shapes for n in names) and all(
        n in imp.shapes or n in imp.constants for n in names
    )


def compute(imp: Importer, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
    """Compute a node that reads shapes: with Dims where SHAPE_OPS has the op, else with
    onnx.reference on the known sizes. Its outputs are shapes, or constants if no Dim is
    left in them."""
    from cnnc.frontend.onnx_import import fold

    inputs = [_operand(imp, n) if n else None for n in node.input]
    try:
        fn = SHAPE_OPS.get(node.op_type)
        if fn is None or len(node.output) != 1:
            raise NotSymbolic
        results = [np.asarray(fn(node, attrs, *inputs))]
    except (ValueError, IndexError, TypeError) as e:
        raise imp.fail(node, f"cannot compute this shape: {e}") from None
    except NotSymbolic:
        try:
            feeds = {n: materialize(a) for n, a in zip(node.input, inputs, strict=True) if n}
        except RuntimeSize as e:
            raise runtime_size_error(imp, node, e.dim) from None
        fold(imp, node, feeds)
        return
    except RuntimeSize as e:
        raise runtime_size_error(imp, node, e.dim) from None
    for name, result in zip(node.output, results, strict=True):
        if has_dims(result):
            imp.shapes[name] = result
        else:
            imp.constants[name] = materialize(result) if result.dtype == object else result


def _operand(imp: Importer, name: str) -> np.ndarray:
    if name in imp.shapes:
        return imp.shapes[name]
    array = imp.constants[name]
    return array.astype(object) if np.issubdtype(array.dtype, np.integer) else array


def runtime_size_error(imp: Importer, node: onnx.NodeProto, dim: Dim):
    """The error for a node that needs a run-time size as a number."""
    return imp.fail(
        node,
        f"{node.op_type} computes with {dim.describe()}, which is known only at run time",
        hint="cnnc keeps the batch axis (and a fully convolutional network's spatial axes) "
        "symbolic: a computed shape may carry the batch size only to position 0 of a "
        "Reshape's shape, and a spatial size only to a Slice's ends (a crop)",
    )
