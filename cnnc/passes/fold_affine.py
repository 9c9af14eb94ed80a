"""fold-affine: a per-channel scale and shift (bn, affine, scale) right before a conv, an fc or
a linear layer folds into that layer's weights and bias, where that is exact.

With y = x·s + t per channel (a bn's s = gamma / sqrt(var + eps), t = beta - mean·s; a
scale's t = 0):

    y = affine(x, s, t); z = conv(y, W, b)  ==>  z = conv(x, W·S, b + Σ W·T)
        S[o, i] = s[g(o)·C_in/groups + i]: the scale of input channel i of output channel
        o's group g(o) (a depthwise conv: S[o, 0] = s[o]), T likewise; Σ over all axes
        but the first
    y = scale(x, s); z = conv(y, W, b)      ==>  z = conv(x, W·S, b)   (padded too)
    y = affine(x, s, t); z = fc(y, W, b)    ==>  z = fc(x, W·s, b + W·t)   (s along W's rows)
    y = affine(x, s, t); f = flatten(y); z = fc(f, W, b)
        ==>  f = flatten(x); z = fc(f, W·s', b + W·t')   s', t': s, t of each channel
        repeated over its H·W features, in flatten's C, H, W order
    y = affine(x, s, t); z = linear(y, W, b) over the channels  ==>  as fc
    y = scale(x, s); z = conv_transpose(y, W, b)  ==>  z = conv_transpose(x, W·s, b)
        (each input channel's weights W[i] scaled by s[i])

A layer without bias gains one, named ``<layer>.bias``, where the shift needs it.

Leaves alone (and why):
- a shift before a padded conv: the conv pads y with zeros, but padding x with zeros and
  then shifting would put t there, so the border outputs would change (a scale is exact:
  0·s = 0);
- a shift before a conv_transpose: an output position near the border sums fewer taps
  than one inside, so the shift is not one bias per output channel;
- y read by another node too, or a network output: the other reader needs it;
- a linear layer over another axis than the channels; a layer whose weights another node
  reads too (possible in imported models); parameters that are values of the run (a
  training step's graph).
"""

from __future__ import annotations

import numpy as np

from cnnc.ir.graph import Graph, Node
from cnnc.ops.norm import CHANNEL_NORMS as NORMS
from cnnc.ops.norm import channel_scale_shift, has_constant_params

LAYERS = ("conv", "conv_transpose", "fc", "linear")


def _layer_after(graph: Graph, norm: Node) -> Node | None:
    """The conv, conv_transpose, fc or linear layer that alone reads ``norm``'s output
    (an fc through a flatten), if the norm may fold into it."""
    y = norm.output
    if len(y.users) != 1 or y in graph.outputs or not has_constant_params(norm):
        return None
    layer = y.users[0]
    if layer.op == "flatten":
        flat = layer.output
        if len(flat.users) != 1 or flat in graph.outputs:
            return None
        y, layer = flat, flat.users[0]
        if layer.op != "fc":
            return None
    if layer.op not in LAYERS or layer.inputs[0] is not y or y in layer.inputs[1:]:
        return None
    if layer.op == "linear" and layer.attrs["axis"] != 1:
        return None
    for p in layer.inputs[1:]:
        if not p.is_param or not p.has_data or len(p.users) != 1 or p in graph.outputs:
            return None
    return layer


def _along_weight(layer: Node, vector: np.ndarray) -> np.ndarray:
    """``vector`` (one value per input channel of ``layer``) laid out to multiply the
    layer's weight element by element."""
    w = layer.inputs[1].shape
    if layer.op == "conv":
        out, per_group = w[0], w[1]
        group = np.arange(out) // (out // layer.attrs["groups"])
        channel = group[:, None] * per_group + np.arange(per_group)[None, :]
        return vector[channel].reshape(out, per_group, *(1,) * (len(w) - 2))
    if layer.op == "conv_transpose":  # [C_in, out/groups, k...]: the input channels first
        return vector.reshape(-1, *(1,) * (len(w) - 1))
    # fc and linear [K, F]; after a flatten, F holds each channel's H·W features in turn
    return np.repeat(vector, w[1] // len(vector))[None, :]


def fold_affine(graph: Graph) -> bool:
    """Fold every bn, affine or scale into the conv, conv_transpose, fc or linear layer
    after it, where exact; returns whether the graph changed."""
    changed = False
    for norm in [n for n in graph.nodes if n.op in NORMS]:
        layer = _layer_after(graph, norm)
        if layer is None:
            continue
        s, t = channel_scale_shift(norm)  # per-channel vectors: small, computed now
        shifted = t is not None and bool(np.any(t))
        if shifted and (
            layer.op == "conv_transpose" or (layer.op == "conv" and any(layer.attrs["pads"]))
        ):
            continue
        weight, *bias = layer.inputs[1:]
        scale = _along_weight(layer, s)
        if shifted:
            shift = _along_weight(layer, t)
            original = weight.source()  # the bias needs the weight before its scaling

            def added(original=original, shift=shift) -> np.ndarray:
                w = original()
                return (w * shift).sum(axis=tuple(range(1, w.ndim)), dtype=np.float64)

            if bias:
                bias[0].derive(lambda b, added=added: b + added())
            else:
                new = graph.add_param(graph.unique_name(f"{layer.name}.bias"), weight.shape[:1])
                new.set_data(added)
                bias = [new]
        weight.derive(lambda w, scale=scale: w * scale)
        graph.bypass(norm)
        if len(layer.inputs) < 2 + len(bias):
            graph.replace_node(layer, layer.op, [*layer.inputs, *bias], layer.attrs)
        changed = True
    return changed
