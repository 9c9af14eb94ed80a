"""`cnnc graph`: the layered layout of every example (no overlaps, bends only between
layers, clusters from the layer names), its SVG (valid XML, foldable) and its DOT."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET

import pytest

import cnnc
from cnnc.cli import main
from cnnc.ir.graph import Graph
from cnnc.ir.types import TensorType
from cnnc.viz.graph import (
    FOLDED_H,
    fold_geometry,
    folded_box,
    layout,
    render_svg,
    to_dot,
    to_svg,
)
from tests.conftest import EXAMPLES

SVG = "{http://www.w3.org/2000/svg}"
EXAMPLE_NAMES = sorted(p.stem for p in EXAMPLES.glob("*.cnn"))
_GRAPHS: dict[str, Graph] = {}


def graph_of(name: str) -> Graph:
    if name not in _GRAPHS:
        _GRAPHS[name] = cnnc.load(EXAMPLES / f"{name}.cnn").graph
    return _GRAPHS[name]


def overlap(a: tuple, b: tuple) -> bool:
    """Whether two (x, y, w, h) rectangles share interior points."""
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    return (
        ax < bx + bw - 1e-6 and bx < ax + aw - 1e-6 and ay < by + bh - 1e-6 and by < ay + ah - 1e-6
    )


def inside(a: tuple, b: tuple) -> bool:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    return (
        bx - 1e-6 <= ax
        and ax + aw <= bx + bw + 1e-6
        and by - 1e-6 <= ay
        and ay + ah <= by + bh + 1e-6
    )


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_layout_of_every_example_has_no_overlap_and_bends_only_between_boxes(name):
    graph = graph_of(name)
    lay = layout(graph)
    boxes = {k: (b.x, b.y, b.w, b.h) for k, b in lay.boxes.items()}
    rects = {k: (c.x, c.y, c.w, c.h) for k, c in lay.clusters.items()}
    # One box per node, per input, per output.
    assert sorted(b.name for b in lay.boxes.values() if b.kind == "node") == sorted(
        n.name for n in graph.nodes
    )
    assert sum(b.kind == "input" for b in lay.boxes.values()) == len(graph.inputs)
    assert sum(b.kind == "output" for b in lay.boxes.values()) == len(graph.outputs)
    keys = sorted(boxes)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            assert not overlap(boxes[a], boxes[b]), (a, b)
    # Every box lies in its cluster and in no other cluster but the ones around it.
    for k, b in lay.boxes.items():
        mine = set(lay.ancestors(b.cluster))
        for cid, r in rects.items():
            if cid in mine:
                assert inside(boxes[k], r), (k, cid)
            else:
                assert not overlap(boxes[k], r), (k, cid)
    # Clusters nest: inside their parent, apart from every cluster they are not in.
    for cid, c in lay.clusters.items():
        if c.parent is not None:
            assert inside(rects[cid], rects[c.parent]), cid
        for other in lay.clusters:
            if other not in lay.ancestors(cid) and cid not in lay.ancestors(other):
                assert not overlap(rects[cid], rects[other]), (cid, other)
    # Edges run vertically through boxes' layers and bend only where no box is.
    for s in lay.segments:
        for (ax, ay), (bx, by) in zip(s.points, s.points[1:], strict=False):
            assert by >= ay, s
            span = (min(ax, bx), ay, abs(bx - ax), by - ay)
            if ax == bx:
                span = (ax - 0.5, ay, 1.0, by - ay)
            for k, box in boxes.items():
                assert not overlap(span, box), (s.value, k, span, box)


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_svg_and_dot_of_every_example(name):
    graph = graph_of(name)
    lay = layout(graph)
    svg = to_svg(graph)
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    assert float(root.get("width")) > 0 and root.get("viewBox").startswith("0 0 ")
    drawn = root.findall(f".//{SVG}g")
    assert sum("box" in g.get("class", "").split() for g in drawn) == len(lay.boxes)
    assert sum("cluster" in g.get("class", "").split() for g in drawn) == len(lay.clusters)
    arrows = [p for p in root.iter(f"{SVG}path") if p.get("marker-end")]
    # One edge per use of a value: each node's distinct activation inputs, each output.
    uses = sum(len({id(v) for v in n.inputs if not v.is_param}) for n in graph.nodes)
    assert len(arrows) == len(lay.edges) == uses + len(graph.outputs)
    dot = to_dot(graph)
    assert dot.startswith("digraph ") and dot.count("{") == dot.count("}")
    assert dot.count("subgraph ") == len(lay.clusters)
    assert len(re.findall(r" -> ", dot)) == len(lay.edges)
    for node in graph.nodes:
        assert f'"n:{node.name}" [label=' in dot


def test_clusters_come_from_the_hierarchical_names():
    lay = layout(graph_of("resnet18"))
    assert {"layer1", "layer1.0", "layer2.0", "layer4.1"} <= set(lay.clusters)
    assert lay.clusters["layer2.0"].parent == "layer2"
    assert lay.clusters["layer2"].depth == 1 and lay.clusters["layer2.0"].depth == 2
    # A prefix holding a single layer is no cluster: layer2.0.downsample.0 sits in layer2.0.
    assert "layer2.0.downsample" not in lay.clusters
    assert lay.boxes["n:layer2.0.downsample.0"].cluster == "layer2.0"
    assert lay.clusters["layer2.0"].ops == 5
    # A layer named after another (c1, then c1.maxpool) makes no cluster.
    assert layout(graph_of("lenet5")).clusters == {}
    # The Inception module: four branches side by side in one cluster.
    g = layout(graph_of("googlenet"))
    module = g.clusters["inception3a"]
    assert module.children[:2] == ["n:inception3a.branch1.conv", "inception3a.branch2"]
    heads = [g.boxes[k] for k in ("n:inception3a.branch1.conv", "n:inception3a.maxpool1")]
    assert heads[0].y == heads[1].y and heads[0].x < heads[1].x


def test_a_chain_of_blocks_stays_in_one_column():
    lay = layout(graph_of("densenet121"))
    boxes = [lay.boxes[f"n:denseblock3.{i}.norm1"] for i in range(24)]
    xs = {round(b.x + b.w / 2) for b in boxes}
    assert len(xs) == 1


def test_fold_depth_one_shows_the_stages_of_resnet50_with_their_blocks_folded():
    graph = graph_of("resnet50")
    lay = layout(graph)
    folded = {c for c, cl in lay.clusters.items() if cl.depth > 1}
    shown, hidden, ymap, height = fold_geometry(lay, folded)
    assert shown == {c for c in folded if lay.clusters[c].depth == 2}
    assert len(shown) == 3 + 4 + 6 + 3
    assert height < lay.height / 2
    visible = [(b.x, ymap(b.y), b.w, b.h) for b in lay.boxes.values() if not hidden(b.cluster)]
    for cid in shown:
        x, y, w, _h = folded_box(lay.clusters[cid])
        visible.append((x, ymap(y), w, FOLDED_H))
    assert len(visible) == 2 + 2 + 3 + 16  # input, conv1, maxpool1, gap, fc, flatten, output
    for i, a in enumerate(visible):
        for b in visible[i + 1 :]:
            assert not overlap(a, b), (a, b)
    root = ET.fromstring(to_svg(graph, fold=1))
    assert float(root.get("height")) == pytest.approx(round(height, 1))
    titles = [t.text for t in root.iter(f"{SVG}text") if t.text and t.text.startswith("▸")]
    assert len(titles) == 4 + 16  # every cluster has its folded box, hidden where unfolded
    shown_boxes = [
        g
        for g in root.iter(f"{SVG}g")
        if g.get("class") == "folded" and g.find(f"{SVG}rect") is not None
    ]
    assert len(shown_boxes) == 16


def test_the_svg_folds_by_itself_and_asks_for_nothing_outside():
    svg = to_svg(graph_of("resnet18"))
    script = ET.fromstring(svg).find(f"{SVG}script")
    assert "addEventListener" in script.text and "currentScript" in script.text
    assert 'class="ctitle' in svg and "cursor:pointer" in svg
    assert re.findall(r"https?://[^\"]*", svg) == ["http://www.w3.org/2000/svg"]
    assert "<style>" in svg and "href=" not in svg


def test_the_picture_is_the_same_every_time():
    assert to_svg(graph_of("googlenet"), fold=1) == to_svg(graph_of("googlenet"), fold=1)
    assert to_dot(graph_of("unet")) == to_dot(graph_of("unet"))


def test_names_are_escaped():
    g = Graph('a<b>&"c')
    x = g.add_input("x&<", TensorType("f32", ("N", 3, 8, 8)))
    y = g.add_node("relu", [x], name='blk<1>.r"&').output
    z = g.add_node("relu", [y], name="blk<1>.s'").output
    g.outputs = [z]
    svg = to_svg(g)
    root = ET.fromstring(svg)
    assert root.find(f"{SVG}title").text == 'a<b>&"c'
    assert "blk<1>" in [c.get("data-id") for c in root.iter(f"{SVG}g") if c.get("data-id")]
    dot = to_dot(g)
    assert '"n:blk<1>.r\\"&"' in dot and dot.count("{") == dot.count("}")


def test_layout_of_densenet121_takes_less_than_two_seconds():
    graph = graph_of("densenet121")
    start = time.perf_counter()
    layout(graph)
    assert time.perf_counter() - start < 2.0


def test_cnnc_graph_writes_svg_and_dot(tmp_path, capsys):
    svg, dot = tmp_path / "net.svg", tmp_path / "net.dot"
    assert main(["graph", str(EXAMPLES / "resnet18.cnn"), "--fold", "1", "-o", str(svg)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert ET.parse(svg).getroot().tag == f"{SVG}svg"
    assert main(["graph", str(EXAMPLES / "lenet5.cnn"), "-O0", "-o", str(dot)]) == 0
    assert dot.read_text().startswith('digraph "lenet5"')
    capsys.readouterr()
    assert main(["graph", str(EXAMPLES / "lenet5.cnn"), "-o", "-"]) == 0
    assert capsys.readouterr().out.startswith("<svg ")


def test_cnnc_graph_refuses_other_formats(tmp_path, capsys):
    out = tmp_path / "net.png"
    assert main(["graph", str(EXAMPLES / "lenet5.cnn"), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "writes SVG (.svg) or DOT (.dot), not .png" in err and not out.exists()
    assert (
        main(["graph", str(EXAMPLES / "lenet5.cnn"), "--fold", "1", "-o", str(tmp_path / "a.dot")])
        == 1
    )
    assert "--fold applies to SVG" in capsys.readouterr().err


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium on PATH (apt-get install chromium): the folding script runs untested",
)
def test_in_a_browser_a_click_folds_a_cluster_as_the_python_drawing_does(tmp_path):
    graph = graph_of("resnet18")
    lay = layout(graph)
    clicks = """<script>
