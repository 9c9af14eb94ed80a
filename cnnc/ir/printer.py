"""The IR dump (one aligned line per node with every value's type and its source line), the
summary (a tree of layers and blocks with shapes, parameters, MACs, memory and receptive
fields; its rows as data for scripts) and the list of parameter tensors."""

from __future__ import annotations

from fractions import Fraction

from cnnc.ir.graph import Graph, Node, Value


def _operand(v) -> str:
    return v.name if v.is_param else f"%{v.name}"


def _row(node: Node) -> list[str]:
    from cnnc.ops import get_op

    opdef = get_op(node.op)
    outs = ", ".join(f"%{v.name}" for v in node.outputs)
    types = ", ".join(str(v.type) for v in node.outputs)
    expr = f"{opdef.label(node)}({', '.join(_operand(v) for v in node.inputs)})"
    where = node.loc.short() if node.loc is not None else ""
    return [outs, ":", types, "=", expr, opdef.describe(node), node.note, where]


def dump(graph: Graph) -> str:
    """The human-readable listing of a graph; the same graph always prints the same text."""
    heading = graph.opt_level
    if graph.pipeline:
        heading += ": " + ", ".join(graph.pipeline)
    lines = [f"network {graph.name}  ({heading})"]
    larger = "  (or larger: fully convolutional)" if graph.flexible_spatial else ""
    for v in graph.inputs:
        lines.append(f"  input  %{v.name} : {v.type}{larger}")
    lines.append(f"  params {len(graph.params)} tensors, {graph.value_count():,} values")
    lines.append("")
    rows = [_row(n) for n in graph.nodes]
    widths = [max((len(r[i]) for r in rows), default=0) for i in range(8)]
    for r in rows:
        cells = [c.ljust(w) for c, w in zip(r, widths, strict=True) if w]
        # one space inside "name : type = expr", two between the wider columns after it
        text = " ".join(cells[:4]) + " " + cells[4] + "".join("  " + c for c in cells[5:])
        lines.append("  " + text.rstrip())
    for v in graph.outputs:
        lines.append(f"  output %{v.name} : {v.type}")
    return "\n".join(lines) + "\n"


def _table(
    header: list[str], rows: list[list[str]], footer: list[str], right: set[int]
) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows, footer]) for i in range(len(header))]

    def fmt(r: list[str]) -> str:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return [fmt(header), rule, *(fmt(r) for r in rows), rule, fmt(footer)]


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:g} "


# ---- the summary ---------------------------------------------------------------------------
#
# A multiply-accumulate (MAC) is one multiplication or division, with the addition that may
# follow it; additions alone, comparisons, copies and the functions inside activations (exp,
# tanh, erf) count nothing. Each op's count is its OpDef.macs (README, `cnnc summary`).


def _bytes(n: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} B"


def _value_bytes(v: Value, batch: int) -> int:
    """Bytes of a value with the batch axis (any symbolic size) at ``batch``."""
    count = 1
    for d in v.type.shape:
        count *= batch if isinstance(d, str) else d
    return count * v.type.numpy_dtype.itemsize


def _number(x: Fraction) -> int | float:
    return int(x) if x.denominator == 1 else float(x)


def _window(node: Node) -> tuple[list[int] | None, list[int] | None]:
    """A windowed op's kernel size and stride (None, None for other ops)."""
    stride = node.attrs.get("stride")
    if stride is None:
        return None, None
    kernel = node.attrs.get("kernel")
    if kernel is None and len(node.inputs) > 1:
        kernel = node.inputs[1].shape[2:]
    if kernel is None:
        return None, None
    return list(kernel), list(stride)


