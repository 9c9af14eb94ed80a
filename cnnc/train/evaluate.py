"""Evaluation of a classifier on labelled data: accuracy, per-class accuracy, confusion."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cnnc.data import Dataset, check_fits
from cnnc.errors import UsageError

EVAL_BATCH = 256  # items per run


@dataclass
class Evaluation:
    """How a classifier did on ``count`` items: ``confusion[i, j]`` counts the items of
    class i predicted as class j."""

    data: str
    rows: str  # which rows: "validation", "training" or "all"
    confusion: np.ndarray

    @property
    def count(self) -> int:
        """How many items were classified."""
        return int(self.confusion.sum())

    @property
    def accuracy(self) -> float:
        """The fraction classified right."""
        return float(np.trace(self.confusion) / max(1, self.count))

    @property
    def per_class(self) -> np.ndarray:
        """The accuracy of each class (NaN for a class with no item)."""
        totals = self.confusion.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.diag(self.confusion) / totals

    def render(self, labels: list[str] | None = None) -> str:
        """The report `cnnc eval` prints; with ``labels`` (one per class), the per-class
        lines name their classes."""
        k = len(self.confusion)
        right = int(np.trace(self.confusion))
        lines = [
            f"accuracy {100 * self.accuracy:.2f}% ({right:,} of {self.count:,} "
            f"{self.rows} items of {self.data})",
            "",
            "per class:",
        ]
        totals = self.confusion.sum(axis=1)
        width = len(str(k - 1))
        names = [""] * k
        if labels is not None and len(labels) == k:
            longest = max(len(n) for n in labels)
            names = [f" {n:<{longest}}" for n in labels]
        for c in range(k):
            if totals[c]:
                lines.append(
                    f"  class {c:>{width}}{names[c]}: {100 * self.per_class[c]:6.2f}% "
                    f"({int(self.confusion[c, c]):,} of {int(totals[c]):,})"
                )
            else:
                lines.append(f"  class {c:>{width}}{names[c]}:      - (no item)")
        lines += ["", "confusion matrix (rows: true class, columns: predicted class):"]
        cell = max(len(str(int(self.confusion.max()))), width, 1) + 1
        lines.append(" " * (width + 7) + "".join(f"{c:>{cell}}" for c in range(k)))
        for c in range(k):
            row = "".join(f"{int(v):>{cell}}" for v in self.confusion[c])
            lines.append(f"  true {c:>{width}}{row}")
        return "\n".join(lines)


def evaluate(model, data: Dataset, rows: str = "all", backend: str = "numpy") -> Evaluation:
    """Run a compiled classifier (a :class:`cnnc.Model`) on every item of ``data`` in
    batches and count its predictions (the argmax of its output) against the labels."""
    graph = model.graph
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise UsageError(
            f"network {model.name} has {len(graph.inputs)} inputs and "
            f"{len(graph.outputs)} outputs; evaluation takes a classifier of one of each"
        )
    out = graph.outputs[0].shape
    if len(out) < 2 or any(d != 1 for d in out[2:]):
        raise UsageError(
            f"the output {graph.outputs[0].type} of network {model.name} is not one score "
            "per class",
            hint="a classifier ends in fc(K) (then softmax)",
        )
    classes = int(out[1])
    check_fits(data, tuple(graph.inputs[0].shape[1:]), classes, model.name)
    confusion = np.zeros((classes, classes), np.int64)
    for lo in range(0, len(data), EVAL_BATCH):
        x, y = data.x[lo : lo + EVAL_BATCH], data.y[lo : lo + EVAL_BATCH]
        scores = model.run_all_outputs(x, backend=backend)[0].reshape(len(x), classes)
        np.add.at(confusion, (y, scores.argmax(axis=1)), 1)
    return Evaluation(data.name, rows, confusion)
