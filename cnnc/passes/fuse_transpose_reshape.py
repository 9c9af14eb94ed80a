"""fuse-transpose-reshape: consecutive transposes become one, consecutive reshapes and
flattens become one, and those that move nothing go.

    u = transpose(x, perm=p); v = transpose(u, perm=q)   ==>  v = transpose(x, perm=r)
                                                              with r[i] = p[q[i]]
    ... and when r is the identity (perm=0,2,3,1 then 0,3,1,2)  ==>  (nothing): v is x
    u = reshape(x) (or flatten); v = reshape(u) to S      ==>  v = reshape(x) to S
    u = reshape(x) (or flatten); v = flatten(u)           ==>  v = flatten(x)
    ... and when v has x's shape (N×4×8×8 to 4×64 and back)  ==>  (nothing): v is x
    y = reshape(x) to x's own shape; y = flatten(x: N×F);
    y = transpose(x, perm=0,1,2,3)                        ==>  (nothing): y is x
    y = transpose(x: N×C×1×1, perm=0,2,3,1); flatten(y)   ==>  flatten(x)
        (a transpose that moves only axes of size 1 keeps the values in their order: next
        to a reshape or a flatten it is a reshape, which then merges with it)

A reshape keeps the values in their order whatever it came from, so only its last shape
counts; a transpose of a transpose reads input axis p[q[i]] at output axis i.

Leaves alone (and why):
- a first transpose or reshape that other nodes read too (or that is a network output):
  they need its value, and rewriting the second to skip it would save nothing; it is
  still skipped when the pair cancels, since the second then goes;
- a transpose between reshapes (ShuffleNet's channel shuffle, reshape, transpose,
  reshape): it moves values, and no single op does what the three do;
- a node that would leave a network output under two names (the output of a network
  input, or of another output, that does nothing): the network's names are its contract;
- a transpose that moves only axes of size 1 with no reshape or flatten beside it: a
  fully convolutional network (convolutionalize runs after this pass) may run it on
  larger maps, where those axes grow and it moves values;
- reshapes, flattens and size-1 transposes of a fully convolutional graph, whose inputs
  may be larger than declared (their fixed sizes are then checks that must stay).
"""

from __future__ import annotations

from cnnc.ir.graph import Graph, Node, Value

RESHAPES = ("reshape", "flatten")


def _known(shape: tuple) -> bool:
    return all(isinstance(d, int) for d in shape)


def _forward(graph: Graph, node: Node, source: Value) -> bool:
    """Make the readers of ``node``'s output read ``source`` (the same values) and drop
    ``node``; False when that would join two of the network's names."""
    out = node.output
    if out in graph.outputs and (source.kind != "node" or source in graph.outputs):
        return False
    graph.replace_uses(out, source)
    graph.remove_node(node)
    return True


def _drop_if_dead(graph: Graph, node: Node) -> None:
    if node.output.users or node.output in graph.outputs:
        return
    graph.remove_node(node)


def _only_reader(graph: Graph, value: Value, node: Node) -> bool:
    return value.users == [node] and value not in graph.outputs


def _moves_only_ones(x: Value, perm: tuple) -> bool:
    """Whether the axes of size other than 1 stay in their order (then the transpose
    keeps every value at its place in memory: it is a reshape)."""
    moved = [a for a in perm if x.shape[a] != 1]
    return moved == sorted(moved)


def _transpose(graph: Graph, node: Node) -> bool:
    x = node.inputs[0]
    perm = tuple(node.attrs["perm"])
    if perm == tuple(range(len(perm))):
        return _forward(graph, node, x)
    first = x.producer
    if first is not None and first.op == "transpose":
        source, p = first.inputs[0], tuple(first.attrs["perm"])
        composed = tuple(p[q] for q in perm)
        if composed == tuple(range(len(composed))):
            if _forward(graph, node, source):
                _drop_if_dead(graph, first)
                return True
            return False
        if _only_reader(graph, x, node):
            graph.replace_node(node, "transpose", [source], {"perm": composed})
            graph.remove_node(first)
            return True
        return False
    if graph.flexible_spatial or not _known(x.shape[1:]) or not _moves_only_ones(x, perm):
        return False
    # Only where a reshape next to it then takes it in: alone it would only change its
    # name, and a fully convolutional network (made after this pass) may run it on maps
    # whose axes of size 1 grow.
    before = first is not None and first.op in RESHAPES and _only_reader(graph, x, node)
    after = node.output.users
    if not before and not (
        len(after) == 1 and after[0].op in RESHAPES and _only_reader(graph, node.output, after[0])
    ):
        return False
    graph.replace_node(node, "reshape", [x], {"shape": tuple(node.output.shape[1:])})
    return True


def _reshape(graph: Graph, node: Node) -> bool:
    if graph.flexible_spatial:
        return False
    x, target = node.inputs[0], tuple(node.output.shape[1:])
    if not _known(target):
        return False
    if tuple(x.shape[1:]) == target:
        return _forward(graph, node, x)
    first = x.producer
    if first is None or first.op not in RESHAPES:
        return False
    source = first.inputs[0]
    if tuple(source.shape[1:]) == target:
        if _forward(graph, node, source):
            _drop_if_dead(graph, first)
            return True
        return False
    if not _only_reader(graph, x, node):
        return False
    graph.replace_node(node, node.op, [source], node.attrs)
    graph.remove_node(first)
    return True


def fuse_transpose_reshape(graph: Graph) -> bool:
    """Fuse or drop every transpose and reshape that can go; returns whether the graph
    changed."""
    changed = False
    again = True
    while again:  # a rewrite only removes the node and the one before it, already seen
        again = False
        for node in list(graph.nodes):
            if node.op == "transpose":
                again = _transpose(graph, node) or again
            elif node.op in RESHAPES:
                again = _reshape(graph, node) or again
        changed = changed or again
    return changed
