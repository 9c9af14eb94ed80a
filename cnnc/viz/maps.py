"""Pictures of what a network computes: each layer's feature maps as a grid of tiles, the
first convolution's kernels, and the prediction with its top classes, as PNG bytes.

Every picture shows the first item of the batch. A 2-D map (C×H×W) is a grid of one tile
per channel, each tile scaled to its own minimum and maximum and coloured with viridis
(dark blue for its lowest value, yellow for its highest), upscaled without smoothing so
that each cell of an 8×8 map is visible; a 1-D map (C×L) is one row per channel; a layer
with no spatial extent (N×K, or K×1×1) is a bar per unit (a grid of cells past 256 units).
A legend above gives the layer's name, its shape and its range of values."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np

from cnnc.errors import UsageError
from cnnc.viz import pillow

# Keys of layer_pngs for the two pictures that are not a layer's maps (no value is named
# with an @).
KERNELS = "@kernels"
PREDICTION = "@prediction"

# At most this many channels of a layer are drawn (ResNet-50's last maps have 2,048).
MAX_TILES = 256
# Small maps are upscaled until a tile is about this many pixels a side.
TILE_PIXELS = 64
GAP = 2
MARGIN = 6
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)

# viridis (matplotlib's perceptually uniform colormap) at nine points, interpolated to 256.
_VIRIDIS_POINTS = np.array(
    [
        (68, 1, 84),
        (71, 44, 122),
        (59, 81, 139),
        (44, 113, 142),
        (33, 144, 141),
        (39, 173, 129),
        (92, 200, 99),
        (170, 220, 50),
        (253, 231, 37),
    ],
    dtype=np.float64,
)
VIRIDIS = (
    np.stack(
        [
            np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_VIRIDIS_POINTS)), channel)
            for channel in _VIRIDIS_POINTS.T
        ],
        axis=1,
    )
    .round()
    .astype(np.uint8)
)


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=13)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: its bitmap font
        return ImageFont.load_default()


def _scaled(a: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """``a`` mapped to 0..255 between ``low`` and ``high`` (its own range by default); a
    constant array is 0, and NaN is 0."""
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low = float(a.min()) if low is None else low
    high = float(a.max()) if high is None else high
    if high <= low:
        return np.zeros(a.shape, np.uint8)
    return np.clip((a - low) / (high - low) * 255.0, 0, 255).round().astype(np.uint8)


def _palette_image():
    """A palette of 224 viridis colours and 32 greys (white, ink and the text's
    antialiasing): a feature-map picture in it is a third of its RGB size, and as sharp."""
    image_module = pillow()
    viridis = VIRIDIS[np.linspace(0, 255, 224).round().astype(int)]
    greys = np.repeat(np.linspace(0, 255, 32).round()[:, None], 3, axis=1)
    palette = image_module.new("P", (1, 1))
    palette.putpalette(np.concatenate([viridis, greys]).astype(np.uint8).reshape(-1).tolist())
    return palette


def _png(image, viridis: bool = False) -> bytes:
    """PNG bytes; a picture drawn only in viridis and greys is stored with a palette."""
    if viridis:
        image_module = pillow()
        image = image.quantize(palette=_palette_image(), dither=image_module.Dither.NONE)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def _range_text(a: np.ndarray) -> str:
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return "no finite value"
    return f"values {finite.min():.4g} to {finite.max():.4g}"


def _with_legend(body, lines: list[str]):
    """``body`` below a legend of text lines, on a white canvas at least as wide as them."""
    image_module = pillow()
    from PIL import ImageDraw

    font = _font()
    probe = ImageDraw.Draw(image_module.new("RGB", (1, 1)))
    boxes = [probe.textbbox((0, 0), line, font=font) for line in lines]
    line_height = max(b[3] for b in boxes) + 4
    text_width = max(b[2] for b in boxes)
    width = max(body.width, text_width) + 2 * MARGIN
    height = body.height + line_height * len(lines) + 3 * MARGIN
    canvas = image_module.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((MARGIN, MARGIN + i * line_height), line, fill=INK, font=font)
    canvas.paste(body, (MARGIN, 2 * MARGIN + line_height * len(lines)))
    return canvas


def _grid(
    tiles: list[np.ndarray],
    columns: int,
    scale: int,
    gap_colour: tuple[int, int, int] = BACKGROUND,
    gap: int = GAP,
):
    """Tiles (H×W uint8 indices into VIRIDIS, or H×W×3 RGB) in a grid, each upscaled by
    ``scale`` without smoothing, ``gap`` pixels apart."""
    image_module = pillow()
    h, w = tiles[0].shape[:2]
    th, tw = h * scale, w * scale
    rows = math.ceil(len(tiles) / columns)
    canvas = np.empty(
        (rows * th + (rows - 1) * gap, columns * tw + (columns - 1) * gap, 3), np.uint8
    )
    canvas[:] = gap_colour
    for i, tile in enumerate(tiles):
        rgb = VIRIDIS[tile] if tile.ndim == 2 else tile
        big = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
        r, c = divmod(i, columns)
        canvas[r * (th + gap) : r * (th + gap) + th, c * (tw + gap) : c * (tw + gap) + tw] = big
    return image_module.fromarray(canvas, "RGB")


def _columns(count: int, h: int, w: int) -> int:
    """Columns that make the grid roughly square: a divisor of ``count`` near the square
    root where there is one (32 tiles are 8×4, not 6×6 with 4 missing), wider rather than
    taller."""
    square = max(1, min(count, math.ceil(math.sqrt(count * h / max(w, 1)))))
    near = [c for c in range(square, min(count, 2 * square) + 1) if count % c == 0]
    return near[0] if near else square


def _scale_for(h: int, w: int, target: int = TILE_PIXELS) -> int:
    return max(1, math.ceil(target / max(h, w)))


def feature_map_image(name: str, value: np.ndarray, labels: Sequence[str] | None = None):
    """The picture (a PIL image) of one layer's output for one item: ``value`` without the
    batch axis; a layer of one value per class has its bars named by ``labels``."""
    image_module = pillow()
    shape = list(value.shape)
    head = f"{name}  [{', '.join(map(str, ['N', *shape]))}]  {_range_text(value)}"
    if value.ndim == 3 and value.shape[1] * value.shape[2] > 1:
        channels = value.shape[0]
        shown = value[:MAX_TILES]
        tiles = [_scaled(channel) for channel in shown]
        h, w = value.shape[1:]
        body = _grid(tiles, _columns(len(tiles), h, w), _scale_for(h, w))
        more = f" (the first {MAX_TILES} of {channels})" if channels > MAX_TILES else ""
        note = (
            f"{len(tiles)} channel{'s' if len(tiles) != 1 else ''}{more}, each scaled to "
            "its own range: dark low, yellow high"
        )
        return _with_legend(body, [head, note])
    if value.ndim == 2 and value.shape[1] > 1:
        channels, length = value.shape
        shown = value[:MAX_TILES]
        averaged = ""
        if length > 1024:  # a long signal: the mean of each run of `step` values
            step = math.ceil(length / 1024)
            padded = np.full((shown.shape[0], math.ceil(length / step) * step), np.nan)
            padded[:, :length] = shown
            with np.errstate(all="ignore"):
                shown = np.nanmean(padded.reshape(shown.shape[0], -1, step), axis=2)
            length, averaged = shown.shape[1], f", each cell the mean of {step} values"
        cell_w = max(1, math.ceil(512 / length)) if length < 512 else 1
        rows = [np.repeat(VIRIDIS[_scaled(row)][None], 8, axis=0) for row in shown]
        gap = np.full((1, length, 3), 255, np.uint8)  # a white line between channels
        strip = np.concatenate([part for r in rows for part in (r, gap)][:-1], axis=0)
        rgb = np.repeat(strip, cell_w, axis=1)
        more = f" (the first {MAX_TILES} of {channels})" if channels > MAX_TILES else ""
        note = f"{len(rows)} channels{more}, one row each, scaled to its own range{averaged}"
        return _with_legend(image_module.fromarray(rgb, "RGB"), [head, note])
    units = value.reshape(-1)
    if units.size <= MAX_TILES:
        return _with_legend(_bars(units, labels), [head, f"{units.size} units, one bar each"])
    columns = 64
    padded = np.full(math.ceil(units.size / columns) * columns, np.nan)
    padded[: units.size] = units
    finite = units[np.isfinite(units)]
    cells = _scaled(np.nan_to_num(padded, nan=finite.min() if finite.size else 0.0))
    grid = VIRIDIS[cells.reshape(-1, columns)]
    grid[np.isnan(padded).reshape(-1, columns)] = 255
    big = np.repeat(np.repeat(grid, 6, axis=0), 6, axis=1)
    note = f"{units.size} units, {columns} a row, scaled to the layer's range"
    return _with_legend(image_module.fromarray(big, "RGB"), [head, note])


def _bars(units: np.ndarray, labels: Sequence[str] | None = None, height: int = 96):
    """A bar per unit from a zero line: up for positive values, down for negative; up to
    32 bars are named below (by ``labels`` when there is one per unit, else by index)."""
    image_module = pillow()
    from PIL import ImageDraw

    finite = np.nan_to_num(units.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    named = units.size <= 32
    if named and (labels is None or len(labels) != units.size):
        labels = [str(i) for i in range(units.size)]
    font = _font()
    probe = ImageDraw.Draw(image_module.new("RGB", (1, 1)))
    text_width = max((probe.textbbox((0, 0), t, font=font)[2] for t in labels or []), default=0)
    bar = max(2, min(24, 768 // max(units.size, 1)))
    if named:
        bar = max(bar, text_width + 6)
    top, bottom = max(float(finite.max()), 0.0), min(float(finite.min()), 0.0)
    span = (top - bottom) or 1.0
    zero = round(height * top / span)
    width = units.size * bar
    canvas = image_module.new("RGB", (width, height + (20 if named else 1)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if named:
        for i, text in enumerate(labels):
            draw.text((i * bar + 1, height + 4), text, fill=INK, font=font)
    for i, v in enumerate(finite):
        edge = zero - round(height * v / span)
        y0, y1 = sorted((zero, edge))
        colour = tuple(int(c) for c in VIRIDIS[_scaled(np.array([v, bottom, top]))[0]])
        draw.rectangle((i * bar, y0, i * bar + bar - 2, y1), fill=colour)
    draw.line((0, zero, width, zero), fill=(150, 150, 150))
    return canvas


def first_conv_kernels(model) -> tuple[str, np.ndarray] | None:
    """The name and weight (K×C×kh×kw) of the first 2-D convolution, when it reads 1 or 3
    channels per group; None if there is none."""
    for node in model.graph.nodes:
        if node.op != "conv" or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        if not weight.is_param or len(weight.shape) != 4 or not weight.has_data:
            return None
        if weight.shape[1] not in (1, 3):
            return None
        return node.outputs[0].name, weight.data
    return None


def kernels_image(name: str, weight: np.ndarray):
    """The kernels of a convolution as tiles: colour (RGB) when each reads 3 channels, grey
    when 1; each kernel scaled to its own range."""
    kernels = weight[:MAX_TILES].astype(np.float64)
    tiles = []
    for k in kernels:
        scaled = _scaled(k)
        if k.shape[0] == 3:
            tiles.append(np.ascontiguousarray(scaled.transpose(1, 2, 0)))
        else:
            tiles.append(np.repeat(scaled[0][:, :, None], 3, axis=2))
    h, w = weight.shape[2:]
    # Blue gaps: a kernel's white, grey and black cells must not merge with them.
    body = _grid(tiles, _columns(len(tiles), h, w), _scale_for(h, w, 40), (70, 130, 180), 4)
    kind = "colour (RGB)" if weight.shape[1] == 3 else "grey"
    head = f"{name}: {weight.shape[0]} kernels {h}x{w}, {kind}  {_range_text(weight)}"
    return _with_legend(body, [head, "each kernel scaled to its own range: black low, white high"])


def _display(x: np.ndarray):
    """An input item (C×H×W) as a picture: scaled to its own range (grey or RGB)."""
    image_module = pillow()
    scaled = _scaled(x)
    if x.shape[0] == 3:
        return image_module.fromarray(np.ascontiguousarray(scaled.transpose(1, 2, 0)), "RGB")
    return image_module.fromarray(scaled[0], "L").convert("RGB")


def prediction_image(
    picture, scores: np.ndarray, labels: Sequence[str] | None = None, top: int = 5
):
    """The input picture beside a bar list of its top classes (``scores``: one item's
    output; shown as probabilities, through a softmax when they are not ones)."""
    image_module = pillow()
    from PIL import ImageDraw

    scores = np.nan_to_num(scores.astype(np.float64).reshape(-1), nan=-np.inf)
    probabilities = scores
    note = "probabilities"
    if not (np.all(scores >= 0) and abs(scores.sum() - 1.0) < 1e-3):
        shifted = np.exp(scores - scores.max())
        probabilities, note = shifted / shifted.sum(), "softmax of the outputs"
    best = np.argsort(-probabilities, kind="stable")[:top]
    scale = max(1, math.ceil(160 / max(picture.size)))
    shown = picture.resize((picture.width * scale, picture.height * scale), 0)
    font = _font()
    row, bar_width = 22, 220
    names = [f"{c} {labels[c]}" if labels else f"class {c}" for c in best]
    probe = ImageDraw.Draw(image_module.new("RGB", (1, 1)))
    name_width = max(probe.textbbox((0, 0), n, font=font)[2] for n in names) + 8
    list_width = name_width + bar_width + 60
    width = shown.width + list_width + 3 * MARGIN
    height = max(shown.height, row * len(best) + 20) + 2 * MARGIN
    canvas = image_module.new("RGB", (width, height), BACKGROUND)
    canvas.paste(shown, (MARGIN, MARGIN))
    draw = ImageDraw.Draw(canvas)
    x0 = shown.width + 2 * MARGIN
    draw.text((x0, MARGIN), f"top {len(best)} ({note})", fill=INK, font=font)
    for i, c in enumerate(best):
        y = MARGIN + 20 + i * row
        p = float(probabilities[c])
        draw.text((x0, y + 3), names[i], fill=INK, font=font)
        length = max(1, round(bar_width * p))
        colour = tuple(int(v) for v in VIRIDIS[200 if i == 0 else 90])
        draw.rectangle((x0 + name_width, y, x0 + name_width + length, y + row - 6), fill=colour)
        draw.text((x0 + name_width + length + 6, y + 3), f"{p:.3f}", fill=INK, font=font)
    return canvas


def layer_pngs(
    model,
    x: np.ndarray | Sequence[np.ndarray],
    layers: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    picture=None,
) -> dict[str, bytes]:
    """PNG bytes of the pictures of ``model`` run on ``x`` (one array, or one per input),
    for the batch's first item: each layer's feature maps by value name, in graph order
    (``layers``: only these names; default every input and node output), then
    ``KERNELS`` ("@kernels", the first convolution's kernels, when it reads 1 or 3
    channels) and ``PREDICTION`` ("@prediction", when the first output is N×classes; with
    ``labels``, one name per class). ``picture`` (a PIL image) is shown in the prediction
    instead of the input scaled to its range."""
    pillow()
    inputs = (x,) if isinstance(x, np.ndarray) else tuple(x)
    values = model.activations(*inputs)
    if layers is not None:
        unknown = [name for name in layers if name not in values]
        if unknown:
            import difflib

            close = difflib.get_close_matches(unknown[0], list(values), n=3)
            raise UsageError(
                f"{model.name} has no layer named {unknown[0]!r}",
                hint=("did you mean " + " or ".join(close) + "? " if close else "")
                + "cnnc dump lists the names (-O0 for every layer as written)",
            )
    chosen = list(values) if layers is None else [n for n in values if n in set(layers)]
    pngs = {
        name: _png(feature_map_image(name, values[name][0], labels), viridis=True)
        for name in chosen
    }
    kernels = first_conv_kernels(model)
    if kernels is not None:
        pngs[KERNELS] = _png(kernels_image(*kernels))
    first = model.graph.outputs[0]
    out = values[first.name]
    if out.ndim == 2 and out.shape[1] > 1:
        if picture is None and inputs[0].ndim == 4:
            picture = _display(inputs[0][0])
        if picture is not None:
            pngs[PREDICTION] = _png(prediction_image(picture.convert("RGB"), out[0], labels))
    return pngs
