"""cnnc's gradients of the non-spatial ops against PyTorch's autograd, in float64.

Not a test (torch is never a dependency): run it where torch is installed,

    PYTHONPATH=. python tests/torch_gradients.py

It prints, for each network, the largest difference between cnnc's gradient graph run in
the interpreter and torch's backward of the same mean squared error (every parameter and
the input); then the running statistics of one training step against torch.nn.BatchNorm
after one forward pass in training mode; then the activations' derivatives at random
points and at their kinks against torch's.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnnc import weights
from cnnc.backends.interpreter import Interpreter
from cnnc.backends.train_kernels import _derivative
from cnnc.frontend.lower import lower
from cnnc.frontend.parser import parse
from cnnc.train.step import Optimizer, build_step, gradient_graph

torch.set_default_dtype(torch.float64)


def _forward(source: str):
    forward = lower(parse(source), None)
    weights.initialize(forward, 0)
    return forward


def _sized(v, batch: int) -> tuple:
    return tuple(batch if not isinstance(d, int) else d for d in v.shape)


def cnnc_gradients(source: str, batch: int, training: bool):
    forward = _forward(source)
    gg = gradient_graph(forward, dtype="f64", training=training)
    rng = np.random.default_rng(0)
    feeds = {
        v.name: forward.params[v.name].data.astype(np.float64)
        if v.name in forward.params
        else rng.standard_normal(_sized(v, batch))
        for v in gg.graph.inputs
    }
    outs = Interpreter(gg.graph, threads=1).run(*[feeds[v.name] for v in gg.graph.inputs])
    result = dict(zip([v.name for v in gg.graph.outputs], outs, strict=True))
    return feeds, {k: result[n] for k, n in gg.gradients.items()}, float(result["loss"])


def compare(source: str, batch: int, module: nn.Module, names: dict, training=True) -> float:
    """The largest difference of loss and gradients; ``names`` maps torch's parameter and
    buffer names to cnnc's."""
    feeds, grads, loss = cnnc_gradients(source, batch, training)
    state = dict(module.named_parameters()) | dict(module.named_buffers())
    with torch.no_grad():
        for theirs, ours in names.items():
            state[theirs].copy_(torch.tensor(feeds[ours]).reshape(state[theirs].shape))
    module.train(training)
    module.zero_grad(set_to_none=True)
    x = torch.tensor(feeds["x"], requires_grad=True)
    torch_loss = ((module(x) - torch.tensor(feeds["targets"])) ** 2).mean()
    torch_loss.backward()
    worst = abs(torch_loss.item() - loss)
    for theirs, ours in names.items():
        p = state[theirs]
        if isinstance(p, nn.Parameter):
            worst = max(
                worst, np.abs(p.grad.numpy().reshape(grads[ours].shape) - grads[ours]).max()
            )
    return max(worst, np.abs(x.grad.numpy() - grads["x"]).max())


def _names(layer: str, *suffixes: str) -> dict[str, str]:
    return {s: f"{layer}.{s}" for s in suffixes}


BN = ("weight", "bias", "running_mean", "running_var")
NETWORKS = [
    ("network n(x: 3x4x5) { b: bn }", nn.BatchNorm2d(3), _names("b", *BN), True),
    ("network n(x: 3x7) { b: bn }", nn.BatchNorm1d(3), _names("b", *BN), True),
    ("network n(x: 3x4x5) { b: bn }", nn.BatchNorm2d(3), _names("b", *BN), False),
    ("network n(x: 3x4x5) { p: prelu(3) }", nn.PReLU(3), _names("p", "weight"), True),
    ("network n(x: 3x4x5) { p: prelu }", nn.PReLU(1), _names("p", "weight"), True),
    (
        "network n(x: 6x4x5) { g: groupnorm(3) }",
        nn.GroupNorm(3, 6),
        _names("g", "weight", "bias"),
        True,
    ),
    (
        "network n(x: 6x4x5) { g: groupnorm(3, eps=0.1) }",
        nn.GroupNorm(3, 6, eps=0.1),
        _names("g", "weight", "bias"),
        True,
    ),
    (
        "network n(x: 6x4x5) { l: layernorm(axis=-1) }",
        nn.LayerNorm(5),
        _names("l", "weight", "bias"),
        True,
    ),
    (
        "network n(x: 6x4x5) { l: linear(3, axis=-1) }",
        nn.Linear(5, 3),
        _names("l", "weight", "bias"),
        True,
    ),
    (
        "network n(x: 6x4x5) { lrn(5, alpha=0.5, beta=0.75, k=2) }",
        nn.LocalResponseNorm(5, 0.5, 0.75, 2.0),
        {},
        True,
    ),
    (
        "network n(x: 6x9) { lrn(3, alpha=0.5, beta=0.75, k=2) }",
        nn.LocalResponseNorm(3, 0.5, 0.75, 2.0),
        {},
        True,
    ),
    ("network n(x: 6x4x5) { softmax(2) }", nn.Softmax(2), {}, True),
]


