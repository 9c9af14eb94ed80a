"""When two float32 results are the same: the one criterion of --compare, bench, --verify-each.

Element-wise, ``|actual - expected| <= RTOL·|expected| + ATOL + RTOL·max|expected|``.
The last term scales the absolute tolerance with the tensor's magnitude: a value
near zero that is the sum of many large products (a logit of a 50-layer network,
say) carries float32 rounding proportional to those products, not to itself.
Measured on ResNet-50 against a float64 run, onnxruntime's own outputs are off by
1.3e-5 of their largest magnitude, more than a fixed 1e-5 allows for logits of 5.
"""

from __future__ import annotations

import numpy as np

RTOL = 1e-4
ATOL = 1e-5
DESCRIPTION = f"rtol {RTOL:g}, atol {ATOL:g} + {RTOL:g}·max|y|"


def tolerance(expected: np.ndarray) -> float:
    """The absolute tolerance for a tensor: ATOL plus RTOL of its largest magnitude."""
    return ATOL + RTOL * float(np.abs(expected).max(initial=0))


def agree(actual: np.ndarray, expected: np.ndarray) -> bool:
    """Whether two results are the same within the tolerance (and have the same size)."""
    if actual.size != expected.size:
        return False
    actual = actual.reshape(expected.shape)
    return bool(np.allclose(actual, expected, rtol=RTOL, atol=tolerance(expected)))


def max_difference(actual: np.ndarray, expected: np.ndarray) -> float:
    """The largest element-wise difference (infinite if the sizes differ)."""
    if actual.size != expected.size:
        return float("inf")
    if not actual.size:
        return 0.0
    return float(np.max(np.abs(actual.reshape(expected.shape) - expected)))
