"""The ops of training graphs: gradients, losses, batch statistics and optimizer updates.

No layer of the language makes these: :mod:`cnnc.train.autodiff` builds them from a network
(the graph of one training step). Each is an ordinary IR op with a shape rule, an
interpreter kernel (cnnc/backends/train_kernels.py) and an ONNX export, so the verifier,
the passes, the dump and both backends work on a training step as on any network.
"""

from __future__ import annotations

from math import prod
from typing import Any

from cnnc.errors import ShapeError
from cnnc.ir.types import TensorType
from cnnc.ops.base import OpDef, register_op
from cnnc.ops.common import describe_window


def _same(op: str, a: TensorType, b: TensorType, what: str) -> None:
    if a.shape != b.shape:
        raise ShapeError(f"{op}: {what} {b} does not match {a}")


class ConvGradWeight(OpDef):
    """inputs (x, dy); attrs kernel, stride, pads, dilation, groups of the convolution
    y = conv(x, w): the gradient of a loss with respect to ``w``, [out, C/groups, k...],
    summed over the batch."""

    name = "conv_grad_weight"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        x, dy = inputs
        groups, kernel = attrs["groups"], tuple(attrs["kernel"])
        if x.rank != dy.rank or x.rank != len(kernel) + 2:
            raise ShapeError(f"conv_grad_weight: input {x} and output gradient {dy} do not fit")
        channels, out = x.shape[1], dy.shape[1]
        if channels % groups or out % groups:
            raise ShapeError(f"conv_grad_weight: groups={groups} does not divide {x} and {dy}")
        return [TensorType(x.dtype, (out, channels // groups, *kernel))]

    def macs(self, node) -> int:
        w = node.output.type.shape
        return prod(node.inputs[1].type.shape[1:]) * prod(w[1:])

    def describe(self, node) -> str:
        a = node.attrs
        text = describe_window(tuple(a["kernel"]), a["stride"], a["pads"], a["dilation"])
        return text + (f" g={a['groups']}" if a["groups"] != 1 else "")


class ReduceSum(OpDef):
    """input x; attrs axes (non-negative, sorted) and keepdims: the sum over those axes
    (a bias's gradient, or a broadcast operand's)."""

    name = "reduce_sum"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        (x,) = inputs
        axes = tuple(attrs["axes"])
        if any(not 0 <= a < x.rank for a in axes) or list(axes) != sorted(set(axes)):
            raise ShapeError(f"reduce_sum axes {axes} do not fit {x}")
        if attrs["keepdims"]:
            shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
        else:
            shape = tuple(d for i, d in enumerate(x.shape) if i not in axes)
        return [x.with_shape(shape)]

    def describe(self, node) -> str:
        keep = " keepdims" if node.attrs["keepdims"] else ""
        return f"axes={','.join(map(str, node.attrs['axes']))}{keep}"


class MaxPoolGrad(OpDef):
    """inputs (x, dy); the attributes of the max pooling y = maxpool(x): each window's
    gradient goes to the first of its largest inputs (PyTorch's and onnxruntime's choice),
    and overlapping windows add up."""

    name = "maxpool_grad"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        x, dy = inputs
        if x.rank != dy.rank or x.shape[:2] != dy.shape[:2]:
            raise ShapeError(f"maxpool_grad: input {x} and output gradient {dy} do not fit")
        return [x]

    def describe(self, node) -> str:
        a = node.attrs
        text = describe_window(tuple(a["kernel"]), a["stride"], a["pads"], a["dilation"])
        return text + (" ceil" if a["ceil"] else "")


class ActivationGrad(OpDef):
    """inputs (x, dy); attrs activation (an element-wise op) and activation_attrs:
    dy · f'(x), the gradient through y = f(x)."""

    name = "activation_grad"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        x, dy = inputs
        _same(self.name, x, dy, "output gradient")
        return [x]

    def label(self, node) -> str:
        return f"{node.attrs['activation']}_grad"


class SoftmaxCrossEntropy(OpDef):
    """inputs (logits [N, K], labels i64[N]): the mean over the batch of
    −log softmax(logits)[label] (PyTorch's cross_entropy, ONNX SoftmaxCrossEntropyLoss)."""

    name = "softmax_cross_entropy"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        logits, labels = inputs
        if logits.rank != 2 or labels.rank != 1 or labels.dtype != "i64":
            raise ShapeError(
                f"softmax_cross_entropy needs logits N×K and i64 labels [N], got {logits} "
                f"and {labels}"
            )
        return [TensorType(logits.dtype, ())]


class SoftmaxCrossEntropyGrad(OpDef):
    """inputs (logits [N, K], labels i64[N]): the gradient of the mean cross-entropy,
    (softmax(logits) − one_hot(labels)) / N."""

    name = "softmax_cross_entropy_grad"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        return [inputs[0]]


class MseLoss(OpDef):
    """inputs (prediction, target) of one shape: the mean of the squared differences."""

    name = "mse_loss"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        pred, target = inputs
        _same(self.name, pred, target, "target")
        return [TensorType(pred.dtype, ())]


class MseLossGrad(OpDef):
    """inputs (prediction, target): the gradient of their mean squared difference,
    2 · (prediction − target) / count."""

    name = "mse_loss_grad"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        _same(self.name, inputs[0], inputs[1], "target")
        return [inputs[0]]


class BatchNormTrain(OpDef):
    """inputs (x, weight, bias, running_mean, running_var); attrs epsilon, momentum.
    Batch norm in training mode, as torch.nn.BatchNorm: normalised by the batch's mean and
    biased variance over every axis but 1; outputs (y, mean, invstd, running_mean',
    running_var'), where running_mean' = (1 − momentum)·running_mean + momentum·mean and
    running_var' likewise with the unbiased variance."""

    name = "bn_train"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        x = inputs[0]
        if x.rank < 2:
            raise ShapeError(f"bn_train needs an input with channels N×C…, got {x}")
        channel = TensorType(x.dtype, (x.shape[1],))
        for p in inputs[1:]:
            if p.shape != channel.shape:
                raise ShapeError(f"bn_train parameter {p} does not match {x.shape[1]} channels")
        return [x, channel, channel, channel, channel]

    def describe(self, node) -> str:
        return f"eps={node.attrs['epsilon']:g} momentum={node.attrs['momentum']:g}"


class BatchNormGrad(OpDef):
    """inputs (x, weight, mean, invstd, dy): the gradients (dx, dweight, dbias) of batch
    norm in training mode (the batch statistics depend on x)."""

    name = "bn_grad"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        x, weight, _, _, dy = inputs
        _same(self.name, x, dy, "output gradient")
        return [x, weight, weight]


class MatMul(OpDef):
    """inputs (a, b) of rank 2; attrs trans_a, trans_b: op(a) @ op(b) (ONNX Gemm without C)."""

    name = "matmul"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        a, b = inputs
        if a.rank != 2 or b.rank != 2:
            raise ShapeError(f"matmul needs two matrices, got {a} and {b}")
        m, k = reversed(a.shape) if attrs["trans_a"] else a.shape
        k2, n = reversed(b.shape) if attrs["trans_b"] else b.shape
        if k != k2:
            raise ShapeError(f"matmul: {a} and {b} do not fit (trans_a={attrs['trans_a']})")
        return [a.with_shape((m, n))]

    def macs(self, node) -> int:
        a = node.inputs[0].type.shape
        return a[0] * a[1] * node.output.type.shape[1] if all(isinstance(d, int) for d in a) else 0


class SgdUpdate(OpDef):
    """inputs (param, grad, lr[, momentum_buffer]); attrs momentum, dampening, nesterov,
    weight_decay: one step of torch.optim.SGD. Outputs the new parameter, and the new
    momentum buffer when momentum is not 0."""

    name = "sgd_update"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        param, grad, lr = inputs[:3]
        _same(self.name, param, grad, "gradient")
        if lr.shape != ():
            raise ShapeError(f"sgd_update: the learning rate must be a scalar, got {lr}")
        if attrs["momentum"]:
            _same(self.name, param, inputs[3], "momentum buffer")
            return [param, param]
        return [param]

    def describe(self, node) -> str:
        a = node.attrs
        text = f"momentum={a['momentum']:g}" + (" nesterov" if a["nesterov"] else "")
        text += f" dampening={a['dampening']:g}" if a["dampening"] else ""
        return text + (f" weight_decay={a['weight_decay']:g}" if a["weight_decay"] else "")


class AdamUpdate(OpDef):
    """inputs (param, grad, exp_avg, exp_avg_sq, step, lr); attrs beta1, beta2, eps,
    weight_decay, decoupled (AdamW): one step of torch.optim.Adam / AdamW, ``step`` being
    the number of this step (1 for the first). Outputs (param', exp_avg', exp_avg_sq')."""

    name = "adam_update"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        param, grad, m, v, step, lr = inputs
        for what, t in (("gradient", grad), ("exp_avg", m), ("exp_avg_sq", v)):
            _same(self.name, param, t, what)
        if step.shape != () or lr.shape != ():
            raise ShapeError(f"adam_update: step and learning rate must be scalars: {step}, {lr}")
        return [param, param, param]

    def label(self, node) -> str:
        return "adamw_update" if node.attrs["decoupled"] else "adam_update"

    def describe(self, node) -> str:
        a = node.attrs
        text = f"betas={a['beta1']:g},{a['beta2']:g} eps={a['eps']:g}"
        return text + (f" weight_decay={a['weight_decay']:g}" if a["weight_decay"] else "")


for _op in (
    ConvGradWeight,
    ReduceSum,
    MaxPoolGrad,
    ActivationGrad,
    SoftmaxCrossEntropy,
    SoftmaxCrossEntropyGrad,
    MseLoss,
    MseLossGrad,
    BatchNormTrain,
    BatchNormGrad,
    MatMul,
    SgdUpdate,
    AdamUpdate,
):
    register_op(_op())

# The ops no language layer makes (training graphs only): the tables of the language, ONNX
# import and decompiled programs do not apply to them.
TRAINING_OPS = frozenset(
    {
        "conv_grad_weight",
        "reduce_sum",
        "maxpool_grad",
        "activation_grad",
        "softmax_cross_entropy",
        "softmax_cross_entropy_grad",
        "mse_loss",
        "mse_loss_grad",
        "bn_train",
        "bn_grad",
        "matmul",
        "sgd_update",
        "adam_update",
    }
)


# ---- gradients of the spatial and structural ops (cnnc/train/rules.py) ---------------------


class AxisMatmul(OpDef):
    """inputs (x, m_1, …, m_r) with x N×C×(r spatial axes) and m_i [out_i, in_i]: x multiplied
    along spatial axis i by m_i, y[…, o, …] = Σ_j m_i[o, j] · x[…, j, …]. The gradient of the
    ops that are a fixed linear map per spatial axis (upsample, adaptive_avgpool, reflect
    and edge padding): their transposed matrices."""

    name = "axis_matmul"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        x, matrices = inputs[0], inputs[1:]
        if x.rank not in (3, 4) or len(matrices) != x.rank - 2:
            raise ShapeError(f"axis_matmul needs one matrix per spatial axis of {x}")
        out = []
        for size, m in zip(x.spatial, matrices, strict=True):
            if m.rank != 2 or m.shape[1] != size:
                raise ShapeError(f"axis_matmul matrix {m} does not fit {x}")
            out.append(m.shape[0])
        return [x.with_shape((*x.shape[:2], *out))]


class SliceGrad(OpDef):
    """input dy; attrs axis, start, stop (0 ≤ start < stop ≤ size) and size: the gradient of
    x[start:stop] along ``axis``: dy at positions start..stop-1 of an axis of ``size``,
    zeros elsewhere (ONNX Pad)."""

    name = "slice_grad"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        (dy,) = inputs
        axis, start, stop, size = (attrs[k] for k in ("axis", "start", "stop", "size"))
        if not 1 <= axis < dy.rank or not 0 <= start < stop <= size:
            raise ShapeError(f"slice_grad {start}:{stop} of {size} does not fit axis {axis}")
        if dy.shape[axis] != stop - start:
            raise ShapeError(f"slice_grad: {dy} does not have {stop - start} on axis {axis}")
        shape = list(dy.shape)
        shape[axis] = size
        return [dy.with_shape(tuple(shape))]

    def describe(self, node) -> str:
        a = node.attrs
        return f"axis={a['axis']} {a['start']}:{a['stop']} of {a['size']}"


class AdaptiveMaxPoolGrad(OpDef):
    """inputs (x, dy); attr size (the pooled output's spatial size): each of PyTorch's
    adaptive windows gives its gradient to the first of its largest inputs (row-major order
    within the window, as PyTorch's kernel); overlapping windows add up."""

    name = "adaptive_maxpool_grad"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        x, dy = inputs
        if x.rank != dy.rank or tuple(dy.spatial) != tuple(attrs["size"]):
            raise ShapeError(
                f"adaptive_maxpool_grad: input {x} and output gradient {dy} do not fit"
            )
        return [x]

    def describe(self, node) -> str:
        return "size=" + ",".join(map(str, node.attrs["size"]))


for _op in (AxisMatmul, SliceGrad, AdaptiveMaxPoolGrad):
    register_op(_op())

TRAINING_OPS = TRAINING_OPS | {"axis_matmul", "slice_grad", "adaptive_maxpool_grad"}


# ---- gradients of the normalizations (layernorm, groupnorm, lrn) ------------------------------
# Each recomputes the statistics of its forward op from x (a pass over x, cheaper than keeping
# them alive from the forward pass to the backward one).


class LayerNormGrad(OpDef):
    """inputs (x, weight, dy); attrs axis, epsilon of y = layernorm(x, weight, bias): the
    gradients (dx, dweight, dbias)."""

    name = "layernorm_grad"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        x, weight, dy = inputs
        _same(self.name, x, dy, "output gradient")
        axis = attrs["axis"]
        if not 0 < axis < x.rank or weight.shape != (x.shape[axis],):
            raise ShapeError(f"layernorm_grad: weight {weight} and axis {axis} do not fit {x}")
        return [x, weight, weight]

    def describe(self, node) -> str:
        return f"axis={node.attrs['axis']} eps={node.attrs['epsilon']:g}"


class GroupNormGrad(OpDef):
    """inputs (x, weight, dy); attrs groups, epsilon of y = groupnorm(x, weight, bias): the
    gradients (dx, dweight, dbias)."""

    name = "groupnorm_grad"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        x, weight, dy = inputs
        _same(self.name, x, dy, "output gradient")
        groups = attrs["groups"]
        if x.rank < 2 or weight.shape != (x.shape[1],) or x.shape[1] % groups:
            raise ShapeError(f"groupnorm_grad: weight {weight} and {groups} groups do not fit {x}")
        return [x, weight, weight]

    def describe(self, node) -> str:
        return f"g={node.attrs['groups']} eps={node.attrs['epsilon']:g}"


class LrnGrad(OpDef):
    """inputs (x, dy); attrs size, alpha, beta, bias of y = lrn(x): the gradient dx."""

    name = "lrn_grad"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        x, dy = inputs
        _same(self.name, x, dy, "output gradient")
        return [x]

    def describe(self, node) -> str:
        a = node.attrs
        return f"size={a['size']} alpha={a['alpha']:g} beta={a['beta']:g} k={a['bias']:g}"


for _op in (LayerNormGrad, GroupNormGrad, LrnGrad):
    register_op(_op())

TRAINING_OPS = TRAINING_OPS | {"layernorm_grad", "groupnorm_grad", "lrn_grad"}
