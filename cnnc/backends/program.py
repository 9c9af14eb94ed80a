"""IR -> a program in cnnc's language and its weights: what `cnnc import` writes."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

from cnnc.errors import UsageError
from cnnc.ir.graph import Graph, Node, Value
from cnnc.ops.common import pad_text

# The parameter names of each op's layer, in the order of the node's parameter inputs.
PARAM_NAMES = {
    "conv": ("weight", "bias"),
    "conv_transpose": ("weight", "bias"),
    "fc": ("weight", "bias"),
    "bn": ("weight", "bias", "running_mean", "running_var"),
    "affine": ("weight", "bias"),
    "prelu": ("weight",),
    "layernorm": ("weight", "bias"),
    "groupnorm": ("weight", "bias"),
    "linear": ("weight", "bias"),
    # A scale's tensor is named as the layer itself (ConvNeXt's layer_scale).
    "scale": ("",),
}


def _number(v: float) -> str:
    if math.isinf(v):
        # The language has no infinity; the largest float32 bounds nothing a network computes.
        return ("-" if v < 0 else "") + "3.4028235e38"
    if float(v).is_integer() and abs(v) < 2**53:
        return str(int(v))
    # Larger ones in exponent form: 1e+30 rather than 31 digits that no integer type holds.
    # Attributes are float32 in ONNX: their shortest float32 spelling reads back the same.
    return str(np.float32(v))


def _ints(values) -> str:
    values = tuple(int(v) for v in values)
    return str(values[0]) if len(values) == 1 else "(" + ", ".join(map(str, values)) + ")"


def _spatial(values) -> str:
    """One value if all axes agree, else a tuple."""
    values = tuple(values)
    return str(values[0]) if len(set(values)) == 1 else _ints(values)


def _window(node: Node, kernel, default_stride) -> list[str]:
    a = node.attrs
    args = [_spatial(kernel)]
    if tuple(a["stride"]) != tuple(default_stride):
        args.append(f"stride={_spatial(a['stride'])}")
    if any(a["pads"]):
        args.append(f"pad={pad_text(a['pads'])}")
    if any(d != 1 for d in a.get("dilation", ())):
        args.append(f"dilation={_spatial(a['dilation'])}")
    return args


def _conv(node: Node) -> str:
    weight = node.inputs[1]
    kernel = weight.shape[2:]
    args = [str(weight.shape[0]), *_window(node, kernel, (1,) * len(kernel))]
    if node.attrs["groups"] != 1:
        args.append(f"groups={node.attrs['groups']}")
    if len(node.inputs) < 3:
        args.append("bias=false")
    text = f"conv({', '.join(args)})"
    activation = node.attrs.get("activation")
    if activation:
        # A fused conv is the conv and its activation, chained (named <label>.<activation>).
        act = SimpleNamespace(op=activation, attrs=node.attrs["activation_attrs"], inputs=[])
        text += f" -> {WRITERS[activation](act)}"
    return text


def _conv_transpose(node: Node) -> str:
    weight, a = node.inputs[1], node.attrs
    kernel = weight.shape[2:]
    args = [str(weight.shape[1] * a["groups"]), *_window(node, kernel, (1,) * len(kernel))]
    if any(a["output_pad"]):
        args.append(f"output_pad={_spatial(a['output_pad'])}")
    if a["groups"] != 1:
        args.append(f"groups={a['groups']}")
    if len(node.inputs) < 3:
        args.append("bias=false")
    return f"conv_transpose({', '.join(args)})"


def _pool(node: Node) -> str:
    a = node.attrs
    args = _window(node, a["kernel"], a["kernel"])
    if a["ceil"]:
        args.append("ceil=true")
    if node.op == "avgpool":
        args.append(f"count_include_pad={'true' if a['count_include_pad'] else 'false'}")
    return f"{node.op}({', '.join(args)})"


def _upsample(node: Node) -> str:
    a = node.attrs
    if a["size"] is not None:
        args = [f"size={_spatial(a['size'])}"]
    else:
        scales = [_number(s) for s in a["scales"]]
        args = [f"scale={scales[0] if len(set(scales)) == 1 else '(' + ', '.join(scales) + ')'}"]
    args.append(f"mode={a['mode']}")
    if a["align_corners"]:
        args.append("align_corners=true")
    return f"upsample({', '.join(args)})"


WRITERS: dict[str, Callable[..., str]] = {
    "conv": _conv,
    "conv_transpose": _conv_transpose,
    "maxpool": _pool,
    "avgpool": _pool,
    "fc": lambda n: f"fc({n.inputs[1].shape[0]}" + (")" if len(n.inputs) > 2 else ", bias=false)"),
    "bn": lambda n: f"bn(eps={_number(n.attrs['epsilon'])})",
    "affine": lambda n: "affine",
    "softmax": lambda n: f"softmax(axis={n.attrs['axis']})",
    "dropout": lambda n: f"dropout({_number(n.attrs['ratio'])})",
    "leaky_relu": lambda n: f"leaky_relu(alpha={_number(n.attrs['alpha'])})",
    "hardsigmoid": lambda n: (
        "hardsigmoid"
        if np.float32(n.attrs["alpha"]) == np.float32(1 / 6) and n.attrs["beta"] == 0.5
        else f"hardsigmoid(alpha={_number(n.attrs['alpha'])}, beta={_number(n.attrs['beta'])})"
    ),
    "gelu": lambda n: "gelu(tanh)" if n.attrs["approximate"] == "tanh" else "gelu",
    "elu": lambda n: f"elu({_number(n.attrs['alpha'])})",
    "softplus": lambda n: f"softplus({_number(n.attrs['beta'])})",
    "prelu": lambda n: f"prelu({n.inputs[1].shape[0]})",
    "clip": lambda n: (
        "relu6"
        if (n.attrs["min"], n.attrs["max"]) == (0, 6)
        # Clip(min=0) (torch.clamp(x, min=0)) is relu, +inf included: the language has no
        # infinity, and clip(0, 3.4028235e38) would turn +inf into 3.4028235e38.
        else "relu"
        if (n.attrs["min"], n.attrs["max"]) == (0, math.inf)
        else f"clip({_number(n.attrs['min'])}, {_number(n.attrs['max'])})"
    ),
    "lrn": lambda n: (
        f"lrn({n.attrs['size']}, alpha={_number(n.attrs['alpha'])}, "
        f"beta={_number(n.attrs['beta'])}, k={_number(n.attrs['bias'])})"
    ),
    "layernorm": lambda n: f"layernorm(eps={_number(n.attrs['epsilon'])}{_axis(n)})",
    "groupnorm": lambda n: f"groupnorm({n.attrs['groups']}, eps={_number(n.attrs['epsilon'])})",
    "linear": lambda n: (
        f"linear({n.inputs[1].shape[0]}"
        + ("" if len(n.inputs) > 2 else ", bias=false")
        + f"{_axis(n)})"
    ),
    "scale": lambda n: "scale",
    "reshape": lambda n: f"reshape({_tuple(n.attrs['shape'])})",
    "upsample": _upsample,
    "adaptive_avgpool": lambda n: f"adaptive_avgpool({_spatial(n.attrs['size'])})",
    "adaptive_maxpool": lambda n: f"adaptive_maxpool({_spatial(n.attrs['size'])})",
    "transpose": lambda n: f"transpose({_tuple(n.attrs['perm'][1:])})",
    "drop_path": lambda n: f"drop_path({_number(n.attrs['p'])})",
    "pad": lambda n: _pad(n),
    "split": lambda n: _split(n),
    "slice": lambda n: (
        f"slice({n.attrs['start']}, {n.attrs['end']}"
        + (")" if n.attrs["axis"] == 1 else f", axis={n.attrs['axis']})")
    ),
    "crop": lambda n, names: (
        f"crop({names[1]}"
        + (f", offset={_spatial(n.attrs['offset'])})" if any(n.attrs["offset"]) else ")")
    ),
}
# Layers that name a value besides the one they continue from (crop's reference): their
# writer also takes the names of the node's inputs (None for one the statement continues
# from, which has none).
NAMES_VALUES = {"crop"}
MERGES = ("add", "mul", "sub", "div", "concat")
_BARE = ("relu", "sigmoid", "tanh", "silu", "hardswish", "mish", "gap", "global_maxpool")
for _op in (*_BARE, "flatten", *MERGES):
    WRITERS[_op] = lambda n, op=_op: op


def _pad(node: Node) -> str:
    a = node.attrs
    args = [pad_text(a["pads"])]
    if a["mode"] != "constant":
        args.append(a["mode"])
    if a["value"]:
        args.append(f"value={_number(a['value'])}")
    return f"pad({', '.join(args)})"


def _split(node: Node) -> str:
    from cnnc.ops.tensor import chunk_sizes

    sizes = tuple(node.attrs["sizes"])
    if chunk_sizes(sum(sizes), len(sizes)) == sizes:
        return f"split({len(sizes)})"
    return f"split({_tuple(sizes)})"


def _axis(node: Node) -> str:
    """``, axis=k`` for an axis other than the channels (which is the layer's default)."""
    return "" if node.attrs["axis"] == 1 else f", axis={node.attrs['axis']}"


def _tuple(values) -> str:
    # The language has no one-element tuple: an ``ints`` argument takes the number itself.
    values = [str(int(v)) for v in values]
    return values[0] if len(values) == 1 else "(" + ", ".join(values) + ")"


_LABEL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HYPHENATED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*-\d+")  # a label part such as block1-0


@dataclass
class _Names:
    """Labels and value names for the program, valid in the language and all different.

    A label may be a dotted path (``layer1.0.conv1``); a value name may not.
    """

    taken: set[str] = field(default_factory=set)
    keywords: set[str] = field(default_factory=set)  # a value may not be called like a layer

    def make(self, raw: str, suffix: str = "", dotted: bool = False) -> str:
        parts = [
            p
            if dotted and _HYPHENATED.fullmatch(p)
            else re.sub(r"[^A-Za-z0-9_]", "_", p).strip("_")
            for p in raw.split(".")
        ]
        parts = [p for p in parts if p] or ["layer"]
        if not dotted:
            parts = ["_".join(parts)]
        if not (_LABEL.fullmatch(parts[0]) or (dotted and _HYPHENATED.fullmatch(parts[0]))):
            parts[0] = "n" + parts[0]
        parts[1:] = [
            p if p.isdigit() or _LABEL.fullmatch(p) or _HYPHENATED.fullmatch(p) else "n" + p
            for p in parts[1:]
        ]
        base = ".".join(parts) + suffix
        name, n = base, 2
        while name in self.taken or (not dotted and name in self.keywords):
            name, n = f"{base}_{n}", n + 1
        self.taken.add(name)
        return name


def _needs_name(graph: Graph, value: Value, following: Node | None, declared: bool) -> bool:
    """Whether a value is read other than by the very next statement continuing from it
    (or is an output the heading declares)."""
    if value in graph.outputs:
        return declared
    for user in value.users:
        continues = (
            user is following
            and user.op not in MERGES
            and user.activations[0] is value
            and user.activations.count(value) == 1
        )
        if not continues:
            return True
    return False


def _keywords() -> set[str]:
    from cnnc.ops import all_layers

    return {*all_layers(), "in", "true", "false", "same", "valid"}


def to_program(graph: Graph, source: str = "") -> tuple[str, dict[str, np.ndarray]]:
    """A program computing ``graph`` (one statement per node) and its weights by name."""
    for x in graph.inputs:
        if x.type.rank not in (3, 4) or not all(isinstance(d, int) for d in x.type.shape[1:]):
            raise UsageError(f"input {x.name} is {x.type}; a program takes C×L or C×H×W")
    for y in graph.outputs:
        if y.kind == "input":
            # The language computes every output: `-> (x)` naming an input is refused.
            raise UsageError(
                f"output {y.name} is an input of the network; a program computes its outputs",
                hint="a model that passes an input through has no program",
            )
    names = _Names(keywords=_keywords())
    network = names.make(graph.name or "network")
    value_names: dict[int, str] = {id(x): names.make(x.name) for x in graph.inputs}
    # Several outputs are declared in the heading, under their own names.
    declared = len(graph.outputs) > 1 or graph.outputs[0].producer is not graph.nodes[-1]
    lines, weights = [], {}
    previous: Value = graph.inputs[0]
    for i, node in enumerate(graph.nodes):
        writer = WRITERS.get(node.op)
        if writer is None:
            raise UsageError(f"node {node.name}: op {node.op} has no layer in the language")
        # A layer whose tensor is named as the layer itself is labelled with that name.
        named = PARAM_NAMES.get(node.op) == ("",)
        label = names.make(node.params[0].name if named else node.name, dotted=True)
        inputs = node.activations
        if node.op in MERGES:
            call = f"{label}: {node.op}({', '.join(value_names[id(v)] for v in inputs)})"
        else:
            names_of = [value_names.get(id(v)) for v in inputs] if node.op in NAMES_VALUES else None
            call = f"{label}: {writer(node) if names_of is None else writer(node, names_of)}"
            if inputs[0] is not previous:
                call = f"{value_names[id(inputs[0])]} -> {call}"
        following = graph.nodes[i + 1] if i + 1 < len(graph.nodes) else None
        if len(node.outputs) > 1 or _needs_name(graph, node.output, following, declared):
            for out in node.outputs:
                output = out in graph.outputs
                value_names[id(out)] = (
                    names.make(out.name)
                    if output
                    else names.make(out.name if len(node.outputs) > 1 else node.name, "_out")
                )
            bound = ", ".join(value_names[id(out)] for out in node.outputs)
            call = f"{bound} = {call}"
        lines.append(f"    {call}")
        for suffix, param in zip(PARAM_NAMES.get(node.op, ()), node.params, strict=False):
            weights[f"{label}.{suffix}" if suffix else label] = param.data
        # A statement after a node of several outputs starts from a named value.
        previous = node.output if len(node.outputs) == 1 else None
    heading = ", ".join(
        f"{value_names[id(x)]}: {'x'.join(str(d) for d in x.type.shape[1:])}" for x in graph.inputs
    )
    outputs = ""
    if declared:
        outputs = " -> (" + ", ".join(value_names[id(y)] for y in graph.outputs) + ")"
    header = [f"# {source}" if source else "# imported by cnnc"]
    header.append(f"network {network}({heading}){outputs} {{")
    return "\n".join([*header, *lines, "}"]) + "\n", weights
