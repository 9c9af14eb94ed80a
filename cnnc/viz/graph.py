"""The network as a picture: a layered layout of the IR graph, drawn as SVG (with foldable
block clusters) or written as DOT.

The layout is our own, in the manner of Sugiyama: the clusters that the hierarchical
layer names make (``layer1.0.conv1`` lies in ``layer1.0``, which lies in ``layer1``)
are laid out bottom-up, each as a layered graph whose items are its layers and its
child clusters (rigid blocks), plus one port on its top border per value that enters
it and one on its bottom border per value that leaves it. Each layered graph gets
longest-path layers, a dummy item per layer that an edge spans, barycentric sweeps
that reduce crossings, and x coordinates that minimise the (weighted) squared bends of
the edges under the order and spacing of every layer (Gauss-Seidel sweeps, each layer
solved exactly by pool-adjacent-violators), which straightens chains.

Folding a cluster replaces it by one box; where no other box lies beside the cluster,
the band it took is removed, so that what follows moves up. The SVG carries the
unfolded geometry and a small script that folds and unfolds on a click of a cluster's
title, with the same rule as :func:`fold_geometry` here, which draws the initial state.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import math
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

from cnnc.ir.graph import Graph, Node, is_statistic

# Sizes, in SVG user units (pixels).
FONT = 11  # px; a character of the sans-serif font is taken as CHAR wide, generously
CHAR = 0.66 * FONT
BOX_H = 36
MIN_BOX_W = 96
GAP_X = 18  # between neighbours in a layer
GAP_DUMMY = 8  # beside an edge passing through a layer
GAP_Y = 30  # between layers
TITLE_H = 22  # the band at the top of a cluster holding its title
PAD = 10  # inside a cluster, around its contents
MARGIN = 12  # around the whole picture
FOLDED_H = 38
SWEEPS = 12  # of crossing reduction
PLACEMENTS = 24  # Gauss-Seidel sweeps of the x placement


@dataclass
class Box:
    """A layer (``kind`` "node"), a graph input or a graph output, at (x, y) of size w×h."""

    id: str
    kind: str
    name: str
    lines: list[str]
    cluster: str | None
    fill: str
    x: float = 0.0
    y: float = 0.0
    w: float = 0.0
    h: float = BOX_H
    params: int = 0


@dataclass
class Cluster:
    """A block: the layers whose names start with ``name + '.'``, drawn as a rectangle."""

    id: str
    name: str
    parent: str | None
    depth: int
    children: list[str] = field(default_factory=list)  # box and cluster ids, in graph order
    ops: int = 0
    params: int = 0
    x: float = 0.0
    y: float = 0.0
    w: float = 0.0
    h: float = 0.0
    compact: bool = False  # no other box lies beside it: folding it removes its band
    anchor: float = 0.0  # x where the first value enters it: its folded box is centred there

    @property
    def title(self) -> str:
        """The name inside the cluster around it (``branch2`` in ``inception3a``), but a
        number keeps the word before it (``layer1.0``, not ``0``)."""
        if not self.parent:
            return self.name
        rest = self.name[len(self.parent) + 1 :]
        return f"{self.parent.rsplit('.', 1)[-1]}.{rest}" if rest[:1].isdigit() else rest


@dataclass
class Segment:
    """A piece of an edge drawn inside one cluster (``owner``, None for the whole picture):
    from a box or a child cluster's bottom port (``src_block``) to a box or a child
    cluster's top port (``dst_block``); ``arrow`` when it ends at a box."""

    owner: str | None
    points: list[tuple[float, float]]
    src_block: str | None
    dst_block: str | None
    arrow: bool
    value: str


@dataclass
class Layout:
    """Where everything is, unfolded: boxes, clusters, edge segments, and the size."""

    boxes: dict[str, Box]
    clusters: dict[str, Cluster]
    segments: list[Segment]
    edges: list[tuple[str, str, str]]  # (value, source box, target box): one per value use
    width: float
    height: float

    def ancestors(self, cluster: str | None) -> list[str]:
        """The cluster and the clusters around it, innermost first."""
        out = []
        while cluster is not None:
            out.append(cluster)
            cluster = self.clusters[cluster].parent
        return out


# ---- what the boxes say --------------------------------------------------------------------


