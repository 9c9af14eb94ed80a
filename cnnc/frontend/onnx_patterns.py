"""ONNX patterns that compute one IR op with several nodes, rewritten into that one node
before import (exporters spell an op ONNX has no node for, or had none for at the model's
opset, as a small graph of standard ops).

    Mul(x, Sigmoid(x))                                ==>  cnnc.Silu(x)
    Mul(x, HardSigmoid(x, alpha=1/6, beta=1/2))       ==>  HardSwish(x)
    Mul(x, Tanh(Softplus(x)))                         ==>  Mish(x)
    Div(Softplus(Mul(x, beta)), beta)                 ==>  cnnc.Softplus(x, beta)
    x · 0.5 · (1 + Erf(x / √2))                       ==>  Gelu(x)
    x · 0.5 · (1 + Tanh(√(2/π) · (x + 0.044715·x³)))  ==>  Gelu(x, approximate=tanh)
    Resize(x, sizes=Concat(Shape(x)[0:2], s))         ==>  Resize(x, sizes=s, axes=spatial)
    d = Sub(x, ReduceMean(x)); Div(d, Sqrt(Add(ReduceMean(Pow(d, 2)), eps))) [· γ] [+ β]
                                                      ==>  cnnc.LayerNorm(x, γ, β, axis, eps)
    Reshape(InstanceNormalization(Reshape(x, [0, G, -1]), 1, 0), Shape(x)) [· γ] [+ β]
                                         ==>  cnnc.GroupNorm(x, γ, β, groups=G, broadcast=1)
    Conv(x, Unsqueeze(W [K, C])) (1×1, stride 1)      ==>  cnnc.Linear(x, W, axis=1)
    MatMul(x, Transpose(W [K, C]))                    ==>  cnnc.Linear(x, W, axis=-1)

The products may come in any order and grouping (torch writes (x · (1 + erf)) · 0.5),
x / √2 may be a Div or a Mul by 1/√2, x³ a Pow or products, and constants may be
initializers or Constant nodes; they must equal the formula's to 1e-4. The layer
normalization is the form older exporters write for LayerNorm (one ReduceMean axis,
keepdims; Pow(d, 2) or Mul(d, d)), the group normalization the form torch writes for
GroupNorm (the InstanceNormalization's own scale all ones, its bias all zeros); γ and β
are constants, or computed from constants only. The last two are how cnnc writes linear
over the channels and over the last axis, keeping W the [K, C] tensor it was.

The Resize pattern is how PyTorch (and cnnc before opset 18) writes a resize to a size
when the batch is symbolic: the first two sizes are the input's own (Shape with start 0
and end 2, or Shape then Slice 0:2), the rest constants.

Leaves alone (and why): a pattern whose inner values are read by anything outside it, or
are graph outputs (the inner values would be lost), and a different x in the two places;
a normalization followed by a Mul or Add by a constant waits for it (γ and β are part of
the pattern).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

FUNCTION_DOMAIN = "cnnc"


@dataclass
class _Graph:
    """The nodes of an ONNX graph with who produces and how many read each value."""

    nodes: list[onnx.NodeProto]
    constants: dict[str, np.ndarray]
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    readers: dict[str, int] = field(default_factory=dict)
    static: set[str] = field(default_factory=set)  # values computed from constants alone
    users: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)

    def __post_init__(self):
        for node in self.nodes:
            for out in node.output:
                self.producer[out] = node
            for name in node.input:
                self.users.setdefault(name, []).append(node)

    def scalar(self, name: str) -> float | None:
        value = self.constants.get(name)
        if value is None or value.size != 1 or not np.issubdtype(value.dtype, np.floating):
            return None
        return float(value.reshape(()))

    def op(self, name: str, op_type: str) -> onnx.NodeProto | None:
        """The node of type ``op_type`` producing ``name``, if nothing else reads ``name``."""
        node = self.producer.get(name)
        if node is None or node.op_type != op_type or node.domain not in ("", "ai.onnx"):
            return None
        return node if self.readers.get(name, 0) == 1 else None


def _close(value: float | None, expected: float) -> bool:
    return value is not None and abs(value - expected) <= 1e-4 * abs(expected)


def _factors(g: _Graph, name: str, inner: list[onnx.NodeProto]) -> list[str]:
    """The factors of a product of Muls (and Pow by 3) read by nothing else, flattened;
    the Mul and Pow nodes they pass through are added to ``inner``."""
    node = g.op(name, "Mul")
    if node is not None:
        inner.append(node)
        return _factors(g, node.input[0], inner) + _factors(g, node.input[1], inner)
    node = g.op(name, "Pow")
    if node is not None and _close(g.scalar(node.input[1]), 3.0):
        inner.append(node)
        return [node.input[0]] * 3
    return [name]


def _split(g: _Graph, factors: list[str], constant: float) -> list[str] | None:
    """``factors`` without the one scalar constant equal to ``constant``, or None."""
    for i, f in enumerate(factors):
        if _close(g.scalar(f), constant):
            return factors[:i] + factors[i + 1 :]
    return None


def _one_plus(g: _Graph, name: str, inner: list[onnx.NodeProto]) -> str | None:
    """``t`` where ``name`` is Add(t, 1) or Add(1, t), read by nothing else."""
    add = g.op(name, "Add")
    if add is None:
        return None
    a, b = add.input
    term = b if _close(g.scalar(a), 1.0) else a if _close(g.scalar(b), 1.0) else None
    if term is not None:
        inner.append(add)
    return term


def _gelu_erf(g: _Graph, gate: str, x: str, inner: list[onnx.NodeProto]) -> bool:
    """Whether ``gate`` is Erf(x / √2)."""
    erf = g.op(gate, "Erf")
    if erf is None:
        return False
    div = g.op(erf.input[0], "Div")
    if div is not None and div.input[0] == x and _close(g.scalar(div.input[1]), np.sqrt(2)):
        inner += [erf, div]
        return True
    found: list[onnx.NodeProto] = []
    factors = _split(g, _factors(g, erf.input[0], found), 1 / np.sqrt(2))
    if factors == [x]:
        inner += [erf, *found]
        return True
    return False


def _gelu_tanh(g: _Graph, gate: str, x: str, inner: list[onnx.NodeProto]) -> bool:
    """Whether ``gate`` is Tanh(√(2/π) · (x + 0.044715·x³))."""
    tanh = g.op(gate, "Tanh")
    if tanh is None:
        return False
    found: list[onnx.NodeProto] = [tanh]
    scaled = _split(g, _factors(g, tanh.input[0], found), np.sqrt(2 / np.pi))
    if scaled is None or len(scaled) != 1:
        return False
    add = g.op(scaled[0], "Add")
    if add is None:
        return False
    found.append(add)
    for linear, cubic in (add.input, add.input[::-1]):
        terms: list[onnx.NodeProto] = []
        if linear == x and _split(g, _factors(g, cubic, terms), 0.044715) == [x, x, x]:
            inner += [*found, *terms]
            return True
    return False


def _gelu(g: _Graph, root: onnx.NodeProto) -> tuple[list[onnx.NodeProto], onnx.NodeProto] | None:
    inner: list[onnx.NodeProto] = []
    factors = _factors(g, root.input[0], inner) + _factors(g, root.input[1], inner)
    factors = _split(g, factors, 0.5)
    if factors is None or len(factors) != 2:
        return None
    for x, sum_ in (factors, factors[::-1]):
        found = list(inner)
        gate = _one_plus(g, sum_, found)
        if gate is None:
            continue
        for tanh, match in ((False, _gelu_erf), (True, _gelu_tanh)):
            if match(g, gate, x, found):
                attrs = {"approximate": "tanh"} if tanh else {}
                return found, helper.make_node("Gelu", [x], list(root.output), root.name, **attrs)
    return None


def _gate(g: _Graph, root: onnx.NodeProto) -> tuple[list[onnx.NodeProto], onnx.NodeProto] | None:
    """Mul(x, f(x)) with f one of Sigmoid, HardSigmoid(1/6, 1/2), Tanh(Softplus)."""
    for x, gate in (root.input, root.input[::-1]):
        if (sigmoid := g.op(gate, "Sigmoid")) is not None and sigmoid.input[0] == x:
            return [sigmoid], helper.make_node("Silu", [x], [], domain=FUNCTION_DOMAIN)
        if (hard := g.op(gate, "HardSigmoid")) is not None and hard.input[0] == x:
            attrs = {a.name: helper.get_attribute_value(a) for a in hard.attribute}
            if _close(attrs.get("alpha", 0.2), 1 / 6) and _close(attrs.get("beta", 0.5), 0.5):
                return [hard], helper.make_node("HardSwish", [x], [])
        tanh = g.op(gate, "Tanh")
        softplus = tanh and g.op(tanh.input[0], "Softplus")
        if softplus is not None and softplus.input[0] == x:
            return [tanh, softplus], helper.make_node("Mish", [x], [])
    return None


def _softplus(g: _Graph, root: onnx.NodeProto) -> tuple | None:
    """Div(Softplus(Mul(x, beta)), beta): softplus with a beta, as torch exports it."""
    beta = g.scalar(root.input[1])
    softplus = g.op(root.input[0], "Softplus")
    scaled = softplus and g.op(softplus.input[0], "Mul")
    if beta is None or scaled is None:
        return None
    for x, b in (scaled.input, scaled.input[::-1]):
        if _close(g.scalar(b), beta) and x not in g.constants:
            new = helper.make_node(
                "Softplus", [x], list(root.output), root.name, domain=FUNCTION_DOMAIN, beta=beta
            )
            return [softplus, scaled], new
    return None


def _leading_sizes(g: _Graph, name: str, x: str) -> list[onnx.NodeProto] | None:
    """The nodes computing the sizes of x's first two axes as ``name``, if they do."""
    shape = g.op(name, "Shape")
    if shape is not None:
        attrs = {a.name: helper.get_attribute_value(a) for a in shape.attribute}
        if shape.input[0] == x and attrs.get("start", 0) == 0 and attrs.get("end") == 2:
            return [shape]
        return None
    sliced = g.op(name, "Slice")
    shape = sliced and g.op(sliced.input[0], "Shape")
    if shape is None or shape.input[0] != x or shape.attribute:
        return None
    bounds = [g.constants.get(n) if n else None for n in list(sliced.input[1:]) + [""] * 3]
    starts, ends, axes, steps = bounds[:4]
    if starts is None or ends is None or starts.reshape(-1).tolist() != [0]:
        return None
    if ends.reshape(-1).tolist() != [2] or (axes is not None and axes.reshape(-1).tolist() != [0]):
        return None
    if steps is not None and steps.reshape(-1).tolist() != [1]:
        return None
    return [sliced, shape]


