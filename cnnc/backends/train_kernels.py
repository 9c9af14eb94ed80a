"""Interpreter kernels of the training ops (cnnc/ops/train.py): gradients, losses, batch
statistics and optimizer updates. They compute in the dtype of their inputs (float64 for
the finite-difference checks) and take every input at run time; an input that is a
parameter of the graph (a constant of the training step) is read once when prepared."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.lib.stride_tricks import as_strided

from cnnc.backends import parallel
from cnnc.backends.kernels import KERNELS, PARAM_KERNELS, Kernel, Window, _window, erf
from cnnc.ir.graph import Node


def train_kernel(op: str):
    """Register a kernel ``make(node) -> run(*inputs)`` that receives every input of the node,
    parameters included, in order."""

    def register(make: Callable[[Node], Callable[..., object]]):
        def prepare(node: Node) -> Kernel:
            run = make(node)
            fixed = {i: v.data for i, v in enumerate(node.inputs) if v.is_param}
            if not fixed:
                return run
            count = len(node.inputs)

            def with_params(*activations):
                it = iter(activations)
                return run(*(fixed[i] if i in fixed else next(it) for i in range(count)))

            return with_params

        KERNELS[op] = prepare
        PARAM_KERNELS.add(op)
        return make

    return register


# ---- convolution -----------------------------------------------------------------------------


def _taps(win: Window):
    (kh, kw), (dh, dw) = win.kernel, win.dilation
    return [(i, j, i * dh, j * dw) for i in range(kh) for j in range(kw)]


def _tap_view(xp: np.ndarray, win: Window, top: int, left: int, oh: int, ow: int) -> np.ndarray:
    sh, sw = win.stride
    return xp[:, :, top : top + (oh - 1) * sh + 1 : sh, left : left + (ow - 1) * sw + 1 : sw]


@train_kernel("conv_grad_weight")
def conv_grad_weight(node: Node):
    a = node.attrs
    win = Window(tuple(a["kernel"]), a["stride"], a["pads"], a["dilation"])
    groups = a["groups"]

    def run(x: np.ndarray, dy: np.ndarray) -> np.ndarray:
        x, dy = win.lift(x), win.lift(dy)
        n, c, _, _ = x.shape
        o, oh, ow = dy.shape[1], dy.shape[2], dy.shape[3]
        xp = win.padded(x, 0.0, oh, ow)
        kh, kw = win.kernel
        cg, og = c // groups, o // groups
        if groups == c == o:  # depthwise: one product per tap, summed over batch and pixels
            w = np.empty((o, 1, kh, kw), dy.dtype)
            for i, j, top, left in _taps(win):
                tap = _tap_view(xp, win, top, left, oh, ow)
                w[:, 0, i, j] = np.einsum("ncij,ncij->c", tap, dy, optimize=False)
            return _drop_weight(w, win)
        sn, sc, sh_, sw_ = xp.strides
        (sh, sw), (dh, dw) = win.stride, win.dilation
        pool = parallel.current()
        shares = parallel.split(n, pool.threads) if n > 1 else [(0, n)]
        partial = [np.empty((groups, og, cg * kh * kw), dy.dtype) for _ in shares]

        def work(k: int, worker: int) -> None:
            # a share of the batch: its im2col columns (the copy that costs most) and their
            # product with its output gradients; the shares' products are summed after
            lo, hi = shares[k]
            m = hi - lo
            cols = as_strided(
                xp[lo:hi],
                (groups, cg, kh, kw, m, oh, ow),
                (cg * sc, sc, sh_ * dh, sw_ * dw, sn, sh_ * sh, sw_ * sw),
                writeable=False,
            ).reshape(groups, cg * kh * kw, m * oh * ow)
            d = dy[lo:hi].reshape(m, groups, og, oh * ow).transpose(1, 2, 0, 3)
            np.matmul(d.reshape(groups, og, -1), cols.transpose(0, 2, 1), out=partial[k])

        pool.map(work, len(shares))
        w = partial[0]
        for more in partial[1:]:
            w += more
        return _drop_weight(w.reshape(o, cg, kh, kw), win)

    return run


def _drop_weight(w: np.ndarray, win: Window) -> np.ndarray:
    return w[:, :, 0, :] if win.one_d else w


@train_kernel("reduce_sum")
def reduce_sum(node: Node):
    axes, keep = tuple(node.attrs["axes"]), node.attrs["keepdims"]
    return lambda x: np.sum(x, axis=axes, keepdims=keep)


@train_kernel("matmul")
def matmul(node: Node):
    ta, tb = node.attrs["trans_a"], node.attrs["trans_b"]
    return lambda a, b: np.matmul(a.T if ta else a, b.T if tb else b)


# ---- pooling ---------------------------------------------------------------------------------


@train_kernel("maxpool_grad")
def maxpool_grad(node: Node):
    win = _window(node, node.attrs["kernel"])

    (kh, kw), (sh, sw) = win.kernel, win.stride
    tiled = (kh, kw) == (sh, sw) and not any(win.pads) and win.dilation == (1, 1)

    def tiles(x: np.ndarray, dy: np.ndarray) -> np.ndarray:
        # Windows that tile the map (LeNet's 2×2, stride 2): each tap is a strided view, and
        # each window's gradient goes to the first tap (row-major) that holds its maximum;
        # rows and columns no window reaches get 0. No padding and no overlapping adds.
        oh, ow = dy.shape[2], dy.shape[3]
        dx = np.zeros(x.shape, dy.dtype)

        def work(share: slice) -> None:
            part, target, grads = x[:, share], dx[:, share], dy[:, share]
            views = [
                part[:, :, i : i + oh * kh : kh, j : j + ow * kw : kw]
                for i in range(kh)
                for j in range(kw)
            ]
            best = views[0].copy()
            for v in views[1:]:
                np.maximum(best, v, out=best)
            left = np.ones(best.shape, bool)  # windows whose maximum is not yet placed
            hit = np.empty(best.shape, bool)
            for t, v in enumerate(views):
                i, j = divmod(t, kw)
                np.equal(v, best, out=hit)
                hit &= left
                left &= ~hit
                np.multiply(
                    grads, hit, out=target[:, :, i : i + oh * kh : kh, j : j + ow * kw : kw]
                )

        parallel.share(x.shape[1], work, x.size)
        return dx

    def run(x: np.ndarray, dy: np.ndarray) -> np.ndarray:
        x, dy = win.lift(x), win.lift(dy)
        h, w = x.shape[2:]
        oh, ow = dy.shape[2], dy.shape[3]
        if tiled and oh * kh <= h and ow * kw <= w:
            return win.drop(tiles(x, dy))
        xp = win.padded(x, -np.inf, oh, ow)
        taps = _taps(win)
        dxp = np.zeros(xp.shape, dy.dtype)

        def work(share: slice) -> None:
            # The first largest input of each window (PyTorch's and onnxruntime's choice)
            # takes the window's gradient; overlapping windows add up. A loop over the taps.
            part, grads, target = xp[:, share], dy[:, share], dxp[:, share]
            best = _tap_view(part, win, taps[0][2], taps[0][3], oh, ow).copy()
            arg = np.zeros(best.shape, np.uint8 if len(taps) < 256 else np.int32)
            mask = np.empty(best.shape, bool)
            for t, (_, _, top, left) in enumerate(taps[1:], 1):
                v = _tap_view(part, win, top, left, oh, ow)
                np.greater(v, best, out=mask)
                np.maximum(best, v, out=best)
                np.putmask(arg, mask, t)
            term = best  # its memory, for each tap's share of the gradient
            for t, (_, _, top, left) in enumerate(taps):
                np.equal(arg, t, out=mask)
                np.multiply(grads, mask, out=term)
                view = _tap_view(target, win, top, left, oh, ow)
                view += term

        parallel.share(xp.shape[1], work, xp.size * len(taps))
        pt, pl = win.pads[0], win.pads[1]
        return win.drop(np.ascontiguousarray(dxp[:, :, pt : pt + h, pl : pl + w]))

    return run


# ---- element-wise ----------------------------------------------------------------------------


def _sig(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _softplus(z: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, z)


def _derivative(op: str, attrs: dict) -> Callable[[np.ndarray], np.ndarray]:
    """f'(x) of each element-wise op, in x's dtype."""
    if op == "relu":
        return lambda x: (x > 0).astype(x.dtype)
    if op == "leaky_relu":
        alpha = attrs["alpha"]
        return lambda x: np.where(x > 0, 1.0, alpha).astype(x.dtype)
    if op == "clip":
        # 0 at the bounds themselves, as torch.clamp, hardtanh and relu6 give
        low, high = attrs["min"], attrs["max"]
        return lambda x: ((x > low) & (x < high)).astype(x.dtype)
    if op == "sigmoid":
        return lambda x: (lambda s: s * (1 - s))(_sig(x))
    if op == "tanh":
        return lambda x: 1 - np.tanh(x) ** 2
    if op == "silu":
        return lambda x: (lambda s: s * (1 + x * (1 - s)))(_sig(x))
    if op == "hardsigmoid":
        alpha, beta = attrs["alpha"], attrs["beta"]
        return lambda x: np.where((alpha * x + beta > 0) & (alpha * x + beta < 1), alpha, 0.0)
    if op == "hardswish":
        # PyTorch's values at the kinks: 0 at -3, 1 at 3
        return lambda x: np.where(x <= -3, 0.0, np.where(x < 3, x / 3 + 0.5, 1.0))
    if op == "gelu":
        if attrs["approximate"] == "tanh":
            k = np.sqrt(2 / np.pi)

            def gelu_tanh(x):
                t = np.tanh(k * (x + 0.044715 * x**3))
                return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * k * (1 + 3 * 0.044715 * x * x)

            return gelu_tanh
        return lambda x: (
            0.5 * (1 + erf(x / np.sqrt(2.0))) + x * np.exp(-0.5 * x * x) / np.sqrt(2 * np.pi)
        )
    if op == "mish":

        def mish(x):
            t = np.tanh(_softplus(x))
            return t + x * (1 - t * t) * _sig(x)

        return mish
    if op == "elu":
        alpha = attrs["alpha"]
        return lambda x: np.where(x > 0, 1.0, alpha * np.exp(np.minimum(x, 0)))
    if op == "softplus":
        beta = attrs["beta"]
        return lambda x: _sig(beta * x)
    raise KeyError(op)


@train_kernel("activation_grad")
def activation_grad(node: Node):
    derivative = _derivative(node.attrs["activation"], node.attrs["activation_attrs"])

    def run(x: np.ndarray, dy: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):
            return (dy * derivative(x)).astype(dy.dtype, copy=False)

    return run


# ---- losses ----------------------------------------------------------------------------------


def _log_softmax(z: np.ndarray) -> np.ndarray:
    shifted = z - z.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


@train_kernel("softmax_cross_entropy")
def softmax_cross_entropy(node: Node):
    def run(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        picked = np.take_along_axis(_log_softmax(logits), labels[:, None], axis=1)
        return np.asarray(-picked.mean(), logits.dtype)

    return run


@train_kernel("softmax_cross_entropy_grad")
def softmax_cross_entropy_grad(node: Node):
    def run(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        p = np.exp(_log_softmax(logits))
        p[np.arange(len(labels)), labels] -= 1
        p /= len(labels)
        return p.astype(logits.dtype, copy=False)

    return run


@train_kernel("mse_loss")
def mse_loss(node: Node):
    return lambda pred, target: np.asarray(np.mean((pred - target) ** 2), pred.dtype)


@train_kernel("mse_loss_grad")
def mse_loss_grad(node: Node):
    return lambda pred, target: (pred - target) * pred.dtype.type(2.0 / pred.size)


# ---- batch norm ------------------------------------------------------------------------------


def _channel(v: np.ndarray, rank: int) -> np.ndarray:
    return v.reshape(-1, *(1,) * (rank - 2))


def _per_channel_sum(x: np.ndarray) -> np.ndarray:
    """x summed over every axis but 1 (the contiguous inner axes first: NumPy sums a
    contiguous axis many times faster than a strided one)."""
    n, c = x.shape[:2]
    return x.reshape(n, c, -1).sum(axis=2).sum(axis=0)


@train_kernel("bn_train")
def bn_train(node: Node):
    eps, momentum = node.attrs["epsilon"], node.attrs["momentum"]

    def run(x, weight, bias, running_mean, running_var):
        count = x.size // x.shape[1]
        dtype = x.dtype
        mean = (_per_channel_sum(x) / count).astype(dtype, copy=False)
        centred = x - _channel(mean, x.ndim)
        var = (_per_channel_sum(np.square(centred)) / count).astype(dtype, copy=False)
        invstd = (1.0 / np.sqrt(var + dtype.type(eps))).astype(dtype, copy=False)
        y = centred
        y *= _channel(invstd * weight, x.ndim)
        y += _channel(bias, x.ndim)
        unbiased = var * dtype.type(count / (count - 1)) if count > 1 else var
        m = dtype.type(momentum)
        new_mean = (1 - m) * running_mean + m * mean
        new_var = (1 - m) * running_var + m * unbiased
        return [y, mean, invstd, new_mean.astype(dtype), new_var.astype(dtype)]

    return run


@train_kernel("bn_grad")
def bn_grad(node: Node):
    def run(x, weight, mean, invstd, dy):
        count = x.size // x.shape[1]
        dtype = x.dtype
        xhat = x - _channel(mean, x.ndim)
        xhat *= _channel(invstd, x.ndim)
        dbias = _per_channel_sum(dy).astype(dtype, copy=False)
        dweight = _per_channel_sum(dy * xhat).astype(dtype, copy=False)
        # dx = weight·invstd · (dy − dbias/count − xhat·dweight/count)
        xhat *= _channel(dweight / count, x.ndim)
        dx = dy - xhat
        dx -= _channel(dbias / count, x.ndim)
        dx *= _channel(weight * invstd, x.ndim)
        return [dx, dweight, dbias]

    return run


# ---- optimizers ------------------------------------------------------------------------------


@train_kernel("sgd_update")
def sgd_update(node: Node):
    a = node.attrs
    momentum, dampening, nesterov, decay = (
        a["momentum"],
        a["dampening"],
        a["nesterov"],
        a["weight_decay"],
    )

    def run(param, grad, lr, buf=None):
        t = param.dtype.type
        g = grad + t(decay) * param if decay else grad
        if not momentum:
            return param - lr.astype(param.dtype) * g
        new_buf = t(momentum) * buf + t(1 - dampening) * g
        direction = g + t(momentum) * new_buf if nesterov else new_buf
        return [param - lr.astype(param.dtype) * direction, new_buf]

    return run


@train_kernel("adam_update")
def adam_update(node: Node):
    a = node.attrs
    beta1, beta2, eps, decay, decoupled = (
        a["beta1"],
        a["beta2"],
        a["eps"],
        a["weight_decay"],
        a["decoupled"],
    )

    def run(param, grad, m, v, step, lr):
        t = param.dtype.type
        lr = lr.astype(param.dtype)
        if decay and decoupled:
            param = param * (1 - lr * t(decay))
        elif decay:
            grad = grad + t(decay) * param
        m = t(beta1) * m + t(1 - beta1) * grad
        v = t(beta2) * v + t(1 - beta2) * grad * grad
        n = step.astype(param.dtype)
        bc1 = 1 - t(beta1) ** n
        bc2 = 1 - t(beta2) ** n
        denom = np.sqrt(v) / np.sqrt(bc2) + t(eps)
        return [param - (lr / bc1) * m / denom, m, v]

    return run


# ---- gradients of the spatial and structural ops ---------------------------------------------


@train_kernel("axis_matmul")
def axis_matmul(node: Node):
    def run(x: np.ndarray, *matrices: np.ndarray) -> np.ndarray:
        y = x
        last = len(matrices) - 1
        for i, m in enumerate(matrices):
            m = m.astype(x.dtype, copy=False)
            # the last axis: rows times mᵀ; the one before it: m times each [in, W] plane
            y = np.matmul(y, m.T) if i == last else np.matmul(m, y)
        return np.ascontiguousarray(y)

    return run


@train_kernel("slice_grad")
def slice_grad(node: Node):
    a = node.attrs
    axis, start, stop, size = a["axis"], a["start"], a["stop"], a["size"]

    def run(dy: np.ndarray) -> np.ndarray:
        shape = list(dy.shape)
        shape[axis] = size
        dx = np.zeros(shape, dy.dtype)
        where = [slice(None)] * dy.ndim
        where[axis] = slice(start, stop)
        dx[tuple(where)] = dy
        return dx

    return run


def adaptive_max_table(spatial: tuple[int, ...], size: tuple[int, ...]) -> np.ndarray:
    """The flat input index (over the spatial axes) of every position of every adaptive
    window: int64 [prod(size), taps], each window's positions in row-major order (a shorter
    window repeats its last row or column after the original, so that the first maximum
    is the original)."""
    from cnnc.ops.pool import adaptive_max_windows

    if len(spatial) == 1:
        return adaptive_max_windows(spatial[0], size[0])
    rows = adaptive_max_windows(spatial[0], size[0])  # [oh, kh]
    cols = adaptive_max_windows(spatial[1], size[1])  # [ow, kw]
    flat = rows[:, None, :, None] * spatial[1] + cols[None, :, None, :]  # [oh, ow, kh, kw]
    return flat.reshape(size[0] * size[1], -1)


@train_kernel("adaptive_maxpool_grad")
def adaptive_maxpool_grad(node: Node):
    size = tuple(node.attrs["size"])

    def run(x: np.ndarray, dy: np.ndarray) -> np.ndarray:
        n, c = x.shape[:2]
        spatial = x.shape[2:]
        table = adaptive_max_table(spatial, size)  # [P, K]
        flat = x.reshape(n, c, -1)
        values = flat[:, :, table]  # [n, c, P, K]
        first = np.argmax(values, axis=3)  # the first largest
        chosen = np.take_along_axis(table[None, None], first[..., None], axis=3)[..., 0]
        area = flat.shape[2]
        base = (np.arange(n * c) * area).reshape(n, c, 1)
        dx = np.bincount((chosen + base).ravel(), weights=dy.reshape(-1), minlength=n * c * area)
        return dx.astype(dy.dtype, copy=False).reshape(x.shape)

    return run


# ---- gradients of the normalizations ---------------------------------------------------------


def _normalized_rows(x3: np.ndarray, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """x̂ and 1/sqrt(var + epsilon) of x3 [outer, size, inner] along axis 1 (biased
    variance of the deviations, as the forward kernels compute it)."""
    centred = x3 - x3.mean(axis=1, keepdims=True)
    var = np.square(centred).mean(axis=1, keepdims=True)
    invstd = 1.0 / np.sqrt(var + x3.dtype.type(epsilon))
    return centred * invstd, invstd


def _normalization_dx(g: np.ndarray, xhat: np.ndarray, invstd: np.ndarray) -> np.ndarray:
    """dx of x̂ = (x − mean) · invstd along axis 1 of [outer, size, inner], given g = dL/dx̂:
    invstd · (g − mean(g) − x̂ · mean(g · x̂))."""
    mean_g = g.mean(axis=1, keepdims=True)
    mean_gx = (g * xhat).mean(axis=1, keepdims=True)
    return invstd * (g - mean_g - xhat * mean_gx)


@train_kernel("layernorm_grad")
def layernorm_grad(node: Node):
    axis, epsilon = node.attrs["axis"], node.attrs["epsilon"]

    def run(x, weight, dy):
        size = x.shape[axis]
        outer = int(np.prod(x.shape[:axis]))
        x3, dy3 = x.reshape(outer, size, -1), dy.reshape(outer, size, -1)
        xhat, invstd = _normalized_rows(x3, epsilon)
        dweight = np.einsum("oci,oci->c", dy3, xhat)
        dbias = dy3.sum(axis=(0, 2))
        dx = _normalization_dx(dy3 * weight.reshape(1, -1, 1), xhat, invstd)
        dtype = x.dtype
        return [dx.reshape(x.shape).astype(dtype, copy=False), dweight, dbias]

    return run


@train_kernel("groupnorm_grad")
def groupnorm_grad(node: Node):
    groups, epsilon = node.attrs["groups"], node.attrs["epsilon"]

    def run(x, weight, dy):
        n, c = x.shape[:2]
        # [n, groups, values of the group, 1]: each group of each item normalized as a row
        xhat, invstd = _normalized_rows(x.reshape(n * groups, -1, 1), epsilon)
        per_channel = (n, c, -1)
        xhat_c, dy_c = xhat.reshape(per_channel), dy.reshape(per_channel)
        dweight = np.einsum("ncp,ncp->c", dy_c, xhat_c)
        dbias = dy_c.sum(axis=(0, 2))
        g = (dy_c * weight.reshape(1, -1, 1)).reshape(xhat.shape)
        dx = _normalization_dx(g, xhat, invstd)
        return [dx.reshape(x.shape).astype(x.dtype, copy=False), dweight, dbias]

    return run


def _channel_window_sum(t: np.ndarray, lead: int, trail: int) -> np.ndarray:
    """At each channel c, the sum of t over channels c − lead … c + trail that exist."""
    channels = t.shape[1]
    lead, trail = min(lead, channels - 1), min(trail, channels - 1)
    padded = np.zeros((t.shape[0], lead + channels + trail, *t.shape[2:]), t.dtype)
    padded[:, lead : lead + channels] = t
    sums = padded[:, :channels].copy()
    for offset in range(1, lead + trail + 1):
        sums += padded[:, offset : offset + channels]
    return sums


@train_kernel("lrn_grad")
def lrn_grad(node: Node):
    a = node.attrs
    size = a["size"]
    before = (size - 1) // 2
    after = size - 1 - before

    def run(x, dy):
        # y = x · d^−β, d = k + α/size · (window sum of x²): dx_j = dy_j · d_j^−β
        # − 2αβ/size · x_j · Σ over the windows c holding j of dy_c · x_c · d_c^(−β−1)
        kind = x.dtype.type
        d = _channel_window_sum(np.square(x), before, after)
        d *= kind(a["alpha"] / size)
        d += kind(a["bias"])
        scale = np.power(d, kind(-a["beta"]))
        spread = _channel_window_sum(dy * x * scale / d, after, before)
        dx = dy * scale - kind(2 * a["alpha"] * a["beta"] / size) * x * spread
        return dx.astype(x.dtype, copy=False)

    return run