def _count(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _shape(value) -> str:
    dims = list(value.type.shape)
    if dims and not isinstance(dims[0], int):  # the batch axis N
        dims = dims[1:]
    return "×".join(str(d) for d in dims) or "scalar"


def _node_params(node: Node) -> int:
    return sum(int(v.type.numel() or 0) for v in node.params if not is_statistic(v))


_FILLS = (
    (("conv", "deconv"), "#dbe9f6"),
    (("fc", "matmul", "gemm", "linear"), "#fde2c8"),
    (("maxpool", "avgpool", "gap", "lppool", "adaptive", "pool"), "#d9f0d3"),
    (("bn", "batchnorm", "layernorm", "groupnorm", "instancenorm", "lrn", "norm"), "#fff2b3"),
    (("concat", "add", "sub", "mul", "div", "split"), "#e8dcf2"),
    (("softmax", "log_softmax"), "#f9d3d3"),
)


def _fill(op: str) -> str:
    for prefixes, colour in _FILLS:
        if op.startswith(prefixes):
            return colour
    return "#eeeeee"


def _width(lines: list[str]) -> float:
    return max(MIN_BOX_W, max(len(t) for t in lines) * CHAR + 16)


# ---- clusters from names --------------------------------------------------------------------


def _clusters(graph: Graph) -> tuple[dict[str, str | None], dict[str, Cluster]]:
    """Each node's innermost cluster, and the clusters: every proper dotted prefix of a node
    name that names no node or value, dissolved where it would hold a single item."""
    taken = {n.name for n in graph.nodes} | {v.name for v in graph.inputs}
    parent_of: dict[str, str | None] = {}
    for node in graph.nodes:
        parts = node.name.split(".")
        innermost = None
        for i in range(1, len(parts)):
            prefix = ".".join(parts[:i])
            if prefix in taken:
                continue
            parent_of.setdefault(prefix, innermost)
            innermost = prefix
        parent_of[node.name] = innermost
    # Items per cluster, in graph order; then dissolve clusters of one item, innermost first.
    members: dict[str, list[str]] = {}
    for key, parent in parent_of.items():
        if parent is not None:
            members.setdefault(parent, []).append(key)
    for prefix in sorted(members, key=lambda p: -p.count(".")):
        items = members[prefix]
        if len(items) > 1:
            continue
        up = parent_of[prefix]
        for item in items:
            parent_of[item] = up
        if up is not None:
            siblings = members[up]
            at = siblings.index(prefix)
            siblings[at : at + 1] = items
        del members[prefix]
        del parent_of[prefix]
    clusters: dict[str, Cluster] = {}
    for prefix in members:  # outer before inner: members was filled in graph order
        clusters[prefix] = Cluster(prefix, prefix, parent_of[prefix], 0)
    for c in clusters.values():
        c.depth = 1 + sum(1 for _ in _chain(clusters, c.parent))
    node_cluster = {n.name: parent_of[n.name] for n in graph.nodes}
    return node_cluster, clusters


def _chain(clusters: dict[str, Cluster], cid: str | None):
    while cid is not None:
        yield cid
        cid = clusters[cid].parent


# ---- one layered graph -------------------------------------------------------------------------


@dataclass
class _Item:
    key: str
    w: float
    h: float
    order: float  # where it first appears in the graph, to break ties deterministically
    kind: str  # "box", "block", "in", "out", "dummy"
    layer: int = 0
    x: float = 0.0  # centre
    y: float = 0.0  # top
    ins: dict = field(default_factory=dict)  # block: value -> port x offset from the centre
    outs: dict = field(default_factory=dict)


@dataclass
class _Edge:
    src: str
    dst: str
    value: str
    weight: float
    chain: list[str] = field(default_factory=list)  # the dummies, top to bottom


def _offset(item: _Item, value: str, out: bool) -> float:
    if item.kind != "block":
        return 0.0
    return (item.outs if out else item.ins).get(value, 0.0)


def _isotonic(targets: list[float], weights: list[float]) -> list[float]:
    """The non-decreasing sequence nearest to ``targets`` in weighted squares (pool adjacent
    violators)."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for t, w in zip(targets, weights, strict=True):
        blocks.append([t, w, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, n2 = blocks.pop()
            m1, w1, n1 = blocks.pop()
            total = w1 + w2
            blocks.append([(m1 * w1 + m2 * w2) / total, total, n1 + n2])
    out: list[float] = []
    for mean, _, n in blocks:
        out.extend([mean] * n)
    return out


def _crossings(layers: list[list[str]], down: dict[str, list[str]], pos: dict[str, int]) -> int:
    total = 0
    for layer in layers[:-1]:
        pairs = sorted((pos[a], pos[b]) for a in layer for b in down.get(a, ()))
        # pairs cross when their sources and targets are in opposite orders
        ends = [b for _, b in pairs]
        for i in range(len(ends)):
            for j in range(i + 1, len(ends)):
                if ends[j] < ends[i] and pairs[j][0] > pairs[i][0]:
                    total += 1
    return total


def _lay_out(
    items: dict[str, _Item], edges: list[_Edge], top: float, bottom_pad: float
) -> tuple[float, float, list[float], list[float]]:
    """Place ``items`` (layered by their edges): sets their x (centre) and y (top); returns
    the width, the height, and each layer's top and bottom. In-ports go on the top border,
    out-ports on the bottom border. Adds the dummies to ``items`` and ``edge.chain``."""
    preds: dict[str, list[_Edge]] = {k: [] for k in items}
    succs: dict[str, list[_Edge]] = {k: [] for k in items}
    for e in edges:
        preds[e.dst].append(e)
        succs[e.src].append(e)
    # Longest-path layering, in a topological order that follows the graph's order.
    indegree = {k: len(preds[k]) for k in items}
    ready = sorted((it.order, k) for k, it in items.items() if indegree[k] == 0)
    topo: list[str] = []
    heapq.heapify(ready)
    while ready:
        _, k = heapq.heappop(ready)
        topo.append(k)
        for e in succs[k]:
            indegree[e.dst] -= 1
            if indegree[e.dst] == 0:
                heapq.heappush(ready, (items[e.dst].order, e.dst))
    has_ports = any(it.kind == "in" for it in items.values())
    for k in topo:
        it = items[k]
        if it.kind == "in":
            it.layer = 0
        else:
            it.layer = max((items[e.src].layer + 1 for e in preds[k]), default=int(has_ports))
    last = max((it.layer for it in items.values() if it.kind != "out"), default=0) + 1
    for it in items.values():
        if it.kind == "out":
            it.layer = last
    # Pull a node with no inputs down to just above its first user.
    for k in reversed(topo):
        it = items[k]
        if not preds[k] and it.kind in ("box", "block") and succs[k]:
            it.layer = max(it.layer, min(items[e.dst].layer for e in succs[k]) - 1)
    n_layers = max(it.layer for it in items.values()) + 1
    # Dummies for edges that span layers.
    for i, e in enumerate(edges):
        a, b = items[e.src], items[e.dst]
        for layer in range(a.layer + 1, b.layer):
            key = f"\0d{i}.{layer}"
            items[key] = _Item(key, 0.0, 0.0, b.order - 0.5 + 1e-3 * (i + 1), "dummy", layer)
            e.chain.append(key)
    # Adjacency between consecutive layers, along the chains.
    down: dict[str, list[str]] = {k: [] for k in items}
    up: dict[str, list[str]] = {k: [] for k in items}
    links: list[tuple[str, str, float, float, float]] = []  # (upper, lower, w, off_up, off_low)
    for e in edges:
        path = [e.src, *e.chain, e.dst]
        for j in range(len(path) - 1):
            u, v = path[j], path[j + 1]
            down[u].append(v)
            up[v].append(u)
            du = _offset(items[u], e.value, True) if j == 0 else 0.0
            dv = _offset(items[v], e.value, False) if j == len(path) - 2 else 0.0
            inner = 0 < j < len(path) - 2
            w = e.weight * (4.0 if inner else 1.0)
            links.append((u, v, w, du, dv))
    # Crossing reduction: barycentric sweeps from the graph's order; keep the best.
    layers: list[list[str]] = [[] for _ in range(n_layers)]
    for k, it in sorted(items.items(), key=lambda kv: (kv[1].order, kv[0])):
        layers[it.layer].append(k)

    def positions(ls: list[list[str]]) -> dict[str, int]:
        return {k: i for layer in ls for i, k in enumerate(layer)}

    pos = positions(layers)
    best, best_count = [list(layer) for layer in layers], _crossings(layers, down, pos)
    for sweep in range(SWEEPS):
        if best_count == 0:
            break
        downward = sweep % 2 == 0
        indices = range(1, n_layers) if downward else range(n_layers - 2, -1, -1)
        for li in indices:
            neighbours = up if downward else down

            def key(k: str, li=li, neighbours=neighbours) -> float:
                ns = neighbours[k]
                return sum(pos[n] for n in ns) / len(ns) if ns else pos[k]

            layers[li].sort(key=key)
            for i, k in enumerate(layers[li]):
                pos[k] = i
        count = _crossings(layers, down, pos)
        if count < best_count:
            best, best_count = [list(layer) for layer in layers], count
    layers = best
    # x placement: start packed, then sweeps that pull each item towards its neighbours.
    nbrs: dict[str, list[tuple[str, float, float]]] = {k: [] for k in items}
    for u, v, w, du, dv in links:
        nbrs[v].append((u, w, du - dv))  # v wants x_u + du - dv
        nbrs[u].append((v, w, dv - du))

    # A cluster's values leave it in line with the value that enters first (else a chain
    # of clusters drifts sideways, cluster by cluster).
    main_in = min(
        (it for it in items.values() if it.kind == "in"), key=lambda it: it.order, default=None
    )
    if main_in is not None:
        for it in items.values():
            if it.kind == "out":
                nbrs[it.key].append((main_in.key, 4.0, 0.0))
                nbrs[main_in.key].append((it.key, 4.0, 0.0))

    def gap(a: _Item, b: _Item) -> float:
        g = GAP_DUMMY if "dummy" in (a.kind, b.kind) or "in" in (a.kind, b.kind) else GAP_X
        if a.kind in ("in", "out") and b.kind in ("in", "out"):
            g = GAP_DUMMY
        return (a.w + b.w) / 2 + g

    for layer in layers:
        x = 0.0
        for i, k in enumerate(layer):
            if i:
                x += gap(items[layer[i - 1]], items[k])
            items[k].x = x
        for k in layer:
            items[k].x -= x / 2
    order = list(range(n_layers))
    for sweep in range(PLACEMENTS):
        for li in order if sweep % 2 == 0 else order[::-1]:
            layer = layers[li]
            if not layer:
                continue
            seps = [0.0]
            for i in range(1, len(layer)):
                seps.append(seps[-1] + gap(items[layer[i - 1]], items[layer[i]]))
            targets, weights = [], []
            for k, s in zip(layer, seps, strict=True):
                ns = nbrs[k]
                total = sum(w for _, w, _ in ns)
                want = sum(w * (items[n].x + d) for n, w, d in ns) / total if total else items[k].x
                targets.append(want - s)
                weights.append(total or 0.01)
            fitted = _isotonic(targets, weights)
            for k, f, s in zip(layer, fitted, seps, strict=True):
                items[k].x = f + s
    # Straighten: move an item exactly under (then over) its strongest neighbour where
    # the items beside it leave room; the squares leave small bends along chains.
    for downward in (True, False, True):
        for li in order if downward else order[::-1]:
            layer = layers[li]
            for i, k in enumerate(layer):
                side = [
                    (n, w, d)
                    for n, w, d in nbrs[k]
                    if items[n].layer == li + (-1 if downward else 1)
                ]
                if len(side) != 1 and not (side and len(nbrs[k]) <= 3):
                    continue
                n, _, d = max(side, key=lambda t: t[1])
                want = items[n].x + d
                it = items[k]
                lo = items[layer[i - 1]].x + gap(items[layer[i - 1]], it) if i else -math.inf
                hi = (
                    items[layer[i + 1]].x - gap(it, items[layer[i + 1]])
                    if i + 1 < len(layer)
                    else math.inf
                )
                if lo <= want <= hi:
                    it.x = want
    if main_in is not None:
        for it in items.values():
            if it.kind == "out":
                layer = layers[it.layer]
                i = layer.index(it.key)
                lo = items[layer[i - 1]].x + gap(items[layer[i - 1]], it) if i else -math.inf
                hi = (
                    items[layer[i + 1]].x - gap(it, items[layer[i + 1]])
                    if i + 1 < len(layer)
                    else math.inf
                )
                if lo <= main_in.x <= hi:
                    it.x = main_in.x
    # Size and vertical places.
    left = min(it.x - it.w / 2 for it in items.values())
    right = max(it.x + it.w / 2 for it in items.values())
    for it in items.values():
        it.x -= left
    tops, bottoms = [], []
    y = top
    for li, layer in enumerate(layers):
        content = [items[k] for k in layer if items[k].kind not in ("in", "out")]
        height = max((it.h for it in content), default=0.0)
        if li == 0 and not content:
            tops.append(0.0)
            bottoms.append(0.0)
            continue
        if li == n_layers - 1 and not content and layer:
            tops.append(-1.0)  # set below: the bottom border
            bottoms.append(-1.0)
            continue
        tops.append(y)
        bottoms.append(y + height)
        for it in content:
            it.y = y
        y += height + GAP_Y
    height = y - GAP_Y + bottom_pad
    for li, layer in enumerate(layers):
        for k in layer:
            it = items[k]
            if it.kind == "in":
                it.y = 0.0
            elif it.kind == "out":
                it.y = height
        if tops[li] == -1.0:
            tops[li] = bottoms[li] = height
    for it in items.values():
        if it.kind == "dummy":
            it.y = tops[it.layer]
            it.h = bottoms[it.layer] - tops[it.layer]
    return right - left, height, tops, bottoms


# ---- the whole graph ----------------------------------------------------------------------------


def layout(graph: Graph) -> Layout:
    """Lay the graph out, every cluster unfolded."""
    from cnnc.ops import get_op

    node_cluster, clusters = _clusters(graph)
    boxes: dict[str, Box] = {}
    order: dict[str, int] = {}
    producer: dict[int, str] = {}
    for v in graph.inputs:
        lines = [f"input {v.name}", _shape(v)]
        key = f"in:{v.name}"
        boxes[key] = Box(key, "input", v.name, lines, None, "#ffffff", w=_width(lines))
        order[key] = len(order)
        producer[id(v)] = key
    for node in graph.nodes:
        opdef = get_op(node.op)
        params = _node_params(node)
        cluster = node_cluster[node.name]
        shapes = ", ".join(_shape(v) for v in node.outputs)
        lines = [opdef.label(node), shapes + (f"  {_count(params)} p" if params else "")]
        key = f"n:{node.name}"
        boxes[key] = Box(
            key, "node", node.name, lines, cluster, _fill(node.op), w=_width(lines), params=params
        )
        order[key] = len(order)
        for v in node.outputs:
            producer[id(v)] = key
    for i, v in enumerate(graph.outputs):
        lines = [f"output {v.name}", _shape(v)]
        key = f"out:{i}:{v.name}"
        boxes[key] = Box(key, "output", v.name, lines, None, "#ffffff", w=_width(lines))
        order[key] = len(order)
    # One edge per value use (a node reading a value twice gets one edge).
    edges: list[tuple[str, str, str, float]] = []
    seen = set()
    for node in graph.nodes:
        activations = [v for v in node.inputs if not v.is_param]
        for j, v in enumerate(activations):
            src = producer.get(id(v))
            if src is None or (id(v), node.name) in seen:
                continue
            seen.add((id(v), node.name))
            edges.append((v.name, src, f"n:{node.name}", 2.0 if j == 0 else 1.0))
    for i, v in enumerate(graph.outputs):
        if id(v) in producer:
            edges.append((v.name, producer[id(v)], f"out:{i}:{v.name}", 2.0))
    _break_cycles(clusters, boxes, edges)
    for b in boxes.values():  # the op, and the name inside the cluster
        if b.kind == "node":
            b.lines[0] += "  " + (b.name[len(b.cluster) + 1 :] if b.cluster else b.name)
            b.w = _width(b.lines)
    for b in boxes.values():
        for cid in _chain(clusters, b.cluster):
            clusters[cid].ops += 1
            clusters[cid].params += b.params
    for cid in clusters:  # the items of each cluster, outer clusters' lists first
        parent = clusters[cid].parent
        if parent is not None:
            clusters[parent].children.append(cid)
    first: dict[str, int] = {}
    for key, box in boxes.items():
        if box.cluster is not None:
            clusters[box.cluster].children.append(key)
        for cid in _chain(clusters, box.cluster):
            first.setdefault(cid, order[key])
    for c in clusters.values():
        c.children.sort(key=lambda k: first[k] if k in clusters else order[k])
    root = [cid for cid, c in clusters.items() if c.parent is None]
    root += [k for k, b in boxes.items() if b.cluster is None]
    root.sort(key=lambda k: first[k] if k in clusters else order[k])

    def item_in(box_key: str, group: str | None) -> str | None:
        """The item of ``group`` holding the box, or None if it lies outside the group."""
        inner = None
        for cid in _chain(clusters, boxes[box_key].cluster):
            if cid == group:
                return inner or box_key
            inner = cid
        return (inner or box_key) if group is None else None

    segments: list[Segment] = []
    # (group) -> (block sizes, ports, its segments relative to the group's top left)
    placed: dict[str | None, dict] = {}

    def lay_group(group: str | None) -> tuple[float, float, dict, dict]:
        children = clusters[group].children if group is not None else root
        sizes = {}
        for child in children:
            if child in clusters:
                w, h, ins, outs = lay_group(child)
                sizes[child] = (w, h, ins, outs)
        items: dict[str, _Item] = {}
        for child in children:
            o = first[child] if child in clusters else order[child]
            if child in clusters:
                w, h, ins, outs = sizes[child]
                items[child] = _Item(child, w, h, o, "block", ins=ins, outs=outs)
            else:
                items[child] = _Item(child, boxes[child].w, boxes[child].h, o, "box")
        level: dict[tuple[str, str, str], _Edge] = {}
        for value, src, dst, weight in edges:
            a, b = item_in(src, group), item_in(dst, group)
            if a == b or (a is None and b is None):
                continue
            if a is None:
                a = f"\0in:{value}"
                if a not in items:
                    # The newest value first: older ones come from far above, and
                    # the parent draws long edges to the right of its chains.
                    items[a] = _Item(a, 0.0, 0.0, -order[src], "in")
            if b is None:
                b = f"\0out:{value}"
                if b not in items:
                    items[b] = _Item(b, 0.0, 0.0, order[src] + 0.5, "out")
            k = (a, b, value)
            if k not in level:
                level[k] = _Edge(a, b, value, weight)
            else:
                level[k].weight = max(level[k].weight, weight)
        level_edges = list(level.values())
        top = TITLE_H + 4 if group is not None else MARGIN
        bottom = PAD if group is not None else MARGIN
        width, height, tops, bottoms = _lay_out(items, level_edges, top, bottom)
        pad = PAD if group is not None else MARGIN
        if group is not None:
            title_w = (len(clusters[group].title) + 2) * CHAR + 2 * PAD
            extra = max(0.0, title_w - (width + 2 * pad)) / 2
        else:
            extra = 0.0
        for it in items.values():
            it.x += pad + extra
        width += 2 * (pad + extra)
        ports = sorted((it for it in items.values() if it.kind == "in"), key=lambda it: it.order)
        ins = {it.key[4:]: it.x - width / 2 for it in ports}
        outs = {it.key[5:]: it.x - width / 2 for it in items.values() if it.kind == "out"}
        placed[group] = {"items": items, "edges": level_edges, "tops": tops, "bottoms": bottoms}
        return width, height, ins, outs

    width, height, _, _ = lay_group(None)

    def place(group: str | None, dx: float, dy: float) -> None:
        data = placed[group]
        items: dict[str, _Item] = data["items"]
        tops, bottoms = data["tops"], data["bottoms"]
        for k, it in items.items():
            if it.kind == "box":
                b = boxes[k]
                b.x, b.y = dx + it.x - it.w / 2, dy + it.y
            elif it.kind == "block":
                c = clusters[k]
                c.x, c.y, c.w, c.h = dx + it.x - it.w / 2, dy + it.y, it.w, it.h
                c.anchor = dx + it.x + next(iter(it.ins.values()), 0.0)
                place(k, c.x, c.y)
        for e in data["edges"]:
            a, b = items[e.src], items[e.dst]
            # Vertical within a layer, bending only in the gaps between layers (no box
            # lies there).
            xa, xb = dx + a.x + _offset(a, e.value, True), dx + b.x + _offset(b, e.value, False)
            points = [(xa, dy + a.y + a.h), (xa, dy + bottoms[a.layer])]
            for d in e.chain:
                it = items[d]
                points.append((dx + it.x, dy + it.y))
                points.append((dx + it.x, dy + it.y + it.h))
            points += [(xb, dy + tops[b.layer]), (xb, dy + b.y)]
            points = [p for i, p in enumerate(points) if i == 0 or p != points[i - 1]]
            segments.append(
                Segment(
                    group,
                    points,
                    e.src if a.kind == "block" else None,
                    e.dst if b.kind == "block" else None,
                    b.kind == "box",
                    e.value,
                )
            )

    place(None, 0.0, 0.0)
    _spread_arrows(segments)
    result = Layout(boxes, clusters, segments, [(v, s, d) for v, s, d, _ in edges], width, height)
    _mark_compact(result)
    return result


def _break_cycles(clusters: dict[str, Cluster], boxes: dict[str, Box], edges: list) -> None:
    """Dissolve the clusters that a path leaves and enters again (``backbone.conv1``, then
    ``maxpool1``, then ``backbone.layer1``): as blocks they would form a cycle. Their
    items go to the cluster around them."""

    def item(key: str, group: str | None) -> str | None:
        inner = key
        for cid in _chain(clusters, boxes[key].cluster):
            if cid == group:
                return inner
            inner = cid
        return inner if group is None else None

    groups: list[str | None] = [None, *sorted(clusters, key=lambda c: clusters[c].depth)]
    for group in groups:
        if group is not None and group not in clusters:
            continue
        while True:
            succs: dict[str, set[str]] = {}
            indegree: dict[str, int] = {}
            for _, src, dst, _ in edges:
                a, b = item(src, group), item(dst, group)
                if a is None or b is None or a == b or b in succs.setdefault(a, set()):
                    continue
                succs[a].add(b)
                indegree[b] = indegree.get(b, 0) + 1
                indegree.setdefault(a, 0)
            ready = [k for k, d in indegree.items() if d == 0]
            while ready:
                k = ready.pop()
                for b in succs.get(k, ()):
                    indegree[b] -= 1
                    if indegree[b] == 0:
                        ready.append(b)
            stuck = sorted(k for k, d in indegree.items() if d > 0 and k in clusters)
            if not stuck:
                break
            for cid in stuck:
                for c in clusters.values():
                    if c.parent == cid:
                        c.parent = group
                for b in boxes.values():
                    if b.cluster == cid:
                        b.cluster = group
                del clusters[cid]
    for c in clusters.values():
        c.depth = 1 + sum(1 for _ in _chain(clusters, c.parent))


def _spread_arrows(segments: list[Segment]) -> None:
    """Edges into the same box end side by side along its top, in the order they come."""
    into: dict[tuple[float, float], list[Segment]] = {}
    for s in segments:
        if s.arrow:
            into.setdefault(s.points[-1], []).append(s)
    for (x, y), group in into.items():
        if len(group) < 2:
            continue
        group.sort(key=lambda s: (s.points[-2][0], s.points[0][1]))
        step = min(14.0, MIN_BOX_W / (len(group) + 1))
        for i, s in enumerate(group):
            s.points[-1] = (x + (i - (len(group) - 1) / 2) * step, y)


def _mark_compact(lay: Layout) -> None:
    """A cluster is compact when every box and cluster across its band of y lies inside it
    or around it: folding it may then remove the band."""
    rects = [(k, b.cluster, b.y, b.y + b.h) for k, b in lay.boxes.items()]
    rects += [(k, c.parent, c.y, c.y + c.h) for k, c in lay.clusters.items()]
    for cid, c in lay.clusters.items():
        around = lay.ancestors(cid)
        c.compact = all(
            y1 <= c.y or y0 >= c.y + c.h or key in around or cid in lay.ancestors(owner)
            for key, owner, y0, y1 in rects
        )


# ---- folding ------------------------------------------------------------------------------------


def folded_box(c: Cluster) -> tuple[float, float, float, float]:
    """(x, y, w, h) of cluster ``c`` folded, in unfolded coordinates."""
    w = min(c.w, max(MIN_BOX_W + 30, _width(_folded_lines(c))))
    x = min(max(c.anchor - w / 2, c.x), c.x + c.w - w)
    return x, c.y, w, FOLDED_H


def _folded_lines(c: Cluster) -> list[str]:
    return [f"▸ {c.title}", f"{c.ops} ops  {_count(c.params)} params"]


def fold_geometry(lay: Layout, folded: set[str]):
    """Which clusters are folded and visible, which are hidden, the y map, and the height,
    for the set of folded clusters (the same rule as the SVG's script)."""
    shown = {cid for cid in folded if not any(a in folded for a in lay.ancestors(cid)[1:])}
    bands = sorted(
        (c.y + FOLDED_H, c.y + c.h) for cid, c in lay.clusters.items() if cid in shown and c.compact
    )

    def ymap(y: float) -> float:
        cut = 0.0
        for b0, b1 in bands:
            if y >= b1:
                cut += b1 - b0
            elif y > b0:
                cut += y - b0
        return y - cut

    def hidden(cluster: str | None) -> bool:
        return any(a in folded for a in lay.ancestors(cluster))

    return shown, hidden, ymap, ymap(lay.height)


# ---- SVG ----------------------------------------------------------------------------------------

_CSS = """
.cnnc-graph{font-family:"DejaVu Sans",Arial,Helvetica,sans-serif;font-size:11px}
.cnnc-graph .box rect{stroke:#555;stroke-width:1}
.cnnc-graph .box.input rect,.cnnc-graph .box.output rect{stroke:#222;stroke-width:1.6;
stroke-dasharray:4 2}
.cnnc-graph .box text.op{font-weight:bold}
.cnnc-graph .box text.sub{fill:#444}
.cnnc-graph .cluster>rect{fill-opacity:.55;stroke:#8a8fa8;stroke-width:1}
.cnnc-graph .ctitle{cursor:pointer;fill:#2f3a66;font-weight:bold;paint-order:stroke;
stroke:#ffffff;stroke-width:3px;stroke-opacity:.8;stroke-linejoin:round}
.cnnc-graph .ctitle:hover{text-decoration:underline}
.cnnc-graph .folded{cursor:pointer}
.cnnc-graph .folded rect{stroke:#2f3a66;stroke-width:1.4}
.cnnc-graph .edge{fill:none;stroke:#666;stroke-width:1.2}
.cnnc-graph .hide{display:none}
"""

_CLUSTER_FILLS = ("#eef1fb", "#e3e8f7", "#d8dff2", "#ced7ee", "#c4cee9")

# The same rule as fold_geometry and _path, in the browser.
_SCRIPT = Path(__file__).with_name("graph.js")


def _r(v: float) -> float:
    return round(v, 1)


def _path(points: list[tuple[float, float]]) -> str:
    """Straight where vertical, else a cubic with vertical tangents at both ends (decided on
    the rounded coordinates, as the script does)."""
    points = [(_r(x), _r(y)) for x, y in points]
    x0, y0 = points[0]
    d = [f"M{_fmt(x0)},{_fmt(y0)}"]
    for (ax, ay), (bx, by) in itertools.pairwise(points):
        if ax == bx:
            d.append(f" L{_fmt(bx)},{_fmt(by)}")
        else:
            m = _r((ay + by) / 2)
            d.append(f" C{_fmt(ax)},{_fmt(m)} {_fmt(bx)},{_fmt(m)} {_fmt(bx)},{_fmt(by)}")
    return "".join(d)


def _fmt(v: float) -> str:
    """A number as JavaScript prints it (so that the script redraws the same path)."""
    v = _r(v)
    return str(int(v)) if v == int(v) else repr(v)


def _deeper(fold: int | None, lay: Layout) -> set[str]:
    if fold is None:
        return set()
    return {cid for cid, c in lay.clusters.items() if c.depth > fold}


def to_svg(
    graph: Graph, fold: int | None = None, folded: set[str] | None = None, title: bool = True
) -> str:
    """The graph as a standalone ``<svg>`` element (valid XML; usable inline in HTML): a box
    per layer, the graph's inputs and outputs, its blocks as clusters that fold when their
    title is clicked. ``fold``: clusters deeper than this are folded from the start (1
    shows a ResNet's stages, their blocks folded); ``folded``: these clusters too, by name."""
    lay = layout(graph)
    return render_svg(lay, graph.name, _deeper(fold, lay) | set(folded or ()), title)


def render_svg(lay: Layout, name: str, folded: set[str], title: bool = True) -> str:
    """Draw a layout with these clusters folded."""
    folded = {c for c in folded if c in lay.clusters}
    shown, hidden, ymap, height = fold_geometry(lay, folded)
    digest = hashlib.sha1(
        (name + "|" + "|".join(lay.boxes) + "|" + ",".join(sorted(folded))).encode()
    ).hexdigest()[:8]
    arrow = f"cnnc-arrow-{digest}"
    w, h = _r(lay.width), _r(height)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="cnnc-graph" width="{_fmt(w)}" '
        f'height="{_fmt(h)}" viewBox="0 0 {_fmt(w)} {_fmt(h)}" data-h="{_fmt(lay.height)}" '
        f'data-arrow="{arrow}" data-folded-h="{FOLDED_H}">',
        f"<title>{escape(name)}</title>" if title else "",
        f"<style>{_CSS}</style>",
        f'<defs><marker id="{arrow}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
        'fill="#666"/></marker></defs>',
        f'<rect width="{_fmt(w)}" height="100%" fill="#ffffff"/>',
    ]
    # Clusters, outer first (each is drawn before the clusters inside it).
    for cid in sorted(lay.clusters, key=lambda k: (lay.clusters[k].depth, k)):
        c = lay.clusters[cid]
        is_shown = cid in shown
        off = hidden(c.parent)
        top, bottom = ymap(c.y), ymap(c.y + c.h)
        fx, _, fw, fh = folded_box(c)
        lines = _folded_lines(c)
        fill = _CLUSTER_FILLS[min(c.depth, len(_CLUSTER_FILLS)) - 1]
        attrs = {
            "data-id": cid,
            "data-parent": c.parent or "",
            "data-x": _fmt(c.x),
            "data-y": _fmt(c.y),
            "data-w": _fmt(c.w),
            "data-h": _fmt(c.h),
            "data-compact": "1" if c.compact else "0",
            "data-folded": "1" if cid in folded else "0",
        }
        attr = " ".join(f'{k}="{escape(v)}"' for k, v in attrs.items())
        out.append(f'<g class="cluster{" hide" if off else ""}" {attr}>')
        hide = ' class="hide"' if is_shown else ""
        out.append(
            f'<rect{hide} x="{_fmt(c.x)}" y="{_fmt(top)}" width="{_fmt(c.w)}" '
            f'height="{_fmt(bottom - top)}" rx="9" fill="{fill}"/>'
        )
        out.append(
            f'<text class="ctitle{" hide" if is_shown else ""}" x="{_fmt(c.x + PAD)}" '
            f'y="{_fmt(top + 15)}">▾ {escape(c.title)}<title>click to fold {escape(c.name)} '
            f"({c.ops} ops, {c.params:,} params)</title></text>"
        )
        out.append(
            f'<g class="folded{"" if is_shown else " hide"}" data-x="{_fmt(fx)}" '
            f'data-cx="{_fmt(fx + fw / 2)}" transform="translate({_fmt(fx)},{_fmt(top)})">'
            f'<rect width="{_fmt(fw)}" height="{fh}" rx="9" fill="{fill}"/>'
            f'<text x="8" y="15" font-weight="bold">{escape(lines[0])}</text>'
            f'<text x="8" y="30" fill="#444">{escape(lines[1])}</text>'
            f"<title>click to unfold {escape(c.name)}</title></g>"
        )
        out.append("</g>")
    for s in lay.segments:
        off = hidden(s.owner) or (s.owner is not None and s.owner in folded)
        points = [(x, ymap(y)) for x, y in s.points]
        if s.src_block in shown:
            c = lay.clusters[s.src_block]
            fx, _, fw, _ = folded_box(c)
            points[0] = (fx + fw / 2, ymap(c.y) + FOLDED_H)
        if s.dst_block in shown:
            c = lay.clusters[s.dst_block]
            fx, _, fw, _ = folded_box(c)
            points[-1] = (fx + fw / 2, ymap(c.y))
        pts = json.dumps([[_r(x), _r(y)] for x, y in s.points], separators=(",", ":"))
        attrs = {
            "data-owner": s.owner or "",
            "data-sb": s.src_block or "",
            "data-db": s.dst_block or "",
            "data-pts": pts,
            "data-arrow": "1" if s.arrow else "0",
        }
        attr = " ".join(f'{k}="{escape(v)}"' for k, v in attrs.items())
        marker = f' marker-end="url(#{arrow})"' if s.arrow or s.dst_block in shown else ""
        out.append(
            f'<path class="edge{" hide" if off else ""}" {attr} d="{_path(points)}"{marker}/>'
        )
    for key, b in lay.boxes.items():
        off = hidden(b.cluster)
        y = ymap(b.y)
        attrs = {
            "data-id": key,
            "data-cluster": b.cluster or "",
            "data-x": _fmt(b.x),
            "data-y": _fmt(b.y),
        }
        attr = " ".join(f'{k}="{escape(v)}"' for k, v in attrs.items())
        out.append(
            f'<g class="box {b.kind}{" hide" if off else ""}" {attr} '
            f'transform="translate({_fmt(b.x)},{_fmt(y)})">'
            f"<title>{escape(b.name)}</title>"
            f'<rect width="{_fmt(b.w)}" height="{_fmt(b.h)}" rx="4" fill="{b.fill}"/>'
            f'<text class="op" x="8" y="15">{escape(b.lines[0])}</text>'
            f'<text class="sub" x="8" y="29">{escape(b.lines[1])}</text></g>'
        )
    script = _SCRIPT.read_text(encoding="utf-8")
    out.append(f"<script><![CDATA[{script}]]></script>")
    out.append("</svg>")
    return "\n".join(line for line in out if line) + "\n"


# ---- DOT ----------------------------------------------------------------------------------------


def _dot_id(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(graph: Graph) -> str:
    """The graph in Graphviz's DOT language: the same boxes, edges and nested clusters."""
    lay = layout(graph)
    lines = [f"digraph {_dot_id(graph.name)} {{"]
    lines.append('  graph [rankdir=TB, fontname="Helvetica", fontsize=11];')
    lines.append('  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];')
    lines.append('  edge [color="#666666"];')

    def emit(group: str | None, indent: str) -> None:
        for cid, c in lay.clusters.items():
            if c.parent == group:
                lines.append(f"{indent}subgraph {_dot_id('cluster_' + cid)} {{")
                lines.append(
                    f'{indent}  label={_dot_id(c.name)}; style="rounded,filled"; '
                    f'fillcolor="{_CLUSTER_FILLS[min(c.depth, 5) - 1]}";'
                )
                emit(cid, indent + "  ")
                lines.append(f"{indent}}}")
        for key, b in lay.boxes.items():
            if b.cluster == group:
                shape = ', shape=box, style="dashed,rounded"' if b.kind != "node" else ""
                lines.append(
                    f"{indent}{_dot_id(key)} [label={_dot_id(chr(10).join(b.lines))}, "
                    f'fillcolor="{b.fill}"{shape}];'
                )

    emit(None, "  ")
    for value, src, dst in lay.edges:
        lines.append(f"  {_dot_id(src)} -> {_dot_id(dst)} [tooltip={_dot_id(value)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


__all__ = ["Box", "Cluster", "Layout", "Segment", "layout", "render_svg", "to_dot", "to_svg"]