def _resize_sizes(g: _Graph, root: onnx.NodeProto) -> tuple | None:
    """Resize(x, roi, scales, Concat(leading sizes of x, s)): Resize to s on the spatial axes."""
    if len(root.input) < 4 or not root.input[3]:
        return None
    concat = g.op(root.input[3], "Concat")
    if concat is None or len(concat.input) != 2 or concat.input[1] not in g.constants:
        return None
    inner = _leading_sizes(g, concat.input[0], root.input[0])
    if inner is None:
        return None
    spatial = g.constants[concat.input[1]].reshape(-1)
    new = onnx.NodeProto()
    new.CopyFrom(root)
    new.input[3] = concat.input[1]
    new.attribute.append(helper.make_attribute("axes", list(range(2, 2 + spatial.size))))
    return [concat, *inner], new


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _ints(g: _Graph, node: onnx.NodeProto, name: str, position: int) -> list[int] | None:
    """An ints attribute, or (in later opsets) the same as a constant input."""
    value = _attr(node, name)
    if value is None and len(node.input) > position and node.input[position] in g.constants:
        value = g.constants[node.input[position]].reshape(-1).tolist()
    return None if value is None else [int(v) for v in value]


def _by_static(g: _Graph, node: onnx.NodeProto | None, op_type: str) -> tuple[str, str] | None:
    """(the computed operand, the static one) of ``node`` if it is ``op_type`` of a value
    and a constant (or a value computed from constants)."""
    if node is None or node.op_type != op_type or node.domain not in ("", "ai.onnx"):
        return None
    if len(node.input) != 2:
        return None
    a, b = node.input
    if b in g.static and a not in g.static:
        return a, b
    if a in g.static and b not in g.static:
        return b, a
    return None


