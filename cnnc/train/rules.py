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


# ---- spatial and structural ops ----------------------------------------------------------------
# Each gradient is an IR op where one exists that computes it exactly (a convolution, a
# transposed convolution, pad with negative amounts to crop, slice, concat), else one of
# the gradient ops of cnnc/ops/train.py (axis_matmul, slice_grad, maxpool_grad,
# adaptive_maxpool_grad).


def _crop_to(g: GradContext, v, spatial: tuple[int, ...], suffix: str):
    """``v`` cut or zero-extended at the end of each spatial axis to ``spatial``."""
    have = v.shape[2:]
    if tuple(have) == tuple(spatial):
        return v
    rank = len(spatial)
    pads = (0,) * rank + tuple(s - h for s, h in zip(spatial, have, strict=True))
    return g.emit("pad", [v], {"pads": pads, "mode": "constant", "value": 0.0}, suffix=suffix)


@gradient("conv_transpose")
def _conv_transpose(g: GradContext):
    # y = conv_transpose(x, w) is the input gradient of conv(·, w): dx = conv(dy, w) with the
    # same stride, pads, dilation and groups (w [C, out/groups, k…] is a conv weight from
    # out to C channels); dw is conv_grad_weight with the roles of x and dy swapped.
    dy, x, w = g.dy(), g.x(0), g.x(1)
    a = g.attrs
    window = {k: a[k] for k in ("stride", "pads", "dilation", "groups")}
    grads = [None, None]
    if g.needs(0):
        dx = g.emit("conv", [dy, w], dict(window), suffix=".x")
        # an output_pad of at least the stride (possible when the dilation is larger) makes
        # the convolution one or more positions longer than x at the end
        grads[0] = _crop_to(g, dx, tuple(x.shape[2:]), ".x.crop")
    if g.needs(1):
        attrs = {"kernel": tuple(w.shape[2:]), **window}
        grads[1] = g.emit("conv_grad_weight", [dy, x], attrs, suffix=".weight")
    if len(g.node.inputs) > 2:
        grads.append(bias_grad(g, dy) if g.needs(2) else None)
    return grads


@gradient("avgpool")
def _avgpool(g: GradContext):
    # dx: each window spreads dy / (its divisor) over its taps: dy times the reciprocal
    # divisors (a constant), then a depthwise transposed convolution by ones (by 1/divisor
    # when every window has the same one), which adds each window's share into the padded
    # input; the pads crop the start, and the end is cut (or, where floor mode's windows
    # end early, zero-extended) to x's size.
    from cnnc.backends.kernels import _avg_counts

    x, dy = g.x(), g.dy()
    a = g.attrs
    kernel, stride, dilation, pads = a["kernel"], a["stride"], a["dilation"], a["pads"]
    rank = len(kernel)
    spatial, out = tuple(x.shape[2:]), tuple(dy.shape[2:])
    counts = [
        _avg_counts(
            spatial[i],
            out[i],
            kernel[i],
            stride[i],
            dilation[i],
            pads[i],
            pads[i + rank],
            a["count_include_pad"],
        ).astype(np.float64)
        for i in range(rank)
    ]
    divisor = counts[0] if rank == 1 else np.outer(counts[0], counts[1])
    channels = x.shape[1]
    if np.all(divisor == divisor.flat[0]):
        # one divisor for every window (the usual case): it goes into the weights
        share, weight = dy, np.full((channels, 1, *kernel), 1.0 / divisor.flat[0])
    else:
        reciprocal = g.constant(1.0 / divisor[None, None], ".share")
        share = g.emit("mul", [dy, reciprocal], suffix=".share")
        weight = np.ones((channels, 1, *kernel))
    ones = g.constant(weight, ".ones")
    attrs = {
        "stride": tuple(stride),
        "pads": (*pads[:rank], *(0,) * rank),
        "dilation": tuple(dilation),
        "groups": channels,
        "output_pad": (0,) * rank,
    }
    spread = g.emit("conv_transpose", [share, ones], attrs, suffix=".spread")
    return [_crop_to(g, spread, spatial, "")]


@gradient("global_maxpool")
def _global_maxpool(g: GradContext):
    spatial = tuple(g.x().shape[2:])
    attrs = {
        "kernel": spatial,
        "stride": spatial,
        "pads": (0,) * (2 * len(spatial)),
        "dilation": (1,) * len(spatial),
        "ceil": False,
    }
    return [g.emit("maxpool_grad", [g.x(), g.dy()], attrs)]


def _axis_matmul(g: GradContext, dy, matrices: list[np.ndarray]):
    """dy multiplied along each spatial axis by the transpose of the forward op's matrix
    [out, in] of that axis."""
    consts = [
        g.constant(np.ascontiguousarray(m.T), f".m{i}", like=dy) for i, m in enumerate(matrices)
    ]
    return g.emit("axis_matmul", [dy, *consts])


