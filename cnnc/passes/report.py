"""What each pass of a pipeline changed: the nodes it removed, added and rewrote by op,
and the parameters before and after (``cnnc compile --report``).

It is computed from the graph before and after each pass alone, so every pass is
covered without telling anything. A node is *removed* when it is in the graph before
the pass and not after, *added* when the other way round; a node replaced by another of
the same op (a conv whose weights took a bn, or that gained a padding) counts as
*rewritten*. Parameter sizes come from their types: no weight is computed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from cnnc.ir.graph import Graph, Node


@dataclass(frozen=True)
class Params:
    """The parameter tensors of a graph: how many, how many values, how many bytes."""

    tensors: int
    values: int
    bytes: int

    @classmethod
    def of(cls, graph: Graph) -> Params:
        values = nbytes = 0
        for p in graph.params.values():
            n = p.type.numel()
            values += n
            nbytes += n * p.type.itemsize
        return cls(len(graph.params), values, nbytes)


@dataclass
class PassChange:
    """What one pass did."""

    name: str
    removed: Counter = field(default_factory=Counter)  # op: nodes removed (net)
    added: Counter = field(default_factory=Counter)  # op: nodes added (net)
    rewritten: Counter = field(default_factory=Counter)  # op: nodes replaced by the same op
    params_before: Params | None = None
    params_after: Params | None = None
    seconds: float = 0.0

    @property
    def changed(self) -> bool:
        return bool(self.removed or self.added or self.rewritten) or (
            self.params_before != self.params_after
        )

    def text(self) -> str:
        parts = [f"-{n} {op}" for op, n in _ordered(self.removed)]
        parts += [f"+{n} {op}" for op, n in _ordered(self.added)]
        if self.rewritten:
            parts.append("rewrote " + ", ".join(f"{n} {op}" for op, n in _ordered(self.rewritten)))
        if self.params_before != self.params_after:
            parts.append("parameters " + _params_change(self.params_before, self.params_after))
        return "; ".join(parts) if parts else "no change"


def _ordered(counts: Counter) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes} B"


def _params_change(before: Params, after: Params) -> str:
    text = f"{before.tensors} -> {after.tensors} tensors"
    if before.values != after.values:
        text += f", {before.values:,} -> {after.values:,} values"
        text += f" ({_size(before.bytes)} -> {_size(after.bytes)})"
    return text


class _Snapshot:
    """The nodes of a graph before a pass (held, so that their ids stay theirs)."""

    def __init__(self, graph: Graph):
        self.nodes: list[Node] = list(graph.nodes)
        self.params = Params.of(graph)


@dataclass
class PassReport:
    """Every pass of a run, in order, with the graph's size before and after."""

    graph_name: str = ""
    level: str = ""
    nodes_before: Counter = field(default_factory=Counter)
    nodes_after: Counter = field(default_factory=Counter)
    params_before: Params | None = None
    params_after: Params | None = None
    passes: list[PassChange] = field(default_factory=list)

    def start(self, graph: Graph) -> None:
        self.graph_name, self.level = graph.name, graph.opt_level
        self.nodes_before = Counter(n.op for n in graph.nodes)
        self.params_before = Params.of(graph)

    def before_pass(self, graph: Graph) -> _Snapshot:
        return _Snapshot(graph)

    def after_pass(self, name: str, graph: Graph, before: _Snapshot, seconds: float) -> None:
        now = list(graph.nodes)
        old_ids = {id(n) for n in before.nodes}
        new_ids = {id(n) for n in now}
        gone = Counter(n.op for n in before.nodes if id(n) not in new_ids)
        came = Counter(n.op for n in now if id(n) not in old_ids)
        rewritten = Counter({op: min(n, came[op]) for op, n in gone.items() if came[op]})
        change = PassChange(
            name,
            removed=gone - came,
            added=came - gone,
            rewritten=rewritten,
            params_before=before.params,
            params_after=Params.of(graph),
            seconds=seconds,
        )
        self.passes.append(change)
        self.nodes_after = Counter(n.op for n in now)
        self.params_after = change.params_after

    def finish(self, graph: Graph) -> None:
        self.nodes_after = Counter(n.op for n in graph.nodes)
        self.params_after = Params.of(graph)

    def render(self) -> str:
        """The report as text: a line per pass, then the totals."""
        width = max([len(p.name) for p in self.passes] + [len("total")])
        lines = [f"passes on {self.graph_name} ({self.level}):"]
        for p in self.passes:
            lines.append(f"  {p.name:<{width}}  {p.text()}")
        before, after = sum(self.nodes_before.values()), sum(self.nodes_after.values())
        total = PassChange(
            "total",
            removed=self.nodes_before - self.nodes_after,
            added=self.nodes_after - self.nodes_before,
        )
        summary = f"nodes {before} -> {after}"
        if total.removed or total.added:
            summary += f" ({total.text()})"
        b, a = self.params_before, self.params_after
        if b is not None and a is not None and b != a:
            summary += f"; parameters {b.tensors} -> {a.tensors} tensors, "
            summary += f"{b.values:,} -> {a.values:,} values ({_size(b.bytes)} -> {_size(a.bytes)})"
        elif a is not None:
            summary += f"; parameters unchanged ({a.tensors} tensors, {a.values:,} values, "
            summary += f"{_size(a.bytes)})"
        lines.append(f"  {'total':<{width}}  {summary}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


@dataclass(frozen=True)
class OnnxCounts:
    """The size of an ONNX model: the nodes of its main graph, its initializers and their
    bytes (read from the tensors' headers: no weight is decoded)."""

    nodes: int
    initializers: int
    bytes: int

    @classmethod
    def of(cls, model) -> OnnxCounts:
        from onnx import helper

        nbytes = 0
        for t in model.graph.initializer:
            n = 1
            for d in t.dims:
                n *= d
            nbytes += n * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        return cls(len(model.graph.node), len(model.graph.initializer), nbytes)

    @classmethod
    def of_file(cls, path) -> OnnxCounts:
        import onnx

        return cls.of(onnx.load(str(path), load_external_data=False))

    def text(self) -> str:
        nodes = f"{self.nodes} node{'s' if self.nodes != 1 else ''}"
        inits = f"{self.initializers} initializer{'s' if self.initializers != 1 else ''}"
        return f"{nodes}, {inits} ({_size(self.bytes)})"


def files_line(source: str, before: OnnxCounts | None, target: str, after: OnnxCounts) -> str:
    """The report's last line: the ONNX model read (if the input was one) and written."""
    read = f"{source} {before.text()} -> " if before is not None else ""
    return f"  onnx: {read}{target} {after.text()}"
