"""Values, nodes and graphs: the IR that lowering builds and passes rewrite."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from cnnc import limits
from cnnc.errors import CnncError, InternalError, LayerError, Location
from cnnc.ir.types import TensorType
from cnnc.limits import tensor_bytes


class Value:
    """A tensor in the graph: a graph input, a parameter, or the output of a node.

    ``users`` has one entry per use, so a node reading a value twice appears twice.

    Parameter data is lazy: ``data`` is computed on first use from a thunk, so
    dumps and summaries of large networks never allocate their weights.
    """

    __slots__ = ("_data", "_thunk", "init", "kind", "name", "producer", "type", "users")

    def __init__(self, name: str, type: TensorType, kind: str, producer: Node | None = None):
        self.name = name
        self.type = type
        self.kind = kind  # "input", "param" or "node"
        self.producer = producer
        self.users: list[Node] = []
        self.init: tuple[str, int] | None = None  # (initialiser, fan-in) for parameters
        self._data: np.ndarray | None = None
        self._thunk: Callable[[], np.ndarray] | None = None

    @property
    def is_param(self) -> bool:
        return self.kind == "param"

    @property
    def shape(self) -> tuple:
        return self.type.shape

    @property
    def in_memory(self) -> bool:
        """Whether the parameter's tensor has been computed (it is no longer lazy)."""
        return self._data is not None

    @property
    def has_data(self) -> bool:
        return self._data is not None or self._thunk is not None

    @property
    def data(self) -> np.ndarray:
        """The parameter's tensor, computed now if it was lazy."""
        if self._data is None:
            if self._thunk is None:
                raise InternalError(f"parameter {self.name} has no data (weights not initialised)")
            data = np.asarray(self._thunk(), dtype=self.type.numpy_dtype, order="C")
            if data.shape != self.type.shape:
                raise InternalError(
                    f"parameter {self.name}: computed shape {data.shape}, type says {self.type}"
                )
            self._data, self._thunk = data, None
        return self._data

    def compute_data(self) -> np.ndarray:
        """The parameter's tensor, without keeping it if it was lazy (an exporter writing
        weights one by one holds one at a time)."""
        if self._data is not None or self._thunk is None:
            return self.data
        data = np.asarray(self._thunk(), dtype=self.type.numpy_dtype, order="C")
        if data.shape != self.type.shape:
            raise InternalError(
                f"parameter {self.name}: computed shape {data.shape}, type says {self.type}"
            )
        return data

    def data_pieces(self) -> list | None:
        """The lazy tensor's chunks, when its thunk computes it in chunks that threads may
        compute at once (see :func:`cnnc.weights.pieces`): a list of (number of values,
        function computing them flat); None otherwise."""
        if self._data is not None or self.type.numpy_dtype != np.float32:
            return None
        thunk = self._thunk
        if isinstance(thunk, _Derived) and all(isinstance(s, Reshape) for s in thunk.steps):
            thunk = thunk.base  # a reshape keeps the values in their order
        pieces = getattr(thunk, "pieces", None)
        if pieces is None or math.prod(thunk.shape) != math.prod(self.type.shape):
            return None
        return pieces()

    def set_data(self, data: np.ndarray | Callable[[], np.ndarray]) -> None:
        """Give a parameter its tensor, or a function computing it when first needed."""
        if callable(data):
            self._data, self._thunk = None, data
        else:
            self._data, self._thunk = None, (lambda d=data: d)
            self.data  # noqa: B018 (check the shape now, while the caller is on the stack)

    def source(self) -> Callable[[], np.ndarray]:
        """A function computing the parameter's data as it is now: a later :meth:`derive`
        or :meth:`set_data` does not change what it returns (a fold that rewrites a weight
        and a bias computes the bias from the weight as it was)."""
        data, thunk = self._data, self._thunk
        if data is not None:
            return lambda: data
        if thunk is None:
            raise InternalError(f"parameter {self.name} has no data")
        dtype, shape = self.type.numpy_dtype, self.type.shape
        return lambda: np.asarray(thunk(), dtype=dtype).reshape(shape)

    def derive(self, fn: Callable[[np.ndarray], np.ndarray], shape: tuple | None = None) -> None:
        """Make a parameter's data ``fn(data)``, computed lazily; with ``shape``, its new shape."""
        data, thunk = self._data, self._thunk
        if data is None and thunk is None:
            raise InternalError(f"parameter {self.name} has no data to derive from")
        if shape is not None:
            self.type = self.type.with_shape(tuple(shape))
        self._data = None
        if data is not None:
            self._thunk = _Derived(lambda: data, (fn,))
        elif isinstance(thunk, _Derived):
            self._thunk = _Derived(thunk.base, (*thunk.steps, fn))
        else:
            self._thunk = _Derived(thunk, (fn,))

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


