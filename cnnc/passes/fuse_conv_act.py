"""fuse-conv-act: a convolution and the activation after it become one node.

    y = conv(x, W, b); z = relu(y)  ==>  z = conv+relu(x, W, b)

Any element-wise activation fuses (FUSIBLE in ops/activation.py: relu, leaky_relu,
clip and so relu6, sigmoid, tanh, silu, hardswish, hardsigmoid, gelu, mish, elu,
softplus): applying it to each value as the product leaves the conv is exact. It is
recorded in the conv's ``activation`` attribute, with the activation's own attributes
(leaky_relu's alpha, clip's min and max) in ``activation_attrs``. The interpreter
applies it in place on the matrix product's output; the ONNX exporter writes a
model-local function whose body is the standard Conv and the activation's ops.

Leaves alone (and why):
- a conv whose output has other users, or is a network output: they need the value
  before the activation;
- a conv that already has an activation;
- an activation after anything but a conv (an fc, a pool, an add, a conv_transpose: the
  transposed convolution has no fused form, in the interpreter or in ONNX);
- prelu: its slopes are a tensor the fused function would have to take as an input.
"""

from __future__ import annotations

from cnnc.ir.graph import Graph
from cnnc.ops.activation import FUSIBLE


def fuse_conv_act(graph: Graph) -> bool:
    """Fuse every activation that directly follows a conv no one else reads."""
    changed = False
    for act in [n for n in graph.nodes if n.op in FUSIBLE]:
        y = act.inputs[0]
        conv = y.producer
        if conv is None or conv.op != "conv" or conv.attrs.get("activation"):
            continue
        if len(y.users) != 1 or y in graph.outputs:
            continue
        attrs = {**conv.attrs, "activation": act.op, "activation_attrs": dict(act.attrs)}
        graph.replace_node(conv, "conv", conv.inputs, attrs)
        graph.bypass(act)
        changed = True
    return changed