def _continues(g: _Graph, node: onnx.NodeProto, ops: tuple[str, ...]) -> bool:
    """Whether the one reader of ``node``'s output is a Mul or Add (in ``ops``) by a constant:
    the affine part of a normalization, which the pattern then ends with."""
    users = g.users.get(node.output[0], [])
    return (
        g.readers.get(node.output[0], 0) == 1
        and len(users) == 1
        and any(_by_static(g, users[0], op) for op in ops)
    )


def _affine_tail(g: _Graph, root: onnx.NodeProto, core: str):
    """Peel [Mul by γ] [Add by β] off ``root`` down to the ``core`` node: (core node, γ, β,
    the peeled nodes), or None (also when the pattern goes on after ``root``)."""
    inner: list[onnx.NodeProto] = []
    gamma = beta = ""
    node: onnx.NodeProto | None = root
    if root.op_type == core and _continues(g, root, ("Mul", "Add")):
        return None
    if root.op_type == "Mul" and _continues(g, root, ("Add",)):
        return None
    if (found := _by_static(g, node, "Add")) is not None:
        inner.append(node)
        name, beta = found
        node = g.producer.get(name) if g.readers.get(name, 0) == 1 else None
    if (found := _by_static(g, node, "Mul")) is not None:
        inner.append(node)
        name, gamma = found
        node = g.producer.get(name) if g.readers.get(name, 0) == 1 else None
    if node is None or node.op_type != core or node.domain not in ("", "ai.onnx"):
        return None
    return node, gamma, beta, inner


