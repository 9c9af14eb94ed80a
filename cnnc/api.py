"""The Python API: compile a program or load an ONNX file, then run, export, dump, summarise."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cnnc import weights as weights_mod
from cnnc.errors import CnncError, InputError, UsageError
from cnnc.frontend.lower import lower
from cnnc.frontend.parser import Program
from cnnc.frontend.parser import parse as _parse
from cnnc.ir import printer
from cnnc.ir.graph import Graph

if TYPE_CHECKING:
    import onnx

    from cnnc.backends.interpreter import Interpreter

BACKENDS = ("numpy", "onnxruntime")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CnncError("file not found", str(path)) from None
    except IsADirectoryError:
        raise CnncError("is a directory, not a program file", str(path)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise CnncError(f"cannot read the program: {e}", str(path)) from None


def parse(text: str, filename: str = "<string>") -> Program:
    """Parse program text into its AST (raises ParseError at the place of a syntax error)."""
    return _parse(text, filename)


def _is_path(source: str | Path) -> bool:
    return isinstance(source, Path) or ("\n" not in source and "{" not in source)


class Model:
    """A compiled network: its IR graph with weights, ready to run, export or inspect."""

    def __init__(
        self, graph: Graph, *, random_weights: bool = False, onnx_path: Path | None = None
    ):
        self.graph = graph
        self.random_weights = random_weights
        self.onnx_path = onnx_path  # the file an imported model came from
        self._interpreter: Interpreter | None = None
        self._ort_session = None

    @property
    def name(self) -> str:
        return self.graph.name

    def random_input(self, batch: int = 1, seed: int = 0) -> np.ndarray:
        """A seeded standard-normal input of the network's shape for ``batch`` items."""
        (value,) = self.graph.inputs
        dims = [batch, *value.type.shape[1:]]
        if not all(isinstance(d, int) for d in dims):
            raise UsageError(f"input %{value.name} has symbolic sizes {value.type}; pass an input")
        return np.random.default_rng(seed).standard_normal(dims, dtype=np.float32)

    def run(self, x: np.ndarray, backend: str = "numpy") -> np.ndarray:
        """Run the network on a batch ``x`` in the NumPy interpreter or in onnxruntime."""
        if backend == "numpy":
            return self.interpreter.run(x)[0]
        if backend == "onnxruntime":
            self.interpreter.check_input(self.graph.inputs[0], x)
            session = self._onnxruntime_session()
            return session.run(None, {session.get_inputs()[0].name: x})[0]
        raise UsageError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")

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

    def to_onnx(self, path: str | Path | None = None, opset: int | None = None) -> onnx.ModelProto:
        """The ONNX model; with ``path``, also check it and write it there atomically."""
        from cnnc.backends import onnx_export

        model = onnx_export.to_onnx(
            self.graph, onnx_export.DEFAULT_OPSET if opset is None else opset
        )
        if path is not None:
            onnx_export.save(model, path)
        return model

    def dump(self) -> str:
        """The IR listing: one aligned line per node, with types and source lines."""
        return printer.dump(self.graph)

    def summary(self) -> str:
        """A table of layers with output shapes, parameter counts and multiply-accumulates."""
        return printer.summary(self.graph)

    def param_count(self) -> int:
        """Number of parameter values."""
        return self.graph.param_count()

    def __repr__(self) -> str:
        return f"<cnnc.Model {self.name}: {self.param_count():,} parameters>"


def compile(
    source: str | Path,
    *,
    weights: str | Path | None = None,
    seed: int = 0,
    network: str | None = None,
) -> Model:
    """Compile a program into a Model.

    ``source`` is a path (a ``Path``, or a string without newlines or braces) or the
    program text itself. Without ``weights`` (an .npz file of tensors named
    ``<layer>.weight`` and ``<layer>.bias``) the weights are seeded He-normal.
    """
    if _is_path(source):
        path = Path(source)
        program = parse(_read_text(path), str(source))
    else:
        program = parse(str(source))
    graph = lower(program, network)
    if weights is not None:
        weights_mod.load(graph, weights)
    else:
        weights_mod.initialize(graph, seed)
    return Model(graph, random_weights=weights is None)


def load(
    path: str | Path,
    *,
    weights: str | Path | None = None,
    seed: int = 0,
    network: str | None = None,
) -> Model:
    """A Model from a file: an ONNX model (.onnx) or a program (anything else)."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        if weights is not None:
            raise UsageError("an ONNX model carries its own weights; --weights applies to programs")
        from cnnc.frontend.onnx_import import load_onnx

        return Model(load_onnx(path), onnx_path=path)
    return compile(path, weights=weights, seed=seed, network=network)


def read_input(path: str | Path) -> np.ndarray:
    """An input batch from a .npy file (never unpickled)."""
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError("input file not found", str(path)) from None
    except (OSError, ValueError) as e:
        raise InputError(
            f"cannot read input array: {e}", str(path), hint="save it with numpy.save(path, array)"
        ) from None
