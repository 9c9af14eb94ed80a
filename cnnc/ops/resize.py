"""Resizing: ``upsample`` by a scale or to a size, exactly as torch.nn.functional.interpolate
computes it on the CPU (modes nearest, nearest_exact, linear, bilinear).

PyTorch's rules, per spatial axis of input size ``n`` and output size ``o``:

- The output size is ``floor(n · scale)`` (in double precision) or the size given.
- The ratio from output to input coordinates is ``1/scale`` when a scale is given (PyTorch's
  default, ``recompute_scale_factor`` unset), else ``n / o``; with align_corners,
  ``(n - 1) / (o - 1)`` (0 when o is 1) whatever was given. It is a float32.
- ``nearest`` (PyTorch's legacy mode): source ``floor(i · ratio)``, clamped to n - 1. In 2-D
  an axis whose output size is n copies it, and one whose output size is 2n takes
  ``i // 2``, whatever the scale (PyTorch's 2-D kernel has these two shortcuts, its 1-D
  kernel has not: upsample(scale=1.1) of a length 5 samples 0, 0, 1, 2, 3).
- ``nearest_exact``: source ``floor((i + 0.5) · ratio)``, clamped (the 1-D kernel rounds
  ``(i + 0.5) · ratio - 0.5`` to float32 first and adds 0.5 back, which differs from the
  2-D form at a few exact halves; both are reproduced).
- ``linear`` (1-D) and ``bilinear`` (2-D): source ``(i + 0.5) · ratio - 0.5`` computed as one
  fused multiply-add in float32, negative values clamped to 0 (with align_corners,
  ``i · ratio``); interpolate between floor(source) and the next pixel (the last pixel
  repeats). An axis whose output size is n is copied.

Every helper below computes these in float32, as PyTorch's kernels do, so that each
sampled pixel and weight is PyTorch's.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from cnnc.errors import ShapeError
from cnnc.ir.types import TensorType, format_dims
from cnnc.ops.base import Attr, Layer, LayerContext, OpDef, register_layer, register_op
from cnnc.ops.conv import feature_map_rank

NEAREST_MODES = ("nearest", "nearest_exact")
# The interpolating mode of each spatial rank.
LINEAR_MODES = {1: "linear", 2: "bilinear"}
MODES = (*NEAREST_MODES, *LINEAR_MODES.values())

_F32 = np.float32


def output_size(size: int, scale: float) -> int:
    """PyTorch's output size for a scale: floor(size · scale) in double precision."""
    size = float(size) * scale
    if not math.isfinite(size):
        raise ShapeError(f"scale {scale:g} makes an output size past any float ({size})")
    return math.floor(size)


def upsample_sizes(spatial: tuple[int, ...], attrs: dict[str, Any]) -> tuple[int, ...]:
    """The output spatial sizes of an upsample node on an input of sizes ``spatial``."""
    if attrs["size"] is not None:
        return tuple(attrs["size"])
    return tuple(output_size(n, s) for n, s in zip(spatial, attrs["scales"], strict=True))


def source_ratio(size: int, out: int, scale: float | None, align_corners: bool) -> np.float32:
    """The float32 factor from output to input coordinates along one axis."""
    if align_corners:
        return _F32(size - 1) / _F32(out - 1) if out > 1 else _F32(0)
    if scale is not None:
        return _F32(1.0 / scale)
    return _F32(size) / _F32(out)


def _fused(ratio: np.float32, positions: np.ndarray, addend: float) -> np.ndarray:
    """float32 ratio · positions + addend rounded once, as a fused multiply-add does: the
    product of two float32s is exact in float64."""
    return (np.float64(ratio) * positions.astype(np.float64) + addend).astype(_F32)


def nearest_indices(size: int, out: int, scale: float | None, mode: str, rank: int) -> np.ndarray:
    """The input index each output position of one axis copies (int64, length ``out``)."""
    if rank == 2 and mode == "nearest":
        if out == size:
            return np.arange(out)
        if out == 2 * size:
            return np.arange(out) >> 1
    ratio = source_ratio(size, out, scale, False)
    positions = np.arange(out, dtype=_F32)
    if mode == "nearest":
        source = positions * ratio
    elif rank == 2:
        source = (positions + _F32(0.5)) * ratio
    else:
        shifted = np.maximum(_fused(ratio, positions + _F32(0.5), -0.5), _F32(0))
        source = shifted + _F32(0.5)
    return np.minimum(np.floor(source).astype(np.int64), size - 1)


