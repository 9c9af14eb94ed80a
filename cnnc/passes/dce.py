"""dce: dead code elimination.

    y = f(x)  (y unused, not an output)  ==>  (nothing)
    parameter p read by no node           ==>  (nothing)

Leaves alone: graph inputs, even unused ones (they are the network's contract).
"""

from __future__ import annotations

from cnnc.ir.graph import Graph


def dce(graph: Graph) -> bool:
    """Remove nodes whose outputs nobody reads, then parameters nobody reads."""
    changed = False
    outputs = {id(v) for v in graph.outputs}
    for node in reversed(list(graph.nodes)):
        if not any(v.users or id(v) in outputs for v in node.outputs):
            graph.remove_node(node)
            changed = True
    for param in list(graph.params.values()):
        if not param.users:
            graph.remove_param(param)
            changed = True
    return changed
