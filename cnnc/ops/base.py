"""What an op is (shape rule, cost, dump text) and what a DSL layer is (signature, lowering)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cnnc.errors import CnncError, InternalError, LayerError, Location
from cnnc.ir.types import TensorType

if TYPE_CHECKING:
    from cnnc.ir.graph import Graph, Node, Value


class OpDef:
    """The meaning of one IR op: its shape rule, its cost, and how the dump shows it.

    Subclasses set ``name`` and override ``infer``; the rest has useful defaults.
    """

    name: str = ""
    # Input positions holding statistics rather than learned parameters (PyTorch buffers).
    statistics: tuple[int, ...] = ()

    def infer(self, inputs: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        """Output types from input types and attributes; raises ShapeError on a bad shape."""
        raise NotImplementedError

    def macs(self, node: Node) -> int:
        """Multiply-accumulates for one batch item (0 for ops that do no products)."""
        return 0

    def label(self, node: Node) -> str:
        """The op as the dump shows it (``conv2d``, ``conv2d+relu``)."""
        return self.name

    def describe(self, node: Node) -> str:
        """The attributes as the dump shows them (``k=5x5 s=1 p=2,2,2,2``)."""
        return ""

    def fixed_size(self, node: Node) -> str | None:
        """Why this node works only at its declared spatial sizes (a reshape fixes them),
        completing "reshape r1 ..."; None if it works at any larger size."""
        return None


_OPS: dict[str, OpDef] = {}


def register_op(opdef: OpDef) -> OpDef:
    """Add an op to the registry that shape inference, dumps and backends consult."""
    if opdef.name in _OPS:
        raise InternalError(f"op {opdef.name} registered twice")
    _OPS[opdef.name] = opdef
    return opdef


def all_ops() -> dict[str, OpDef]:
    """Every op of the IR, by name (what each interpretation's table must cover)."""
    return dict(_OPS)


def get_op(name: str) -> OpDef:
    """The definition of IR op ``name``."""
    try:
        return _OPS[name]
    except KeyError:
        raise InternalError(f"unknown IR op {name!r}") from None


# ---- DSL layers ---------------------------------------------------------------------------

REQUIRED = object()


@dataclass(frozen=True)
class Attr:
    """One argument of a DSL layer.

    ``kind`` is one of: ``int``, ``ints`` (an int or a tuple of ints), ``float``,
    ``floats`` (a number or a tuple of numbers), ``bool``, ``pad`` (int, tuple of ints,
    ``same`` or ``valid``), ``choice`` (one of the words in ``choices``), ``value`` (the
    name of a value), ``values`` (the names of values, taking every positional argument:
    the inputs of a merge).
    """

    name: str
    kind: str
    default: Any = REQUIRED
    positional: bool = False
    minimum: float | None = None
    doc: str = ""
    default_text: str | None = None  # how the signature shows a computed default
    choices: tuple[str, ...] = ()  # the words a ``choice`` takes


@dataclass(frozen=True)
class Layer:
    """A DSL layer keyword: its arguments and how it lowers to IR nodes."""

    keyword: str
    attrs: tuple[Attr, ...]
    # Returns the layer's value, or a tuple of values for a layer that gives several
    # (``a, b = x -> split(2)`` binds them).
    build: Callable[[LayerContext, Value], Value | tuple[Value, ...]]
    doc: str
    has_params: bool = False

    def attr(self, name: str) -> Attr | None:
        return next((a for a in self.attrs if a.name == name), None)

    @property
    def signature(self) -> str:
        parts = []
        for a in self.attrs:
            if a.kind == "values":
                parts.append(a.default_text or "a, b, ...")
            elif a.default is REQUIRED:
                parts.append(a.name)
            elif a.default_text is not None:
                parts.append(f"{a.name}={a.default_text}")
            else:
                default = str(a.default).lower() if isinstance(a.default, bool) else a.default
                parts.append(f"{a.name}={default}")
        return f"{self.keyword}({', '.join(parts)})" if parts else self.keyword


_LAYERS: dict[str, Layer] = {}


def register_layer(layer: Layer) -> Layer:
    """Make a layer keyword available in the language."""
    if layer.keyword in _LAYERS:
        raise InternalError(f"layer {layer.keyword} registered twice")
    _LAYERS[layer.keyword] = layer
    return layer


def get_layer(keyword: str) -> Layer | None:
    """The layer called ``keyword``, or None."""
    return _LAYERS.get(keyword)


def all_layers() -> dict[str, Layer]:
    """Every layer keyword of the language."""
    return dict(_LAYERS)


@dataclass
class LayerContext:
    """What a layer's ``build`` function sees: its name, arguments and the graph to extend."""

    graph: Graph
    name: str
    loc: Location | None
    args: dict[str, Any]
    arg_locs: dict[str, Location] = field(default_factory=dict)

    def __getitem__(self, attr: str) -> Any:
        return self.args[attr]

    def error(self, message: str, attr: str | None = None, hint: str | None = None) -> LayerError:
        """A LayerError at the argument ``attr`` if it was written, else at the layer."""
        return LayerError(message, self.arg_locs.get(attr, self.loc) if attr else self.loc, hint)

    def param(self, suffix: str, shape: tuple[int, ...], init: tuple[str, int]) -> Value:
        """Declare the parameter ``<layer>.<suffix>``; a size past a limit is reported at the
        layer."""
        try:
            return self.graph.add_param(f"{self.name}.{suffix}", shape, init)
        except CnncError as e:
            raise e.at(self.loc) from None

    def node(
        self, op: str, inputs: list[Value], attrs: dict[str, Any] | None = None, suffix: str = ""
    ) -> Value:
        """Add a node named after the layer (plus ``suffix``) and return its output."""
        return self.node_outputs(op, inputs, attrs, suffix)[0]

    def node_outputs(
        self, op: str, inputs: list[Value], attrs: dict[str, Any] | None = None, suffix: str = ""
    ) -> tuple[Value, ...]:
        """Add a node named after the layer (plus ``suffix``) and return all its outputs, in
        order: what a layer giving several values returns from ``build``."""
        name = self.graph.unique_name(self.name + suffix)
        return tuple(self.graph.add_node(op, inputs, attrs, name=name, loc=self.loc).outputs)

    def spatial(self, attr: str, rank: int) -> tuple[int, ...]:
        """An ``ints`` argument expanded to one value per spatial axis."""
        value = self.args[attr]
        values = value if isinstance(value, tuple) else (value,) * rank
        if len(values) != rank:
            raise self.error(
                f"{attr} has {len(values)} values but the input has {rank} spatial "
                f"{'axis' if rank == 1 else 'axes'}",
                attr,
                hint=f"give one value, or {rank}",
            )
        return values
