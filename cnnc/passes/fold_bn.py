"""fold-bn: batch normalization (or a learned per-channel scale) after a conv, an fc or a linear
layer folds into that layer's weights and bias.

    y = conv(x, W, b); z = bn(y, gamma, beta, mean, var)
        ==>  z = conv(x, W * s, (b - mean) * s + beta)     with s = gamma / sqrt(var + eps)
    y = conv(x, W, b); z = affine(y, s, t)  ==>  z = conv(x, W * s, b * s + t)
    y = conv(x, W, b); z = scale(y, s)      ==>  z = conv(x, W * s, b * s)

The scale applies to each output channel (each row of an fc or linear weight); a layer
without bias gains one, named ``<layer>.bias``, except under a scale, which has no shift.

Leaves alone (and why):
- a bn whose input has other users, or is a network output: they need the unnormalized value;
- a bn after anything but a conv, an fc, or a linear layer over the channels (axis 1): there
  are no weights to fold into (a linear over another axis makes the values of that axis,
  not the channels the bn scales);
- a conv that already has a fused activation: the bn comes after the activation;
- a layer whose weights are shared with another node (possible in imported models):
  rescaling them would change the other node too.
"""

from __future__ import annotations

from cnnc.ir.graph import Graph, Node
from cnnc.ops.norm import channel_scale_shift

NORMS = ("bn", "affine", "scale")


def _foldable_into(graph: Graph, norm: Node) -> Node | None:
    x = norm.inputs[0]
    layer = x.producer
    if layer is None or layer.op not in ("conv", "fc", "linear") or layer.attrs.get("activation"):
        return None
    if layer.op == "linear" and layer.attrs["axis"] != 1:
        return None
    if len(x.users) != 1 or x in graph.outputs:
        return None
    if any(len(p.users) != 1 for p in layer.params):
        return None
    return layer


def fold_bn(graph: Graph) -> bool:
    """Fold every foldable bn, affine or scale into the conv, fc or linear layer before it."""
    changed = False
    for norm in [n for n in graph.nodes if n.op in NORMS]:
        layer = _foldable_into(graph, norm)
        if layer is None:
            continue

        # Lazily, as everything that touches weights: a dump never computes them.
        def scale(n=norm):
            return channel_scale_shift(n)[0]

        def shift(n=norm):
            return channel_scale_shift(n)[1]

        x, weight, *bias = layer.inputs
        weight.derive(lambda w, s=scale: w * s().reshape(-1, *(1,) * (w.ndim - 1)))
        if bias and norm.op == "scale":
            bias[0].derive(lambda b, s=scale: b * s())
        elif bias:
            bias[0].derive(lambda b, s=scale, t=shift: b * s() + t())
        elif norm.op != "scale":
            channels = (weight.shape[0],)
            bias = [graph.add_param(graph.unique_name(f"{layer.name}.bias"), channels)]
            bias[0].set_data(shift)
        graph.replace_node(layer, layer.op, [x, weight, *bias], layer.attrs)
        graph.bypass(norm)
        changed = True
    return changed
