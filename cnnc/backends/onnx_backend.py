"""cnnc's interpreter as an onnx.backend.base.Backend, so ONNX's own backend tests can run it."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.backend.base import Backend, BackendRep

from cnnc.api import Model, optimize
from cnnc.frontend.onnx_import import load_onnx


class CnncBackendRep(BackendRep):
    """A model imported into the IR, optimized, and prepared for the interpreter."""

    def __init__(self, model: Model):
        self.model = model

    def run(self, inputs: Any, **kwargs: Any) -> tuple[np.ndarray, ...]:
        """Run on one array per graph input (a list, or a single array)."""
        arrays = list(inputs) if isinstance(inputs, list | tuple) else [inputs]
        return tuple(self.model.interpreter.run(*arrays))


# Inputs of these ops that cnnc compiles as constants (weights, shapes, bounds).
PARAMETER_INPUTS = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (1, 2),
    "MatMul": (1,),
    "BatchNormalization": (1, 2, 3, 4),
    "LayerNormalization": (1, 2),
    "GroupNormalization": (1, 2),
    "InstanceNormalization": (1, 2),
    "Clip": (1, 2),
    "Reshape": (1,),
    "Dropout": (1, 2),
    "Unsqueeze": (1,),
    "Squeeze": (1,),
    "Pad": (1, 2, 3),
    "Slice": (1, 2, 3, 4),
    "Split": (1,),
    "Resize": (1, 2, 3),
    "Upsample": (1,),
}


def bind_parameters(
    model: onnx.ModelProto, inputs: list[np.ndarray]
) -> tuple[onnx.ModelProto, list[np.ndarray]]:
    """Make graph inputs that feed only weight positions initializers holding ``inputs``'
    values; return the model and the inputs that remain."""
    initialized = {i.name for i in model.graph.initializer}
    fed = [vi for vi in model.graph.input if vi.name not in initialized]
    values = dict(zip((vi.name for vi in fed), inputs, strict=True))
    as_parameter: dict[str, set[bool]] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            as_parameter.setdefault(name, set()).add(i in PARAMETER_INPUTS.get(node.op_type, ()))
    bound = onnx.ModelProto()
    bound.CopyFrom(model)
    remaining = []
    for vi in fed:
        if as_parameter.get(vi.name) == {True}:
            bound.graph.initializer.append(numpy_helper.from_array(values[vi.name], vi.name))
            if model.ir_version >= 4:  # before IR 4, initializers are listed as inputs too
                bound.graph.input.remove(next(v for v in bound.graph.input if v.name == vi.name))
        else:
            remaining.append(values[vi.name])
    return bound, remaining


class CnncBackend(Backend):
    """Runs ONNX models in the NumPy interpreter, on the CPU, at -O2 unless told otherwise."""

    @classmethod
    def prepare(
        cls, model: onnx.ModelProto, device: str = "CPU", opt_level: int = 2, **kwargs: Any
    ) -> CnncBackendRep:
        graph = load_onnx(model)
        optimize(graph, opt_level)
        return CnncBackendRep(Model(graph))

    @classmethod
    def run_model(
        cls, model: onnx.ModelProto, inputs: Any, device: str = "CPU", **kwargs: Any
    ) -> tuple[np.ndarray, ...]:
        """Run a model once; inputs that feed only weight positions are compiled as
        constants first, since cnnc's layers have constant weights."""
        arrays = list(inputs) if isinstance(inputs, list | tuple) else [inputs]
        bound, remaining = bind_parameters(model, arrays)
        return cls.prepare(bound, device, **kwargs).run(remaining)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device == "CPU"