def _layernorm(g: _Graph, root: onnx.NodeProto) -> tuple | None:
    """Div(d, Sqrt(Add(ReduceMean(Pow(d, 2)), eps))) with d = Sub(x, ReduceMean(x)), then
    [Mul by γ] [Add by β]: what older exporters write for LayerNorm."""
    tail = _affine_tail(g, root, "Div")
    if tail is None:
        return None
    div, gamma, beta, inner = tail
    deviation, root_std = div.input
    sqrt = g.op(root_std, "Sqrt")
    add = sqrt and g.op(sqrt.input[0], "Add")
    sub = g.producer.get(deviation)
    if add is None or sub is None or sub.op_type != "Sub":
        return None
    epsilon = next((g.scalar(n) for n in add.input if g.scalar(n) is not None), None)
    variance = next((n for n in add.input if g.scalar(n) is None), None)
    mean_of_squares = variance and g.op(variance, "ReduceMean")
    x, mean = sub.input
    mean_node = g.op(mean, "ReduceMean")
    if epsilon is None or mean_of_squares is None or mean_node is None:
        return None
    square = g.op(mean_of_squares.input[0], "Pow") or g.op(mean_of_squares.input[0], "Mul")
    if square is None or square.input[0] != deviation or mean_node.input[0] != x:
        return None
    if square.op_type == "Pow" and not _close(g.scalar(square.input[1]), 2.0):
        return None
    if square.op_type == "Mul" and square.input[1] != deviation:
        return None
    # d is read by the square (twice by Mul(d, d)) and the Div, and by nothing else.
    if g.readers.get(deviation) != len(square.input) + 1 - (square.op_type == "Pow"):
        return None
    axes = _ints(g, mean_node, "axes", 1)
    if axes is None or len(axes) != 1 or _ints(g, mean_of_squares, "axes", 1) != axes:
        return None
    if any(_attr(n, "keepdims", 1) != 1 for n in (mean_node, mean_of_squares)):
        return None
    inner += [div, sqrt, add, mean_of_squares, square, sub, mean_node]
    new = helper.make_node(
        "LayerNorm",
        [x, gamma, beta],
        list(root.output),
        root.name,
        domain=FUNCTION_DOMAIN,
        axis=axes[0],
        epsilon=epsilon,
    )
    return inner, new


