"""``cnnc report``: one self-contained HTML page about a network.

The page opens offline and makes no request: its CSS is inline, its charts and its
graph are inline SVG, its pictures are PNG ``data:`` URIs, and it has no script. It
holds, in this order:

- a header: the network's name, its parameters and multiply-accumulates, the
  optimization level, where the weights and the input came from, cnnc's version;
- where the parameters and the MACs are: a stacked bar per layer kind and a bar per
  layer, with a caption stating the fc layers' share computed for this network;
- the summary table of ``cnnc summary`` (blocks with subtotals; per layer: input,
  output, kernel, parameters, MACs, output bytes, receptive field, connected-to), of
  the network as written (-O0);
- the graph (:func:`cnnc.viz.graph.to_svg`);
- every layer's feature maps for the input (:func:`cnnc.viz.maps.layer_pngs`), each
  picture at most :data:`MAX_PICTURE_SIDE` pixels on its longer side;
- the IR dump of the network at the optimization level asked for (-O2 by default).

A piece whose module is not installed (the graph, the feature maps, or Pillow for
them) is a section saying so, never an error: the rest of the report stands.
"""

from __future__ import annotations

import base64
import html
import importlib.util
import io
from dataclasses import dataclass

import numpy as np

import cnnc
from cnnc.ir.graph import Graph, is_statistic

# The longer side of a feature-map picture in the page, in pixels: a larger grid is
# shrunk to this (its legend stays legible), so that ResNet-50's 92 pictures of a random
# input, whose noise does not compress, take about 13 MB rather than 20.
MAX_PICTURE_SIDE = 512

# One colour per kind of layer in the charts (the rest cycle through OTHER_COLOURS).
COLOURS = {
    "conv": "#4e79a7",
    "fc": "#e15759",
    "bn": "#f28e2b",
    "conv_transpose": "#76b7b2",
    "depthwise": "#59a14f",
}
OTHER_COLOURS = ["#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac", "#86bcb6"]


@dataclass(frozen=True)
class LayerRow:
    """A node of the graph, as the charts count it."""

    name: str
    op: str  # the op as the dump labels it (conv2d, fc, maxpool2d, ...)
    kind: str  # the IR op (conv, fc, bn, ...): what the charts group by
    shape: str  # the output shape(s), e.g. [N,64,112,112]
    params: int  # learned values (batch-norm running statistics are not counted)
    macs: int  # multiply-accumulates per item


def layer_rows(graph: Graph) -> list[LayerRow]:
    """One row per node of ``graph``: the figures the charts and the header add up
    (those ``cnnc summary`` prints)."""
    from cnnc.ops import get_op

    rows = []
    for node in graph.nodes:
        opdef = get_op(node.op)
        params = sum(int(v.type.numel() or 0) for v in node.params if not is_statistic(v))
        shape = " ".join("[" + ",".join(map(str, v.type.shape)) + "]" for v in node.outputs)
        rows.append(
            LayerRow(node.name, opdef.label(node), node.op, shape, params, int(opdef.macs(node)))
        )
    return rows


def _colour(kind: str, kinds: list[str]) -> str:
    if kind in COLOURS:
        return COLOURS[kind]
    others = [k for k in kinds if k not in COLOURS]
    return OTHER_COLOURS[others.index(kind) % len(OTHER_COLOURS)]


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:g}"


