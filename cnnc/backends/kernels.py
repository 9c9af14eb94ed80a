"""NumPy kernels of the interpreter: one prepare function per IR op.

A prepare function receives the node once (attributes known, parameters laid
out for the kernel) and returns the function the interpreter calls on every
run with the node's activation inputs.  Kernels are vectorised: convolutions
are im2col views and BLAS matrix products, pooling loops over kernel taps and
lrn over the offsets of its channel window only, never over pixels, channels or
batch items.  1-D windowed ops run as 2-D ops on a height-1 map.  Resizing and
adaptive pooling work along one spatial axis at a time: gathers by precomputed
indices, products by pooling matrices, or a loop over the few offsets of a window.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np
from numpy.lib.stride_tricks import as_strided

from cnnc.backends import parallel
from cnnc.ir.graph import Node, Value
from cnnc.ir.types import TensorType, dtype_name
from cnnc.ops.common import window_output_size
from cnnc.ops.norm import channel_scale_shift
from cnnc.ops.pool import adaptive_avg_matrix, adaptive_max_windows
from cnnc.ops.resize import NEAREST_MODES, linear_taps, nearest_indices, upsample_sizes

Kernel = Callable[..., np.ndarray]
Activation = Callable[..., np.ndarray]  # f(x, out=None), so that a conv can apply it in place
KERNELS: dict[str, Callable[[Node], Kernel]] = {}

# Ops whose kernel takes ``out=`` and may write its result over its first input: the
# interpreter passes it when that input's memory dies at the node.
IN_PLACE = {"bn", "affine", "scale", "layernorm", "groupnorm"}
# Ops whose outputs may share memory with their first input (views), so that memory lives
# on until the last use of any of them, and no op writes over it in place before then.
ALIASING = {"flatten", "dropout", "drop_path", "reshape", "transpose", "split", "slice", "crop"}
# Ops whose prepare function reads the inputs after the first as data (weights, biases,
# statistics). A node of one whose such input is not a parameter but a value of the run (a
# graph input, another node's output) runs through ``runtime_weights``.
WEIGHTED = {
    "conv",
    "conv_transpose",
    "fc",
    "linear",
    "prelu",
    "bn",
    "affine",
    "scale",
    "layernorm",
    "groupnorm",
}
# Ops whose prepare function reads their parameters, so that the interpreter passes them only
# the other inputs: the WEIGHTED ops and the training ops (cnnc/backends/train_kernels.py adds
# them); every other kernel takes all its inputs, parameters included.
PARAM_KERNELS = set(WEIGHTED)


class _Given:
    """A weight given at run time, as a prepare function reads a parameter (``data``)."""

    __slots__ = ("data", "name", "type")
    is_param = True

    def __init__(self, value, data: np.ndarray):
        self.name, self.type, self.data = value.name, value.type, data


def runtime_weights(node: Node, prepare: Callable[[Node], Kernel]) -> Kernel:
    """The kernel of a node of a WEIGHTED op that reads some of its weights at run time:
    called with the node's non-parameter inputs in order (its first input, then those
    weights), it prepares the op's kernel afresh from a copy of the node whose inputs carry
    this call's arrays, then runs it. Nothing is cached: a training step changes the
    arrays, in place or not, between runs. Laying out the weights (a reshape, Winograd's
    kernel transform, the sub-pixel weights of a transposed convolution) costs little next
    to the op's own work on a batch."""
    given = [i for i, v in enumerate(node.inputs) if i > 0 and not v.is_param]

    def run(x: np.ndarray, *weights: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        inputs = list(node.inputs)
        for i, w in zip(given, weights, strict=True):
            inputs[i] = _Given(node.inputs[i], np.ascontiguousarray(w))
        ready = prepare(Node(node.op, node.name, inputs, node.attrs, node.loc))
        return ready(x) if out is None else ready(x, out=out)

    return run


def kernel(op: str):
    """Register the prepare function of IR op ``op``."""

    def register(prepare: Callable[[Node], Kernel]):
        KERNELS[op] = prepare
        return prepare

    return register


# Values all_finite checks at once: its temporary mask stays small.
FINITE_CHECK_CHUNK = 1 << 18


def all_finite(x: np.ndarray) -> bool:
    """Whether every value of ``x`` is finite, in chunks of a contiguous array (np.isfinite
    and all: three times as fast as a sum, which would tell as well)."""
    if not x.flags.c_contiguous or x.size <= FINITE_CHECK_CHUNK:
        return bool(np.isfinite(x).all())
    flat = x.reshape(-1)
    return all(
        np.isfinite(flat[i : i + FINITE_CHECK_CHUNK]).all()
        for i in range(0, flat.size, FINITE_CHECK_CHUNK)
    )


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

    def by_channels(
        self, x: np.ndarray, channels: int, work: Callable[..., None], passes: int = 1
    ) -> np.ndarray:
        """An output [n, channels, oh, ow] filled by ``work(x, out, share, oh, ow)`` for
        shares of its channels (``out`` = the share's slice of it), one share per thread
        when ``passes`` over the input are worth sharing."""
        x = self.lift(x)
        n, _, h, w = x.shape
        oh, ow = self.output_size(h, w)
        y = np.empty((n, channels, oh, ow), x.dtype)
        parallel.share(channels, lambda share: work(x, y[:, share], share, oh, ow), x.size * passes)
        return self.drop(y)

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

    def reduce(self, xp: np.ndarray, oh: int, ow: int, op: np.ufunc, out: np.ndarray) -> None:
        """out = ``op`` (maximum, add) over each window of ``xp``, separably: first over the
        window's rows, whose slices are whole contiguous rows, then over its columns."""
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.stride, self.dilation

        def fold(parts: list[np.ndarray], acc: np.ndarray | None = None) -> np.ndarray:
            if len(parts) == 1:
                return parts[0] if acc is None else np.copyto(acc, parts[0]) or acc
            acc = op(parts[0], parts[1], out=acc)
            for part in parts[2:]:
                op(acc, part, out=acc)
            return acc

        rows = fold([xp[:, :, i * dh : i * dh + (oh - 1) * sh + 1 : sh] for i in range(kh)])
        fold([rows[..., j * dw : j * dw + (ow - 1) * sw + 1 : sw] for j in range(kw)], out)


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


# Bytes of im2col columns built at once: small enough for the cache, so that the
# matrix product reads them back from it, and bounding the memory a layer needs.
COLUMN_BLOCK_BYTES = 4 * 2**20
# With at least this many kernels, a layer whose im2col is one block splits its kernels
# between the threads (all of them share the columns); with fewer, it splits its rows.
SPLIT_KERNELS_FROM = 128


def _row_blocks(column_rows: int, oh: int, width: int, kernels: int) -> list[tuple[int, int]]:
    """(first, stop) runs of output rows whose im2col columns (``column_rows`` × rows ×
    ``width`` floats) fit COLUMN_BLOCK_BYTES; as many as a multiple of the threads when the
    work (each column value used by ``kernels`` multiply-adds) is worth sharing, so that
    they share it evenly."""
    rows = max(1, min(oh, COLUMN_BLOCK_BYTES // (4 * column_rows * width)))
    blocks = -(-oh // rows)
    threads = len(parallel.pieces(oh, macs=kernels * column_rows * oh * width))
    return parallel.split(oh, -(-blocks // threads) * threads)


def _fused_activation(node: Node) -> Activation | None:
    fused = node.attrs.get("activation")
    return ELEMENTWISE[fused](node.attrs["activation_attrs"]) if fused else None


def _channel_epilogue(node: Node) -> Callable[..., None]:
    """Adds the bias and applies the fused activation, in place, to a conv's output
    [n, channels, ...], or to channels ``first``, ``first + 1``, ... of it; the threads
    take a share of the channels each."""
    bias = node.inputs[2].data if len(node.inputs) > 2 else None
    activation = _fused_activation(node)

    def finish(y: np.ndarray, first: int = 0) -> None:
        if bias is None and activation is None:
            return

        def part(channels: slice) -> None:
            view = y[:, channels]
            if bias is not None:
                shift = bias[first + channels.start : first + channels.stop]
                view += shift.reshape(-1, *(1,) * (y.ndim - 2))
            if activation is not None:
                activation(view, out=view)

        parallel.share(y.shape[1], part, y.size)

    return finish


def _copy_by_channels(target: np.ndarray, source: np.ndarray) -> None:
    """target[...] = source, the threads taking a share of the channels each."""
    parallel.share(target.shape[1], lambda ch: np.copyto(target[:, ch], source[:, ch]), source.size)


# OpenBLAS multiplies small matrices (m·n·k up to about 2^20 here) with kernels of their
# own that skip packing; a product of few kernels by many columns runs 1.3-2.5 times as
# fast cut into such column chunks (measured: 6×26 by 61440 columns 0.72 -> 0.28 ms).
SMALL_PRODUCT_MACS = 1 << 19
SMALL_WEIGHTS = 1 << 14


def _matmul(weights: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """out = weights @ x for weights [..., k, r], x [..., r, p], out [..., k, p]; small
    weight matrices multiply column chunks of x, as a batch of small products."""
    k, r = weights.shape[-2:]
    p = x.shape[-1]
    chunk = SMALL_PRODUCT_MACS // max(1, k * r)
    if k * r > SMALL_WEIGHTS or p < 2 * chunk:
        np.matmul(weights, x, out=out)
        return
    full = p - p % chunk

    def chunks(a: np.ndarray) -> np.ndarray:
        return a[..., :full].reshape(*a.shape[:-1], full // chunk, chunk).swapaxes(-3, -2)

    np.matmul(weights[..., None, :, :], chunks(x), out=chunks(out))
    if full < p:
        np.matmul(weights, x[..., full:], out=out[..., full:])


def _products(weights: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    """y = weights @ x for weights [groups, k, c], x [n, groups, c, p], y [n, groups, k, p],
    the threads splitting the columns p, or the kernels k when the columns are few."""
    k, p = weights.shape[1], x.shape[-1]

    def part(share: slice) -> None:
        if k >= SPLIT_KERNELS_FROM:
            np.matmul(weights[:, share], x, out=y[:, :, share])
        else:
            _matmul(weights, x[..., share], y[..., share])

    parallel.share(k if k >= SPLIT_KERNELS_FROM else p, part, macs=weights.size * p * x.shape[0])


def _fc_product(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """x @ weight.T for x [n, in] and weight [out, in] (read transposed, without a copy),
    the threads splitting the outputs: each reads its share of the weights."""
    y = np.empty((x.shape[0], weight.shape[0]), x.dtype)
    parallel.share(
        weight.shape[0],
        lambda share: np.matmul(x, weight[share].T, out=y[:, share]),
        weight.size,
        macs=weight.size * x.shape[0],
    )
    return y


# The wide layout computes a few extra columns per row to make the im2col copy a run of
# contiguous memory. That pays off for wide maps, and for few kernels (when the product
# is cheap next to the copy); elsewhere the extra columns cost more than the copy saves.
WIDE_MIN_WIDTH = 100
WIDE_MAX_KERNELS = 32


@kernel("conv")
def conv(node: Node) -> Kernel:
    weight = node.inputs[1].data
    win = _window(node, weight.shape[2:])
    weight = win.lift(weight) if win.one_d else weight
    k, cg, kh, kw = weight.shape
    groups = node.attrs["groups"]
    if _depthwise_applies(node, weight):
        return _depthwise(node, win, weight)
    kg, ckk = k // groups, cg * kh * kw
    bias = node.inputs[2].data if len(node.inputs) > 2 else None
    activation = _fused_activation(node)
    wmat = np.ascontiguousarray(weight.reshape(groups, kg, ckk))
    # With a bias, im2col gains a row of ones and the weights a column holding the bias, so
    # that the matrix product adds it. That copy of the weights is made when first needed:
    # a conv that is an FC layer (VGG's fc6: 411 MB) never needs it.
    rows_per_group = ckk + (bias is not None)
    with_bias: list[np.ndarray] = []

    def weights_with_bias() -> np.ndarray:
        if bias is None:
            return wmat
        if not with_bias:
            with_bias.append(np.concatenate([wmat, bias.reshape(groups, kg, 1)], axis=2))
        return with_bias[0]

    (sh, sw), (dh, dw) = win.stride, win.dilation
    padded = any(win.pads)

    epilogue = _channel_epilogue(node)

    def im2col(
        copy: Callable[[np.ndarray, int, int, slice], None],
        y: np.ndarray,
        oh: int,
        width: int,
    ) -> None:
        """y = activation(weights × im2col columns), in blocks of output rows. Each block's
        columns are built by ``copy(columns, first, stop, channels)`` into the rows of each
        group's ``channels`` (the row of ones is set here), laid out [groups, rows, n, m,
        width] so that one product covers the whole batch; the product lands in scratch
        memory, and the activation (dropping ``width - ow`` extra columns) moves it into y
        while it is in the cache. Each thread copies, multiplies and finishes its own
        blocks, or, for a layer of one block and many kernels, the threads copy a share of
        its channels each and then split the kernels."""
        n, ow, dtype = y.shape[0], y.shape[3], y.dtype
        column_rows = groups * rows_per_group
        pool = parallel.current()
        weights = weights_with_bias()

        def finish(product: np.ndarray, first: int, stop: int, kernels: slice) -> None:
            # product [kernels, n, rows, width] -> y[n, kernels, rows, :ow]
            source = product.transpose(1, 0, 2, 3)[..., :ow]
            target = y[:, kernels, first:stop]
            if activation is not None:
                activation(source, out=target)
            else:
                np.copyto(target, source)

        def scratch(worker: int, m: int) -> tuple[np.ndarray, np.ndarray]:
            size = column_rows * n * m * width
            buffer = pool.scratch(worker, size + k * n * m * width, dtype)
            cols = buffer[:size].reshape(groups, rows_per_group, n * m * width)
            if bias is not None:
                cols[:, ckk] = 1.0
            return cols, buffer[size:].reshape(groups, kg, n * m * width)

        one_block = 4 * (column_rows + k) * n * oh * width <= COLUMN_BLOCK_BYTES
        if one_block and groups == 1 and kg >= SPLIT_KERNELS_FROM:
            cols, product = scratch(0, oh)
            parallel.share(cg, lambda part: copy(cols, 0, oh, part), column_rows * n * oh * width)

            def kernels(part: slice) -> None:
                np.matmul(weights[0, part], cols[0], out=product[0, part])
                finish(product[0, part].reshape(-1, n, oh, width), 0, oh, part)

            parallel.share(k, kernels, macs=k * column_rows * n * oh * width)
            return
        blocks = _row_blocks((column_rows + k) * n, oh, width, kg)

        def block(i: int, worker: int) -> None:
            first, stop = blocks[i]
            cols, product = scratch(worker, stop - first)
            copy(cols, first, stop, slice(None))
            _matmul(weights, cols, product)
            finish(product.reshape(k, n, stop - first, width), first, stop, slice(None))

        pool.map(block, len(blocks))

    def run(x: np.ndarray) -> np.ndarray:
        x = win.lift(x)
        n, _, h, w = x.shape
        oh, ow = win.output_size(h, w)
        if groups == 1 and (kh, kw) == (h, w) and (oh, ow) == (1, 1) and not padded:
            # The kernel covers the whole map (an FC layer made a conv): one product.
            y = _fc_product(x.reshape(n, ckk), wmat[0])
            epilogue(y[:, :, None])
            return win.drop(y.reshape(n, k, 1, 1))
        y = np.empty((n, k, oh, ow), x.dtype)
        if (kh, kw, sh, sw) == (1, 1, 1, 1) and not padded:
            # A pointwise convolution is a matrix product on the input as it lies.
            _products(wmat, x.reshape(n, groups, cg, h * w), y.reshape(n, groups, kg, -1))
            epilogue(y.reshape(n, k, -1))
            return win.drop(y)
        if sh == sw == 1 and (ow >= WIDE_MIN_WIDTH or k <= WIDE_MAX_KERNELS or cg == 1):
            return win.drop(wide_rows(x, y, oh, ow))
        xp = win.padded(x, 0.0, oh, ow)
        s_n, s_c, s_h, s_w = xp.strides
        # Every window of every image, without a copy: [group, cg, kh, kw, n, oh, ow]. Along
        # an axis of one window the stride does not matter, and a stride past the input's
        # size (any up to 2**63-1 is legal) would overflow a byte stride.
        windows = as_strided(
            xp,
            (groups, cg, kh, kw, n, oh, ow),
            (s_c * cg, s_c, s_h * dh, s_w * dw, s_n, s_h * sh * (oh > 1), s_w * sw * (ow > 1)),
            writeable=False,
        )

        def copy(cols: np.ndarray, first: int, stop: int, channels: slice) -> None:
            target = cols[:, :ckk].reshape(groups, cg, kh, kw, n, stop - first, ow)
            np.copyto(target[:, channels], windows[:, channels, ..., first:stop, :])

        im2col(copy, y, oh, ow)
        return win.drop(y)

    def wide_rows(x: np.ndarray, y: np.ndarray, oh: int, ow: int) -> np.ndarray:
        # Stride 1: computing each output row across the whole padded width wp (a few
        # columns too many, dropped at the end) makes every im2col row a contiguous run
        # of the padded input, which copies at memory speed.
        n, c, h, w = x.shape
        top_pad, left, bottom, right = win.pads
        hp, wp = h + top_pad + bottom, w + left + right
        # The last row's extra columns read up to (kw - 1)·dw past the end.
        flat = np.zeros(n * c * hp * wp + (kw - 1) * dw, x.dtype)
        inside = flat[: n * c * hp * wp].reshape(n, c, hp, wp)[
            :, :, top_pad : top_pad + h, left : left + w
        ]
        _copy_by_channels(inside, x)
        item = flat.itemsize
        strides = tuple(s * item for s in (cg * hp * wp, hp * wp, dh * wp, dw, c * hp * wp, 1))

        def copy(cols: np.ndarray, first: int, stop: int, channels: slice) -> None:
            size = (stop - first) * wp
            windows = as_strided(
                flat[first * wp :], (groups, cg, kh, kw, n, size), strides, writeable=False
            )
            target = cols[:, :ckk].reshape(groups, cg, kh, kw, n, size)
            np.copyto(target[:, channels], windows[:, channels])

        im2col(copy, y, oh, wp)
        return y

    if _winograd_applies(node, weight):
        return _winograd(node, win, weight, run)
    return run


# Winograd's F(2×2, 3×3): a 3×3 convolution computes each 2×2 output tile from a 4×4
# input tile with 16 multiplications per channel pair instead of 36 (Lavin & Gray, 2015).
# Its transforms cost memory passes that only pay off with enough channels and a map
# large enough (measured on this project's 2-core machine; see the README's Speed).
WINOGRAD_MIN_CHANNELS = 128
WINOGRAD_MIN_PIXELS = 28 * 28
_WINOGRAD_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
_WINOGRAD_GG = np.kron(_WINOGRAD_G, _WINOGRAD_G)  # [a·4 + b, i·3 + j] = G[a, i]·G[b, j]


def _winograd_applies(node: Node, weight: np.ndarray) -> bool:
    k, c, kh, kw = weight.shape
    a = node.attrs
    return (
        (kh, kw) == (3, 3)
        and a["groups"] == 1
        and all(s == 1 for s in a["stride"])
        and all(d == 1 for d in a["dilation"])
        and min(c, k) >= WINOGRAD_MIN_CHANNELS
        and np.prod(node.inputs[0].type.spatial) >= WINOGRAD_MIN_PIXELS
    )


def _winograd(node: Node, win: Window, weight: np.ndarray, direct: Kernel) -> Kernel:
    """A 3×3, stride 1 convolution by Winograd's F(2×2, 3×3), in blocks of tile rows; by
    ``direct`` (im2col) when a sum comes out NaN or infinite. The transforms add and
    subtract the pixels of a tile, so one infinite pixel gives inf − inf = NaN where the
    convolution's own sum is ±inf, and values near float32's largest overflow there; a
    result that comes out finite had neither (a non-finite value never turns finite)."""
    k, c = weight.shape[:2]
    # The kernel transform G·w·Gᵀ in float64, [16 (4×4 positions), k, c]: one product of
    # G⊗G [16, 9] by the taps [9, k·c] (five times as fast as an einsum of three operands,
    # which matters when a training step feeds the weights at every run).
    taps = weight.reshape(k * c, 9).T.astype(np.float64)
    u = (_WINOGRAD_GG @ taps).astype(weight.dtype, copy=False).reshape(16, k, c)
    finish = _channel_epilogue(node)
    top, left, bottom, right = win.pads

    def run(x: np.ndarray) -> np.ndarray:
        n, _, h, w = x.shape
        oh, ow = h + top + bottom - 2, w + left + right - 2
        th, tw = (oh + 1) // 2, (ow + 1) // 2
        xp = np.zeros((n, c, 2 * th + 2, 2 * tw + 2), x.dtype)
        _copy_by_channels(
            xp[:, :, top : top + h, left : left + w],
            x[:, :, : 2 * th + 2 - top, : 2 * tw + 2 - left],
        )
        y = np.empty((n, k, 2 * th, 2 * tw), x.dtype)
        # A tile row's transformed input and product: 16 values per tile and channel.
        blocks = _row_blocks(16 * max(c, k) * n, th, tw, min(c, k))
        pool = parallel.current()
        finite = [True] * len(blocks)

        def block(i: int, worker: int) -> None:
            first, stop = blocks[i]
            r = stop - first
            t = n * r * tw
            sizes = (4 * n * c * (2 * r + 2) * tw, 16 * c * t, 16 * k * t)
            scratch = pool.scratch(worker, sum(sizes), x.dtype)
            cols, v, m = np.split(scratch, np.cumsum(sizes)[:2])
            v = v.reshape(16, c, t)
            _winograd_input(
                xp[:, :, 2 * first : 2 * stop + 2],
                cols.reshape(4, n, c, 2 * r + 2, tw),
                v.reshape(4, 4, c, n, r, tw),
                tw,
            )
            np.matmul(u, v, out=m.reshape(16, k, t))
            rows_out = y[:, :, 2 * first : 2 * stop]
            _winograd_output(m.reshape(4, 4, k, n, r, tw), rows_out)
            finite[i] = all_finite(rows_out)  # before the activation (relu6 bounds inf)
            finish(rows_out)  # while the rows are in this core's cache

        pool.map(block, len(blocks))
        if not all(finite):
            return direct(x)
        if (2 * th, 2 * tw) != (oh, ow):
            y = np.ascontiguousarray(y[:, :, :oh, :ow])
        return y

    return run


def _winograd_input(rows: np.ndarray, cols: np.ndarray, v: np.ndarray, tw: int) -> None:
    """v[i, j] = (Bᵀ·d·B)[i, j] for every 4×4 tile d of ``rows`` (n, c, 2r+2, 2tw+2), written
    as [4, 4, c, n, r, tw]; Bᵀ = [[1,0,-1,0], [0,1,1,0], [0,-1,1,0], [0,1,0,-1]]."""
    # Even and odd columns, each made contiguous once, so that every tap below is a
    # unit-stride slice (strided reads would run several times slower).
    even = np.ascontiguousarray(rows[:, :, :, 0::2])
    odd = np.ascontiguousarray(rows[:, :, :, 1::2])
    d = [even[..., :tw], odd[..., :tw], even[..., 1 : tw + 1], odd[..., 1 : tw + 1]]
    np.subtract(d[0], d[2], out=cols[0])
    np.add(d[1], d[2], out=cols[1])
    np.subtract(d[2], d[1], out=cols[2])
    np.subtract(d[1], d[3], out=cols[3])
    r = v.shape[4]
    for j in range(4):
        e = [cols[j][:, :, i : i + 2 * r : 2] for i in range(4)]
        out = [v[i, j].transpose(1, 0, 2, 3) for i in range(4)]
        np.subtract(e[0], e[2], out=out[0])
        np.add(e[1], e[2], out=out[1])
        np.subtract(e[2], e[1], out=out[2])
        np.subtract(e[1], e[3], out=out[3])


def _winograd_output(m: np.ndarray, y: np.ndarray) -> None:
    """y's 2×2 tiles = Aᵀ·m·A for m [4, 4, k, n, r, tw]; Aᵀ = [[1,1,1,0], [0,1,-1,-1]]."""
    for a, rows in enumerate((m[0] + m[1] + m[2], m[1] - m[2] - m[3])):
        even = y[:, :, a::2, 0::2].transpose(1, 0, 2, 3)
        odd = y[:, :, a::2, 1::2].transpose(1, 0, 2, 3)
        np.add(rows[0], rows[1], out=even)
        even += rows[2]
        np.subtract(rows[1], rows[2], out=odd)
        odd -= rows[3]


# Depthwise convolutions (one input channel a group) go through im2col like any grouped
# conv: one product per channel over the whole batch's columns. On maps larger than this,
# at stride 1, a sum over the kernel taps is faster (measured: 144 channels at 56×56
# 1.24 ms against 1.60 ms; at 28×28 and below im2col wins).
DEPTHWISE_TAPS_MIN_PIXELS = 56 * 56


def _depthwise_applies(node: Node, weight: np.ndarray) -> bool:
    k, cg = weight.shape[:2]
    a = node.attrs
    return (
        cg == 1
        and k == a["groups"] > 1
        and all(s == 1 for s in a["stride"])
        and np.prod(node.inputs[0].type.spatial) >= DEPTHWISE_TAPS_MIN_PIXELS
    )


def _depthwise(node: Node, win: Window, weight: np.ndarray) -> Kernel:
    """A stride 1 depthwise convolution (one kernel per channel) as a sum over its kernel
    taps, each a per-channel scale of the padded input laid out flat: a tap's view of
    every output row across the whole padded width is one contiguous run, so each
    multiply-add runs over long rows; the extra columns are dropped at the end."""
    k, _, kh, kw = weight.shape
    taps = [
        np.ascontiguousarray(weight[:, 0, i, j]).reshape(1, k, 1)
        for i in range(kh)
        for j in range(kw)
    ]
    finish = _channel_epilogue(node)
    (dh, dw), top, left = win.dilation, win.pads[0], win.pads[1]

    def part(x: np.ndarray, out: np.ndarray, channels: slice, oh: int, ow: int) -> None:
        n, c, h, w = x[:, channels].shape
        wp, hp = ow + (kw - 1) * dw, oh + (kh - 1) * dh
        flat = np.zeros((n, c, hp * wp + (kw - 1) * dw), x.dtype)
        inside = flat[:, :, : hp * wp].reshape(n, c, hp, wp)
        inside[:, :, top : top + h, left : left + w] = x[:, channels]
        size = oh * wp
        runs = (
            flat[:, :, i * dh * wp + j * dw :][..., :size] for i in range(kh) for j in range(kw)
        )
        acc = np.multiply(next(runs), taps[0][:, channels])
        scratch = np.empty_like(acc)
        for run, tap in zip(runs, taps[1:], strict=True):
            acc += np.multiply(run, tap[:, channels], out=scratch)
        np.copyto(out, acc.reshape(n, c, oh, wp)[..., :ow])
        finish(out, channels.start)

    return lambda x: win.by_channels(x, k, part, passes=kh * kw)


# ---- transposed convolution -------------------------------------------------------------


def _subpixel_weights(
    weight: np.ndarray, groups: int, stride, dilation
) -> tuple[np.ndarray, list[int], list[int]]:
    """A transposed convolution's weight [C, kg, kh, kw] as the weight of the stride 1
    convolution that computes its output phases, [groups, kg·Lh·Lw, cg·Qh·Qw], with the
    phases (rows, columns) it computes. Tap (i, j) of input pixel (h, w) lands at output
    row h·sh + i·dh = (h + qh)·sh + ph: it weighs the input pixel qh blocks before for
    output phase ph. The convolution reads the kernel flipped; taps no kernel tap lands
    on are 0, and phases no tap lands on (stride larger than the kernel, a dilation
    sharing a factor with the stride) are left out: they hold the bias alone."""
    channels, kg, kh, kw = weight.shape
    cg = channels // groups
    (sh, sw), (dh, dw) = stride, dilation
    qh, ph = np.divmod(np.arange(kh) * dh, sh)
    qw, pw = np.divmod(np.arange(kw) * dw, sw)
    live_h, live_w = sorted(set(ph.tolist())), sorted(set(pw.tolist()))
    reach_h, reach_w = int(qh[-1]) + 1, int(qw[-1]) + 1
    sub = np.zeros((groups, kg, len(live_h), len(live_w), cg, reach_h, reach_w), weight.dtype)
    taps = weight.reshape(groups, cg, kg, kh, kw).transpose(3, 4, 0, 2, 1)
    phase_h, phase_w = np.searchsorted(live_h, ph), np.searchsorted(live_w, pw)
    rows, cols = reach_h - 1 - qh[:, None], reach_w - 1 - qw[None, :]
    sub[:, :, phase_h[:, None], phase_w[None, :], :, rows, cols] = taps
    sub = sub.reshape(groups, kg * len(live_h) * len(live_w), cg * reach_h * reach_w)
    return sub, live_h, live_w


def _subpixel_columns(
    x: np.ndarray, groups: int, first: tuple[int, int], blocks: tuple[int, int], reach
) -> tuple[np.ndarray, int]:
    """im2col of the input for the convolution that computes a transposed convolution's
    output phases, and the width of its rows: [n, groups, cg·Qh·Qw, bh·width], the column
    of output block (b, c) and tap (jh, jw) holding x[first + b + jh − Qh + 1, ...] (0
    outside the input). Each row runs across the input extended by its zero padding
    (width bw + Qw − 1, the extra columns dropped later), so that each tap's rows are one
    contiguous run of it, copied at memory speed; x itself, without a copy, when that is x
    (a kernel no longer than the stride, no padding)."""
    n, c, h, w = x.shape
    (bh0, bw0), (bh, bw), (qh, qw) = first, blocks, reach
    top, left = bh0 - qh + 1, bw0 - qw + 1  # the input row and column of the first window
    eh, ew = bh + qh - 1, bw + qw - 1
    cg = c // groups
    if (top, left, eh, ew, qh, qw) == (0, 0, h, w, 1, 1):
        return x.reshape(n, groups, cg, h * w), w
    # The last row's extra columns read up to qw - 1 values past the end.
    flat = np.zeros((n, c, eh * ew + qw - 1), x.dtype)
    extended = flat[:, :, : eh * ew].reshape(n, c, eh, ew)
    rows = slice(max(0, -top), max(0, min(eh, h - top)))
    cols = slice(max(0, -left), max(0, min(ew, w - left)))
    extended[:, :, rows, cols] = x[
        :, :, rows.start + top : rows.stop + top, cols.start + left : cols.stop + left
    ]
    s_n, s_c, item = flat.strides[0], flat.strides[1], flat.itemsize
    windows = as_strided(
        flat,
        (n, groups, cg, qh, qw, bh * ew),
        (s_n, s_c * cg, s_c, ew * item, item, item),
        writeable=False,
    )
    out = np.empty(windows.shape, x.dtype)
    parallel.share(cg, lambda ch: np.copyto(out[:, :, ch], windows[:, :, ch]), out.size)
    return out.reshape(n, groups, cg * qh * qw, bh * ew), ew


def _phase_blocks(phase: int, first: int, count: int, stride: int, offset: int, size: int):
    """The blocks [lo, hi) of ``count`` from block ``first`` whose ``phase`` lands inside an
    output of ``size`` (output index block·stride + phase − offset), and the output index
    of the first; None if none does."""
    lo = max(0, -(-(offset - phase) // stride) - first)
    hi = min(count, (size - 1 + offset - phase) // stride - first + 1)
    return (lo, hi, (first + lo) * stride + phase - offset) if lo < hi else None


def _put_phases(phases, out, first: int, live, stride, offset) -> None:
    """out[..., b·sh + i − off_h, c·sw + j − off_w] = phases[..., i', j', b − first, c] for
    phases [n, g, k, Lh, Lw, bh, bw] of the live rows and columns (i = live[0][i'], ...),
    where that lands inside out [n, g, k, oh, ow] (the crop); other phases get 0. Phase
    by phase, each a run along the blocks of a row."""
    (live_h, live_w), (sh, sw), (off_h, off_w) = live, stride, offset
    count, bw = phases.shape[5:]
    oh, ow = out.shape[3:]
    for i in range(sh):
        rows = _phase_blocks(i, first, count, sh, off_h, oh)
        for j in range(sw):
            cols = _phase_blocks(j, 0, bw, sw, off_w, ow)
            if rows is None or cols is None:
                continue
            target = out[..., rows[2] :: sh, cols[2] :: sw][
                ..., : rows[1] - rows[0], : cols[1] - cols[0]
            ]
            if i in live_h and j in live_w:
                phase = phases[:, :, :, live_h.index(i), live_w.index(j)]
                np.copyto(target, phase[..., rows[0] : rows[1], cols[0] : cols[1]])
            else:
                target[...] = 0


def _put_row_phases(phases: np.ndarray, target: np.ndarray, live_h: list[int]) -> None:
    """target[..., b, i, c, j] = phases[..., i', j, b, c] for phases [n, g, k, Lh, sw, bh, bw]
    of the live rows (i = live_h[i']) and target [n, g, k, bh, sh, bw, sw], whose other rows
    get 0: row phase by row phase, each a run along the stride, for rows of fewer blocks
    than the stride (FCN-32s: 8 blocks of 32), where runs along the blocks are short."""
    for i in range(target.shape[4]):
        if i in live_h:
            rows = phases[:, :, :, live_h.index(i)].transpose(0, 1, 2, 4, 5, 3)
            np.copyto(target[:, :, :, :, i], rows)
        else:
            target[:, :, :, :, i] = 0


# A stride 1 transposed convolution whose output has this many times its input's pixels or
# more runs as one matrix product and a scatter of its taps (its multiplications count the
# input's pixels) rather than as the convolution by flipped kernels (which counts the
# output's, many of them against padding): LeNet's 5×5 input gradient on a 10×10 map.
SCATTER_FROM_GROWTH = 1.5


def _transpose_scatter(node: Node) -> Kernel | None:
    """A stride 1 transposed convolution as weightsᵀ × input, [groups, kg·taps, n·h·w], then
    each tap's rows added into the output at the tap's offset, the pads cropped and the bias
    added. None unless the output is SCATTER_FROM_GROWTH times the input's size or more."""
    a = node.attrs
    weight = node.inputs[1].data  # [C_in, out/groups, k...]
    win = _window(node, weight.shape[2:])
    weight = win.lift(weight) if win.one_d else weight
    cin, kg, kh, kw = weight.shape
    spatial = tuple(node.inputs[0].type.spatial)
    h, w = (1, *spatial) if win.one_d else spatial
    (dh, dw), (t, left, b, r) = win.dilation, win.pads
    oph, opw = (0, *a["output_pad"]) if win.one_d else a["output_pad"]
    if any(s != 1 for s in a["stride"]) or not all(isinstance(v, int) for v in (h, w)):
        return None
    full_h, full_w = h + dh * (kh - 1) + oph, w + dw * (kw - 1) + opw
    oh, ow = full_h - t - b, full_w - left - r
    if oh * ow < SCATTER_FROM_GROWTH * h * w or oh < 1 or ow < 1:
        return None
    groups = a["groups"]
    cg = cin // groups
    # [groups, kg·kh·kw, cg]: row (o, i, j) holds the weights from each input channel
    wt = np.ascontiguousarray(weight.reshape(groups, cg, kg * kh * kw).transpose(0, 2, 1))
    bias = node.inputs[2].data if len(node.inputs) > 2 else None

    def run(x: np.ndarray) -> np.ndarray:
        x = win.lift(x)
        n = x.shape[0]
        canvas = np.zeros((n, groups, kg, full_h, full_w), x.dtype)
        weights = wt.astype(x.dtype, copy=False)

        def share(part: slice) -> None:  # a share of the batch, product and scatter
            xs = x[part].reshape(-1, groups, cg, h * w).transpose(1, 2, 0, 3)
            cols = np.matmul(weights, xs.reshape(groups, cg, -1))  # [groups, kg·kh·kw, m·h·w]
            cols = cols.reshape(groups, kg, kh, kw, -1, h, w)
            for i in range(kh):
                for j in range(kw):
                    target = canvas[part, :, :, i * dh : i * dh + h, j * dw : j * dw + w]
                    target += cols[:, :, i, j].transpose(2, 0, 1, 3, 4)

        parallel.share(n, share, canvas.size * kh * kw)
        y = canvas.reshape(n, groups * kg, full_h, full_w)[:, :, t : t + oh, left : left + ow]
        y = np.ascontiguousarray(y)
        if bias is not None:
            y += bias.reshape(-1, 1, 1).astype(x.dtype, copy=False)
        return win.drop(y)

    return run


def _transpose_as_conv(node: Node) -> Kernel | None:
    """A stride 1 transposed convolution is the convolution of its input by the same
    kernels flipped, in and out channels swapped in each group, with padding
    dilation·(k − 1) − pad on each side (and the output padding at the end): computed by the
    conv kernel (Winograd's for 3×3). None where that padding would be negative. This is a
    convolution's input gradient in a training step."""
    a = node.attrs
    weight = node.inputs[1].data  # [C_in, out/groups, k...]
    kernel = weight.shape[2:]
    rank = len(kernel)
    if any(s != 1 for s in a["stride"]):
        return None
    reach = [d * (k - 1) for d, k in zip(a["dilation"], kernel, strict=True)]
    pads = tuple(reach[i] - a["pads"][i] for i in range(rank)) + tuple(
        reach[i] - a["pads"][rank + i] + a["output_pad"][i] for i in range(rank)
    )
    if min(pads) < 0:
        return None
    groups = a["groups"]
    cin, kg = weight.shape[:2]
    flipped = weight.reshape(groups, cin // groups, kg, *kernel).swapaxes(1, 2)
    flipped = flipped[(..., *(slice(None, None, -1),) * rank)]
    flipped = np.ascontiguousarray(flipped.reshape(groups * kg, cin // groups, *kernel))
    w = Value(node.inputs[1].name, TensorType(dtype_name(flipped.dtype), flipped.shape), "param")
    w.set_data(flipped)
    attrs = {"stride": a["stride"], "pads": pads, "dilation": a["dilation"], "groups": groups}
    inputs = [node.inputs[0], w, *node.inputs[2:]]
    return conv(Node("conv", node.name, inputs, attrs, node.loc))


@kernel("conv_transpose")
def conv_transpose(node: Node) -> Kernel:
    """The transposed convolution as the stride 1 convolution that computes its output
    phases (the sub-pixel convolution): output row r = b·sh + ph is phase ph of block b,
    and each phase is a correlation of the input with the kernel taps that land on it.
    One matrix product per group, [groups, kg·sh·sw, cg·Qh·Qw] weights (fewer phases when
    no tap lands on some) by the input's small im2col (Qh×Qw blocks of taps: 1×1 for
    U-Net's k=2 s=2, which reads the input as it lies, 2×2 for FCN-32s's k=64 s=32), sums
    every tap into its phase, with no overlapping adds; the phases are then interleaved
    into the output, the pads cropped (only the stride-long blocks the output overlaps are
    computed) and the bias added. The threads take a share of the kernels (or of the
    groups, when there are more groups than kernels in each), each over blocks of rows
    whose products fit COLUMN_BLOCK_BYTES. An input with a NaN or an infinity is
    scattered tap by tap instead (see ``scatter``)."""
    direct = _transpose_scatter(node) or _transpose_as_conv(node)
    if direct is not None:
        return direct
    weight = node.inputs[1].data
    win = _window(node, weight.shape[2:])
    weight = win.lift(weight) if win.one_d else weight
    kg, kh, kw = weight.shape[1:]
    groups = node.attrs["groups"]
    output_pad = node.attrs["output_pad"]
    oph, opw = (0, *output_pad) if win.one_d else output_pad
    (sh, sw), (dh, dw) = win.stride, win.dilation
    top, left, bottom, right = win.pads
    reach = ((dh * (kh - 1)) // sh + 1, (dw * (kw - 1)) // sw + 1)
    sub, live_h, live_w = _subpixel_weights(weight, groups, win.stride, win.dilation)
    live = (live_h, live_w)
    phases_per_kernel, columns = len(live_h) * len(live_w), sub.shape[2]
    sub = sub.reshape(groups, kg, phases_per_kernel * columns)
    bias = node.inputs[2].data.reshape(groups, kg, 1, 1) if len(node.inputs) > 2 else None
    by_groups = groups > kg

    def scatter(x: np.ndarray, oh: int, ow: int) -> np.ndarray:
        # Tap by tap, each input pixel's products added where the tap lands (PyTorch's
        # col2im): a pixel reaches only the outputs its taps land on, where the phases'
        # product also multiplies it by the 0 weights of the taps that land elsewhere,
        # which spreads a NaN or an infinity (0·inf = NaN) to them.
        n, c, h, w = x.shape
        cg = c // groups
        full = np.zeros((n, groups, kg, oh + top + bottom, ow + left + right), x.dtype)
        taps = weight.reshape(groups, cg, kg, kh, kw)
        xs = x.reshape(n, groups, cg, h * w)
        for i in range(kh):
            for j in range(kw):
                product = np.matmul(taps[:, :, :, i, j].transpose(0, 2, 1), xs)
                rows = slice(i * dh, i * dh + (h - 1) * sh + 1, sh)
                cols = slice(j * dw, j * dw + (w - 1) * sw + 1, sw)
                full[..., rows, cols] += product.reshape(n, groups, kg, h, w)
        y = np.ascontiguousarray(full[..., top : top + oh, left : left + ow])
        if bias is not None:
            y += bias
        return y.reshape(n, groups * kg, oh, ow)

    def run(x: np.ndarray) -> np.ndarray:
        x = win.lift(x)
        n, _, h, w = x.shape
        oh = (h - 1) * sh - top - bottom + dh * (kh - 1) + oph + 1
        ow = (w - 1) * sw - left - right + dw * (kw - 1) + opw + 1
        if not all_finite(x):
            return win.drop(scatter(x, oh, ow))
        # The stride-long blocks of the uncropped output that the output overlaps.
        first = (top // sh, left // sw)
        bh, bw = -(-(top + oh) // sh) - first[0], -(-(left + ow) // sw) - first[1]
        off_h, off_w = top % sh, left % sw
        crop = (off_h, off_w, bh * sh, bw * sw) != (0, 0, oh, ow)
        by_rows = bw < sw and len(live_w) == sw
        cols, width = _subpixel_columns(x, groups, first, (bh, bw), reach)
        y = np.empty((n, groups * kg, oh, ow), x.dtype)
        y_groups = y.reshape(n, groups, kg, oh, ow)
        pool = parallel.current()

        def work(share: slice, worker: int) -> None:
            gs, ks = (share, slice(None)) if by_groups else (slice(None), share)
            size = share.stop - share.start
            g, k = (size, kg) if by_groups else (groups, size)
            per_row = n * g * k * phases_per_kernel * width
            rows = max(1, min(bh, COLUMN_BLOCK_BYTES // (4 * per_row)))
            full_size = n * g * k * sh * sw * rows * bw if by_rows and crop else 0
            buffer = pool.scratch(worker, per_row * rows + full_size, x.dtype)
            weights = sub[gs, ks].reshape(g, k * phases_per_kernel, columns)
            out = y_groups[:, gs, ks]
            for b0 in range(0, bh, rows):
                b1 = min(bh, b0 + rows)
                r = b1 - b0
                product = buffer[: per_row * r].reshape(n, g, -1, r * width)
                _matmul(weights, cols[:, gs, :, b0 * width : b1 * width], product)
                phases = product.reshape(n, g, k, len(live_h), len(live_w), r, width)
                phases = phases[..., :bw]
                if not by_rows:
                    _put_phases(phases, out, b0, live, (sh, sw), (off_h, off_w))
                elif not crop:
                    target = out[:, :, :, b0 * sh : b1 * sh].reshape(n, g, k, r, sh, bw, sw)
                    _put_row_phases(phases, target, live_h)
                else:
                    full = buffer[per_row * rows : per_row * rows + n * g * k * sh * sw * r * bw]
                    _put_row_phases(phases, full.reshape(n, g, k, r, sh, bw, sw), live_h)
                    full = full.reshape(n, g, k, r * sh, bw * sw)
                    start = b0 * sh - off_h  # the output row of the block's first row
                    lo, hi = max(0, start), min(oh, start + r * sh)
                    if lo < hi:
                        rows_out = full[..., lo - start : hi - start, off_w : off_w + ow]
                        np.copyto(out[..., lo:hi, :], rows_out)
            if bias is not None:
                out += bias[gs, ks]

        macs = x.size * kg * kh * kw
        shares = parallel.pieces(groups if by_groups else kg, macs=macs)
        pool.map(lambda i, worker: work(slice(*shares[i]), worker), len(shares))
        return win.drop(y)

    return run


@kernel("fc")
def fc(node: Node) -> Kernel:
    weight = node.inputs[1].data  # [out, in]: the product reads it transposed, without a copy
    bias = node.inputs[2].data if len(node.inputs) > 2 else None

    def run(x: np.ndarray) -> np.ndarray:
        y = _fc_product(x, weight)
        if bias is not None:
            y += bias
        return y

    return run


@kernel("linear")
def linear(node: Node) -> Kernel:
    axis, rank = node.attrs["axis"], node.inputs[0].type.rank
    weight = node.inputs[1].data  # [K, C]
    bias = node.inputs[2].data if len(node.inputs) > 2 else None
    k = weight.shape[0]

    def last(x: np.ndarray) -> np.ndarray:
        # Every position a row: the rows times weight.T, as an fc layer over all of them.
        y = _fc_product(x.reshape(-1, x.shape[-1]), weight)
        if bias is not None:
            y += bias
        return y.reshape(*x.shape[:-1], k)

    def first(x: np.ndarray) -> np.ndarray:
        # Over the channels of a map: weight times each item's [C, positions], as a
        # pointwise convolution.
        n = x.shape[0]
        y = np.empty((n, k, *x.shape[2:]), x.dtype)
        _products(weight[None], x.reshape(n, 1, x.shape[1], -1), y.reshape(n, 1, k, -1))
        if bias is not None:
            y3 = y.reshape(n, k, -1)

            def add_bias(share: slice) -> None:
                y3[:, share] += bias[share, None]

            parallel.share(k, add_bias, y.size)
        return y

    if axis == rank - 1:
        return last
    if axis == 1:
        return first

    def other(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.moveaxis(last(np.moveaxis(x, axis, -1)), -1, axis))

    return other


# ---- pooling --------------------------------------------------------------------------------


@kernel("maxpool")
def maxpool(node: Node) -> Kernel:
    win = _window(node, node.attrs["kernel"])

    def pool(x: np.ndarray, out: np.ndarray, channels: slice, oh: int, ow: int) -> None:
        win.reduce(win.padded(x[:, channels], -np.inf, oh, ow), oh, ow, np.maximum, out)

    return lambda x: win.by_channels(x, x.shape[1], pool)


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

    def pool(x: np.ndarray, out: np.ndarray, channels: slice, oh: int, ow: int) -> None:
        win.reduce(win.padded(x[:, channels], 0.0, oh, ow), oh, ow, np.add, out)
        h, w = x.shape[2:]
        out /= np.outer(
            _avg_counts(h, oh, kh, sh, dh, t, b, include_pad),
            _avg_counts(w, ow, kw, sw, dw, left, r, include_pad),
        )

    return lambda x: win.by_channels(x, x.shape[1], pool)


@kernel("gap")
def gap(node: Node) -> Kernel:
    def run(x: np.ndarray) -> np.ndarray:
        return x.mean(axis=tuple(range(2, x.ndim)), keepdims=True, dtype=x.dtype)

    return run


@kernel("global_maxpool")
def global_maxpool(node: Node) -> Kernel:
    def run(x: np.ndarray) -> np.ndarray:
        return x.max(axis=tuple(range(2, x.ndim)), keepdims=True)

    return run


# ---- resizing and adaptive pooling ----------------------------------------------------------


def _by_spatial_size(plan: Callable[[tuple[int, ...], np.dtype], object]) -> Callable[..., object]:
    """``plan(spatial sizes, dtype)`` computed once per input size (a fully convolutional
    network runs on inputs of any size) and element type."""
    plans: dict[tuple, object] = {}

    def get(x: np.ndarray):
        key = (x.shape[2:], x.dtype)
        if key not in plans:
            plans[key] = plan(tuple(x.shape[2:]), x.dtype)
        return plans[key]

    return get


def _along(values: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """Per-position values of ``axis`` shaped to broadcast against an ``ndim``-D array."""
    return values.reshape(-1, *(1,) * (ndim - 1 - axis))


def _resample_by_channels(
    x: np.ndarray, out_spatial: tuple[int, ...], steps: list, apply: Callable[..., np.ndarray]
) -> np.ndarray:
    """An output [n, c, *out_spatial] made by ``apply(t, step, out)`` for each step along one
    axis in turn, the last writing into the output; the threads take a share of the
    channels each. No steps: a copy."""
    n, c = x.shape[:2]
    y = np.empty((n, c, *out_spatial), x.dtype)
    if not steps:
        _copy_by_channels(y, x)
        return y

    def part(channels: slice) -> None:
        t = x[:, channels]
        for i, step in enumerate(steps):
            t = apply(t, step, y[:, channels] if i == len(steps) - 1 else None)

    parallel.share(c, part, x.size + y.size)
    return y


# A gather along the last axis picks single values; along another, whole runs of them.
LAST_AXIS_GATHER_COST = 3


def _cheapest_order(steps: list, spatial: tuple[int, ...], sizes: list[int]) -> list:
    """The steps (each along one axis, ``sizes`` its output sizes) in the order that writes
    the fewest values, a value of a gather along the last axis counting thrice: shrinking
    axes first, and a growing last axis before the rows are copied."""
    ndim = len(spatial) + 2
    orders = itertools.permutations(range(len(steps)))

    def cost(order: tuple[int, ...]) -> int:
        shape, total = list(spatial), 0
        for i in order:
            axis = steps[i][0]
            shape[axis - 2] = sizes[i]
            written = int(np.prod(shape))
            total += written * (LAST_AXIS_GATHER_COST if axis == ndim - 1 else 1)
        return total

    return [steps[i] for i in min(orders, key=cost)]


@kernel("upsample")
def upsample(node: Node) -> Kernel:
    """Nearest modes gather each axis by its source indices; linear modes take the two
    neighbours along each axis in turn, weighted. Indices and weights are PyTorch's
    (cnnc.ops.resize), computed once per input size; an axis that keeps its pixels is
    skipped."""
    a = node.attrs
    rank = node.inputs[0].type.rank - 2
    mode = a["mode"]

    def plan(spatial: tuple[int, ...], dtype: np.dtype):
        out = upsample_sizes(spatial, a)
        steps, sizes = [], []
        for i, (size, o) in enumerate(zip(spatial, out, strict=True)):
            scale = a["scales"][i] if a["scales"] is not None else None
            if mode in NEAREST_MODES:
                index = nearest_indices(size, o, scale, mode, rank)
                if o == size and np.array_equal(index, np.arange(o)):
                    continue
                steps.append((2 + i, index))
            else:
                if o == size:
                    continue
                # The weights of float32 (the op's definition, as PyTorch's float32 and
                # ONNX compute them), in the input's type.
                first, second, w0, w1 = (
                    t.astype(dtype) if t.dtype.kind == "f" else t
                    for t in linear_taps(size, o, scale, a["align_corners"])
                )
                ndim = rank + 2
                steps.append(
                    (2 + i, first, second, _along(w0, 2 + i, ndim), _along(w1, 2 + i, ndim))
                )
            sizes.append(o)
        return out, _cheapest_order(steps, spatial, sizes)

    plans = _by_spatial_size(plan)

    def apply(t: np.ndarray, step, out: np.ndarray | None) -> np.ndarray:
        if len(step) == 2:
            axis, index = step
            return np.take(t, index, axis=axis, out=out, mode="clip")
        axis, first, second, w0, w1 = step
        near = np.take(t, first, axis=axis, mode="clip")
        y = np.multiply(near, w0, out=out if out is not None else near)
        far = np.take(t, second, axis=axis, mode="clip")
        far *= w1
        y += far
        return y

    def run(x: np.ndarray) -> np.ndarray:
        out, steps = plans(x)
        return _resample_by_channels(x, out, steps, apply)

    return run


def _adaptive_steps(spatial: tuple[int, ...], size: tuple[int, ...], window_step) -> list:
    steps, sizes = [], []
    for i, (n, o) in enumerate(zip(spatial, size, strict=True)):
        if n == o:
            continue
        if n % o == 0:
            steps.append((2 + i, "uniform", n // o))
        else:
            steps.append((2 + i, *window_step(n, o)))
        sizes.append(o)
    return _cheapest_order(steps, spatial, sizes)


def _uniform_windows(
    t: np.ndarray, axis: int, k: int, op: np.ufunc, out: np.ndarray | None
) -> np.ndarray:
    """``op`` (add, maximum) over the consecutive windows of ``k`` along ``axis``: over the
    ``k`` strided slices that hold each window's first, second, ... element."""
    parts = [t[(slice(None),) * axis + (slice(j, None, k),)] for j in range(k)]
    acc = op(parts[0], parts[1], out=out)
    for part in parts[2:]:
        op(acc, part, out=acc)
    return acc


def _store(y: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    if out is None:
        return y
    np.copyto(out, y)
    return out


def _window_means(t: np.ndarray, axis: int, size: int) -> np.ndarray:
    """The mean over each of PyTorch's ``size`` adaptive windows along ``axis``: window i
    covers floor(i·n/size) to ceil((i+1)·n/size)."""
    n = t.shape[axis]
    means = [
        t[(slice(None),) * axis + (slice(i * n // size, -(-(i + 1) * n // size)),)].mean(
            axis=axis, keepdims=True, dtype=t.dtype
        )
        for i in range(size)
    ]
    return np.concatenate(means, axis=axis)


@kernel("adaptive_avgpool")
def adaptive_avgpool(node: Node) -> Kernel:
    """Windows that divide an axis evenly are a mean over a reshaped axis; others are a
    matrix product along that axis by the pooling matrix (row i holds 1/len over window i)."""
    size = tuple(node.attrs["size"])

    plans = _by_spatial_size(
        lambda spatial, dtype: _adaptive_steps(
            spatial, size, lambda n, o: ("matrix", adaptive_avg_matrix(n, o, dtype))
        )
    )

    def apply(t: np.ndarray, step, out: np.ndarray | None) -> np.ndarray:
        axis, kind, data = step
        if kind == "uniform":
            y = _uniform_windows(t, axis, data, np.add, out)
            y /= t.dtype.type(data)
            return y
        if not all_finite(t):
            # The matrix's 0 outside each window would carry a NaN or an infinity into
            # every window of the axis (0·inf = NaN): window by window instead.
            return _store(_window_means(t, axis, data.shape[0]), out)
        y = np.matmul(t, data.T) if axis == t.ndim - 1 else np.matmul(data, t)
        return _store(y, out)

    return lambda x: _resample_by_channels(x, size, plans(x), apply)


@kernel("adaptive_maxpool")
def adaptive_maxpool(node: Node) -> Kernel:
    """Windows that divide an axis evenly are a maximum over a reshaped axis; others gather
    each window's indices (a short window repeats its last index up to the longest) and
    take the maximum over the few offsets, along one axis at a time."""
    size = tuple(node.attrs["size"])

    plans = _by_spatial_size(
        lambda spatial, dtype: _adaptive_steps(
            spatial, size, lambda n, o: ("gather", adaptive_max_windows(n, o))
        )
    )

    def apply(t: np.ndarray, step, out: np.ndarray | None) -> np.ndarray:
        axis, kind, data = step
        if kind == "uniform":
            return _uniform_windows(t, axis, data, np.maximum, out)
        y = np.take(t, data[:, 0], axis=axis, out=out, mode="clip")
        for j in range(1, data.shape[1]):
            np.maximum(y, np.take(t, data[:, j], axis=axis, mode="clip"), out=y)
        return y

    return lambda x: _resample_by_channels(x, size, plans(x), apply)


# ---- element-wise and the rest -------------------------------------------------------------


def _sigmoid(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    # sigmoid(x) = (1 + tanh(x/2)) / 2: one transcendental pass and three cheap ones, 8
    # times as fast as 1 / (1 + exp(-x)) with its where() and division (1.6 against 12.6 ms
    # on 1.2 M float32 values), within 6e-8 of it everywhere; tanh saturates, never
    # overflows. (Tiny values of the far negative side lose their relative precision, not
    # their absolute one: what the agreement criterion measures.)
    half = x.dtype.type(0.5)
    y = np.multiply(x, half, out=out)
    np.tanh(y, out=y)
    y *= half
    y += half
    return y


def _leaky_relu(attrs: dict) -> Activation:
    alpha = attrs["alpha"]

    def run(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if out is None:
            out = x.copy()
        elif out is not x:
            np.copyto(out, x)
        # Only the negative values change (NaN is not negative: it stays NaN).
        return np.multiply(out, out.dtype.type(alpha), out=out, where=out < 0)

    return run


def _clip(attrs: dict) -> Activation:
    # ONNX Clip: the max bound wins when min > max, so max(x, min) comes first.
    low, high = attrs["min"], attrs["max"]

    def run(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        kind = x.dtype.type
        y = np.maximum(x, kind(low), out=out)
        return np.minimum(y, kind(high), out=y)

    return run


# erf by Abramowitz and Stegun's 7.1.26: |error| < 1.5e-7, below float32's resolution of
# the values gelu adds it to (NumPy has no erf, and SciPy is not a dependency).
_ERF_P = 0.3275911
_ERF_A = (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)


def erf(z: np.ndarray) -> np.ndarray:
    """The error function, element-wise, in z's precision (to 1.5e-7); in float64, exact
    (math.erf value by value: slow, but float64 runs are for checking, not speed)."""
    kind = z.dtype.type
    if z.dtype == np.float64:
        return np.frompyfunc(math.erf, 1, 1)(z).astype(np.float64)
    a = np.abs(z)
    t = np.multiply(a, kind(_ERF_P))
    t += 1
    np.reciprocal(t, out=t)
    poly = np.full_like(t, kind(_ERF_A[0]))
    for coefficient in _ERF_A[1:]:
        poly *= t
        poly += kind(coefficient)
    poly *= t
    np.square(a, out=a)
    np.negative(a, out=a)
    poly *= np.exp(a, out=a)
    np.subtract(1, poly, out=poly)
    return np.copysign(poly, z, out=poly)


def _times_gate(x: np.ndarray, gate: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """x · gate(x) for a gate that goes to 0 at −inf (silu, hardswish, gelu, mish), with the
    function's limit there: −inf·0 is NaN, so x is bounded below by float32's lowest first
    (−3.4e38·0 = −0). NaN stays NaN; ``gate`` must be computed before ``out`` is written."""
    y = np.maximum(x, np.finfo(x.dtype).min, out=out)
    y *= gate
    return y


def _silu(attrs: dict) -> Activation:
    def run(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return _times_gate(x, _sigmoid(x), out)

    return run


def _hardsigmoid(alpha: float, beta: float) -> Activation:
    def run(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        y = np.multiply(x, x.dtype.type(alpha), out=out)
        y += x.dtype.type(beta)
        return np.clip(y, 0, 1, out=y)

    return run


def _hardswish(attrs: dict) -> Activation:
    gate = _hardsigmoid(1 / 6, 0.5)

    def run(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return _times_gate(x, gate(x), out)

    return run


_SQRT_2_OVER_PI = float(np.sqrt(2 / np.pi))


def _gelu(attrs: dict) -> Activation:
    tanh = attrs["approximate"] == "tanh"

    def run(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        kind = x.dtype.type
        if tanh:
            inner = np.square(x)
            inner *= kind(0.044715)
            inner += 1
            inner *= x
            inner *= kind(_SQRT_2_OVER_PI)
            gate = np.tanh(inner, out=inner)
        else:
            gate = erf(x * kind(1 / np.sqrt(2)))
        gate += 1
        gate *= kind(0.5)
        return _times_gate(x, gate, out)

    return run


def _softplus_of(x: np.ndarray, beta: float = 1.0) -> np.ndarray:
    """log(1 + exp(beta·x)) / beta as max(x, 0) + log1p(exp(-beta·|x|)) / beta: never
    overflows, not even where beta·x would (beta > 1, x near float32's largest), and
    plain ufunc passes (np.logaddexp is ten times as slow on float32)."""
    y = np.abs(x)
    y *= x.dtype.type(-beta)
    np.exp(y, out=y)
    np.log1p(y, out=y)
    if beta != 1:
        y /= x.dtype.type(beta)
    y += np.maximum(x, 0)
    return y


def _mish(attrs: dict) -> Activation:
    def run(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        gate = _softplus_of(x)
        return _times_gate(x, np.tanh(gate, out=gate), out)

    return run


def _elu(attrs: dict) -> Activation:
    alpha = attrs["alpha"]

    def run(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        # max(x, 0) + alpha·(exp(min(x, 0)) − 1): each term is 0 where the other is not
        # (and NaN stays NaN).
        below = np.minimum(x, 0)
        np.expm1(below, out=below)
        below *= x.dtype.type(alpha)
        y = np.maximum(x, 0, out=out)
        y += below
        return y

    return run


def _softplus(attrs: dict) -> Activation:
    beta = attrs["beta"]

    def run(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        y = _softplus_of(x, beta)
        if out is None:
            return y
        np.copyto(out, y)
        return out

    return run


# Each takes an activation's attributes and returns its function of (x, out=None): the
# op's kernel, and what a conv fused with it applies in place on its output. ``out`` may
# be ``x`` itself or another array of its shape; ``x`` may be any strided view.
ELEMENTWISE: dict[str, Callable[[dict], Activation]] = {
    "relu": lambda attrs: lambda x, out=None: np.maximum(x, 0, out=out),
    "leaky_relu": _leaky_relu,
    "clip": _clip,
    "sigmoid": lambda attrs: _sigmoid,
    "tanh": lambda attrs: np.tanh,
    "silu": _silu,
    "hardsigmoid": lambda attrs: _hardsigmoid(attrs["alpha"], attrs["beta"]),
    "hardswish": _hardswish,
    "gelu": _gelu,
    "mish": _mish,
    "elu": _elu,
    "softplus": _softplus,
}

for _op, _make in ELEMENTWISE.items():
    kernel(_op)(lambda node, make=_make: make(node.attrs))
    IN_PLACE.add(_op)


@kernel("prelu")
def prelu(node: Node) -> Kernel:
    slope = node.inputs[1].data.reshape(-1, *(1,) * (node.inputs[0].type.rank - 2))

    def run(x: np.ndarray) -> np.ndarray:
        scaled = np.multiply(x, slope)
        np.copyto(scaled, x, where=x >= 0)
        return scaled

    return run


@kernel("bn")
@kernel("affine")
def scale_shift(node: Node) -> Kernel:
    per_channel = (-1, *(1,) * (node.inputs[0].type.rank - 2))
    scale, shift = (a.reshape(per_channel) for a in channel_scale_shift(node))

    def run(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        y = np.multiply(x, scale, out=out)
        y += shift
        return y

    return run


@kernel("scale")
def scale(node: Node) -> Kernel:
    weight = node.inputs[1].data  # [C, 1, ..., 1]: it broadcasts against the map as it lies

    def run(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return np.multiply(x, weight, out=out)

    return run


def _contiguous(x: np.ndarray, out: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """x as a C-contiguous array (a transpose's output is a view in another order), and
    where the result goes: ``out`` (x's memory, dying here) if x was, else a new array; the
    kernels below view both in shapes that only C order gives without a copy."""
    if x.flags.c_contiguous:
        return x, np.empty(x.shape, x.dtype) if out is None else out
    x = np.ascontiguousarray(x)
    return x, x


def _normalize(x: np.ndarray, out: np.ndarray, epsilon: float) -> None:
    """out = (x - mean) / sqrt(var + epsilon) along axis 1 of x [outer, size, inner], the
    biased variance of the deviations themselves (two passes: no cancellation); ``out``
    may be ``x``. The sums of squares need no temporary the size of x (a fresh one each run
    costs its page faults: 3-4 times the arithmetic here): over contiguous rows (inner 1),
    products of each row with itself, which BLAS sums accurately (1e-7 of the sum over
    200 000 values, where einsum's running sum is off by 6e-6); across rows, einsum, whose
    error over the few thousand channels of a position stays below 1e-6."""
    mean = x.mean(axis=1, keepdims=True)
    np.subtract(x, mean, out=out)
    if x.shape[2] == 1:
        rows = out[:, :, 0]
        variance = np.matmul(rows[:, None, :], rows[:, :, None])
    else:
        variance = np.einsum("ijk,ijk->ik", out, out)[:, None, :]
    kind = x.dtype.type
    variance *= kind(1 / x.shape[1])
    variance += kind(epsilon)
    np.sqrt(variance, out=variance)
    np.reciprocal(variance, out=variance)
    out *= variance


@kernel("layernorm")
def layernorm(node: Node) -> Kernel:
    axis, epsilon = node.attrs["axis"], node.attrs["epsilon"]
    weight, bias = (v.data.reshape(-1, 1) for v in node.inputs[1:])

    def run(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        x, y = _contiguous(x, out)
        # [outer, C, inner]: the batch (and any axes before ``axis``) by the positions after.
        outer = int(np.prod(x.shape[:axis]))
        x3 = x.reshape(outer, x.shape[axis], -1)
        y3 = y.reshape(x3.shape)
        # Each thread takes a share of the positions: of the inner ones on a map (N×C×H×W
        # normalized over C), of the outer ones over the last axis (N×H×W×C).
        along_inner = x3.shape[2] >= x3.shape[0]

        def part(share: slice) -> None:
            xs, ys = (x3[:, :, share], y3[:, :, share]) if along_inner else (x3[share], y3[share])
            _normalize(xs, ys, epsilon)
            ys *= weight
            ys += bias

        parallel.share(x3.shape[2] if along_inner else outer, part, 6 * x.size)
        return y

    return run


@kernel("groupnorm")
def groupnorm(node: Node) -> Kernel:
    groups, epsilon = node.attrs["groups"], node.attrs["epsilon"]
    weight, bias = (v.data.reshape(groups, -1, 1) for v in node.inputs[1:])

    def run(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        x, y = _contiguous(x, out)
        n = x.shape[0]
        # [n·groups, values of the group, 1]: each row normalized over its values.
        rows = x.reshape(n * groups, -1, 1)
        y_rows = y.reshape(rows.shape)
        per_channel = y.reshape(n * groups, weight.shape[1], -1)

        def part(share: slice) -> None:
            _normalize(rows[share], y_rows[share], epsilon)
            # Row r is group r % groups of item r // groups.
            which = np.arange(share.start, share.stop) % groups
            per_channel[share] *= weight[which]
            per_channel[share] += bias[which]

        parallel.share(n * groups, part, 6 * x.size)
        return y

    return run


@kernel("lrn")
def lrn(node: Node) -> Kernel:
    a = node.attrs
    size = a["size"]
    before = (size - 1) // 2
    after = size - 1 - before
    scale, bias, beta = a["alpha"] / size, a["bias"], a["beta"]

    def run(x: np.ndarray) -> np.ndarray:
        kind, channels = x.dtype.type, x.shape[1]
        # Window taps beyond the first or last channel only ever read zeros: skip them.
        lead, trail = min(before, channels - 1), min(after, channels - 1)
        squares = np.zeros((x.shape[0], lead + channels + trail, *x.shape[2:]), x.dtype)
        np.square(x, out=squares[:, lead : lead + channels])
        sums = squares[:, :channels].copy()
        for offset in range(1, lead + trail + 1):
            sums += squares[:, offset : offset + channels]
        sums *= kind(scale)
        sums += kind(bias)
        return x / np.power(sums, kind(beta), out=sums)

    return run


_ARITHMETIC = {"add": np.add, "mul": np.multiply, "sub": np.subtract, "div": np.divide}


def _arithmetic(ufunc: np.ufunc) -> Callable[[Node], Kernel]:
    def run(*xs: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        # Left to right, as the chain of binary ONNX ops the exporter writes. A partial
        # result lands in ``out`` (the first input's memory, which dies here), or in the
        # previous partial result, wherever it has the shape the step broadcasts to.
        y = xs[0]
        for i, x in enumerate(xs[1:]):
            target = out if i == 0 else y
            fits = target is not None and target.shape == np.broadcast_shapes(y.shape, x.shape)
            y = ufunc(y, x, out=target if fits else None)
        return y

    return lambda node: run


for _op, _ufunc in _ARITHMETIC.items():
    kernel(_op)(_arithmetic(_ufunc))
    IN_PLACE.add(_op)


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


@kernel("reshape")
def reshape(node: Node) -> Kernel:
    shape = tuple(node.attrs["shape"])
    return lambda x: x.reshape(x.shape[0], *shape)


@kernel("transpose")
def transpose(node: Node) -> Kernel:
    perm = tuple(node.attrs["perm"])
    return lambda x: x.transpose(perm)


@kernel("dropout")
def dropout(node: Node) -> Kernel:
    return lambda x: x


@kernel("drop_path")
def drop_path(node: Node) -> Kernel:
    return lambda x: x


def _border_sources(size: int, begin: int, end: int, mode: str) -> np.ndarray:
    """For each position of an axis padded by ``begin`` and ``end``, the padded position it
    copies: reflected about the edges (no edge repeated), or clamped to them."""
    positions = np.arange(-begin, size + end)
    if mode == "edge":
        positions = np.clip(positions, 0, size - 1)
    else:
        positions = np.abs(positions)
        positions = np.where(positions > size - 1, 2 * (size - 1) - positions, positions)
    return positions + begin


@kernel("pad")
def pad(node: Node) -> Kernel:
    a = node.attrs
    pads, mode, value = tuple(a["pads"]), a["mode"], a["value"]
    rank = len(pads) // 2
    begins, ends = pads[:rank], pads[rank:]
    # Negative amounts crop (constant mode): the input's part that stays, and where it goes.
    keep = tuple(
        slice(max(-b, 0), (e if e < 0 else None)) for b, e in zip(begins, ends, strict=True)
    )
    place = tuple(
        slice(max(b, 0), (-e if e > 0 else None)) for b, e in zip(begins, ends, strict=True)
    )

    def run(x: np.ndarray) -> np.ndarray:
        spatial = x.shape[2:]
        shape = (*x.shape[:2], *(s + b + e for s, b, e in zip(spatial, begins, ends, strict=True)))
        y = np.empty(shape, x.dtype)
        inner = y[(slice(None), slice(None), *place)]
        kept = x[(slice(None), slice(None), *keep)]
        if mode == "constant":

            def fill(channels: slice) -> None:
                y[:, channels] = value
                inner[:, channels] = kept[:, channels]

            parallel.share(x.shape[1], fill, y.size)
            return y
        # reflect and edge: the input in the middle, then the borders copied from inside,
        # one axis after the other (the later axes' borders include the earlier's, so the
        # corners come out right).
        sources = [
            _border_sources(s, b, e, mode) for s, b, e in zip(spatial, begins, ends, strict=True)
        ]

        def fill(channels: slice) -> None:
            inner[:, channels] = kept[:, channels]
            done = [slice(None), channels, *place]
            for i, (b, e, source) in enumerate(zip(begins, ends, sources, strict=True)):
                axis, length = 2 + i, y.shape[2 + i]
                for border in (slice(0, b), slice(length - e, length)):
                    if border.start < border.stop:
                        target, origin = list(done), list(done)
                        target[axis], origin[axis] = border, source[border]
                        y[tuple(target)] = y[tuple(origin)]
                done[axis] = slice(None)

        parallel.share(x.shape[1], fill, y.size)
        return y

    return run


@kernel("split")
def split(node: Node) -> Kernel:
    bounds = np.cumsum((0, *node.attrs["sizes"])).tolist()
    pieces = [slice(a, b) for a, b in itertools.pairwise(bounds)]
    if len(pieces) == 1:
        return lambda x: x
    return lambda x: tuple(x[:, piece] for piece in pieces)


@kernel("slice")
def slice_(node: Node) -> Kernel:
    a = node.attrs
    index = (slice(None),) * a["axis"] + (slice(a["start"], a["end"]),)
    return lambda x: x[index]


@kernel("crop")
def crop(node: Node) -> Kernel:
    offset = tuple(node.attrs["offset"])

    def run(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
        # A fully convolutional network's sizes are known only now.
        window = ref.shape[2:]
        if any(o + w > s for o, w, s in zip(offset, window, x.shape[2:], strict=True)):
            raise ValueError(
                f"crop of {'x'.join(map(str, window))} from offset "
                f"{','.join(map(str, offset))} does not fit in {list(x.shape)}"
            )
        return x[
            (
                slice(None),
                slice(None),
                *(slice(o, o + w) for o, w in zip(offset, window, strict=True)),
            )
        ]

    return run
