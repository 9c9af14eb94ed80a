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
    # y = x0 · x1 · … : dxi = dy · (the product of the others), summed to xi's shape
    xs, dy = g.node.inputs, g.dy()
    grads = []
    for i, x in enumerate(xs):
        if not g.needs(i):
            grads.append(None)
            continue
        others = [v for j, v in enumerate(xs) if j != i]
        grads.append(g.sum_to(g.emit("mul", [dy, *others], suffix=f".{i}"), x))
    return grads


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


# ---- per-channel scales, normalizations, linear layers, transposes ------------------------------


def _per_channel_sum(g: GradContext, t, suffix: str):
    """t summed over every axis but the channels (1): [C]."""
    axes = (0, *range(2, t.type.rank))
    return g.emit("reduce_sum", [t], {"axes": axes, "keepdims": False}, suffix=suffix)


def _channel_view(g: GradContext, w, rank: int):
    """A [C] parameter as [C, 1, ..., 1], the layout that multiplies a rank-``rank`` map per
    channel (a scale's weight)."""
    if rank == 2:
        return w
    return g.emit("reshape", [w], {"shape": (1,) * (rank - 2)}, suffix=".per_channel")


@gradient("affine")
def _affine(g: GradContext):
    x, w, _ = g.node.inputs
    dy = g.dy()
    return [
        g.emit("scale", [dy, _channel_view(g, w, x.type.rank)], suffix=".x")
        if g.needs(0)
        else None,
        _per_channel_sum(g, g.emit("mul", [dy, x], suffix=".dyx"), ".weight")
        if g.needs(1)
        else None,
        bias_grad(g, dy) if g.needs(2) else None,
    ]


@gradient("scale")
def _scale(g: GradContext):
    x, w = g.node.inputs
    dy = g.dy()
    return [
        g.emit("scale", [dy, w], suffix=".x") if g.needs(0) else None,
        g.sum_to(g.emit("mul", [dy, x], suffix=".dyx"), w) if g.needs(1) else None,
    ]


@gradient("bn")
def _bn(g: GradContext):
    # Inference mode (frozen statistics, as a network in eval() fine-tunes): y = x̂ · w + b,
    # x̂ = (x − running_mean) / sqrt(running_var + eps); the bn op itself computes
    # dx = dy · w / sqrt(running_var + eps) (mean and bias 0) and x̂ (weight 1, bias 0).
    x, w, _, mean, var = g.node.inputs
    dy = g.dy()
    channels = x.shape[1]
    zeros = g.constant(np.zeros(channels), ".zeros")
    attrs = {"epsilon": g.attrs["epsilon"]}
    grads = [None] * 5
    if g.needs(0):
        grads[0] = g.emit("bn", [dy, w, zeros, zeros, var], attrs, suffix=".x")
    if g.needs(1):
        ones = g.constant(np.ones(channels), ".ones")
        xhat = g.emit("bn", [x, ones, zeros, mean, var], attrs, suffix=".xhat")
        grads[1] = _per_channel_sum(g, g.emit("mul", [dy, xhat], suffix=".dyxhat"), ".weight")
    if g.needs(2):
        grads[2] = bias_grad(g, dy)
    return grads


@gradient("prelu")
def _prelu(g: GradContext):
    # y = x where x > 0, else w · x: the part of dy where x ≤ 0 is dy − relu'(x) · dy
    # (exact: each element is dy or 0), scaled by the slopes for dx, and times x for dw.
    x, w = g.node.inputs
    dy, rank = g.dy(), x.type.rank
    relu = {"activation": "relu", "activation_attrs": {}}
    positive = g.emit("activation_grad", [x, dy], relu, suffix=".positive")
    rest = g.emit("sub", [dy, positive], suffix=".rest")
    shared = w.shape != (x.shape[1],)  # one slope for every channel
    grads = [None, None]
    if g.needs(0):
        if shared:
            slope = g.emit("reshape", [w], {"shape": (1,) * (rank - 1)}, suffix=".slope")
            scaled = g.emit("mul", [rest, slope], suffix=".scaled")
        else:
            scaled = g.emit("scale", [rest, _channel_view(g, w, rank)], suffix=".scaled")
        grads[0] = g.emit("add", [positive, scaled], suffix=".x")
    if g.needs(1):
        product = g.emit("mul", [rest, x], suffix=".restx")
        if shared:
            total = g.emit(
                "reduce_sum", [product], {"axes": (0,), "keepdims": True}, suffix=".batch"
            )
            axes = {"axes": tuple(range(1, rank)), "keepdims": False}
            grads[1] = g.emit("reduce_sum", [total], axes, suffix=".weight")
        else:
            grads[1] = _per_channel_sum(g, product, ".weight")
    return grads