var s = document.querySelector("svg"), c = s.querySelector('.cluster[data-id="layer1"]');
c.querySelector(".ctitle").dispatchEvent(new MouseEvent("click", {bubbles: true}));
document.body.dataset.folded = s.getAttribute("height");
document.body.dataset.edges = JSON.stringify([...s.querySelectorAll(".edge:not(.hide)")]
  .map(e => e.getAttribute("d")));
c.querySelector(".folded").dispatchEvent(new MouseEvent("click", {bubbles: true}));
document.body.dataset.unfolded = s.getAttribute("height");
</script>"""
    page = tmp_path / "page.html"
    page.write_text(f"<!doctype html><html><body>{to_svg(graph)}{clicks}</body></html>")
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    body = re.search(r"<body([^>]*)>", proc.stdout).group(1)
    data = {k: html.unescape(v) for k, v in re.findall(r'data-(\w+)="([^"]*)"', body)}
    _, _, _, height = fold_geometry(lay, {"layer1"})
    assert float(data["folded"]) == pytest.approx(height, abs=0.11)
    assert float(data["unfolded"]) == pytest.approx(lay.height, abs=0.11)
    # Every edge the script redrew is where the Python drawing of the same state puts it.
    drawn = ET.fromstring(render_svg(lay, graph.name, {"layer1"}))
    expected = [
        p.get("d")
        for p in drawn.iter(f"{SVG}path")
        if "edge" in p.get("class", "") and "hide" not in p.get("class", "")
    ]
    got = json.loads(data["edges"])
    assert len(got) == len(expected) < len(lay.segments)

    def numbers(d: str) -> list[float]:
        return [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", d)]

    for a, b in zip(got, expected, strict=True):
        assert numbers(a) == pytest.approx(numbers(b), abs=0.15), (a, b)