def _groupnorm(g: _Graph, root: onnx.NodeProto) -> tuple | None:
    """Reshape(InstanceNormalization(Reshape(x, [0, G, -1]), ones, zeros), Shape(x)), then
    [Mul by γ] [Add by β]: what torch writes for GroupNorm."""
    tail = _affine_tail(g, root, "Reshape")
    if tail is None:
        return None
    back, gamma, beta, inner = tail
    norm = g.op(back.input[0], "InstanceNormalization")
    shape = g.op(back.input[1], "Shape")
    grouped = norm and g.op(norm.input[0], "Reshape")
    if grouped is None or shape is None or shape.input[0] != grouped.input[0]:
        return None
    if _attr(shape, "start", 0) != 0 or _attr(shape, "end") is not None:
        return None  # the shape of some of x's axes only
    target = g.constants.get(grouped.input[1])
    scale, bias = (g.constants.get(n) for n in norm.input[1:3])
    if target is None or target.size != 3 or int(target.reshape(-1)[1]) < 1:
        return None
    if scale is None or bias is None or not (scale == 1).all() or (bias != 0).any():
        return None
    inner += [back, norm, shape, grouped]
    new = helper.make_node(
        "GroupNorm",
        [grouped.input[0], gamma, beta],
        list(root.output),
        root.name,
        domain=FUNCTION_DOMAIN,
        groups=int(target.reshape(-1)[1]),
        epsilon=float(_attr(norm, "epsilon", 1e-5)),
        broadcast=1,
    )
    return inner, new


def _pointwise_conv(g: _Graph, root: onnx.NodeProto) -> tuple | None:
    """Conv(x, Unsqueeze(W, [2, 3]) or Reshape(W, [K, C, 1, 1]), b), 1×1, stride 1, no
    padding, one group: a linear layer over the channels with W [K, C]."""
    weight_name = root.input[1]
    shaper = g.op(weight_name, "Unsqueeze") or g.op(weight_name, "Reshape")
    w = shaper and g.constants.get(shaper.input[0])
    if w is None or w.ndim != 2:
        return None
    if shaper.op_type == "Unsqueeze":
        axes = _ints(g, shaper, "axes", 1)
        if axes is None or sorted(a % (2 + len(axes)) for a in axes) != list(
            range(2, 2 + len(axes))
        ):
            return None
        rank = 2 + len(axes)
    else:
        shape = g.constants.get(shaper.input[1])
        if (
            shape is None
            or list(shape.reshape(-1)[:2]) != list(w.shape)
            or any(shape.reshape(-1)[2:] != 1)
        ):
            return None
        rank = shape.size
    if rank not in (3, 4):
        return None
    spatial = rank - 2
    expected = {
        "strides": [1] * spatial,
        "dilations": [1] * spatial,
        "pads": [0] * 2 * spatial,
        "kernel_shape": [1] * spatial,
        "group": 1,
    }
    for a in root.attribute:
        value = helper.get_attribute_value(a)
        if a.name == "auto_pad" and value in (b"NOTSET", b"VALID", "NOTSET", "VALID"):
            continue
        if a.name not in expected or list(np.atleast_1d(value)) != list(
            np.atleast_1d(expected[a.name])
        ):
            return None
    inputs = [root.input[0], shaper.input[0], *root.input[2:3]]
    new = helper.make_node(
        "Linear", inputs, list(root.output), root.name, domain=FUNCTION_DOMAIN, axis=1
    )
    return [shaper], new


