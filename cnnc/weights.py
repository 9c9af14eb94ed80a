"""Parameter tensors: seeded initialisation, and loading and checking a weights file (.npz)."""

from __future__ import annotations

import math
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cnnc.errors import InternalError, WeightsError
from cnnc.ir.graph import Graph, Value
from cnnc.npyfile import ArrayFileError, NpzArchive, nonfinite_count, open_array_file
from cnnc.ops import get_op

# PyTorch keeps these counters in BatchNorm state_dicts; inference never reads them.
IGNORED_SUFFIXES = (".num_batches_tracked",)


def _rng(seed: int, name: str, chunk: int = 0) -> np.random.Generator:
    # Seeding per tensor name keeps each tensor's values stable when layers are added elsewhere.
    if chunk:
        return np.random.default_rng([seed, zlib.crc32(name.encode()), chunk])
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


# A tensor of more than CHUNK values is drawn in chunks of CHUNK values, chunk k >= 1 from
# default_rng([seed, crc32(name), k]) and chunk 0 from the tensor's own generator, so that
# threads can draw the chunks of one big tensor at once and its values are the same
# whatever the number of threads; a tensor of at most CHUNK values is one chunk.
CHUNK = 1 << 22

# SeedSequence's constants (numpy/random/bit_generator.pyx): its hash of the entropy words
# [seed, crc] into the 4-word pool, and of the pool into the 4 uint64 words that PCG64
# seeds itself from.
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_MULT_L, _MIX_MULT_R = 0xCA01F9DD, 0x4973F715
_MASK32 = 0xFFFFFFFF


def _seed_words(seed: int, crcs: np.ndarray) -> np.ndarray:
    """``SeedSequence([seed, crc]).generate_state(4, np.uint64)`` for every crc at once,
    one row each: numpy's hash done on arrays (its loop costs about 10 µs a tensor,
    most of the time of a network of 10,000 small layers). ``seed`` fits 32 bits."""
    n = len(crcs)
    shift = np.uint32(16)
    hash_const = _INIT_A

    def hashmix(value: np.ndarray) -> np.ndarray:
        nonlocal hash_const
        value = value ^ np.uint32(hash_const)
        hash_const = hash_const * _MULT_A & _MASK32
        value = value * np.uint32(hash_const)
        return value ^ (value >> shift)

    def mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        result = np.uint32(_MIX_MULT_L) * x - np.uint32(_MIX_MULT_R) * y
        return result ^ (result >> shift)

    zeros = np.zeros(n, np.uint32)
    entropy = [np.full(n, seed, np.uint32), crcs.astype(np.uint32), zeros, zeros]
    pool = [hashmix(word) for word in entropy]
    for src in range(4):
        for dst in range(4):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    hash_const = _INIT_B
    words = np.empty((n, 8), np.uint32)
    for i in range(8):
        value = pool[i % 4] ^ np.uint32(hash_const)
        hash_const = hash_const * _MULT_B & _MASK32
        value = value * np.uint32(hash_const)
        words[:, i] = value ^ (value >> shift)
    return words.astype("<u4").view("<u8").astype(np.uint64)


class _SeedWords(np.random.bit_generator.ISeedSequence):
    """A seed sequence whose state is already computed (numpy's documented interface for
    what a bit generator seeds itself from)."""

    __slots__ = ("words",)

    def __init__(self, words: np.ndarray):
        self.words = words

    def generate_state(self, n_words: int, dtype=np.uint32) -> np.ndarray:
        if n_words != 4 or np.dtype(dtype) != np.uint64:  # PCG64 asks for exactly this
            raise InternalError(f"a bit generator asked for {n_words} words of {dtype}")
        return self.words


