"""The IR dump: one aligned line per node with every value's type and its source line."""

from __future__ import annotations

from cnnc.ir.graph import Graph, Node


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


def summary(graph: Graph) -> str:
    """A table of layers: op, output shape, parameters and multiply-accumulates, with totals
    and each op kind's share of the parameters."""
    from cnnc.ir.graph import is_statistic
    from cnnc.ops import get_op

    rows, kinds = [], {}
    total_params = total_macs = 0
    for node in graph.nodes:
        opdef = get_op(node.op)
        params = sum(int(v.type.numel() or 0) for v in node.params if not is_statistic(v))
        macs = opdef.macs(node)
        total_params += params
        total_macs += macs
        label = opdef.label(node)
        if params:
            kinds[label] = kinds.get(label, 0) + params
        shape = " ".join("[" + ",".join(map(str, v.type.shape)) + "]" for v in node.outputs)
        rows.append(
            [node.name, label, shape, f"{params:,}" if params else "", f"{macs:,}" if macs else ""]
        )
    lines = [f"network {graph.name}  ({graph.opt_level})"]
    lines += [f"input  %{v.name} : {v.type}" for v in graph.inputs]
    lines.append("")
    totals = ["total", "", "", f"{total_params:,}", f"{total_macs:,}"]
    lines += _table(["layer", "op", "output", "params", "MACs"], rows, totals, right={3, 4})
    lines.append("")
    lines.append(f"parameters: {total_params:,} ({total_params * 4 / 1e6:,.1f} MB as float32)")
    statistics = graph.value_count() - graph.param_count()
    if statistics:
        lines.append(f"batch-norm statistics (not learned): {statistics:,}")
    lines.append(f"multiply-accumulates per item: {total_macs:,} ({_si(total_macs)}MAC)")
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
