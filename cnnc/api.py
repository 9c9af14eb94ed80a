"""The Python API: compile a program or load an ONNX file, then run, export, dump, summarise."""

from __future__ import annotations

import gc
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cnnc import limits as limits_mod
from cnnc import weights as weights_mod
from cnnc.errors import CnncError, InputError, UsageError
from cnnc.frontend.lower import lower
from cnnc.frontend.parser import Program
from cnnc.frontend.parser import parse as _parse
from cnnc.ir.graph import Graph
from cnnc.limits import Limits

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    import onnx

    from cnnc.backends.interpreter import Interpreter
    from cnnc.passes.manager import Options as PassOptions
    from cnnc.passes.report import PassReport
    from cnnc.train.evaluate import Evaluation
    from cnnc.train.step import Optimizer, TrainingStep
    from cnnc.train.trainer import Epoch, Progress, TrainResult

BACKENDS = ("numpy", "onnxruntime")


@contextmanager
def _gc_paused():
    """Hold Python's cycle collector off while a graph is built or written: compiling
    allocates many objects that all live on, and the collector's passes over them are
    half the time of a 100,000-layer compile. (Restored after; nothing is lost.)"""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _read_text(path: Path) -> str:
    try:
        # Refused before reading: a huge file must not be read into memory to be refused.
        size = path.stat().st_size
        if size > limits_mod.current().program_bytes:
            raise limits_mod.exceeded(
                CnncError, "program_bytes", "the program file is", size, str(path), unit="bytes"
            )
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CnncError("file not found", str(path)) from None
    except IsADirectoryError:
        raise CnncError("is a directory, not a program file", str(path)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise CnncError(f"cannot read the program: {e}", str(path)) from None


def parse(
    text: str, filename: str = "<string>", *, limits: Limits | Mapping[str, int] | None = None
) -> Program:
    """Parse program text into its AST (raises ParseError at the place of a syntax error);
    ``limits`` (a :class:`cnnc.Limits` or a dict of the ones to change) lifts or lowers
    the limits on the program."""
    with limits_mod.using(limits_mod.coerce(limits)):
        return _parse(text, filename)


def _is_path(source: str | Path) -> bool:
    return isinstance(source, Path) or ("\n" not in source and "{" not in source)


def _check_summary_options(depth: int | None, batch: int) -> None:
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
        raise UsageError(f"the summary's depth must be an integer of at least 1, got {depth!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise UsageError(f"the summary's batch must be an integer of at least 1, got {batch!r}")


class Model:
    """A compiled network: its IR graph with weights, ready to run, export or inspect."""

    def __init__(
        self,
        graph: Graph,
        *,
        random_weights: bool = False,
        onnx_path: Path | None = None,
        limits: Limits | None = None,
        calibration: weights_mod.Calibration | None = None,
    ):
        self.graph = graph
        self.limits = limits or limits_mod.DEFAULT  # memory, for runs
        self.random_weights = random_weights
        # Measures random batch-norm statistics when they are first needed.
        self.calibration = calibration
        self.onnx_path = onnx_path  # the file an imported model came from
        self._interpreter: Interpreter | None = None
        self._ort_session = None
        # What each optimization pass changed, when asked for (compile(..., report=True)).
        self.pass_report: PassReport | None = None

    @property
    def name(self) -> str:
        return self.graph.name

    @property
    def warnings(self) -> list[CnncError]:
        """What the compiler noticed but accepted (unused values), as reports."""
        return list(self.graph.warnings)

    def random_input(self, batch: int = 1, seed: int = 0) -> np.ndarray:
        """A seeded standard-normal input of the network's shape for ``batch`` items (for a
        network of one input; :meth:`random_inputs` gives one for each)."""
        if len(self.graph.inputs) != 1:
            names = ", ".join(f"%{v.name}" for v in self.graph.inputs)
            raise UsageError(
                f"network {self.name} has {len(self.graph.inputs)} inputs ({names})",
                hint="use random_inputs(), which gives one array for each",
            )
        return self.random_inputs(batch, seed)[0]

    def random_inputs(self, batch: int = 1, seed: int = 0) -> list[np.ndarray]:
        """One seeded standard-normal array for each input of the network (refused, before
        any is made, when a run on them would not fit in memory)."""
        self.check_memory(batch)
        arrays = []
        for i, value in enumerate(self.graph.inputs):
            dims = [batch, *value.type.shape[1:]]
            if not all(isinstance(d, int) for d in dims):
                raise UsageError(
                    f"input %{value.name} has symbolic sizes {value.type}; pass an input"
                )
            # The first input's values do not depend on how many inputs there are.
            rng = np.random.default_rng(seed if i == 0 else [seed, i])
            arrays.append(rng.standard_normal(dims, dtype=np.float32))
        return arrays

    @property
    def input_names(self) -> list[str]:
        """The names of the network's inputs, in the order :meth:`run` takes them."""
        return [v.name for v in self.graph.inputs]

    @property
    def output_names(self) -> list[str]:
        """The names of the network's outputs, in the order :meth:`run` returns them."""
        return [v.name for v in self.graph.outputs]

    def run(
        self, *inputs: np.ndarray, backend: str = "numpy"
    ) -> np.ndarray | tuple[np.ndarray, ...]:
        """Run the network on a batch (one array per input, in order) in the NumPy
        interpreter or in onnxruntime: its output, or a tuple of its outputs."""
        outputs = self.run_all_outputs(*inputs, backend=backend)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def run_named(self, *inputs: np.ndarray, backend: str = "numpy") -> dict[str, np.ndarray]:
        """Run the network; its outputs by name."""
        outputs = self.run_all_outputs(*inputs, backend=backend)
        return dict(zip(self.output_names, outputs, strict=True))

    def check_memory(self, batch: int, scale: float = 1.0) -> None:
        """Raise UsageError if a run on ``batch`` items (of inputs ``scale`` times the
        declared size) would need more memory than the limit ``memory`` or, without one,
        than the machine has available (README, "Limits")."""
        limits_mod.check_run_memory(self.graph, batch, scale, self.limits)

    def run_all_outputs(self, *inputs: np.ndarray, backend: str = "numpy") -> list[np.ndarray]:
        """Run the network; the list of its outputs."""
        if backend not in BACKENDS:
            raise UsageError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        from cnnc.backends.interpreter import is_batched

        self._check_inputs(inputs)
        # A fully convolutional network's activations grow with its inputs' area.
        batched = [(v, x) for v, x in zip(self.graph.inputs, inputs, strict=True) if is_batched(v)]
        scale = max(
            (x.size / max(1, x.shape[0] * v.type.numel_per_item()) for v, x in batched),
            default=1.0,
        )
        self.check_memory(batched[0][1].shape[0] if batched else 1, max(scale, 1.0))
        if backend == "numpy":
            return self.interpreter.run(*inputs)
        session = self._onnxruntime_session()
        names = [i.name for i in session.get_inputs()]
        return session.run(None, dict(zip(names, inputs, strict=True)))

    def _check_inputs(self, inputs: tuple[np.ndarray, ...]) -> None:
        """Raise InputError unless ``inputs`` fit the network's inputs (count, dtype, shape,
        one batch size)."""
        from cnnc.backends.interpreter import check_batch, check_input

        if len(inputs) != len(self.graph.inputs):
            raise InputError(
                f"network {self.name} takes {len(self.graph.inputs)} input(s), got {len(inputs)}"
            )
        for value, x in zip(self.graph.inputs, inputs, strict=True):
            check_input(value, x, self.graph.flexible_spatial)
        check_batch(self.graph.inputs, inputs)

    def activations(self, *inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Run the network in the NumPy interpreter keeping every value: the graph's
        inputs, then each node's output, by name in graph order (the names of
        :meth:`dump`; compile with ``opt_level=0`` to see every layer as written, since
        -O2 fuses conv, bn and relu into one value)."""
        self._check_inputs(inputs)
        _, values = self.interpreter.run_all(*inputs)
        named = {v.name: x for v, x in zip(self.graph.inputs, inputs, strict=True)}
        named.update(values)
        return named

    @property
    def interpreter(self) -> Interpreter:
        """The prepared NumPy interpreter of this model (prepared on first use)."""
        if self._interpreter is None:
            from cnnc.backends.interpreter import Interpreter

            self._interpreter = Interpreter(self.graph)
        return self._interpreter

    def _onnxruntime_session(self):
        if self._ort_session is None:
            try:
                import onnxruntime as ort
            except ImportError:
                raise UsageError(
                    "onnxruntime is not installed",
                    hint="pip install onnxruntime, or use --backend numpy",
                ) from None
            options = ort.SessionOptions()
            options.log_severity_level = 3
            if self.onnx_path is not None:
                model = str(self.onnx_path)
            else:
                model = self.to_onnx().SerializeToString()
            self._ort_session = ort.InferenceSession(
                model, options, providers=["CPUExecutionProvider"]
            )
        return self._ort_session

    def to_onnx(
        self,
        path: str | Path | None = None,
        opset: int | None = None,
        inline_functions: bool = False,
    ) -> onnx.ModelProto:
        """The ONNX model; with ``path``, also check it and write it there as ``-o`` does
        (``"-"`` is standard output, a FIFO or device is written through, a regular file
        replaced atomically; see :mod:`cnnc.output`).

        Fused ops are model-local functions of standard ops unless ``inline_functions``.
        """
        from cnnc.backends import onnx_export

        opset = onnx_export.DEFAULT_OPSET if opset is None else opset
        if path is not None:
            self.write_onnx(path, opset, inline_functions)
        return onnx_export.to_onnx(self.graph, opset, inline_functions)

    def write_onnx(
        self, path: str | Path, opset: int | None = None, inline_functions: bool = False
    ) -> list[Path]:
        """Check the ONNX model and write it to ``path`` atomically, each weight computed
        as it is written (the model is never whole in memory); returns the files written
        (``path``, and ``path.data`` for weights past 1.8 GB)."""
        from cnnc.backends import onnx_export

        opset = onnx_export.DEFAULT_OPSET if opset is None else opset
        with _gc_paused():
            return onnx_export.export(self.graph, path, opset, inline_functions)

    def to_program(self, source: str = "") -> tuple[str, dict[str, np.ndarray]]:
        """A program in cnnc's language computing this model, and its weights by name."""
        from cnnc.backends.program import to_program

        return to_program(self.graph, source)

    def dump(self) -> str:
        """The IR listing: one aligned line per node, with types and source lines."""
        from cnnc.ir import printer  # only here: compiling never prints

        return printer.dump(self.graph)

    def summary(self, depth: int | None = None, batch: int = 1) -> str:
        """The table of ``cnnc summary``: layers and blocks as a tree (blocks at depth
        ``depth - 1`` folded, with their subtotals; every layer by default), each with its
        op, kernel/stride, input and output shapes, parameters, multiply-accumulates per
        item, output bytes at ``batch``, receptive field/output stride and the values it
        reads where branches merge; then the totals."""
        _check_summary_options(depth, batch)
        from cnnc.ir import printer  # only here: compiling never prints

        return printer.summary(self.graph, batch=batch, depth=depth)

    def summary_rows(self, depth: int | None = None, batch: int = 1) -> list[dict]:
        """The summary's rows as plain data (see :func:`cnnc.ir.printer.summary_rows`)."""
        _check_summary_options(depth, batch)
        from cnnc.ir import printer  # only here: compiling never prints

        return printer.summary_rows(self.graph, batch=batch, depth=depth)

    def tensors(self) -> str:
        """Every parameter tensor with its shape: what a weights file must hold."""
        from cnnc.ir import printer  # only here: compiling never prints

        return printer.tensors(self.graph)

    def fully_conv_report(self, input_size: tuple[int, ...] | None = None) -> str:
        """Output stride and receptive field of one cell of each output of a fully
        convolutional model, and the size of its maps for an input of spatial size
        ``input_size``."""
        from cnnc.passes.convolutionalize import output_shape_for, padded_layers, receptive_field

        if not self.graph.flexible_spatial:
            raise UsageError("the model is not fully convolutional; compile it with --fully-conv")
        dims = "x".join
        lines = []
        shapes = output_shape_for(self.graph, tuple(input_size)) if input_size else None
        for i, out in enumerate(self.graph.outputs):
            stride, field = receptive_field(self.graph, out)
            head = "fully convolutional: " if len(self.graph.outputs) == 1 else f"%{out.name}: "
            window = f"receptive field {dims(map(str, field))}"
            if all(s == 1 for s in stride):
                lines.append(
                    f"{head}output stride 1 (the output has the input's resolution: one cell "
                    f"per pixel), {window} (each cell sees a {dims(map(str, field))} window)"
                )
            else:
                lines.append(
                    f"{head}output stride {dims(map(str, stride))}, {window} (each output "
                    f"cell scores one {dims(map(str, field))} window; windows are "
                    f"{dims(map(str, stride))} apart)"
                )
            if shapes is not None:
                what = "score map" if any(s != 1 for s in stride) else "map"
                lines.append(
                    f"an input of {dims(map(str, input_size))} gives a {what} "
                    f"[{','.join(map(str, shapes[i]))}]"
                )
        padded = padded_layers(self.graph)
        if padded:
            named = ", ".join(padded[:6]) + (
                f" and {len(padded) - 6} more" if len(padded) > 6 else ""
            )
            lines.append(
                f"note: {named} pad or round up, so a cell is not exactly the network run on "
                "a crop: on a crop, the network sees zero padding where the larger image has "
                "pixels"
            )
        else:
            lines.append("no layer pads: every cell equals the classifier run on its window")
        return "\n".join(lines)

    def param_count(self) -> int:
        """Number of parameter values."""
        return self.graph.param_count()

    def __repr__(self) -> str:
        return f"<cnnc.Model {self.name}: {self.param_count():,} parameters>"


def optimize(
    graph: Graph,
    opt_level: int = 2,
    passes: list[str] | None = None,
    fully_conv: bool = False,
    options: PassOptions | None = None,
) -> None:
    """Run a pipeline on a graph in place: ``passes`` by name, or those of ``opt_level``;
    ``fully_conv`` adds convolutionalize."""
    from cnnc.passes.manager import pipeline, run_passes

    names = pipeline(opt_level, passes, fully_conv)
    graph.opt_level = "--passes" if passes is not None else f"-O{opt_level}"
    run_passes(graph, names, options)


def compile(
    source: str | Path,
    *,
    weights: str | Path | None = None,
    seed: int = 0,
    network: str | None = None,
    opt_level: int = 2,
    passes: list[str] | None = None,
    fully_conv: bool = False,
    pass_options: PassOptions | None = None,
    allow_nonfinite: bool = False,
    limits: Limits | Mapping[str, int] | None = None,
    report: bool = False,
) -> Model:
    """Compile a program into a Model.

    ``source`` is a path (a ``Path``, or a string without newlines or braces) or the
    program text itself. Without ``weights`` (an .npz file of tensors named
    ``<layer>.weight`` and ``<layer>.bias``) the weights are seeded He-normal.
    The graph is optimized at ``opt_level`` (0, 1 or 2), or by the named ``passes``;
    ``fully_conv`` makes the classifier fully convolutional. Weights holding NaN or
    infinity are a WeightsError unless ``allow_nonfinite``. ``limits`` (a
    :class:`cnnc.Limits`, or a dict of the limits to change such as ``{"repeat": 20000}``)
    bounds the program and the runs of the model (README, "Limits"). With ``report``, the
    model's ``pass_report`` says what each pass removed, added and rewrote (print it).
    """
    limits = limits_mod.coerce(limits)
    pass_options = _reporting(pass_options, report)
    with limits_mod.using(limits), _gc_paused():
        if _is_path(source):
            path = Path(source)
            program = _parse(_read_text(path), str(source))
        else:
            program = _parse(str(source))
        graph = lower(program, network)
        calibration = None
        if weights is not None:
            weights_mod.load(graph, weights, allow_nonfinite)
        else:
            calibration = weights_mod.initialize(graph, seed)
        optimize(graph, opt_level, passes, fully_conv, pass_options)
    model = Model(graph, random_weights=weights is None, limits=limits, calibration=calibration)
    model.pass_report = pass_options.report if pass_options is not None else None
    return model


def _reporting(options: PassOptions | None, report: bool) -> PassOptions | None:
    """The pass options, with a report to fill in if one is asked for."""
    if not report or (options is not None and options.report is not None):
        return options
    from dataclasses import replace

    from cnnc.passes.manager import Options
    from cnnc.passes.report import PassReport

    return replace(options or Options(), report=PassReport())


def load(
    path: str | Path,
    *,
    weights: str | Path | None = None,
    seed: int = 0,
    network: str | None = None,
    opt_level: int = 2,
    passes: list[str] | None = None,
    fully_conv: bool = False,
    pass_options: PassOptions | None = None,
    allow_nonfinite: bool = False,
    limits: Limits | Mapping[str, int] | None = None,
    report: bool = False,
) -> Model:
    """A Model from a file: an ONNX model (.onnx) or a program (anything else), optimized
    as :func:`compile` does, under the same ``limits`` (and with the same ``report``); an
    ONNX model whose initializers hold NaN or infinity is a WeightsError unless
    ``allow_nonfinite``."""
    path = Path(path)
    pass_options = _reporting(pass_options, report)
    if path.suffix.lower() != ".onnx":
        return compile(
            path,
            weights=weights,
            seed=seed,
            network=network,
            opt_level=opt_level,
            passes=passes,
            fully_conv=fully_conv,
            pass_options=pass_options,
            allow_nonfinite=allow_nonfinite,
            limits=limits,
        )
    if weights is not None:
        raise UsageError("an ONNX model carries its own weights; --weights applies to programs")
    from cnnc.frontend.onnx_import import load_onnx

    limits = limits_mod.coerce(limits)
    with limits_mod.using(limits):
        graph = load_onnx(path)
        if not allow_nonfinite:
            weights_mod.check_finite(graph, str(path))
        optimize(graph, opt_level, passes, fully_conv, pass_options)
    # onnxruntime runs the file itself unless a pass rewrote the graph.
    model = Model(graph, onnx_path=None if graph.pipeline else path, limits=limits)
    model.pass_report = pass_options.report if pass_options is not None else None
    return model


def read_input(path: str | Path) -> np.ndarray | dict[str, np.ndarray]:
    """An input batch from a .npy file, or named batches (one per input) from an .npz
    file; headers are checked before any array is allocated, and nothing is unpickled."""
    from cnnc.npyfile import ArrayFileError, open_array_file

    hint = "save an input with numpy.save(path, array), or several with numpy.savez"
    loaded = open_array_file(path, InputError, "input file", hint)
    if isinstance(loaded, np.ndarray):
        return loaded
    with loaded:
        try:
            return {name: loaded.read(name) for name in loaded.names}
        except ArrayFileError as e:
            raise InputError(f"cannot read the input file: {e}", str(path), hint=hint) from None
        except MemoryError:
            raise InputError("out of memory while reading the input", str(path)) from None


def _lowered(source: str | Path, network: str | None, limits: Limits) -> Graph:
    """The graph of a program as lowering makes it, before any pass and with no weights."""
    with limits_mod.using(limits), _gc_paused():
        if _is_path(source):
            program = _parse(_read_text(Path(source)), str(source))
        else:
            program = _parse(str(source))
        return lower(program, network)


def fit(
    source: str | Path,
    data: str | Path | tuple[np.ndarray, np.ndarray],
    output: str | Path | None = None,
    *,
    network: str | None = None,
    epochs: int = 10,
    batch: int = 32,
    optimizer: str | Optimizer = "adam",
    lr: float | None = None,
    shuffle: bool = True,
    seed: int = 0,
    weights: str | Path | None = None,
    backend: str = "numpy",
    val_split: float = 0.2,
    on_epoch: Callable[[Epoch], None] | None = None,
    on_step: Callable[[Progress], None] | None = None,
    on_start: Callable[[str], None] | None = None,
    limits: Limits | Mapping[str, int] | None = None,
) -> TrainResult:
    """Train a program's network on ``data`` (``"digits"``, an .npz file of ``x`` and
    ``y``, or a pair of arrays) and return the learned tensors with each epoch's
    figures; with ``output``, the tensors are also written there (atomically) after
    every epoch. ``optimizer`` is ``"sgd"``, ``"adam"``, ``"adamw"`` or a
    :class:`cnnc.train.step.Optimizer` (momentum, Nesterov, weight decay, betas);
    ``lr`` defaults to 0.01 for SGD and 0.001 for Adam and AdamW. The README's
    "Training" section gives every rule (split, shuffling, initialisation, errors)."""
    from cnnc.data import load as load_data
    from cnnc.train.step import Optimizer as Opt
    from cnnc.train.trainer import Trainer

    if _is_path(source) and Path(source).suffix.lower() == ".onnx":
        raise UsageError(
            "cnnc trains a program (.cnn), not an ONNX model",
            str(source),
            hint="write the network as a program and its weights as a file "
            "(cnnc import MODEL.onnx does), then train it with --weights",
        )
    limits = limits_mod.coerce(limits)
    dataset = load_data(data)
    graph = _lowered(source, network, limits)
    with limits_mod.using(limits):
        trainer = Trainer(
            graph,
            optimizer=optimizer if isinstance(optimizer, Opt) else Opt(optimizer),
            lr=lr,
            batch=batch,
            seed=seed,
            shuffle=shuffle,
            backend=backend,
            weights=weights,
        )
        return trainer.fit(
            dataset,
            epochs=epochs,
            val_split=val_split,
            output_path=output,
            on_epoch=on_epoch,
            on_step=on_step,
            on_start=on_start,
        )


SPLITS = ("val", "train", "all")


def evaluate(
    model: Model | str | Path,
    data: str | Path | tuple[np.ndarray, np.ndarray],
    *,
    weights: str | Path | None = None,
    split: str = "val",
    val_split: float = 0.2,
    backend: str = "numpy",
    network: str | None = None,
) -> Evaluation:
    """Accuracy, per-class accuracy and confusion matrix of a classifier on ``data``: a
    :class:`Model`, or a program or ONNX file compiled (optimized as usual) with
    ``weights``. ``split`` picks the rows: ``"val"`` (the rows ``cnnc train`` held out
    with the same ``val_split``), ``"train"`` (the others) or ``"all"``."""
    from cnnc.data import load as load_data
    from cnnc.data import split as split_rows
    from cnnc.train.evaluate import evaluate as run_evaluation

    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}", hint="val, train or all")
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    dataset = load_data(data)
    if split != "all":
        rows = split_rows(len(dataset), val_split)
        dataset = dataset.rows(rows.val if split == "val" else rows.train)
        if not len(dataset):
            raise UsageError(f"--val-split {val_split} holds out no row to evaluate on")
    if not isinstance(model, Model):
        if weights is None and Path(str(model)).suffix.lower() != ".onnx":
            raise UsageError("evaluation needs trained weights", hint="pass --weights W.npz")
        model = load(model, weights=weights, network=network)
    names = {"val": "validation", "train": "training", "all": "all"}
    return run_evaluation(model, dataset, names[split], backend)


# The passes a training step runs (unless clean_up=False, or -O0): they remove what
# computes nothing, never rewrite arithmetic (fold-bn and fuse-conv-act do not apply to a
# network in training, whose step is built from the graph before any pass).
TRAINING_CLEAN_UPS = ["remove-identity", "dce"]


def training_step(
    source: str | Path,
    *,
    optimizer: str | Optimizer = "adam",
    loss: str | None = None,
    network: str | None = None,
    weights: str | Path | None = None,
    allow_nonfinite: bool = False,
    clean_up: bool = True,
    pass_options: PassOptions | None = None,
    limits: Limits | Mapping[str, int] | None = None,
) -> TrainingStep:
    """The graph of one training step of a program's network (see
    :mod:`cnnc.train.step`): its inputs the parameters, the running statistics, the
    optimizer's state, a batch, its labels (or targets) and the learning rate; its outputs
    the new value of each state input, the loss and the network's output.

    ``optimizer``: ``"sgd"``, ``"adam"``, ``"adamw"`` (torch.optim's defaults) or a
    :class:`cnnc.Optimizer` (default Adam, as ``cnnc compile --train``); ``loss``:
    ``"cross_entropy"`` or ``"mse"`` (default: cross-entropy for a classifier). The step
    is built from the network as lowered, before any optimization pass; then the
    clean-ups remove-identity and dce run on it unless ``clean_up`` is False.
    ``weights`` (an .npz file) gives :meth:`TrainingStep.initial_state` its starting
    parameters. ``step.to_onnx(path)`` writes the step as an ONNX model that
    trains in onnxruntime (README, "The training step in ONNX")."""
    from cnnc.passes.manager import run_passes
    from cnnc.train.step import Optimizer as Opt
    from cnnc.train.step import build_step

    limits = limits_mod.coerce(limits)
    if isinstance(optimizer, str):
        optimizer = Opt(optimizer)
    with limits_mod.using(limits), _gc_paused():
        if _is_path(source):
            path = Path(source)
            if path.suffix.lower() == ".onnx":
                raise UsageError(
                    "a training step is built from a program (.cnn), not from an ONNX model",
                    str(path),
                    hint="write the network as a program (cnnc import MODEL.onnx does)",
                )
            program = _parse(_read_text(path), str(source))
        else:
            program = _parse(str(source))
        forward = lower(program, network)
        if weights is not None:
            weights_mod.load(forward, weights, allow_nonfinite)
        step = build_step(forward, loss=loss, optimizer=optimizer)
        if clean_up:
            run_passes(step.graph, TRAINING_CLEAN_UPS, pass_options)
            step.graph.opt_level = "-O1"
    return step
