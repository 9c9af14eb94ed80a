"""``cnnc bench``: time the interpreter against onnxruntime (and onnx.reference) in one process."""

from __future__ import annotations

import gc
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from cnnc.api import Model
from cnnc.compare import DESCRIPTION, agree, max_difference
from cnnc.ops import get_op

PROFILE_ROWS = 15  # nodes listed one by one in the profile


@dataclass
class Timing:
    """Latencies of one backend, in seconds."""

    backend: str
    runs: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.runs)


@dataclass
class Report:
    """Everything one ``cnnc bench`` run measured."""

    model: str
    pipeline: str
    batch: int
    threads: int
    repeat: int
    warmup: int
    macs_per_item: int
    param_bytes: int
    timings: dict[str, Timing]
    peak_bytes: int
    max_difference: dict[str, float]
    agree: bool
    # With profiling: one row a node, (name, op, interpreter s, onnxruntime s or None),
    # slowest first, and the onnxruntime time that belongs to no node of ours.
    nodes: list[tuple[str, str, float, float | None]] = field(default_factory=list)
    unmatched_onnxruntime_s: float = 0.0

    def ratio(self, a: str, b: str) -> float | None:
        if a in self.timings and b in self.timings:
            return self.timings[a].median / self.timings[b].median
        return None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["timings"] = {
            name: {
                "median_s": t.median,
                "min_s": min(t.runs),
                "max_s": max(t.runs),
                "runs_s": t.runs,
                "items_per_s": self.batch / t.median,
                "gflops": 2 * self.macs_per_item * self.batch / t.median / 1e9,
            }
            for name, t in self.timings.items()
        }
        out["interpreter_over_onnxruntime"] = self.ratio("numpy", "onnxruntime")
        out["reference_over_interpreter"] = self.ratio("onnx.reference", "numpy")
        return out

    def render(self) -> str:
        lines = [
            f"{self.model} ({self.pipeline}), batch {self.batch}, {self.threads} thread(s), "
            f"median of {self.repeat} runs after {self.warmup} warm-up run(s)",
            f"{'':<18}{'median':>11}{'min':>11}{'max':>11}{'items/s':>11}{'GFLOP/s':>10}",
        ]
        names = {
            "numpy": "numpy interpreter",
            "onnxruntime": "onnxruntime",
            "onnx.reference": "onnx.reference",
        }
        for key, t in self.timings.items():
            gflops = 2 * self.macs_per_item * self.batch / t.median / 1e9
            lines.append(
                f"{names[key]:<18}{_ms(t.median):>11}{_ms(min(t.runs)):>11}{_ms(max(t.runs)):>11}"
                f"{self.batch / t.median:>11.1f}{gflops:>10.1f}"
            )
        if (r := self.ratio("numpy", "onnxruntime")) is not None:
            lines.append(f"interpreter / onnxruntime: {r:.2f}")
        if (r := self.ratio("onnx.reference", "numpy")) is not None:
            lines.append(f"onnx.reference / interpreter: {r:.1f}")
        lines.append(
            f"peak memory of the interpreter's tensors in a run: {self.peak_bytes / 1e6:,.1f} MB "
            f"(parameters: {self.param_bytes / 1e6:,.1f} MB)"
        )
        diffs = ", ".join(f"{k} {v:.3g}" for k, v in self.max_difference.items())
        verdict = "agree" if self.agree else "DISAGREE"
        lines.append(f"outputs {verdict} ({DESCRIPTION}); max |difference|: {diffs}")
        if self.nodes:
            lines += self._render_nodes()
        return "\n".join(lines)

    def _render_nodes(self, most: int = PROFILE_ROWS) -> list[str]:
        lines = [
            "",
            f"slowest nodes (medians of {self.repeat} node-by-node interpreter runs; "
            "onnxruntime from its profiler):",
            f"{'interpreter':>12}{'onnxruntime':>13}{'ratio':>8}  node",
        ]
        for name, op, ours, theirs in self.nodes[:most]:
            other = f"{_ms(theirs):>13}{ours / theirs:>8.2f}" if theirs else f"{'-':>13}{'':>8}"
            lines.append(f"{_ms(ours):>12}{other}  {name} ({op})")
        rest = self.nodes[most:]
        if rest:
            ours = sum(row[2] for row in rest)
            theirs = sum(row[3] or 0.0 for row in rest)
            lines.append(f"{_ms(ours):>12}{_ms(theirs):>13}{'':>8}  {len(rest)} more nodes")
        if self.unmatched_onnxruntime_s:
            lines.append(
                f"{'':>12}{_ms(self.unmatched_onnxruntime_s):>13}{'':>8}  "
                "onnxruntime's own nodes (layout reorders)"
            )
        return lines


BLOCKS = 5
SETTLE_SECONDS = 0.2


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def _progress(total: int) -> Callable[[str], None]:
    """A progress bar on stderr when it is a terminal; nothing otherwise."""
    if not sys.stderr.isatty():
        return lambda label: None
    done = [0]

    def step(label: str) -> None:
        done[0] += 1
        filled = 30 * done[0] // total
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done[0]}/{total} {label:<16}")
        if done[0] == total:
            sys.stderr.write("\r" + " " * 60 + "\r")
        sys.stderr.flush()

    return step


