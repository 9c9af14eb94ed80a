"""Re-check a whole graph: types, use lists, topological order, and that every value is defined."""

from __future__ import annotations

from collections import Counter

from cnnc.errors import CnncError, InternalError
from cnnc.ir.graph import Graph


def verify(graph: Graph) -> None:
    """Raise InternalError naming the first broken invariant; passes run it after every rewrite."""

    def fail(message: str) -> None:
        raise InternalError(f"graph {graph.name} is broken: {message}")

    from cnnc.ops import get_op

    defined = set()
    names: Counter[str] = Counter()
    uses: dict[int, Counter] = {}
    for v in graph.inputs:
        if v.kind != "input":
            fail(f"graph input %{v.name} is a {v.kind}")
        defined.add(id(v))
        names[v.name] += 1
    for name, p in graph.params.items():
        if p.kind != "param" or p.name != name:
            fail(f"parameter {name} is recorded as {p.kind} {p.name}")
        defined.add(id(p))
        names[p.name] += 1
    for node in graph.nodes:
        for v in node.inputs:
            if id(v) not in defined:
                fail(f"node {node.name} reads %{v.name}, which is not defined before it")
            uses.setdefault(id(v), Counter())[id(node)] += 1
        try:
            expected = get_op(node.op).infer([v.type for v in node.inputs], node.attrs)
        except CnncError as e:
            fail(f"node {node.name} ({node.op}) no longer type-checks: {e.message}")
        actual = [v.type for v in node.outputs]
        if expected != actual:
            fail(
                f"node {node.name} ({node.op}) has output types {actual}, "
                f"its shape rule gives {expected}"
            )
        for out in node.outputs:
            if out.producer is not node:
                fail(f"%{out.name} is an output of {node.name} but names another producer")
            defined.add(id(out))
            names[out.name] += 1
    for v in [*graph.inputs, *graph.params.values(), *(o for n in graph.nodes for o in n.outputs)]:
        recorded = Counter(id(u) for u in v.users)
        if recorded != uses.get(id(v), Counter()):
            fail(f"the use list of %{v.name} does not match the nodes that read it")
    for v in graph.outputs:
        if id(v) not in defined:
            fail(f"graph output %{v.name} is not defined")
    if not graph.outputs:
        fail("it has no outputs")
    duplicates = [n for n, c in names.items() if c > 1]
    if duplicates:
        fail(f"value names used more than once: {', '.join(sorted(duplicates))}")
