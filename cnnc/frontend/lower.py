"""AST -> IR: resolve names, layers, blocks and their arguments, name every layer, verify."""

from __future__ import annotations

import difflib
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from cnnc import limits, preprocess
from cnnc.errors import CnncError, CnncWarning, LayerError, Location, ShapeError
from cnnc.frontend.parser import (
    Arg,
    BinOp,
    Block,
    Call,
    Expr,
    Link,
    Literal,
    Member,
    Name,
    Neg,
    Network,
    NetworkInput,
    Program,
    Statement,
    TupleExpr,
)
from cnnc.ir.graph import Graph, Value
from cnnc.ir.types import BATCH, TensorType
from cnnc.ir.verify import verify
from cnnc.ops import Attr, Layer, LayerContext, all_layers, get_layer
from cnnc.ops.base import REQUIRED
from cnnc.preprocess import Normalization

# Words an argument may use that are not names of values or parameters.
WORDS = {"true", "false", "same", "valid"}
BLOCK_INPUT = "in"


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
        f"the program has no network {name!r}; it defines {known}",
        Location(program.source, 1, 1),
    )


def lower(program: Program, network: str | None = None) -> Graph:
    """Build the IR graph of one network of a parsed program, and verify it.

    Warnings (unused values) are left in ``graph.warnings``. The limits in force
    (:func:`cnnc.limits.current`) bound repetitions, layers and block nesting.
    """
    # Each level of block nesting takes a handful of Python frames, and each level of an
    # expression two; make room for the deepest nesting the limits allow, however far
    # they were lifted.
    needed = 10 * limits.current().block_depth + 2 * limits.current().expr_depth + 1000
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, needed))
    try:
        return _Lowering(program).network(select_network(program, network))
    finally:
        sys.setrecursionlimit(old)


@dataclass
class _Binding:
    value: Value
    loc: Location | None
    used: bool = False


@dataclass
class _Scope:
    """The names visible in a network body or in one instance of a block."""

    prefix: str  # prepended to layer names: "" or "layer1.0."
    params: dict[str, Any]
    values: dict[str, _Binding]
    reserved: set[str]  # labels the body gives, which automatic names avoid
    block: Block | None = None
    labels: dict[str, Location] = field(default_factory=dict)
    counters: Counter = field(default_factory=Counter)

    def lookup(self, name: str) -> Any:
        if name in self.values:
            binding = self.values[name]
            binding.used = True
            return binding.value
        return self.params[name]

    def knows(self, name: str) -> bool:
        return name in self.values or name in self.params