def _peak_bytes(run: Callable[[], object]) -> int:
    """Peak NumPy allocation during one run (NumPy reports its buffers to tracemalloc)."""
    gc.collect()
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def bench(
    model: Model,
    batch: int = 1,
    repeat: int = 10,
    threads: int | None = None,
    reference: bool = False,
    warmup: int = 2,
    seed: int = 0,
    profile: bool = False,
) -> Report:
    """Time the interpreter and onnxruntime (and onnx.reference) on one seeded input,
    alternating between them, and check that their outputs agree."""
    from threadpoolctl import threadpool_limits

    threads = threads or _cpu_count()
    xs = model.random_inputs(batch, seed)
    interpreter = model.interpreter
    interpreter.threads = threads
    proto = model.to_onnx()
    session = _onnxruntime_session(proto, threads)
    feed = dict(zip(model.input_names, xs, strict=True))
    backends: dict[str, Callable[[], list[np.ndarray]]] = {
        "numpy": lambda: interpreter.run(*xs),
        "onnxruntime": lambda: session.run(None, feed),
    }
    if reference:
        from onnx.reference import ReferenceEvaluator

        evaluator = ReferenceEvaluator(proto)

        def run_reference() -> list[np.ndarray]:
            # onnx.reference's products are numpy's: BLAS gets the threads.
            with threadpool_limits(limits=threads):
                return evaluator.run(None, feed)

        backends["onnx.reference"] = run_reference
    timings = {name: Timing(name) for name in backends}
    outputs = {}
    step = _progress((warmup + repeat) * len(backends))
    # The interpreter runs BLAS single-threaded on its own threads; keeping BLAS at one
    # thread between its runs spares OpenBLAS waking threads it then does not use.
    with threadpool_limits(limits=1):
        for _ in range(warmup):
            for name, run in backends.items():
                outputs[name] = run()
                step(name)
        # Alternate in a few blocks of runs rather than run by run: onnxruntime's idle
        # threads spin for a while after they work, so each block starts with untimed runs
        # for SETTLE_SECONDS, while the other backend's threads wind down. Busy runs, not a
        # pause: on a virtual machine an idle pause makes the next tens of milliseconds of
        # thread wake-ups slow (measured: LeNet-5 b64 1.55 ms after busy runs, 2.5 ms after
        # a 0.2 s pause), which would time the host's power management, not the backend.
        blocks = min(repeat, BLOCKS)
        for block in range(blocks):
            runs = repeat // blocks + (block < repeat % blocks)
            for name, run in backends.items():
                settled = time.perf_counter() + SETTLE_SECONDS
                run()
                while time.perf_counter() < settled:
                    run()
                for _ in range(runs):
                    start = time.perf_counter()
                    outputs[name] = run()
                    timings[name].runs.append(time.perf_counter() - start)
                    step(name)
        peak = _peak_bytes(backends["numpy"])
    ours = outputs["numpy"]
    diffs = {
        name: max(max_difference(a, b) for a, b in zip(ys, ours, strict=True))
        for name, ys in outputs.items()
        if name != "numpy"
    }
    agreed = all(agree(a, b) for ys in outputs.values() for a, b in zip(ys, ours, strict=True))
    graph = model.graph
    nodes, unmatched = [], 0.0
    if profile:
        with threadpool_limits(limits=1):
            interpreter.run(*xs)
            times = interpreter.profile(xs, repeat)
        theirs, unmatched = _onnxruntime_node_times(
            proto, [n.name for n in graph.nodes], feed, threads, repeat + warmup, warmup
        )
        nodes = sorted(
            (
                (n.name, _op_name(n), statistics.median(times[n.name]), theirs.get(n.name))
                for n in graph.nodes
            ),
            key=lambda row: -row[2],
        )
    return Report(
        model=graph.name,
        pipeline=graph.opt_level,
        batch=batch,
        threads=threads,
        repeat=repeat,
        warmup=warmup,
        macs_per_item=sum(get_op(n.op).macs(n) for n in graph.nodes),
        param_bytes=sum(p.data.nbytes for p in graph.params.values()),
        timings=timings,
        peak_bytes=peak,
        max_difference=diffs,
        agree=agreed,
        nodes=nodes,
        unmatched_onnxruntime_s=unmatched,
    )


def _onnxruntime_session(proto, threads: int, profile: str | None = None):
    """An onnxruntime CPU session on ``threads`` threads; with ``profile``, its profiler
    writes to files with that prefix."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if profile is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    return ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _op_name(node) -> str:
    fused = node.attrs.get("activation")
    return f"{node.op}+{fused}" if fused else node.op


def _onnxruntime_node_times(
    proto, node_names: list[str], feed: dict[str, np.ndarray], threads: int, runs: int, skip: int
) -> tuple[dict[str, float], float]:
    """Median seconds per run of each of our nodes in onnxruntime, from its profiler, and
    the time of onnxruntime's nodes that are none of ours. onnxruntime renames what it
    rewrites (``layer1.conv_nchwc``) and inlines fused functions under the call's name,
    so an onnxruntime node belongs to the longest node name of ours it starts with (up to
    a ``_``, ``/`` or ``.``)."""
    import json
    import os
    import tempfile

    names = sorted(node_names, key=len, reverse=True)
    with tempfile.TemporaryDirectory() as tmp:
        session = _onnxruntime_session(proto, threads, profile=os.path.join(tmp, "profile"))
        for _ in range(runs):
            session.run(None, feed)
        with open(session.end_profiling(), encoding="utf-8") as f:
            events = json.load(f)
    per_run: dict[str, list[float]] = {}
    for event in events:
        name = event.get("name", "")
        if event.get("cat") == "Node" and name.endswith("_kernel_time"):
            per_run.setdefault(name.removesuffix("_kernel_time"), []).append(event["dur"] / 1e6)
    ours: dict[str, float] = {}
    unmatched = 0.0
    for name, durations in per_run.items():
        seconds = statistics.median(durations[skip:] or durations)
        owner = next(
            (n for n in names if name == n or name.startswith((n + "_", n + "/", n + "."))), None
        )
        if owner is None:
            unmatched += seconds
        else:
            ours[owner] = ours.get(owner, 0.0) + seconds
    return ours, unmatched


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