@gradient("adaptive_avgpool")
def _adaptive_avgpool(g: GradContext):
    from cnnc.ops.pool import adaptive_windows

    matrices = []
    for size, out in zip(g.x().shape[2:], g.attrs["size"], strict=True):
        starts, stops = adaptive_windows(size, out)
        columns = np.arange(size)
        inside = (columns >= starts[:, None]) & (columns < stops[:, None])
        matrices.append(inside / (stops - starts)[:, None])
    return [_axis_matmul(g, g.dy(), matrices)]


@gradient("adaptive_maxpool")
def _adaptive_maxpool(g: GradContext):
    return [g.emit("adaptive_maxpool_grad", [g.x(), g.dy()], {"size": tuple(g.attrs["size"])})]


@gradient("upsample")
def _upsample(g: GradContext):
    from cnnc.ops.resize import NEAREST_MODES, linear_taps, nearest_indices, upsample_sizes

    a = g.attrs
    spatial = tuple(g.x().shape[2:])
    rank = len(spatial)
    matrices = []
    for i, (size, out) in enumerate(zip(spatial, upsample_sizes(spatial, a), strict=True)):
        scale = a["scales"][i] if a["scales"] is not None else None
        m = np.zeros((out, size))
        rows = np.arange(out)
        if a["mode"] in NEAREST_MODES:
            m[rows, nearest_indices(size, out, scale, a["mode"], rank)] = 1.0
        else:
            # the float32 weights of the forward kernels (PyTorch's), exactly
            first, second, w0, w1 = linear_taps(size, out, scale, a["align_corners"])
            np.add.at(m, (rows, first), w0.astype(np.float64))
            np.add.at(m, (rows, second), w1.astype(np.float64))
        matrices.append(m)
    return [_axis_matmul(g, g.dy(), matrices)]


@gradient("pad")
def _pad(g: GradContext):
    a = g.attrs
    pads = tuple(a["pads"])
    if a["mode"] == "constant":
        # the padding's values are constants; cropping what was added (and zeros where a
        # negative amount cropped) is a pad by the opposite amounts
        attrs = {"pads": tuple(-p for p in pads), "mode": "constant", "value": 0.0}
        return [g.emit("pad", [g.dy()], attrs)]
    rank = len(pads) // 2
    mode = {"reflect": "reflect", "edge": "edge"}[a["mode"]]
    matrices = [
        np.pad(np.eye(size), ((pads[i], pads[i + rank]), (0, 0)), mode=mode)
        for i, size in enumerate(g.x().shape[2:])
    ]
    return [_axis_matmul(g, g.dy(), matrices)]


@gradient("crop")
def _crop(g: GradContext):
    x, dy = g.x(0), g.dy()
    offset = tuple(g.attrs["offset"])
    ends = tuple(s - o - d for s, o, d in zip(x.shape[2:], offset, dy.shape[2:], strict=True))
    attrs = {"pads": (*offset, *ends), "mode": "constant", "value": 0.0}
    # the reference gives only its size: no gradient
    return [g.emit("pad", [dy], attrs), None]


@gradient("slice")
def _slice(g: GradContext):
    a = g.attrs
    size = g.x().shape[a["axis"]]
    start, stop, _ = slice(a["start"], a["end"]).indices(size)
    attrs = {"axis": a["axis"], "start": start, "stop": stop, "size": size}
    return [g.emit("slice_grad", [g.dy()], attrs)]


@gradient("split")
def _split(g: GradContext):
    # an unused part has no gradient: zeros in its place
    parts = [g.dy_or_zeros(i) for i in range(len(g.node.outputs))]
    return [g.emit("concat", parts) if len(parts) > 1 else parts[0]]


@gradient("concat")
def _concat(g: GradContext):
    dy, grads, start = g.dy(), [], 0
    for i, v in enumerate(g.node.inputs):
        stop = start + v.shape[1]
        if g.needs(i):
            attrs = {"axis": 1, "start": start, "end": stop}
            grads.append(g.emit("slice", [dy], attrs, suffix=f".{i}"))
        else:
            grads.append(None)
        start = stop
    return grads


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


@gradient("layernorm", "groupnorm")
def _normalization(g: GradContext):
    # layernorm_grad / groupnorm_grad recompute the statistics from x and give all three
    x, w, _ = g.node.inputs
    keys = ("axis", "epsilon") if g.node.op == "layernorm" else ("groups", "epsilon")
    attrs = {k: g.attrs[k] for k in keys}
    return list(g.emit_outputs(f"{g.node.op}_grad", [x, w, g.dy()], attrs))


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
