"""Reverse-mode differentiation as a graph transformation: from the nodes of a graph and the
gradient of its loss, the IR nodes that compute the gradient of every parameter.

Each forward op has a rule in GRADIENTS (cnnc/train/rules.py). A rule sees the forward node
and the gradients of its outputs through a :class:`GradContext`, adds the nodes that
compute its inputs' gradients to the same graph, and returns them. Gradients of a value
read several times add up. Nothing is computed here: the result is a graph, which either
backend runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from cnnc.errors import InternalError
from cnnc.ir.graph import Graph, Node, Value

GradRule = Callable[["GradContext"], list["Value | None"]]
GRADIENTS: dict[str, GradRule] = {}


def gradient(*ops: str):
    """Register the gradient rule of forward ops ``ops``."""

    def register(rule: GradRule) -> GradRule:
        for op in ops:
            if op in GRADIENTS:
                raise InternalError(f"gradient of {op} registered twice")
            GRADIENTS[op] = rule
        return rule

    return register


class GradContext:
    """What a gradient rule works with: the forward node, its outputs' gradients, which of
    its inputs need one, and ways to add nodes and constants to the graph."""

    def __init__(self, graph: Graph, node: Node, dys: list[Value | None], needs: list[bool]):
        self.graph = graph
        self.node = node
        self._dys = dys
        self._needs = needs

    # ---- what the rule reads -------------------------------------------------------------

    @property
    def attrs(self) -> dict[str, Any]:
        return self.node.attrs

    def x(self, i: int = 0) -> Value:
        """The forward node's input ``i``."""
        return self.node.inputs[i]

    def y(self, i: int = 0) -> Value:
        """The forward node's output ``i``."""
        return self.node.outputs[i]

    def dy(self, i: int = 0) -> Value | None:
        """The gradient of output ``i``, or None where nothing depends on that output."""
        return self._dys[i]

    def dy_or_zeros(self, i: int = 0) -> Value:
        """The gradient of output ``i``; zeros where nothing depends on it (a split's unused
        part)."""
        dy = self._dys[i]
        if dy is not None:
            return dy
        out = self.node.outputs[i]
        if any(not isinstance(d, int) for d in out.shape):
            # zeros of a batched shape: 0 · the output itself (the factor of the output's
            # rank, 1×…×1: mul broadcasts only between equal ranks)
            zero = self.constant(np.zeros((1,) * out.type.rank), f".zero{i}", like=out)
            return self.emit("mul", [out, zero], suffix=".zero")
        return self.constant(np.zeros(out.shape), f".zero{i}", like=out)

    def needs(self, i: int) -> bool:
        """Whether input ``i`` needs a gradient (a trained parameter depends on it)."""
        return self._needs[i]

    # ---- what the rule adds --------------------------------------------------------------

    def emit(
        self, op: str, inputs: list[Value], attrs: dict[str, Any] | None = None, suffix: str = ""
    ) -> Value:
        """Add node ``op`` named after the forward node (``<name>.grad<suffix>``); returns
        its first output."""
        return self.emit_outputs(op, inputs, attrs, suffix)[0]

    def emit_outputs(
        self, op: str, inputs: list[Value], attrs: dict[str, Any] | None = None, suffix: str = ""
    ) -> tuple[Value, ...]:
        name = self.graph.unique_name(f"{self.node.name}.grad{suffix}")
        node = self.graph.add_node(op, inputs, attrs, name=name, loc=self.node.loc, note="autodiff")
        return tuple(node.outputs)

    def constant(self, array: np.ndarray, suffix: str, like: Value | None = None) -> Value:
        """A constant tensor (a parameter of the training graph that no update changes),
        in the float type of ``like`` (default: of the node's first input)."""
        dtype = (like or self.node.inputs[0]).type.numpy_dtype
        return constant(self.graph, f"{self.node.name}{suffix}", np.asarray(array, dtype))

    def scalar(self, value: float, like: Value | None = None) -> Value:
        """A constant scalar of the float type of ``like``, shaped [1, 1, ...] to its rank
        (the arithmetic ops broadcast between tensors of one rank)."""
        rank = (like or self.node.inputs[0]).type.rank
        return self.constant(np.full((1,) * rank, value), f".c{value:g}", like)

    def sum_to(self, grad: Value, target: Value) -> Value:
        """``grad`` summed over the axes along which ``target`` was broadcast (NumPy's rule,
        aligned at the last axis), shaped as ``target``."""
        gshape, tshape = grad.shape, target.shape
        lead = len(gshape) - len(tshape)
        axes = [i for i in range(lead)]
        axes += [lead + i for i, d in enumerate(tshape) if d == 1 and gshape[lead + i] != 1]
        if not axes:
            return grad
        summed = self.emit("reduce_sum", [grad], {"axes": tuple(axes), "keepdims": True})
        if lead:
            summed = self.emit(
                "reduce_sum", [summed], {"axes": tuple(range(lead)), "keepdims": False}
            )
        return summed


def constant(graph: Graph, name: str, array: np.ndarray) -> Value:
    """A parameter of ``graph`` holding ``array``: a constant of a training graph."""
    from cnnc.ir.types import dtype_name

    value = graph.add_param(
        graph.unique_name(name), array.shape, ("constant", 0), dtype=dtype_name(array.dtype)
    )
    value.set_data(array)
    return value


def requiring_grad(graph: Graph, sources: list[Value]) -> set[int]:
    """ids of the values that depend on ``sources`` (whose gradient is worth computing)."""
    live = {id(v) for v in sources}
    for node in graph.nodes:
        if any(id(v) in live for v in node.inputs):
            live.update(id(o) for o in node.outputs)
    return live


def backward(
    graph: Graph,
    nodes: list[Node],
    seeds: dict[int, Value],
    wrt: list[Value],
) -> dict[int, Value]:
    """Add to ``graph`` the nodes computing the gradients of the values ``wrt``, given the
    gradients ``seeds`` (by id of value) of some outputs of the forward ``nodes``.

    Returns the gradient of each value of ``wrt`` that receives one, by id.
    """
    live = requiring_grad(graph, wrt)
    pending: dict[int, list[Value]] = {k: [v] for k, v in seeds.items()}

    def total(v: Value) -> Value | None:
        parts = pending.pop(id(v), None)
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        name = graph.unique_name(f"{v.name}.grad_sum")
        producer = v.producer
        return graph.add_node(
            "add", parts, name=name, loc=producer.loc if producer else None, note="autodiff"
        ).output

    for node in reversed(nodes):
        if not any(id(o) in live for o in node.outputs):
            continue
        dys = [total(o) for o in node.outputs]
        if all(d is None for d in dys):
            continue
        rule = GRADIENTS.get(node.op)
        if rule is None:
            raise InternalError(f"no gradient rule for op {node.op}")
        needs = [id(v) in live for v in node.inputs]
        grads = rule(GradContext(graph, node, dys, needs))
        if len(grads) != len(node.inputs):
            raise InternalError(
                f"gradient of {node.op} gave {len(grads)} gradients for {len(node.inputs)} inputs"
            )
        for v, g, need in zip(node.inputs, grads, needs, strict=True):
            if g is None or not need:
                continue
            if g.shape != v.shape or g.type.dtype != v.type.dtype:
                raise InternalError(
                    f"gradient of {node.op} {node.name}: {g.type} for input %{v.name} {v.type}"
                )
            pending.setdefault(id(v), []).append(g)
    return {id(v): g for v in wrt if (g := total(v)) is not None}
