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

from cnnc.backends import parallel
from cnnc.ir.graph import Node
from cnnc.ops.common import window_output_size
from cnnc.ops.norm import channel_scale_shift

Kernel = Callable[..., np.ndarray]
Activation = Callable[..., np.ndarray]  # f(x, out=None), so that a conv can apply it in place
KERNELS: dict[str, Callable[[Node], Kernel]] = {}

# Ops whose kernel takes ``out=`` and may write its result over its first input: the
# interpreter passes it when that input's memory dies at the node.
IN_PLACE = {"bn", "affine", "scale", "layernorm", "groupnorm"}
# Ops whose output may share memory with their input (a view), so that memory lives on.
ALIASING = {"flatten", "dropout", "reshape", "transpose"}


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

    def by_channels(
        self, x: np.ndarray, channels: int, work: Callable[..., None], passes: int = 1
    ) -> np.ndarray:
        """An output [n, channels, oh, ow] filled by ``work(x, out, share, oh, ow)`` for
        shares of its channels (``out`` = the share's slice of it), one share per thread
        when ``passes`` over the input are worth sharing."""
        x = self.lift(x)
        n, _, h, w = x.shape
        oh, ow = self.output_size(h, w)
        y = np.empty((n, channels, oh, ow), np.float32)
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
    y = np.empty((x.shape[0], weight.shape[0]), np.float32)
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
    if _winograd_applies(node, weight):
        return _winograd(node, win, weight)
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
        n, ow = y.shape[0], y.shape[3]
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
            buffer = pool.scratch(worker, size + k * n * m * width)
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
        y = np.empty((n, k, oh, ow), np.float32)
        if (kh, kw, sh, sw) == (1, 1, 1, 1) and not padded:
            # A pointwise convolution is a matrix product on the input as it lies.
            _products(wmat, x.reshape(n, groups, cg, h * w), y.reshape(n, groups, kg, -1))
            epilogue(y.reshape(n, k, -1))
            return win.drop(y)
        if sh == sw == 1 and (ow >= WIDE_MIN_WIDTH or k <= WIDE_MAX_KERNELS or cg == 1):
            return win.drop(wide_rows(x, y, oh, ow))
        xp = win.padded(x, 0.0, oh, ow)
        s_n, s_c, s_h, s_w = xp.strides
        # Every window of every image, without a copy: [group, cg, kh, kw, n, oh, ow].
        windows = as_strided(
            xp,
            (groups, cg, kh, kw, n, oh, ow),
            (s_c * cg, s_c, s_h * dh, s_w * dw, s_n, s_h * sh, s_w * sw),
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
        flat = np.zeros(n * c * hp * wp + (kw - 1) * dw, np.float32)
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

    return run


# Winograd's F(2×2, 3×3): a 3×3 convolution computes each 2×2 output tile from a 4×4
# input tile with 16 multiplications per channel pair instead of 36 (Lavin & Gray, 2015).
# Its transforms cost memory passes that only pay off with enough channels and a map
# large enough (measured on this project's 2-core machine; see the README's Speed).
WINOGRAD_MIN_CHANNELS = 128
WINOGRAD_MIN_PIXELS = 28 * 28
_WINOGRAD_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])


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


def _winograd(node: Node, win: Window, weight: np.ndarray) -> Kernel:
    """A 3×3, stride 1 convolution by Winograd's F(2×2, 3×3), in blocks of tile rows."""
    k, c = weight.shape[:2]
    g = _WINOGRAD_G
    # The kernel transform G·w·Gᵀ, once, in float64: [16 (4×4 positions), k, c].
    transformed = np.einsum("ai,kcij,bj->abkc", g, weight.astype(np.float64), g)
    u = np.ascontiguousarray(transformed.reshape(16, k, c), dtype=np.float32)
    finish = _channel_epilogue(node)
    top, left, bottom, right = win.pads

    def run(x: np.ndarray) -> np.ndarray:
        n, _, h, w = x.shape
        oh, ow = h + top + bottom - 2, w + left + right - 2
        th, tw = (oh + 1) // 2, (ow + 1) // 2
        xp = np.zeros((n, c, 2 * th + 2, 2 * tw + 2), np.float32)
        _copy_by_channels(
            xp[:, :, top : top + h, left : left + w],
            x[:, :, : 2 * th + 2 - top, : 2 * tw + 2 - left],
        )
        y = np.empty((n, k, 2 * th, 2 * tw), np.float32)
        # A tile row's transformed input and product: 16 values per tile and channel.
        blocks = _row_blocks(16 * max(c, k) * n, th, tw, min(c, k))
        pool = parallel.current()

        def block(i: int, worker: int) -> None:
            first, stop = blocks[i]
            r = stop - first
            t = n * r * tw
            sizes = (4 * n * c * (2 * r + 2) * tw, 16 * c * t, 16 * k * t)
            scratch = pool.scratch(worker, sum(sizes))
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
            finish(rows_out)  # while the rows are in this core's cache

        pool.map(block, len(blocks))
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
        flat = np.zeros((n, c, hp * wp + (kw - 1) * dw), np.float32)
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
        y = np.empty((n, k, *x.shape[2:]), np.float32)
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


# erf by Abramowitz and Stegun's 7.1.26: |error| < 1.5e-7, below float32's resolution of
# the values gelu adds it to (NumPy has no erf, and SciPy is not a dependency).
_ERF_P = 0.3275911
_ERF_A = (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)


def erf(z: np.ndarray) -> np.ndarray:
    """The error function, element-wise, in z's precision (to 1.5e-7)."""
    kind = z.dtype.type
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


def _silu(attrs: dict) -> Activation:
    def run(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return np.multiply(x, _sigmoid(x), out=out)

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
        return np.multiply(x, gate(x), out=out)

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
        return np.multiply(x, gate, out=out)

    return run


def _mish(attrs: dict) -> Activation:
    def run(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        gate = np.logaddexp(0, x)
        return np.multiply(x, np.tanh(gate, out=gate), out=out)

    return run


def _elu(attrs: dict) -> Activation:
    alpha = attrs["alpha"]

    def run(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        below = np.expm1(np.minimum(x, 0))
        below *= x.dtype.type(alpha)
        # NaN is not above 0: it takes the lower branch, which keeps it NaN.
        if out is None:
            return np.where(x > 0, x, below)
        np.copyto(out, x)
        np.copyto(out, below, where=~(x > 0))
        return out

    return run


def _softplus(attrs: dict) -> Activation:
    beta = attrs["beta"]

    def run(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if beta == 1:
            return np.logaddexp(0, x, out=out)
        y = np.multiply(x, x.dtype.type(beta), out=out)
        np.logaddexp(0, y, out=y)
        y /= x.dtype.type(beta)
        return y

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


def _normalize(x: np.ndarray, out: np.ndarray, epsilon: np.float32) -> None:
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
    variance *= np.float32(1 / x.shape[1])
    variance += epsilon
    np.sqrt(variance, out=variance)
    np.reciprocal(variance, out=variance)
    out *= variance


@kernel("layernorm")
def layernorm(node: Node) -> Kernel:
    axis, epsilon = node.attrs["axis"], np.float32(node.attrs["epsilon"])
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
    groups, epsilon = node.attrs["groups"], np.float32(node.attrs["epsilon"])
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