class _Seeds:
    """The generators ``default_rng([seed, crc32(name)])`` of many tensors, their seeds
    hashed for all of them at once when the first is asked for."""

    __slots__ = ("_rows", "names", "seed")

    def __init__(self, seed: int, names: list[str]):
        self.seed, self.names = seed, names
        self._rows: dict[str, np.ndarray] | None = None

    def rng(self, name: str) -> np.random.Generator:
        if self._rows is None:
            self._rows = self._hash()
        row = self._rows.get(name)
        if row is None:
            return _rng(self.seed, name)
        return np.random.Generator(np.random.PCG64(_SeedWords(row)))

    def _hash(self) -> dict[str, np.ndarray]:
        if not (0 <= self.seed <= _MASK32) or not self.names:
            return {}  # other seeds take numpy's own path, tensor by tensor
        crcs = np.array([zlib.crc32(n.encode()) for n in self.names], np.uint32)
        rows = _seed_words(self.seed, crcs)
        # The hash is numpy's: a numpy whose SeedSequence differed would show it here.
        reference = np.random.SeedSequence([self.seed, int(crcs[0])]).generate_state(4, np.uint64)
        if not np.array_equal(rows[0], reference):  # pragma: no cover
            return {}
        return dict(zip(self.names, rows, strict=True))


def initial_value(param: Value, seed: int) -> np.ndarray:
    """A parameter's seeded initial tensor, following its ``init`` rule.

    ``he_normal``: N(0, 2 / fan_in), He et al. 2015, for weights before a ReLU.
    ``uniform``: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's bias default.
    ``bn_scale``: U(0.5, 1.5) and ``bn_shift``: N(0, 0.1²), for batch-norm scales and
    shifts (and statistics, until :func:`initialize` measures them): trained values
    are never the identity either.
    ``constant``: every value the rule's second item (PReLU's slopes start at 0.25).
    A tensor of more than :data:`CHUNK` values is drawn in chunks (see there).
    """
    return draw(param.name, param.type.shape, param.init, seed)


def pieces(
    name: str, shape: tuple, init: tuple | None, seed: int, seeds: _Seeds | None = None
) -> list[tuple[int, Callable[[np.ndarray | None], np.ndarray]]]:
    """The chunks of the seeded initial tensor of the parameter ``name``, in order: for
    each, its number of values and a function computing them (flat float32, into its
    argument when that is an array of that many float32s). Independent of each other:
    threads may compute them at once."""
    kind, fan_in = init or ("he_normal", 1)
    size = math.prod(shape)
    if kind == "constant":
        return [(size, lambda out=None: _fill(out, np.full(size, fan_in, np.float32)))]

    def chunk(k: int, n: int) -> Callable[[np.ndarray | None], np.ndarray]:
        def compute(out: np.ndarray | None = None) -> np.ndarray:
            if k:
                rng = _rng(seed, name, k)
            else:
                rng = seeds.rng(name) if seeds is not None else _rng(seed, name)
            return _values(rng, kind, fan_in, n, out)

        return compute

    return [
        (min(CHUNK, size - start), chunk(k, min(CHUNK, size - start)))
        for k, start in enumerate(range(0, max(size, 1), CHUNK))
    ]


def _fill(out: np.ndarray | None, values: np.ndarray) -> np.ndarray:
    if out is None:
        return values
    out[...] = values
    return out


def _values(rng: np.random.Generator, kind: str, fan_in, n: int, out) -> np.ndarray:
    if kind == "he_normal":
        values = rng.standard_normal(n, dtype=np.float32, out=out)
        values *= np.float32(np.sqrt(2.0 / fan_in))  # in place: no second copy of a big tensor
        return values
    if kind == "uniform":
        bound = 1.0 / np.sqrt(fan_in)
        return _fill(out, rng.uniform(-bound, bound, n).astype(np.float32))
    if kind == "bn_scale":
        return _fill(out, rng.uniform(0.5, 1.5, n).astype(np.float32))
    if kind == "bn_shift":
        return _fill(out, (rng.standard_normal(n) * 0.1).astype(np.float32))
    raise AssertionError(f"init rule {kind}")