@gradient("layernorm")
def _layernorm(g: GradContext):
    x, w, _ = g.node.inputs
    attrs = {"axis": g.attrs["axis"], "epsilon": g.attrs["epsilon"]}
    dx, dw, db = g.emit_outputs("layernorm_grad", [x, w, g.dy()], attrs)
    return [dx, dw, db]


@gradient("groupnorm")
def _groupnorm(g: GradContext):
    x, w, _ = g.node.inputs
    attrs = {"groups": g.attrs["groups"], "epsilon": g.attrs["epsilon"]}
    dx, dw, db = g.emit_outputs("groupnorm_grad", [x, w, g.dy()], attrs)
    return [dx, dw, db]


@gradient("lrn")
def _lrn(g: GradContext):
    return [g.emit("lrn_grad", [g.x(), g.dy()], dict(g.attrs))]


@gradient("transpose")
def _transpose(g: GradContext):
    perm = tuple(g.attrs["perm"])
    inverse = tuple(perm.index(a) for a in range(len(perm)))
    return [g.emit("transpose", [g.dy()], {"perm": inverse})]


@gradient("linear")
def _linear(g: GradContext):
    # The same product at every position is a 1-D convolution of kernel 1 once the axis is
    # the channel axis and the other axes one: dx is its transposed convolution by the
    # weight [K, C, 1], dw its weight gradient; the bias sums dy over all axes but the axis.
    x, w = g.x(0), g.x(1)
    dy, axis, rank = g.dy(), g.attrs["axis"], x.type.rank
    c = w.shape[1]
    perm = (0, axis, *(a for a in range(1, rank) if a != axis))

    def as_conv1d(v, suffix: str):
        if axis != 1:
            v = g.emit("transpose", [v], {"perm": perm}, suffix=f".{suffix}_first")
        if rank != 3:
            positions = int(np.prod(v.shape[2:]))
            v = g.emit("reshape", [v], {"shape": (v.shape[1], positions)}, suffix=f".{suffix}3")
        return v

    window = {"stride": (1,), "pads": (0, 0), "dilation": (1,), "groups": 1}
    dy3 = as_conv1d(dy, "dy")
    grads = [None, None]
    if g.needs(0):
        kernel = g.emit("reshape", [w], {"shape": (c, 1)}, suffix=".kernel")
        dx = g.emit("conv_transpose", [dy3, kernel], {**window, "output_pad": (0,)}, suffix=".x3")
        moved = tuple(x.shape[a] for a in perm)
        if rank != 3:
            dx = g.emit("reshape", [dx], {"shape": moved[1:]}, suffix=".x_moved")
        if axis != 1:
            inverse = tuple(perm.index(a) for a in range(rank))
            dx = g.emit("transpose", [dx], {"perm": inverse}, suffix=".x")
        grads[0] = dx
    if g.needs(1):
        x3 = as_conv1d(x, "x")
        dw = g.emit("conv_grad_weight", [x3, dy3], {**window, "kernel": (1,)}, suffix=".weight3")
        grads[1] = g.emit("reshape", [dw], {"shape": (c,)}, suffix=".weight")
    if len(g.node.inputs) > 2:
        axes = {"axes": tuple(a for a in range(rank) if a != axis), "keepdims": False}
        grads.append(g.emit("reduce_sum", [dy], axes, suffix=".bias") if g.needs(2) else None)
    return grads
