"""The pass manager: named passes and pipelines, verified after every pass, printable, checkable."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from cnnc.compare import agree
from cnnc.errors import CnncError, UsageError
from cnnc.ir.graph import Graph
from cnnc.ir.verify import verify
from cnnc.passes.channels_first import channels_first
from cnnc.passes.convolutionalize import convolutionalize
from cnnc.passes.cse import cse
from cnnc.passes.dce import dce
from cnnc.passes.fc_to_conv import fc_to_conv
from cnnc.passes.fold_affine import fold_affine
from cnnc.passes.fold_bn import fold_bn
from cnnc.passes.fuse_conv_act import fuse_conv_act
from cnnc.passes.fuse_pad import fuse_pad
from cnnc.passes.fuse_transpose_reshape import fuse_transpose_reshape
from cnnc.passes.merge_affine import merge_affine
from cnnc.passes.remove_identity import remove_identity
from cnnc.passes.report import PassReport

PASSES: dict[str, Callable[[Graph], bool]] = {
    "remove-identity": remove_identity,
    "dce": dce,
    "channels-first": channels_first,
    "merge-affine": merge_affine,
    "fold-bn": fold_bn,
    "fold-affine": fold_affine,
    "fc-to-conv": fc_to_conv,
    "fuse-conv-act": fuse_conv_act,
    "convolutionalize": convolutionalize,
    "fuse-transpose-reshape": fuse_transpose_reshape,
    "fuse-pad": fuse_pad,
    "cse": cse,
}

PIPELINES: dict[int, list[str]] = {
    0: [],
    1: ["remove-identity", "dce"],
    2: [
        "remove-identity",
        "channels-first",
        "fuse-transpose-reshape",
        "fuse-pad",
        "merge-affine",
        "fold-bn",
        "fold-affine",
        "fc-to-conv",
        "fuse-conv-act",
        "cse",
        "dce",
    ],
}


class PassChangedOutputs(CnncError):
    """A pass changed what the network computes (a bug in that pass)."""


@dataclass
class Options:
    """How to run a pipeline: what to print and what to check."""

    print_after: set[str] = field(default_factory=set)
    print_after_all: bool = False
    verify_each: bool = False
    stop_after: str | None = None
    seed: int = 0
    printer: Callable[[str], None] = print
    # Filled in as the passes run: what each removed, added and rewrote (--report).
    report: PassReport | None = None


def pipeline(
    opt_level: int = 2, passes: list[str] | None = None, fully_conv: bool = False
) -> list[str]:
    """The names of the passes to run: an explicit list, or an -O level (plus convolutionalize)."""
    if passes is None:
        if opt_level not in PIPELINES:
            raise UsageError(f"unknown optimization level -O{opt_level}; use -O0, -O1 or -O2")
        names = list(PIPELINES[opt_level])
    else:
        names = list(passes)
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise UsageError(f"unknown pass {unknown[0]!r}; known passes: {', '.join(PASSES)}")
    if fully_conv and "convolutionalize" not in names:
        # Clean-ups after it would not touch what it produces; before dce is where it belongs.
        at = names.index("dce") if "dce" in names else len(names)
        names.insert(at, "convolutionalize")
    return names


def run_passes(graph: Graph, names: list[str], options: Options | None = None) -> Graph:
    """Run the named passes in order on ``graph`` (in place), verifying it after each one
    that changed it."""
    options = options or Options()
    for name in {*options.print_after, *([options.stop_after] if options.stop_after else [])}:
        if name not in names:
            raise UsageError(
                f"pass {name!r} is not in the pipeline ({', '.join(names) or 'empty'})"
            )
    output_names = [v.name for v in graph.outputs]
    report = options.report
    if report is not None:
        report.start(graph)
    for name in names:
        before = _snapshot(graph, options.seed) if options.verify_each else None
        nodes_before = report.before_pass(graph) if report is not None else None
        started = time.perf_counter()
        changed = PASSES[name](graph)
        graph.pipeline.append(name)
        if changed is not False:
            # A pass that reports no change left the graph as it was last verified.
            _keep_output_names(graph, output_names)
            verify(graph)
        if report is not None:
            report.after_pass(name, graph, nodes_before, time.perf_counter() - started)
        if before is not None:
            _check_unchanged(graph, name, before, options.seed)
        if options.print_after_all or name in options.print_after:
            from cnnc.ir.printer import dump  # only here: a plain compile never prints

            options.printer(f"# IR after {name}\n{dump(graph)}")
        if name == options.stop_after:
            break
    if report is not None:
        report.finish(graph)
    return graph


def _keep_output_names(graph: Graph, names: list[str]) -> None:
    """The network's outputs keep their names, which users of the model rely on; a value
    that took such a name inside the graph gets another."""
    for value, name in zip(graph.outputs, names, strict=True):
        if value.name == name:
            continue
        holder = next((v for n in graph.nodes for v in n.outputs if v.name == name), None)
        if holder is not None:
            graph.rename(holder, graph.unique_name(name))
        graph.rename(value, name)


Snapshot = tuple[list[np.ndarray], dict[str, np.ndarray]]


def _snapshot(graph: Graph, seed: int) -> Snapshot:
    """The outputs and every named value of the graph on a seeded random batch of 2."""
    from cnnc.backends.interpreter import Interpreter
    from cnnc.limits import check_run_memory

    check_run_memory(graph, 2, keep_all=True)
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal([2, *v.type.shape[1:]], dtype=np.float32) for v in graph.inputs]
    return Interpreter(graph).run_all(*xs)


def _check_unchanged(graph: Graph, name: str, before: Snapshot, seed: int) -> None:
    old_outputs, old_values = before
    new_outputs, new_values = _snapshot(graph, seed)
    changed = [
        f"%{v.name}"
        for v, a, b in zip(graph.outputs, new_outputs, old_outputs, strict=True)
        if not agree(a, b)
    ]
    if not changed:
        return
    message = f"pass {name} changed the network's outputs ({', '.join(changed)})"
    # A rewrite may rename or fuse values, so the first node whose value matches nothing
    # computed before the pass is where the pass went wrong.
    for node in graph.nodes:
        for out in node.outputs:
            value = new_values[out.name]
            if any(agree(value, old) for old in old_values.values()):
                continue
            old = old_values.get(out.name)
            if old is not None and old.size == value.size:
                diff = float(np.max(np.abs(value.reshape(old.shape) - old)))
                message += f"; the first node whose value differs is {node.name} ({node.op}), "
                message += f"max |difference| {diff:.3g} from %{out.name} before the pass"
            else:
                message += f"; the first node whose value differs is {node.name} ({node.op})"
            raise PassChangedOutputs(message, node.loc)
    raise PassChangedOutputs(message)
