"""Running models in onnxruntime and comparing every value the interpreter computes."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

import cnnc
from cnnc.backends import onnx_export
from cnnc.backends.interpreter import Interpreter

RTOL, ATOL = 1e-4, 1e-5


def ort_session(model) -> ort.InferenceSession:
    """An onnxruntime CPU session of an ONNX ModelProto."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def assert_every_value_agrees(model: cnnc.Model, *inputs: np.ndarray, opset: int = 17) -> int:
    """Run the model with every node output exposed, in the interpreter and in onnxruntime,
    and compare them value by value; returns how many values were compared.

    The network's outputs must agree within RTOL and ATOL. An intermediate value may
    be a sum of thousands of products that cancels to nearly zero, where two correct
    float32 summation orders differ by more than ATOL; its ATOL is therefore scaled by
    the tensor's largest magnitude.
    """
    graph = model.graph
    final = list(graph.outputs)
    graph.outputs = [v for node in graph.nodes for v in node.outputs]
    try:
        interpreter = Interpreter(graph)
        session = ort_session(onnx_export.to_onnx(graph, opset))
    finally:
        graph.outputs = final
    final_names = {v.name for v in final}
    names = [o.name for o in session.get_outputs()]
    for x in inputs:
        ours = interpreter.run(x)
        theirs = session.run(None, {graph.inputs[0].name: x})
        for value, a, b in zip(names, ours, theirs, strict=True):
            scale = 1.0 if value in final_names else max(1.0, float(np.abs(b).max(initial=0)))
            np.testing.assert_allclose(
                a, b, rtol=RTOL, atol=ATOL * scale, err_msg=f"value %{value}, batch {len(x)}"
            )
    return len(names)