def draw(
    name: str, shape: tuple, init: tuple | None, seed: int, seeds: _Seeds | None = None
) -> np.ndarray:
    """The seeded initial tensor of the parameter ``name`` (see :func:`initial_value`);
    the chunks of a big tensor are drawn by the worker threads of :func:`parallel_map`."""
    kind, fan_in = init or ("he_normal", 1)
    if kind != "constant" and math.prod(shape) <= CHUNK:  # one chunk: no closures to build
        rng = seeds.rng(name) if seeds is not None else _rng(seed, name)
        return _values(rng, kind, fan_in, math.prod(shape), None).reshape(shape)
    parts = pieces(name, shape, init, seed, seeds)
    if len(parts) == 1:
        return parts[0][1](None).reshape(shape)
    values = np.empty(math.prod(shape), np.float32)
    slices, start = [], 0
    for n, _ in parts:
        slices.append(values[start : start + n])
        start += n
    chunks = range(len(parts))
    if threading.current_thread().name.startswith(_THREAD_NAME):
        mapped = map(lambda i: parts[i][1](slices[i]), chunks)  # already on a drawing thread
    else:
        mapped = parallel_map(lambda i: parts[i][1](slices[i]), chunks)
    for _ in mapped:
        pass
    return values.reshape(shape)


def parallel_map(fn: Callable, items):
    """``map(fn, items)`` computed on the drawing threads (see :func:`draw_threads`), two
    items per thread ahead of the one consumed, results in order."""
    from collections import deque

    pool, threads = draw_threads()
    if threads == 1:
        yield from map(fn, items)
        return
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) > 2 * threads:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# Threads that draw the chunks of big tensors: one per CPU, at most this many. NumPy's
# generators release the GIL while they fill an array.
DRAW_THREADS = 4
_THREAD_NAME = "cnnc-draw"
_POOL: tuple | None = None


def draw_threads() -> tuple:
    """The thread pool that draws weights, and its number of threads."""
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        from cnnc.backends.parallel import cpu_count

        threads = max(1, min(DRAW_THREADS, cpu_count()))
        _POOL = (ThreadPoolExecutor(threads, thread_name_prefix=_THREAD_NAME), threads)
    return _POOL


# The ops whose multiply-accumulates the calibration budget counts.
_PRODUCTS = frozenset({"conv", "conv_transpose", "fc", "linear"})


class _Initial:
    """The thunk of a parameter's initial value: its name, shape and rule as lowering
    declared them, so that a pass renaming or reshaping the parameter later changes
    nothing about the values it gets."""

    __slots__ = ("init", "name", "seed", "seeds", "shape")

    def __init__(self, param: Value, seed: int, seeds: _Seeds | None = None):
        self.name, self.shape, self.init, self.seed = param.name, param.type.shape, param.init, seed
        self.seeds = seeds

    def __call__(self) -> np.ndarray:
        return draw(self.name, self.shape, self.init, self.seed, self.seeds)

    def pieces(self) -> list:
        """The tensor's chunks (see :func:`pieces`)."""
        return pieces(self.name, self.shape, self.init, self.seed, self.seeds)


def initialize(graph: Graph, seed: int = 0) -> Calibration | None:
    """Give every parameter without data its seeded initial value, computed when first
    needed; returns the batch-norm calibration, if the graph has random statistics.

    Batch-norm running statistics are measured on a seeded random batch, as training
    would leave them, so that activations keep their scale through deep networks; that
    too happens only when a statistic is first needed (a dump or a summary never
    draws a weight nor runs the network). See :class:`Calibration` for its bounds.
    """
    random_stats = [
        node
        for node in graph.nodes
        if node.op == "bn" and not any(v.has_data for v in node.inputs[3:5])
    ]
    calibration = Calibration(graph, random_stats, seed) if random_stats else None
    statistics = {id(v) for n in random_stats for v in n.inputs[3:5]}
    todo = [p for p in graph.params.values() if not p.has_data and id(p) not in statistics]
    seeds = _Seeds(seed, [p.name for p in todo])
    for param in todo:
        param.set_data(_Initial(param, seed, seeds))
    return calibration


