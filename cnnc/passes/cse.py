"""cse: common-subexpression elimination; nodes that compute the same thing from the
same values become one.

    a = conv(x, W1, b1); c = conv(x, W2, b2); y = add(a, c)
        ==>  a = conv(x, W1, b1); y = add(a, a)          (W2 holds W1's values, b2 b1's)
    a = relu(x); c = relu(x); y = concat(a, c)  ==>  a = relu(x); y = concat(a, a)

Two nodes are the same when they have the same op, the same attributes and the same
inputs: the same values, or parameters of the same type holding the same bytes (two
initializers with identical weights, which exporters write for shared modules). It
goes through the nodes in order, so the readers of a merged node may merge next; and
again until nothing changes. Parameters are compared lazily and only between nodes
that are otherwise the same: two seeded random tensors drawn under different names are
different without drawing either; any other pair is hashed (BLAKE2b of its bytes) and
then compared byte for byte (so 0.0 and -0.0 differ, and a NaN equals only the same NaN).

Leaves alone (and why):
- dropout and drop_path, and the training step's random or stateful ops (bn_train,
  sgd_update, adam_update): in training each draws its own mask or updates its own state;
- two nodes whose outputs are both network outputs: each keeps its name;
- parameters that merely look alike (random weights with different names, weights that
  differ in one bit).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from cnnc.ir.graph import Graph, Node, Value
from cnnc.weights import _Initial

UNMERGEABLE = frozenset({"dropout", "drop_path", "bn_train", "sgd_update", "adam_update"})


class _Unhashable(Exception):
    """An attribute this pass cannot compare (then the node is left alone)."""


def _freeze(value: Any) -> Any:
    """An attribute value as a hashable key that tells apart what compares differently
    (0.0 and -0.0, 1 and 1.0 and True)."""
    if isinstance(value, dict):
        return ("d", tuple(sorted((k, _freeze(v)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return ("t", tuple(_freeze(v) for v in value))
    if isinstance(value, np.ndarray):
        return ("a", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, (float, np.floating)):
        return ("f", float(value).hex())
    if value is None or isinstance(value, (str, bool, int, np.integer)):
        return (type(value).__name__, value)
    raise _Unhashable(type(value).__name__)


def _random_draw(p: Value) -> tuple | None:
    """What identifies a parameter's seeded random tensor (name, shape, rule, seed), if it
    is one not drawn yet; None otherwise (a constant rule fills every tensor alike)."""
    thunk = p._thunk
    if p.in_memory or not isinstance(thunk, _Initial):
        return None
    if thunk.init is not None and thunk.init[0] == "constant":
        return None
    return (thunk.name, thunk.shape, thunk.init, thunk.seed)


class _Contents:
    """Parameter contents, hashed at most once each while the pass runs."""

    def __init__(self):
        self.digests: dict[int, bytes] = {}

    def digest(self, p: Value) -> bytes:
        key = id(p)
        if key not in self.digests:
            self.digests[key] = hashlib.blake2b(_bytes(p)).digest()
        return self.digests[key]

    def same(self, a: Value, b: Value) -> bool:
        if a is b:
            return True
        if a.type != b.type:
            return False
        ra, rb = _random_draw(a), _random_draw(b)
        if ra is not None and rb is not None:
            return ra == rb
        # Anything else (weights read from a file, tensors derived from others) only
        # its bytes tell.
        return self.digest(a) == self.digest(b) and np.array_equal(_bytes(a), _bytes(b))


def _bytes(p: Value) -> np.ndarray:
    # compute_data: a lazy tensor is not kept after the comparison.
    return np.ascontiguousarray(p.compute_data()).reshape(-1).view(np.uint8)


def _inputs_key(node: Node) -> tuple:
    return (node.op, *(("p", v.type) if v.is_param else id(v) for v in node.inputs))


class _Attrs:
    """Nodes' attributes as keys, made only for nodes that share an op and inputs with
    another (most nodes share them with none)."""

    def __init__(self):
        self.keys: dict[int, Any] = {}

    def same(self, a: Node, b: Node) -> bool:
        return self.key(a) == self.key(b)

    def key(self, node: Node) -> Any:
        if id(node) not in self.keys:
            try:
                self.keys[id(node)] = _freeze(node.attrs)
            except _Unhashable:
                self.keys[id(node)] = object()  # equal to nothing else
        return self.keys[id(node)]


def _same_params(a: Node, b: Node, contents: _Contents) -> bool:
    return all(contents.same(u, v) for u, v in zip(a.inputs, b.inputs, strict=True) if u.is_param)


def _sweep(graph: Graph, contents: _Contents) -> bool:
    seen: dict[tuple, list[Node]] = {}
    attrs = _Attrs()
    outputs = {id(v) for v in graph.outputs}
    changed = False
    for node in list(graph.nodes):  # the list keeps removed nodes, and so their ids, alive
        if node.op in UNMERGEABLE:
            continue
        key = _inputs_key(node)
        kept = seen.get(key)
        if kept is None:  # most nodes: no other has its op and inputs
            seen[key] = [node]
            continue
        named = any(id(v) in outputs for v in node.outputs)
        for other in kept:
            if named and any(id(v) in outputs for v in other.outputs):
                continue
            if not attrs.same(other, node) or not _same_params(other, node, contents):
                continue
            for old, new in zip(node.outputs, other.outputs, strict=True):
                graph.replace_uses(old, new)
            graph.remove_node(node)
            outputs = {id(v) for v in graph.outputs}
            changed = True
            break
        else:
            kept.append(node)
    return changed


def cse(graph: Graph) -> bool:
    """Merge every node into an earlier one that computes the same; returns whether the
    graph changed."""
    contents = _Contents()
    changed = False
    while _sweep(graph, contents):
        changed = True
    return changed