def _matmul_transposed(g: _Graph, root: onnx.NodeProto) -> tuple | None:
    """MatMul(x, Transpose(W)) with a constant W [K, C]: a linear layer over the last axis."""
    transpose = g.op(root.input[1], "Transpose")
    w = transpose and g.constants.get(transpose.input[0])
    if w is None or w.ndim != 2 or _attr(transpose, "perm", [1, 0]) != [1, 0]:
        return None
    new = helper.make_node(
        "Linear",
        [root.input[0], transpose.input[0]],
        list(root.output),
        root.name,
        domain=FUNCTION_DOMAIN,
        axis=-1,
    )
    return [transpose], new


_ROOTS = {
    "Add": (_layernorm, _groupnorm),
    "Mul": (_layernorm, _groupnorm),
    "Div": (_layernorm,),
    "Reshape": (_groupnorm,),
    "Conv": (_pointwise_conv,),
    "MatMul": (_matmul_transposed,),
}


def _match(g: _Graph, root: onnx.NodeProto) -> tuple[list[onnx.NodeProto], onnx.NodeProto] | None:
    if root.op_type == "Resize" and root.domain in ("", "ai.onnx"):
        return _resize_sizes(g, root)
    if root.domain in ("", "ai.onnx") and len(root.input) >= 2:
        for match in _ROOTS.get(root.op_type, ()):
            if (found := match(g, root)) is not None:
                inner, new = found
                return [n for n in inner if n is not root], new
    if root.op_type == "Div" and root.domain in ("", "ai.onnx") and len(root.input) == 2:
        return _softplus(g, root)
    if root.op_type != "Mul" or root.domain not in ("", "ai.onnx") or len(root.input) != 2:
        return None
    found = _gate(g, root)
    if found is None:
        return _gelu(g, root)
    inner, new = found
    new.output[:] = root.output
    new.name = root.name
    return inner, new


def rewrite(graph: onnx.GraphProto, constants: dict[str, np.ndarray]) -> list[onnx.NodeProto]:
    """The nodes of ``graph`` with every pattern rewritten into its one node (at the place of
    the pattern's last node); ``graph`` itself is left as it is."""
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    for out in graph.output:
        readers[out.name] = readers.get(out.name, 0) + 1
    known = dict(constants)
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1:
            attr = node.attribute[0]
            if attr.name == "value":
                known[node.output[0]] = numpy_helper.to_array(attr.t)
            elif attr.name == "value_float":
                known[node.output[0]] = np.array(attr.f, np.float32)
            elif attr.name == "value_ints":
                known[node.output[0]] = np.array(attr.ints, np.int64)
    static = set(constants) | {n.output[0] for n in graph.node if n.op_type == "Constant"}
    for node in graph.node:
        inputs = [i for i in node.input if i]
        if node.domain in ("", "ai.onnx") and inputs and all(i in static for i in inputs):
            static.update(node.output)
    nodes = list(graph.node)
    removed: set[int] = set()
    view = None  # the graph as it is now; built again only after a rewrite changed it
    for root in list(nodes):
        if id(root) in removed:
            continue
        if view is None:
            view = _Graph(nodes, known, readers=readers, static=static)
        found = _match(view, root)
        if found is None:
            continue
        inner, new = found
        # The exporter's metadata (PyTorch's module scope, say) describes the pattern's node.
        new.metadata_props.extend(root.metadata_props)
        gone = {id(n) for n in inner}
        removed |= gone | {id(root)}
        nodes = [new if n is root else n for n in nodes if id(n) not in gone]
        view = None
    return nodes
