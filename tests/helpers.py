"""Running models in onnxruntime and comparing results with cnnc's criterion of agreement."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

import cnnc
from cnnc.backends import onnx_export
from cnnc.backends.interpreter import Interpreter
from cnnc.compare import ATOL, INTERMEDIATE_RTOL, RTOL, tolerance

__all__ = ["ATOL", "RTOL", "assert_agree", "assert_every_value_agrees", "ort_session"]


def ort_session(model) -> ort.InferenceSession:
    """An onnxruntime CPU session of an ONNX ModelProto."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def assert_agree(actual: np.ndarray, expected: np.ndarray, what: str = "") -> None:
    """Equal under cnnc.compare's criterion (rtol 1e-4, atol 1e-5 + 1e-4·max|expected|, over
    the finite values; NaN and ±inf at the same places)."""
    assert actual.size == expected.size, f"{what}: sizes {actual.shape} and {expected.shape}"
    np.testing.assert_allclose(
        actual.reshape(expected.shape),
        expected,
        rtol=RTOL,
        atol=tolerance(expected),
        err_msg=what,
    )


def assert_every_value_agrees(
    model: cnnc.Model, *inputs, opset: int = 17, outputs_as_intermediates: bool = False
) -> int:
    """Run the model with every node output exposed, in the interpreter and in onnxruntime,
    and compare them value by value; returns how many values were compared.

    The outputs must agree under cnnc.compare's criterion. Inside a deep network a
    batch-norm of a low-variance channel amplifies float32 rounding (measured on
    ResNet-50 against a float64 run: 9e-5 of the tensor's magnitude for us, 6e-5 for
    onnxruntime, before the last stage), so intermediate values must agree within
    1e-3 of their magnitude: ten times looser, and still far below what any wrong
    kernel produces. ``outputs_as_intermediates`` holds the outputs to that tolerance
    too, for networks whose outputs carry that rounding in both engines (measured on the
    dilated FCN-ResNet-50 at -O0 against a float64 PyTorch run: 1.1e-4 of the output's
    magnitude for us, 7.6e-5 for onnxruntime, so they may differ by more than 1e-4).
    """
    graph = model.graph
    final = list(graph.outputs)
    graph.outputs = [v for node in graph.nodes for v in node.outputs]
    try:
        interpreter = Interpreter(graph)
        session = ort_session(onnx_export.to_onnx(graph, opset))
    finally:
        graph.outputs = final
    names = [o.name for o in session.get_outputs()]
    outputs = {v.name for v in final}
    for x in inputs:
        # One array for a network of one input, or a list of one array per input.
        xs = list(x) if isinstance(x, list | tuple) else [x]
        ours = interpreter.run(*xs)
        theirs = session.run(None, dict(zip(model.input_names, xs, strict=True)))
        for value, a, b in zip(names, ours, theirs, strict=True):
            what = f"value %{value}, batch {len(xs[0])}"
            if value in outputs and not outputs_as_intermediates:
                assert_agree(a, b, what)
            else:
                atol = tolerance(b, INTERMEDIATE_RTOL)
                np.testing.assert_allclose(a, b, rtol=RTOL, atol=atol, err_msg=what)
    return len(names)
