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
from cnnc.errors import CnncError
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


# ---- compile benchmarks: each measurement in a fresh process ----------------------------------

# A child's figures: wall seconds, peak resident bytes (of that process alone), its stdout.
Measured = tuple[float, int, str]

FLOOR_CODE = """
import sys, time, numpy as np
n, path = int(sys.argv[1]), sys.argv[2]
values = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
np.save(path, values)
"""

BASELINE_CODE = "import cnnc.cli, onnx, numpy"

TORCH_CODE = """
import json, sys, time
start = time.perf_counter()
import torch, torchvision
model = getattr(torchvision.models, sys.argv[1])(weights=None).eval()
built = time.perf_counter()
x = torch.randn(1, *map(int, sys.argv[2].split("x")))
try:
    torch.onnx.export(model, x, sys.argv[3], dynamo=False)  # the TorchScript exporter
except TypeError:  # a torch before 2.5 has no dynamo exporter and no such argument
    torch.onnx.export(model, x, sys.argv[3])
print(json.dumps({"build_s": built - start, "export_s": time.perf_counter() - built}))
"""


# Runs a module or code as a child's main program, then writes the child's own peak RSS
# (VmHWM: ru_maxrss would count the parent's pages the child had before its exec).
WRAPPER = """
import runpy, sys
report, kind, target, *args = sys.argv[1:]
def peak():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
status = 0
try:
    if kind == "module":
        sys.argv = [target, *args]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.argv = ["-c", *args]
        exec(compile(target, "<bench>", "exec"), {"__name__": "__main__"})
except SystemExit as e:
    status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
finally:
    with open(report, "w") as f:
        f.write(str(peak()))
sys.exit(status)
"""


def _run_child(args: list[str], env: dict | None = None) -> Measured:
    """Run ``[kind, target, *args]`` (kind ``module`` or ``code``) in a fresh Python to its
    end; its wall time, its own peak RSS, its stdout."""
    import os
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="cnnc-child-") as tmp:
        report = os.path.join(tmp, "peak")
        out_path, err_path = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            start = time.perf_counter()
            status = subprocess.call(
                [sys.executable, "-c", WRAPPER, report, *args], stdout=out, stderr=err, env=env
            )
            wall = time.perf_counter() - start
        if status != 0:
            with open(err_path, "rb") as err:
                text = err.read().decode(errors="replace")[-800:]
            raise CnncError(f"the benchmark's child {' '.join(args[1:4])} ... failed:\n{text}")
        with open(report) as f:
            peak = int(f.read())
        with open(out_path, "rb") as out:
            return wall, peak, out.read().decode()


def _python(code: str, *args: str) -> list[str]:
    return ["code", code, *args]


