"""channels-first: a channels-last stretch of a network, between two transposes, runs on the
channels-first map instead.

    t = transpose(x: N×C×H×W, perm=(0,2,3,1))          # N×H×W×C
    u = f(t) ... g(...)                                  # each over the last axis
    z = transpose(u, perm=(0,3,1,2))                     # N×C'×H×W
        ==>  z = g(... f(x))                             # each over axis 1

That is PyTorch's form of ConvNeXt's block (and of its LayerNorm2d) as ONNX gets it:
Transpose, LayerNormalization over the last axis, MatMul, Add, Gelu, MatMul, Add,
Transpose. After this pass it is layernorm, linear, gelu, linear over the channels, which
fc-to-conv then makes 1×1 convolutions. 1-D maps (N×C×L, perm (0,2,1) both ways) too.

The ops in between act at each position on the values along the last axis alone, so they
compute the same on the map whichever axis holds those values: layernorm, linear and
softmax over the last axis (which become axis 1), every element-wise activation, prelu
with one slope, dropout, and add, mul, sub, div between values of the stretch. The
stretch may branch and merge, and start from several such transposes; with nothing in
between, the two transposes just go. Another axis moved last and back the same way (how
cnnc exports a layernorm or linear over a middle axis) is turned around too: the ops then
run over that axis.

Leaves alone (and why):
- a stretch with a value that is a network output, or read by anything but the ops
  above or the transpose back (a concat, a reshape, a bn over what is then not the
  channels): that reader needs the channels-last layout;
- an op over another axis than the last (a layernorm over the height of an N×H×W×C map),
  or a merge with a value from outside the stretch: they depend on the layout;
- transposes with other permutations.
"""

from __future__ import annotations

from cnnc.ir.graph import Graph, Node, Value
from cnnc.ops.activation import ACTIVATIONS
from cnnc.ops.merge import ARITHMETIC

# Ops whose result at each position depends only on the values along the last axis there.
_ANY_AXIS = {*ACTIVATIONS, "dropout", *ARITHMETIC}
_LAST_AXIS = {"layernorm", "linear", "softmax"}


def _to_last(rank: int, axis: int) -> tuple[int, ...]:
    return (*(a for a in range(rank) if a != axis), axis)


def _back(rank: int, axis: int) -> tuple[int, ...]:
    return (*range(axis), rank - 1, *range(axis, rank - 1))


def _moved_last(node: Node | None) -> int | None:
    """The axis a transpose moves last, the others keeping their order (None if it does
    something else)."""
    if node is None or node.op != "transpose":
        return None
    rank, perm = node.inputs[0].type.rank, tuple(node.attrs["perm"])
    axis = perm[-1]
    return axis if 0 < axis < rank - 1 and perm == _to_last(rank, axis) else None


def _moves_back(node: Node, axis: int) -> bool:
    rank = node.inputs[0].type.rank
    return node.op == "transpose" and tuple(node.attrs["perm"]) == _back(rank, axis)


def _per_position(node: Node, rank: int) -> bool:
    if node.output.type.rank != rank:
        return False
    if node.op in _LAST_AXIS:
        return node.attrs["axis"] % rank == rank - 1
    if node.op == "prelu":
        return node.inputs[1].shape == (1,)
    return node.op in _ANY_AXIS


def _stretch(graph: Graph, start: Node, axis: int) -> tuple[list[Node], ...] | None:
    """The transposes in, the ops and the transposes out of the stretch ``start`` opens by
    moving ``axis`` last, in graph order; None if it cannot run over ``axis`` instead."""
    rank = start.inputs[0].type.rank
    entries, ops, exits = {id(start): start}, {}, {}
    todo: list[Value] = [start.output]
    while todo:
        value = todo.pop()
        if value in graph.outputs:
            return None
        for user in value.users:
            if id(user) in ops or id(user) in exits:
                continue
            if _moves_back(user, axis):
                exits[id(user)] = user
                continue
            if not _per_position(user, rank):
                return None
            ops[id(user)] = user
            todo.append(user.output)
            for source in user.activations:
                producer = source.producer
                if _moved_last(producer) == axis and id(producer) not in entries:
                    entries[id(producer)] = producer
                    todo.append(source)
    # Every value an op of the stretch reads must come from the stretch (a merge with a
    # channels-first value from outside, say, depends on the layout).
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    ops_in_order = sorted(ops.values(), key=lambda n: order[id(n)])
    for node in ops_in_order:
        for source in node.activations:
            producer = source.producer
            if producer is None or (id(producer) not in ops and id(producer) not in entries):
                return None
    return list(entries.values()), ops_in_order, list(exits.values())


def _turn(graph: Graph, axis: int, entries: list[Node], ops: list[Node], exits: list[Node]) -> None:
    inputs = {id(t.output): t.inputs[0] for t in entries}
    for node in ops:
        attrs = dict(node.attrs)
        if node.op in _LAST_AXIS:
            attrs["axis"] = axis
        sources = [inputs.get(id(v), v) for v in node.inputs]
        graph.replace_node(node, node.op, sources, attrs)
    for t in exits:
        source = t.inputs[0]
        graph.replace_uses(t.output, inputs.get(id(source), source))
        graph.remove_node(t)
    for t in entries:
        if not t.output.users:
            graph.remove_node(t)


def channels_first(graph: Graph) -> bool:
    """Turn every channels-last stretch around; returns whether the graph changed."""
    changed = False
    for start in list(graph.nodes):
        axis = _moved_last(start)
        if axis is None or start not in graph.nodes:
            continue
        found = _stretch(graph, start, axis)
        if found is not None:
            _turn(graph, axis, *found)
            changed = True
    return changed