def _prefixes(name: str) -> list[str]:
    """The proper prefixes of a layer's name that may be blocks: ``layer1``, ``layer1.0``
    of ``layer1.0.conv1``; of a PyTorch exporter's path ``/layer1/layer1.0/conv1/Conv``,
    ``/layer1``, ``/layer1/layer1.0``, ``/layer1/layer1.0/conv1``. Another name with a
    ``/`` is not split."""
    if name.startswith("/"):
        parts = name.split("/")
        return ["/".join(parts[:i]) for i in range(2, len(parts))]
    if "/" in name:
        return []
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _block_paths(graph: Graph) -> dict[int, list[str]]:
    """The blocks around each node, outermost first (by ``id`` of the node). A prefix of
    a node's dotted name (``layer1``, ``layer1.0`` of ``layer1.0.conv1``) is a block if the
    lowering expanded a block instance under that name, or if it is no node's or value's
    name and heads two or more nodes (a repetition ``layer1: basic(64) * 2``, a group of
    labels ``downsample.0``, ``downsample.1``). Past a prefix that names a layer only
    block instances count: ``bn1.relu`` is the relu after layer ``bn1``, beside it."""
    names = {v.name for v in graph.inputs}
    names.update(n.name for n in graph.nodes)
    names.update(v.name for n in graph.nodes for v in n.outputs)
    heads: dict[str, int] = {}
    for node in graph.nodes:
        for prefix in _prefixes(node.name):
            heads[prefix] = heads.get(prefix, 0) + 1
    paths: dict[int, list[str]] = {}
    for node in graph.nodes:
        path: list[str] = []
        named = False
        for prefix in _prefixes(node.name):
            if prefix in graph.blocks:
                kind = graph.blocks[prefix]
                if path and path[-1] in graph.blocks and graph.blocks[path[-1]] == kind:
                    # x: conv -> res -> res: instances x.res and x.res.2, side by side
                    path.pop()
                path.append(prefix)
            elif prefix in names:
                named = True
            elif not named and heads[prefix] >= 2:
                path.append(prefix)
        paths[id(node)] = path
    return paths


class _Block:
    def __init__(self, name: str, parent: _Block | None):
        self.name = name
        self.parent = parent
        self.children: list[_Block | Node] = []

    def leaves(self) -> list[Node]:
        out: list[Node] = []
        for c in self.children:
            out.extend(c.leaves() if isinstance(c, _Block) else [c])
        return out


def _tree(graph: Graph) -> _Block:
    """The nodes as a tree of blocks; each block's children in the order of their first
    node (a block's nodes stay together even where the graph interleaves them)."""
    root = _Block("", None)
    blocks: dict[str, _Block] = {}
    for node, path in zip(graph.nodes, _block_paths(graph).values(), strict=True):
        parent = root
        for name in path:
            block = blocks.get(name)
            if block is None:
                block = blocks[name] = _Block(name, parent)
                parent.children.append(block)
            parent = block
        parent.children.append(node)
    return root


def _relative(name: str, block: str) -> str:
    if block and (name.startswith(block + ".") or name.startswith(block + "/")):
        return name[len(block) + 1 :]
    return name