def _child_env() -> dict:
    """The environment of the children: this cnnc first on the path, as the parent has it."""
    import os
    from pathlib import Path

    import cnnc

    env = dict(os.environ)
    root = str(Path(cnnc.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


@dataclass
class CompileReport:
    """One ``cnnc bench --compile`` run: compiling a model against the NumPy floor (drawing
    as many float32 normals and saving them), and PyTorch's build + export when it is
    installed; every figure from a process of its own, in the same run."""

    model: str
    parameters: int
    param_bytes: int
    file_bytes: int
    compile_s: list[float]
    compile_peak_bytes: int
    floor_s: list[float]
    floor_peak_bytes: int
    baseline_peak_bytes: int  # a process that only imports cnnc, onnx and numpy
    torch: dict | None = None  # build_s, export_s, wall_s; None when skipped
    torch_skipped: str | None = None

    @property
    def time_over_floor(self) -> float:
        return min(self.compile_s) / min(self.floor_s)

    @property
    def peak_over_params(self) -> float:
        return self.compile_peak_bytes / max(self.param_bytes, 1)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["time_over_floor"] = self.time_over_floor
        out["peak_over_params"] = self.peak_over_params
        if self.torch:
            out["torch_over_cnnc"] = self.torch["wall_s"] / min(self.compile_s)
        return out

    def render(self) -> str:
        mb = 1e6
        runs = len(self.compile_s)
        lines = [
            f"cnnc compile {self.model}: {self.parameters:,} parameters "
            f"({self.param_bytes / mb:,.1f} MB), file {self.file_bytes / mb:,.1f} MB; "
            f"best of {runs} run(s), each in a fresh process",
            f"{'':<34}{'time':>9}{'peak RSS':>12}",
            f"{'cnnc compile':<34}{min(self.compile_s):>8.2f}s"
            f"{self.compile_peak_bytes / mb:>9,.0f} MB",
            f"{'NumPy floor (draw + np.save)':<34}{min(self.floor_s):>8.2f}s"
            f"{self.floor_peak_bytes / mb:>9,.0f} MB",
            f"{'interpreter baseline (imports)':<34}{'':>9}"
            f"{self.baseline_peak_bytes / mb:>9,.0f} MB",
            f"compile / floor: {self.time_over_floor:.2f}   "
            f"peak RSS / parameter bytes: {self.peak_over_params:.2f}",
        ]
        if self.torch:
            t = self.torch
            lines.append(
                f"PyTorch: build {t['build_s']:.2f}s + torch.onnx.export {t['export_s']:.2f}s "
                f"({t['wall_s']:.2f}s with its imports): "
                f"{t['wall_s'] / min(self.compile_s):.1f} times cnnc's time"
            )
        else:
            lines.append(f"PyTorch: skipped ({self.torch_skipped})")
        return "\n".join(lines)


def _torchvision_model(name: str) -> str | None:
    """Why torch's side cannot be measured for network ``name``, or None if it can."""
    import importlib.util

    for module in ("torch", "torchvision"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
    import torchvision

    if not callable(getattr(torchvision.models, name, None)):
        return f"torchvision has no model named {name}"
    return None


def bench_compile(
    model: str,
    extra_args: list[str] | None = None,
    repeat: int = 1,
    torch: bool = True,
    compiled: Model | None = None,
) -> CompileReport:
    """Time ``cnnc compile MODEL`` (plus ``extra_args``) against the NumPy floor, each in
    fresh processes, ``repeat`` times in turn; the peak RSS of each process alone.
    ``compiled`` is the model as those arguments compile it (its weights are not drawn:
    only their sizes are read); by default, MODEL at -O2."""
    import math
    import tempfile
    from pathlib import Path

    import cnnc

    if compiled is None:
        compiled = cnnc.load(model, opt_level=2)
    params = list(compiled.graph.params.values())
    count = sum(math.prod(p.shape) for p in params)
    nbytes = sum(math.prod(p.shape) * p.type.numpy_dtype.itemsize for p in params)
    env = _child_env()
    compile_s, floor_s = [], []
    compile_peak = floor_peak = 0
    with tempfile.TemporaryDirectory(prefix="cnnc-bench-") as tmp:
        out = Path(tmp) / "model.onnx"
        for i in range(repeat):
            # Fresh files each time: replacing a large file costs its deletion too.
            for f in Path(tmp).iterdir():
                f.unlink()
            wall, peak, _ = _run_child(
                _python(FLOOR_CODE, str(count), str(Path(tmp) / f"floor{i}.npy")), env
            )
            floor_s.append(wall)
            floor_peak = max(floor_peak, peak)
            cmd = ["module", "cnnc", "compile", model, "-o", str(out)]
            wall, peak, _ = _run_child(cmd + list(extra_args or []), env)
            compile_s.append(wall)
            compile_peak = max(compile_peak, peak)
        file_bytes = sum(f.stat().st_size for f in Path(tmp).glob("model.onnx*"))
        _, baseline, _ = _run_child(_python(BASELINE_CODE), env)
        report = CompileReport(
            model=model,
            parameters=count,
            param_bytes=nbytes,
            file_bytes=file_bytes,
            compile_s=compile_s,
            compile_peak_bytes=compile_peak,
            floor_s=floor_s,
            floor_peak_bytes=floor_peak,
            baseline_peak_bytes=baseline,
        )
        if not torch:
            report.torch_skipped = "not asked for"
            return report
        reason = _torchvision_model(compiled.name)
        if reason is not None:
            report.torch_skipped = reason
            return report
        import json

        shape = "x".join(str(d) for d in compiled.graph.inputs[0].shape[1:])
        wall, _, text = _run_child(
            _python(TORCH_CODE, compiled.name, shape, str(Path(tmp) / "torch.onnx")), env
        )
        report.torch = {**json.loads(text.strip().splitlines()[-1]), "wall_s": wall}
    return report


# The programs of ``cnnc bench --scale``: name, then the program text.
def scale_programs(sizes: tuple[int, int, int, int] = (1000, 10000, 100000, 2000)):
    """Generated programs that probe how compile time grows: a conv repeated ``a`` and
    ``b`` times, a written-out chain of ``c`` relus (one a line), and ``d`` residual
    blocks (conv, bn, relu, add) by repetition."""
    a, b, c, d = sizes
    block = "block res(c) {\n    y = in -> conv(c, 3, pad=1) -> bn -> relu\n    add(y, in)\n}\n"
    return [
        (f"{a:,} convs (* {a})", f"network n(x: 8x16x16) {{ conv(8, 3, pad=1) * {a} }}\n"),
        (f"{b:,} convs (* {b})", f"network n(x: 8x16x16) {{ conv(8, 3, pad=1) * {b} }}\n"),
        (
            f"{c:,}-line written-out relu chain",
            "network n(x: 8x16x16) {\n" + "    relu\n" * c + "}\n",
        ),
        (f"{d:,} residual blocks (* {d})", block + f"network n(x: 8x16x16) {{ res(8) * {d} }}\n"),
    ]


def bench_scale(programs: list[tuple[str, str]] | None = None) -> list:
    """``cnnc compile`` of each scale program (default :func:`scale_programs`) in a fresh
    process: (name, nodes at -O0, seconds, peak RSS bytes)."""
    import tempfile
    from pathlib import Path

    import cnnc

    env = _child_env()
    rows = []
    with tempfile.TemporaryDirectory(prefix="cnnc-scale-") as tmp:
        for i, (name, text) in enumerate(programs or scale_programs()):
            source = Path(tmp) / f"probe{i}.cnn"
            source.write_text(text)
            nodes = len(cnnc.compile(source, opt_level=0).graph.nodes)
            cmd = ["module", "cnnc", "compile", str(source)]
            wall, peak, _ = _run_child([*cmd, "-o", str(Path(tmp) / f"probe{i}.onnx")], env)
            rows.append((name, nodes, wall, peak))
    return rows


def render_scale(rows: list) -> str:
    lines = [f"{'cnnc compile of':<40}{'nodes':>9}{'time':>9}{'peak RSS':>12}"]
    for name, nodes, wall, peak in rows:
        lines.append(f"{name:<40}{nodes:>9,}{wall:>8.2f}s{peak / 1e6:>9,.0f} MB")
    return "\n".join(lines)