CALIBRATION_BATCH = 4
# Calibration stays within these bounds (multiply-accumulates of the whole batch, and the
# bytes of the activations alive at once): past them it takes fewer items, then smaller
# maps, and past those the statistics keep PyTorch's defaults.
CALIBRATION_MAX_MACS = 4_000_000_000
CALIBRATION_MAX_BYTES = 64_000_000


class _Spec:
    """One node upstream of the bns, as it was when the weights were initialised (passes
    rewrite the graph, fold the bns and rescale weights before the statistics are asked
    for)."""

    __slots__ = ("attrs", "inputs", "loc", "name", "op", "outputs")

    def __init__(self, node, inputs: list, outputs: list):
        self.op, self.name, self.loc = node.op, node.name, node.loc
        self.attrs = dict(node.attrs)
        self.inputs, self.outputs = inputs, outputs


class Calibration:
    """The batch-norm running statistics of a network with random weights, measured when
    first needed on the network's layers as they were declared.

    The rule: only the subgraph upstream of the bns runs, on a seeded standard-normal
    batch of ``CALIBRATION_BATCH`` items at the declared size. Past
    ``CALIBRATION_MAX_MACS`` multiply-accumulates or ``CALIBRATION_MAX_BYTES`` of live
    activations it takes 2 items, then 1, then maps shrunk evenly on every spatial axis
    until the run fits (the declared size first, since statistics measured on small
    maps are off: ResNet-18's at 64×64 leave its outputs 6 times too large); if no
    size that every layer upstream accepts fits (a reshape or an fc over a flattened
    map fixes its input's size), the statistics stay at PyTorch's initial mean 0 and
    variance 1, and :meth:`note` says so.
    """

    def __init__(self, graph: Graph, bns: list, seed: int):
        self.seed = seed
        self.graph_name = graph.name
        wanted = {id(n) for n in bns}
        # The nodes the bns depend on, in the graph's (topological) order.
        needed: set[int] = set()
        stack = list(bns)
        while stack:
            node = stack.pop()
            if id(node) in needed:
                continue
            needed.add(id(node))
            stack.extend(v.producer for v in node.inputs if v.producer is not None)
        # Values are numbered: inputs first, then the parameters and outputs as they come.
        number: dict[int, int] = {}
        self.values: list[tuple[str, object, object]] = []  # (kind, type, source)
        self.inputs = []
        for v in graph.inputs:
            number[id(v)] = len(self.values)
            self.inputs.append(len(self.values))
            self.values.append(("input", v.type, v.name))
        self.specs: list[_Spec] = []
        self.bns: list[int] = []  # indices into specs
        self.stat_index: dict[int, tuple[int, int]] = {}  # id(statistic) -> (bn, 0 | 1)
        for node in graph.nodes:
            if id(node) not in needed:
                continue
            inputs = []
            for i, v in enumerate(node.inputs):
                if id(v) not in number:
                    number[id(v)] = len(self.values)
                    if id(node) in wanted and i in (3, 4):
                        source = None  # measured here
                    else:
                        source = v._data if v._data is not None else v._thunk
                        if source is None:
                            source = _Initial(v, seed)
                    self.values.append(("param", v.type, (v.name, source)))
                inputs.append(number[id(v)])
            outputs = []
            for v in node.outputs:
                number[id(v)] = len(self.values)
                outputs.append(len(self.values))
                self.values.append(("node", v.type, v.name))
            if id(node) in wanted:
                for k, stat in enumerate(node.inputs[3:5]):
                    self.stat_index[id(stat)] = (len(self.bns), k)
                self.bns.append(len(self.specs))
            self.specs.append(_Spec(node, inputs, outputs))
        self._plan: tuple | None = None
        self._stats: list[tuple[np.ndarray, np.ndarray]] | None = None
        self.runs = 0  # how many times the network ran (tests check it never runs twice)
        for node in bns:
            for stat in node.inputs[3:5]:
                stat.set_data(lambda s=stat: self.statistic(s))

    # ---- the plan: at which size and batch --------------------------------------------

    def _build(self, factor: float | None = None) -> Graph:
        """The upstream subgraph as a graph of its own, its inputs' spatial sizes scaled by
        ``factor`` (None: as declared); raises CnncError if a layer refuses those sizes."""
        from cnnc.errors import ShapeError

        g = Graph(f"{self.graph_name}.calibration")
        made: list = [None] * len(self.values)
        for i in self.inputs:
            _, t, name = self.values[i]
            shape = t.shape
            if factor is not None:
                shape = (*shape[:2], *(max(1, int(d * factor)) for d in shape[2:]))
            made[i] = g.add_input(name, t.with_shape(shape))
        for spec in self.specs:
            args = []
            for i in spec.inputs:
                if made[i] is None:
                    _, t, (name, source) = self.values[i]
                    p = g.add_param(name, t.shape, dtype=t.dtype)
                    if source is not None:
                        p.set_data(source if callable(source) else (lambda d=source: d))
                    made[i] = p
                args.append(made[i])
            node = g.add_node(spec.op, args, spec.attrs, name=spec.name, loc=spec.loc)
            if factor is not None and get_op(spec.op).fixed_size(node) is not None:
                raise ShapeError(f"{spec.name} works only at its declared size")
            for i, out in zip(spec.outputs, node.outputs, strict=True):
                made[i] = out
        g.outputs = [made[self.specs[b].outputs[0]] for b in self.bns[-1:]]
        return g

    @staticmethod
    def _cost(g: Graph, batch: int) -> tuple[int, int]:
        """Multiply-accumulates of a batch, and the most bytes of activations alive at once."""
        # The products of the weighted layers, as the budget was set (the summary's MACs
        # also count bn, pooling, ...: counting them here would calibrate some seeded
        # models on smaller maps, and change their statistics).
        macs = batch * sum(get_op(n.op).macs(n) for n in g.nodes if n.op in _PRODUCTS)
        last_use = {id(v): i for i, n in enumerate(g.nodes) for v in n.activations}
        size = {id(v): batch * v.type.numel_per_item() * 4 for v in g.inputs}
        alive = sum(size.values())
        peak = alive
        for i, node in enumerate(g.nodes):
            for out in node.outputs:
                size[id(out)] = batch * out.type.numel_per_item() * out.type.numpy_dtype.itemsize
                alive += size[id(out)]
            peak = max(peak, alive)
            for v in {id(v): v for v in node.activations}.values():
                if last_use[id(v)] == i:
                    alive -= size.pop(id(v), 0)
        return macs, peak

    def plan(self) -> tuple[Graph, int, str] | None:
        """The subgraph to run, its batch, and what it is (None: too costly, defaults)."""
        if self._plan is None:
            self._plan = (self._choose(),)
        return self._plan[0]

    def _choose(self) -> tuple[Graph, int, str] | None:
        from cnnc.errors import CnncError

        graph = self._build()
        batch = CALIBRATION_BATCH
        macs, peak = self._cost(graph, batch)
        while batch > 1 and (macs > CALIBRATION_MAX_MACS or peak > CALIBRATION_MAX_BYTES):
            batch //= 2
            macs, peak = self._cost(graph, batch)
        # Then smaller maps: the cost of most layers follows the number of positions.
        rank = max((len(v.type.shape) - 2 for v in graph.inputs), default=0)
        factor = 1.0
        for _ in range(40):
            over = max(macs / CALIBRATION_MAX_MACS, peak / CALIBRATION_MAX_BYTES)
            if over <= 1:
                return graph, batch, self._describe(graph, batch)
            if rank == 0:
                return None
            factor *= min(0.97, over ** (-1 / rank))
            try:
                graph = self._build(factor)
            except CnncError:
                return None
            macs, peak = self._cost(graph, batch)
        return None

    @staticmethod
    def _describe(g: Graph, batch: int) -> str:
        sizes = ", ".join("x".join(str(d) for d in v.type.shape[1:]) for v in g.inputs)
        item = "item" if batch == 1 else "items"
        return f"a seeded random batch of {batch} {item} of {sizes}"

    def note(self) -> str:
        """How the statistics are (or will be) measured, for the command's notice."""
        plan = self.plan()
        if plan is None:
            return (
                "batch-norm statistics are PyTorch's initial mean 0 and variance 1: measuring "
                f"them would pass {CALIBRATION_MAX_MACS / 1e9:g} GMAC or "
                f"{CALIBRATION_MAX_BYTES / 1e6:g} MB even for one small item"
            )
        return f"batch-norm statistics measured on {plan[2]}"

    # ---- the statistics ---------------------------------------------------------------

    def statistic(self, stat: Value) -> np.ndarray:
        """The running mean or variance ``stat`` (measuring every bn's on first use)."""
        bn, k = self.stat_index[id(stat)]
        if self._stats is None:
            self._stats = self._measure()
        return self._stats[bn][k]

    def _measure(self) -> list[tuple[np.ndarray, np.ndarray]]:
        plan = self.plan()
        if plan is None:
            return [
                (np.zeros(shape, np.float32), np.ones(shape, np.float32))
                for shape in (self.values[self.specs[b].inputs[3]][1].shape for b in self.bns)
            ]
        graph, batch, _ = plan
        self.runs += 1
        stats = _calibrate(graph, batch, self.seed)
        # The subgraph's copies of the weights go; what was measured stays for note().
        self._plan = ((None, batch, plan[2]),)
        return stats


