"""Run the IR directly with NumPy: prepare a plan once, then run it on any batch size."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cnnc.backends import parallel, train_kernels  # noqa: F401 (registers its kernels)
from cnnc.backends.kernels import (
    ALIASING,
    IN_PLACE,
    KERNELS,
    PARAM_KERNELS,
    WEIGHTED,
    Kernel,
    runtime_weights,
)
from cnnc.errors import CnncError, InputError, InternalError
from cnnc.ir.graph import Graph, Node, Value
from cnnc.ops.train import TRAINING_OPS


@dataclass
class Step:
    """One kernel call: where its inputs are, where its outputs go, what dies after it."""

    node: Node
    run: Kernel
    inputs: list[int]
    outputs: list[int]
    free: list[int]
    in_place: bool  # the kernel may write over its first input, whose memory dies here


QUIET = {"over": "ignore", "invalid": "ignore", "divide": "ignore", "under": "ignore"}


class NodeFailure(CnncError):
    """A kernel failed while running a node (for example, out of memory)."""


def is_batched(value: Value) -> bool:
    """Whether a value has a batch axis: a first dimension that is a symbol ("N"). A
    parameter fed as a graph input, a learning rate or a loss has none."""
    return bool(value.type.shape) and not isinstance(value.type.shape[0], int)


def check_input(value: Value, x: np.ndarray, flexible_spatial: bool = False) -> None:
    """Raise InputError if ``x`` does not fit graph input ``value``.

    With ``flexible_spatial`` (a fully convolutional network) the spatial sizes
    of a batched input may be larger than declared.
    """
    if not isinstance(x, np.ndarray):
        raise InputError(f"input %{value.name} must be a NumPy array, got {type(x).__name__}")
    t = value.type
    fits = t.matches(x.shape)
    batched = is_batched(value)
    flexible_spatial = flexible_spatial and batched
    if flexible_spatial and not fits and x.ndim == t.rank:
        fits = t.with_shape((*t.shape[:2], *x.shape[2:])).matches(x.shape) and all(
            s >= d for s, d in zip(x.shape[2:], t.spatial, strict=True)
        )
    if x.dtype != t.numpy_dtype or not fits:
        at_least = " (spatial sizes at least as large)" if flexible_spatial else ""
        dims = ", ".join(str(d) for d in t.shape[1:])
        shape = f"(batch, {dims})" if batched else str(tuple(t.shape))
        raise InputError(
            f"input %{value.name} expects {t}{at_least}, got {x.dtype} {list(x.shape)}",
            hint=f"the network takes {t.numpy_dtype} arrays shaped {shape}",
        )


def check_batch(values: list[Value], inputs) -> None:
    """Raise InputError unless every batched input (see is_batched) has the same batch
    size (its first axis); inputs without a batch axis take no part."""
    pairs = [(v, x) for v, x in zip(values, inputs, strict=True) if is_batched(v) and x.ndim]
    sizes = {x.shape[0] for _, x in pairs}
    if 0 in sizes:
        empty = next(v.name for v, x in pairs if not len(x))
        raise InputError(
            f"input %{empty} is a batch of 0 items; a run needs at least one",
        )
    if len(sizes) > 1:
        given = ", ".join(f"%{v.name} {x.shape[0]}" for v, x in pairs)
        raise InputError(f"the inputs of one run need one batch size, got {given}")


def operands(node: Node) -> list[Value]:
    """The inputs a node's kernel takes at run time: all of them, but for the ops whose
    kernels read their parameters when prepared (a conv's weights), the activations."""
    return node.activations if node.op in PARAM_KERNELS else node.inputs


class Interpreter:
    """A prepared graph: weights laid out for the kernels and every value's last use known."""

    def __init__(self, graph: Graph, threads: int | None = None):
        self.graph = graph
        # Threads the kernels share their work between (BLAS itself runs single-threaded).
        self.threads = threads or parallel.cpu_count()
        slots: dict[int, int] = {}

        def slot(v: Value) -> int:
            return slots.setdefault(id(v), len(slots))

        self.input_slots = [slot(v) for v in graph.inputs]
        # Parameters read by a kernel that takes them at run time (a constant of a training
        # step fed to an ``add``): their slots are filled with their data at every run.
        self.constants = {slot(v): v for node in graph.nodes for v in operands(node) if v.is_param}
        last_use: dict[int, int] = {}
        # Values that share memory (a flatten's output is a view of its input) have one
        # storage; it dies at the last use of any of them.
        storage: dict[int, int] = {s: s for s in [*self.input_slots, *self.constants]}
        storage_last_use: dict[int, int] = {}
        for i, node in enumerate(graph.nodes):
            for v in operands(node):
                last_use[slot(v)] = i
                storage_last_use[storage[slot(v)]] = i
            for out in node.outputs:
                first = slot(operands(node)[0]) if operands(node) else None
                storage[slot(out)] = storage[first] if node.op in ALIASING else slot(out)
        keep = {slot(v) for v in graph.outputs}
        pinned = {storage[s] for s in keep} | {storage[s] for s in self.input_slots}
        pinned |= set(self.constants)
        self.steps: list[Step] = []
        for i, node in enumerate(graph.nodes):
            prepare = KERNELS.get(node.op)
            if prepare is None:
                raise InternalError(f"the interpreter has no kernel for op {node.op}")
            ins = [slot(v) for v in operands(node)]
            outs = [slot(v) for v in node.outputs]
            if node.op in WEIGHTED and any(not v.is_param for v in node.inputs[1:]):
                if node.inputs[0].is_param:
                    raise InternalError(f"node {node.name} ({node.op}) reads a parameter first")
                run = runtime_weights(node, prepare)
            else:
                run = prepare(node)
            free = sorted({s for s in ins if last_use[s] == i and s not in keep})
            first = storage[ins[0]] if ins else None
            in_place = (
                node.op in IN_PLACE
                and first not in pinned
                and storage_last_use[first] == i
                and operands(node)[0].type == node.output.type
            )
            self.steps.append(Step(node, run, ins, outs, free, in_place))
        self.output_slots = [slot(v) for v in graph.outputs]
        self.n_slots = len(slots)
        # The inputs that have a batch axis; the others (parameters fed as inputs, a
        # learning rate) go whole to every share of a split batch.
        self.batched_inputs = [i for i, v in enumerate(graph.inputs) if is_batched(v)]
        self.batched_slots = {self.input_slots[i] for i in self.batched_inputs}
        # A batch runs in shares only when every value keeps its batch axis: a value
        # without one (a loss, a sum over the batch, a gradient of the weights) may mix
        # the items, and shares of it could not be concatenated.
        # Nor when an op of a training graph reads the whole batch (a loss's gradient divides
        # by the batch size, a batch norm in training takes its statistics over it).
        self.splittable = (
            bool(self.batched_inputs)
            and not any(node.op in TRAINING_OPS for node in graph.nodes)
            and all(is_batched(out) for node in graph.nodes for out in node.outputs)
            and all(is_batched(v) for v in graph.outputs)
        )

    def run(self, *inputs: np.ndarray) -> list[np.ndarray]:
        """Run the graph on its inputs (one array per graph input); returns its outputs."""
        env = self._execute(inputs, free=True)
        return [env[s] for s in self.output_slots]

    def run_all(self, *inputs: np.ndarray) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
        """Run the graph keeping every value: its outputs, and each node output by name."""
        env = self._execute(inputs, free=False)
        values = {
            v.name: env[s]
            for step in self.steps
            for v, s in zip(step.node.outputs, step.outputs, strict=True)
        }
        return [env[s] for s in self.output_slots], values

    def _execute(
        self,
        inputs: tuple[np.ndarray, ...],
        free: bool,
        timer: Callable[[Step, float], None] | None = None,
    ) -> list[np.ndarray | None]:
        if len(inputs) != len(self.input_slots):
            raise InputError(
                f"network {self.graph.name} takes {len(self.input_slots)} "
                f"input(s), got {len(inputs)}"
            )
        env: list[np.ndarray | None] = [None] * self.n_slots
        for value, s, x in zip(self.graph.inputs, self.input_slots, inputs, strict=True):
            check_input(value, x, self.graph.flexible_spatial)
            env[s] = x
        for s, v in self.constants.items():
            env[s] = v.data
        check_batch(self.graph.inputs, inputs)
        # NaN and infinities follow IEEE arithmetic (README, NaN and infinity): they are
        # values, not errors, and NumPy's warnings about them would only be noise.
        with parallel.using(self.threads) as pool, np.errstate(**QUIET):
            n = inputs[self.batched_inputs[0]].shape[0] if self.splittable else 0
            if free and timer is None and self._splits_batch(n):
                return self._batch_split(pool, env, n)
            self._steps(env, free, timer)
        return env

    def _splits_batch(self, n: int) -> bool:
        """Whether to run the batch in shares, one per thread, each share through the whole
        network: no hand-offs between threads at every node, and none of a node's work
        left serial. Taken when every thread gets an even share (or many items), and only
        when every value of the graph has a batch axis."""
        threads = self.threads
        return self.splittable and n >= threads > 1 and (n % threads == 0 or n >= 4 * threads)

    def _batch_split(
        self, pool: parallel.Pool, env: list[np.ndarray | None], n: int
    ) -> list[np.ndarray | None]:
        shares = parallel.split(n, pool.threads)
        results: list[list[np.ndarray]] = [[] for _ in shares]

        def share(i: int, worker: int) -> None:
            lo, hi = shares[i]
            part = [x[lo:hi] if s in self.batched_slots else x for s, x in enumerate(env)]
            self._steps(part, True)
            results[i] = [part[s] for s in self.output_slots]

        pool.map(share, len(shares))
        for j, s in enumerate(self.output_slots):
            env[s] = np.concatenate([r[j] for r in results])
        return env

    def profile(self, inputs: list[np.ndarray], repeat: int) -> dict[str, list[float]]:
        """Seconds each node takes on ``inputs``, run after run: the graph runs node by
        node on the interpreter's threads (a batch is not split into shares here)."""
        times: dict[str, list[float]] = {step.node.name: [] for step in self.steps}
        for _ in range(repeat):
            self._execute(
                tuple(inputs), True, lambda step, seconds: times[step.node.name].append(seconds)
            )
        return times

    def _steps(
        self,
        env: list[np.ndarray | None],
        free: bool,
        timer: Callable[[Step, float], None] | None = None,
    ) -> None:
        for step in self.steps:
            args = [env[s] for s in step.inputs]
            start = time.perf_counter() if timer else 0.0
            try:
                if free and step.in_place:
                    results = step.run(*args, out=args[0])
                else:
                    results = step.run(*args)
            except (ValueError, FloatingPointError, MemoryError) as e:
                raise NodeFailure(
                    f"running node {step.node.name} ({step.node.op}) failed: {e}", step.node.loc
                ) from e
            if timer:
                timer(step, time.perf_counter() - start)
            if len(step.outputs) == 1:
                # (NumPy gives a scalar, not an array, for an operation on 0-d arrays)
                env[step.outputs[0]] = (
                    results if isinstance(results, np.ndarray) else np.asarray(results)
                )
            else:
                for s, r in zip(step.outputs, results, strict=True):
                    env[s] = r if isinstance(r, np.ndarray) else np.asarray(r)
            if free:
                for s in step.free:
                    env[s] = None
