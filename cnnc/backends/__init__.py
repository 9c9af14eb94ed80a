"""Backends: ONNX export and the NumPy interpreter."""