class Reshape:
    """A step of :meth:`Value.derive` that only reshapes the data."""

    __slots__ = ("shape",)

    def __init__(self, shape: tuple):
        self.shape = tuple(shape)

    def __call__(self, data: np.ndarray) -> np.ndarray:
        return data.reshape(self.shape)


class _Derived:
    """A lazy tensor: a base function, then each step applied in turn. A loop rather than
    nested lambdas, so that a thousand folds into one weight (``scale * 1000`` after a conv)
    do not exhaust Python's recursion limit."""

    __slots__ = ("base", "steps")

    def __init__(self, base: Callable[[], np.ndarray], steps: tuple):
        self.base, self.steps = base, steps

    def __call__(self) -> np.ndarray:
        data = self.base()
        for step in self.steps:
            data = step(data)
        return data


class Node:
    """One operation: an op name, input and output values, attributes, and its source place."""

    __slots__ = ("attrs", "checked", "inputs", "loc", "name", "note", "op", "outputs")

    def __init__(
        self,
        op: str,
        name: str,
        inputs: list[Value],
        attrs: dict[str, Any],
        loc: Location | None,
        note: str = "",
    ):
        self.op = op
        self.name = name
        self.inputs = inputs
        self.outputs: list[Value] = []
        self.attrs = attrs
        self.loc = loc
        self.note = note  # which rewrite made this node, shown in dumps
        # What verify() last found type-correct: input types, attributes, output types.
        self.checked: tuple | None = None

    @property
    def output(self) -> Value:
        return self.outputs[0]

    @property
    def params(self) -> list[Value]:
        return [v for v in self.inputs if v.is_param]

    @property
    def activations(self) -> list[Value]:
        """The inputs that are not parameters."""
        return [v for v in self.inputs if not v.is_param]

    def __repr__(self) -> str:
        return f"<{self.op} {self.name}>"


def _numel(v: Value) -> int:
    return math.prod(v.shape)  # Python ints: exact, and 10 times as fast as np.prod on a tuple


_STATISTICS: dict[str, tuple[int, ...]] = {}


def is_statistic(param: Value) -> bool:
    """Whether a parameter holds statistics (running mean, variance) rather than learned values."""
    for u in param.users:
        positions = _STATISTICS.get(u.op)
        if positions is None:  # the op's positions, looked up once per op (and imported late)
            from cnnc.ops import get_op

            positions = _STATISTICS[u.op] = get_op(u.op).statistics
        if any(i < len(u.inputs) and u.inputs[i] is param for i in positions):
            return True
    return False


