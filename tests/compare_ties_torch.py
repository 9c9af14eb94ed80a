"""The gradients of maxpool, global_maxpool and adaptive_maxpool on inputs with tied maxima
(constant maps, maps of 0s and 1s, of 0s, 1s and 2s): cnnc's interpreter against PyTorch.
Not part of the suite (it needs torch, which is never a dependency); run it from the
repository with a Python that has torch:

    python tests/compare_ties_torch.py

Prints the largest difference of each case."""

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cnnc.backends.interpreter import Interpreter
from tests.test_gradients_spatial import backward_graph

cases = [
    ("t(x: 2x6x6) { maxpool(2) }", lambda x: F.max_pool2d(x, 2)),
    ("t(x: 2x6x6) { maxpool(3, stride=1, pad=1) }", lambda x: F.max_pool2d(x, 3, 1, 1)),
    (
        "t(x: 2x7x7) { maxpool(3, stride=2, pad=1, ceil=true) }",
        lambda x: F.max_pool2d(x, 3, 2, 1, ceil_mode=True),
    ),
    (
        "t(x: 2x7x7) { maxpool(2, stride=1, dilation=2) }",
        lambda x: F.max_pool2d(x, 2, 1, 0, dilation=2),
    ),
    ("t(x: 2x8x8) { maxpool(2, stride=3) }", lambda x: F.max_pool2d(x, 2, 3)),
    (
        "t(x: 2x9) { maxpool(3, stride=2, pad=1, ceil=true) }",
        lambda x: F.max_pool1d(x, 3, 2, 1, ceil_mode=True),
    ),
    ("t(x: 2x5x6) { global_maxpool }", lambda x: F.adaptive_max_pool2d(x, 1)),
    ("t(x: 2x7) { global_maxpool }", lambda x: F.adaptive_max_pool1d(x, 1)),
    ("t(x: 2x7x5) { adaptive_maxpool((3, 4)) }", lambda x: F.adaptive_max_pool2d(x, (3, 4))),
    ("t(x: 2x3x4) { adaptive_maxpool((5, 6)) }", lambda x: F.adaptive_max_pool2d(x, (5, 6))),
    ("t(x: 2x10) { adaptive_maxpool(4) }", lambda x: F.adaptive_max_pool1d(x, 4)),
]
rng = np.random.default_rng(0)
for body, fn in cases:
    graph = backward_graph(body)
    shape = (3, *graph.inputs[0].shape[1:])
    for kind in ("constant", "0/1", "0/1/2"):
        if kind == "constant":
            x = np.full(shape, 0.25, np.float32)
        else:
            x = rng.integers(0, 2 if kind == "0/1" else 3, shape).astype(np.float32)
        dy = rng.standard_normal((3, *graph.inputs[1].shape[1:])).astype(np.float32)
        (ours,) = Interpreter(graph, threads=1).run(x, dy)
        xt = torch.tensor(x, requires_grad=True)
        fn(xt).backward(torch.tensor(dy))
        diff = np.abs(ours - xt.grad.numpy()).max()
        print(f"{body:55s} {kind:9s} max |cnnc - torch| = {diff:.3g}")
