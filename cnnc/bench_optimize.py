"""``cnnc bench --optimizers``: cnnc -O2 as an optimizer of existing ONNX models, side by side
with onnxsim, onnxslim and onnxoptimizer on the same models.

For every model and tool it records the nodes and initializers the tool's output holds,
``onnx.checker.check_model(full_check=True)``'s verdict, whether the output computes what the
original computes in onnxruntime (cnnc's agreement rule, :func:`cnnc.compare.agree`), the
output's onnxruntime latency against the original's at the default graph optimizations and
at ``ORT_DISABLE_ALL`` (median and 10th-90th percentile of per-round ratios, the sessions
interleaved in one process), and the wall time the tool took to optimize.

Every tool runs on every model in a child process of its own with a timeout, so a tool that
crashes or hangs is reported as such and the benchmark goes on; the latencies of one model
are measured in one more child, every session side by side. The tools are optional: one that
is not installed is named with the command that installs it (``pip install 'cnnc[bench]'``
installs all three).

The models by default: ONNX's nine light models (its backend test data, IR version 3),
every example program exported at -O0 with random weights, and, where torch and
torchvision import, torch.onnx exports of resnet18, mobilenet_v2 and a small CNN with batch
norms and dropout (TorchScript's exporter without and with constant folding, and the dynamo
exporter). Generated models are cached (``--cache``), keyed by what generates them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cnnc.errors import UsageError

# tool -> (module to import, the command that installs it)
TOOLS: dict[str, tuple[str, str]] = {
    "cnnc": ("cnnc", "pip install cnnc"),
    "onnxsim": ("onnxsim", "pip install onnxsim"),
    "onnxslim": ("onnxslim", "pip install onnxslim"),
    "onnxoptimizer": ("onnxoptimizer", "pip install onnxoptimizer"),
}
SUITES = ("light", "examples", "torch")
LEVELS = ("default", "disabled")  # onnxruntime's ORT_ENABLE_ALL and ORT_DISABLE_ALL
TORCH_MODELS = ("resnet18", "mobilenet_v2", "small_cnn")
# exporter label -> (dynamo, do_constant_folding)
TORCH_EXPORTERS = {"ts": (False, False), "ts-fold": (False, True), "dynamo": (True, True)}
# A round times each session for about this long (repeating a fast model's run), so that
# a round of a small model is not one timer tick.
ROUND_SECONDS = 0.02


@dataclass
class Model:
    """A model of the benchmark: its name, its file, or why it could not be made."""

    name: str
    group: str
    path: str | None
    error: str | None = None


@dataclass
class Result:
    """One tool on one model. ``status`` is ``ok``, ``not installed``, ``failed``, or
    ``timed out``; ``error`` says more (the first line of a failure)."""

    status: str
    error: str | None = None
    seconds: float | None = None  # wall time to load, optimize and save, in its process
    nodes: int | None = None
    inlined_nodes: int | None = None  # with model-local functions inlined
    inlined_ops: dict[str, int] = field(default_factory=dict)
    unused_initializers: int | None = None  # read by no node
    initializers: int | None = None
    ops: dict[str, int] = field(default_factory=dict)
    checker: str | None = None  # "ok" or the first line of check_model's failure
    path: str | None = None
    agree: bool | None = None
    max_diff: float | None = None
    run_error: str | None = None  # onnxruntime could not load or run the output
    latency: dict[str, dict] = field(default_factory=dict)  # level -> median, p10, p90, ...


def first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0][:200] if lines else "(no message)"


def installed(tool: str) -> bool:
    return importlib.util.find_spec(TOOLS[tool][0]) is not None


def tool_status(tool: str) -> str | None:
    """Why ``tool`` cannot run here (``not installed: pip install onnxsim``), or None."""
    return None if installed(tool) else f"not installed: {TOOLS[tool][1]}"


# ---- the models -----------------------------------------------------------------------------


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cnnc" / "bench-optimizers"


def light_models() -> list[Model]:
    import onnx

    folder = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    return [
        Model(path.stem.removeprefix("light_"), "light", str(path))
        for path in sorted(folder.glob("light_*.onnx"))
    ]


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()[:12]


def _code_digest(*modules: str) -> bytes:
    """The source of cnnc's modules that write a generated model: a change remakes it."""
    import cnnc

    root = Path(cnnc.__file__).parent
    return b"".join((root / m).read_bytes() for m in modules)


