"""Tensor types of IR values: an element type and a shape whose dimensions are ints or symbols."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cnnc.errors import ShapeError
from cnnc.limits import INT64_MAX

Dim = int | str
"""A dimension: a known size, or a symbol such as ``"N"`` for the batch axis."""

BATCH = "N"

_NUMPY = {"f32": np.float32, "f64": np.float64, "i64": np.int64, "i32": np.int32, "bool": np.bool_}
_ITEMSIZE = {name: np.dtype(t).itemsize for name, t in _NUMPY.items()}


_VALID: set[tuple] = set()  # (dtype, shape) of the types that passed their check


@dataclass(frozen=True)
class TensorType:
    """The element type and shape of a tensor value."""

    dtype: str
    shape: tuple[Dim, ...]

    def __post_init__(self):
        # A hard limit: NumPy and ONNX hold sizes in int64. Counted exactly, so that a shape
        # no array can have is refused where it is made rather than overflowing later.
        # A type that passed once passes again (a 10,000-layer network has a handful).
        key = (self.dtype, self.shape)
        try:
            if key in _VALID:
                return
        except TypeError:  # a shape that is not a tuple of hashables: checked, not remembered
            self._check()
            return
        self._check()
        if len(_VALID) > 10_000:
            _VALID.clear()
        _VALID.add(key)

    def _check(self) -> None:
        known = [d for d in self.shape if isinstance(d, int)]
        if any(d > INT64_MAX for d in known):
            raise ShapeError(
                f"a dimension of {self._short()} is larger than 2**63-1, the largest NumPy "
                "and ONNX hold"
            )
        size = math.prod(d for d in known if d > 0) * _ITEMSIZE.get(self.dtype, 1)
        if size > INT64_MAX:
            per_item = " per batch item" if len(known) < len(self.shape) else ""
            raise ShapeError(
                f"a tensor {self._short()} would take {_short_int(size, commas=True)} "
                f"bytes{per_item}, more than 2**63-1, the most NumPy and ONNX can address"
            )

    def _short(self) -> str:
        return f"{self.dtype}[{','.join(_short_int(d) for d in self.shape)}]"

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self.dtype]

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(_NUMPY[self.dtype])

    @property
    def spatial(self) -> tuple[Dim, ...]:
        """The dimensions after batch and channels (H, W for a 2-D feature map)."""
        return self.shape[2:]

    def with_shape(self, shape: tuple[Dim, ...]) -> TensorType:
        return TensorType(self.dtype, tuple(shape))

    def numel(self) -> int | None:
        """Number of elements, or None if a dimension is symbolic."""
        if not all(isinstance(d, int) for d in self.shape):
            return None
        return math.prod(self.shape)

    def numel_per_item(self) -> int:
        """Number of elements of one batch item (all dimensions but the first must be known)."""
        return math.prod(int(d) for d in self.shape[1:])

    def matches(self, shape: tuple[int, ...]) -> bool:
        """Whether a concrete shape fits this type (symbols match any size)."""
        return len(shape) == len(self.shape) and all(
            not isinstance(d, int) or d == s for d, s in zip(self.shape, shape, strict=True)
        )

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(str(d) for d in self.shape)}]"


def _short_int(n: Dim, commas: bool = False) -> str:
    """A size as messages show it: in full up to 30 digits, else as a power of ten."""
    if not isinstance(n, int) or abs(n) < 10**30:
        return f"{n:,}" if commas else str(n)
    return f"about 10**{len(str(abs(n))) - 1}"


def dtype_name(dtype: np.dtype) -> str:
    """The IR name of a NumPy dtype (``float32`` -> ``f32``)."""
    for name, np_type in _NUMPY.items():
        if np.dtype(np_type) == dtype:
            return name
    raise KeyError(f"no IR type for NumPy dtype {dtype}")


def format_dims(dims: tuple[Dim, ...]) -> str:
    """``(5, 5)`` -> ``5x5``: how kernels and spatial sizes appear in messages."""
    return "x".join(str(d) for d in dims)
