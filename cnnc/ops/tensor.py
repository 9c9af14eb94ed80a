"""Ops that move or pass data without arithmetic: ``dropout`` and ``drop_path`` (identities at
inference), ``reshape``, ``transpose``, ``pad``, ``split``, ``slice`` and ``crop``."""

from __future__ import annotations

import math
from typing import Any

from cnnc.errors import ShapeError
from cnnc.ir.types import TensorType, format_dims
from cnnc.ops.base import Attr, Layer, LayerContext, OpDef, register_layer, register_op
from cnnc.ops.common import explicit_pads


class Dropout(OpDef):
    """Identity at inference; kept in the IR so that exported models show where it was."""

    name = "dropout"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        return [inputs[0]]

    def describe(self, node) -> str:
        return f"p={node.attrs['ratio']:g}"


register_op(Dropout())


def build_dropout(ctx: LayerContext, x):
    ratio = ctx["ratio"]
    if not 0 <= ratio < 1:
        raise ctx.error(f"dropout probability must be in [0, 1), got {ratio}", "ratio")
    return ctx.node("dropout", [x], {"ratio": float(ratio)})


register_layer(
    Layer(
        "dropout",
        (Attr("ratio", "float", 0.5, positional=True, doc="probability of dropping in training"),),
        build_dropout,
        "Identity at inference (the probability is recorded for the exported model).",
    )
)


class DropPath(OpDef):
    """Stochastic depth (torchvision's StochasticDepth): in training it drops a residual
    branch for a whole item with probability ``p``; identity at inference, kept in the IR
    like dropout so that the dump and the exported model show where it was."""

    name = "drop_path"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        return [inputs[0]]

    def describe(self, node) -> str:
        return f"p={node.attrs['p']:g}"


register_op(DropPath())


def build_drop_path(ctx: LayerContext, x):
    p = ctx["p"]
    if not 0 <= p <= 1:
        raise ctx.error(f"drop_path probability must be in [0, 1], got {p}", "p")
    return ctx.node("drop_path", [x], {"p": float(p)})


register_layer(
    Layer(
        "drop_path",
        (Attr("p", "float", 0.1, positional=True, doc="probability of dropping in training"),),
        build_drop_path,
        "Stochastic depth on a residual branch (torchvision's StochasticDepth): identity at "
        "inference, recorded for the exported model.",
    )
)


class Reshape(OpDef):
    """attr ``shape``: the new sizes of every axis but the batch, which is kept."""

    name = "reshape"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        (x,) = inputs
        shape = tuple(attrs["shape"])
        if any(not isinstance(d, int) or d < 1 for d in shape):
            raise ShapeError(f"reshape sizes must be positive integers, got {shape}")
        if math.prod(shape) != x.numel_per_item():
            raise ShapeError(
                f"reshape to {format_dims(shape)} needs {math.prod(shape)} values per item, "
                f"but the input {x} has {x.numel_per_item()}"
            )
        return [x.with_shape((x.shape[0], *shape))]

    def describe(self, node) -> str:
        return "to " + format_dims(node.attrs["shape"])

    def fixed_size(self, node) -> str | None:
        return f"fixes every size of its output ({format_dims(node.attrs['shape'])})"


class Transpose(OpDef):
    """attr ``perm``: output axis i is input axis perm[i]; the batch axis stays first."""

    name = "transpose"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        (x,) = inputs
        perm = tuple(attrs["perm"])
        if sorted(perm) != list(range(x.rank)) or perm[0] != 0:
            raise ShapeError(
                f"transpose needs a permutation of the axes 1..{x.rank - 1} of {x}, got "
                f"{perm[1:]} (the batch axis stays first)"
            )
        return [x.with_shape(tuple(x.shape[i] for i in perm))]

    def describe(self, node) -> str:
        return "perm=" + ",".join(str(p) for p in node.attrs["perm"])


register_op(Reshape())
register_op(Transpose())


