"""convolutionalize: the fully convolutional network, the classifier slid over a larger image.

    (fc-to-conv first, so every FC layer is a convolution)
    out = flatten(s: N×K×1×1)       ==>  out = s                        N×K×H'×W'
    g = gap(x: N×C×h×w)             ==>  g = avgpool(x) k=h×w s=1       (one average per window)
    g = global_maxpool(x)           ==>  g = maxpool(x) k=h×w s=1
    a = adaptive_avgpool(x: h×w, size=oh×ow), oh | h, ow | w
                                    ==>  a = avgpool(x) k=s=(h/oh)×(w/ow)   (maxpool alike)

and the network accepts any input at least as large as the declared one. Each
cell (i, j) of the output map is the original classifier applied to the window
of the input that starts at (i·S, j·S), S being the network's total stride, as
long as no layer pads (padding makes the classifier see zeros where the larger
image has pixels). Softmax over the channels, moved before the flatten by
fc-to-conv, scores each cell.

An adaptive pool whose windows divide its input evenly is, at the declared size, that
windowed pool, which slides over a larger map (AlexNet's adaptive_avgpool(6) on its 6×6
map becomes a 1×1 pool: nothing).

Refuses (with an error at the layer): an fc that fc-to-conv cannot convert, a flatten left
anywhere but at the output, since then the network is not convolutional; an adaptive pool
whose windows do not divide its input evenly; a layer that only works at its declared
sizes (see each op's ``fixed_size``: a reshape fixes every size, an upsample to a size
or with align_corners samples positions that follow its input's size; an upsample by a
scale slides); and a network of several inputs, which could grow differently.
"""

from __future__ import annotations

from fractions import Fraction

from cnnc.errors import ShapeError
from cnnc.ir.graph import Graph, Value
from cnnc.ir.types import format_dims
from cnnc.ops.pool import adaptive_is_uniform
from cnnc.passes.fc_to_conv import fc_to_conv

# Global pools and the windowed pool that computes them at the declared size.
WINDOWED = {"gap": "avgpool", "global_maxpool": "maxpool"}
# Adaptive pools and the windowed pool that computes them when their windows are uniform.
ADAPTIVE = {"adaptive_avgpool": "avgpool", "adaptive_maxpool": "maxpool"}


