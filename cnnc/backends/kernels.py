"""NumPy kernels of the interpreter: one prepare function per IR op.

A prepare function receives the node once (attributes known, parameters laid
out for the kernel) and returns the function the interpreter calls on every
run with the node's activation inputs.  Kernels are vectorised: convolutions
are im2col views and BLAS matrix products, pooling loops over kernel taps and
lrn over the offsets of its channel window only, never over pixels, channels or
batch items.  1-D windowed ops run as 2-D ops on a height-1 map.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.lib.stride_tricks import as_strided

from cnnc.ir.graph import Node
from cnnc.ops.common import window_output_size

Kernel = Callable[..., np.ndarray]
Activation = Callable[..., np.ndarray]  # f(x, out=None), so that a conv can apply it in place
KERNELS: dict[str, Callable[[Node], Kernel]] = {}


def kernel(op: str):
    """Register the prepare function of IR op ``op``."""

    def register(prepare: Callable[[Node], Kernel]):
        KERNELS[op] = prepare
        return prepare

    return register


# ---- windows --------------------------------------------------------------------------------


class Window:
    """Kernel, stride, pads and dilation of a windowed op, lifted to two spatial axes."""

    def __init__(self, kernel, stride, pads, dilation, ceil=False):
        rank = len(kernel)
        if rank == 1:
            kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
            pads = (0, pads[0], 0, pads[1])
        self.one_d = rank == 1
        self.kernel, self.stride, self.dilation, self.ceil = kernel, stride, dilation, ceil
        self.pads = pads  # (top, left, bottom, right)

    def lift(self, x: np.ndarray) -> np.ndarray:
        return x[:, :, None, :] if self.one_d else x

    def drop(self, y: np.ndarray) -> np.ndarray:
        return y[:, :, 0, :] if self.one_d else y

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.stride, self.dilation
        t, left, b, r = self.pads
        return (
            window_output_size(h, kh, sh, t, b, dh, self.ceil),
            window_output_size(w, kw, sw, left, r, dw, self.ceil),
        )

    def padded(self, x: np.ndarray, value: float, oh: int, ow: int) -> np.ndarray:
        """``x`` with its padding, extended at the end if ceil mode's last window needs it."""
        n, c, h, w = x.shape
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.stride, self.dilation
        t, left, b, r = self.pads
        b = max(b, (oh - 1) * sh + (kh - 1) * dh + 1 - h - t)
        r = max(r, (ow - 1) * sw + (kw - 1) * dw + 1 - w - left)
        if not (t or left or b or r):
            return x
        out = np.full((n, c, h + t + b, w + left + r), value, dtype=x.dtype)
        out[:, :, t : t + h, left : left + w] = x
        return out

    def taps(self, xp: np.ndarray, oh: int, ow: int):
        """Strided views of ``xp``, one per kernel tap, each N×C×oh×ow."""
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.stride, self.dilation
        for i in range(kh):
            for j in range(kw):
                yield xp[
                    :,
                    :,
                    i * dh : i * dh + (oh - 1) * sh + 1 : sh,
                    j * dw : j * dw + (ow - 1) * sw + 1 : sw,
                ]


def _window(node: Node, kernel_shape) -> Window:
    a = node.attrs
    return Window(
        tuple(kernel_shape),
        a["stride"],
        a["pads"],
        a.get("dilation", (1,) * len(kernel_shape)),
        a.get("ceil", False),
    )


# ---- convolution and fully connected ------------------------------------------------------