class Graph:
    """A network: inputs, outputs, nodes in topological order, and named parameters."""

    def __init__(self, name: str):
        self.name = name
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        # The nodes, with None where a node was removed (see ``nodes``), and each node's
        # position, while no insertion has shifted them: rewriting a graph of n nodes node
        # by node then costs O(n), not O(n²) of list.index and list.remove.
        self._nodes: list[Node | None] = []
        self._holes = 0
        self._positions: dict[int, int] | None = None
        self.params: dict[str, Value] = {}
        self.pipeline: list[str] = []  # passes that have run, for the dump's heading
        self.opt_level: str = "-O0"
        # A fully convolutional network takes inputs larger than declared (convolutionalize).
        self.flexible_spatial = False
        # How an image becomes each input, where the program says (cnnc.preprocess).
        self.preprocess: dict = {}
        self.warnings: list = []  # CnncWarning from lowering (unused values)
        # Each block instance of the program by its name (the prefix of its layers' names)
        # and the block it expands ("layer1.0": "basic"), for the summary's tree.
        self.blocks: dict[str, str] = {}
        self._names: set[str] = set()
        self.param_bytes = 0  # of the parameters added, counted against limits.param_bytes

    @property
    def nodes(self) -> list[Node]:
        """The nodes in topological order (a list that rewrites through the graph's methods
        may replace: loop over a copy when you rewrite)."""
        if self._holes:
            self._nodes = [n for n in self._nodes if n is not None]
            self._holes = 0
            self._positions = None
        return self._nodes  # type: ignore[return-value]

    @nodes.setter
    def nodes(self, nodes: list[Node]) -> None:
        self._nodes, self._holes, self._positions = list(nodes), 0, None

    def _position(self, node: Node) -> int:
        """Where ``node`` is in ``_nodes`` (ValueError if it is not in the graph)."""
        if self._positions is None:
            self._positions = {id(n): i for i, n in enumerate(self._nodes) if n is not None}
        try:
            return self._positions[id(node)]
        except KeyError:
            raise ValueError(f"node {node.name} is not in graph {self.name}") from None

    def _unlink(self, node: Node) -> int:
        """Take ``node`` out of the order, leaving a hole; returns its position."""
        position = self._position(node)
        self._nodes[position] = None
        self._holes += 1
        del self._positions[id(node)]  # type: ignore[union-attr]
        return position

    # ---- naming -------------------------------------------------------------------------

    def unique_name(self, base: str) -> str:
        """``base`` if no value or node has it yet, else ``base.2``, ``base.3``, ..."""
        if base not in self._names:
            return base
        n = 2
        while f"{base}.{n}" in self._names:
            n += 1
        return f"{base}.{n}"

    def reserve_name(self, name: str) -> None:
        """Keep ``name`` from :meth:`unique_name` (the prefix of names made from it)."""
        self._names.add(name)

    def _claim(self, name: str) -> str:
        if name in self._names:
            raise InternalError(f"name {name!r} is used twice in graph {self.name}")
        self._names.add(name)
        return name

    # ---- building -----------------------------------------------------------------------

    def add_input(self, name: str, type: TensorType) -> Value:
        """Declare a graph input."""
        value = Value(self._claim(name), type, "input")
        self.inputs.append(value)
        return value

    def add_param(
        self,
        name: str,
        shape: tuple[int, ...],
        init: tuple[str, int] | None = None,
        dtype: str = "f32",
    ) -> Value:
        """Declare a parameter tensor; ``init`` says how to initialise it without a weights file.

        The shape is checked against the hard limits and the running total of parameter
        bytes against ``param_bytes``, before anything is allocated."""
        type = TensorType(dtype, tuple(shape))
        total = self.param_bytes + tensor_bytes(type.shape, type.itemsize)
        if total > limits.current().param_bytes:
            raise limits.exceeded(
                LayerError,
                "param_bytes",
                f"with {name} {type}, the parameters of network {self.name} would take",
                total,
                unit="bytes",
            )
        value = Value(self._claim(name), type, "param")
        self.param_bytes = total
        value.init = init
        self.params[name] = value
        return value

    def add_node(
        self,
        op: str,
        inputs: Iterable[Value],
        attrs: dict[str, Any] | None = None,
        *,
        name: str,
        loc: Location | None = None,
        index: int | None = None,
        note: str = "",
        output_names: list[str] | None = None,
        _hole: int | None = None,
    ) -> Node:
        """Build a node, infer the types of its outputs, and insert it (at the end by default).

        Shape errors raised by the op's shape rule are reported at ``loc``.
        """
        from cnnc.ops import get_op

        node = Node(op, self._claim(name), list(inputs), dict(attrs or {}), loc, note)
        opdef = get_op(op)
        try:
            types = opdef.infer([v.type for v in node.inputs], node.attrs)
        except CnncError as e:
            self._names.discard(node.name)
            raise e.at(loc) from None
        names = output_names or [name] + [f"{name}.{i}" for i in range(1, len(types))]
        for out_name, t in zip(names, types, strict=True):
            out_name = out_name if out_name == name else self._claim(self.unique_name(out_name))
            node.outputs.append(Value(out_name, t, "node", producer=node))
        for v in node.inputs:
            v.users.append(node)
        # The types are right by construction: verify() checks them again once they change.
        node.checked = ([v.type for v in node.inputs], dict(node.attrs), list(types))
        if _hole is not None:  # the place of a node just replaced: nothing moves
            self._nodes[_hole] = node
            self._holes -= 1
            if self._positions is not None:
                self._positions[id(node)] = _hole
        elif index is None:
            self._nodes.append(node)
            if self._positions is not None:
                self._positions[id(node)] = len(self._nodes) - 1
        else:
            self.nodes.insert(index, node)  # ``index`` counts the nodes, not the holes
            self._positions = None
        return node

    # ---- rewriting ----------------------------------------------------------------------

    def replace_uses(self, old: Value, new: Value, keep: Node | None = None) -> None:
        """Make every user of ``old`` but ``keep`` (and the graph outputs) read ``new`` instead."""
        users, old.users = old.users, [u for u in old.users if u is keep]
        for user in users:
            if user is not keep:
                user.inputs = [new if v is old else v for v in user.inputs]
                new.users.append(user)
        self.outputs = [new if v is old else v for v in self.outputs]

    def replace_node(
        self,
        old: Node,
        op: str,
        inputs: list[Value],
        attrs: dict[str, Any],
        note: str | None = None,
    ) -> Node:
        """Put a new node in ``old``'s place, with its name, place in the source and note.

        The users of ``old``'s outputs read the new node's outputs instead; if their
        type changed, the caller must make those users fit again.
        """
        for v in old.inputs:
            v.users.remove(old)
        hole = self._unlink(old)
        self._names.discard(old.name)
        for out in old.outputs:
            self._names.discard(out.name)
        new = self.add_node(
            op,
            inputs,
            attrs,
            name=old.name,
            loc=old.loc,
            note=old.note if note is None else note,
            _hole=hole,
            output_names=[v.name for v in old.outputs],
        )
        for old_out, new_out in zip(old.outputs, new.outputs, strict=True):
            self.replace_uses(old_out, new_out)
        return new

    def insert_after(
        self,
        value: Value,
        op: str,
        attrs: dict[str, Any] | None = None,
        *,
        name: str,
        note: str = "",
        loc: Location | None = None,
    ) -> Node:
        """A new node reading ``value``, placed after its producer; every other reader of
        ``value`` (and the graph outputs) reads the new node's output instead."""
        index = self.nodes.index(value.producer) + 1 if value.producer is not None else 0
        # (list.index: an insertion shifts every later node, so positions are rebuilt anyway)
        node = self.add_node(op, [value], attrs, name=name, loc=loc, index=index, note=note)
        self.replace_uses(value, node.output, keep=node)
        return node

    def bypass(self, node: Node) -> None:
        """Remove a node whose output equals its first input; its users read that input."""
        self.replace_uses(node.output, node.inputs[0])
        self.remove_node(node)

    def remove_node(self, node: Node) -> None:
        """Remove a node whose outputs have no users (anything else is a bug in the caller)."""
        for out in node.outputs:
            if out.users or out in self.outputs:
                raise InternalError(
                    f"cannot remove node {node.name}: its output %{out.name} is still used"
                )
        for v in node.inputs:
            v.users.remove(node)
        self._unlink(node)
        self._names.discard(node.name)
        for out in node.outputs:
            self._names.discard(out.name)

    def remove_param(self, value: Value) -> None:
        """Forget a parameter no node reads."""
        if value.users:
            raise InternalError(f"cannot remove parameter {value.name}: it is still used")
        del self.params[value.name]
        self._names.discard(value.name)
        self.param_bytes -= tensor_bytes(value.type.shape, value.type.numpy_dtype.itemsize)

    def rename(self, value: Value, name: str) -> None:
        """Give a value (a parameter too) a new (unused) name."""
        old = value.name
        self._names.discard(old)
        value.name = self._claim(name)
        if value.is_param:
            # In place and in order: the parameters keep their order under the new name.
            items = [(name if k == old else k, v) for k, v in self.params.items()]
            self.params.clear()
            self.params.update(items)

    def rename_nodes(self, names: dict[Node, str]) -> None:
        """Give nodes new names at once, so that one may take a name another gives up: each
        ``unique_name`` of its wish, claimed in the order of ``names``. Their outputs, but
        graph outputs, are then named as add_node names them (the first as the node, the
        others ``<name>.1``, ...)."""
        for node in names:
            kept = {out.name for out in node.outputs if out in self.outputs}
            for name in {node.name, *(out.name for out in node.outputs)} - kept:
                self._names.discard(name)
        for node, wish in names.items():
            node.name = self._claim(self.unique_name(wish))
        for node in names:
            for i, out in enumerate(node.outputs):
                if out not in self.outputs:
                    name = node.name if i == 0 else f"{node.name}.{i}"
                    out.name = name if i == 0 else self._claim(self.unique_name(name))

    # ---- queries ------------------------------------------------------------------------

    def value_count(self) -> int:
        """Number of scalars in all parameter tensors, statistics included."""
        return sum(_numel(v) for v in self.params.values())

    def param_count(self) -> int:
        """Number of learned parameters: what PyTorch counts, without batch-norm statistics."""
        return sum(_numel(v) for v in self.params.values() if not is_statistic(v))

    def __repr__(self) -> str:
        return f"<Graph {self.name}: {len(self.nodes)} nodes, {len(self.params)} params>"
