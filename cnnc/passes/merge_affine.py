"""merge-affine: consecutive per-channel scales and shifts (bn, affine, scale) become one.

Each of these ops computes y = x·s + t per channel (axis 1): a bn with
s = gamma / sqrt(var + eps) and t = beta - mean·s, an affine with its weight and bias, a
scale with its weight and t = 0. Two in a row are one:

    y = scale(x, a); z = scale(y, b)          ==>  z = scale(x, a·b)
    y = affine(x, a, c); z = affine(y, b, d)  ==>  z = affine(x, a·b, c·b + d)
        (a scale is an affine with c = 0 or d = 0)
    y = bn(x, g, beta, m, v); z = affine(y, b, d)
        ==>  z = bn(x, g·b, beta·b + d, m, v)
    y = affine(x, a, c); z = bn(y, g, beta, m, v)
        ==>  z = bn(x, g·a, beta + (c - m + m·a)·s, m, v)     s = g / sqrt(v + eps)
        (also a scale, and a bn, as its x·a + c, before a bn)

The merged node takes the later node's name and output. A bn stays a bn, keeping its
statistics: one BatchNormalization is what exports cheapest (see README, "ONNX export").
DenseNet-121 from ONNX's model zoo has bn → Mul → Add after every concat: one bn each.

The parameters of the merged node are those of the node that keeps its place, recomputed;
a parameter that another node reads too is left as it is and the merged node gets a copy
(``<name>.2``).

Leaves alone (and why):
- a pair whose first output has other users, or is a network output: they need the value
  between the two;
- a bn, affine or scale whose parameters are values of the run (a training step's graph
  feeds them): there is no constant to merge;
- the same ops separated by another op, even one that keeps the channels apart (a relu,
  a concat): merging through them is not exact, or not worth its complexity.
"""

from __future__ import annotations

import numpy as np

from cnnc.ir.graph import Graph, Node, Value
from cnnc.ops.norm import CHANNEL_NORMS as NORMS
from cnnc.ops.norm import channel_scale_shift, has_constant_params


def _mergeable(graph: Graph, node: Node) -> Node | None:
    """The bn, affine or scale right before ``node`` that merges into it, or None."""
    y = node.inputs[0]
    first = y.producer
    if first is None or first.op not in NORMS or node.op not in NORMS:
        return None
    if len(y.users) != 1 or y in graph.outputs:
        return None
    if not (has_constant_params(first) and has_constant_params(node)):
        return None
    return first


def _recomputed(graph: Graph, param: Value, owner: Node, data: np.ndarray) -> Value:
    """``param`` (read by ``owner``) holding ``data`` now; a copy if another node reads it."""
    data = data.astype(param.type.numpy_dtype).reshape(param.shape)
    if len(param.users) == 1 and param not in graph.outputs:
        param.set_data(data)
        return param
    copy = graph.add_param(graph.unique_name(param.name), param.shape, dtype=param.type.dtype)
    copy.set_data(data)
    return copy


def _merge(graph: Graph, first: Node, node: Node) -> None:
    x = first.inputs[0]
    # Per-channel vectors are small: computed now, from the values the nodes hold now.
    a, c = channel_scale_shift(first)
    b, d = channel_scale_shift(node)
    if node.op == "bn":
        weight, bias, mean, var = node.inputs[1:]
        s = b  # the bn's own scale
        m = mean.data
        c = np.zeros_like(a) if c is None else c
        new_weight = weight.data * a
        new_bias = bias.data + (c - m + m * a) * s
        inputs = [
            x,
            *(_recomputed(graph, p, node, v) for p, v in [(weight, new_weight), (bias, new_bias)]),
            mean,
            var,
        ]
        graph.replace_node(node, "bn", inputs, node.attrs)
    elif first.op == "bn":
        weight, bias, mean, var = first.inputs[1:]
        new_weight = weight.data * b
        new_bias = bias.data * b + (0 if d is None else d)
        params = [
            _recomputed(graph, p, first, v) for p, v in [(weight, new_weight), (bias, new_bias)]
        ]
        graph.replace_node(node, "bn", [x, *params, mean, var], first.attrs)
    elif first.op == "scale" and node.op == "scale":
        (weight,) = node.inputs[1:]
        graph.replace_node(node, "scale", [x, _recomputed(graph, weight, node, a * b)], {})
    else:
        scale = a * b
        shift = (np.zeros_like(a) if c is None else c * b) + (0 if d is None else d)
        # The affine of the two keeps its parameters (the later one's if both are).
        keeper = node if node.op == "affine" else first
        weight, bias = keeper.inputs[1:]
        params = [_recomputed(graph, p, keeper, v) for p, v in [(weight, scale), (bias, shift)]]
        graph.replace_node(node, "affine", [x, *params], {})
    graph.remove_node(first)


def merge_affine(graph: Graph) -> bool:
    """Merge every bn, affine or scale into the bn, affine or scale that reads it alone."""
    changed = False
    for node in list(graph.nodes):
        # In order: a chain of three merges pair by pair into its last node.
        first = _mergeable(graph, node)
        if first is not None:
            _merge(graph, first, node)
            changed = True
    return changed
