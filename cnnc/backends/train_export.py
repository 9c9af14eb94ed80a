"""ONNX export of the training ops (cnnc/ops/train.py): gradients, losses, batch statistics
and optimizer updates, each written as standard ONNX ops that an inference build of
onnxruntime runs.

ONNX's own answers for training (TrainingInfoProto, the preview Gradient op of domain
ai.onnx.preview.training) are not run by onnxruntime's inference builds, and most tools
ignore them. cnnc needs neither: its training step is an ordinary graph (the gradient was
built at compile time, by cnnc/train/autodiff.py), so each of its ops has a plain form:

- conv_grad_weight: a Conv of the input by the output gradient, batch and channels
  swapped (the forward stride becomes the dilation and the dilation the stride), sliced
  to the kernel;
- maxpool_grad: for windows that tile the map, the output gradient upsampled (Resize) where
  the input is its window's first largest (Equal, and a MaxPool of each position's rank);
  for others MaxPool's Indices output, then ScatterElements(reduction=add) of the output
  gradient into zeros (opset 16);
- activation_grad: the derivative in element-wise ops;
- bn_train, bn_grad: ReduceMean and ReduceSum over every axis but the channels;
- softmax_cross_entropy: SoftmaxCrossEntropyLoss; its gradient Softmax minus one at
  each label (GatherElements, ScatterElements), over the batch size;
- sgd_update, adam_update: torch.optim's arithmetic, Pow for Adam's bias corrections.

Every value an emitter adds is named ``<node>.<what>``; the node computing an IR output
carries the IR node's name.
"""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from cnnc.backends.onnx_export import Emitter, _names, affine_statistics, emitter
from cnnc.errors import UsageError
from cnnc.ir.graph import Node, Value

# ScatterElements with reduction=add (the max-pool gradient) is opset 16's.
TRAIN_MIN_OPSET = 16


def check_training_opset(opset: int) -> None:
    """Raise UsageError if a training step cannot be written at ``opset``."""
    if opset < TRAIN_MIN_OPSET:
        raise UsageError(
            f"a training step needs ONNX opset {TRAIN_MIN_OPSET} or newer "
            f"(ScatterElements with reduction=add, for the max-pool gradient), got {opset}",
            hint=f"use --opset 17 (the default) or another from {TRAIN_MIN_OPSET} up",
        )


class _Ops:
    """Emits the ONNX nodes of one IR node: each value added is ``<node>.<what>`` (made
    unique), computed by a node of the same name; constants take the node's float type."""

    def __init__(self, e: Emitter, node: Node, like: Value | None = None):
        check_training_opset(e.opset)
        self.e, self.node = e, node
        self.dtype = (like or node.inputs[0]).type.numpy_dtype
        self._scalars: dict[tuple[str, float], str] = {}

    def __call__(self, op: str, inputs: list[str], what: str, **attrs) -> str:
        """Add ``op`` computing one value; ``what`` is its suffix, or ``=name`` to compute
        the IR value ``name`` (the node then takes the IR node's name if it is free)."""
        return self.multi(op, inputs, [what], **attrs)[0]

    def multi(self, op: str, inputs: list[str], whats: list[str], **attrs) -> list[str]:
        outs = [
            w[1:] if w.startswith("=") else self.e.fresh(f"{self.node.name}.{w}") for w in whats
        ]
        final = whats[0].startswith("=")
        name = self.node.name if final and self.node.name not in self.e.node_names else outs[0]
        self.e.node(op, inputs, outs, name, **attrs)
        return outs

    def scalar(self, what: str, value: float) -> str:
        """A scalar initializer of the node's float type (one per name and value)."""
        key = (what, float(value))
        if key not in self._scalars:
            array = np.array(value, self.dtype)
            self._scalars[key] = self.e.constant(f"{self.node.name}.{what}", array)
        return self._scalars[key]

    def ints(self, what: str, values) -> str:
        """A 1-D int64 initializer (axes, shapes, slice bounds)."""
        return self.e.constant(f"{self.node.name}.{what}", np.array(list(values), np.int64))

    def cast(self, x: str, what: str) -> str:
        """``x`` converted to the node's float type."""
        to = helper.np_dtype_to_tensor_dtype(np.dtype(self.dtype))
        return self(op="Cast", inputs=[x], what=what, to=to)

    def reduce(self, op: str, x: str, axes, keepdims: bool, what: str) -> str:
        """ReduceSum or ReduceMean over ``axes``: axes as an input from the opset that has
        it (13 for ReduceSum, 18 for ReduceMean), an attribute before."""
        axes = list(axes)
        since = 13 if op == "ReduceSum" else 18
        if self.e.opset >= since:
            return self(op, [x, self.ints(f"{what}_axes", axes)], what, keepdims=int(keepdims))
        return self(op, [x], what, axes=axes, keepdims=int(keepdims))

    def count(self, x: Value, what: str = "count") -> str:
        """The number of items per channel of ``x`` (all axes but 1) as a float scalar,
        computed at run time (the batch size is not known before)."""
        size = self.cast(self("Size", [x.name], f"{what}_size"), f"{what}_all")
        return self("Div", [size, self.scalar("channels", x.type.shape[1])], what)

    def per_channel(self, v: str, rank: int, what: str) -> str:
        """A [C] vector shaped [C, 1, ...] to broadcast against an N×C×... map."""
        if rank <= 2:
            return v
        return self("Reshape", [v, self.ints(f"{what}_shape", [-1, *[1] * (rank - 2)])], what)


