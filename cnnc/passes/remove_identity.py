"""remove-identity: drop ops that compute nothing at inference (dropout).

    y = dropout(x); f(y)  ==>  f(x)

Leaves alone: nothing; a dropout that is the network's output makes its input the output.
"""

from __future__ import annotations

from cnnc.ir.graph import Graph

IDENTITY_OPS = {"dropout"}


def remove_identity(graph: Graph) -> bool:
    """Bypass every identity op; returns whether the graph changed."""
    doomed = [node for node in graph.nodes if node.op in IDENTITY_OPS]
    for node in doomed:
        graph.bypass(node)
    return bool(doomed)
