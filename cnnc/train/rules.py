"""The gradient rule of each forward op: the IR nodes computing its inputs' gradients from its
outputs' gradients (see cnnc/train/autodiff.py). Every rule is checked against central
finite differences in float64 (tests/test_gradients.py)."""

from __future__ import annotations

import numpy as np

from cnnc.ops.activation import ACTIVATIONS
from cnnc.train.autodiff import GradContext, gradient

# ---- convolution and fully connected layers ---------------------------------------------------


def conv_input_grad(g: GradContext, dy, weight, x) -> object:
    """dx of y = conv(x, w): the transposed convolution of dy by the same weights, its
    output padding chosen so that it gives back x's sizes."""
    a = g.attrs
    rank = len(a["stride"])
    kernel = weight.shape[2:]
    output_pad = []
    for i in range(rank):
        size, out = x.shape[2 + i], dy.shape[2 + i]
        span = (out - 1) * a["stride"][i] - a["pads"][i] - a["pads"][i + rank]
        output_pad.append(size - (span + a["dilation"][i] * (kernel[i] - 1) + 1))
    attrs = {
        "stride": a["stride"],
        "pads": a["pads"],
        "dilation": a["dilation"],
        "groups": a["groups"],
        "output_pad": tuple(output_pad),
    }
    return g.emit("conv_transpose", [dy, weight], attrs, suffix=".x")


def bias_grad(g: GradContext, dy):
    """The gradient of a per-channel bias: dy summed over every axis but the channels."""
    axes = (0, *range(2, dy.type.rank))
    return g.emit("reduce_sum", [dy], {"axes": axes, "keepdims": False}, suffix=".bias")


@gradient("conv")
def _conv(g: GradContext):
    if g.attrs.get("activation"):
        from cnnc.errors import InternalError

        raise InternalError("training graphs are built before fuse-conv-act")
    dy, x, w = g.dy(), g.x(0), g.x(1)
    grads = [
        conv_input_grad(g, dy, w, x) if g.needs(0) else None,
        None,
    ]
    if g.needs(1):
        a = g.attrs
        attrs = {
            "kernel": tuple(w.shape[2:]),
            "stride": a["stride"],
            "pads": a["pads"],
            "dilation": a["dilation"],
            "groups": a["groups"],
        }
        grads[1] = g.emit("conv_grad_weight", [x, dy], attrs, suffix=".weight")
    if len(g.node.inputs) > 2:
        grads.append(bias_grad(g, dy) if g.needs(2) else None)
    return grads


@gradient("fc")
def _fc(g: GradContext):
    dy, x, w = g.dy(), g.x(0), g.x(1)
    flags = {"trans_a": False, "trans_b": False}
    grads = [
        g.emit("matmul", [dy, w], flags, suffix=".x") if g.needs(0) else None,
        g.emit("matmul", [dy, x], {**flags, "trans_a": True}, suffix=".weight")
        if g.needs(1)
        else None,
    ]
    if len(g.node.inputs) > 2:
        grads.append(
            g.emit("reduce_sum", [dy], {"axes": (0,), "keepdims": False}, suffix=".bias")
            if g.needs(2)
            else None
        )
    return grads


# ---- element-wise ----------------------------------------------------------------------------


@gradient(*ACTIVATIONS)
def _activation(g: GradContext):
    attrs = {"activation": g.node.op, "activation_attrs": dict(g.attrs)}
    return [g.emit("activation_grad", [g.x(), g.dy()], attrs)]


@gradient("softmax")
def _softmax(g: GradContext):
    # dx = y · (dy − Σ dy·y), the sum along the softmax's axis
    y, dy = g.y(), g.dy()
    axis = g.attrs["axis"] % y.type.rank
    dyy = g.emit("mul", [dy, y], suffix=".dyy")
    total = g.emit("reduce_sum", [dyy], {"axes": (axis,), "keepdims": True}, suffix=".sum")
    centred = g.emit("sub", [dy, total], suffix=".centred")
    return [g.emit("mul", [centred, y])]


@gradient("add")
def _add(g: GradContext):
    return [g.sum_to(g.dy(), v) if g.needs(i) else None for i, v in enumerate(g.node.inputs)]


@gradient("sub")
def _sub(g: GradContext):
    a, b = g.x(0), g.x(1)
    dy = g.dy()
    db = None
    if g.needs(1):
        db = g.sum_to(g.emit("mul", [dy, g.scalar(-1.0, dy)], suffix=".neg"), b)
    return [g.sum_to(dy, a) if g.needs(0) else None, db]


@gradient("mul")
def _mul(g: GradContext):
    a, b = g.x(0), g.x(1)
    dy = g.dy()
    da = g.sum_to(g.emit("mul", [dy, b], suffix=".a"), a) if g.needs(0) else None
    db = g.sum_to(g.emit("mul", [dy, a], suffix=".b"), b) if g.needs(1) else None
    return [da, db]


@gradient("div")
def _div(g: GradContext):
    # y = a / b: da = dy / b, db = −dy · y / b
    a, b, y = g.x(0), g.x(1), g.y()
    dy = g.dy()
    da = g.sum_to(g.emit("div", [dy, b], suffix=".a"), a) if g.needs(0) else None
    db = None
    if g.needs(1):
        dyy = g.emit("mul", [dy, y], suffix=".dyy")
        q = g.emit("div", [dyy, b], suffix=".q")
        db = g.sum_to(g.emit("mul", [q, g.scalar(-1.0, dy)], suffix=".b"), b)
    return [da, db]


# ---- pooling -----------------------------------------------------------------------------------


@gradient("maxpool")
def _maxpool(g: GradContext):
    attrs = {k: g.attrs[k] for k in ("kernel", "stride", "pads", "dilation", "ceil")}
    return [g.emit("maxpool_grad", [g.x(), g.dy()], attrs)]


@gradient("gap")
def _gap(g: GradContext):
    x = g.x()
    spatial = x.shape[2:]
    share = np.full((1, 1, *spatial), 1.0 / int(np.prod(spatial)))
    return [g.emit("mul", [g.dy(), g.constant(share, ".share")])]


# ---- shapes ------------------------------------------------------------------------------------


@gradient("flatten", "reshape")
def _reshape(g: GradContext):
    return [g.emit("reshape", [g.dy()], {"shape": tuple(g.x().shape[1:])})]


@gradient("dropout", "drop_path")
def _identity(g: GradContext):
    # In a training step these are multiplications by a mask (cnnc/train/step.py); the
    # nodes left are the ones of probability 0, identities.
    return [g.dy()]


# ---- normalisation -----------------------------------------------------------------------------


@gradient("bn_train")
def _bn_train(g: GradContext):
    x, weight = g.x(0), g.x(1)
    mean, invstd = g.y(1), g.y(2)
    dx, dw, db = g.emit_outputs("bn_grad", [x, weight, mean, invstd, g.dy_or_zeros(0)])
    return [dx, dw, db, None, None]
