"""Shape arithmetic shared by windowed ops (convolution and pooling): padding and output sizes."""

from __future__ import annotations

from cnnc.errors import InternalError, ShapeError
from cnnc.ir.types import TensorType, format_dims
from cnnc.ops.base import LayerContext

LAYOUTS = {1: "N×C×L", 2: "N×C×H×W"}


def resolve_pads(
    ctx: LayerContext,
    attr: str,
    in_type: TensorType,
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
) -> tuple[int, ...]:
    """The ``pad`` argument as explicit ONNX pads ``(begin..., end...)``.

    Accepted forms: an int (every side); for 1-D ``(begin, end)``; for 2-D
    ``(h, w)`` (both sides of each axis) or ``(top, left, bottom, right)``;
    ``valid`` (no padding); ``same`` (output size ceil(input / stride), the
    odd pixel of padding at the end, as ONNX SAME_UPPER and TensorFlow do).
    """
    value = ctx.args[attr]
    rank = len(kernel)
    if value == "valid":
        return (0,) * (2 * rank)
    if value == "same":
        begins, ends = [], []
        for size, k, s, d in zip(in_type.spatial, kernel, stride, dilation, strict=True):
            out = -(-int(size) // s)
            total = max((out - 1) * s + d * (k - 1) + 1 - int(size), 0)
            begins.append(total // 2)
            ends.append(total - total // 2)
        return (*begins, *ends)
    return explicit_pads(ctx, attr, rank)


def explicit_pads(ctx: LayerContext, attr: str, rank: int) -> tuple[int, ...]:
    """An int or tuple padding argument as ONNX pads ``(begin..., end...)``: an int (every
    side); for 1-D ``(begin, end)``; for 2-D ``(h, w)`` or ``(top, left, bottom, right)``."""
    value = ctx.args[attr]
    if isinstance(value, int):
        return (value,) * (2 * rank)
    if rank == 1 and len(value) == 2:
        return tuple(value)
    if rank == 2 and len(value) == 2:
        return (*value, *value)
    if len(value) == 2 * rank:
        return tuple(value)
    forms = (
        "an int or (begin, end)" if rank == 1 else "an int, (h, w) or (top, left, bottom, right)"
    )
    raise ctx.error(f"{attr} has {len(value)} values; a {rank}-D layer takes {forms}", attr)


def window_output_size(
    size: int,
    kernel: int,
    stride: int,
    pad_begin: int,
    pad_end: int,
    dilation: int = 1,
    ceil: bool = False,
) -> int:
    """Output length of a sliding window along one axis; 0 or less when the window does not fit.

    In ceil mode the last window must start inside the input or its leading
    padding (the rule PyTorch and onnxruntime follow).
    """
    span = size + pad_begin + pad_end - (dilation * (kernel - 1) + 1)
    if not ceil or span < 0:
        return span // stride + 1
    out = -(-span // stride) + 1
    if (out - 1) * stride >= size + pad_begin:
        out -= 1
    return out


def windowed_shape(
    op: str,
    x: TensorType,
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    pads: tuple[int, ...],
    dilation: tuple[int, ...],
    ceil: bool = False,
) -> tuple[int, ...]:
    """Output spatial sizes of a conv or pool, with a ShapeError that shows the shapes."""
    rank = len(kernel)
    if rank not in LAYOUTS:
        raise ShapeError(
            f"{op} over {rank} spatial axes is not supported: cnnc has 1-D and 2-D {op}s"
        )
    if x.rank != rank + 2:
        raise ShapeError(f"{op} with a {rank}-D kernel needs an input {LAYOUTS[rank]}, got {x}")
    if len(stride) != rank or len(dilation) != rank:
        raise InternalError(f"{op}: {len(stride)} strides, {len(dilation)} dilations, {rank} axes")
    spatial = tuple(x.shape[2:])
    padded, reach, out = [], [], []
    fits = True
    for i in range(rank):  # a loop rather than generators: a 10,000-layer network runs it often
        s, k, d = spatial[i], kernel[i], dilation[i]
        if not isinstance(s, int):
            raise ShapeError(f"{op} needs known spatial sizes, got {x}")
        padded.append(s + pads[i] + pads[i + rank])
        reach.append(d * (k - 1) + 1)
        out.append(window_output_size(s, k, stride[i], pads[i], pads[i + rank], d, ceil))
        fits = fits and reach[i] <= padded[i]
    padded, reach, out = tuple(padded), tuple(reach), tuple(out)
    if not fits:
        what = f"kernel {format_dims(kernel)}"
        if reach != kernel:
            what += f" (dilated to {format_dims(reach)})"
        where = "its input" if padded == spatial else "its padded input"
        shape = ",".join(str(d) for d in x.shape)
        raise ShapeError(
            f"{op} {what} is larger than {where} {format_dims(padded)} ({shape}): "
            f"its output would be {format_dims(out)}",
            hint=f"drop this {op}, use a smaller kernel, or pad its input",
        )
    return out


def describe_window(
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    pads: tuple[int, ...],
    dilation: tuple[int, ...],
) -> str:
    """Dump text for a windowed op: ``k=5x5 s=1 p=2,2,2,2 d=2``; defaults are left out."""
    parts = [f"k={format_dims(kernel)}"]
    parts.append(f"s={stride[0] if len(set(stride)) == 1 else format_dims(stride)}")
    if any(pads):
        parts.append("p=" + ",".join(str(p) for p in pads))
    if any(d != 1 for d in dilation):
        parts.append(f"d={format_dims(dilation)}")
    return " ".join(parts)


def pad_text(pads: tuple[int, ...]) -> str:
    """The shortest ``pad`` form of explicit pads (begin..., end...): one int, (h, w) for both
    sides of each axis, or all of them."""
    pads = tuple(int(p) for p in pads)
    rank = len(pads) // 2
    if len(set(pads)) == 1:
        return str(pads[0])
    if rank == 2 and pads[:2] == pads[2:]:
        return f"({pads[0]}, {pads[1]})"
    return "(" + ", ".join(map(str, pads)) + ")"


def conv_out_channels_check(ctx: LayerContext, channels: int, out: int, groups: int) -> None:
    """Groups must divide both channel counts."""
    if channels % groups:
        raise ctx.error(
            f"groups={groups} does not divide the {channels} input channels",
            "groups",
            hint=f"use a divisor of {channels}",
        )
    if out % groups:
        raise ctx.error(
            f"groups={groups} does not divide the {out} output channels",
            "groups",
            hint=f"use a divisor of {out}",
        )


def resolve_axis(ctx: LayerContext, x_type: TensorType, keyword: str) -> int:
    """A layer's ``axis`` argument as a non-negative axis after the batch (-1 is the last)."""
    rank, axis = x_type.rank, ctx["axis"]
    if not -rank < axis < rank or axis == 0:
        raise ctx.error(
            f"{keyword} axis {axis} is not an axis after the batch of its input {x_type}",
            "axis",
            hint=f"use 1 (the channels) up to {rank - 1}, or -1 for the last",
        )
    return axis % rank
