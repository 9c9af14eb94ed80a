"""AST -> IR: resolve layers and their arguments, name every layer, build and verify the graph."""

from __future__ import annotations

import difflib
from collections import Counter
from typing import Any

from cnnc.errors import LayerError, Location, ShapeError
from cnnc.frontend.parser import Call, Link, Network, Program
from cnnc.ir.graph import Graph, Value
from cnnc.ir.types import BATCH, TensorType
from cnnc.ir.verify import verify
from cnnc.ops import Attr, Layer, LayerContext, all_layers, get_layer
from cnnc.ops.base import REQUIRED


def select_network(program: Program, name: str | None = None) -> Network:
    """The network called ``name``, or the last network of the program."""
    if not program.networks:
        raise LayerError(
            "the program defines no network",
            Location(program.source, 1, 1),
            hint="write network name(input: CxHxW) { ... }",
        )
    if name is None:
        return program.networks[-1]
    for net in program.networks:
        if net.name == name:
            return net
    known = ", ".join(n.name for n in program.networks)
    raise LayerError(
        f"the program has no network {name!r}; it defines {known}", Location(program.source, 1, 1)
    )


def lower(program: Program, network: str | None = None) -> Graph:
    """Build the IR graph of one network of a parsed program, and verify it."""
    return _Lowering(select_network(program, network)).run()


class _Lowering:
    def __init__(self, net: Network):
        self.net = net
        self.graph = Graph(net.name)
        self.labels: dict[str, Location] = {}
        self.counters: Counter[str] = Counter()
        # Auto-generated names must not take a name the user gives a later layer.
        self.reserved = {link.label for stmt in net.statements for link in stmt.links if link.label}

    def run(self) -> Graph:
        net = self.net
        if len(net.input_shape) not in (2, 3) or not all(d > 0 for d in net.input_shape):
            raise ShapeError(
                f"input {net.input_name} is {'x'.join(map(str, net.input_shape))}; a network "
                "takes C×L (1-D) or C×H×W (2-D) with every size at least 1",
                net.shape_loc,
                hint="for example image: 3x224x224 or signal: 1x128",
            )
        value = self.graph.add_input(net.input_name, TensorType("f32", (BATCH, *net.input_shape)))
        if not net.statements:
            raise LayerError(f"network {net.name} has no layers", net.loc)
        for stmt in net.statements:
            label = None
            for link in stmt.links:
                label = link.label or label
                value = self.link(link, value, label)
        self.graph.outputs = [value]
        verify(self.graph)
        return self.graph

    def link(self, link: Link, x: Value, chain_label: str | None) -> Value:
        call = link.call
        layer = get_layer(call.name)
        if layer is None:
            raise unknown_layer(call)
        args, arg_locs = bind_args(layer, call)
        name = self.name_for(link, chain_label)
        ctx = LayerContext(self.graph, name, call.loc, args, arg_locs)
        return layer.build(ctx, x)

    def name_for(self, link: Link, chain_label: str | None) -> str:
        """A layer's name: its label; else ``<label>.<keyword>`` after a labelled layer of the
        same statement; else ``<keyword><n>``, counting that keyword's layers from 1."""
        keyword = link.call.name
        self.counters[keyword] += 1
        if link.label is None and chain_label is not None:
            return self.graph.unique_name(f"{chain_label}.{keyword}")
        if link.label is None:
            n = self.counters[keyword]
            while f"{keyword}{n}" in self.reserved:
                n += 1
            self.counters[keyword] = n
            return f"{keyword}{n}"
        if link.label in self.labels or link.label == self.net.input_name:
            first = self.labels.get(link.label)
            where = f" (first at line {first.line})" if first else " (it names the input)"
            raise LayerError(
                f"name {link.label!r} is used twice{where}",
                link.label_loc,
                hint="give each layer its own name",
            )
        self.labels[link.label] = link.label_loc
        return link.label