class _Lowering:
    def __init__(self, program: Program):
        self.program = program
        self.blocks: dict[str, Block] = {}
        for block in program.blocks:
            if block.name in self.blocks:
                first = self.blocks[block.name].loc.line
                raise LayerError(
                    f"block {block.name!r} is defined twice (first at line {first})", block.name_loc
                )
            if get_layer(block.name) is not None:
                raise LayerError(
                    f"block {block.name!r} has the name of a layer",
                    block.name_loc,
                    hint="choose another name",
                )
            self.blocks[block.name] = block
        self.graph: Graph | None = None
        self.stack: list[str] = []  # blocks being expanded, to catch recursion
        self.warned: set[tuple[int, int, str]] = set()
        self.warnings: list[CnncWarning] = []

    # ---- networks and statements ------------------------------------------------------------

    def network(self, net: Network) -> Graph:
        self.graph = Graph(net.name)
        values: dict[str, _Binding] = {}
        for inp in net.inputs:
            if len(inp.shape) not in (2, 3) or not all(d > 0 for d in inp.shape):
                raise ShapeError(
                    f"input {inp.name} is {'x'.join(map(str, inp.shape))}; a network "
                    "takes C×L (1-D) or C×H×W (2-D) with every size at least 1",
                    inp.shape_loc,
                    hint="for example image: 3x224x224 or signal: 1x128",
                )
            if inp.name in values or inp.name in (BLOCK_INPUT, *WORDS):
                raise LayerError(
                    f"input {inp.name!r} is "
                    + ("declared twice" if inp.name in values else "a reserved word"),
                    inp.loc,
                )
            try:
                x = self.graph.add_input(inp.name, TensorType("f32", (BATCH, *inp.shape)))
            except CnncError as e:
                raise e.at(inp.shape_loc) from None
            normalization = _input_normalization(inp)
            if normalization is not None:
                self.graph.preprocess[inp.name] = normalization
            # Inputs other than the first one are values a statement must name to use.
            values[inp.name] = _Binding(x, inp.loc if values else None, used=not values)
        if not net.statements:
            raise LayerError(f"network {net.name} has no layers", net.loc)
        scope = _Scope("", {}, values, _labels(net.statements))
        last = self.body(net.statements, scope, self.graph.inputs[0])
        self.graph.outputs = self.outputs(net, scope, last)
        # After the outputs, which use the values they name.
        self.warn_unused(scope)
        self.graph.warnings = self.warnings
        verify(self.graph)
        return self.graph

    def outputs(self, net: Network, scope: _Scope, last: Value | tuple) -> list[Value]:
        """The declared outputs (renamed as declared, where the name is free), or the last
        statement's value(s)."""
        if net.outputs is None:
            outputs = list(last) if isinstance(last, tuple) else [last]
            if any(v.kind == "input" for v in outputs):
                raise LayerError(f"network {net.name} computes nothing from its input", net.loc)
            return outputs
        outputs = []
        for name, loc in net.outputs:
            if name not in scope.values:
                close = difflib.get_close_matches(name, list(scope.values), n=1)
                raise LayerError(
                    f"output {name!r} is not a value of network {net.name}",
                    loc,
                    hint=f"did you mean {close[0]}?" if close else "bind it: name = ...",
                )
            value = scope.lookup(name)
            if isinstance(value, tuple):
                raise LayerError(f"output {name!r} holds {len(value)} values", loc)
            if value.kind == "input":
                raise LayerError(f"output {name!r} is an input; outputs are computed", loc)
            if value in outputs:
                raise LayerError(f"output {name!r} is listed twice", loc)
            outputs.append(value)
        for value, (name, _) in zip(outputs, net.outputs, strict=True):
            if value.name != name and name not in self.graph._names:
                self.graph.rename(value, name)
        return outputs

    def body(self, statements: list[Statement], scope: _Scope, x: Value) -> Value:
        for stmt in statements:
            x = self.statement(stmt, scope, x)
        if scope.block is not None:
            self.warn_unused(scope)
        return x

    def warn_unused(self, scope: _Scope) -> None:
        for name, binding in scope.values.items():
            if not binding.used and binding.loc is not None:
                key = (binding.loc.line, binding.loc.col, name)
                if key not in self.warned:
                    self.warned.add(key)
                    self.warnings.append(
                        CnncWarning(
                            f"value {name!r} is never used",
                            binding.loc,
                            hint="use it, or drop the binding",
                        )
                    )

    def statement(self, stmt: Statement, scope: _Scope, x: Value | tuple) -> Value | tuple:
        links = stmt.links
        first = links[0].bare_name
        if first is not None and scope.knows(first):
            value = scope.lookup(first)
            if not isinstance(value, Value):
                raise LayerError(f"{first!r} is a parameter ({value!r}), not a value", links[0].loc)
            x, links = value, links[1:]
        label = None
        for link in links:
            label = scope.prefix + link.label if link.label else label
            x = self.link(link, scope, x, label)
        if stmt.bindings:
            self.bind(stmt, scope, x)
        return x

    def bind(self, stmt: Statement, scope: _Scope, value: Value | tuple) -> None:
        names = stmt.bindings
        values = value if isinstance(value, tuple) else (value,)
        if len(names) != len(values):
            given = f"gives {len(values)} values" if len(values) > 1 else "gives one value"
            raise LayerError(
                f"the chain {given}, but {len(names)} name{'s are' if len(names) > 1 else ' is'} "
                "bound to it",
                names[-1][1] if len(names) > len(values) else stmt.loc,
                hint="bind one name to each value: "
                + ", ".join(f"v{i}" for i in range(len(values)))
                + " = ...",
            )
        for (name, loc), v in zip(names, values, strict=True):
            self.bind_name(name, loc, scope, v)

    def bind_name(self, name: str, loc: Location, scope: _Scope, value: Value) -> None:
        if name == BLOCK_INPUT or name in WORDS:
            raise LayerError(f"{name!r} is a reserved word and cannot name a value", loc)
        if get_layer(name) is not None or name in self.blocks:
            kind = "layer" if get_layer(name) is not None else "block"
            raise LayerError(f"{name!r} is the name of a {kind}; a value needs another name", loc)
        if name in scope.params:
            raise LayerError(
                f"{name!r} is a parameter of block {scope.block.name}; a value needs another name",
                loc,
            )
        if name in scope.values:
            first = scope.values[name].loc
            where = f" (first at line {first.line})" if first else " (it names the input)"
            raise LayerError(
                f"value {name!r} is defined twice{where}", loc, hint="give each value its own name"
            )
        scope.values[name] = _Binding(value, loc)

    # ---- links: layers and blocks -----------------------------------------------------------

    def link(self, link: Link, scope: _Scope, x: Value, chain_label: str | None) -> Value:
        name = self.name_for(link, scope, chain_label)
        if link.steps is not None:
            index = 0
            for step in link.steps:
                times = self.repeat(step, scope)
                bound: dict = {}  # the step's arguments, bound once for its repetitions
                for i in range(times):
                    before = len(self.graph.nodes)
                    x = self.apply(step.call, scope, x, f"{name}.{index}", bound)
                    index += 1
                    self.check_layers(step, i, times - i - 1, len(self.graph.nodes) - before)
            return x
        times = self.repeat(link, scope)
        bound = {}
        for i in range(times):
            before = len(self.graph.nodes)
            x = self.apply(link.call, scope, x, f"{name}.{i}" if link.repeat else name, bound)
            self.check_layers(link, i, times - i - 1, len(self.graph.nodes) - before)
        return x

    def check_layers(self, link: Link, done: int, left: int, each: int) -> None:
        """Refuse as soon as the network is past the layers limit, or as soon as the second
        instance of a repeated step shows that its repetitions left would take it past: a
        bomb of nested repetitions is refused after its first instances, not after
        building them all. (The second, not the first: a first ``fc`` after a feature map
        adds a flatten, which the next ones do not.)"""
        if done == 0:
            left = 0
        expected = len(self.graph.nodes) + left * each
        if expected > limits.current().layers:
            what = "the network has" if left == 0 else "its repetitions would give the network"
            raise limits.exceeded(
                LayerError,
                "layers",
                what,
                expected,
                link.repeat.loc if link.repeat is not None and left else link.loc,
                unit=" layers (IR nodes)",
            )

    def apply(
        self, call: Call, scope: _Scope, x: Value | tuple, name: str, bound: dict | None = None
    ) -> Value | tuple:
        """One layer or block instance called ``name``, applied to ``x``. ``bound`` keeps a
        layer's bound arguments between the repetitions of one link (the same call in the
        same scope binds the same arguments; a merge's values are bound each time)."""
        layer = get_layer(call.name)
        # A merge reads the values it names, not the one the chain carries.
        merge = layer is not None and any(a.kind == "values" for a in layer.attrs)
        if isinstance(x, tuple) and not merge:
            raise LayerError(
                f"{call.name} follows a layer that gives {len(x)} values; a chain carries one",
                call.name_loc,
                hint="bind them first: " + ", ".join(f"v{i}" for i in range(len(x))) + " = ..., "
                "then start a chain from each",
            )
        block = self.blocks.get(call.name)
        if block is not None:
            return self.expand(block, call, scope, x, name)
        if layer is None:
            if scope.knows(call.name):
                raise LayerError(
                    f"{call.name!r} is a value; a value can only start a chain",
                    call.name_loc,
                    hint=f"write {call.name} -> ... on its own",
                )
            raise self.unknown(call)
        if bound and not merge:
            args, locs = dict(bound["args"]), bound["locs"]
        else:
            args, locs = bind_args(layer, call, self.arguments(call, scope, layer))
            if bound is not None and not merge:
                bound["args"], bound["locs"] = dict(args), locs
        try:
            return layer.build(LayerContext(self.graph, name, call.loc, args, locs), x)
        except CnncError as e:
            raise e.at(call.loc) from None

    def repeat(self, link: Link, scope: _Scope) -> int:
        if link.repeat is None:
            return 1
        times = evaluate(link.repeat, scope)
        if not isinstance(times, int) or isinstance(times, bool) or times < 1:
            raise LayerError(
                f"a repetition count must be a positive integer, got {times!r}", link.repeat.loc
            )
        if times > limits.current().repeat:
            raise limits.exceeded(
                LayerError, "repeat", "the repetition count is", times, link.repeat.loc
            )
        return times

    def name_for(self, link: Link, scope: _Scope, chain_label: str | None) -> str:
        """A layer's name: its label; else ``<label>.<keyword>`` after a labelled layer of the
        same statement; else ``<keyword><n>``, counting that keyword's layers from 1. Inside a
        block every name starts with the instance's name."""
        keyword = link.call.name if link.call is not None else "sequence"
        scope.counters[keyword] += 1
        if link.label is None and chain_label is not None:
            name = self.graph.unique_name(f"{chain_label}.{keyword}")
            if link.repeat is not None or link.steps is not None or keyword in self.blocks:
                # Its layers are name.0, name.1, ... (a block instance's, name.conv1, ...):
                # keep name itself from the next link of this keyword, whose layers would
                # otherwise take the same names.
                self.graph.reserve_name(name)
            return name
        if link.label is None:
            n = scope.counters[keyword]
            # relu6 counts as relu6_1, relu6_2: "relu61" would read as relu #61.
            sep = "_" if keyword[-1].isdigit() else ""
            while f"{keyword}{sep}{n}" in scope.reserved:
                n += 1
            scope.counters[keyword] = n
            return scope.prefix + f"{keyword}{sep}{n}"
        if link.label in scope.labels or link.label in scope.values:
            first = scope.labels.get(link.label)
            where = f" (first at line {first.line})" if first else " (it names a value)"
            raise LayerError(
                f"name {link.label!r} is used twice{where}",
                link.label_loc,
                hint="give each layer its own name",
            )
        scope.labels[link.label] = link.label_loc
        return scope.prefix + link.label

    def unknown(self, call: Call) -> LayerError:
        known = sorted(all_layers())
        blocks = sorted(self.blocks)
        hint = suggestion(call.name, known + blocks)
        hint += "layers: " + ", ".join(known)
        if blocks:
            hint += "; blocks: " + ", ".join(blocks)
        return LayerError(f"unknown layer {call.name!r}", call.name_loc, hint=hint)

    def arguments(
        self, call: Call, scope: _Scope, layer: Layer | None = None
    ) -> list[tuple[Arg, Any]]:
        positional = [a for a in layer.attrs if a.positional] if layer is not None else []

        def value(i: int, arg: Arg) -> Any:
            # Any word given for a choice (mode=cubic) is that word, which the choice then
            # checks against the words it takes; elsewhere an unknown name is an error.
            if arg.name is not None:
                attr = layer.attr(arg.name) if layer is not None else None
            else:
                attr = positional[i] if i < len(positional) else None
            word = isinstance(arg.value, Name) and not scope.knows(arg.value.id)
            if attr is not None and attr.kind == "choice" and word:
                return arg.value.id
            return evaluate(arg.value, scope)

        return [(arg, value(i, arg)) for i, arg in enumerate(call.args)]

    def expand(self, block: Block, call: Call, scope: _Scope, x: Value, name: str) -> Value:
        if block.name in self.stack:
            cycle = " -> ".join([*self.stack[self.stack.index(block.name) :], block.name])
            raise LayerError(
                f"block {block.name} calls itself ({cycle})",
                call.name_loc,
                hint="blocks cannot be recursive; repeat with * n instead",
            )
        if len(self.stack) >= limits.current().block_depth:
            raise limits.exceeded(
                LayerError,
                "block_depth",
                f"blocks calling blocks reach {block.name} at depth",
                len(self.stack) + 1,
                call.name_loc,
            )
        params = self.block_params(block, call, scope, x)
        inner = _Scope(
            f"{name}.",
            params,
            {BLOCK_INPUT: _Binding(x, None, used=True)},
            _labels(block.statements),
            block,
        )
        if not block.statements:
            raise LayerError(f"block {block.name} has no layers", block.loc)
        self.stack.append(block.name)
        self.graph.blocks[name] = block.name
        try:
            return self.body(block.statements, inner, x)
        except CnncError as e:
            args = ", ".join(_source_text(a.loc) for a in call.args)
            e.notes.append(f"in {name}: {block.name}({args}), called at {call.loc}")
            raise
        finally:
            self.stack.pop()

    def block_params(self, block: Block, call: Call, scope: _Scope, x: Value) -> dict[str, Any]:
        names = [p.name for p in block.params]
        given: dict[str, tuple[Any, Location]] = {}
        named = False
        for i, arg in enumerate(call.args):
            named = named or arg.name is not None
            if arg.name is None:
                if named:
                    raise LayerError("a positional argument cannot follow a named one", arg.loc)
                if i >= len(names):
                    raise LayerError(
                        f"block {block.name} takes {len(names)} parameter"
                        f"{'s' if len(names) != 1 else ''}, got more",
                        arg.loc,
                        hint=f"{block.name}({', '.join(names)})",
                    )
                key = names[i]
            else:
                if arg.name not in names:
                    raise _no_such(
                        f"block {block.name} has no parameter",
                        arg,
                        names,
                        f"{block.name}({', '.join(names)})",
                    )
                key = arg.name
            if key in given:
                raise LayerError(f"{key} is given twice", arg.loc)
            given[key] = (evaluate(arg.value, scope), arg.loc)
        # Defaults may use the parameters before them and the block's input:
        # block b(c, mid=c // 4), block se(c=in.channels).
        params: dict[str, Any] = {}
        defaults = _Scope("", params, {BLOCK_INPUT: _Binding(x, None, used=True)}, set(), block)
        for p in block.params:
            if p.name in given:
                params[p.name] = given[p.name][0]
            elif p.default is not None:
                params[p.name] = evaluate(p.default, defaults)
            else:
                raise LayerError(
                    f"block {block.name} needs parameter {p.name}",
                    call.loc,
                    hint=f"{block.name}({', '.join(names)})",
                )
        return params