def summary_rows(graph: Graph, batch: int = 1, depth: int | None = None) -> list[dict]:
    """The summary's rows, blocks and layers in the table's order (a block before its
    contents), as plain data (JSON-ready). ``depth`` keeps the rows of depth < ``depth``
    (0 is the top level; a block at depth ``depth - 1`` is then folded). Each row:

    - ``name``: the node's name or the block's (the prefix of its layers' names);
      ``label``: the name as the table shows it, relative to its block; ``parent``: the
      enclosing block's name or None; ``depth``: how many blocks enclose it;
    - ``kind``: ``"layer"`` or ``"block"``; ``op``: the op as the dump shows it
      (``conv2d+relu``), for a block the block it expands (``basic``), ``"k×basic"``
      for k instances of one block, else ``"block"``; ``layers``: the layers in the row
      (1 for a layer); ``folded``: a block whose contents ``depth`` hides;
    - ``inputs``, ``outputs``: shapes (lists of ints, ``"N"`` for the batch axis) of the
      values read (not parameters) and written; for a block, those read from outside it
      and those read outside it (or graph outputs);
    - ``kernel``, ``stride``: a windowed op's kernel size and stride per spatial axis, else
      None;
    - ``params``: learned parameters (batch-norm statistics are not counted); ``macs``:
      multiply-accumulates per batch item; ``bytes``: bytes of the outputs at ``batch``;
      for a block, the sums over its layers;
    - ``receptive_field``, ``output_stride``: one output cell's window on the input and
      the spacing of cells there, per spatial axis (a float where the map is finer than
      the input), for a feature map of the input's rank, else None;
    - ``connected_to``: the names of the values read, when they are not just the output
      of the layer before it (a branch, a merge, a skip); else [].
    """
    from cnnc.ir.graph import is_statistic
    from cnnc.ops import get_op
    from cnnc.passes.convolutionalize import receptive_fields

    fields = receptive_fields(graph)
    root = _tree(graph)
    order = root.leaves()
    position = {id(n): i for i, n in enumerate(order)}
    (single_input,) = graph.inputs if len(graph.inputs) == 1 else (None,)

    def shapes(values) -> list[list]:
        return [list(v.type.shape) for v in values]

    def field_of(values) -> tuple[list | None, list | None]:
        for v in values:
            if id(v) in fields and v.type.rank == len(fields[id(v)][0]) + 2:
                jump, field = fields[id(v)]
                return list(field), [_number(j) for j in jump]
        return None, None

    def unique(values) -> list[Value]:
        return list({id(v): v for v in values}.values())

    def connected(reads: list[Value], first: Node) -> list[str]:
        i = position[id(first)]
        before = order[i - 1].outputs if i else ([single_input] if single_input else [])
        if len(reads) == 1 and len(before) == 1 and reads[0] is before[0]:
            return []
        return [v.name for v in reads]

    def layer(node: Node, block: _Block, level: int) -> dict:
        opdef = get_op(node.op)
        kernel, stride = _window(node)
        rf, jump = field_of(node.outputs)
        reads = unique(node.activations)
        return {
            "name": node.name,
            "label": _relative(node.name, block.name),
            "parent": block.name or None,
            "depth": level,
            "kind": "layer",
            "op": opdef.label(node),
            "layers": 1,
            "folded": False,
            "inputs": shapes(reads),
            "outputs": shapes(node.outputs),
            "kernel": kernel,
            "stride": stride,
            "params": sum(int(v.type.numel() or 0) for v in node.params if not is_statistic(v)),
            "macs": opdef.macs(node),
            "bytes": sum(_value_bytes(v, batch) for v in node.outputs),
            "receptive_field": rf,
            "output_stride": jump,
            "connected_to": connected(reads, node),
        }

    graph_outputs = {id(v) for v in graph.outputs}

    def block_row(block: _Block, parent: _Block, level: int, made: list[dict]) -> dict:
        leaves = block.leaves()
        members = {id(n) for n in leaves}
        reads = unique(
            v
            for n in leaves
            for v in n.activations
            if v.producer is None or id(v.producer) not in members
        )
        writes = [
            v
            for n in leaves
            for v in n.outputs
            if id(v) in graph_outputs or any(id(u) not in members for u in v.users)
        ]
        # "2×basic": a block made of instances of one block (a repetition)
        kinds = [
            graph.blocks.get(c.name) if isinstance(c, _Block) else None for c in block.children
        ]
        op = graph.blocks.get(block.name) or (
            f"{len(kinds)}×{kinds[0]}" if kinds[0] and len(set(kinds)) == 1 else "block"
        )
        rf, jump = field_of(writes)
        return {
            "name": block.name,
            "label": _relative(block.name, parent.name),
            "parent": parent.name or None,
            "depth": level,
            "kind": "block",
            "op": op,
            "layers": len(leaves),
            "folded": False,
            "inputs": shapes(reads),
            "outputs": shapes(writes),
            "kernel": None,
            "stride": None,
            "params": sum(r["params"] for r in made),
            "macs": sum(r["macs"] for r in made),
            "bytes": sum(r["bytes"] for r in made),
            "receptive_field": rf,
            "output_stride": jump,
            "connected_to": connected(reads, leaves[0]),
        }

    rows: list[dict] = []

    def visit(block: _Block, level: int) -> list[dict]:
        """Add the rows of ``block``'s contents; returns the layer rows made."""
        made: list[dict] = []
        for child in block.children:
            if isinstance(child, Node):
                row = layer(child, block, level)
                made.append(row)
                rows.append(row)
                continue
            at = len(rows)
            inner = visit(child, level + 1)
            made += inner
            rows.insert(at, block_row(child, block, level, inner))
        return made

    visit(root, 0)
    return _fold(rows, depth)


def _fold(rows: list[dict], depth: int | None) -> list[dict]:
    """The rows of depth < ``depth``, the blocks at the last depth marked folded."""
    if depth is None:
        return rows
    kept = [r for r in rows if r["depth"] < depth]
    for r in kept:
        r["folded"] = r["kind"] == "block" and r["depth"] == depth - 1
    return kept


def summary_data(graph: Graph, batch: int = 1, depth: int | None = None) -> dict:
    """What ``cnnc summary --json`` prints: the network, the batch, the rows of
    :func:`summary_rows` and the totals (parameters, batch-norm statistics, MACs per item,
    bytes of all layer outputs and the interpreter's peak, both at ``batch``)."""
    rows = summary_rows(graph, batch)
    layers = [r for r in rows if r["kind"] == "layer"]
    return {
        "network": graph.name,
        "opt_level": graph.opt_level,
        "batch": batch,
        "inputs": {v.name: list(v.type.shape) for v in graph.inputs},
        "rows": _fold(rows, depth),
        "totals": {
            "params": sum(r["params"] for r in layers),
            "statistics": graph.value_count() - graph.param_count(),
            "macs": sum(r["macs"] for r in layers),
            "bytes": sum(r["bytes"] for r in layers),
            "peak_bytes": activation_peak(graph, batch),
        },
    }


