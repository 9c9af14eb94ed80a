"""convolutionalize: the fully convolutional network, the classifier slid over a larger image.

    (fc-to-conv first, so every FC layer is a convolution)
    out = flatten(s: N×K×1×1)       ==>  out = s                        N×K×H'×W'
    g = gap(x: N×C×h×w)             ==>  g = avgpool(x) k=h×w s=1       (one average per window)
    g = global_maxpool(x)           ==>  g = maxpool(x) k=h×w s=1

and the network accepts any input at least as large as the declared one. Each
cell (i, j) of the output map is the original classifier applied to the window
of the input that starts at (i·S, j·S), S being the network's total stride, as
long as no layer pads (padding makes the classifier see zeros where the larger
image has pixels). Softmax over the channels, moved before the flatten by
fc-to-conv, scores each cell.

Refuses (with an error at the layer): an fc that fc-to-conv cannot convert, and a
flatten left anywhere but at the output, since then the network is not convolutional.
"""

from __future__ import annotations

from fractions import Fraction

from cnnc.errors import ShapeError
from cnnc.ir.graph import Graph
from cnnc.passes.fc_to_conv import fc_to_conv

# Global pools and the windowed pool that computes them at the declared size.
WINDOWED = {"gap": "avgpool", "global_maxpool": "maxpool"}


def convolutionalize(graph: Graph) -> bool:
    """Make a classifier fully convolutional; returns True (it always changes the contract)."""
    fc_to_conv(graph)
    for node in [n for n in graph.nodes if n.op == "gap"]:
        spatial = tuple(node.inputs[0].type.spatial)
        rank = len(spatial)
        attrs = {
            "kernel": spatial,
            "stride": (1,) * rank,
            "pads": (0,) * 2 * rank,
            "dilation": (1,) * rank,
            "ceil": False,
            "count_include_pad": True,
        }
        graph.replace_node(node, "avgpool", node.inputs, attrs, note="gap→avgpool")
    for i, out in enumerate(graph.outputs):
        flatten = out.producer
        if flatten is not None and flatten.op == "flatten" and flatten.inputs[0].type.rank >= 3:
            graph.outputs[i] = flatten.inputs[0]
            if not out.users:
                graph.remove_node(flatten)
    for node in graph.nodes:
        if node.op in ("fc", "flatten"):
            raise ShapeError(
                f"network {graph.name} cannot be made fully convolutional: {node.op} "
                f"{node.name} has no feature map to slide over ({node.inputs[0].type})",
                node.loc,
                hint="only networks whose FC layers follow a feature map can be convolutionalized",
            )
    graph.flexible_spatial = True
    return True


def receptive_field(graph: Graph) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(total stride, receptive field) of one output cell, per spatial axis."""
    (x,) = graph.inputs
    rank = x.type.rank - 2
    fields = {id(x): ((1,) * rank, (1,) * rank)}
    for node in graph.nodes:
        found = [fields[id(v)] for v in node.activations if id(v) in fields]
        if not found:
            continue
        jump = found[0][0]
        field = tuple(max(f[1][i] for f in found) for i in range(rank))
        if "stride" in node.attrs:
            kernel = node.attrs.get("kernel") or tuple(node.inputs[1].shape[2:])
            dilation = node.attrs.get("dilation", (1,) * rank)
            stride = node.attrs["stride"]
            if node.op == "conv_transpose":
                # An output cell reads d·(k − 1) // s + 1 neighbouring inputs, and the
                # cells are 1/s of an input step apart (an upsampling: a fractional stride).
                field = tuple(
                    f + d * (k - 1) // s * j
                    for f, k, d, s, j in zip(field, kernel, dilation, stride, jump, strict=True)
                )
                jump = tuple(Fraction(j) / s for j, s in zip(jump, stride, strict=True))
            else:
                field = tuple(
                    f + (k - 1) * d * j
                    for f, k, d, j in zip(field, kernel, dilation, jump, strict=True)
                )
                jump = tuple(j * s for j, s in zip(jump, stride, strict=True))
        for out in node.outputs:
            fields[id(out)] = (jump, field)
    return fields[id(graph.outputs[0])]


def padded_layers(graph: Graph) -> list[str]:
    """Layers whose padding or ceil mode makes border cells differ from the classifier on a crop."""
    return [n.name for n in graph.nodes if any(n.attrs.get("pads", ())) or n.attrs.get("ceil")]


def output_shape_for(graph: Graph, spatial: tuple[int, ...]) -> tuple:
    """The output shape of a fully convolutional graph for an input of spatial size ``spatial``."""
    from cnnc.ops import get_op

    (x,) = graph.inputs
    declared = tuple(x.type.spatial)
    if len(spatial) != len(declared) or any(s < d for s, d in zip(spatial, declared, strict=True)):
        size = "x".join(map(str, declared))
        raise ShapeError(
            f"the input size must be at least the declared {size}, with "
            f"{len(declared)} dimension(s); got {'x'.join(map(str, spatial))}"
        )
    types = {id(x): x.type.with_shape((*x.type.shape[:2], *spatial))}
    for v in graph.params.values():
        types[id(v)] = v.type
    for node in graph.nodes:
        outs = get_op(node.op).infer([types[id(v)] for v in node.inputs], node.attrs)
        types.update((id(v), t) for v, t in zip(node.outputs, outs, strict=True))
    return types[id(graph.outputs[0])].shape
