"""``cnnc bench --train``: one training step of a network in the interpreter, in
onnxruntime, and in PyTorch when it is installed, on the same weights, batch, labels and
thread count. Each backend runs in a process of its own (its time per step and its peak
memory are its own); PyTorch is never a dependency: its row is left out when it is absent.

PyTorch runs the same network: :func:`torch_forward` translates the IR graph, node by
node, into torch.nn.functional calls (the ops of classic CNNs and ResNets), and the step is
``loss.backward()`` and ``torch.optim.SGD.step()`` as a PyTorch user writes it.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from cnnc.bench import _child_env, _python, _run_child
from cnnc.errors import CnncError

BACKENDS = ("numpy", "onnxruntime", "torch")
STEP_OPTIMIZER = {"kind": "sgd", "momentum": 0.9, "weight_decay": 1e-4}
LR = 0.01
# Rounds of fresh processes per backend: the best of their medians is reported, since a
# shared machine slows a process now and then (PyTorch's OpenMP threads most of all).
ROUNDS = 3


def torch_forward(graph, params: dict):
    """A function x -> output of ``graph`` (a lowered network, training mode) in PyTorch,
    its parameters the tensors ``params`` by name (running statistics updated in place)."""
    import torch
    import torch.nn.functional as F

    def pads_of(a, rank):
        pads = a["pads"]
        begin, end = pads[:rank], pads[rank:]
        return begin, end

    def conv(node, x, w, b=None):
        a = node.attrs
        rank = len(a["stride"])
        begin, end = pads_of(a, rank)
        fn = F.conv1d if rank == 1 else F.conv2d
        if begin == end:
            return fn(x, w, b, a["stride"], begin, a["dilation"], a["groups"])
        flat = [p for i in reversed(range(rank)) for p in (begin[i], end[i])]
        return fn(F.pad(x, flat), w, b, a["stride"], 0, a["dilation"], a["groups"])

    def pool(node, x):
        a = node.attrs
        rank = len(a["kernel"])
        begin, end = pads_of(a, rank)
        if begin != end:
            raise CnncError(f"the PyTorch benchmark has no uneven pooling pads ({node.name})")
        if node.op == "maxpool":
            fn = F.max_pool1d if rank == 1 else F.max_pool2d
            return fn(x, a["kernel"], a["stride"], begin, a["dilation"], a["ceil"])
        fn = F.avg_pool1d if rank == 1 else F.avg_pool2d
        return fn(x, a["kernel"], a["stride"], begin, a["ceil"], a["count_include_pad"])

    def run(node, xs):
        op, a = node.op, node.attrs
        if op == "conv":
            return conv(node, *xs)
        if op == "fc":
            return F.linear(*xs)
        if op == "bn":
            x, w, b, mean, var = xs
            return F.batch_norm(x, mean, var, w, b, True, 0.1, a["epsilon"])
        if op in ("maxpool", "avgpool"):
            return pool(node, xs[0])
        if op == "gap":
            return xs[0].mean(dim=tuple(range(2, xs[0].dim())), keepdim=True)
        if op == "flatten":
            return xs[0].flatten(1)
        if op == "relu":
            return F.relu(xs[0])
        if op == "sigmoid":
            return torch.sigmoid(xs[0])
        if op == "tanh":
            return torch.tanh(xs[0])
        if op == "softmax":
            return F.softmax(xs[0], a["axis"])
        if op == "add":
            out = xs[0]
            for x in xs[1:]:
                out = out + x
            return out
        if op == "concat":
            return torch.cat(xs, 1)
        if op in ("dropout", "drop_path") and not a.get("ratio"):
            return xs[0]
        raise CnncError(f"the PyTorch benchmark cannot run op {op} ({node.name})")

    out = graph.outputs[0]
    # A final softmax is left out: PyTorch's cross_entropy takes the logits, as cnnc's step.
    result = out.producer.inputs[0] if out.producer and out.producer.op == "softmax" else out

    def forward(*inputs):
        env = {id(v): x for v, x in zip(graph.inputs, inputs, strict=True)}
        env.update({id(p): params[p.name] for p in graph.params.values()})
        for node in graph.nodes:
            if id(result) in env:
                break
            env[id(node.output)] = run(node, [env[id(v)] for v in node.inputs])
        return env[id(result)].flatten(1)

    return forward


# The child that times one backend. argv: backend, model path, batch, repeat, warmup,
# threads. Prints JSON: seconds of each timed step, the first step's loss, RSS before the
# first step and the peak after the last.
CHILD = r"""
import json, sys, time
backend, path, batch, repeat, warmup, threads = sys.argv[1:7]
batch, repeat, warmup, threads = int(batch), int(repeat), int(warmup), int(threads)
def rss(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0
import numpy as np
from cnnc.bench_train import setup
run, first_loss = setup(backend, path, batch, threads)
losses = [first_loss()]
before = rss("VmRSS:")
for _ in range(warmup):
    run()
times = []
for _ in range(repeat):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
print(json.dumps({"times": times, "loss": losses[0], "rss_before": before,
                  "rss_peak": rss("VmHWM:")}))
"""


def _batch(step_inputs, batch: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    shape = tuple(batch if not isinstance(d, int) else d for d in step_inputs.type.shape)
    return rng.standard_normal(shape).astype(np.float32)


def setup(backend: str, path: str, batch: int, threads: int):
    """What a benchmark child runs: ``run()`` does one training step and keeps its result
    as the next step's state; ``first_loss()`` runs the first step and returns its loss."""
    import numpy as np

    from cnnc import weights
    from cnnc.api import _read_text
    from cnnc.frontend.lower import lower
    from cnnc.frontend.parser import parse
    from cnnc.train.step import Optimizer, build_step

    forward = lower(parse(_read_text(Path(path)), path), None)
    weights.initialize(forward, 0)
    step = build_step(forward, optimizer=Optimizer(**STEP_OPTIMIZER))
    x = _batch(forward.inputs[0], batch)
    classes = step.graph.outputs[-1].shape[1]
    labels = np.random.default_rng(1).integers(0, classes, batch).astype(np.int64)
    state = {n: forward.params[n].data.copy() for n in step.params + step.statistics}
    state.update(step.initial_optimizer_state())

    if backend == "torch":
        import torch

        torch.set_num_threads(threads)
        params = {n: torch.from_numpy(state[n].copy()) for n in step.params + step.statistics}
        trained = [params[n] for n in step.params]
        for p in trained:
            p.requires_grad_(True)
        fn = torch_forward(forward, params)
        opt = torch.optim.SGD(trained, lr=LR, momentum=0.9, weight_decay=1e-4)
        xt, yt = torch.from_numpy(x), torch.from_numpy(labels)

        def run():
            out = fn(xt)
            loss = torch.nn.functional.cross_entropy(out, yt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return float(loss.detach())

        return run, run

    order = [v.name for v in step.graph.inputs]
    feeds = dict(state)
    feeds.update({step.data[0]: x, step.target: labels, step.lr: np.array(LR, np.float32)})
    outputs = [v.name for v in step.graph.outputs]
    carried = [(f"{n}.new", n) for n in step.state]
    if backend == "numpy":
        from cnnc.backends.interpreter import Interpreter

        interpreter = Interpreter(step.graph, threads=threads)

        def execute():
            return interpreter.run(*[feeds[n] for n in order])
    else:
        from cnnc.backends import onnx_export
        from cnnc.bench import _onnxruntime_session

        session = _onnxruntime_session(onnx_export.to_onnx(step.graph, 17), threads)

        def execute():
            return session.run(None, feeds)

    def run():
        result = dict(zip(outputs, execute(), strict=True))
        for new, old in carried:
            feeds[old] = result[new]
        return float(result["loss"])

    return run, run


@dataclass
class TrainRow:
    backend: str
    ms_per_step: float | None
    first_loss: float | None
    peak_bytes: int | None
    setup_bytes: int | None
    note: str = ""
    spread: tuple[float, float] | None = None  # the lowest and highest round medians
    round_medians: list[float] = field(default_factory=list)  # ms, in the rounds' order


@dataclass
class TrainReport:
    model: str
    batch: int
    threads: int
    repeat: int
    rounds: int = ROUNDS
    rows: list[TrainRow] = field(default_factory=list)

    def round_ratios(self, backend: str) -> list[float]:
        """``backend``'s median step time over PyTorch's, round by round: in a round the
        backends run one after the other, so a machine that is slower for a while slows
        both sides of a ratio, where it would make one side's best round look better."""
        by = {r.backend: r for r in self.rows}
        ours, torch = by.get(backend), by.get("torch")
        if ours is None or torch is None or not ours.round_medians or not torch.round_medians:
            return []
        return [a / b for a, b in zip(ours.round_medians, torch.round_medians, strict=True)]

    def ratio(self, backend: str) -> float | None:
        """The median of :meth:`round_ratios` (None without PyTorch)."""
        ratios = self.round_ratios(backend)
        return statistics.median(ratios) if ratios else None

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "batch": self.batch,
            "threads": self.threads,
            "repeat": self.repeat,
            "rounds": self.rounds,
            "rows": [r.__dict__ for r in self.rows],
            "ratio_to_torch": {b: self.ratio(b) for b in ("numpy", "onnxruntime")},
            "round_ratios_to_torch": {b: self.round_ratios(b) for b in ("numpy", "onnxruntime")},
        }

    def render(self) -> str:
        lines = [
            f"{self.model}: one SGD step (momentum 0.9, weight decay 1e-4), batch "
            f"{self.batch}, {self.threads} threads; each backend in a fresh process per round, "
            f"{self.rounds} round(s) of {self.repeat} steps: the best round's median (and the "
            "range of the rounds' medians); × torch: the median, over the rounds, of the "
            "ratio of the two medians within a round (and their range)",
            f"  {'backend':<12} {'ms/step':>9} {'rounds':>15} {'× torch':>17} {'peak RSS':>10} "
            f"{'after setup':>12} {'first loss':>11}",
        ]
        for r in self.rows:
            if r.ms_per_step is None:
                lines.append(f"  {r.backend:<12} {r.note}")
                continue
            ratio, ratios = self.ratio(r.backend), self.round_ratios(r.backend)
            shown = "-" if ratio is None else f"{ratio:.2f}"
            if len(ratios) > 1 and max(ratios) > min(ratios):
                shown += f" ({min(ratios):.2f}–{max(ratios):.2f})"
            low, high = r.spread or (r.ms_per_step, r.ms_per_step)
            lines.append(
                f"  {r.backend:<12} {r.ms_per_step:9.1f} {f'{low:.1f}–{high:.1f}':>15} "
                f"{shown:>17} "
                f"{r.peak_bytes / 2**20:8.0f} MB {r.setup_bytes / 2**20:9.0f} MB "
                f"{r.first_loss:11.5f}"
            )
        return "\n".join(lines)


def bench_train(
    path: str,
    batch: int,
    repeat: int = 5,
    warmup: int = 1,
    threads: int | None = None,
    rounds: int = ROUNDS,
) -> TrainReport:
    """Time one training step of the program at ``path`` in each backend (see the module):
    ``rounds`` rounds, each running every backend once in a fresh process (in turn, the
    order reversed every other round); a backend's figure is the best of its rounds'
    medians, its memory that of its first round."""
    from cnnc.bench import _cpu_count

    threads = threads or _cpu_count()
    report = TrainReport(path, batch, threads, repeat, rounds)
    env = _child_env()
    present = [b for b in BACKENDS if b != "torch" or _has_torch()]
    results: dict[str, list[dict]] = {b: [] for b in present}
    for r in range(rounds):
        for backend in present if r % 2 == 0 else present[::-1]:
            args = _python(CHILD, backend, str(path), str(batch), str(repeat), str(warmup))
            _, _, out = _run_child([*args, str(threads)], env)
            results[backend].append(json.loads(out.strip().splitlines()[-1]))
    for backend in BACKENDS:
        if backend not in results:
            report.rows.append(TrainRow(backend, None, None, None, None, "not installed"))
            continue
        runs = results[backend]
        medians = [statistics.median(run["times"]) * 1000 for run in runs]
        first = runs[0]
        report.rows.append(
            TrainRow(
                backend,
                min(medians),
                first["loss"],
                first["rss_peak"],
                first["rss_before"],
                spread=(min(medians), max(medians)),
                round_medians=medians,
            )
        )
    return report


def _has_torch() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None