def summary_json(graph: Graph, batch: int = 1, depth: int | None = None) -> str:
    """:func:`summary_data` as JSON, one row a line."""
    import json

    data = summary_data(graph, batch, depth)
    rows = ",\n  ".join(json.dumps(r) for r in data.pop("rows"))
    totals = json.dumps(data.pop("totals"))
    head = json.dumps(data)[1:-1]
    return f'{{{head},\n "rows": [\n  {rows}\n ],\n "totals": {totals}}}'


def activation_peak(graph: Graph, batch: int = 1) -> int:
    """The most bytes of values the NumPy interpreter holds at once in a run at ``batch``:
    the graph inputs, and each node's outputs from the node until their last reader (the
    graph outputs until the end), as the interpreter frees them; a view (flatten, reshape,
    ...) and an op computed in place in its input's buffer (bn, relu, add, ... when
    nothing else reads the input) take no new bytes. Not counted: parameters, and the
    kernels' scratch buffers (a convolution's unfolded input) while a node runs."""
    from cnnc.backends.interpreter import operands
    from cnnc.backends.kernels import ALIASING, IN_PLACE

    buffer: dict[int, int] = {}  # id(value) -> its buffer (the id of the value that made it)
    size: dict[int, int] = {}  # buffer -> bytes
    holders: dict[int, int] = {}  # buffer -> live values in it
    for v in graph.inputs:
        buffer[id(v)] = id(v)
        size[id(v)] = _value_bytes(v, batch)
    # The buffers as the interpreter's storages (a view shares its input's), to find the
    # last reader of each and so which ops run in place.
    storage = dict(buffer)
    last_use: dict[int, int] = {}
    storage_last_use: dict[int, int] = {}
    for i, node in enumerate(graph.nodes):
        ins = operands(node)
        for v in ins:
            last_use[id(v)] = i
            storage_last_use[storage.get(id(v), id(v))] = i
        first = storage.get(id(ins[0]), id(ins[0])) if ins else None
        for out in node.outputs:
            storage[id(out)] = first if node.op in ALIASING else id(out)
    keep = {id(v) for v in graph.outputs}
    pinned = {storage[id(v)] for v in [*graph.outputs, *graph.inputs] if id(v) in storage}
    live = peak = sum(size.values())
    for i, node in enumerate(graph.nodes):
        ins = operands(node)
        first = storage.get(id(ins[0])) if ins else None
        in_place = (
            node.op in IN_PLACE
            and first is not None
            and first not in pinned
            and storage_last_use[first] == i
            and ins[0].type == node.output.type
        )
        for j, out in enumerate(node.outputs):
            if node.op in ALIASING or (in_place and j == 0):
                buffer[id(out)] = buffer.get(id(ins[0])) if ins else None
            else:
                buffer[id(out)] = id(out)
                size[id(out)] = _value_bytes(out, batch)
                live += size[id(out)]
            if buffer[id(out)] is not None:
                holders[buffer[id(out)]] = holders.get(buffer[id(out)], 0) + 1
        peak = max(peak, live)
        for v in {id(v): v for v in ins}.values():
            b = buffer.get(id(v))
            if b is None or last_use[id(v)] != i or id(v) in keep or v in graph.inputs:
                continue
            holders[b] -= 1
            if holders[b] == 0:
                live -= size[b]
    return peak


def _dims(values: list) -> str:
    """``[3, 3]`` -> ``3x3``."""
    return "x".join(str(v) for v in values)


def _step(values: list) -> str:
    """A stride: one number when every axis has it (``2``), else ``2x1``."""
    return str(values[0]) if len(set(values)) == 1 else _dims(values)


def _shapes(shapes: list[list], limit: int = 2) -> str:
    """Shapes as the table shows them: ``[N,64,56,56]``; one repeated, once with ``x2``;
    past ``limit`` + 1 of them, the first ``limit`` and how many more."""
    texts = ["[" + ",".join(map(str, s)) + "]" for s in shapes]
    if len(texts) > 1 and len(set(texts)) == 1:
        return f"{texts[0]} x{len(texts)}"
    if len(texts) > limit + 1:
        return " ".join(texts[:limit]) + f" +{len(texts) - limit} more"
    return " ".join(texts)