def _bytes(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 100_000 else f"{n / 1e3:,.1f} kB"


def _pct(part: int, whole: int) -> str:
    """A share in percent: one decimal, or two significant digits under 1% (a share is
    0 only when the part is)."""
    if not whole or not part:
        return "0%"
    p = 100 * part / whole
    return f"{p:.1f}%" if p >= 1 else f"{p:.2g}%"


def _text(x: float, y: float, s: str, anchor: str = "start", extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}>{html.escape(s)}</text>'


def kind_chart(rows: list[LayerRow]) -> str:
    """An SVG of two stacked bars, the parameters and the MACs, split by layer kind."""
    kinds = _kinds(rows)
    total = {"params": sum(r.params for r in rows), "macs": sum(r.macs for r in rows)}
    width, left, bar = 760, 110, 620
    parts = []
    for i, (what, title) in enumerate((("params", "parameters"), ("macs", "MACs"))):
        y = 10 + i * 40
        parts.append(_text(left - 8, y + 17, title, "end"))
        x = float(left)
        for kind in kinds:
            share = sum(getattr(r, what) for r in rows if r.kind == kind)
            if not share:
                continue
            w = bar * share / total[what] if total[what] else 0
            tip = f"{kind}: {share:,} {title} ({_pct(share, total[what])})"
            parts.append(
                f'<rect x="{x:.2f}" y="{y}" width="{w:.2f}" height="26" '
                f'fill="{_colour(kind, kinds)}"><title>{html.escape(tip)}</title></rect>'
            )
            if w > 44:
                parts.append(
                    _text(x + w / 2, y + 17, _pct(share, total[what]), "middle", ' fill="#fff"')
                )
            x += w
    # The legend: each kind with its shares.
    y = 100
    for j, kind in enumerate(kinds):
        p = sum(r.params for r in rows if r.kind == kind)
        m = sum(r.macs for r in rows if r.kind == kind)
        col, row = j % 3, j // 3
        lx, ly = left + col * 215, y + row * 20
        parts.append(
            f'<rect x="{lx}" y="{ly - 11}" width="12" height="12" fill="{_colour(kind, kinds)}"/>'
        )
        parts.append(
            _text(lx + 17, ly, f"{kind}: {_pct(p, total['params'])} / {_pct(m, total['macs'])}")
        )
    height = y + 20 * ((len(kinds) + 2) // 3) + 4
    return _svg(width, height, "parameters and MACs by kind of layer", "".join(parts))


def layer_chart(rows: list[LayerRow]) -> str:
    """An SVG of one row per layer that has parameters or MACs: a bar of its parameters
    and a bar of its MACs, each scaled to the largest layer's."""
    kinds = _kinds(rows)
    shown = [r for r in rows if r.params or r.macs]
    most_params = max((r.params for r in shown), default=0) or 1
    most_macs = max((r.macs for r in shown), default=0) or 1
    name_w, bar_w, gap, h = 190, 250, 90, 15
    width = name_w + 2 * (bar_w + gap)
    parts = [
        _text(name_w, 12, "parameters", extra=' font-weight="bold"'),
        _text(name_w + bar_w + gap, 12, "MACs", extra=' font-weight="bold"'),
    ]
    for i, r in enumerate(shown):
        y = 20 + i * h
        name = r.name if len(r.name) <= 28 else "…" + r.name[-27:]
        parts.append(_text(name_w - 6, y + 11, name, "end"))
        for j, (value, most) in enumerate(((r.params, most_params), (r.macs, most_macs))):
            x = name_w + j * (bar_w + gap)
            w = max(bar_w * value / most, 1.0 if value else 0.0)
            tip = f"{r.name} ({r.op}): {value:,} {'parameters' if j == 0 else 'MACs'}"
            parts.append(
                f'<rect x="{x}" y="{y + 2}" width="{w:.2f}" height="{h - 4}" '
                f'fill="{_colour(r.kind, kinds)}"><title>{html.escape(tip)}</title></rect>'
            )
            if value:
                parts.append(_text(x + w + 4, y + 11, _si(value)))
    height = 24 + len(shown) * h
    return _svg(width, height, "parameters and MACs of each layer", "".join(parts))


def _kinds(rows: list[LayerRow]) -> list[str]:
    """The kinds of layer that hold parameters or MACs, the most parameters first."""
    weight: dict[str, tuple[int, int]] = {}
    for r in rows:
        if r.params or r.macs:
            p, m = weight.get(r.kind, (0, 0))
            weight[r.kind] = (p + r.params, m + r.macs)
    return sorted(weight, key=lambda k: (-weight[k][0], -weight[k][1], k))


def _svg(width: int, height: int, title: str, body: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" font-family="sans-serif" font-size="11">'
        f"<title>{html.escape(title)}</title>{body}</svg>"
    )


def fc_caption(rows: list[LayerRow]) -> str:
    """What the charts show about the fc layers, from this network's figures (the
    tutorial's point: in VGG-16 the fc layers hold 89% of the parameters for a few
    percent of the MACs, and global average pooling removes them)."""
    params = sum(r.params for r in rows)
    macs = sum(r.macs for r in rows)
    fc = [r for r in rows if r.kind == "fc"]
    fc_params = sum(r.params for r in fc)
    fc_macs = sum(r.macs for r in fc)
    gap = any(r.kind == "gap" for r in rows)
    if not fc:
        holders = sorted({r.kind for r in rows if r.params})
        where = f"in its {', '.join(holders)} layers" if holders else "nowhere: it has none"
        text = f"This network has no fc layer: its {params:,} parameters are all {where}"
        return text + (
            ", and gap (global average pooling) turns the last feature maps into scores."
            if gap
            else "."
        )
    many = len(fc) > 1
    layers = f"The {len(fc)} fc layers hold" if many else f"The fc layer {fc[0].name} holds"
    text = (
        f"{layers} {_pct(fc_params, params)} of the parameters ({fc_params:,} of {params:,}) "
        f"but {'do' if many else 'does'} {_pct(fc_macs, macs)} of the multiply-accumulates."
    )
    if gap:
        return text + (
            " Global average pooling (gap) before the classifier keeps its fc layer small: "
            "it sees one value per channel, not a whole feature map."
        )
    return text + (
        " Replacing the flatten and fc layers by a last convolution with one map per "
        "class and gap (global average pooling, as ResNet does; see "
        "examples/gap_classifier.cnn) removes those parameters."
    )


def _count(n: int) -> str:
    return f"{n:,}" if n else ""


def _dims(shapes: list[list]) -> str:
    return " ".join("[" + ",".join(map(str, s)) + "]" for s in shapes)


def _axes(values: list | None) -> str:
    return "×".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values or [])


def summary_table(graph: Graph) -> str:
    """The table of ``cnnc summary`` (:func:`cnnc.ir.printer.summary_rows`: blocks with
    subtotals, inputs, kernels, output bytes, receptive fields, what a layer reads where
    values branch), as HTML."""
    from cnnc.ir import printer

    data = printer.summary_data(graph)
    e = html.escape
    cells = []
    for r in data["rows"]:
        block = r["kind"] == "block"
        kernel = _axes(r["kernel"])
        if kernel and any(s != 1 for s in r["stride"] or []):
            kernel += f" /{_axes(r['stride'])}"
        name = e(r["label"]) + (f" ({r['layers']} layers)" if block else "")
        cells.append(
            f'<tr class="{"block" if block else "layer"}">'
            f'<td style="padding-left:{0.4 + 1.2 * r["depth"]:.1f}em">{name}</td>'
            f"<td>{e(str(r['op']))}</td><td>{e(_dims(r['inputs']))}</td>"
            f"<td>{e(_dims(r['outputs']))}</td><td>{e(kernel)}</td>"
            f'<td class="n">{_count(r["params"])}</td><td class="n">{_count(r["macs"])}</td>'
            f'<td class="n">{_bytes(r["bytes"]) if r["bytes"] else ""}</td>'
            f"<td>{e(_axes(r['receptive_field']))}</td>"
            f"<td>{e(', '.join(r['connected_to']))}</td></tr>"
        )
    t = data["totals"]
    heads = ["layer", "op", "input", "output", "kernel /stride"]
    numbers = ["params", "MACs", "output (batch 1)"]
    return (
        '<table class="summary"><thead><tr>'
        + "".join(f"<th>{h}</th>" for h in heads)
        + "".join(f'<th class="n">{h}</th>' for h in numbers)
        + "<th>receptive field</th><th>connected to</th></tr></thead><tbody>"
        + "".join(cells)
        + "</tbody><tfoot><tr><td>total</td><td></td><td></td><td></td><td></td>"
        f'<td class="n">{t["params"]:,}</td><td class="n">{t["macs"]:,}</td>'
        f'<td class="n">{_bytes(t["bytes"])}</td><td></td><td></td></tr></tfoot></table>'
        f'<p class="note">Activation memory at batch 1: {_bytes(t["bytes"])} for every '
        f"output, {_bytes(t['peak_bytes'])} at the interpreter's peak.</p>"
    )


# A graph of more nodes than this starts with its blocks inside blocks folded (a
# ResNet-50 shows its four stages, each a column of folded bottleneck blocks).
FOLD_ABOVE = 80


def graph_svg(graph: Graph) -> str | None:
    """The graph as inline SVG from :mod:`cnnc.viz.graph` (its clusters fold on a click),
    or None where that module is not installed."""
    if importlib.util.find_spec("cnnc.viz.graph") is None:
        return None
    from cnnc.viz import graph as graph_mod

    return graph_mod.to_svg(graph, fold=1 if len(graph.nodes) > FOLD_ABOVE else None)


def _have_pillow() -> bool:
    return importlib.util.find_spec("PIL") is not None


def shrink_png(data: bytes, max_side: int = MAX_PICTURE_SIDE) -> bytes:
    """A PNG no larger than ``max_side`` pixels on its longer side (the same bytes if it
    already is)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if max(image.size) <= max_side:
            return data
        scale = max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        small = image.convert("RGB").resize(size, Image.Resampling.BOX)
        if image.mode == "P":  # back to the picture's own palette: a byte a pixel
            small = small.quantize(palette=image, dither=Image.Dither.NONE)
        out = io.BytesIO()
        small.save(out, format="PNG", compress_level=6)
        return out.getvalue()


def feature_map_pngs(
    model: cnnc.Model,
    x: np.ndarray,
    labels: list[str] | None = None,
    layers: list[str] | None = None,
) -> dict[str, bytes] | None:
    """Each layer's feature-map picture for ``x`` (see :func:`cnnc.viz.maps.layer_pngs`),
    each shrunk by :func:`shrink_png`; None where the module that draws them is not
    installed."""
    draw = _layer_pngs()
    if draw is None or not _have_pillow():
        return None
    pictures = draw(model, x, layers=layers, labels=labels)
    return {key: shrink_png(png) for key, png in pictures.items()}


def _layer_pngs():
    """:func:`cnnc.viz.maps.layer_pngs`, or None where this cnnc has no such module."""
    if importlib.util.find_spec("cnnc.viz.maps") is None:
        return None
    from cnnc.viz import maps

    return maps.layer_pngs


CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0; color: #222; background: #fafafa; }
main { max-width: 1100px; margin: 0 auto; padding: 1em 1.5em 3em; }
h1 { margin-bottom: .2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
.facts { display: grid; grid-template-columns: max-content 1fr; gap: .15em 1.2em; }
.facts dt { color: #666; } .facts dd { margin: 0; }
nav a { margin-right: 1em; }
.scroll { overflow: auto; max-height: 80vh; border: 1px solid #ddd; background: #fff; }
table.summary { border-collapse: collapse; font: 12px/1.3 ui-monospace, monospace; }
table.summary th, table.summary td { padding: 2px 10px; border-bottom: 1px solid #eee;
  text-align: left; white-space: nowrap; }
table.summary thead th { position: sticky; top: 0; background: #eee; }
table.summary tfoot td { font-weight: bold; border-top: 2px solid #999; }
table.summary tr.block td { font-weight: bold; background: #f3f5fa; }
.n { text-align: right !important; }
pre { font: 12px/1.35 ui-monospace, monospace; background: #fff; border: 1px solid #ddd;
  padding: .8em; overflow: auto; max-height: 80vh; }
figure { margin: 1em 0; } figcaption { color: #444; margin-top: .3em; }
.maps figure { display: inline-block; vertical-align: top; margin: .5em 1em .5em 0; }
.maps img { max-width: 100%; border: 1px solid #ddd; background: #fff; }
.placeholder { border: 2px dashed #c66; padding: 1em; background: #fff5f5; }
.note { color: #555; }
"""


@dataclass
class ReportInput:
    """What the report says about the network: where it came from and what it ran on."""

    source: str  # the model file as the user named it
    weights: str  # "examples/w.npz" or "random He-normal weights (seed 0)"
    input: str  # "photo.jpg" or "a seeded random input (seed 0)"
    opt_level: str  # the level of the IR dump, e.g. "-O2"


def render(
    model: cnnc.Model,
    table_graph: Graph,
    about: ReportInput,
    x: np.ndarray | None,
    labels: list[str] | None = None,
    layers: list[str] | None = None,
) -> str:
    """The report's HTML: ``model`` (optimized as asked) gives the feature maps and the
    dump, ``table_graph`` (the network as written, -O0) the table, charts and graph;
    ``x`` is the input of the feature maps (None: no maps section)."""
    rows = layer_rows(table_graph)
    params = sum(r.params for r in rows)
    macs = sum(r.macs for r in rows)
    e = html.escape
    inputs = ", ".join(f"%{v.name} : {v.type}" for v in table_graph.inputs)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(model.name)}: cnnc report</title>",
        f"<style>{CSS}</style></head><body><main>",
        f'<header id="header"><h1>{e(model.name)}</h1><dl class="facts">',
        f"<dt>model</dt><dd>{e(about.source)}</dd>",
        f"<dt>input</dt><dd>{e(inputs)}</dd>",
        f"<dt>parameters</dt><dd>{params:,} ({_bytes(params * 4)} as float32)</dd>",
        f"<dt>multiply-accumulates</dt><dd>{macs:,} per item ({_si(macs)}MAC)</dd>",
        f"<dt>layers</dt><dd>{len(rows)} as written; {len(model.graph.nodes)} "
        f"after {e(about.opt_level)}</dd>",
        f"<dt>weights</dt><dd>{e(about.weights)}</dd>",
        f"<dt>feature maps of</dt><dd>{e(about.input)}</dd>",
        f"<dt>made by</dt><dd>cnnc {e(cnnc.__version__)} (cnnc report)</dd>",
        "</dl></header>",
        '<nav><a href="#where">parameters and MACs</a><a href="#summary">summary</a>'
        '<a href="#graph">graph</a><a href="#maps">feature maps</a>'
        '<a href="#dump">IR dump</a></nav>',
        '<section id="where"><h2>Where the parameters and the MACs are</h2>',
        f"<figure>{kind_chart(rows)}<figcaption>{e(fc_caption(rows))} "
        "Each bar is 100%: the parameters above, the multiply-accumulates (MACs) below, "
        "split by kind of layer; the legend gives each kind's share of both."
        "</figcaption></figure>",
        f'<figure><div class="scroll">{layer_chart(rows)}</div><figcaption>Each layer '
        "that has parameters or MACs, the bars scaled to the largest layer's.</figcaption>"
        "</figure></section>",
        '<section id="summary"><h2>Summary</h2>',
        '<p class="note">The network as written (-O0), as <code>cnnc summary</code> shows '
        "it: blocks (in bold) give the subtotals of their layers; batch-norm running "
        "statistics are not counted as parameters.</p>"
        f'<div class="scroll">{summary_table(table_graph)}</div></section>',
        '<section id="graph"><h2>Graph</h2>',
        _graph_section(table_graph),
        "</section>",
        '<section id="maps"><h2>Feature maps</h2>',
        _maps_section(model, x, about, labels, layers),
        "</section>",
        f'<section id="dump"><h2>IR dump ({e(about.opt_level)})</h2>',
        f"<pre>{e(model.dump())}</pre></section>",
        "</main></body></html>",
    ]
    return "\n".join(parts) + "\n"


