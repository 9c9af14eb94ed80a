"""remove-identity: drop ops that compute nothing at inference.

    y = dropout(x); f(y)                          ==>  f(x)
    y = drop_path(x); f(y)                        ==>  f(x)
    y = pad(x) by 0 on every side; f(y)           ==>  f(x)
    y = split(x) into one part; f(y)              ==>  f(x)
    y = slice(x) of the whole axis; f(y)          ==>  f(x)
    y = crop(x, ref) to x's own size at 0; f(y)   ==>  f(x)

Leaves alone: a slice or crop of a spatial axis in a fully convolutional network (its
sizes at run time are larger than the declared ones, so the same bounds may cut then);
nothing else. An identity that is the network's output makes its input the output.
"""

from __future__ import annotations

from cnnc.ir.graph import Graph, Node

IDENTITY_OPS = {"dropout", "drop_path"}


def _is_identity(graph: Graph, node: Node) -> bool:
    a = node.attrs
    if node.op in IDENTITY_OPS:
        return True
    if node.op == "pad":
        return not any(a["pads"])
    if node.op == "split":
        return len(a["sizes"]) == 1
    if node.op == "slice":
        axis, size = a["axis"], node.inputs[0].shape[a["axis"]]
        fixed = axis == 1 or not graph.flexible_spatial
        return fixed and slice(a["start"], a["end"]).indices(size)[:2] == (0, size)
    if node.op == "crop":
        x, ref = node.inputs
        same = x.type.spatial == ref.type.spatial and not any(a["offset"])
        return same and not graph.flexible_spatial
    return False


def remove_identity(graph: Graph) -> bool:
    """Bypass every identity op; returns whether the graph changed."""
    doomed = [node for node in graph.nodes if _is_identity(graph, node)]
    for node in doomed:
        graph.bypass(node)
    return bool(doomed)