def build_reshape(ctx: LayerContext, x):
    shape = ctx["shape"]
    shape = shape if isinstance(shape, tuple) else (shape,)
    per_item = x.type.numel_per_item()
    if shape.count(-1) > 1 or any(d == 0 or d < -1 for d in shape):
        raise ctx.error("reshape sizes must be positive, with at most one -1", "shape")
    if -1 in shape:
        known = -math.prod(shape)
        if per_item % known:
            raise ctx.error(
                f"reshape to {shape} cannot hold the {per_item} values of {x.type}", "shape"
            )
        shape = tuple(per_item // known if d == -1 else d for d in shape)
    return ctx.node("reshape", [x], {"shape": shape})


def build_transpose(ctx: LayerContext, x):
    perm = ctx["perm"]
    perm = perm if isinstance(perm, tuple) else (perm,)
    if sorted(perm) != list(range(1, x.type.rank)):
        raise ctx.error(
            f"transpose needs a permutation of the axes 1..{x.type.rank - 1} of {x.type}, "
            f"got {perm}",
            "perm",
        )
    return ctx.node("transpose", [x], {"perm": (0, *perm)})


register_layer(
    Layer(
        "reshape",
        (Attr("shape", "ints", positional=True, doc="sizes of the axes after the batch"),),
        build_reshape,
        "Gives the values of each item a new shape (C, H, W order kept): reshape((3, 8, 28, 28)); "
        "one size may be -1.",
    )
)
register_layer(
    Layer(
        "transpose",
        (Attr("perm", "ints", positional=True, doc="which input axis each output axis is"),),
        build_transpose,
        "Permutes the axes after the batch, numbered from 1: transpose((2, 1, 3, 4)) swaps the "
        "first two (ShuffleNet's channel shuffle).",
    )
)


# ---- pad ------------------------------------------------------------------------------------

PAD_MODES = ("constant", "reflect", "edge")
# The names of the spatial axes in messages, by the number of spatial axes.
SPATIAL_AXES = {1: ("length",), 2: ("height", "width")}


def _spatial_sizes(op: str, x: TensorType) -> tuple[int, ...]:
    rank = x.rank - 2
    if rank not in SPATIAL_AXES or not all(isinstance(d, int) for d in x.spatial):
        raise ShapeError(f"{op} needs a feature map N×C×L or N×C×H×W, got {x}")
    return tuple(x.spatial)


def pad_problem(x: TensorType, pads: tuple[int, ...], mode: str) -> str | None:
    """What is wrong with padding ``x`` by ``pads`` in ``mode``, or None."""
    sizes = _spatial_sizes("pad", x)
    rank = len(sizes)
    if len(pads) != 2 * rank:
        return f"pad of a {rank}-D map takes {2 * rank} amounts, got {len(pads)}"
    if mode not in PAD_MODES:
        return f"pad mode must be one of {', '.join(PAD_MODES)}, got {mode}"
    for i, (size, name) in enumerate(zip(sizes, SPATIAL_AXES[rank], strict=True)):
        begin, end = pads[i], pads[i + rank]
        if mode != "constant" and min(begin, end) < 0:
            return (
                f"{mode} padding by {begin} and {end} on the {name}: negative amounts crop, "
                "and only constant padding crops"
            )
        if mode == "reflect" and max(begin, end) >= size:
            return (
                f"reflect padding by {max(begin, end)} on the {name} must be smaller than "
                f"the input's {name} {size} ({x}): reflection repeats no edge row, so it "
                f"pads at most {size - 1}"
            )
        if size + begin + end < 1:
            return f"padding by {begin} and {end} leaves nothing of the {name} {size} of {x}"
    return None


class Pad(OpDef):
    """attrs ``pads`` (begin..., end... of the spatial axes, as ONNX orders them; a negative
    amount crops), ``mode`` (constant, reflect, edge) and ``value`` (constant's fill)."""

    name = "pad"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        (x,) = inputs
        pads = tuple(attrs["pads"])
        problem = pad_problem(x, pads, attrs["mode"])
        if problem:
            raise ShapeError(problem)
        rank = len(pads) // 2
        out = tuple(s + pads[i] + pads[i + rank] for i, s in enumerate(x.spatial))
        return [x.with_shape((*x.shape[:2], *out))]

    def describe(self, node) -> str:
        a = node.attrs
        text = "p=" + ",".join(str(p) for p in a["pads"]) + " " + a["mode"]
        return text + (f" value={a['value']:g}" if a["value"] else "")


register_op(Pad())


def build_pad(ctx: LayerContext, x):
    if x.type.rank - 2 not in SPATIAL_AXES:
        raise ctx.error(f"pad needs a feature map N×C×L or N×C×H×W, got {x.type}")
    pads = explicit_pads(ctx, "amount", x.type.rank - 2)
    mode = "edge" if ctx["mode"] == "replicate" else ctx["mode"]
    if ctx["value"] != 0 and mode != "constant":
        raise ctx.error(f"value is the fill of constant padding; {mode} padding has none", "value")
    problem = pad_problem(x.type, pads, mode)
    if problem:
        hint = f"crop first (slice, crop), then pad in {mode} mode" if "crop" in problem else None
        raise ctx.error(problem, "amount", hint=hint)
    return ctx.node("pad", [x], {"pads": pads, "mode": mode, "value": float(ctx["value"])})


register_layer(
    Layer(
        "pad",
        (
            Attr("amount", "ints", positional=True, doc="amounts in conv's padding forms"),
            Attr(
                "mode",
                "choice",
                "constant",
                positional=True,
                doc="constant, reflect or edge (replicate is PyTorch's word for edge)",
                choices=(*PAD_MODES, "replicate"),
            ),
            Attr("value", "float", 0.0, doc="the fill of constant padding", default_text="0"),
        ),
        build_pad,
        "Pads the spatial axes: pad(1), pad((1, 2)) (h, w), pad((0, 1, 2, 3)) (top, left, "
        "bottom, right), pad(2, reflect), pad(1, edge), pad(1, value=-1); a negative amount "
        "crops (constant mode).",
    )
)


# ---- split ----------------------------------------------------------------------------------


class Split(OpDef):
    """attr ``sizes``: the channel counts of the outputs, in order (one output each)."""

    name = "split"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        (x,) = inputs
        sizes = tuple(attrs["sizes"])
        channels = x.shape[1] if x.rank >= 2 else None
        if not isinstance(channels, int):
            raise ShapeError(f"split needs known channels, got {x}")
        if any(s < 1 for s in sizes) or sum(sizes) != channels:
            raise ShapeError(
                f"split sizes {', '.join(map(str, sizes))} must be positive and sum "
                f"to the {channels} channels of {x}"
            )
        return [x.with_shape((x.shape[0], s, *x.shape[2:])) for s in sizes]

    def describe(self, node) -> str:
        return "sizes=" + ",".join(str(s) for s in node.attrs["sizes"])


register_op(Split())


def chunk_sizes(channels: int, chunks: int) -> tuple[int, ...]:
    """The sizes torch.chunk gives: chunks of ceil(channels / chunks), the last smaller
    (so there may be fewer than ``chunks`` of them)."""
    size = -(-channels // chunks)
    return tuple(min(size, channels - start) for start in range(0, channels, size))


def _even_sizes_hint(channels: int, chunks: int) -> str:
    if chunks > channels:
        return f"{channels} channels make at most {channels} parts"
    base, extra = divmod(channels, chunks)
    sizes = [base + 1] * extra + [base] * (chunks - extra)
    return f"give the sizes, for example split(({', '.join(map(str, sizes))}))"


def build_split(ctx: LayerContext, x):
    if x.type.rank < 2 or not isinstance(x.type.shape[1], int):
        raise ctx.error(f"split needs an input with channels, got {x.type}")
    channels = x.type.shape[1]
    sections = ctx["sections"]
    if isinstance(sections, int):
        sizes = chunk_sizes(channels, sections)
        if len(sizes) != sections:
            raise ctx.error(
                f"split({sections}) of {channels} channels: torch.chunk's chunks of "
                f"ceil({channels} / {sections}) = {sizes[0]} make {len(sizes)} chunks, "
                f"not {sections}",
                "sections",
                hint=_even_sizes_hint(channels, sections),
            )
    else:
        sizes = sections
        if sum(sizes) != channels:
            raise ctx.error(
                f"split sizes {sizes} sum to {sum(sizes)}, but {x.type} has {channels} channels",
                "sections",
                hint=f"sizes must sum to {channels}",
            )
    values = ctx.node_outputs("split", [x], {"sizes": tuple(sizes)})
    return values if len(values) > 1 else values[0]


register_layer(
    Layer(
        "split",
        (
            Attr(
                "sections",
                "ints",
                positional=True,
                minimum=1,
                doc="a number of chunks (torch.chunk), or the channel count of each part "
                "(torch.split)",
            ),
        ),
        build_split,
        "Splits the channels into several values: a, b = x -> split(2) (torch.chunk: chunks "
        "of ceil(C / n), the last smaller), a, b, c = x -> split((16, 16, 32)) (sizes "
        "summing to C).",
    )
)


# ---- slice and crop -------------------------------------------------------------------------


def _axis_name(x: TensorType, axis: int) -> str:
    names = ("channels", *SPATIAL_AXES.get(x.rank - 2, ()))
    return names[axis - 1] if axis - 1 < len(names) else f"axis {axis}"


def slice_length(size: int, start: int, end: int) -> int:
    """How many positions ``start:end`` takes of an axis of ``size``, as Python and ONNX
    count them (negative bounds from the end, bounds clamped to the axis)."""
    return len(range(*slice(start, end).indices(size)))


class Slice(OpDef):
    """attrs ``axis`` (1 or a spatial axis), ``start`` and ``end``: positions start..end-1
    of that axis, counted as Python counts them (negative from the end, end clamped)."""

    name = "slice"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        (x,) = inputs
        axis, start, end = attrs["axis"], attrs["start"], attrs["end"]
        if not 1 <= axis < x.rank:
            raise ShapeError(
                f"slice axis {axis} is not an axis of {x} after the batch (1..{x.rank - 1})"
            )
        size = x.shape[axis]
        if not isinstance(size, int):
            raise ShapeError(f"slice needs a known size on axis {axis}, got {x}")
        length = slice_length(size, start, end)
        if length < 1:
            raise ShapeError(
                f"slice {start}:{end} of the {_axis_name(x, axis)} of {x} (size {size}) is empty"
            )
        shape = list(x.shape)
        shape[axis] = length
        return [x.with_shape(tuple(shape))]

    def describe(self, node) -> str:
        a = node.attrs
        return f"axis={a['axis']} {a['start']}:{a['end']}"


register_op(Slice())


def build_slice(ctx: LayerContext, x):
    rank = x.type.rank
    axis = ctx["axis"]
    axis = axis + rank if axis < 0 else axis
    if not 1 <= axis < rank:
        raise ctx.error(
            f"slice axis {ctx['axis']} is not an axis of {x.type} after the batch: "
            f"1 (channels) to {rank - 1}",
            "axis",
            hint="the batch axis 0 is never sliced",
        )
    size = x.type.shape[axis]
    start, end = ctx["start"], ctx["end"]
    if slice_length(size, start, end) < 1:
        raise ctx.error(
            f"slice {start}:{end} of the {_axis_name(x.type, axis)} of {x.type} "
            f"(size {size}) is empty",
            "end" if "end" in ctx.arg_locs else "start",
            hint="negative bounds count from the end; the end is not included",
        )
    return ctx.node("slice", [x], {"axis": axis, "start": start, "end": end})


register_layer(
    Layer(
        "slice",
        (
            Attr("start", "int", positional=True, doc="first position (negative: from the end)"),
            Attr("end", "int", positional=True, doc="position after the last (clamped)"),
            Attr("axis", "int", 1, doc="1 (channels) or a spatial axis"),
        ),
        build_slice,
        "Positions start..end-1 of one axis, as x[:, start:end] in PyTorch: slice(0, 16) "
        "(channels), slice(1, -1, axis=2) (rows); negative bounds count from the end.",
    )
)


def crop_problem(x: TensorType, ref: TensorType, offset: tuple[int, ...]) -> str | None:
    """What is wrong with cropping ``x`` to ``ref``'s spatial size at ``offset``, or None."""
    sizes = _spatial_sizes("crop", x)
    if ref.rank != x.rank or not all(isinstance(d, int) for d in ref.spatial):
        return f"crop needs a reference of the input's rank {x.rank} with known sizes, got {ref}"
    if len(offset) != len(sizes):
        return f"crop of a {len(sizes)}-D map takes {len(sizes)} offsets, got {len(offset)}"
    for size, want, o, name in zip(
        sizes, ref.spatial, offset, SPATIAL_AXES[len(sizes)], strict=True
    ):
        if o < 0 or o + want > size:
            return (
                f"crop of {want} from offset {o} on the {name} reaches {o + want}, but "
                f"the input {x} has {size}"
            )
    return None


class Crop(OpDef):
    """Inputs (x, ref), attr ``offset`` (one per spatial axis): the window of x starting at
    ``offset`` with ref's spatial size (FCN's crop of the upsampled scores to the image)."""

    name = "crop"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        x, ref = inputs
        problem = crop_problem(x, ref, tuple(attrs["offset"]))
        if problem:
            raise ShapeError(problem)
        return [x.with_shape((*x.shape[:2], *ref.spatial))]

    def describe(self, node) -> str:
        return "offset=" + ",".join(str(o) for o in node.attrs["offset"])


register_op(Crop())


def build_crop(ctx: LayerContext, x):
    ref = ctx["ref"]
    if x.type.rank - 2 not in SPATIAL_AXES:
        raise ctx.error(f"crop needs a feature map N×C×L or N×C×H×W, got {x.type}")
    if ref.type.rank != x.type.rank:
        raise ctx.error(
            f"crop needs a reference map like its input {x.type}, got {ref.type}", "ref"
        )
    offset = ctx.spatial("offset", x.type.rank - 2)
    problem = crop_problem(x.type, ref.type, offset)
    if problem:
        raise ctx.error(problem, "offset" if "offset" in ctx.arg_locs else "ref")
    return ctx.node("crop", [x, ref], {"offset": offset})


register_layer(
    Layer(
        "crop",
        (
            Attr("ref", "value", positional=True, doc="the value whose spatial size to take"),
            Attr("offset", "ints", 0, minimum=0, doc="where the window starts, per axis"),
        ),
        build_crop,
        "Crops a map to the spatial size of the value ref, from offset: crop(image, "
        "offset=19) (FCN's score[:, :, 19:19+H, 19:19+W]).",
    )
)