def _static(node: Node, dims) -> list[int]:
    if not all(isinstance(d, int) for d in dims):
        raise UsageError(
            f"node {node.name}: {node.op} needs fixed spatial sizes, got {list(dims)}", node.loc
        )
    return list(dims)


# ---- convolution ------------------------------------------------------------------------------


# Kernels of up to this many taps take the im2col form of conv_grad_weight; larger ones the
# swapped Conv. Measured in onnxruntime 1.32 on 2 threads of a busy machine, im2col against
# swapped Conv: 3×3 at 64 channels on 56×56, batch 2: 15 against 36 ms; 128 channels on
# 28×28, batch 8: 53 against 158 ms; LeNet's 5×5 on 28×28, batch 64: 15 against 2 ms;
# ResNet's 7×7 stem: 13 against 14 ms.
IM2COL_MAX_TAPS = 9


@emitter("conv_grad_weight")
def _conv_grad_weight(e: Emitter, node: Node) -> None:
    """dw[o, c, k] = Σ_n Σ_p dy[n, o, p] · x_padded[n, c, p·stride + k·dilation]: for small
    kernels, the columns of x (each tap's pixels, by a Conv with one-hot weights) times dy
    as a MatMul per item, summed over the batch; for larger ones, a Conv whose batch is
    x's channels within a group and whose input channels are the batch, by dy with batch
    and channels swapped, its stride and dilation exchanged."""
    ops = _Ops(e, node)
    x, dy = node.inputs
    a = node.attrs
    kernel, stride, dilation, pads = (list(a[k]) for k in ("kernel", "stride", "dilation", "pads"))
    spatial = _static(node, x.shape[2:])
    out_spatial = _static(node, dy.shape[2:])
    if np.prod(kernel) <= IM2COL_MAX_TAPS:
        _conv_grad_weight_im2col(ops, x, dy, kernel, stride, dilation, pads, a["groups"])
        return
    groups = a["groups"]
    rank = len(kernel)
    swap = [1, 0, *range(2, rank + 2)]
    channels = x.shape[1]
    if groups == 1:
        xt = ops("Transpose", [x.name], "x_t", perm=swap)  # [C, N, ...]
    else:
        per_group = channels // groups
        split = ops.ints("x_groups_shape", [0, groups, per_group, *spatial])
        grouped = ops("Reshape", [x.name, split], "x_groups")  # [N, g, C/g, ...]
        moved = ops("Transpose", [grouped], "x_groups_t", perm=[2, 1, 0, *range(3, rank + 3)])
        merged = ops.ints("x_t_shape", [per_group, -1, *spatial])
        xt = ops("Reshape", [moved, merged], "x_t")  # [C/g, g·N, ...]
    dyt = ops("Transpose", [dy.name], "dy_t", perm=swap)  # [O, N, ...]
    # The Conv's output is at least the kernel: the forward's last window may leave pixels
    # of x (and of its padding) unread, which give the extra positions.
    full = [
        (n + pads[i] + pads[i + rank] - stride[i] * (o - 1) - 1) // dilation[i] + 1
        for i, (n, o) in enumerate(zip(spatial, out_spatial, strict=True))
    ]
    conv_attrs = {"strides": dilation, "pads": pads, "group": groups}
    if any(s != 1 for s in stride):
        conv_attrs["dilations"] = stride
    product = ops("Conv", [xt, dyt], "product", **conv_attrs)  # [C/g, O, k'...]
    if full != kernel:
        product = ops(
            "Slice",
            [
                product,
                ops.ints("starts", [0] * rank),
                ops.ints("ends", kernel),
                ops.ints("axes", range(2, rank + 2)),
            ],
            "kernel",
        )
    ops("Transpose", [product], f"={node.output.name}", perm=swap)


