"""Labelled data sets for training and evaluation: an .npz file of ``x`` and ``y``, or the
built-in ``digits``, checked against a network's input, and split into training and
validation rows by a fixed seed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnc.errors import InputError, UsageError
from cnnc.npyfile import ArrayFileError, NpzArchive, nonfinite_count, open_array_file

BUILTIN = ("digits",)
# The validation rows are the first ones of this permutation, whatever --seed says, so
# that every run (and every `cnnc eval`) holds out the same rows of the same data.
SPLIT_SEED = 0
HINT = "save a data set with numpy.savez(path, x=images.astype(numpy.float32), y=labels)"


@dataclass
class Dataset:
    """Inputs ``x`` (float32, N × item shape) and integer class labels ``y`` (int64, N),
    and the name errors and reports give it (a file name or ``digits``)."""

    name: str
    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def rows(self, index: np.ndarray) -> Dataset:
        """The rows ``index`` of this data set, in that order."""
        return Dataset(self.name, self.x[index], self.y[index])


def load(source: str | Path | tuple[np.ndarray, np.ndarray]) -> Dataset:
    """A data set: ``"digits"``, the path of an .npz file holding ``x`` and ``y``, or a
    pair of arrays ``(x, y)``; raises InputError naming the file and the array for
    anything it does not hold as it should."""
    if isinstance(source, tuple):
        x, y = source
        return _checked("the data", np.asarray(x), np.asarray(y))
    if str(source) == "digits":
        return load_digits()
    return read_npz(source)


def read_npz(path: str | Path) -> Dataset:
    """The data set of an .npz file with arrays ``x`` (N×C×H×W or N×C×L, float32) and
    ``y`` (N integer labels); headers are checked before any array is read, and
    nothing is unpickled."""
    name = str(path)
    archive = open_array_file(path, InputError, "data file", HINT)
    if not isinstance(archive, NpzArchive):
        raise InputError(
            "the data file holds a single array; training needs x (inputs) and y (labels)",
            name,
            hint=HINT,
        )
    with archive:
        missing = [a for a in ("x", "y") if a not in archive.names]
        if missing:
            held = ", ".join(archive.names) or "no arrays"
            raise InputError(
                f"the data file has no array {' and no array '.join(missing)} (it holds {held})",
                name,
                hint=HINT,
            )
        try:
            (x_shape, x_dtype), (y_shape, y_dtype) = archive.header("x"), archive.header("y")
            _check_types(name, x_shape, x_dtype, y_shape, y_dtype)
            x, y = archive.read("x"), archive.read("y")
        except ArrayFileError as e:
            raise InputError(f"cannot read the data file: {e}", name, hint=HINT) from None
        except MemoryError:
            raise InputError("out of memory while reading the data", name) from None
    return _checked(name, x, y)


def _check_types(name: str, x_shape, x_dtype, y_shape, y_dtype) -> None:
    if x_dtype != np.float32:
        convert = " (convert it: x.astype(numpy.float32))" if x_dtype.kind in "fiub" else ""
        raise InputError(f"x has dtype {x_dtype}; cnnc trains on float32{convert}", name, hint=HINT)
    if y_dtype.kind not in "iu":
        raise InputError(
            f"y has dtype {y_dtype}; labels are integers (class numbers 0, 1, ...)",
            name,
            hint=HINT,
        )
    if len(y_shape) != 1:
        raise InputError(
            f"y has shape {list(y_shape)}; labels are one integer per item, shape [N]",
            name,
            hint="one class number per row of x, not one-hot vectors",
        )
    if len(x_shape) < 2:
        raise InputError(
            f"x has shape {list(x_shape)}; inputs are N×C×H×W or N×C×L", name, hint=HINT
        )
    if x_shape[0] != y_shape[0]:
        raise InputError(
            f"x holds {x_shape[0]:,} items but y {y_shape[0]:,} labels; they pair row by row",
            name,
        )
    if y_shape[0] == 0:
        raise InputError("the data set is empty (x and y have 0 rows)", name)


def _checked(name: str, x: np.ndarray, y: np.ndarray) -> Dataset:
    _check_types(name, x.shape, x.dtype, y.shape, y.dtype)
    bad = nonfinite_count(x)
    if bad:
        raise InputError(f"x holds {bad:,} NaN or infinite values", name)
    if len(y) and int(y.min()) < 0:
        row = int(np.argmin(y))
        raise InputError(f"y holds a negative label, {int(y[row])} at row {row}", name)
    return Dataset(name, np.ascontiguousarray(x), y.astype(np.int64))


def load_digits() -> Dataset:
    """scikit-learn's handwritten digits: 1,797 images of 8×8 pixels as 1,797×1×8×8
    float32 in [0, 1] (the 0–16 grey levels divided by 16), labels 0–9."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise UsageError(
            "the data set digits needs scikit-learn, which is not installed",
            hint="pip install 'cnnc[data]' (or pip install scikit-learn)",
        ) from None
    bunch = sklearn_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]
    return Dataset("digits", x, bunch.target.astype(np.int64))


def check_fits(data: Dataset, item_shape: tuple[int, ...], classes: int, network: str) -> None:
    """Raise InputError unless every item of ``data`` has ``item_shape`` (the network's
    input without its batch axis) and every label is below ``classes``."""
    if tuple(data.x.shape[1:]) != tuple(item_shape):
        dims = "×".join(map(str, item_shape))
        raise InputError(
            f"x holds items of {'×'.join(map(str, data.x.shape[1:]))}, but network {network} "
            f"takes {dims}",
            data.name,
            hint=f"x must be shaped [N, {', '.join(map(str, item_shape))}]",
        )
    if int(data.y.max()) >= classes:
        row = int(np.argmax(data.y))
        raise InputError(
            f"y holds label {int(data.y[row])} at row {row}, but network {network} has "
            f"{classes} classes (labels 0 to {classes - 1})",
            data.name,
            hint=f"give the last layer {int(data.y.max()) + 1} outputs, or fix the labels",
        )


@dataclass
class Split:
    """Which rows of a data set train and which validate (indices in ascending order)."""

    train: np.ndarray
    val: np.ndarray


def split(n: int, val_split: float) -> Split:
    """The rows of an ``n``-row data set that validate: the first round(val_split · n) of
    ``numpy.random.default_rng(0).permutation(n)``, the same for every run; the others
    train. Both lists are returned sorted."""
    if not 0 <= val_split < 1:
        raise UsageError(f"--val-split must be in [0, 1), got {val_split}")
    count = round(val_split * n)
    if count >= n:
        raise UsageError(f"--val-split {val_split} leaves no row of {n} to train on")
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    return Split(np.sort(order[count:]), np.sort(order[:count]))
