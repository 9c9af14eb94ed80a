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

import math
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


# ---- index tensors that run along the batch axis -----------------------------------------


@dataclass(frozen=True, eq=False)
class Indices:
    """An integer tensor whose element at batch index n (on axis ``axis``) is
    ``coef * n + base``, with ``coef`` and ``base`` int64 arrays of the tensor's rank and
    size 1 on ``axis``: what Range(0, batch size, 1) becomes through Mul, Add, Unsqueeze.
    ``batch`` is the value whose axis 0 gave the batch size."""

    batch: Value
    axis: int
    coef: np.ndarray
    base: np.ndarray

    @property
    def rank(self) -> int:
        return self.base.ndim


def _aligned(t: Indices, other: np.ndarray) -> tuple[Indices, np.ndarray]:
    """``t`` and a constant brought to one rank as broadcasting does (leading axes of 1);
    ValueError if the constant varies along the batch axis."""
    rank = max(t.rank, other.ndim)
    lead = rank - t.rank
    coef = t.coef.reshape((1,) * lead + t.coef.shape)
    base = t.base.reshape((1,) * lead + t.base.shape)
    other = other.reshape((1,) * (rank - other.ndim) + other.shape)
    axis = t.axis + lead
    if other.shape[axis] != 1:
        raise ValueError("a constant that varies along the batch axis")
    return Indices(t.batch, axis, coef, base), other


def _range(node, attrs, start, limit, delta) -> Indices:
    start, delta = materialize(start).reshape(-1), materialize(delta).reshape(-1)
    limit = limit.reshape(-1)
    if limit.dtype != object or not isinstance(limit[0], Dim) or not limit[0].is_batch:
        raise NotSymbolic
    if start.tolist() != [0] or delta.tolist() != [1]:
        raise ValueError("cnnc follows Range(0, batch size, 1) only")
    return Indices(limit[0].value, 0, np.ones(1, np.int64), np.zeros(1, np.int64))


def _indices_arithmetic(node, attrs, a, b):
    op = node.op_type
    if isinstance(b, Indices) and not isinstance(a, Indices):
        if op == "Sub":
            raise ValueError("a constant minus batch indices")
        a, b = b, a
    if isinstance(b, Indices):
        if a.batch is not b.batch or a.rank != b.rank or a.axis != b.axis or op == "Mul":
            raise ValueError("two batch index tensors combined")
        sign = 1 if op == "Add" else -1
        return Indices(a.batch, a.axis, a.coef + sign * b.coef, a.base + sign * b.base)
    a, c = _aligned(a, np.asarray(materialize(b), np.int64))
    if op == "Mul":
        return Indices(a.batch, a.axis, a.coef * c, a.base * c)
    return Indices(a.batch, a.axis, a.coef, a.base + (c if op == "Add" else -c))


def _indices_unsqueeze(node, attrs, t: Indices, axes=None) -> Indices:
    axes = attrs.get("axes") or _ints(axes)
    rank = t.rank + len(axes)
    coef, base, axis = t.coef, t.base, t.axis
    for a in sorted(a + rank if a < 0 else a for a in axes):
        coef, base = np.expand_dims(coef, a), np.expand_dims(base, a)
        axis += a <= axis
    return Indices(t.batch, axis, coef, base)


def _indices_cast(node, attrs, t: Indices) -> Indices:
    if attrs["to"] not in _INTEGER_TYPES:
        raise ValueError("batch indices cast to a non-integer type")
    return t


INDEX_OPS: dict[str, Callable[..., Indices]] = {
    "Identity": lambda node, attrs, t: t,
    "Cast": _indices_cast,
    "Unsqueeze": _indices_unsqueeze,
    **{op: _indices_arithmetic for op in ("Add", "Sub", "Mul")},
}


def reads_indices(imp: Importer, node: onnx.NodeProto) -> bool:
    """Whether a node makes or transforms batch indices: Range(0, batch size, 1), or an op
    of INDEX_OPS on them and constants."""
    names = [n for n in node.input if n]
    if node.op_type == "Range":
        return len(names) == 3 and names[1] in imp.shapes
    return any(n in imp.indices for n in names) and all(
        n in imp.indices or n in imp.constants or n in imp.shapes for n in names
    )


def compute_indices(imp: Importer, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
    """Follow a node of batch indices (reads_indices), or refuse it by name."""
    operands = [
        imp.indices[n] if n in imp.indices else _operand(imp, n) if n else None for n in node.input
    ]
    fn = _range if node.op_type == "Range" else INDEX_OPS.get(node.op_type)
    try:
        if fn is None:
            raise ValueError(f"{node.op_type} of them")
        result = fn(node, attrs, *operands)
    except NotSymbolic:
        return compute(imp, node, attrs)
    except (ValueError, IndexError, TypeError) as e:
        raise imp.fail(
            node,
            f"indices running over the batch cannot be followed here: {e}",
            hint="cnnc follows Range(0, batch size, 1) through Add, Sub, Mul by constants "
            "and Unsqueeze, into a Gather that copies a flattened tensor as it is "
            "(the dynamo exporter's as_strided)",
        ) from None
    except RuntimeSize as e:
        raise runtime_size_error(imp, node, e.dim) from None
    imp.indices[node.output[0]] = result


def is_identity_gather(x: Value, t: Indices | np.ndarray) -> bool:
    """Whether gathering from x flattened to one axis by ``t`` gives back x in its shape:
    element (n, i...) of the indices is n * (size of an item) + the item's offset of i."""
    shape = x.type.shape
    item = tuple(shape[1:])
    if not all(isinstance(d, int) for d in item):
        return False
    per_item = math.prod(item)
    offsets = np.arange(per_item, dtype=np.int64).reshape((1, *item))
    if isinstance(t, np.ndarray):
        if not isinstance(shape[0], int) or t.shape != tuple(shape):
            return False
        expected = np.arange(shape[0], dtype=np.int64).reshape((-1,) + (1,) * len(item))
        return bool(np.array_equal(t, expected * per_item + offsets))
    if t.batch is not x and t.batch.type.shape[0] != shape[0]:
        return False
    if t.axis != 0 or t.rank != len(shape):
        return False
    try:
        coef = np.broadcast_to(t.coef, (1, *item))
        base = np.broadcast_to(t.base, (1, *item))
    except ValueError:
        return False
    return bool((coef == per_item).all() and np.array_equal(base, offsets))


def runtime_size_error(imp: Importer, node: onnx.NodeProto, dim: Dim):
    """The error for a node that needs a run-time size as a number."""
    return imp.fail(
        node,
        f"{node.op_type} computes with {dim.describe()}, which is known only at run time",
        hint="cnnc keeps the batch axis (and a fully convolutional network's spatial axes) "
        "symbolic: a computed shape may carry the batch size only to position 0 of a "
        "Reshape's shape, and a spatial size only to a Slice's ends (a crop)",
    )
