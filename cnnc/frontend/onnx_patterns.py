"""ONNX patterns that compute one IR op with several nodes, rewritten into that one node
before import (exporters spell an op ONNX has no node for, or had none for at the model's
opset, as a small graph of standard ops).

    Mul(x, Sigmoid(x))                                ==>  cnnc.Silu(x)
    Mul(x, HardSigmoid(x, alpha=1/6, beta=1/2))       ==>  HardSwish(x)
    Mul(x, Tanh(Softplus(x)))                         ==>  Mish(x)
    Div(Softplus(Mul(x, beta)), beta)                 ==>  cnnc.Softplus(x, beta)
    x · 0.5 · (1 + Erf(x / √2))                       ==>  Gelu(x)
    x · 0.5 · (1 + Tanh(√(2/π) · (x + 0.044715·x³)))  ==>  Gelu(x, approximate=tanh)

The products may come in any order and grouping (torch writes (x · (1 + erf)) · 0.5),
x / √2 may be a Div or a Mul by 1/√2, x³ a Pow or products, and constants may be
initializers or Constant nodes; they must equal the formula's to 1e-4.

Leaves alone (and why): a pattern whose inner values are read by anything outside it, or
are graph outputs (the inner values would be lost), and a different x in the two places.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

FUNCTION_DOMAIN = "cnnc"


@dataclass
class _Graph:
    """The nodes of an ONNX graph with who produces and how many read each value."""

    nodes: list[onnx.NodeProto]
    constants: dict[str, np.ndarray]
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    readers: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        for node in self.nodes:
            for out in node.output:
                self.producer[out] = node

    def scalar(self, name: str) -> float | None:
        value = self.constants.get(name)
        if value is None or value.size != 1 or not np.issubdtype(value.dtype, np.floating):
            return None
        return float(value.reshape(()))

    def op(self, name: str, op_type: str) -> onnx.NodeProto | None:
        """The node of type ``op_type`` producing ``name``, if nothing else reads ``name``."""
        node = self.producer.get(name)
        if node is None or node.op_type != op_type or node.domain not in ("", "ai.onnx"):
            return None
        return node if self.readers.get(name, 0) == 1 else None


def _close(value: float | None, expected: float) -> bool:
    return value is not None and abs(value - expected) <= 1e-4 * abs(expected)


def _factors(g: _Graph, name: str, inner: list[onnx.NodeProto]) -> list[str]:
    """The factors of a product of Muls (and Pow by 3) read by nothing else, flattened;
    the Mul and Pow nodes they pass through are added to ``inner``."""
    node = g.op(name, "Mul")
    if node is not None:
        inner.append(node)
        return _factors(g, node.input[0], inner) + _factors(g, node.input[1], inner)
    node = g.op(name, "Pow")
    if node is not None and _close(g.scalar(node.input[1]), 3.0):
        inner.append(node)
        return [node.input[0]] * 3
    return [name]


def _split(g: _Graph, factors: list[str], constant: float) -> list[str] | None:
    """``factors`` without the one scalar constant equal to ``constant``, or None."""
    for i, f in enumerate(factors):
        if _close(g.scalar(f), constant):
            return factors[:i] + factors[i + 1 :]
    return None


def _one_plus(g: _Graph, name: str, inner: list[onnx.NodeProto]) -> str | None:
    """``t`` where ``name`` is Add(t, 1) or Add(1, t), read by nothing else."""
    add = g.op(name, "Add")
    if add is None:
        return None
    a, b = add.input
    term = b if _close(g.scalar(a), 1.0) else a if _close(g.scalar(b), 1.0) else None
    if term is not None:
        inner.append(add)
    return term


def _gelu_erf(g: _Graph, gate: str, x: str, inner: list[onnx.NodeProto]) -> bool:
    """Whether ``gate`` is Erf(x / √2)."""
    erf = g.op(gate, "Erf")
    if erf is None:
        return False
    div = g.op(erf.input[0], "Div")
    if div is not None and div.input[0] == x and _close(g.scalar(div.input[1]), np.sqrt(2)):
        inner += [erf, div]
        return True
    found: list[onnx.NodeProto] = []
    factors = _split(g, _factors(g, erf.input[0], found), 1 / np.sqrt(2))
    if factors == [x]:
        inner += [erf, *found]
        return True
    return False


def _gelu_tanh(g: _Graph, gate: str, x: str, inner: list[onnx.NodeProto]) -> bool:
    """Whether ``gate`` is Tanh(√(2/π) · (x + 0.044715·x³))."""
    tanh = g.op(gate, "Tanh")
    if tanh is None:
        return False
    found: list[onnx.NodeProto] = [tanh]
    scaled = _split(g, _factors(g, tanh.input[0], found), np.sqrt(2 / np.pi))
    if scaled is None or len(scaled) != 1:
        return False
    add = g.op(scaled[0], "Add")
    if add is None:
        return False
    found.append(add)
    for linear, cubic in (add.input, add.input[::-1]):
        terms: list[onnx.NodeProto] = []
        if linear == x and _split(g, _factors(g, cubic, terms), 0.044715) == [x, x, x]:
            inner += [*found, *terms]
            return True
    return False


def _gelu(g: _Graph, root: onnx.NodeProto) -> tuple[list[onnx.NodeProto], onnx.NodeProto] | None:
    inner: list[onnx.NodeProto] = []
    factors = _factors(g, root.input[0], inner) + _factors(g, root.input[1], inner)
    factors = _split(g, factors, 0.5)
    if factors is None or len(factors) != 2:
        return None
    for x, sum_ in (factors, factors[::-1]):
        found = list(inner)
        gate = _one_plus(g, sum_, found)
        if gate is None:
            continue
        for tanh, match in ((False, _gelu_erf), (True, _gelu_tanh)):
            if match(g, gate, x, found):
                attrs = {"approximate": "tanh"} if tanh else {}
                return found, helper.make_node("Gelu", [x], list(root.output), root.name, **attrs)
    return None


def _gate(g: _Graph, root: onnx.NodeProto) -> tuple[list[onnx.NodeProto], onnx.NodeProto] | None:
    """Mul(x, f(x)) with f one of Sigmoid, HardSigmoid(1/6, 1/2), Tanh(Softplus)."""
    for x, gate in (root.input, root.input[::-1]):
        if (sigmoid := g.op(gate, "Sigmoid")) is not None and sigmoid.input[0] == x:
            return [sigmoid], helper.make_node("Silu", [x], [], domain=FUNCTION_DOMAIN)
        if (hard := g.op(gate, "HardSigmoid")) is not None and hard.input[0] == x:
            attrs = {a.name: helper.get_attribute_value(a) for a in hard.attribute}
            if _close(attrs.get("alpha", 0.2), 1 / 6) and _close(attrs.get("beta", 0.5), 0.5):
                return [hard], helper.make_node("HardSwish", [x], [])
        tanh = g.op(gate, "Tanh")
        softplus = tanh and g.op(tanh.input[0], "Softplus")
        if softplus is not None and softplus.input[0] == x:
            return [tanh, softplus], helper.make_node("Mish", [x], [])
    return None


def _softplus(g: _Graph, root: onnx.NodeProto) -> tuple | None:
    """Div(Softplus(Mul(x, beta)), beta): softplus with a beta, as torch exports it."""
    beta = g.scalar(root.input[1])
    softplus = g.op(root.input[0], "Softplus")
    scaled = softplus and g.op(softplus.input[0], "Mul")
    if beta is None or scaled is None:
        return None
    for x, b in (scaled.input, scaled.input[::-1]):
        if _close(g.scalar(b), beta) and x not in g.constants:
            new = helper.make_node(
                "Softplus", [x], list(root.output), root.name, domain=FUNCTION_DOMAIN, beta=beta
            )
            return [softplus, scaled], new
    return None


def _match(g: _Graph, root: onnx.NodeProto) -> tuple[list[onnx.NodeProto], onnx.NodeProto] | None:
    if root.op_type == "Div" and root.domain in ("", "ai.onnx") and len(root.input) == 2:
        return _softplus(g, root)
    if root.op_type != "Mul" or root.domain not in ("", "ai.onnx") or len(root.input) != 2:
        return None
    found = _gate(g, root)
    if found is None:
        return _gelu(g, root)
    inner, new = found
    new.output[:] = root.output
    new.name = root.name
    return inner, new


def rewrite(graph: onnx.GraphProto, constants: dict[str, np.ndarray]) -> list[onnx.NodeProto]:
    """The nodes of ``graph`` with every pattern rewritten into its one node (at the place of
    the pattern's last node); ``graph`` itself is left as it is."""
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    for out in graph.output:
        readers[out.name] = readers.get(out.name, 0) + 1
    known = dict(constants)
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1:
            attr = node.attribute[0]
            if attr.name == "value":
                known[node.output[0]] = numpy_helper.to_array(attr.t)
            elif attr.name == "value_float":
                known[node.output[0]] = np.array(attr.f, np.float32)
    nodes = list(graph.node)
    for root in list(nodes):
        if not any(n is root for n in nodes):
            continue
        found = _match(_Graph(nodes, known, readers=readers), root)
        if found is None:
            continue
        inner, new = found
        # The exporter's metadata (PyTorch's module scope, say) describes the pattern's node.
        new.metadata_props.extend(root.metadata_props)
        gone = {id(n) for n in inner}
        nodes = [new if n is root else n for n in nodes if id(n) not in gone]
    return nodes
