"""Whole-graph transformations that make a new graph and leave their argument alone: a
copy in another float type (float64, to check gradients against finite differences), and
a copy whose parameters are graph inputs (a training step feeds them at every run)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from cnnc.errors import UsageError
from cnnc.ir.graph import Graph, Value
from cnnc.ir.types import _NUMPY, TensorType

FLOAT_TYPES = ("f32", "f64")


def copy_graph(
    graph: Graph,
    retype: Callable[[TensorType], TensorType] = lambda t: t,
    as_inputs: Iterable[str] = (),
) -> Graph:
    """A copy of ``graph``: new values and nodes, the same names, attributes and places in
    the source. ``retype`` gives the type of each graph input and parameter in the copy
    (node outputs follow from their shape rules); the parameters named in ``as_inputs``
    become graph inputs after the original ones, in ``graph.params`` order. A parameter's
    data stays lazy: the copy's is computed from the original's when first needed (and
    converted to the copy's type then)."""
    as_inputs = set(as_inputs)
    copy = Graph(graph.name)
    copy.pipeline = list(graph.pipeline)
    copy.opt_level = graph.opt_level
    copy.flexible_spatial = graph.flexible_spatial
    copy.preprocess = dict(graph.preprocess)
    copy.warnings = list(graph.warnings)
    copy.blocks = dict(graph.blocks)
    new: dict[int, Value] = {}
    for v in graph.inputs:
        new[id(v)] = copy.add_input(v.name, retype(v.type))
    for name, p in graph.params.items():
        t = retype(p.type)
        if name in as_inputs:
            continue
        q = copy.add_param(name, t.shape, p.init, dtype=t.dtype)
        if p.has_data:
            q.set_data(_lazy(p))
        new[id(p)] = q
    for name, p in graph.params.items():
        if name in as_inputs:
            new[id(p)] = copy.add_input(name, retype(p.type))
    for node in graph.nodes:
        made = copy.add_node(
            node.op,
            [new[id(v)] for v in node.inputs],
            dict(node.attrs),
            name=node.name,
            loc=node.loc,
            note=node.note,
            output_names=[v.name for v in node.outputs],
        )
        for old, out in zip(node.outputs, made.outputs, strict=True):
            new[id(old)] = out
    copy.outputs = [new[id(v)] for v in graph.outputs]
    copy._names |= graph._names  # names reserved by passes stay reserved
    return copy


def _lazy(p: Value) -> Callable[[], np.ndarray]:
    # compute_data: a lazy original stays lazy (its tensor is not kept twice).
    return lambda: p.compute_data()


def cast_graph(graph: Graph, dtype: str) -> Graph:
    """A copy of ``graph`` in which every floating-point value (graph inputs, parameters,
    node outputs) has element type ``dtype`` ("f32" or "f64"); integer values keep theirs.
    Parameters are converted lazily, when the copy's data is first read. The interpreter
    then computes every op in that type: a float64 copy takes float64 inputs and returns
    float64 outputs."""
    if dtype not in FLOAT_TYPES:
        raise UsageError(
            f"cannot cast a graph to {dtype!r}", hint=f"choose one of {', '.join(FLOAT_TYPES)}"
        )

    def retype(t: TensorType) -> TensorType:
        return TensorType(dtype, t.shape) if np.dtype(_NUMPY[t.dtype]).kind == "f" else t

    return copy_graph(graph, retype)


def params_to_inputs(graph: Graph, names: Iterable[str] | None = None) -> Graph:
    """A copy of ``graph`` in which the parameters named in ``names`` (default: all of them,
    statistics included) are graph inputs instead, appended after the original inputs in
    ``graph.params`` order, with the same names and types. Such an input has no batch
    axis: its shape is fully known. Run the copy with the original inputs followed by one
    array per such parameter, e.g. ``[p.data for p in graph.params.values()]``."""
    if names is None:
        chosen = list(graph.params)
    else:
        chosen = list(names)
        unknown = [n for n in chosen if n not in graph.params]
        if unknown:
            raise UsageError(
                f"network {graph.name} has no parameter {', '.join(unknown)}",
                hint="its parameters: " + ", ".join(graph.params),
            )
    return copy_graph(graph, as_inputs=chosen)