def _conv_grad_weight_im2col(ops: _Ops, x, dy, kernel, stride, dilation, pads, groups) -> None:
    """The columns of x, [N, C·taps, positions], by a depthwise Conv whose weights pick one
    tap each (initializer ``<node>.taps``, [C·taps, 1, k...], shared by every node of the
    same channels and kernel), times dy's [positions, O/g] per group.

    Where dy has more channels than positions per item (ResNet-18's 512 channels of 7×7),
    the columns move once, to [g, C/g·taps, N·positions], and one MatMul per group sums over
    the items and positions together; elsewhere a MatMul per item and group, whose products
    [N, g, C/g·taps, O/g] are summed over the items (moving the columns would cost more than
    the sum). Measured in onnxruntime 1.32 on 2 threads, batch 8, ResNet-18's 3×3 convolutions,
    moved against summed: 512 channels of 7×7 10.7 against 17.3 ms, 512 of 7×7 from 14×14 at
    stride 2 5.3 against 9.2 ms, 256 of 14×14 11.3 against 11.8 ms; 64 of 56×56 23.9 against
    15.1 ms."""
    channels, out = x.shape[1], dy.shape[1]
    taps = int(np.prod(kernel))
    # One initializer per channel count and kernel, shared by the nodes that need it.
    shared = ops.e.__dict__.setdefault("_tap_weights", {})
    key = (channels, tuple(kernel), np.dtype(ops.dtype).str)
    if key not in shared:
        pick = np.zeros((channels, taps, taps), ops.dtype)
        pick[:, np.arange(taps), np.arange(taps)] = 1
        shape = (channels * taps, 1, *kernel)
        shared[key] = ops.e.constant(f"{ops.node.name}.taps", pick.reshape(shape))
    weights = shared[key]
    attrs = {"strides": stride, "pads": pads, "group": channels}
    if any(d != 1 for d in dilation):
        attrs["dilations"] = dilation
    columns = ops("Conv", [x.name, weights], "columns", **attrs)  # [N, C·taps, oh, ow]
    per_group = channels // groups
    columns = ops(
        "Reshape",
        [columns, ops.ints("columns_shape", [0, groups, per_group * taps, -1])],
        "columns_g",
    )  # [N, g, C/g·taps, P]
    grads = ops("Reshape", [dy.name, ops.ints("dy_shape", [0, groups, out // groups, -1])], "dy_g")
    shape = ops.ints("weight_shape", [out, per_group, *kernel])
    if out > int(np.prod(dy.shape[2:])):
        to_groups = [1, 2, 0, 3]  # [N, g, rows, P] -> [g, rows, N, P]
        merged = ops.ints("merged_shape", [groups, 0, -1])
        columns = ops("Transpose", [columns], "columns_t", perm=to_groups)
        columns = ops("Reshape", [columns, merged], "columns_m")  # [g, C/g·taps, N·P]
        grads = ops("Transpose", [grads], "dy_t", perm=to_groups)
        grads = ops("Reshape", [grads, merged], "dy_m")  # [g, O/g, N·P]
        columns = ops("Transpose", [columns], "columns_mt", perm=[0, 2, 1])
        product = ops("MatMul", [grads, columns], "product")  # [g, O/g, C/g·taps]
        ops("Reshape", [product, shape], f"={ops.node.output.name}")
        return
    grads = ops("Transpose", [grads], "dy_t", perm=[0, 1, 3, 2])  # [N, g, P, O/g]
    product = ops("MatMul", [columns, grads], "product")  # [N, g, C/g·taps, O/g]
    summed = ops.reduce("ReduceSum", product, [0], False, "summed")  # [g, C/g·taps, O/g]
    moved = ops("Transpose", [summed], "summed_t", perm=[0, 2, 1])  # [g, O/g, C/g·taps]
    ops("Reshape", [moved, shape], f"={ops.node.output.name}")


@emitter("reduce_sum")
def _reduce_sum(e: Emitter, node: Node) -> None:
    ops = _Ops(e, node)
    ops.reduce(
        "ReduceSum",
        node.inputs[0].name,
        node.attrs["axes"],
        node.attrs["keepdims"],
        f"={node.output.name}",
    )


@emitter("matmul")
def _matmul(e: Emitter, node: Node) -> None:
    a = node.attrs
    e.node(
        "Gemm",
        _names(node.inputs),
        _names(node.outputs),
        node.name,
        transA=int(a["trans_a"]) or None,
        transB=int(a["trans_b"]) or None,
    )


# ---- pooling ----------------------------------------------------------------------------------


@emitter("maxpool_grad")
def _maxpool_grad(e: Emitter, node: Node) -> None:
    """Pools whose windows tile the map take the mask form (:func:`_maxpool_grad_tiled`);
    others MaxPool's Indices output (onnxruntime's, like the interpreter's, the first
    largest input of each window in row-major order, padding never chosen), a position in
    the flattened input, where ScatterElements adds each window's gradient into zeros.

    Why not a form without MaxPool's Indices (onnxruntime computes them without its fast
    NCHWc kernel: about 2.5 ns a tap, against 0.1 for the plain MaxPool)? The best other
    form measured (onnxruntime 1.32, 2 threads, both forms interleaved in one process,
    their nodes' times added up) takes the taps of every window by one depthwise Conv with
    one-hot weights, -inf added at the padding's taps, ArgMax over the taps (the first
    largest), GatherElements of a constant tap-to-position table and the same
    ScatterElements: 0.81 to 0.94 of this form's time on ResNet's stem pool (3×3, stride 2,
    pad 1, 8×64×112×112), 0.90 to 0.99 on a 3×3, stride 1, pad 1 pool of 8×192×28×28, and
    0.77 to 1.05 in ResNet-18's training step at batch 8 (three runs each); the Conv, the
    ArgMax and the ScatterElements each cost about what the Indices did. And its Conv
    multiplies each window's inputs by 0, so one -inf input (a pad by -inf that fuse-pad
    leaves before a ceil-mode pool) turns its window's other taps to NaN and sends the
    gradient to the first tap; clamping the input first would take most of the gain.
    Slower still: one-hot taps scattered back by ConvTranspose (18 ms on the stem pool,
    against 9 to 14 for ScatterElements), Slices with steps for each tap (about 4 ms a
    tap), DepthToSpace to interleave phases (30 ms), TopK for ArgMax, Gather for
    GatherElements (5 against 2 ms); MaxPools of each row-major prefix of the window
    cannot be had, onnxruntime wanting pads smaller than the kernel."""
    ops = _Ops(e, node)
    x, dy = node.inputs
    a = node.attrs
    attrs = {
        "kernel_shape": list(a["kernel"]),
        "strides": list(a["stride"]),
        "pads": list(a["pads"]),
        "ceil_mode": int(a["ceil"]),
    }
    if any(d != 1 for d in a["dilation"]):
        attrs["dilations"] = list(a["dilation"])
    if _tiles(node):
        _maxpool_grad_tiled(ops, x, dy, attrs)
        return
    _, indices = ops.multi("MaxPool", [x.name], ["pooled", "indices"], **attrs)
    flat = ops.ints("flat", [-1])
    shape = ops("Shape", [x.name], "shape")
    zero = numpy_helper.from_array(np.zeros(1, ops.dtype))
    zeros = ops("ConstantOfShape", [shape], "zeros", value=zero)
    zeros = ops("Reshape", [zeros, flat], "zeros_flat")
    scattered = ops(
        "ScatterElements",
        [
            zeros,
            ops("Reshape", [indices, flat], "indices_flat"),
            ops("Reshape", [dy.name, flat], "dy_flat"),
        ],
        "scattered",
        axis=0,
        reduction="add",
    )
    ops("Reshape", [scattered, shape], f"={node.output.name}")


def _tiles(node: Node) -> bool:
    """Whether a maxpool_grad's windows tile its float32 or float16 input: stride equal to
    the kernel, no padding or dilation, every spatial size a multiple of the kernel (so
    that ceil mode changes nothing). onnxruntime has no float64 Resize."""
    a = node.attrs
    x = node.inputs[0]
    sizes = zip(x.shape[2:], a["kernel"], strict=True)
    return (
        x.type.numpy_dtype in (np.float32, np.float16)
        and tuple(a["stride"]) == tuple(a["kernel"])
        and not any(a["pads"])
        and all(d == 1 for d in a["dilation"])
        and all(isinstance(n, int) and n % k == 0 for n, k in sizes)
    )


def _maxpool_grad_tiled(ops: _Ops, x: Value, dy: Value, attrs: dict) -> None:
    """dx = up(dy) where x is its window's first largest input, 0 elsewhere, ``up`` a
    nearest Resize by the kernel. The largest inputs are where x equals up(MaxPool(x)) (the
    MaxPool the forward pass has, which onnxruntime computes once); each of them scores
    its rank from the end of the window in row-major order (K … 1, a constant), and a
    second MaxPool finds the best score, the first largest: PyTorch's choice among ties.
    onnxruntime's MaxPool with Indices, then ScatterElements, take about twice as long
    (LeNet-5's first pool at batch 64 on 2 threads, its nodes' times added up: 3.2 against
    1.6 ms)."""
    kernel = attrs["kernel_shape"]
    spatial = list(x.shape[2:])
    scales = ops.e.constant(f"{ops.node.name}.scales", np.array([1, 1, *kernel], np.float32))

    def up(v: str, what: str) -> str:
        return ops(
            "Resize",
            [v, "", scales],
            what,
            mode="nearest",
            nearest_mode="floor",
            coordinate_transformation_mode="asymmetric",
        )

    taps = int(np.prod(kernel))
    window = (taps - np.arange(taps)).reshape(kernel)
    order = np.tile(window, [n // k for n, k in zip(spatial, kernel, strict=True)])
    order = order.reshape(1, 1, *spatial).astype(ops.dtype)
    order = ops.e.constant(f"{ops.node.name}.order", order)
    pooled = ops("MaxPool", [x.name], "pooled", **attrs)
    largest = ops("Equal", [x.name, up(pooled, "pooled_up")], "largest")
    score = ops("Mul", [ops.cast(largest, "largest_f"), order], "score")
    best = ops("MaxPool", [score], "best", **attrs)
    # A window of NaNs has no largest input (best 0) and no gradient: no order is 0.
    first = ops.cast(ops("Equal", [order, up(best, "best_up")], "first"), "first_f")
    ops("Mul", [first, up(dy.name, "dy_up")], f"={ops.node.output.name}")


# ---- element-wise -----------------------------------------------------------------------------


def _derivative(ops: _Ops, op: str, attrs: dict, x: str) -> str:
    """f'(x) of element-wise op ``op`` (the interpreter's train_kernels._derivative)."""

    def c(what: str, value: float) -> str:
        return ops.scalar(what, value)

    def where(cond: str, a: str, b: str, what: str) -> str:
        return ops("Where", [cond, a, b], what)

    if op == "relu":
        return ops.cast(ops("Greater", [x, c("zero", 0.0)], "positive"), "derivative")
    if op == "leaky_relu":
        positive = ops("Greater", [x, c("zero", 0.0)], "positive")
        return where(positive, c("one", 1.0), c("alpha", attrs["alpha"]), "derivative")
    if op == "clip":
        above = ops("GreaterOrEqual", [x, c("min", attrs["min"])], "above_min")
        below = ops("LessOrEqual", [x, c("max", attrs["max"])], "below_max")
        return ops.cast(ops("And", [above, below], "inside"), "derivative")
    if op in ("sigmoid", "silu"):
        s = ops("Sigmoid", [x], "sigmoid")
        one_minus = ops("Sub", [c("one", 1.0), s], "one_minus")
        if op == "sigmoid":
            return ops("Mul", [s, one_minus], "derivative")
        inner = ops("Add", [c("one", 1.0), ops("Mul", [x, one_minus], "x_1ms")], "inner")
        return ops("Mul", [s, inner], "derivative")
    if op == "tanh":
        t = ops("Tanh", [x], "tanh")
        return ops("Sub", [c("one", 1.0), ops("Mul", [t, t], "tanh2")], "derivative")
    if op == "hardsigmoid":
        ax = ops("Mul", [c("alpha", attrs["alpha"]), x], "ax")
        z = ops("Add", [ax, c("beta", attrs["beta"])], "z")
        inside = ops(
            "And",
            [
                ops("Greater", [z, c("zero", 0.0)], "z_pos"),
                ops("Less", [z, c("one", 1.0)], "z_lt1"),
            ],
            "inside",
        )
        return where(inside, c("alpha", attrs["alpha"]), c("zero", 0.0), "derivative")
    if op == "hardswish":
        middle = ops("Add", [ops("Div", [x, c("three", 3.0)], "x3"), c("half", 0.5)], "middle")
        upper = where(ops("LessOrEqual", [x, c("three", 3.0)], "le3"), middle, c("one", 1.0), "up")
        low = ops("Less", [x, c("minus_three", -3.0)], "lt_m3")
        return where(low, c("zero", 0.0), upper, "derivative")
    if op == "gelu":
        if attrs["approximate"] == "tanh":
            k = float(np.sqrt(2 / np.pi))
            x2 = ops("Mul", [x, x], "x2")
            x3 = ops("Mul", [x2, x], "x3")
            u = ops("Add", [x, ops("Mul", [c("k3", 0.044715), x3], "kx3")], "u")
            t = ops("Tanh", [ops("Mul", [c("k", k), u], "ku")], "t")
            first = ops("Mul", [c("half", 0.5), ops("Add", [c("one", 1.0), t], "1pt")], "first")
            sech2 = ops("Sub", [c("one", 1.0), ops("Mul", [t, t], "t2")], "sech2")
            du = ops(
                "Add", [c("one", 1.0), ops("Mul", [c("k3x3", 3 * 0.044715), x2], "3kx2")], "du"
            )
            second = ops("Mul", [ops("Mul", [c("half", 0.5), x], "hx"), sech2], "hx_sech2")
            second = ops("Mul", [ops("Mul", [second, c("k", k)], "hx_sech2_k"), du], "second")
            return ops("Add", [first, second], "derivative")
        erf = ops("Erf", [ops("Div", [x, c("sqrt2", float(np.sqrt(2.0)))], "x_sqrt2")], "erf")
        cdf = ops("Mul", [c("half", 0.5), ops("Add", [c("one", 1.0), erf], "1perf")], "cdf")
        x2 = ops("Mul", [x, x], "x2")
        gauss = ops("Exp", [ops("Mul", [c("minus_half", -0.5), x2], "mhx2")], "gauss")
        pdf = ops(
            "Div", [ops("Mul", [x, gauss], "xg"), c("sqrt2pi", float(np.sqrt(2 * np.pi)))], "xpdf"
        )
        return ops("Add", [cdf, pdf], "derivative")
    if op == "mish":
        t = ops("Tanh", [ops("Softplus", [x], "softplus")], "t")
        sech2 = ops("Sub", [c("one", 1.0), ops("Mul", [t, t], "t2")], "sech2")
        tail = ops("Mul", [ops("Mul", [x, sech2], "x_sech2"), ops("Sigmoid", [x], "s")], "tail")
        return ops("Add", [t, tail], "derivative")
    if op == "elu":
        negative = ops("Min", [x, c("zero", 0.0)], "negative")
        scaled = ops("Mul", [c("alpha", attrs["alpha"]), ops("Exp", [negative], "exp")], "aexp")
        positive = ops("Greater", [x, c("zero", 0.0)], "positive")
        return where(positive, c("one", 1.0), scaled, "derivative")
    if op == "softplus":
        return ops("Sigmoid", [ops("Mul", [c("beta", attrs["beta"]), x], "bx")], "derivative")
    raise UsageError(f"node {ops.node.name}: no ONNX form of the derivative of {op}", ops.node.loc)


@emitter("activation_grad")
def _activation_grad(e: Emitter, node: Node) -> None:
    ops = _Ops(e, node)
    x, dy = node.inputs
    a = node.attrs
    derivative = _derivative(ops, a["activation"], a["activation_attrs"], x.name)
    ops("Mul", [dy.name, derivative], f"={node.output.name}")


# ---- losses -----------------------------------------------------------------------------------


@emitter("softmax_cross_entropy")
def _softmax_cross_entropy(e: Emitter, node: Node) -> None:
    _Ops(e, node)  # the opset check
    e.node(
        "SoftmaxCrossEntropyLoss",
        _names(node.inputs),
        _names(node.outputs),
        node.name,
        reduction="mean",
    )


@emitter("softmax_cross_entropy_grad")
def _softmax_cross_entropy_grad(e: Emitter, node: Node) -> None:
    """(softmax(logits) − one_hot(labels)) / N: one less at each label (GatherElements,
    ScatterElements), divided by the batch size."""
    ops = _Ops(e, node)
    logits, labels = node.inputs
    p = ops("Softmax", [logits.name], "softmax", axis=1)
    at = ops("Unsqueeze", [labels.name, ops.ints("label_axis", [1])], "label_index")
    picked = ops("GatherElements", [p, at], "picked", axis=1)
    less = ops("Sub", [picked, ops.scalar("one", 1.0)], "picked_1")
    d = ops("ScatterElements", [p, at, less], "difference", axis=1)
    batch = ops.cast(ops("Shape", [labels.name], "batch_1d"), "batch")
    ops("Div", [d, batch], f"={node.output.name}")


@emitter("mse_loss")
def _mse_loss(e: Emitter, node: Node) -> None:
    ops = _Ops(e, node)
    pred, target = node.inputs
    d = ops("Sub", [pred.name, target.name], "difference")
    square = ops("Mul", [d, d], "square")
    # Every axis: no axes given (an attribute or an input, at any opset).
    ops("ReduceMean", [square], f"={node.output.name}", keepdims=0)


@emitter("mse_loss_grad")
def _mse_loss_grad(e: Emitter, node: Node) -> None:
    ops = _Ops(e, node)
    pred, target = node.inputs
    d = ops("Sub", [pred.name, target.name], "difference")
    size = ops.cast(ops("Size", [pred.name], "count_int"), "count")
    factor = ops("Div", [ops.scalar("two", 2.0), size], "factor")
    ops("Mul", [d, factor], f"={node.output.name}")


# ---- batch norm -------------------------------------------------------------------------------


def _channel_affine(ops: _Ops, x: str, scale: str, shift: str, channels: int, what: str) -> str:
    """x·scale + shift per channel ([C] vectors) as one BatchNormalization of mean 0 and
    variance 1 (the exporter's form of an affine): one node where Mul and Add are two, in
    the same time (ResNet-18's first block at batch 8: 0.69 against 0.72 ms)."""
    zeros, ones = affine_statistics(ops.e, channels, ops.dtype)
    return ops("BatchNormalization", [x, scale, shift, zeros, ones], what, epsilon=0.0)


@emitter("bn_train")
def _bn_train(e: Emitter, node: Node) -> None:
    """Batch norm in training mode: the batch's mean and biased variance over every axis
    but the channels normalise; the running statistics move towards the mean and the
    unbiased variance (× count / (count − 1), the count at least 2)."""
    ops = _Ops(e, node)
    x, weight, bias, running_mean, running_var = node.inputs
    rank = x.type.rank
    axes = [0, *range(2, rank)]
    y, mean_out, invstd_out, new_mean, new_var = (f"={v.name}" for v in node.outputs)
    mean = ops.reduce("ReduceMean", x.name, axes, True, "mean_c")
    centred = ops("Sub", [x.name, mean], "centred")
    # bn_grad of the same x and mean reads this instead of subtracting again.
    e.__dict__.setdefault("_bn_centred", {})[x.name, node.outputs[1].name] = centred
    var = ops.reduce("ReduceMean", ops("Mul", [centred, centred], "square"), axes, True, "var_c")
    shifted = ops("Add", [var, ops.scalar("epsilon", node.attrs["epsilon"])], "var_eps")
    invstd = ops("Div", [ops.scalar("one", 1.0), ops("Sqrt", [shifted], "std")], "invstd_c")
    flat = ops.ints("flat", [-1])
    scale = ops("Mul", [invstd, ops.per_channel(weight.name, rank, "weight_c")], "scale")
    scaled = ops("Mul", [centred, scale], "scaled")
    ops("Add", [scaled, ops.per_channel(bias.name, rank, "bias_c")], y)
    mean_flat = ops("Reshape", [mean, flat], mean_out)
    ops("Reshape", [invstd, flat], invstd_out)
    var_flat = ops("Reshape", [var, flat], "var")
    count = ops.count(x)
    less = ops(
        "Max",
        [ops("Sub", [count, ops.scalar("one", 1.0)], "count_1"), ops.scalar("one", 1.0)],
        "dof",
    )
    unbiased = ops("Mul", [var_flat, ops("Div", [count, less], "correction")], "unbiased")
    m = node.attrs["momentum"]
    keep, take = ops.scalar("keep", 1 - m), ops.scalar("momentum", m)
    for old, new, value, what in (
        (running_mean, new_mean, mean_flat, "mean"),
        (running_var, new_var, unbiased, "var"),
    ):
        kept = ops("Mul", [keep, old.name], f"kept_{what}")
        ops("Add", [kept, ops("Mul", [take, value], f"taken_{what}")], new)


@emitter("bn_grad")
def _bn_grad(e: Emitter, node: Node) -> None:
    """dx = a·dy − a·invstd·dweight/n·(x − mean) − a·dbias/n with a = weight·invstd, n the
    count per channel: the last two terms, per-channel coefficients of x − mean, are one
    BatchNormalization; dweight = invstd·Σ dy·(x − mean), x − mean the forward pass's where
    it is in the same graph. Six passes over the maps where the interpreter's order of
    operations (xhat first) takes ten."""
    ops = _Ops(e, node)
    x, weight, mean, invstd, dy = node.inputs
    rank = x.type.rank
    axes = [0, *range(2, rank)]
    dx, dweight, dbias = (f"={v.name}" for v in node.outputs)
    centred = e.__dict__.get("_bn_centred", {}).get((x.name, mean.name))
    if centred is None:  # a bn_grad whose bn_train is not in this graph
        centred = ops("Sub", [x.name, ops.per_channel(mean.name, rank, "mean_c")], "centred")
    db = ops.reduce("ReduceSum", dy.name, axes, False, dbias)
    products = ops.reduce(
        "ReduceSum", ops("Mul", [dy.name, centred], "dy_centred"), axes, False, "products"
    )
    dw = ops("Mul", [products, invstd.name], dweight)
    count = ops.count(x)
    a = ops("Mul", [weight.name, invstd.name], "w_invstd")
    a_n = ops("Div", [a, count], "w_invstd_n")
    slope = ops("Neg", [ops("Mul", [ops("Mul", [a_n, invstd.name], "a_invstd"), dw], "c")], "slope")
    offset = ops("Neg", [ops("Mul", [a_n, db], "a_db")], "offset")
    rest = _channel_affine(ops, centred, slope, offset, x.shape[1], "rest")
    scaled = ops("Mul", [dy.name, ops.per_channel(a, rank, "w_invstd_c")], "dy_scaled")
    ops("Add", [scaled, rest], dx)


# ---- optimizers -------------------------------------------------------------------------------


def _learning_rate(ops: _Ops, lr: Value) -> str:
    """The learning rate in the parameter's float type."""
    if lr.type.numpy_dtype == ops.dtype:
        return lr.name
    return ops.cast(lr.name, "lr")


@emitter("sgd_update")
def _sgd_update(e: Emitter, node: Node) -> None:
    """torch.optim.SGD: g = grad + weight_decay·param; buf' = momentum·buf +
    (1 − dampening)·g; param' = param − lr·(g + momentum·buf' if nesterov else buf')."""
    ops = _Ops(e, node)
    param, grad, lr = node.inputs[:3]
    a = node.attrs
    g = grad.name
    if a["weight_decay"]:
        decay = ops("Mul", [ops.scalar("weight_decay", a["weight_decay"]), param.name], "decay")
        g = ops("Add", [g, decay], "g")
    lr = _learning_rate(ops, lr)
    new_param = f"={node.outputs[0].name}"
    if not a["momentum"]:
        ops("Sub", [param.name, ops("Mul", [lr, g], "step")], new_param)
        return
    momentum = ops.scalar("momentum", a["momentum"])
    kept = ops("Mul", [momentum, node.inputs[3].name], "kept")
    fresh = g
    if a["dampening"]:
        fresh = ops("Mul", [ops.scalar("undamped", 1 - a["dampening"]), g], "fresh")
    buf = ops("Add", [kept, fresh], f"={node.outputs[1].name}")
    direction = buf
    if a["nesterov"]:
        direction = ops("Add", [g, ops("Mul", [momentum, buf], "ahead")], "direction")
    ops("Sub", [param.name, ops("Mul", [lr, direction], "step")], new_param)


@emitter("adam_update")
def _adam_update(e: Emitter, node: Node) -> None:
    """torch.optim.Adam and AdamW: m' = β1·m + (1 − β1)·g, v' = β2·v + (1 − β2)·g²,
    param' = param − lr / (1 − β1^t) · m' / (√v' / √(1 − β2^t) + eps), the weight decay
    added to g (Adam) or taken from param first (AdamW, param·(1 − lr·decay))."""
    ops = _Ops(e, node)
    param, grad, m, v, step, lr = node.inputs
    a = node.attrs
    p, g = param.name, grad.name
    lr = _learning_rate(ops, lr)
    one = ops.scalar("one", 1.0)
    decay = a["weight_decay"]
    if decay and a["decoupled"]:
        shrink = ops(
            "Sub", [one, ops("Mul", [lr, ops.scalar("weight_decay", decay)], "lr_decay")], "shrink"
        )
        p = ops("Mul", [p, shrink], "decayed")
    elif decay:
        g = ops("Add", [g, ops("Mul", [ops.scalar("weight_decay", decay), p], "decay")], "g")
    new_param, new_m, new_v = (f"={o.name}" for o in node.outputs)
    b1, b2 = a["beta1"], a["beta2"]
    m2 = ops(
        "Add",
        [
            ops("Mul", [ops.scalar("beta1", b1), m.name], "m_kept"),
            ops("Mul", [ops.scalar("one_minus_beta1", 1 - b1), g], "m_fresh"),
        ],
        new_m,
    )
    g2 = ops("Mul", [g, g], "g2")
    v2 = ops(
        "Add",
        [
            ops("Mul", [ops.scalar("beta2", b2), v.name], "v_kept"),
            ops("Mul", [ops.scalar("one_minus_beta2", 1 - b2), g2], "v_fresh"),
        ],
        new_v,
    )
    n = step.name if step.type.numpy_dtype == ops.dtype else ops.cast(step.name, "step")
    bc1 = ops("Sub", [one, ops("Pow", [ops.scalar("beta1", b1), n], "beta1_t")], "bias_correction1")
    bc2 = ops("Sub", [one, ops("Pow", [ops.scalar("beta2", b2), n], "beta2_t")], "bias_correction2")
    denom = ops("Div", [ops("Sqrt", [v2], "sqrt_v"), ops("Sqrt", [bc2], "sqrt_bc2")], "v_hat")
    denom = ops("Add", [denom, ops.scalar("eps", a["eps"])], "denom")
    size = ops("Div", [lr, bc1], "step_size")
    update = ops("Div", [ops("Mul", [size, m2], "scaled_m"), denom], "update")
    ops("Sub", [p, update], new_param)


# ---- the training step as a model --------------------------------------------------------------


def describe_step(step) -> str:
    """What the exported step's inputs and outputs hold, in order (the model's doc string)."""
    o = step.optimizer
    if o.kind == "sgd":
        settings = f"momentum {o.momentum:g}" + (", nesterov" if o.nesterov else "")
        settings += f", dampening {o.dampening:g}" if o.dampening else ""
    else:
        settings = f"betas {o.betas[0]:g},{o.betas[1]:g}, eps {o.eps:g}"
    settings += f", weight decay {o.weight_decay:g}" if o.weight_decay else ""
    inputs = [
        f"{len(step.params)} parameters",
        *([f"{len(step.statistics)} running statistics"] if step.statistics else []),
        *([f"{len(step.optimizer_state)} optimizer state tensors"] if step.optimizer_state else []),
        *step.data,
        step.target,
        step.lr,
        *(m.name for m in step.masks),
    ]
    outputs = [v.name for v in step.graph.outputs[len(step.state) :]]
    return (
        f"one training step of network {step.forward.name}: {step.loss} loss, "
        f"{o.kind} ({settings}); inputs: {', '.join(inputs)}; outputs: the new value of "
        f"each state input (<name>.new, in the inputs' order), then {', '.join(outputs)}"
    )


def _annotate(model, step) -> None:
    from cnnc import __version__

    model.doc_string = f"{describe_step(step)}; compiled by cnnc {__version__}"
    helper.set_model_props(
        model,
        {
            "cnnc.train.state": ",".join(step.state),
            "cnnc.train.loss": step.loss,
            "cnnc.train.optimizer": step.optimizer.kind,
        },
    )


def step_to_onnx(step, opset: int | None = None, inline_functions: bool = False):
    """The ONNX model of a training step (not yet checked; :func:`write_step` checks)."""
    from cnnc.backends.onnx_export import DEFAULT_OPSET, to_onnx

    opset = DEFAULT_OPSET if opset is None else opset
    check_training_opset(opset)
    model = to_onnx(step.graph, opset, inline_functions)
    _annotate(model, step)
    return model


def write_step(step, path, opset: int | None = None, inline_functions: bool = False):
    """Check a training step's ONNX model (full_check) and write it to ``path``
    atomically; returns the files written."""
    from cnnc.backends.onnx_export import DEFAULT_OPSET, skeleton, write

    opset = DEFAULT_OPSET if opset is None else opset
    check_training_opset(opset)
    model, tensors = skeleton(step.graph, opset, inline_functions)
    _annotate(model, step)
    return write(model, tensors, path)