def example_models(cache: Path, examples: Path | None = None, progress=None) -> list[Model]:
    """Every example program, exported at -O0 with random weights (seed 0) into ``cache``."""
    import cnnc

    examples = examples or Path(cnnc.__file__).resolve().parents[1] / "examples"
    code = _code_digest("backends/onnx_export.py", "weights.py")
    models = []
    for program in sorted(examples.glob("*.cnn")):
        name = program.stem
        out = cache / f"{name}.O0.{_digest(program.read_bytes(), code)}.onnx"
        model = Model(name, "examples", str(out))
        if not out.exists():
            if progress:
                progress(f"exporting {program.name} at -O0")
            try:
                cache.mkdir(parents=True, exist_ok=True)
                cnnc.compile(program, opt_level=0).write_onnx(out)
            except Exception as e:
                model.path, model.error = None, f"-O0 export failed: {first_line(e)}"
        models.append(model)
    return models


def torch_available() -> str | None:
    """Why the torch exports cannot be made here, or None."""
    for module in ("torch", "torchvision"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
    return None


def torch_models(cache: Path, timeout: float, progress=None) -> list[Model]:
    """torch.onnx exports of TORCH_MODELS by every exporter of TORCH_EXPORTERS, each made
    in a child process (torch's exporters print a lot, and take seconds)."""
    import inspect

    import torch

    code = _digest(inspect.getsource(_torch_export).encode(), torch.__version__.encode())
    models = []
    for name in TORCH_MODELS:
        for exporter in TORCH_EXPORTERS:
            out = cache / f"torch-{name}.{exporter}.{code}.onnx"
            model = Model(f"{name} ({exporter})", "torch", str(out))
            if not out.exists():
                if progress:
                    progress(f"exporting {name} with torch.onnx ({exporter})")
                cache.mkdir(parents=True, exist_ok=True)
                done = _child(["export", name, exporter, str(out)], timeout)
                if done.status != "ok":
                    model.path = None
                    model.error = f"torch export {done.status}: {done.error}"
            models.append(model)
    return models


def _torch_export(name: str, exporter: str, out: str) -> dict:
    import torch
    import torchvision
    from torch import nn

    torch.manual_seed(0)
    if name == "small_cnn":

        class SmallCNN(nn.Module):
            """Batch norms after a conv and after a Linear, dropout, and view(x.size(0), -1)."""

            def __init__(self):
                super().__init__()
                self.features = nn.Sequential(
                    nn.Conv2d(3, 16, 3, padding=1),
                    nn.BatchNorm2d(16),
                    nn.ReLU(),
                    nn.MaxPool2d(2),
                    nn.Conv2d(16, 32, 3, padding=1),
                    nn.BatchNorm2d(32),
                    nn.ReLU(),
                    nn.AdaptiveAvgPool2d(1),
                )
                self.head = nn.Sequential(
                    nn.Dropout(0.5),
                    nn.Linear(32, 64),
                    nn.BatchNorm1d(64),
                    nn.ReLU(),
                    nn.Dropout(0.5),
                    nn.Linear(64, 10),
                )

            def forward(self, x):
                x = self.features(x)
                return self.head(x.view(x.size(0), -1))

        model, shape = SmallCNN(), (1, 3, 32, 32)
    else:
        model, shape = getattr(torchvision.models, name)(weights=None), (1, 3, 224, 224)
    # Batch-norm statistics and affines drawn afresh, so that a fold shows in the numbers.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    model.eval()
    x = torch.randn(*shape, generator=g)
    dynamo, fold = TORCH_EXPORTERS[exporter]
    partial = out + ".part"
    if dynamo:
        torch.onnx.export(model, (x,), partial, dynamo=True, external_data=False)
    else:
        torch.onnx.export(model, (x,), partial, dynamo=False, do_constant_folding=fold)
    os.replace(partial, out)
    return {}


def collect(
    files: list[str],
    suites: list[str],
    cache: Path,
    timeout: float,
    progress=None,
) -> tuple[list[Model], list[str]]:
    """The models to measure (``files`` if any, else the ``suites``), and notes on what was
    left out."""
    notes = []
    if files:
        return [Model(Path(f).name, "file", str(f)) for f in files], notes
    models: list[Model] = []
    if "light" in suites:
        models += light_models()
    if "examples" in suites:
        models += example_models(cache, progress=progress)
    if "torch" in suites:
        why = torch_available()
        if why:
            notes.append(f"torch exports skipped: {why} (run under a Python with torch)")
        else:
            models += torch_models(cache, timeout, progress)
    return models, notes


# ---- the children -----------------------------------------------------------------------------


def _summary(path: str) -> dict:
    """Nodes, initializers, op types and check_model(full_check=True)'s verdict of a file."""
    import onnx

    model = onnx.load(path)
    g = model.graph
    # Model-local functions (cnnc's fused ops, for one) count as one node each at the top;
    # onnxruntime runs their bodies, so the count with every function inlined is kept too.
    flat = g
    if model.functions:
        from onnx import inliner

        flat = inliner.inline_local_functions(model).graph
    read = {name for n in g.node for name in n.input} | {o.name for o in g.output}
    try:
        onnx.checker.check_model(path, full_check=True)
        checker = "ok"
    except Exception as e:
        checker = first_line(e)
    return {
        "nodes": len(g.node),
        "initializers": len(g.initializer),
        "inlined_nodes": len(flat.node),
        "inlined_ops": dict(Counter(n.op_type for n in flat.node)),
        "unused_initializers": sum(i.name not in read for i in g.initializer),
        "ops": dict(Counter(f"{n.domain}.{n.op_type}" if n.domain else n.op_type for n in g.node)),
        "checker": checker,
    }


def _optimize(tool: str, source: str, out: str) -> float:
    """Run ``tool`` on the model file ``source``, writing ``out``; the seconds it took from
    reading the file to the written output."""
    import onnx

    start = time.perf_counter()
    if tool == "cnnc":
        import cnnc

        cnnc.load(source, opt_level=2).write_onnx(out)
        return time.perf_counter() - start
    model = onnx.load(source)
    if tool == "onnxsim":
        import onnxsim

        optimized, ok = onnxsim.simplify(model)
        if not ok:
            raise RuntimeError("onnxsim's own check of the simplified model failed")
    elif tool == "onnxslim":
        import onnxslim

        optimized = onnxslim.slim(model)
    elif tool == "onnxoptimizer":
        import onnxoptimizer

        optimized = onnxoptimizer.optimize(model)
    else:
        raise UsageError(f"unknown tool {tool}")
    onnx.save(optimized, out)
    return time.perf_counter() - start


def _feeds(session, seed: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    feeds = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
        if "float" in i.type:
            dtype = np.float16 if "float16" in i.type else np.float32
            feeds[i.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[i.name] = np.zeros(shape, dtype=np.int64 if "int64" in i.type else np.int32)
    return feeds


def _session(path: str, level: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Several sessions share the process and its few CPUs: the threads of a session that
    # has just run must not spin (onnxruntime's default) while the next session runs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    if level == "disabled":
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _measure(original: str, outputs: dict[str, str], rounds: int, threads: int, seed: int):
    """Agreement of every output with the original in onnxruntime, and the latency ratios
    of every output against the original, interleaved round by round in this process.
    One level's sessions are alive at a time (a 500 MB model's ten sessions do not fit)."""

    from cnnc.compare import agree, max_difference

    report: dict[str, dict] = {tool: {} for tool in outputs}
    feeds_of: dict[str, dict] = {}
    runnable = {}
    for level in LEVELS:
        runs = {"original": _session(original, level, threads)}
        if not feeds_of:
            feeds = feeds_of["original"] = _feeds(runs["original"], seed)
            expected = runs["original"].run(None, feeds)
            order = [i.name for i in runs["original"].get_inputs()]
        for tool, path in outputs.items():
            if level != LEVELS[0] and tool not in runnable:
                continue
            try:
                runs[tool] = _session(path, level, threads)
                if level != LEVELS[0]:
                    continue
                names = [i.name for i in runs[tool].get_inputs()]
                # a tool that renamed the inputs gets them in order
                mine = dict(zip(names, feeds.values(), strict=True))
                if set(names) == set(order):
                    mine = feeds
                feeds_of[tool] = mine
                got = runs[tool].run(None, mine)
                same = len(got) == len(expected) and all(
                    a.shape == e.shape for a, e in zip(got, expected, strict=True)
                )
                pairs = list(zip(got, expected, strict=True)) if same else []
                report[tool]["agree"] = bool(same and all(agree(a, e) for a, e in pairs))
                report[tool]["max_diff"] = (
                    max(max_difference(a, e) for a, e in pairs) if same else None
                )
                runnable[tool] = path
            except Exception as e:
                report[tool]["run_error"] = first_line(e)
                runs.pop(tool, None)
        _time_level(runs, feeds_of, rounds, level, report)
        del runs
    return report


def _time_level(runs: dict, feeds_of: dict, rounds: int, level: str, report: dict) -> None:
    import numpy as np

    names = list(runs)
    for name in names:  # warm up
        for _ in range(2):
            runs[name].run(None, feeds_of[name])
    start = time.perf_counter()
    runs["original"].run(None, feeds_of["original"])
    once = time.perf_counter() - start
    reps = max(1, min(1000, int(ROUND_SECONDS / max(once, 1e-6))))
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)  # each session takes every place in the order in turn
        for name in names[shift:] + names[:shift]:
            session, feed = runs[name], feeds_of[name]
            start = time.perf_counter()
            for _ in range(reps):
                session.run(None, feed)
            times[name].append((time.perf_counter() - start) / reps)
    original_ms = float(np.median(times["original"]) * 1e3)
    for tool in names[1:]:
        ratios = np.array(times[tool]) / np.array(times["original"])
        report[tool].setdefault("latency", {})[level] = {
            "median": float(np.median(ratios)),
            "p10": float(np.percentile(ratios, 10)),
            "p90": float(np.percentile(ratios, 90)),
            "ms": float(np.median(times[tool]) * 1e3),
            "original_ms": original_ms,
            "reps": reps,
            "ratios": [float(v) for v in ratios],
        }


def child_main(argv: list[str]) -> None:
    """The child processes' entry: ``RESULT.json`` then a command (summary, optimize,
    measure, export); the result is written as JSON, a failure as its first line."""
    result_path, command, *args = argv
    try:
        if command == "summary":
            result = _summary(args[0])
        elif command == "optimize":
            tool, source, out = args
            seconds = _optimize(tool, source, out)
            result = {"seconds": seconds, **_summary(out)}
        elif command == "measure":
            original, rounds, threads, seed, *pairs = args
            outputs = dict(pair.split("=", 1) for pair in pairs)
            result = _measure(original, outputs, int(rounds), int(threads), int(seed))
        elif command == "export":
            result = _torch_export(*args)
        else:
            raise UsageError(f"unknown child command {command}")
        result = {"status": "ok", **result}
    except BaseException as e:  # a tool's failure, whatever it raises, is the tool's result
        result = {"status": "failed", "error": f"{type(e).__name__}: {first_line(e)}"}
    Path(result_path).write_text(json.dumps(result))


@dataclass
class _Done:
    status: str
    error: str | None
    data: dict


def _child(args: list[str], timeout: float) -> _Done:
    """Run ``child_main(args)`` in a fresh Python with a timeout; a crash (no result) and a
    timeout are results like any other."""
    from cnnc.bench import _child_env

    with tempfile.TemporaryDirectory(prefix="cnnc-optbench-") as tmp:
        result = os.path.join(tmp, "result.json")
        err_path = os.path.join(tmp, "stderr")
        command = [sys.executable, "-m", "cnnc.bench_optimize", result, *args]
        with open(err_path, "wb") as err:
            process = subprocess.Popen(
                command,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=_child_env(),
                start_new_session=True,
            )
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill(process)
                return _Done("timed out", f"no result after {timeout:g} s", {})
        if not os.path.exists(result):
            text = Path(err_path).read_text(errors="replace").strip().splitlines()
            why = text[-1] if text else f"exit status {process.returncode}"
            return _Done("failed", f"crashed ({why[:200]})", {})
        data = json.loads(Path(result).read_text())
        return _Done(data.pop("status"), data.pop("error", None), data)


def _kill(process: subprocess.Popen) -> None:
    """End a timed-out child and whatever it started (its own process group)."""
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


# ---- the benchmark --------------------------------------------------------------------------


@dataclass
class Report:
    tools: list[str]
    rounds: int
    threads: int
    seed: int
    timeout: float
    models: list[dict]  # name, group, path, error, original: {...}, tools: {tool: Result}
    notes: list[str]
    machine: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def run(
    models: list[Model],
    tools: list[str],
    rounds: int = 20,
    threads: int = 2,
    seed: int = 0,
    timeout: float = 600.0,
    out_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
    notes: list[str] | None = None,
) -> Report:
    """Run every tool on every model and measure the outputs (see the module's text)."""
    import platform

    notes = list(notes or [])
    missing = {tool: tool_status(tool) for tool in tools}
    rows = []
    with tempfile.TemporaryDirectory(prefix="cnnc-optbench-out-") as tmp:
        folder = Path(out_dir) if out_dir is not None else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for index, model in enumerate(models):
            started = time.perf_counter()
            row: dict = {"name": model.name, "group": model.group, "path": model.path}
            row["error"], row["original"], row["tools"] = model.error, None, {}
            rows.append(row)
            if model.error:
                continue
            if progress:
                progress(f"[{index + 1}/{len(models)}] {model.name}")
            try:  # in this process: onnx's own reading and checking of the input
                row["original"] = _summary(model.path)
            except Exception as e:
                row["error"] = f"cannot read the model: {first_line(e)}"
                continue
            outputs = {}
            for tool in tools:
                if missing[tool]:
                    row["tools"][tool] = Result("not installed", missing[tool])
                    continue
                stem = f"{index:02d}-{_safe(model.name)}.{tool}.onnx"
                out = str(folder / stem)
                done = _child(["optimize", tool, model.path, out], timeout)
                result = Result(done.status, done.error)
                if done.status == "ok":
                    result = Result("ok", path=out, **done.data)
                    outputs[tool] = out
                row["tools"][tool] = result
            if outputs:
                pairs = [f"{tool}={path}" for tool, path in outputs.items()]
                args = ["measure", model.path, str(rounds), str(threads), str(seed), *pairs]
                done = _child(args, timeout * 3)
                for tool in outputs:
                    result = row["tools"][tool]
                    if done.status != "ok":
                        result.run_error = f"measurement {done.status}: {done.error}"
                        continue
                    for key, value in done.data[tool].items():
                        setattr(result, key, value)
            if out_dir is None:  # the outputs go with the temporary folder
                for result in row["tools"].values():
                    result.path = None
            else:  # the figures so far, should a long run be stopped
                partial = Report(tools, rounds, threads, seed, timeout, rows, notes)
                (folder / "report.json").write_text(json.dumps(partial.to_dict(), indent=1))
            if progress:
                progress(f"    {time.perf_counter() - started:.0f} s")
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs"
    if hasattr(os, "getloadavg"):
        machine += f", load average {os.getloadavg()[0]:.2f} at the end"
    return Report(tools, rounds, threads, seed, timeout, rows, notes, machine)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


# ---- the report --------------------------------------------------------------------------------


def _cell(result: dict, what: Callable[[dict], str]) -> str:
    if result["status"] != "ok":
        return result["status"] if result["status"] != "not installed" else "not installed"
    return what(result)


def _ratio(result: dict, level: str) -> str:
    if result.get("run_error"):
        return "cannot run"
    lat = result.get("latency", {}).get(level)
    if not lat:
        return "—"
    return f"{lat['median']:.2f} ({lat['p10']:.2f}–{lat['p90']:.2f})"


def _check(result: dict) -> str:
    check = "ok" if result["checker"] == "ok" else "FAIL"
    if result.get("run_error"):
        return f"{check}, cannot run"
    if result.get("agree") is None:
        return check
    return f"{check}, {'same' if result['agree'] else 'DIFFERENT'}"


def _table(report: dict, title: str, original: Callable[[dict], str], cell) -> list[str]:
    tools = report["tools"]
    lines = [f"### {title}", ""]
    lines.append("| model | original | " + " | ".join(tools) + " |")
    lines.append("|---|" + "---:|" * (len(tools) + 1))
    for row in report["models"]:
        if row["original"] is None:
            lines.append(f"| {row['name']} | {row['error']} |" + " |" * len(tools))
            continue
        cells = [_cell(row["tools"][tool], cell) for tool in tools]
        lines.append(f"| {row['name']} | {original(row)} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _latency_of_original(level: str) -> Callable[[dict], str]:
    def text(row):
        for result in row["tools"].values():
            lat = result.get("latency", {}).get(level)
            if lat:
                return f"{lat['original_ms']:.2f} ms"
        return "—"

    return text


def op_difference(mine: dict[str, int], theirs: dict[str, int]) -> tuple[str, str]:
    """The op types one output holds more of than the other: (``mine``'s extra,
    ``theirs``' extra), e.g. ``("Mul 3, Add 3", "Gemm 1")``."""

    def extra(a, b):
        more = {op: a.get(op, 0) - b.get(op, 0) for op in a}
        return ", ".join(f"{op} {n}" for op, n in sorted(more.items()) if n > 0) or "nothing"

    return extra(mine, theirs), extra(theirs, mine)


def losses(report: dict, tool: str = "cnnc", rival: str = "onnxsim") -> list[str]:
    """Where ``tool`` loses, or could not be compared (the original could not be read): it
    fails or times out, its output fails the checker or computes something else, holds more
    nodes than ``rival``'s, runs slower than the original at either onnxruntime level beyond
    the spread (its 10th percentile ratio above 1), or takes longer to optimize than
    ``rival``."""
    out = []
    for row in report["models"]:
        mine = row["tools"].get(tool)
        name = row["name"]
        if row["original"] is None:
            out.append(f"{name}: not compared: {row['error']}")
            continue
        if mine is None or mine["status"] == "not installed":
            continue
        if mine["status"] != "ok":
            out.append(f"{name}: {tool} {mine['status']}: {mine['error']}")
            continue
        if mine["checker"] != "ok":
            out.append(f"{name}: check_model fails: {mine['checker']}")
        if mine.get("run_error"):
            out.append(f"{name}: onnxruntime cannot run the output: {mine['run_error']}")
        elif mine.get("agree") is False:
            out.append(f"{name}: the output differs from the original's (max {mine['max_diff']})")
        theirs = row["tools"].get(rival)
        rival_ok = theirs is not None and theirs["status"] == "ok"
        if rival_ok and mine["nodes"] > theirs["nodes"]:
            more, fewer = op_difference(mine["ops"], theirs["ops"])
            out.append(
                f"{name}: {mine['nodes']} nodes, {rival} {theirs['nodes']}; "
                f"{tool} has more {more}; {rival} has more {fewer}"
            )
        elif rival_ok and mine["inlined_nodes"] > theirs["inlined_nodes"]:
            more = ""
            if mine.get("inlined_ops") and theirs.get("inlined_ops"):
                more, fewer = op_difference(mine["inlined_ops"], theirs["inlined_ops"])
                more = f"; inlined, {tool} has more {more}; {rival} has more {fewer}"
            out.append(
                f"{name}: {mine['inlined_nodes']} nodes with its functions inlined, "
                f"{rival} {theirs['inlined_nodes']} ({mine['nodes']} at the top level){more}"
            )
        if mine.get("unused_initializers"):
            out.append(f"{name}: {mine['unused_initializers']} initializers no node reads")
        for level in LEVELS:
            lat = mine.get("latency", {}).get(level)
            if lat and lat["p10"] > 1.0:
                what = "default optimizations" if level == "default" else "ORT_DISABLE_ALL"
                out.append(
                    f"{name}: {lat['median']:.2f}× the original's latency with {what} "
                    f"(10th–90th percentile {lat['p10']:.2f}–{lat['p90']:.2f})"
                )
        if rival_ok and mine["seconds"] > theirs["seconds"]:
            out.append(
                f"{name}: {mine['seconds']:.2f} s to optimize, {rival} {theirs['seconds']:.2f} s"
            )
    return out


def render(report: dict) -> str:
    """The report as markdown: five tables (rows are models, columns the original and each
    tool), notes, and where cnnc loses."""
    others = [t for t in report["tools"] if t != "cnnc"]
    lines = [
        f"## cnnc -O2 against {', '.join(others) or 'no other tool'}",
        "",
        f"{len(report['models'])} models; latency: median of {report['rounds']} interleaved "
        f"rounds in one process, onnxruntime on {report['threads']} threads, seed "
        f"{report['seed']}; {report['machine']}.",
    ]
    for tool in report["tools"]:
        for row in report["models"]:
            result = row["tools"].get(tool)
            if result and result["status"] == "not installed":
                lines.append(f"- {tool}: {result['error']}")
                break
    for note in report["notes"]:
        lines.append(f"- {note}")
    lines.append("")
    lines += _table(
        report,
        "Nodes (initializers)",
        lambda row: f"{row['original']['nodes']} ({row['original']['initializers']})",
        lambda r: (
            f"{r['nodes']} ({r['initializers']}"
            + (f", {r['unused_initializers']} unused)" if r.get("unused_initializers") else ")")
        ),
    )
    if any(
        r.get("inlined_nodes") not in (None, r.get("nodes"))
        for row in report["models"]
        for r in [row["original"] or {}, *row["tools"].values()]
    ):
        lines += _table(
            report,
            "Nodes with model-local functions inlined (as onnxruntime runs them)",
            lambda row: str(row["original"]["inlined_nodes"]),
            lambda r: str(r["inlined_nodes"]),
        )
    lines += _table(
        report,
        "check_model(full_check=True); outputs in onnxruntime against the original's",
        lambda row: "ok" if row["original"]["checker"] == "ok" else "FAIL",
        _check,
    )
    for level, what in (
        ("default", "default graph optimizations"),
        ("disabled", "ORT_DISABLE_ALL"),
    ):
        lines += _table(
            report,
            f"onnxruntime latency / the original's, {what}: median (10th–90th percentile)",
            _latency_of_original(level),
            lambda r, level=level: _ratio(r, level),
        )
    lines += _table(
        report,
        "Seconds to optimize (read, optimize, write; one process per tool and model)",
        lambda row: "",
        lambda r: f"{r['seconds']:.2f}",
    )
    failures = [
        f"- {row['name']}, {tool}: "
        + (
            f"onnxruntime cannot run the output: {result['run_error']}"
            if result["status"] == "ok"
            else f"{result['status']}: {result.get('error')}"
        )
        for row in report["models"]
        for tool, result in row["tools"].items()
        if result["status"] in ("failed", "timed out") or result.get("run_error")
    ]
    failures += [
        f"- {row['name']} (the original): "
        f"{row['original']['checker'] if row['original'] else row['error']}"
        for row in report["models"]
        if row["original"] is None or row["original"]["checker"] != "ok"
    ]
    if failures:
        lines += ["### Failures", "", *failures, ""]
    checks = [
        f"- {row['name']}, {tool}: {result['checker']}"
        for row in report["models"]
        for tool, result in row["tools"].items()
        if result["status"] == "ok" and result["checker"] != "ok"
    ]
    if checks:
        lines += ["### check_model failures (first line)", "", *checks, ""]
    if "cnnc" in report["tools"]:
        lost = losses(report)
        lines += ["### Where cnnc loses", ""]
        lines += [f"- {item}" for item in lost] if lost else ["- nowhere"]
    return "\n".join(lines).rstrip() + "\n"


def parse_tools(text: str) -> list[str]:
    tools = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tools if t not in TOOLS]
    if unknown or not tools:
        raise UsageError(
            f"--tools takes names among {', '.join(TOOLS)}; got {text!r}",
        )
    return tools


def parse_suites(text: str) -> list[str]:
    suites = [s.strip() for s in text.split(",") if s.strip()]
    if not suites or any(s not in SUITES for s in suites):
        raise UsageError(f"--suite takes names among {', '.join(SUITES)}; got {text!r}")
    return suites


if __name__ == "__main__":
    child_main(sys.argv[1:])
