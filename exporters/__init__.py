"""Export: ONNX (fp32/fp16/int8 in the graph), TensorRT engines, and edge deployment bundles."""
