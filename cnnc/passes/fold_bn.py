"""fold-bn: batch normalization (or a learned per-channel scale) after a conv, a
conv_transpose, an fc or a linear layer folds into that layer's weights and bias.

    y = conv(x, W, b); z = bn(y, gamma, beta, mean, var)
        ==>  z = conv(x, W * s, (b - mean) * s + beta)     with s = gamma / sqrt(var + eps)
    y = conv(x, W, b); z = affine(y, s, t)  ==>  z = conv(x, W * s, b * s + t)
    y = conv(x, W, b); z = scale(y, s)      ==>  z = conv(x, W * s, b * s)

The scale applies to each output channel: each row of a conv, fc or linear weight; in a
conv_transpose weight [C_in, out/groups, k...] the output channels run along axis 1,
group by group (output channel g·out/groups + o is column o of the rows of group g). A
layer without bias gains one, named ``<layer>.bias``, except under a scale, which has no
shift.

Leaves alone (and why):
- a bn whose input has other users, or is a network output: they need the unnormalized value;
- a bn after anything but a conv, a conv_transpose, an fc, or a linear layer over the
  channels (axis 1): there are no weights to fold into (a linear over another axis makes
  the values of that axis, not the channels the bn scales);
- a conv that already has a fused activation: the bn comes after the activation;
- a layer whose weights are shared with another node (possible in imported models):
  rescaling them would change the other node too.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from cnnc.ir.graph import Graph, Node
from cnnc.ops.norm import CHANNEL_NORMS as NORMS
from cnnc.ops.norm import channel_scale_shift

FOLDS_INTO = ("conv", "conv_transpose", "fc", "linear")


def _scaled(layer: Node, scale: Callable[[], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """The layer's weight times each output channel's scale."""
    if layer.op != "conv_transpose":
        return lambda w: w * scale().reshape(-1, *(1,) * (w.ndim - 1))
    groups = layer.attrs["groups"]

    def scaled(w: np.ndarray) -> np.ndarray:
        # [C_in, out/groups, k...] as [groups, C_in/groups, out/groups, k...]
        by_group = w.reshape(groups, -1, *w.shape[1:])
        s = scale().reshape(groups, 1, -1, *(1,) * (w.ndim - 2))
        return (by_group * s).reshape(w.shape)

    return scaled


def _foldable_into(graph: Graph, norm: Node) -> Node | None:
    x = norm.inputs[0]
    layer = x.producer
    if layer is None or layer.op not in FOLDS_INTO or layer.attrs.get("activation"):
        return None
    if layer.op == "linear" and layer.attrs["axis"] != 1:
        return None
    if len(x.users) != 1 or x in graph.outputs:
        return None
    if any(len(p.users) != 1 for p in layer.params):
        return None
    return layer


def fold_bn(graph: Graph) -> bool:
    """Fold every foldable bn, affine or scale into the conv, conv_transpose, fc or linear
    layer before it."""
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
        weight.derive(_scaled(layer, scale))
        if bias and norm.op == "scale":
            bias[0].derive(lambda b, s=scale: b * s())
        elif bias:
            bias[0].derive(lambda b, s=scale, t=shift: b * s() + t())
        elif norm.op != "scale":
            channels = (layer.output.shape[1],)
            bias = [graph.add_param(graph.unique_name(f"{layer.name}.bias"), channels)]
            bias[0].set_data(shift)
        graph.replace_node(layer, layer.op, [x, weight, *bias], layer.attrs)
        graph.bypass(norm)
        changed = True
    return changed
