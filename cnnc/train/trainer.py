"""The training loop: epochs of training steps over a data set, in the NumPy interpreter or
in onnxruntime, a validation pass and an atomic checkpoint after every epoch."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnc import output
from cnnc import weights as weights_mod
from cnnc.data import Dataset, Split, check_fits, split
from cnnc.errors import CnncError, UsageError
from cnnc.ir.graph import Graph
from cnnc.npyfile import ArrayFileError, NpzArchive, open_array_file, write_npz
from cnnc.train.step import Optimizer, _classifier_logits, build_step
from cnnc.weights import initial_weights

BACKENDS = ("numpy", "onnxruntime")
EVAL_BATCH = 256  # items per run of the validation forward pass


class TrainingError(CnncError):
    """Training cannot go on: the loss or the weights stopped being finite, or a batch
    cannot be normalized."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training; ``message`` says where, and what the checkpoint holds."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


@dataclass
class Progress:
    """Where an epoch is, after each step (what a progress bar shows)."""

    epoch: int
    epochs: int
    step: int  # steps done in this epoch
    steps: int  # steps of the epoch
    loss: float  # mean loss of the epoch's items so far
    accuracy: float  # fraction of the epoch's items so far classified right
    images_per_second: float


@dataclass
class Epoch:
    """What an epoch did: the mean training loss and accuracy over its steps (as each step
    saw the batch, in training mode, before its update), the validation loss and accuracy
    after it (the inference forward pass, None without validation rows), and its speed."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    images_per_second: float
    seconds: float

    def line(self, epochs: int) -> str:
        """The epoch's report, one line."""
        width = len(str(epochs))
        text = (
            f"epoch {self.epoch:{width}d}/{epochs}  train loss {self.train_loss:.4f} "
            f"acc {100 * self.train_accuracy:6.2f}%"
        )
        if self.val_loss is not None:
            text += f"  val loss {self.val_loss:.4f} acc {100 * self.val_accuracy:6.2f}%"
        return text + f"  {self.images_per_second:,.0f} img/s  {self.seconds:.1f} s"


@dataclass
class TrainResult:
    """A finished training: the learned tensors (PyTorch's state_dict names and order,
    running statistics and ``<bn>.num_batches_tracked`` included), each epoch's figures,
    and which rows trained and validated."""

    weights: dict[str, np.ndarray]
    history: list[Epoch]
    split: Split
    steps: int
    trainer: Trainer = field(repr=False)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The network's output on ``x`` with the learned weights (inference mode)."""
        return self.trainer.forward(x)[1]


def batch_counters(graph: Graph) -> dict[str, str]:
    """Each batch norm's ``num_batches_tracked`` name (PyTorch's buffer), by the name of
    its running variance, after which a state_dict lists it."""
    out = {}
    for node in graph.nodes:
        if node.op == "bn":
            var = node.inputs[4].name
            prefix = var.removesuffix(".running_var") if var.endswith(".running_var") else node.name
            out[var] = f"{prefix}.num_batches_tracked"
    return out


def _read_counters(path: str | Path, names: list[str]) -> dict[str, int]:
    """The ``num_batches_tracked`` counters a weights file holds (missing ones are 0)."""
    found = {}
    archive = open_array_file(path, CnncError, "weights file", "")
    if not isinstance(archive, NpzArchive):
        return found
    with archive:
        for name in names:
            if name in archive.names:
                try:
                    value = archive.read(name)
                except ArrayFileError:
                    continue
                if value.size == 1 and value.dtype.kind in "iu":
                    found[name] = int(value.reshape(()))
    return found


class _Runner:
    """Runs one graph again and again on named arrays, in the interpreter or onnxruntime."""

    def __init__(self, graph: Graph, backend: str):
        self.inputs = [v.name for v in graph.inputs]
        self.backend = backend
        if backend == "numpy":
            from cnnc.backends.interpreter import Interpreter

            self.interpreter = Interpreter(graph)
            return
        try:
            import onnxruntime as ort
        except ImportError:
            raise UsageError(
                "onnxruntime is not installed", hint="pip install onnxruntime, or --backend numpy"
            ) from None
        from cnnc.backends.onnx_export import DEFAULT_OPSET, to_onnx

        options = ort.SessionOptions()
        options.log_severity_level = 3
        model = to_onnx(graph, DEFAULT_OPSET)
        self.session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.backend == "numpy":
            outputs = self.interpreter.run(*[feeds[n] for n in self.inputs])
        else:
            outputs = self.session.run(None, {n: feeds[n] for n in self.inputs})
        # A kernel's 0-d result may come back as a NumPy scalar; the next run wants arrays.
        return [np.asarray(o) for o in outputs]