def running_statistics(source: str, module: nn.Module, batch: int) -> tuple[float, float]:
    """One SGD step (learning rate 0) of cnnc in float32, and torch's BatchNorm after one
    forward pass in training mode: the largest differences of the running mean and var."""
    forward = _forward(source)
    step = build_step(forward, loss="mse", optimizer=Optimizer("sgd"))
    rng = np.random.default_rng(1)
    feeds = {}
    for v in step.graph.inputs:
        if v.name in forward.params:
            feeds[v.name] = forward.params[v.name].data
        elif v.name == "lr":
            feeds[v.name] = np.array(0.0, np.float32)
        else:
            feeds[v.name] = rng.standard_normal(_sized(v, batch)).astype(np.float32)
    outs = Interpreter(step.graph, threads=1).run(*[feeds[v.name] for v in step.graph.inputs])
    result = dict(zip([v.name for v in step.graph.outputs], outs, strict=True))
    with torch.no_grad():
        module.running_mean.copy_(torch.tensor(feeds["b.running_mean"], dtype=torch.float64))
        module.running_var.copy_(torch.tensor(feeds["b.running_var"], dtype=torch.float64))
    module.train()
    module(torch.tensor(feeds["x"], dtype=torch.float64))
    mean = np.abs(result["b.running_mean.new"] - module.running_mean.numpy()).max()
    var = np.abs(result["b.running_var.new"] - module.running_var.numpy()).max()
    return mean, var


ACTIVATIONS = [
    ("relu", {}, F.relu),
    ("leaky_relu", {"alpha": 0.2}, lambda t: F.leaky_relu(t, 0.2)),
    ("clip", {"min": 0.0, "max": 6.0}, F.relu6),
    ("clip", {"min": -0.5, "max": 1.5}, lambda t: torch.clamp(t, -0.5, 1.5)),
    ("clip", {"min": -1.0, "max": 1.0}, F.hardtanh),
    ("sigmoid", {}, torch.sigmoid),
    ("tanh", {}, torch.tanh),
    ("silu", {}, F.silu),
    ("hardsigmoid", {"alpha": 1 / 6, "beta": 0.5}, F.hardsigmoid),
    ("hardswish", {}, F.hardswish),
    ("gelu", {"approximate": "none"}, F.gelu),
    ("gelu", {"approximate": "tanh"}, lambda t: F.gelu(t, approximate="tanh")),
    ("mish", {}, F.mish),
    ("elu", {"alpha": 0.7}, lambda t: F.elu(t, 0.7)),
    ("softplus", {"beta": 1.0}, F.softplus),
    ("softplus", {"beta": 2.0}, lambda t: F.softplus(t, 2.0)),
]
KINKS = [0.0, -3.0, 3.0, 6.0, -1.0, 1.0, -0.5, 1.5, 20.0, 25.0]


def main() -> None:
    for source, module, names, training in NETWORKS:
        for batch in (1, 3):
            worst = compare(source, batch, module, names, training)
            mode = "" if training else " (inference mode)"
            print(f"{source}{mode}, batch {batch}: largest difference {worst:.1e}")
    for source, module in [
        ("network n(x: 3x4x5) { b: bn }", nn.BatchNorm2d(3)),
        ("network n(x: 3x7) { b: bn }", nn.BatchNorm1d(3)),
    ]:
        for batch in (1, 4):
            mean, var = running_statistics(source, module, batch)
            print(f"{source}, batch {batch}: running mean {mean:.1e}, running var {var:.1e}")
    points = np.concatenate([np.random.default_rng(0).standard_normal(1000) * 4, KINKS])
    for op, attrs, f in ACTIVATIONS:
        t = torch.tensor(points, requires_grad=True)
        f(t).sum().backward()
        theirs, ours = t.grad.numpy(), _derivative(op, attrs)(points.copy())
        worst = np.argmax(np.abs(ours - theirs))
        print(
            f"{op} {attrs}: largest difference {abs(ours - theirs)[worst]:.1e} "
            f"(at x = {points[worst]:.4g})"
        )


if __name__ == "__main__":
    main()