def linear_taps(
    size: int, out: int, scale: float | None, align_corners: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(first, second, first weight, second weight) of each output position of one axis:
    output i = x[first[i]] · w0[i] + x[second[i]] · w1[i]; indices int64, weights float32."""
    if out == size:
        index = np.arange(out)
        return index, index, np.ones(out, _F32), np.zeros(out, _F32)
    ratio = source_ratio(size, out, scale, align_corners)
    positions = np.arange(out, dtype=_F32)
    if align_corners:
        source = positions * ratio
    else:
        source = np.maximum(_fused(ratio, positions + _F32(0.5), -0.5), _F32(0))
    first = np.minimum(np.floor(source).astype(np.int64), size - 1)
    weight = np.clip(source - first.astype(_F32), 0, 1).astype(_F32)
    second = first + (first < size - 1)
    return first, second, (_F32(1) - weight).astype(_F32), weight


def _known_spatial(op: str, x: TensorType) -> tuple[int, ...]:
    if x.rank not in (3, 4):
        raise ShapeError(f"{op} needs a feature map N×C×L or N×C×H×W, got {x}")
    spatial = tuple(x.spatial)
    if not all(isinstance(d, int) for d in spatial):
        raise ShapeError(f"{op} needs known spatial sizes, got {x}")
    return spatial


def _number(v: float) -> str:
    return f"{v:g}"


class Upsample(OpDef):
    """attrs mode (nearest, nearest_exact, linear, bilinear), align_corners (linear modes
    only), and one of ``scales`` (a float per spatial axis) or ``size`` (an int per axis)."""

    name = "upsample"

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        (x,) = inputs
        spatial = _known_spatial(self.name, x)
        rank, mode = len(spatial), attrs["mode"]
        if mode not in NEAREST_MODES and mode != LINEAR_MODES[rank]:
            raise ShapeError(
                f"upsample mode {mode} does not fit a {rank}-D map {x}: "
                f"the interpolating mode of a {rank}-D map is {LINEAR_MODES[rank]}"
            )
        if attrs["align_corners"] and mode in NEAREST_MODES:
            raise ShapeError(f"upsample mode {mode} has no align_corners")
        given = attrs["size"] if attrs["size"] is not None else attrs["scales"]
        if given is None or len(given) != rank:
            raise ShapeError(f"upsample needs a scale or a size per spatial axis of {x}")
        out = upsample_sizes(spatial, attrs)
        if min(out) < 1:
            raise ShapeError(
                f"upsample of {format_dims(spatial)} gives {format_dims(out)}: every output "
                "size must be at least 1"
            )
        return [x.with_shape((*x.shape[:2], *out))]

    def macs(self, node) -> int:
        # Nearest copies; linear weighs the 2 neighbours of each axis (4 for bilinear).
        if node.attrs["mode"] in NEAREST_MODES:
            return 0
        return 2 ** (node.output.type.rank - 2) * node.output.type.numel_per_item()

    def label(self, node) -> str:
        return f"upsample{node.inputs[0].type.rank - 2}d"

    def describe(self, node) -> str:
        a = node.attrs
        if a["size"] is not None:
            given = f"size={format_dims(a['size'])}"
        else:
            scales = a["scales"]
            given = "scale=" + (
                _number(scales[0]) if len(set(scales)) == 1 else "x".join(map(_number, scales))
            )
        return f"{a['mode']} {given}" + (" align_corners" if a["align_corners"] else "")

    def fixed_size(self, node) -> str | None:
        if node.attrs["size"] is not None:
            return "upsamples to a fixed size"
        if node.attrs["align_corners"]:
            return "with align_corners samples positions that follow its input's size"
        return None


register_op(Upsample())


def build_upsample(ctx: LayerContext, x):
    rank = feature_map_rank(ctx, x.type, "upsample")
    mode = ctx["mode"]
    if mode not in NEAREST_MODES and mode != LINEAR_MODES[rank]:
        other = next(r for r, m in LINEAR_MODES.items() if m == mode)
        raise ctx.error(
            f"upsample mode {mode} interpolates {other}-D maps, but the input {x.type} is {rank}-D",
            "mode",
            hint=f"use mode={LINEAR_MODES[rank]} (or nearest)",
        )
    if "align_corners" in ctx.arg_locs and mode in NEAREST_MODES:
        raise ctx.error(
            f"align_corners applies to the interpolating modes (linear, bilinear), not {mode}",
            "align_corners",
            hint="drop align_corners",
        )
    scale, size = ctx["scale"], ctx["size"]
    if (scale is None) == (size is None):
        raise ctx.error(
            "upsample takes a scale or a size, not both"
            if scale is not None
            else "upsample needs a scale or a size",
            "size" if scale is not None else None,
            hint="upsample(scale=2) or upsample(size=(h, w))",
        )
    attrs: dict[str, Any] = {
        "mode": mode,
        "align_corners": ctx["align_corners"],
        "scales": None,
        "size": None,
    }
    if size is not None:
        attrs["size"] = tuple(ctx.spatial("size", rank))
    else:
        scales = tuple(float(s) for s in ctx.spatial("scale", rank))
        if min(scales) <= 0:
            raise ctx.error(f"upsample scale must be positive, got {_describe(scale)}", "scale")
        spatial = tuple(x.type.spatial)
        out = tuple(output_size(n, s) for n, s in zip(spatial, scales, strict=True))
        if min(out) < 1:
            raise ctx.error(
                f"upsample scale {_describe(scale)} of {format_dims(spatial)} gives "
                f"{format_dims(out)}: every output size must be at least 1 (floor(size · scale))",
                "scale",
                hint="use a larger scale, or a size",
            )
        attrs["scales"] = scales
    return ctx.node("upsample", [x], attrs)


def _describe(value) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join(_number(v) for v in value) + ")"
    return _number(value)


register_layer(
    Layer(
        "upsample",
        (
            Attr(
                "scale",
                "floats",
                None,
                doc="output size floor(size · scale): a number, or one per spatial axis",
                default_text="none",
            ),
            Attr(
                "size",
                "ints",
                None,
                minimum=1,
                doc="the output size: an int, or one per spatial axis",
                default_text="none",
            ),
            Attr(
                "mode",
                "choice",
                "nearest",
                choices=MODES,
                doc="nearest, nearest_exact, linear (1-D) or bilinear (2-D)",
            ),
            Attr(
                "align_corners",
                "bool",
                False,
                doc="linear modes: map the corner pixels onto each other",
            ),
        ),
        build_upsample,
        "Resizes a feature map by a scale or to a size, as torch.nn.Upsample and "
        "torch.nn.functional.interpolate do (ONNX Resize).",
    )
)
