"""fuse-pad: a constant pad before a conv or a pool becomes that op's own padding.

    y = pad(x) p=0,1,1,2 constant; z = conv(y, W, b) k=3x3 s=1 p=1,1,1,1
        ==>  z = conv(x, W, b) k=3x3 s=1 p=1,2,2,3
    y = pad(x) p=1,1,1,1 constant; z = avgpool(y) k=3x3 s=1
        ==>  z = avgpool(x) k=3x3 s=1 p=1,1,1,1                (count_include_pad)
    y = pad(x) p=1,1,1,1 constant value=-inf; z = maxpool(y) k=3x3 s=2
        ==>  z = maxpool(x) k=3x3 s=2 p=1,1,1,1

The pads add up side by side (begin..., end..., as ONNX orders them; the two sides of
an axis may differ). A conv pads with zeros, so the pad's value must be 0; an average
pool counts its padding as zeros in every window's divisor when count_include_pad is on
(then a zero pad before it is the same); a max pool's padding never wins, as a pad of
-inf never does.

Leaves alone (and why):
- reflect and edge padding, and a constant other than the op's own fill (a conv after a
  pad of 1, a max pool after a pad of 0): the op cannot pad with those values;
- a pad that crops (a negative amount): padding cannot take values away;
- a pad that another node reads too, or that is a network output: it needs the padded map;
- an average pool that leaves its own padding out of the divisor (count_include_pad off),
  where the pad's zeros would then count differently from its own;
- a pool in ceil mode (its partial last window depends on where the input ends) and a
  pool whose padding would reach its kernel size (a window of padding alone has no value);
- a conv_transpose, whose pads crop its output rather than pad its input.

(onnxruntime's MaxPool gives -3.4e38 for a window of nothing but -inf and padding, and
-inf for one of -inf alone: on an input holding -inf it may then differ from the model
before, as it differs from the interpreter; see README, "NaN and infinity".)
"""

from __future__ import annotations

import math

from cnnc.ir.graph import Graph, Node

FILL = {"conv": 0.0, "avgpool": 0.0, "maxpool": -math.inf}


def _fused_pads(pad: Node, op: Node) -> tuple[int, ...] | None:
    """The op's pads with the pad's added, or None if the pad cannot fuse into it."""
    a = pad.attrs
    if a["mode"] != "constant" or a["value"] != FILL[op.op] or min(a["pads"]) < 0:
        return None
    own = tuple(op.attrs["pads"])
    if len(own) != len(a["pads"]):
        return None
    pads = tuple(p + q for p, q in zip(own, a["pads"], strict=True))
    if op.op == "conv":
        return pads
    if op.attrs["ceil"]:
        return None
    if op.op == "avgpool" and any(own) and not op.attrs["count_include_pad"]:
        return None
    kernel = op.attrs["kernel"]
    rank = len(kernel)
    if any(pads[i] >= k or pads[i + rank] >= k for i, k in enumerate(kernel)):
        return None
    return pads


def fuse_pad(graph: Graph) -> bool:
    """Fuse every constant pad into the conv or pool that alone reads it; returns whether
    the graph changed."""
    changed = False
    for pad in [n for n in graph.nodes if n.op == "pad"]:
        y = pad.output
        if len(y.users) != 1 or y in graph.outputs:
            continue
        op = y.users[0]
        if op.op not in FILL or op.inputs[0] is not y:
            continue
        pads = _fused_pads(pad, op)
        if pads is None:
            continue
        attrs = {**op.attrs, "pads": pads}
        if op.op == "avgpool":
            attrs["count_include_pad"] = True
        graph.replace_node(op, op.op, [pad.inputs[0], *op.inputs[1:]], attrs)
        graph.remove_node(pad)
        changed = True
    return changed
