"""Precision written into the ONNX graph, so ONNX Runtime and strongly-typed TensorRT run the same model.

Both conversions use ONNX Runtime's own tooling (already a dependency, maintained with the runtime that
checks the result): its float16 converter, and its static quantizer writing explicit Q/DQ pairs, the
form TensorRT's explicit-quantization path consumes. NVIDIA ModelOpt would add a large dependency for
the same graph form.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

PRECISIONS = ("fp32", "fp16", "int8")
# Numerically sensitive ops stay in float32: softmax, normalisation, reductions.
FP32_OPS = ["Softmax", "LogSoftmax", "LayerNormalization", "BatchNormalization", "GroupNormalization",
            "InstanceNormalization", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceL2", "GlobalAveragePool"]
# Tolerances for |ONNX - PyTorch| <= atol + rtol * max|PyTorch|, and minimum top-1 agreement.
TOLERANCE = {"fp32": (1e-4, 1e-4, 1.0), "fp16": (2e-2, 2e-2, 0.98), "int8": (None, None, 0.90)}


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    # op_block_list replaces the converter's own list: extend it, or ops it knows to keep in fp32 get converted
    blocked = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP32_OPS))
    converted = OnnxModel(convert_float_to_float16(model, keep_io_types=True, op_block_list=blocked))
    converted.topological_sort()  # the converter appends its I/O casts out of order; onnx.checker requires order
    # It also leaves stale element types on intermediate value_info; shape inference recomputes them.
    del converted.model.graph.value_info[:]
    return converted.model


def to_int8(fp32_path: Path, out_path: Path, calib: np.ndarray, input_name: str, batch: int = 32) -> None:
    """Static INT8, symmetric per-channel weights and symmetric activations, as explicit Q/DQ nodes."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{input_name: calib[i:i + batch]} for i in range(0, len(calib), batch)])

        def get_next(self):
            return next(self.it, None)

    pre = out_path.with_name(out_path.name + ".pre.onnx")
    try:
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        # Biases stay float: TensorRT's ONNX parser rejects DequantizeLinear of INT32
                        # (onnx-tensorrt #850), which QuantizeBias (the default) writes for every bias.
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False})
    finally:
        pre.unlink(missing_ok=True)


def non_int8_dequantize_inputs(model: onnx.ModelProto) -> list[str]:
    """DequantizeLinear nodes whose quantized input is not INT8 (TensorRT builds only INT8/FP8 Q/DQ)."""
    types = {i.name: i.data_type for i in model.graph.initializer}
    qtypes = {n.output[0]: None for n in model.graph.node if n.op_type == "QuantizeLinear"}
    bad = []
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] in qtypes:
            continue  # the output of a QuantizeLinear is INT8 by our quantizer's settings
        if types.get(n.input[0]) != onnx.TensorProto.INT8:
            bad.append(n.name or n.input[0])
    return bad