# What other frameworks call cnnc's layers (PyTorch's modules and functions, ONNX's ops,
# common abbreviations), compared without case, underscores or a 1d/2d ending.
FOREIGN_NAMES = {
    "conv": ("Conv1d", "Conv2d", "convolution"),
    "conv_transpose": (
        "ConvTranspose1d",
        "ConvTranspose2d",
        "conv_transpose2d",
        "deconv",
        "deconvolution",
        "transposed_conv",
        "upconv",
    ),
    "upsample": (
        "Upsample",
        "interpolate",
        "resize",
        "UpsamplingNearest2d",
        "UpsamplingBilinear2d",
        "upsampling",
    ),
    "fc": ("dense", "fully_connected", "Gemm", "InnerProduct"),
    "bn": ("BatchNorm1d", "BatchNorm2d", "batchnorm", "batch_norm", "BatchNormalization"),
    "layernorm": ("LayerNorm", "layer_norm", "ln", "LayerNorm2d", "LayerNormalization"),
    "groupnorm": ("GroupNorm", "group_norm", "gn", "GroupNormalization"),
    "maxpool": ("MaxPool1d", "MaxPool2d", "max_pool", "max_pool2d", "maxpooling"),
    "avgpool": ("AvgPool1d", "AvgPool2d", "avg_pool", "avg_pool2d", "AveragePool", "averagepool"),
    "gap": ("GlobalAveragePool", "global_avgpool", "global_average_pooling"),
    "adaptive_avgpool": ("AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "adaptive_avg_pool2d"),
    "adaptive_maxpool": ("AdaptiveMaxPool1d", "AdaptiveMaxPool2d", "adaptive_max_pool2d"),
    "relu": ("ReLU",),
    "silu": ("SiLU", "swish"),
    "hardswish": ("Hardswish", "hard_swish", "h_swish", "hswish"),
    "hardsigmoid": ("Hardsigmoid", "hard_sigmoid", "h_sigmoid", "hsigmoid"),
    "gelu": ("GELU",),
    "leaky_relu": ("LeakyReLU", "lrelu"),
    "prelu": ("PReLU",),
    "elu": ("ELU",),
    "relu6": ("ReLU6",),
    "softmax": ("Softmax",),
    "concat": ("cat", "concatenate"),
    "mul": ("multiply", "times"),
    "sub": ("subtract", "minus"),
    "div": ("divide",),
    "split": ("chunk",),
    "pad": ("ZeroPad2d", "ConstantPad2d", "ReflectionPad2d", "ReplicationPad2d", "padding"),
    "drop_path": ("StochasticDepth", "stochastic_depth", "droppath", "DropPath"),
    "dropout": ("Dropout",),
    "lrn": ("LocalResponseNorm", "local_response_norm"),
}


def _plain(name: str) -> str:
    name = name.lower().replace("_", "")
    return name[:-2] if name.endswith(("1d", "2d")) else name


_FOREIGN = {_plain(alias): ours for ours, aliases in FOREIGN_NAMES.items() for alias in aliases}


def suggestion(name: str, known: list[str]) -> str:
    """``did you mean X? `` for a name another framework uses, or for a close misspelling
    (only a close one: gelu is not relu), else nothing."""
    plain = {_plain(k): k for k in known}
    if _plain(name) in plain:
        return f"did you mean {plain[_plain(name)]}? "
    ours = _FOREIGN.get(_plain(name))
    if ours is not None:
        # A known foreign name never gets a merely similar-looking suggestion.
        return f"did you mean {ours}? ({name} is {ours} in cnnc) " if ours in known else ""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
    return f"did you mean {close[0]}? " if close else ""


def _labels(statements: list[Statement]) -> set[str]:
    return {link.label for stmt in statements for link in stmt.links if link.label}


def _source_text(loc: Location) -> str:
    line = loc.source.line(loc.line) if loc.source else ""
    end = loc.end_col if loc.end_line == loc.line and loc.end_col else len(line) + 1
    return line[loc.col - 1 : end - 1]


# ---- argument expressions --------------------------------------------------------------------


INPUT_OPTIONS = ("normalize", "mean", "std")


def _input_normalization(inp: NetworkInput) -> Normalization | None:
    """The normalization that ``[normalize=imagenet]`` or ``[mean=..., std=...]`` after an
    input's shape declares (cnnc.preprocess), checked against its channels."""
    if not inp.options:
        return None
    given: dict[str, Arg] = {}
    for option in inp.options:
        if option.name not in INPUT_OPTIONS:
            close = difflib.get_close_matches(option.name, INPUT_OPTIONS, n=1)
            raise LayerError(
                f"unknown input option {option.name!r}",
                option.loc,
                hint=f"did you mean {close[0]}?"
                if close
                else "an input takes normalize=imagenet|none, or mean=... and std=...",
            )
        if option.name in given:
            raise LayerError(f"input option {option.name!r} is given twice", option.loc)
        given[option.name] = option
    if "normalize" in given:
        option = given["normalize"]
        if len(given) > 1:
            raise LayerError(
                "normalize= names a normalization; mean= and std= give one: use one or the other",
                option.loc,
            )
        word = option.value.id if isinstance(option.value, Name) else None
        if word not in preprocess.NAMED:
            raise LayerError(
                "normalize= takes imagenet or none",
                option.value.loc,
                hint="or give the numbers: mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)",
            )
        normalization = preprocess.NAMED[word]
    else:
        missing = [k for k in ("mean", "std") if k not in given]
        if missing:
            raise LayerError(
                f"input option {missing[0]}= is missing",
                inp.options[0].loc,
                hint="mean= and std= come together",
            )
        numbers = {k: _option_numbers(given[k]) for k in ("mean", "std")}
        try:
            normalization = preprocess.make(numbers["mean"], numbers["std"])
        except CnncError as e:
            raise LayerError(e.message, given["std"].loc) from None
    if normalization is not preprocess.NONE:
        try:
            normalization.check_channels(inp.shape[0])
        except CnncError as e:
            raise LayerError(e.message, inp.options[0].loc, e.hint) from None
    return normalization


def _option_numbers(option: Arg) -> tuple[float, ...]:
    """A number or a tuple of numbers, written as literals (``0.5``, ``(0.5, -1, 2)``)."""
    items = option.value.items if isinstance(option.value, TupleExpr) else [option.value]
    numbers = []
    for item in items:
        sign = 1.0
        if isinstance(item, Neg):
            item, sign = item.operand, -1.0
        if not (isinstance(item, Literal) and _is_number(item.value)):
            raise LayerError(
                f"{option.name}= takes a number or numbers, one per channel",
                item.loc,
                hint=f"for example {option.name}=(0.5, 0.5, 0.5)",
            )
        numbers.append(sign * float(item.value))
    return tuple(numbers)


def evaluate(expr: Expr, scope: _Scope) -> Any:
    """The value of an argument expression: a number, a tuple, a word, or an IR value."""
    if isinstance(expr, Literal):
        return expr.value
    if isinstance(expr, Name):
        if scope.knows(expr.id):
            return scope.lookup(expr.id)
        if expr.id in WORDS or expr.id in choice_words():
            return expr.id
        known = sorted({*scope.params, *scope.values, *WORDS, *choice_words()})
        close = difflib.get_close_matches(expr.id, known, n=1)
        raise LayerError(
            f"undefined name {expr.id!r}",
            expr.loc,
            hint=f"did you mean {close[0]}?" if close else None,
        )
    if isinstance(expr, Member):
        return _size_of(expr, scope)
    if isinstance(expr, TupleExpr):
        return tuple(evaluate(item, scope) for item in expr.items)
    if isinstance(expr, Neg):
        operand = evaluate(expr.operand, scope)
        if not _is_number(operand):
            raise LayerError(f"cannot negate {operand!r}", expr.loc)
        return _in_range(-operand, expr)
    if isinstance(expr, BinOp):
        left, right = evaluate(expr.left, scope), evaluate(expr.right, scope)
        if not (_is_number(left) and _is_number(right)):
            raise LayerError(f"{expr.op} needs numbers, got {left!r} and {right!r}", expr.loc)
        if expr.op == "+":
            return _in_range(left + right, expr)
        if expr.op == "-":
            return _in_range(left - right, expr)
        if expr.op == "*":
            return _in_range(left * right, expr)
        if right == 0:
            raise LayerError("division by zero", expr.loc)
        return _in_range(left // right, expr)
    raise AssertionError(f"expression {expr!r}")


def _in_range(result: int | float, expr: Expr) -> int | float:
    """An expression's value, if it fits an int64 (or a finite float): every integer an
    attribute gets is one ONNX and NumPy can hold, and none grows without bound."""
    if isinstance(result, int) and not limits.fits_int64(result):
        raise LayerError(
            "the value of this expression does not fit in 64 bits "
            f"(it is about 2**{result.bit_length() - (result > 0)} in size)",
            expr.loc,
            hint="integers in a program lie between -2**63 and 2**63-1",
        )
    if isinstance(result, float) and not math.isfinite(result):
        raise LayerError(f"the value of this expression is {result}", expr.loc)
    return result


# The sizes an expression may read from a value, by the axis each names (1-D maps have a
# length, 2-D maps a height and a width).
SIZES = {
    2: {"channels": 1},
    3: {"channels": 1, "length": 2},
    4: {"channels": 1, "height": 2, "width": 3},
}


def _size_of(expr: Member, scope: _Scope) -> int:
    """``in.channels``, ``x.height``: a size of a value, known when the program is lowered."""
    if not scope.knows(expr.value):
        known = sorted(n for n, b in scope.values.items() if isinstance(b.value, Value))
        close = difflib.get_close_matches(expr.value, known, n=1)
        raise LayerError(
            f"undefined value {expr.value!r}",
            expr.value_loc,
            hint=f"did you mean {close[0]}?" if close else None,
        )
    value = scope.lookup(expr.value)
    if not isinstance(value, Value):
        raise LayerError(f"{expr.value!r} is not a value, so it has no {expr.size}", expr.loc)
    sizes = SIZES.get(value.type.rank, {"channels": 1})
    if expr.size not in sizes:
        close = difflib.get_close_matches(expr.size, list(sizes), n=1)
        raise LayerError(
            f"{expr.value} ({value.type}) has no size {expr.size!r}; it has " + ", ".join(sizes),
            expr.loc,
            hint=f"did you mean {expr.value}.{close[0]}?" if close else None,
        )
    return int(value.type.shape[sizes[expr.size]])


def choice_words() -> set[str]:
    """The words layers take as choices (``nearest``, ``reflect``, ``tanh``, ...)."""
    return {c for layer in all_layers().values() for a in layer.attrs for c in a.choices}


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# ---- layer arguments -------------------------------------------------------------------------


def bind_args(
    layer: Layer, call: Call, values: list[tuple[Arg, Any]]
) -> tuple[dict[str, Any], dict[str, Location]]:
    """Match a call's evaluated arguments to the layer's attributes, checking each."""
    positional = [a for a in layer.attrs if a.positional]
    variadic = next((a for a in positional if a.kind == "values"), None)
    args: dict[str, Any] = {}
    locs: dict[str, Location] = {}
    named = False  # whether a named argument came yet (a merge may take 10,000 values)
    for i, (arg, value) in enumerate(values):
        named = named or arg.name is not None
        if arg.name is None:
            if named:
                raise LayerError("a positional argument cannot follow a named one", arg.loc)
            if variadic is not None:
                args.setdefault(variadic.name, []).append(convert(layer, variadic, value, arg.loc))
                locs.setdefault(variadic.name, arg.loc)
                continue
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
            if attr is None or attr.kind == "values":
                names = [a.name for a in layer.attrs if a.kind != "values"]
                raise _no_such(
                    f"{layer.keyword} has no attribute",
                    arg,
                    names,
                    f"{layer.keyword} takes: {layer.signature}",
                )
        if attr.name in args:
            raise LayerError(f"{attr.name} is given twice", arg.loc)
        args[attr.name] = convert(layer, attr, value, arg.loc)
        locs[attr.name] = arg.loc
    for attr in layer.attrs:
        if attr.name not in args:
            if attr.kind == "values":
                args[attr.name] = []
            elif attr.default is REQUIRED:
                raise LayerError(
                    f"{layer.keyword} needs {attr.name} ({attr.doc})",
                    call.loc,
                    hint=f"{layer.keyword} takes: {layer.signature}",
                )
            else:
                args[attr.name] = attr.default
    return args, locs


def _no_such(what: str, arg: Arg, names: list[str], takes: str) -> LayerError:
    """The error for a named argument nothing has: the closest name, and what is taken."""
    close = difflib.get_close_matches(arg.name, names, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return LayerError(f"{what} {arg.name!r}", arg.loc, hint=hint + takes)


def _describe(value: Any) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join(_describe(v) for v in value) + ")"
    if isinstance(value, Value):
        return f"the value %{value.name}"
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
        if not items or not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
            raise bad(expected)
        for i in items:
            check_min(i)
        return v

    kind = attr.kind
    if kind in ("values", "value"):
        if not isinstance(value, Value):
            raise LayerError(
                f"{where} must be the name of a value, got {_describe(value)}"
                if kind == "value"
                else f"{layer.keyword} takes names of values, got {_describe(value)}",
                loc,
            )
        return value
    if kind == "choice":
        if value not in attr.choices:
            raise bad("one of " + ", ".join(attr.choices))
        return value
    if kind == "floats":
        items = value if isinstance(value, tuple) else (value,)
        if not items or not all(_is_number(i) for i in items):
            raise bad("a number or a tuple of numbers such as (2, 2)")
        for i in items:
            check_min(i)
        return tuple(float(i) for i in value) if isinstance(value, tuple) else float(value)
    if kind == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad("an integer")
        check_min(value)
        return value
    if kind == "ints":
        return ints(value, "an integer or a tuple of integers such as (3, 3)")
    if kind == "float":
        if not _is_number(value):
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
