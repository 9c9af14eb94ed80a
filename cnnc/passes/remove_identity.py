"""remove-identity: drop ops that compute nothing at inference.

    y = dropout(x); f(y)                          ==>  f(x)
    y = drop_path(x); f(y)                        ==>  f(x)
    y = pad(x) by 0 on every side; f(y)           ==>  f(x)
    y = split(x) into one part; f(y)              ==>  f(x)
    y = slice(x) of all the channels; f(y)        ==>  f(x)

Leaves alone: a slice of a whole spatial axis and a crop to the input's own size, since
the network may be made fully convolutional later in the pipeline (convolutionalize runs
after this pass), and then the same bounds cut the larger maps it runs on. An identity
that is the network's output makes its input the output.
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
        channels = node.inputs[0].shape[1]
        whole = slice(a["start"], a["end"]).indices(channels)[:2] == (0, channels)
        return a["axis"] == 1 and whole
    return False


def remove_identity(graph: Graph) -> bool:
    """Bypass every identity op; returns whether the graph changed."""
    doomed = [node for node in graph.nodes if _is_identity(graph, node)]
    for node in doomed:
        graph.bypass(node)
    return bool(doomed)
