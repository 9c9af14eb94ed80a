"""Finite-difference checks of the gradient rules (cnnc/train/rules.py).

:func:`check` builds a network's gradient graph (the mean squared error of its output
against a random target, in training mode), runs it in the interpreter, and compares
sampled entries of every gradient, with respect to every parameter and every input, with
central differences of the same graph's loss: (L(x + h) − L(x − h)) / 2h, in float64.
"""

from __future__ import annotations

import numpy as np

from cnnc import weights
from cnnc.backends.interpreter import Interpreter
from cnnc.frontend.lower import lower
from cnnc.frontend.parser import parse
from cnnc.ir.graph import Graph
from cnnc.train.step import gradient_graph


class GradientMismatch(AssertionError):
    pass


def check(
    source: str | Graph,
    *,
    batch: int = 2,
    seed: int = 0,
    dtype: str = "f64",
    samples: int = 8,
    h: float = 1e-6,
    rtol: float = 1e-5,
    atol: float = 1e-9,
    spread: float = 1.0,
    training: bool = True,
) -> int:
    """Check the gradients of the network ``source`` (a program, or a graph an IR test
    builds); returns the number of entries compared, and raises GradientMismatch naming the
    first that differs. The network's inputs are standard normal times ``spread``; without
    ``training`` the network runs in inference mode (bn with its running statistics)."""
    forward = source if isinstance(source, Graph) else lower(parse(source), None)
    weights.initialize(forward, seed)
    gg = gradient_graph(forward, dtype=dtype, training=training)
    graph = gg.graph
    np_dtype = np.float64 if dtype == "f64" else np.float32
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for v in graph.inputs:
        shape = tuple(batch if not isinstance(d, int) else d for d in v.shape)
        if v.name in forward.params:
            feeds[v.name] = forward.params[v.name].data.astype(np_dtype)
        elif any(m.name == v.name for m in gg.masks):
            mask = next(m for m in gg.masks if m.name == v.name)
            keep = rng.random(shape) >= mask.p
            scale = 1.0 / (1 - mask.p) if mask.p < 1 else 0.0  # a drop_path of p = 1: zeros
            feeds[v.name] = (keep * scale).astype(np_dtype)
        elif v.name in gg.data:
            feeds[v.name] = (spread * rng.standard_normal(shape)).astype(np_dtype)
        else:
            feeds[v.name] = rng.standard_normal(shape).astype(np_dtype)
    interp = Interpreter(graph, threads=1)
    order = [v.name for v in graph.inputs]

    def run(values: dict[str, np.ndarray]) -> list[np.ndarray]:
        return interp.run(*[values[n] for n in order])

    outs = run(feeds)
    out_names = [v.name for v in graph.outputs]
    result = dict(zip(out_names, outs, strict=True))

    def loss_at(name: str, index: tuple, delta: float) -> float:
        moved = dict(feeds)
        moved[name] = feeds[name].copy()
        moved[name][index] += delta
        return float(run(moved)[0])

    checked = 0
    for name, grad_name in gg.gradients.items():
        analytic = result[grad_name]
        x = feeds[name]
        if analytic.shape != x.shape:
            raise GradientMismatch(f"gradient of {name}: shape {analytic.shape}, not {x.shape}")
        flat = rng.permutation(x.size)[:samples]
        for f in flat:
            index = np.unravel_index(f, x.shape)
            numeric = (loss_at(name, index, h) - loss_at(name, index, -h)) / (2 * h)
            a = float(analytic[index])
            if abs(a - numeric) > atol + rtol * max(abs(a), abs(numeric)):
                raise GradientMismatch(
                    f"d loss / d {name}{list(index)}: rule {a:.10g}, central difference "
                    f"{numeric:.10g}"
                )
            checked += 1
    return checked
