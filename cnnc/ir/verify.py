"""Re-check a whole graph: types, use lists, topological order, and that every value is defined."""

from __future__ import annotations

from cnnc.errors import CnncError, InternalError
from cnnc.ir.graph import Graph


def verify(graph: Graph) -> None:
    """Raise InternalError naming the first broken invariant; passes run it after every rewrite.

    A node's shape rule runs again only if its input types or attributes changed since
    it last passed (the check is then the comparison), so that verifying after every
    pass costs little more than walking the graph.
    """

    def fail(message: str) -> None:
        raise InternalError(f"graph {graph.name} is broken: {message}")

    from cnnc.ops import get_op

    defined: set[int] = set()
    names: list[str] = []
    # id(value) -> ids of the nodes reading it, once per use
    uses: dict[int, list[int]] = {}

    for v in graph.inputs:
        if v.kind != "input":
            fail(f"graph input %{v.name} is a {v.kind}")
        defined.add(id(v))
        names.append(v.name)
    for name, p in graph.params.items():
        if p.kind != "param" or p.name != name:
            fail(f"parameter {name} is recorded as {p.kind} {p.name}")
        defined.add(id(p))
        names.append(p.name)
    for node in graph.nodes:
        for v in node.inputs:
            if id(v) not in defined:
                fail(f"node {node.name} reads %{v.name}, which is not defined before it")
            uses.setdefault(id(v), []).append(id(node))
        types = [v.type for v in node.inputs]
        actual = [v.type for v in node.outputs]
        if not _unchanged(node.checked, types, node.attrs, actual):
            try:
                expected = get_op(node.op).infer(types, node.attrs)
            except CnncError as e:
                fail(f"node {node.name} ({node.op}) no longer type-checks: {e.message}")
            if expected != actual:
                fail(
                    f"node {node.name} ({node.op}) has output types {actual}, "
                    f"its shape rule gives {expected}"
                )
            node.checked = (types, dict(node.attrs), actual)
        for out in node.outputs:
            if out.producer is not node:
                fail(f"%{out.name} is an output of {node.name} but names another producer")
            defined.add(id(out))
            names.append(out.name)
    for v in [*graph.inputs, *graph.params.values(), *(o for n in graph.nodes for o in n.outputs)]:
        users, expected_users = v.users, uses.get(id(v), ())
        if len(users) != len(expected_users) or (
            (id(users[0]) != expected_users[0])
            if len(users) == 1
            else sorted(id(u) for u in users) != sorted(expected_users)
        ):
            fail(f"the use list of %{v.name} does not match the nodes that read it")
    for v in graph.outputs:
        if id(v) not in defined:
            fail(f"graph output %{v.name} is not defined")
    if not graph.outputs:
        fail("it has no outputs")
    if len(set(names)) != len(names):
        seen: set[str] = set()
        duplicates = {n for n in names if n in seen or seen.add(n)}
        fail(f"value names used more than once: {', '.join(sorted(duplicates))}")


def _unchanged(checked: tuple | None, types: list, attrs: dict, actual: list) -> bool:
    if checked is None:
        return False
    try:
        return checked[0] == types and checked[2] == actual and checked[1] == attrs
    except ValueError:  # an attribute NumPy compares element by element: check again
        return False
