"""remove-identity: drop ops that compute nothing at inference (dropout, drop_path), or
nothing at the sizes they run at.

    y = dropout(x); f(y)                                   ==>  f(x)
    y = drop_path(x); f(y)                                 ==>  f(x)
    y = pad(x) by 0 on every side; f(y)                    ==>  f(x)
    y = split(x) into one part; f(y)                       ==>  f(x)
    y = slice(x) of all the channels; f(y)                 ==>  f(x)
    y = adaptive_avgpool(x: N×C×7×7, size=7); f(y)         ==>  f(x)   (also adaptive_maxpool)
    y = upsample(x) whose output has x's sizes, and
        samples pixel i at every i; f(y)                   ==>  f(x)

(AlexNet's adaptive_avgpool(6) on its 6×6 map and VGG's (7) on 7×7 are such pools.)

Leaves alone:
- a slice of a whole spatial axis and a crop to the input's own size, since the network
  may be made fully convolutional later in the pipeline (convolutionalize runs after this
  pass), and then the same bounds cut the larger maps it runs on;
- an upsample that keeps the sizes but moves pixels (PyTorch's 1-D nearest with scale
  1.1 on 5 samples 0, 0, 1, 2, 3), and every resize or adaptive pool of a fully
  convolutional graph, whose inputs may be larger than declared;
- an op whose output is a network output and whose input is a network input or another
  output (`-> (a, b) { a = relu; b = a -> dropout }`): bypassing it would leave one value
  under two names, and a network's inputs and outputs keep the names users feed and read.

A removed op that is the network's output makes its input the output.
"""

from __future__ import annotations

import numpy as np

from cnnc.ir.graph import Graph, Node
from cnnc.ops.resize import NEAREST_MODES, nearest_indices

IDENTITY_OPS = {"dropout", "drop_path"}
RESIZING = ("upsample", "adaptive_avgpool", "adaptive_maxpool")


def _keeps_its_input(graph: Graph, node: Node) -> bool:
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
    if node.op not in RESIZING or graph.flexible_spatial:
        return False
    spatial = tuple(node.inputs[0].type.spatial)
    if tuple(node.output.type.spatial) != spatial:
        return False
    if node.op != "upsample" or a["mode"] not in NEAREST_MODES:
        return True
    given = a["scales"] or (None,) * len(spatial)
    return all(
        np.array_equal(nearest_indices(n, n, s, a["mode"], len(spatial)), np.arange(n))
        for n, s in zip(spatial, given, strict=True)
    )


def _joins_two_names(graph: Graph, node: Node) -> bool:
    x = node.inputs[0]
    return node.output in graph.outputs and (x.kind == "input" or x in graph.outputs)


def remove_identity(graph: Graph) -> bool:
    """Bypass every identity op; returns whether the graph changed."""
    changed = False
    for node in list(graph.nodes):
        # Asked node by node: bypassing one op may bring an input to the next one's door.
        if _keeps_its_input(graph, node) and not _joins_two_names(graph, node):
            graph.bypass(node)
            changed = True
    return changed
