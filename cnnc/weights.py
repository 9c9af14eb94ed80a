"""Parameter tensors: seeded initialisation, and loading and checking a weights file (.npz)."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from cnnc.errors import WeightsError
from cnnc.ir.graph import Graph, Value
from cnnc.npyfile import ArrayFileError, NpzArchive, nonfinite_count, open_array_file

# PyTorch keeps these counters in BatchNorm state_dicts; inference never reads them.
IGNORED_SUFFIXES = (".num_batches_tracked",)


def _rng(seed: int, name: str) -> np.random.Generator:
    # Seeding per tensor name keeps each tensor's values stable when layers are added elsewhere.
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def initial_value(param: Value, seed: int) -> np.ndarray:
    """A parameter's seeded initial tensor, following its ``init`` rule.

    ``he_normal``: N(0, 2 / fan_in), He et al. 2015, for weights before a ReLU.
    ``uniform``: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's bias default.
    ``bn_scale``: U(0.5, 1.5) and ``bn_shift``: N(0, 0.1²), for batch-norm scales and
    shifts (and statistics, until :func:`initialize` measures them): trained values
    are never the identity either.
    ``constant``: every value the rule's second item (PReLU's slopes start at 0.25).
    """
    kind, fan_in = param.init or ("he_normal", 1)
    rng = _rng(seed, param.name)
    shape = param.type.shape
    if kind == "he_normal":
        values = rng.standard_normal(shape, dtype=np.float32)
        values *= np.float32(np.sqrt(2.0 / fan_in))  # in place: no second copy of a big tensor
        return values
    if kind == "uniform":
        bound = 1.0 / np.sqrt(fan_in)
        return rng.uniform(-bound, bound, shape).astype(np.float32)
    if kind == "bn_scale":
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    if kind == "constant":
        return np.full(shape, fan_in, np.float32)
    if kind == "bn_shift":
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)
    raise AssertionError(f"init rule {kind}")


def initialize(graph: Graph, seed: int = 0) -> None:
    """Give every parameter without data its seeded initial value (computed lazily).

    Batch-norm statistics are then measured on a seeded random batch, as training
    would leave them, so that activations keep their scale through deep networks.
    """
    random_stats = [
        node
        for node in graph.nodes
        if node.op == "bn" and not any(v.has_data for v in node.inputs[3:5])
    ]
    for param in graph.params.values():
        if not param.has_data:
            param.set_data(lambda p=param: initial_value(p, seed))
    if random_stats:
        _calibrate(graph, random_stats, seed)


CALIBRATION_BATCH = 4


def _calibrate(graph: Graph, bns: list, seed: int) -> None:
    """Set each bn's running mean and variance to those of its input on a seeded random
    batch, in order, so that every bn normalises what reaches it."""
    from cnnc.backends.kernels import KERNELS

    env = {
        id(x): _rng(seed, f"calibration.{i}" if i else "calibration").standard_normal(
            (CALIBRATION_BATCH, *x.type.shape[1:]), dtype=np.float32
        )
        for i, x in enumerate(graph.inputs)
    }
    last_use = {id(v): i for i, n in enumerate(graph.nodes) for v in n.activations}
    todo = {id(n) for n in bns}
    for i, node in enumerate(graph.nodes):
        inputs = [env[id(v)] for v in node.activations]
        if id(node) in todo:
            axes = (0, *range(2, inputs[0].ndim))
            node.inputs[3].set_data(inputs[0].mean(axis=axes, dtype=np.float64).astype(np.float32))
            node.inputs[4].set_data(inputs[0].var(axis=axes, dtype=np.float64).astype(np.float32))
            todo.discard(id(node))
            if not todo:
                return
        results = KERNELS[node.op](node)(*inputs)
        for value, result in zip(
            node.outputs, results if len(node.outputs) > 1 else [results], strict=True
        ):
            env[id(value)] = result
        for v in node.activations:
            if last_use[id(v)] == i:
                env.pop(id(v), None)


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
                        problems.append(
                            f"{name} holds {bad:,} NaN or infinite value{'s' if bad > 1 else ''}"
                            " (in float32)"
                        )
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


def check_finite(graph: Graph, where: str) -> None:
    """Raise WeightsError naming every parameter of ``graph`` that holds NaN or infinity
    (for a model whose weights came with it, as an ONNX model's do)."""
    problems = []
    for name, param in graph.params.items():
        if param.has_data and (bad := nonfinite_count(param.data)):
            problems.append(f"{name} holds {bad:,} NaN or infinite value{'s' if bad > 1 else ''}")
    if problems:
        raise WeightsError(
            "the model's weights are not all finite:\n  " + "\n  ".join(problems),
            where,
            hint="pass --allow-nonfinite (allow_nonfinite=True) to run it all the same",
        )