def unknown_layer(call: Call) -> LayerError:
    """The error for a call of a layer the language does not have."""
    known = sorted(all_layers())
    close = difflib.get_close_matches(call.name, known, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return LayerError(
        f"unknown layer {call.name!r}", call.name_loc, hint=hint + "layers: " + ", ".join(known)
    )


def bind_args(layer: Layer, call: Call) -> tuple[dict[str, Any], dict[str, Location]]:
    """Match a call's arguments to the layer's attributes, checking and converting each."""
    positional = [a for a in layer.attrs if a.positional]
    args: dict[str, Any] = {}
    locs: dict[str, Location] = {}
    for i, arg in enumerate(call.args):
        if arg.name is None:
            if any(a.name is not None for a in call.args[:i]):
                raise LayerError("a positional argument cannot follow a named one", arg.loc)
            if i >= len(positional):
                names = ", ".join(a.name for a in positional) or "none"
                raise LayerError(
                    f"{layer.keyword} takes {len(positional)} positional "
                    f"argument{'s' if len(positional) != 1 else ''} ({names}), got more",
                    arg.loc,
                    hint=f"name the others: {layer.signature}",
                )
            attr = positional[i]
        else:
            attr = layer.attr(arg.name)
            if attr is None:
                names = [a.name for a in layer.attrs]
                close = difflib.get_close_matches(arg.name, names, n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                raise LayerError(
                    f"{layer.keyword} has no attribute {arg.name!r}",
                    arg.loc,
                    hint=hint + f"{layer.keyword} takes: {layer.signature}",
                )
        if attr.name in args:
            raise LayerError(f"{attr.name} is given twice", arg.loc)
        args[attr.name] = convert(layer, attr, arg.value, arg.loc)
        locs[attr.name] = arg.loc
    for attr in layer.attrs:
        if attr.name not in args:
            if attr.default is REQUIRED:
                raise LayerError(
                    f"{layer.keyword} needs {attr.name} ({attr.doc})",
                    call.loc,
                    hint=f"{layer.keyword} takes: {layer.signature}",
                )
            args[attr.name] = attr.default
    return args, locs


def _describe(value: Any) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join(_describe(v) for v in value) + ")"
    return str(value)


def convert(layer: Layer, attr: Attr, value: Any, loc: Location) -> Any:
    """Check one argument against its attribute kind; returns the converted value."""
    where = f"{layer.keyword} {attr.name}"

    def bad(expected: str) -> LayerError:
        return LayerError(f"{where} must be {expected}, got {_describe(value)}", loc)

    def check_min(v: int | float) -> None:
        if attr.minimum is not None and v < attr.minimum:
            bound = int(attr.minimum) if float(attr.minimum).is_integer() else attr.minimum
            qualifier = "positive" if bound == 1 else f"at least {bound}"
            raise LayerError(f"{where} must be {qualifier}, got {_describe(value)}", loc)

    def ints(v: Any, expected: str) -> tuple[int, ...] | int:
        items = v if isinstance(v, tuple) else (v,)
        if not items or not all(isinstance(i, int) for i in items):
            raise bad(expected)
        for i in items:
            check_min(i)
        return v

    kind = attr.kind
    if kind == "int":
        if not isinstance(value, int):
            raise bad("an integer")
        check_min(value)
        return value
    if kind == "ints":
        return ints(value, "an integer or a tuple of integers such as (3, 3)")
    if kind == "float":
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise bad("a number")
        check_min(value)
        return float(value)
    if kind == "bool":
        if value not in ("true", "false"):
            raise bad("true or false")
        return value == "true"
    if kind == "pad":
        if value in ("same", "valid"):
            return value
        if isinstance(value, str):
            raise bad("an integer, a tuple of integers, same or valid")
        return ints(value, "an integer, a tuple of integers, same or valid")
    raise AssertionError(f"attribute kind {kind}")