@kernel("conv")
def conv(node: Node) -> Kernel:
    weight = node.inputs[1].data
    win = _window(node, weight.shape[2:])
    weight = win.lift(weight) if win.one_d else weight
    k, cg, kh, kw = weight.shape
    groups = node.attrs["groups"]
    wmat = np.ascontiguousarray(weight.reshape(groups, k // groups, cg * kh * kw))
    bias = node.inputs[2].data.reshape(1, k, 1) if len(node.inputs) > 2 else None
    (sh, sw), (dh, dw) = win.stride, win.dilation
    pointwise = kh == kw == 1 and not any(win.pads)
    fused = node.attrs.get("activation")
    activation = ELEMENTWISE[fused](node.attrs["activation_attrs"]) if fused else None

    def run(x: np.ndarray) -> np.ndarray:
        x = win.lift(x)
        n, _, h, w = x.shape
        oh, ow = win.output_size(h, w)
        if pointwise and sh == sw == 1:
            cols = x.reshape(n, groups, cg, h * w)
        else:
            xp = win.padded(x, 0.0, oh, ow)
            s_n, s_c, s_h, s_w = xp.strides
            view = as_strided(
                xp,
                (n, groups, cg, kh, kw, oh, ow),
                (s_n, s_c * cg, s_c, s_h * dh, s_w * dw, s_h * sh, s_w * sw),
                writeable=False,
            )
            cols = view.reshape(n, groups, cg * kh * kw, oh * ow)
        y = np.matmul(wmat, cols).reshape(n, k, oh * ow)
        if bias is not None:
            y += bias
        if activation is not None:
            activation(y, out=y)
        return win.drop(y.reshape(n, k, oh, ow))

    return run


@kernel("fc")
def fc(node: Node) -> Kernel:
    weight_t = np.ascontiguousarray(node.inputs[1].data.T)
    bias = node.inputs[2].data if len(node.inputs) > 2 else None

    def run(x: np.ndarray) -> np.ndarray:
        y = x @ weight_t
        if bias is not None:
            y += bias
        return y

    return run


# ---- pooling --------------------------------------------------------------------------------


@kernel("maxpool")
def maxpool(node: Node) -> Kernel:
    win = _window(node, node.attrs["kernel"])

    def run(x: np.ndarray) -> np.ndarray:
        x = win.lift(x)
        oh, ow = win.output_size(*x.shape[2:])
        taps = win.taps(win.padded(x, -np.inf, oh, ow), oh, ow)
        y = next(taps).copy()
        for tap in taps:
            np.maximum(y, tap, out=y)
        return win.drop(y)

    return run


def _avg_counts(
    size: int, out: int, k: int, s: int, d: int, pad_begin: int, pad_end: int, include_pad: bool
) -> np.ndarray:
    """How many taps of each window along one axis land on values it averages over."""
    taps = (np.arange(out) * s - pad_begin)[:, None] + np.arange(k) * d
    low, high = (-pad_begin, size + pad_end) if include_pad else (0, size)
    return ((taps >= low) & (taps < high)).sum(axis=1).astype(np.float32)


@kernel("avgpool")
def avgpool(node: Node) -> Kernel:
    win = _window(node, node.attrs["kernel"])
    include_pad = node.attrs["count_include_pad"]
    (kh, kw), (sh, sw), (dh, dw) = win.kernel, win.stride, win.dilation
    t, left, b, r = win.pads

    def run(x: np.ndarray) -> np.ndarray:
        x = win.lift(x)
        h, w = x.shape[2:]
        oh, ow = win.output_size(h, w)
        taps = win.taps(win.padded(x, 0.0, oh, ow), oh, ow)
        y = next(taps).copy()
        for tap in taps:
            y += tap
        counts = np.outer(
            _avg_counts(h, oh, kh, sh, dh, t, b, include_pad),
            _avg_counts(w, ow, kw, sw, dw, left, r, include_pad),
        )
        y /= counts
        return win.drop(y)

    return run


@kernel("gap")
def gap(node: Node) -> Kernel:
    def run(x: np.ndarray) -> np.ndarray:
        return x.mean(axis=tuple(range(2, x.ndim)), keepdims=True, dtype=np.float32)

    return run


@kernel("global_maxpool")
def global_maxpool(node: Node) -> Kernel:
    def run(x: np.ndarray) -> np.ndarray:
        return x.max(axis=tuple(range(2, x.ndim)), keepdims=True)

    return run


# ---- element-wise and the rest -------------------------------------------------------------


def _sigmoid(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    # exp of -|x| never overflows; both quotients are exact in their half of the line.
    e = np.exp(-np.abs(x))
    return np.divide(np.where(x >= 0, 1, e), 1 + e, out=out)


def _leaky_relu(attrs: dict) -> Activation:
    alpha = np.float32(attrs["alpha"])

    def run(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if out is None:
            out = x.copy()
        elif out is not x:
            np.copyto(out, x)
        # Only the negative values change (NaN is not negative: it stays NaN).
        return np.multiply(out, alpha, out=out, where=out < 0)

    return run


def _clip(attrs: dict) -> Activation:
    # ONNX Clip: the max bound wins when min > max, so max(x, min) comes first.
    low, high = np.float32(attrs["min"]), np.float32(attrs["max"])

    def run(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        y = np.maximum(x, low, out=out)
        return np.minimum(y, high, out=y)

    return run


# Each takes an activation's attributes and returns its function of (x, out=None): the
# op's kernel, and what a conv fused with it applies in place on its output.
ELEMENTWISE: dict[str, Callable[[dict], Activation]] = {
    "relu": lambda attrs: lambda x, out=None: np.maximum(x, 0, out=out),
    "leaky_relu": _leaky_relu,
    "clip": _clip,
    "sigmoid": lambda attrs: _sigmoid,
    "tanh": lambda attrs: np.tanh,
}

for _op, _make in ELEMENTWISE.items():
    kernel(_op)(lambda node, make=_make: make(node.attrs))


@kernel("bn")
def bn(node: Node) -> Kernel:
    weight, bias, mean, var = (v.data for v in node.inputs[1:])
    scale = weight / np.sqrt(var + np.float32(node.attrs["epsilon"]))
    per_channel = (-1, *(1,) * (node.inputs[0].type.rank - 2))
    scale, shift = scale.reshape(per_channel), (bias - mean * scale).reshape(per_channel)
    return lambda x: x * scale + shift


@kernel("lrn")
def lrn(node: Node) -> Kernel:
    a = node.attrs
    size = a["size"]
    before = (size - 1) // 2
    after = size - 1 - before
    scale, bias, beta = np.float32(a["alpha"] / size), np.float32(a["bias"]), np.float32(a["beta"])

    def run(x: np.ndarray) -> np.ndarray:
        channels = x.shape[1]
        # Window taps beyond the first or last channel only ever read zeros: skip them.
        lead, trail = min(before, channels - 1), min(after, channels - 1)
        squares = np.zeros((x.shape[0], lead + channels + trail, *x.shape[2:]), x.dtype)
        np.square(x, out=squares[:, lead : lead + channels])
        sums = squares[:, :channels].copy()
        for offset in range(1, lead + trail + 1):
            sums += squares[:, offset : offset + channels]
        sums *= scale
        sums += bias
        return x / np.power(sums, beta, out=sums)

    return run


@kernel("add")
def add(node: Node) -> Kernel:
    def run(*xs: np.ndarray) -> np.ndarray:
        # Summed left to right, as the chain of ONNX Adds the exporter writes.
        y = np.add(xs[0], xs[1])
        for x in xs[2:]:
            y += x
        return y

    return run


@kernel("concat")
def concat(node: Node) -> Kernel:
    return lambda *xs: np.concatenate(xs, axis=1)


@kernel("softmax")
def softmax(node: Node) -> Kernel:
    axis = node.attrs["axis"]

    def run(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(axis=axis, keepdims=True))
        e /= e.sum(axis=axis, keepdims=True)
        return e

    return run


@kernel("flatten")
def flatten(node: Node) -> Kernel:
    return lambda x: x.reshape(x.shape[0], -1)


@kernel("dropout")
def dropout(node: Node) -> Kernel:
    return lambda x: x