def convolutionalize(graph: Graph) -> bool:
    """Make a classifier fully convolutional; returns True (it always changes the contract)."""
    from cnnc.ops import get_op

    if len(graph.inputs) != 1:
        raise ShapeError(
            f"network {graph.name} has {len(graph.inputs)} inputs; a fully convolutional "
            "network slides over one",
            graph.nodes[0].loc if graph.nodes else None,
        )
    fc_to_conv(graph)
    for node in [n for n in graph.nodes if n.op in WINDOWED or n.op in ADAPTIVE]:
        spatial = tuple(node.inputs[0].type.spatial)
        if node.op in WINDOWED:
            pool, kernel, stride = WINDOWED[node.op], spatial, (1,) * len(spatial)
        else:
            size = tuple(node.attrs["size"])
            if not adaptive_is_uniform(spatial, size):
                raise ShapeError(
                    f"network {graph.name} cannot be made fully convolutional: {node.op} "
                    f"{node.name} pools {format_dims(spatial)} into {format_dims(size)} by "
                    "windows of different sizes, which do not slide over a larger map",
                    node.loc,
                    hint="an adaptive pool whose input sizes are multiples of its output "
                    "sizes becomes a windowed pool",
                )
            pool = ADAPTIVE[node.op]
            kernel = stride = tuple(n // o for n, o in zip(spatial, size, strict=True))
        attrs = {
            "kernel": kernel,
            "stride": stride,
            "pads": (0,) * 2 * len(kernel),
            "dilation": (1,) * len(kernel),
            "ceil": False,
        }
        if pool == "avgpool":
            attrs["count_include_pad"] = True
        note = f"{'adaptive' if node.op in ADAPTIVE else node.op}→{pool}"
        graph.replace_node(node, pool, node.inputs, attrs, note=note)
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
        reason = get_op(node.op).fixed_size(node)
        if reason is not None:
            raise ShapeError(
                f"network {graph.name} cannot be made fully convolutional: {node.op} "
                f"{node.name} {reason}",
                node.loc,
                hint="a network slides over larger inputs only if every layer works at any size",
            )
    graph.flexible_spatial = True
    return True


Jump = tuple[Fraction, ...]


def _windowed(node, jump: Jump, field: tuple) -> tuple[Jump, tuple]:
    rank = len(jump)
    kernel = node.attrs.get("kernel") or tuple(node.inputs[1].shape[2:])
    dilation = node.attrs.get("dilation", (1,) * rank)
    field = tuple(
        f + (k - 1) * d * j for f, k, d, j in zip(field, kernel, dilation, jump, strict=True)
    )
    return tuple(j * s for j, s in zip(jump, node.attrs["stride"], strict=True)), field


def _transposed(node, jump: Jump, field: tuple) -> tuple[Jump, tuple]:
    # Output cells are stride times as dense; each reads the inputs its kernel covers.
    rank = len(jump)
    kernel = tuple(node.inputs[1].shape[2:])
    dilation = node.attrs.get("dilation", (1,) * rank)
    jump = tuple(j / s for j, s in zip(jump, node.attrs["stride"], strict=True))
    reach = tuple(
        -(-((k - 1) * d + 1) // s)
        for k, d, s in zip(kernel, dilation, node.attrs["stride"], strict=True)
    )
    field = tuple(
        f + (r - 1) * j * s
        for f, r, j, s in zip(field, reach, jump, node.attrs["stride"], strict=True)
    )
    return jump, field


def _upsampled(node, jump: Jump, field: tuple) -> tuple[Jump, tuple]:
    # A nearest cell reads one input cell; a linear one reads two neighbours.
    # An upsample to a size scales each axis by its output size over its input size.
    scales = node.attrs["scales"] or tuple(
        Fraction(o, i)
        for o, i in zip(node.output.type.spatial, node.inputs[0].type.spatial, strict=True)
    )
    linear = node.attrs["mode"] in ("linear", "bilinear")
    field = tuple(f + (j if linear else 0) for f, j in zip(field, jump, strict=True))
    return tuple(
        j / Fraction(s).limit_denominator(1000) for j, s in zip(jump, scales, strict=True)
    ), field


def _global(node, jump: Jump, field: tuple) -> tuple[Jump, tuple]:
    # One cell sees the whole map (a global pool).
    spatial = node.inputs[0].type.spatial
    field = tuple(f + (n - 1) * j for f, n, j in zip(field, spatial, jump, strict=True))
    return tuple(j * n for j, n in zip(jump, spatial, strict=True)), field


def _adaptive(node, jump: Jump, field: tuple) -> tuple[Jump, tuple]:
    # PyTorch's adaptive windows: cell i of n -> o covers floor(i·n/o) .. ceil((i+1)·n/o),
    # n//o + 1 or + 2 cells when o does not divide n (+ 2 unless n % o divides o); the
    # widest window counts, and cells are n/o apart.
    spatial, size = node.inputs[0].type.spatial, node.attrs["size"]
    widest = tuple(
        n // o + (0 if n % o == 0 else 1 if o % (n % o) == 0 else 2)
        for n, o in zip(spatial, size, strict=True)
    )
    field = tuple(f + (k - 1) * j for f, k, j in zip(field, widest, jump, strict=True))
    return tuple(j * Fraction(n, o) for j, n, o in zip(jump, spatial, size, strict=True)), field


# How an op changes the spacing of output cells on the input (the jump) and how much of the
# input one cell sees (the field); every other op keeps both.
FIELD_RULES = {
    "conv": _windowed,
    "maxpool": _windowed,
    "avgpool": _windowed,
    "conv_transpose": _transposed,
    "upsample": _upsampled,
    "gap": _global,
    "global_maxpool": _global,
    "adaptive_avgpool": _adaptive,
    "adaptive_maxpool": _adaptive,
}


def _broadcast(v: Value, node) -> bool:
    # A 1×1 map read by a node whose output map is larger: repeated over it.
    out = node.outputs[0].type
    spatial = v.type.spatial
    return (
        len(node.activations) > 1
        and v.type.rank == out.rank
        and all(d == 1 for d in spatial)
        and any(d != 1 for d in out.spatial)
    )


def receptive_fields(graph: Graph) -> dict[int, tuple[Jump, tuple[int, ...]]]:
    """(output stride, receptive field) per spatial axis of one cell of every value computed
    from a feature-map input (by ``id`` of the value; a value that is not a feature map of
    the inputs' rank, such as an fc's output, has none). The field is counted on the input:
    it may pass the input's size (the part past it is padding). Where branches merge, the
    smallest stride and the largest field count; an operand broadcast over the map (a
    squeeze-and-excitation's per-channel scale, N×C×1×1) does not widen the field: a
    cell's field is the window whose pixels reach it through windows, not the global
    context a scale carries."""
    fields: dict[int, tuple[Jump, tuple]] = {}
    for x in graph.inputs:
        rank = x.type.rank - 2
        if rank >= 1:
            fields[id(x)] = ((Fraction(1),) * rank, (1,) * rank)
    for node in graph.nodes:
        found = [
            fields[id(v)] for v in node.activations if id(v) in fields and not _broadcast(v, node)
        ]
        if not found or len({len(f[0]) for f in found}) != 1:
            continue
        rank = len(found[0][0])
        jump = tuple(min(f[0][i] for f in found) for i in range(rank))
        field = tuple(max(f[1][i] for f in found) for i in range(rank))
        rule = FIELD_RULES.get(node.op)
        if rule is not None and node.inputs[0].type.rank == rank + 2:
            jump, field = rule(node, jump, field)
        for out in node.outputs:
            fields[id(out)] = (jump, field)
    return {k: (jump, tuple(int(f) for f in field)) for k, (jump, field) in fields.items()}


def receptive_field(graph: Graph, output: Value | None = None) -> tuple[Jump, tuple[int, ...]]:
    """(output stride, receptive field) of one cell of ``output`` (the first output by
    default), per spatial axis, of a network of one input. The stride is a fraction when
    the output is finer than the input."""
    (_,) = graph.inputs
    return receptive_fields(graph)[id(output or graph.outputs[0])]


def padded_layers(graph: Graph) -> list[str]:
    """Layers whose padding or ceil mode makes border cells differ from the classifier on a crop."""
    return [n.name for n in graph.nodes if any(n.attrs.get("pads", ())) or n.attrs.get("ceil")]


def output_shape_for(graph: Graph, spatial: tuple[int, ...]) -> list[tuple]:
    """The output shapes of a fully convolutional graph for an input of spatial size
    ``spatial``."""
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
    return [types[id(v)].shape for v in graph.outputs]
