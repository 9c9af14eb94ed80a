"""Front ends: program text and ONNX files into the IR."""