def _graph_section(graph: Graph) -> str:
    svg = graph_svg(graph)
    if svg is None:
        return (
            '<div class="placeholder" id="graph-placeholder">The graph is not in this '
            "report: this cnnc has no <code>cnnc.viz.graph</code> module yet.</div>"
        )
    return (
        '<p class="note">The network as written: a box per layer with its op, output shape '
        "and parameters; a click on a block's title folds it into one box, a click on "
        f'that box unfolds it.</p><div class="scroll">{svg}</div>'
    )


def _maps_section(
    model: cnnc.Model,
    x: np.ndarray | None,
    about: ReportInput,
    labels: list[str] | None,
    layers: list[str] | None = None,
) -> str:
    if x is None:
        return (
            '<div class="placeholder" id="maps-placeholder">No feature maps: the network '
            f"has {len(model.graph.inputs)} inputs; feature maps are drawn for a network "
            "of one input.</div>"
        )
    if not _have_pillow():
        return (
            '<div class="placeholder" id="maps-placeholder">No feature maps: drawing them '
            "needs Pillow (<code>pip install 'cnnc[viz]'</code>).</div>"
        )
    pictures = feature_map_pngs(model, x, labels, layers)
    if pictures is None:  # (Pillow is there: the module that draws is not)
        return (
            '<div class="placeholder" id="maps-placeholder">No feature maps: this cnnc has '
            "no <code>cnnc.viz.maps</code> module yet.</div>"
        )
    e = html.escape
    special = {"@prediction": "the prediction", "@kernels": "the first convolution's kernels"}
    order = [k for k in special if k in pictures] + [k for k in pictures if k not in special]
    # The caption repeats the picture's name and type: a shrunk legend is small.
    types = {v.name: v.type for v in model.graph.inputs}
    types.update((v.name, v.type) for n in model.graph.nodes for v in n.outputs)
    captions = {k: f"{k} : {types[k]}" for k in order if k in types}
    figures = [
        f'<figure><img alt="{e(key)}" src="data:image/png;base64,'
        f'{base64.b64encode(pictures[key]).decode()}">'
        f"<figcaption>{e(special.get(key) or captions.get(key, key))}</figcaption></figure>"
        for key in order
    ]
    return (
        f'<p class="note">For {e(about.input)}; each picture is at most '
        f"{MAX_PICTURE_SIDE} pixels on its longer side.</p>"
        f'<div class="maps">{"".join(figures)}</div>'
    )


def report(
    model: cnnc.Model,
    table_graph: Graph,
    about: ReportInput,
    x: np.ndarray | None = None,
    labels: list[str] | None = None,
    seed: int = 0,
    layers: list[str] | None = None,
) -> str:
    """The HTML of ``cnnc report``: the feature maps of the first item of ``x`` or,
    without it, of a seeded standard-normal input (a network of several inputs gets no
    feature maps); ``labels`` names the classes of the prediction's picture."""
    if len(model.graph.inputs) != 1:
        x = None
    elif x is None:
        x = model.random_input(1, seed)
    return render(model, table_graph, about, None if x is None else x[:1], labels, layers)
