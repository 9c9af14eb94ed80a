"""When two float32 results are the same: the one criterion of --compare, bench, --verify-each.

Element-wise, ``|actual - expected| <= RTOL·|expected| + ATOL + RTOL·max|expected|``.
The last term scales the absolute tolerance with the tensor's magnitude: a value
near zero that is the sum of many large products (a logit of a 50-layer network,
say) carries float32 rounding proportional to those products, not to itself.
Measured on ResNet-50 against a float64 run, onnxruntime's own outputs are off by
1.3e-5 of their largest magnitude, more than a fixed 1e-5 allows for logits of 5.

NaN and the infinities are values like any other: two results agree when they hold NaN
at the same positions and +inf and -inf at the same positions, and their finite values
agree as above (max|expected| over the finite values). Where the backends' NaN and inf
differ, :func:`first_divergence` finds the first node whose values differ, and
:data:`NONFINITE_DIFFERENCES` says whether the two engines differ there by design (op
semantics, README's "NaN and infinity") rather than by a bug.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from cnnc.ir.graph import Graph, Node

RTOL = 1e-4
ATOL = 1e-5
DESCRIPTION = f"rtol {RTOL:g}, atol {ATOL:g} + {RTOL:g}·max|y|"
# Inside a network a batch-norm of a low-variance channel amplifies float32 rounding
# (measured on ResNet-50 against float64: 9e-5 of a value's magnitude for us, 6e-5 for
# onnxruntime), so intermediate values agree within 1e-3 of their magnitude.
INTERMEDIATE_RTOL = 1e-3


def _largest_finite(x: np.ndarray) -> float:
    with np.errstate(over="ignore", invalid="ignore"):
        largest = float(np.abs(x).max(initial=0))
    if np.isfinite(largest):
        return largest
    return float(np.abs(x[np.isfinite(x)]).max(initial=0))


def tolerance(expected: np.ndarray, relative: float = RTOL) -> float:
    """The absolute tolerance for a tensor: ATOL plus RTOL of its largest finite magnitude."""
    return ATOL + relative * _largest_finite(expected)


def same_nonfinite(actual: np.ndarray, expected: np.ndarray) -> bool:
    """Whether NaN, +inf and -inf sit at the same positions in both (same shapes)."""
    return bool(
        np.array_equal(np.isnan(actual), np.isnan(expected))
        and np.array_equal(np.isposinf(actual), np.isposinf(expected))
        and np.array_equal(np.isneginf(actual), np.isneginf(expected))
    )


def agree(actual: np.ndarray, expected: np.ndarray, relative: float = RTOL) -> bool:
    """Whether two results are the same: the same size, NaN and ±inf at the same places,
    and the finite values within the tolerance (``relative`` of the largest)."""
    if actual.size != expected.size:
        return False
    actual = actual.reshape(expected.shape)
    if not same_nonfinite(actual, expected):
        return False
    finite = np.isfinite(expected)
    if finite.all():
        a, b = actual, expected
    else:
        a, b = actual[finite], expected[finite]
    return bool(np.allclose(a, b, rtol=RTOL, atol=tolerance(b, relative)))


def max_difference(actual: np.ndarray, expected: np.ndarray) -> float:
    """The largest element-wise difference where both values are finite (infinite if the
    sizes differ)."""
    if actual.size != expected.size:
        return float("inf")
    actual = actual.reshape(expected.shape)
    both = np.isfinite(actual) & np.isfinite(expected)
    if not both.any():
        return 0.0
    return float(np.max(np.abs(actual[both].astype(np.float64) - expected[both])))


def nonfinite_counts(*arrays: np.ndarray) -> tuple[int, int]:
    """How many NaN, and how many ±inf, the arrays hold together."""
    nan = sum(int(np.isnan(a).sum()) for a in arrays)
    inf = sum(int(np.isinf(a).sum()) for a in arrays)
    return nan, inf


# ---- op semantics -----------------------------------------------------------------------

_FLT_LOWEST = "-3.4028235e+38"


def _linear(node: Node, attrs: dict) -> bool:
    return attrs.get("mode") in ("linear", "bilinear")


def _matrix_pooled(node: Node, attrs: dict) -> bool:
    spatial, size = node.inputs[0].type.spatial, attrs["size"]
    return any(s % o for s, o in zip(spatial, size, strict=True))


def _softplus_beta(node: Node, attrs: dict) -> bool:
    return attrs.get("beta", 1.0) != 1.0


_GATED = (
    "cnnc gives the limit 0 at -inf, where onnxruntime's x·gate(x) is -inf·0 = NaN (as PyTorch's)"
)

# Where onnxruntime (or cnnc's ONNX form of an op) computes something else than the
# interpreter on NaN or infinite values by design: op -> (when it applies, what differs).
NONFINITE_DIFFERENCES: dict[str, tuple[Callable[[Node, dict], bool] | None, str]] = {
    "maxpool": (
        None,
        "cnnc propagates NaN, as PyTorch does; onnxruntime's MaxPool skips NaN (in 2-D, "
        "but for a NaN read last in its window), and a window of nothing but NaN, -inf "
        f"and padding gives {_FLT_LOWEST}",
    ),
    "global_maxpool": (
        None,
        "cnnc propagates NaN, as PyTorch does; onnxruntime's GlobalMaxPool skips NaN, and a "
        f"map of nothing but NaN and -inf gives {_FLT_LOWEST}",
    ),
    "adaptive_maxpool": (
        None,
        "cnnc propagates NaN, as PyTorch does; onnxruntime's MaxPool and ReduceMax skip NaN "
        f"(a window of nothing but NaN and -inf gives {_FLT_LOWEST})",
    ),
    "adaptive_avgpool": (
        _matrix_pooled,
        "cnnc averages each window, as PyTorch does; its ONNX form multiplies by the "
        "pooling matrix, whose 0s carry a NaN or inf into every window of that axis "
        "(0·inf = NaN)",
    ),
    "lrn": (
        None,
        "a NaN or an inf (or a value whose square overflows) reaches the channels of its "
        "window, as in PyTorch (the neighbours of an inf divide by it: 0); onnxruntime's "
        "LRN also gives NaN at channels past the window, where its running sum "
        "subtracts it again (inf − inf, NaN)",
    ),
    "upsample": (
        _linear,
        "cnnc adds each output's two taps per axis as PyTorch does, even one of weight 0 "
        "(at the last row and column), so an inf there gives inf·0 = NaN; onnxruntime's "
        "linear Resize leaves that tap out and gives ±inf",
    ),
    "silu": (None, _GATED),
    "hardswish": (None, _GATED),
    "mish": (None, _GATED),
    "gelu": (
        None,
        _GATED + "; and onnxruntime's form overflows to inf for x above 1.7e38, where cnnc gives x",
    ),
    "softplus": (
        _softplus_beta,
        "cnnc gives x where beta·x overflows (as PyTorch does); the ONNX form "
        "Softplus(beta·x)/beta gives inf",
    ),
    "layernorm": (
        None,
        "where the squared deviations overflow float32 (|x − mean| above 1.8e19) the "
        "variance is inf and cnnc gives the bias; onnxruntime (and PyTorch) give NaN",
    ),
    "groupnorm": (
        None,
        "where the squared deviations overflow float32 (|x − mean| above 1.8e19) the "
        "variance is inf and cnnc gives the bias; onnxruntime (and PyTorch) give NaN",
    ),
}


def known_difference(node: Node) -> str | None:
    """The description of a known difference of op semantics on non-finite values at
    ``node`` (a conv's fused activation counts as its own op), or None."""
    fused = node.attrs.get("activation")
    candidates = [(node.op, node.attrs)]
    if fused:
        candidates.insert(0, (fused, node.attrs["activation_attrs"]))
    for op, attrs in candidates:
        entry = NONFINITE_DIFFERENCES.get(op)
        if entry and (entry[0] is None or entry[0](node, attrs)):
            return f"{op}: {entry[1]}"
    return None


@dataclass
class Divergence:
    """The first node (in topological order) whose values differ between the backends."""

    node: str
    op: str
    nonfinite: bool  # NaN or ±inf at different positions (else finite values differ)
    known: str | None  # the description of a known op-semantics difference, if one

    def describe(self) -> str:
        what = "NaN/inf" if self.nonfinite else "finite values"
        return f"node {self.node} ({self.op}), on {what}"


def first_divergence(graph: Graph, inputs: list[np.ndarray]) -> Divergence | None:
    """Run ``inputs`` through the interpreter and through onnxruntime (cnnc's ONNX export,
    every node's outputs made graph outputs), and compare node by node in topological
    order; the first node whose outputs do not agree, or None if every node agrees."""
    import onnxruntime as ort

    from cnnc.backends import onnx_export
    from cnnc.backends.interpreter import Interpreter

    final = list(graph.outputs)
    outputs = set(final)
    values = list(dict.fromkeys(v for node in graph.nodes for v in node.outputs))
    graph.outputs = values
    try:
        interpreter = Interpreter(graph)
        proto = onnx_export.to_onnx(graph, onnx_export.DEFAULT_OPSET)
    finally:
        graph.outputs = final
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    feed = dict(zip((v.name for v in graph.inputs), inputs, strict=True))
    ours = dict(zip((v.name for v in values), interpreter.run(*inputs), strict=True))
    theirs = dict(
        zip((o.name for o in session.get_outputs()), session.run(None, feed), strict=True)
    )
    for node in graph.nodes:
        for v in node.outputs:
            a, b = ours[v.name], theirs.get(v.name)
            if b is None:
                continue
            if a.size == b.size and same_nonfinite(a.reshape(b.shape), b):
                # The outputs under the criterion of --compare; inside, 1e-3 of magnitude.
                if agree(a, b, RTOL if v in outputs else INTERMEDIATE_RTOL):
                    continue
                return Divergence(node.name, _op_name(node), False, None)
            if a.size != b.size:
                return Divergence(node.name, _op_name(node), False, None)
            return Divergence(node.name, _op_name(node), True, known_difference(node))
    return None


def _op_name(node: Node) -> str:
    fused = node.attrs.get("activation")
    return f"{node.op}+{fused}" if fused else node.op