def _calibrate(graph: Graph, batch: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Run ``graph`` (the upstream subgraph) on a seeded random batch, in order, setting each
    bn's running mean and variance to those of its input, so that every bn normalises
    what reaches it; returns them in order."""
    from cnnc.backends.kernels import KERNELS

    env = {
        id(x): _rng(seed, f"calibration.{i}" if i else "calibration").standard_normal(
            (batch, *x.type.shape[1:]), dtype=np.float32
        )
        for i, x in enumerate(graph.inputs)
    }
    last_use = {id(v): i for i, n in enumerate(graph.nodes) for v in n.activations}
    todo = [n for n in graph.nodes if n.op == "bn" and not n.inputs[3].has_data]
    stats = []
    for i, node in enumerate(graph.nodes):
        inputs = [env[id(v)] for v in node.activations]
        if todo and node is todo[0]:
            axes = (0, *range(2, inputs[0].ndim))
            mean = inputs[0].mean(axis=axes, dtype=np.float64).astype(np.float32)
            var = inputs[0].var(axis=axes, dtype=np.float64).astype(np.float32)
            node.inputs[3].set_data(mean)
            node.inputs[4].set_data(var)
            stats.append((mean, var))
            todo.pop(0)
            if not todo:
                return stats
        results = KERNELS[node.op](node)(*inputs)
        for value, result in zip(
            node.outputs, results if len(node.outputs) > 1 else [results], strict=True
        ):
            env[id(value)] = result
        for v in node.activations:
            if last_use[id(v)] == i:
                env.pop(id(v), None)
    return stats


def _shape(shape: tuple) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def load(graph: Graph, path: str | Path, allow_nonfinite: bool = False) -> None:
    """Load every parameter from a ``.npz`` file of tensors named as the graph names them.

    The file must hold exactly the graph's parameters with exactly their shapes, and
    (unless ``allow_nonfinite``) no NaN or infinity once in float32; anything else is
    one WeightsError that lists every problem.
    """
    path = Path(path)
    hint = "save weights with numpy.savez(path, **tensors)"
    archive = open_array_file(path, WeightsError, "weights file", hint)
    if not isinstance(archive, NpzArchive):
        raise WeightsError(
            "weights file holds a single array, not named tensors", str(path), hint=hint
        )
    with archive:
        found = {n for n in archive.names if not n.endswith(IGNORED_SUFFIXES)}
        expected = graph.params
        problems = []
        for name in sorted(set(expected) - found):
            problems.append(f"missing {name} {_shape(expected[name].shape)}")
        for name in sorted(found - set(expected)):
            problems.append(f"unexpected {name} (the network has no such parameter)")
        tensors = {}
        nonfinite = False
        for name in sorted(found & set(expected)):
            try:
                # The header first: a tensor of the wrong shape is never read.
                shape, dtype = archive.header(name)
                want = expected[name].shape
                if shape != want:
                    problems.append(f"{name} has shape {_shape(shape)}, expected {_shape(want)}")
                elif dtype.kind != "f":
                    problems.append(f"{name} has dtype {dtype}, expected floating point")
                else:
                    # A float64 beyond float32's range becomes infinite here, as it would
                    # in the network: it is counted below.
                    with np.errstate(over="ignore"):
                        array = archive.read(name).astype(np.float32, copy=False)
                    bad = nonfinite_count(array)
                    if bad and not allow_nonfinite:
                        nonfinite = True
                        problems.append(_nonfinite(name, bad) + " (in float32)")
                    else:
                        tensors[name] = array
            except ArrayFileError as e:
                problems.append(str(e))
            except MemoryError:
                raise WeightsError(f"out of memory while reading {name}", str(path)) from None
    if problems:
        raise WeightsError(
            f"weights do not fit network {graph.name}:\n  " + "\n  ".join(problems),
            str(path),
            hint="tensor names follow <layer>.weight and <layer>.bias; "
            "`cnnc summary PROGRAM --tensors` lists every name with its shape"
            + ("; --allow-nonfinite accepts NaN and infinity" if nonfinite else ""),
        )
    for name, array in tensors.items():
        graph.params[name].set_data(array)


def _nonfinite(name: str, count: int) -> str:
    return f"{name} holds {count:,} NaN or infinite value{'s' if count > 1 else ''}"


def check_finite(graph: Graph, where: str) -> None:
    """Raise WeightsError naming every parameter of ``graph`` that holds NaN or infinity
    (for a model whose weights came with it, as an ONNX model's do)."""
    problems = []
    for name, param in graph.params.items():
        if param.has_data and (bad := nonfinite_count(param.data)):
            problems.append(_nonfinite(name, bad))
    if problems:
        raise WeightsError(
            "the model's weights are not all finite:\n  " + "\n  ".join(problems),
            where,
            hint="pass --allow-nonfinite (allow_nonfinite=True) to run it all the same",
        )


def initial_weights(graph: Graph, seed: int) -> dict[str, np.ndarray]:
    """Seeded initial tensors for training ``graph`` (a lowered graph): PyTorch's for
    normalization layers (scales 1, shifts 0, running mean 0 and variance 1) and cnnc's
    seeded rules for the rest (He-normal weights, PyTorch's uniform biases)."""
    stats = {}
    for node in graph.nodes:
        if node.op == "bn":
            stats[node.inputs[3].name] = 0.0  # running mean
            stats[node.inputs[4].name] = 1.0  # running variance
    out = {}
    for name, p in graph.params.items():
        kind = (p.init or ("he_normal", 1))[0]
        if name in stats:
            out[name] = np.full(p.shape, stats[name], np.float32)
        elif kind == "bn_scale":
            out[name] = np.ones(p.shape, np.float32)
        elif kind == "bn_shift":
            out[name] = np.zeros(p.shape, np.float32)
        else:
            out[name] = initial_value(p, seed)
    return out
