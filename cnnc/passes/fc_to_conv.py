"""fc-to-conv: an FC layer on a feature map is a convolution whose kernel covers the whole map.

    z = fc(flatten(x: N×C×H×W), W: [K, C·H·W])  ==>  z = flatten(conv(x, W: [K, C, H, W]))
    z = f(flatten(y: N×K×1×1))                  ==>  z = flatten(f(y))
    z = linear(x: N×C×H×W, W: [K, C], axis=1)   ==>  z = conv(x, W: [K, C, 1, 1])

The first rule turns an FC layer after a conv stage into an H×W convolution
(an L convolution in 1-D); the weight keeps its values, reshaped in the C, H, W
order in which flatten lays the map out. The second moves the flatten that
rule leaves behind past per-channel ops f (element-wise activations, bn,
dropout, drop_path, softmax, layernorm and groupnorm over the channels), so that the
next FC layer, after a converted one, after gap or on any 1×1 map, sees a 1×1 map and
becomes a 1×1 convolution. The network's output keeps its shape: the flatten ends up
last. The third turns a linear layer over the channels of a map (ConvNeXt's pointwise
layers) into the 1×1 convolution it is, its weight reshaped (exact).

lrn is not in that list. It mixes neighbouring channels at one position, as
softmax over the channels does, so it would commute with the flatten of a 1×1
map all the same; but lrn takes feature maps only (ONNX LRN needs N×C×D…, and
onnxruntime runs N×C×H×W alone), so it never follows a flatten.

Leaves alone (and why):
- an fc whose input is not a flattened feature map (after a softmax over another
  axis, say): there is no map to convolve;
- an fc whose weight another node shares (imported models): reshaping it would break
  the other reader;
- a flatten of a map larger than 1×1 followed by f: f would see C·H·W channels
  before and C after (bn would not even fit);
- a flatten whose output has several users or is a network output;
- a flatten followed by a scale: the scale's tensor has the flattened value's layout
  ([K], where the map would need [K, 1, 1]);
- a linear layer over another axis than the channels (channels-first, before, turns those
  of a channels-last block around), or whose weight another node shares.
"""

from __future__ import annotations

from cnnc.ir.graph import Graph, Node, Reshape
from cnnc.ir.types import TensorType
from cnnc.ops.activation import ACTIVATIONS

# Ops that compute on N×K×1×1 what they compute on N×K (each channel alone, or groups of
# channels at the one position), so they commute with the flatten between them.
PER_CHANNEL = {*ACTIVATIONS, "prelu", "affine", "dropout", "drop_path", "bn", "groupnorm"}


def _is_map(t: TensorType) -> bool:
    return t.rank >= 3


def _squeezes(flatten: Node) -> bool:
    x = flatten.inputs[0].type
    return _is_map(x) and all(d == 1 for d in x.spatial)


def _commutes(node: Node) -> bool:
    if node.op == "softmax":
        return node.attrs["axis"] in (1, -1)
    if node.op == "layernorm":
        return node.attrs["axis"] == 1
    return node.op in PER_CHANNEL


def _sinkable(graph: Graph, flatten: Node) -> Node | None:
    out = flatten.output
    if not _squeezes(flatten) or len(out.users) != 1 or out in graph.outputs:
        return None
    (user,) = out.users
    if not _commutes(user) or user.inputs[0] is not out:
        return None
    return user if all(v.is_param for v in user.inputs[1:]) else None


def _convertible(fc: Node) -> Node | None:
    flatten = fc.inputs[0].producer
    if flatten is None or flatten.op != "flatten" or not _is_map(flatten.inputs[0].type):
        return None
    return flatten if len(fc.inputs[1].users) == 1 else None


def _convert(graph: Graph, fc: Node, flatten: Node) -> None:
    x = flatten.inputs[0]
    weight = fc.inputs[1]
    out, (channels, *spatial) = weight.shape[0], x.shape[1:]
    shape = (out, channels, *spatial)
    weight.derive(Reshape(shape), shape=shape)
    rank = len(spatial)
    attrs = {"stride": (1,) * rank, "pads": (0,) * 2 * rank, "dilation": (1,) * rank, "groups": 1}
    conv = graph.replace_node(fc, "conv", [x, *fc.inputs[1:]], attrs, note="fc→conv")
    graph.insert_after(
        conv.output, "flatten", name=graph.unique_name(f"{conv.name}.flat"), note="fc-to-conv"
    )
    if not flatten.output.users and flatten.output not in graph.outputs:
        graph.remove_node(flatten)


def _pointwise(linear: Node) -> bool:
    rank = linear.inputs[0].type.rank
    return linear.attrs["axis"] == 1 and rank > 2 and len(linear.inputs[1].users) == 1


def _convert_linear(graph: Graph, linear: Node) -> None:
    weight, spatial = linear.inputs[1], linear.inputs[0].type.rank - 2
    shape = (*weight.shape, *(1,) * spatial)
    weight.derive(Reshape(shape), shape=shape)
    attrs = {"stride": (1,) * spatial, "pads": (0,) * 2 * spatial, "dilation": (1,) * spatial}
    graph.replace_node(linear, "conv", linear.inputs, {**attrs, "groups": 1}, note="linear→conv")


def _sink(graph: Graph, flatten: Node, user: Node) -> None:
    attrs = dict(user.attrs)
    if user.op == "softmax":
        attrs["axis"] = 1
    moved = graph.replace_node(user, user.op, [flatten.inputs[0], *user.inputs[1:]], attrs)
    name, note = flatten.name, flatten.note
    graph.remove_node(flatten)
    graph.insert_after(moved.output, "flatten", name=name, note=note)


def fc_to_conv(graph: Graph) -> bool:
    """Convert every FC layer on a feature map; returns whether the graph changed."""
    changed = False
    while rewrite := _next_rewrite(graph):
        rewrite()
        changed = True
    return changed


def _next_rewrite(graph: Graph):
    # One rewrite at a time, then a fresh scan: each rewrite replaces the nodes it touches.
    for node in graph.nodes:
        if node.op == "flatten" and (user := _sinkable(graph, node)) is not None:
            return lambda: _sink(graph, node, user)
        if node.op == "fc" and (flatten := _convertible(node)) is not None:
            return lambda: _convert(graph, node, flatten)
        if node.op == "linear" and _pointwise(node):
            return lambda: _convert_linear(graph, node)
    return None