class Trainer:
    """Training of a lowered network graph (before optimization passes) on a data set.

    ``weights``: an .npz file of initial tensors (read as ``cnnc run --weights`` reads
    them), or None for :func:`initial_weights` drawn from ``seed``. The seed also draws
    the order of the rows in each epoch (unless ``shuffle`` is off) and the dropout masks.
    """

    def __init__(
        self,
        forward: Graph,
        *,
        optimizer: Optimizer | None = None,
        lr: float | None = None,
        batch: int = 32,
        seed: int = 0,
        shuffle: bool = True,
        backend: str = "numpy",
        weights: str | Path | None = None,
    ):
        if backend not in BACKENDS:
            raise UsageError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if batch < 1:
            raise UsageError(f"--batch must be at least 1, got {batch}")
        self.optimizer = optimizer or Optimizer("adam")
        if lr is None:
            lr = 0.01 if self.optimizer.kind == "sgd" else 0.001
        if not (np.isfinite(lr) and lr > 0):
            raise UsageError(f"--lr must be a positive number, got {lr}")
        if len(forward.inputs) != 1:
            raise UsageError(
                f"network {forward.name} has {len(forward.inputs)} inputs; training takes "
                "a network of one input",
            )
        self.forward_graph = forward
        self.lr, self.batch, self.seed, self.shuffle = lr, batch, seed, shuffle
        self.backend = backend
        self.step = build_step(forward, loss="cross_entropy", optimizer=self.optimizer)
        scores = _classifier_logits(forward.outputs[0])
        self.classes = int(scores.shape[1])
        self.item_shape = tuple(forward.inputs[0].shape[1:])
        counters = batch_counters(forward)
        if weights is not None:
            weights_mod.load(forward, weights)
            self.state = {n: np.asarray(p.data, np.float32) for n, p in forward.params.items()}
            self.counters = {n: 0 for n in counters.values()}
            self.counters.update(_read_counters(weights, list(counters.values())))
        else:
            self.state = initial_weights(forward, seed)
            self.counters = {n: 0 for n in counters.values()}
        self._counter_after = counters
        self.state.update(self.step.initial_optimizer_state())
        self._run_step = _Runner(self.step.graph, backend)
        # The batch norms that see one value per channel and item (after an fc): a batch of
        # one row gives them nothing to normalize.
        self._vector_norms = [
            node
            for node in self.step.graph.nodes
            if node.op == "bn_train" and math.prod(node.inputs[0].shape[2:]) == 1
        ]
        self._forward = None
        self._mask_rng = np.random.default_rng([seed, 1])
        self._order_rng = np.random.default_rng([seed, 0])
        self.steps_done = 0

    # ---- the learned tensors --------------------------------------------------------------

    def weights(self) -> dict[str, np.ndarray]:
        """The network's tensors now, as a PyTorch state_dict names and orders them."""
        out = {}
        for name in self.forward_graph.params:
            out[name] = self.state[name]
            if name in self._counter_after:
                counter = self._counter_after[name]
                out[counter] = np.array(self.counters[counter], np.int64)
        return out

    def save(self, target: str | Path | output.Target) -> None:
        """Write the tensors to an .npz file atomically (the old file stays until the new
        one is whole)."""
        with output.open_output(target) as f:
            write_npz(f, self.weights())

    # ---- one step, one pass ---------------------------------------------------------------

    def train_step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        """One training step on a batch: updates the weights and the optimizer's state;
        returns the batch's loss and the network's output on it (before the update)."""
        step = self.step
        if len(x) == 1 and self._vector_norms:
            node = self._vector_norms[0]
            raise TrainingError(
                f"batch norm {node.name} would normalize one value per channel (a batch "
                f"of 1 of {node.inputs[0].type}), which has no variance (PyTorch refuses "
                "it too)",
                hint="pick a --batch that leaves no last batch of a single row",
            )
        feeds = dict(self.state)
        feeds[step.data[0]] = x
        feeds[step.target] = y
        feeds[step.lr] = np.array(self.lr, np.float32)
        feeds.update(step.draw_masks(len(x), self._mask_rng))
        outputs = self._run_step(feeds)
        state = step.state
        loss = float(outputs[len(state)])
        if not np.isfinite(loss):
            raise TrainingError(f"the loss became {'NaN' if np.isnan(loss) else 'infinite'}")
        for name, value in zip(state, outputs, strict=False):
            if name in step.params and not np.isfinite(value).all():
                raise TrainingError(f"the update made {name} NaN or infinite")
        self.state.update(zip(state, outputs, strict=False))
        for counter in self.counters:
            self.counters[counter] += 1
        self.steps_done += 1
        return loss, outputs[len(state) + 1]

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The class scores (logits) and the network's output on ``x`` with the current
        weights, in inference mode (running statistics, no dropout), in batches."""
        if self._forward is None:
            from cnnc.ir.transform import params_to_inputs

            fed = params_to_inputs(self.forward_graph)
            by_name = {o.name: o for n in fed.nodes for o in n.outputs}
            logits = by_name[_classifier_logits(self.forward_graph.outputs[0]).name]
            fed.outputs = [logits, fed.outputs[0]]
            self._forward = (_Runner(fed, self.backend), fed.inputs[0].name)
        runner, name = self._forward
        logits, outs = [], []
        for lo in range(0, len(x), EVAL_BATCH):
            a, b = runner({**self.state, name: x[lo : lo + EVAL_BATCH]})
            logits.append(a.reshape(len(a), -1))
            outs.append(b)
        return np.concatenate(logits), np.concatenate(outs)

    def evaluate(self, data: Dataset) -> tuple[float, float]:
        """The mean cross-entropy and the accuracy on ``data`` in inference mode."""
        logits, _ = self.forward(data.x)
        return cross_entropy(logits, data.y), float(np.mean(logits.argmax(1) == data.y))

    def plan(self, data: Dataset, train: int, val: int, val_split: float, steps: int) -> str:
        """What a run will do, one line."""
        opt = self.optimizer
        return (
            f"training {self.forward_graph.name} on {data.name}: {train:,} training rows, "
            f"{val:,} validation rows (--val-split {val_split:g}); {steps:,} steps of "
            f"{self.batch} per epoch; {opt.kind} lr {self.lr:g}; {self.backend}; "
            f"seed {self.seed}{'' if self.shuffle else ', no shuffle'}"
        )

    # ---- the loop -------------------------------------------------------------------------

    def fit(
        self,
        data: Dataset,
        *,
        epochs: int = 10,
        val_split: float = 0.2,
        output_path: str | Path | None = None,
        on_epoch: Callable[[Epoch], None] | None = None,
        on_step: Callable[[Progress], None] | None = None,
        on_start: Callable[[str], None] | None = None,
    ) -> TrainResult:
        """Train for ``epochs`` epochs on the rows of ``data`` that :func:`cnnc.data.split`
        leaves for training, validating on the others after every epoch; after every
        epoch the tensors are written to ``output_path`` (atomically), then ``on_epoch``
        is called (``on_start`` first gets a line saying what the run will do). A loss
        or weight that stops being finite is a TrainingError naming the epoch and the
        step; Ctrl-C is :class:`Interrupted`; the file then holds the last whole epoch's
        tensors."""
        if epochs < 1:
            raise UsageError(f"--epochs must be at least 1, got {epochs}")
        check_fits(data, self.item_shape, self.classes, self.forward_graph.name)
        target = None
        if output_path is not None:
            target = output.target(output_path)
            if target.is_stdout:
                raise UsageError(
                    "training writes its weights after every epoch; -o - cannot hold them",
                    hint="name a file: -o WEIGHTS.npz",
                )
        rows = split(len(data), val_split)
        train, val = data.rows(rows.train), data.rows(rows.val)
        history: list[Epoch] = []
        steps = -(-len(train) // self.batch)
        if on_start is not None:
            on_start(self.plan(data, len(train), len(val), val_split, steps))
        saved = "nothing was written" if target is None else f"{target.name} was not written"
        epoch = step = 0
        try:
            for epoch in range(1, epochs + 1):
                order = self._order_rng.permutation(len(train)) if self.shuffle else None
                start = time.perf_counter()
                loss_sum = correct = seen = 0.0
                for step in range(1, steps + 1):
                    index = slice((step - 1) * self.batch, step * self.batch)
                    rows_k = index if order is None else order[index]
                    x, y = train.x[rows_k], train.y[rows_k]
                    try:
                        loss, out = self.train_step(x, y)
                    except TrainingError as e:
                        raise TrainingError(
                            f"{e.message} at epoch {epoch}, step {step} of {steps} "
                            f"(step {self.steps_done + 1} of the run); {saved}",
                            hint=e.hint or "lower --lr, or check the data for extreme values",
                        ) from None
                    seen += len(y)
                    loss_sum += loss * len(y)
                    correct += int(np.sum(out.reshape(len(y), -1).argmax(1) == y))
                    if on_step is not None:
                        elapsed = time.perf_counter() - start
                        on_step(
                            Progress(
                                epoch,
                                epochs,
                                step,
                                steps,
                                loss_sum / seen,
                                correct / seen,
                                seen / max(elapsed, 1e-9),
                            )
                        )
                seconds = time.perf_counter() - start
                val_loss = val_accuracy = None
                if len(val):
                    val_loss, val_accuracy = self.evaluate(val)
                result = Epoch(
                    epoch,
                    loss_sum / seen,
                    correct / seen,
                    val_loss,
                    val_accuracy,
                    seen / max(seconds, 1e-9),
                    seconds,
                )
                history.append(result)
                step = 0
                if target is not None:
                    self.save(target)
                    saved = f"{target.name} holds the weights after epoch {epoch}"
                else:
                    saved = f"the weights after epoch {epoch} were kept"
                if on_epoch is not None:
                    on_epoch(result)
        except KeyboardInterrupt:
            where = f"in epoch {epoch}, step {step} of {steps}" if step else f"after epoch {epoch}"
            raise Interrupted(f"interrupted {where}; {saved}") from None
        return TrainResult(self.weights(), history, rows, self.steps_done, self)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """The mean cross-entropy of class scores against labels, computed in float64."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-np.take_along_axis(log_p, labels[:, None], axis=1).mean())