def _kernel(row: dict, node: Node | None) -> str:
    if row["kernel"] is None:
        return ""
    text = f"{_dims(row['kernel'])}/{_step(row['stride'])}"
    if node is not None:
        dilation = list(node.attrs.get("dilation") or (1,))
        if any(d != 1 for d in dilation):
            text += f" d{_step(dilation)}"
        if node.attrs.get("groups", 1) != 1:
            text += f" g{node.attrs['groups']}"
    return text


def _connected(row: dict, limit: int = 3) -> str:
    names = [_relative(n, row["parent"] or "") for n in row["connected_to"]]
    if len(names) > limit + 1:
        names = [*names[:limit], f"+{len(names) - limit} more"]
    return ", ".join(names)


def summary(graph: Graph, batch: int = 1, depth: int | None = None) -> str:
    """A table of layers and blocks (a tree from the layers' dotted names; ``depth`` folds
    the blocks at depth - 1): op, kernel/stride, input and output shapes, parameters,
    multiply-accumulates per item, output bytes at ``batch``, receptive field/output stride
    and what a layer reads where values branch or merge; then the totals, the activation
    memory and each op's share of the parameters. The rows are :func:`summary_rows`."""
    nodes = {n.name: n for n in graph.nodes}
    all_rows = summary_rows(graph, batch)
    layers = [r for r in all_rows if r["kind"] == "layer"]
    rows = _fold(all_rows, depth)
    total_params = sum(r["params"] for r in layers)
    total_macs = sum(r["macs"] for r in layers)
    total_bytes = sum(r["bytes"] for r in layers)
    kinds: dict[str, int] = {}
    for r in layers:
        if r["params"]:
            kinds[r["op"]] = kinds.get(r["op"], 0) + r["params"]

    def cells(r: dict) -> list[str]:
        field = ""
        if r["receptive_field"] is not None:
            field = f"{_dims(r['receptive_field'])}/{_step(r['output_stride'])}"
        return [
            "  " * r["depth"] + r["label"],
            r["op"],
            _kernel(r, nodes.get(r["name"]) if r["kind"] == "layer" else None),
            _shapes(r["inputs"]),
            _shapes(r["outputs"]),
            f"{r['params']:,}" if r["params"] else "",
            f"{r['macs']:,}" if r["macs"] else "",
            _bytes(r["bytes"]) if r["bytes"] else "",
            field,
            _connected(r),
        ]

    header = ["layer", "op", "kernel", "input", "output", "params", "MACs", "memory", "field"]
    header.append("connected to")
    totals = ["total", "", "", "", "", f"{total_params:,}", f"{total_macs:,}"]
    totals += [_bytes(total_bytes), "", ""]
    lines = [f"network {graph.name}  ({graph.opt_level})"]
    lines += [f"input  %{v.name} : {v.type}" for v in graph.inputs]
    lines.append("")
    lines += _table(header, [cells(r) for r in rows], totals, right={5, 6, 7})
    lines.append("")
    lines.append(f"parameters: {total_params:,} ({total_params * 4 / 1e6:,.1f} MB as float32)")
    statistics = graph.value_count() - graph.param_count()
    if statistics:
        lines.append(f"batch-norm statistics (not learned): {statistics:,}")
    lines.append(f"multiply-accumulates per item: {total_macs:,} ({_si(total_macs)}MAC)")
    lines.append(
        f"activation memory at batch {batch}: {_bytes(total_bytes)} of layer outputs; "
        f"a run holds at most {_bytes(activation_peak(graph, batch))} at once"
    )
    if kinds:
        shares = sorted(kinds.items(), key=lambda kv: -kv[1])
        lines.append(
            "parameters by op: "
            + ", ".join(f"{k} {v / total_params:.1%} ({v:,})" for k, v in shares)
        )
    return "\n".join(lines) + "\n"


def tensors(graph: Graph) -> str:
    """Every parameter tensor of the graph with its shape, in the order the layers use them:
    the names and shapes a weights file must hold."""
    from cnnc.ir.graph import is_statistic

    rows = [
        [
            p.name,
            "[" + ",".join(str(d) for d in p.shape) + "]",
            f"{p.type.numel():,}",
            "statistic" if is_statistic(p) else "learned",
        ]
        for p in graph.params.values()
    ]
    total = ["total", "", f"{graph.value_count():,}", ""]
    lines = [f"network {graph.name}: {len(rows)} parameter tensors", ""]
    lines += _table(["tensor", "shape", "values", "kind"], rows, total, right={2})
    return "\n".join(lines) + "\n"
