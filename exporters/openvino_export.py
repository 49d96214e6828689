"""OpenVINO: IR export (model.xml + model.bin in one directory) through OpenVINO's own converter, and the
compiled-model helpers the profiler, the latency table and bundles share.

The IR is converted from the ONNX graph that onnx_export has already checked (OpenVINO's ONNX frontend
is its most mature one), then checked itself against PyTorch with the inference precision pinned to f32:
OpenVINO's CPU plugin otherwise computes in bf16 on CPUs that have it, and a check in bf16 would compare
rounding, not the export.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from compressor import atomic
from compressor.errors import NotAvailable, UserError

XML, BIN = "model.xml", "model.bin"
IR_PRECISIONS = ("fp32", "fp16", "int8")  # what the IR stores: f32 weights, f16 weights, NNCF int8
INFERENCE_PRECISIONS = ("f32", "bf16", "f16")  # what the plugin computes in
DEVICES = ("cpu", "gpu", "npu")


def require_openvino():
    try:
        import openvino as ov
    except ImportError as e:
        raise NotAvailable("OpenVINO", f"the openvino package does not import ({e}); "
                                       "install it with pip install -e '.[openvino]'") from None
    return ov


def version() -> str | None:
    try:
        import openvino as ov
    except ImportError:
        return None
    return ov.__version__.split("-")[0]


def ir_path(p: str | os.PathLike) -> Path | None:
    """The model.xml of an IR directory or an .xml path; None when `p` is neither."""
    p = Path(p)
    if p.is_dir() and (p / XML).is_file():
        return p / XML
    if p.suffix == ".xml" and p.is_file():
        return p
    return None


def compile_model(path: str | os.PathLike, device: str = "cpu", precision: str = "f32", threads: int | None = None,
                  batch: int | None = None, profiling: bool = False):
    """Compile an IR (.xml) or ONNX file for one device with the inference precision pinned. With `batch`
    the dynamic batch axis is fixed first (a static shape, as deployments run it); `profiling` turns on
    the per-node performance counters."""
    ov = require_openvino()
    if device not in DEVICES:
        raise UserError(f"OpenVINO device must be one of {', '.join(DEVICES)} (got {device})")
    if precision not in INFERENCE_PRECISIONS:
        raise UserError(f"OpenVINO inference precision must be one of {', '.join(INFERENCE_PRECISIONS)} (got {precision})")
    try:
        model = ov.Core().read_model(str(path))
        if batch is not None:
            shape = model.inputs[0].get_partial_shape()
            shape[0] = batch
            model.reshape({model.inputs[0].get_any_name(): shape})
    except RuntimeError as e:
        raise UserError(f"OpenVINO cannot read {path}: {str(e).strip().splitlines()[0][:200]}") from None
    return compile_model_object(model, device, precision, threads, what=str(path), profiling=profiling)


def compile_model_object(model, device: str, precision: str, threads: int | None = None, what: str = "the model",
                         profiling: bool = False):
    """compile_model for an ov.Model already in memory (the latency table's graphs); `profiling` turns on
    the per-node performance counters."""
    ov = require_openvino()
    core = ov.Core()
    dev = device.upper()
    available = core.available_devices
    if not any(d == dev or d.startswith(dev + ".") for d in available):
        raise NotAvailable(f"OpenVINO {dev}", f"OpenVINO reports only {', '.join(available) or 'no devices'} on this machine")
    config: dict[str, str | int] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    if profiling:
        config["PERF_COUNT"] = "YES"
    try:
        return core.compile_model(model, dev, config)
    except RuntimeError as e:
        raise UserError(f"OpenVINO cannot compile {what} for {dev}: {str(e).strip().splitlines()[0][:200]}") from None


def applied_precision(compiled) -> str:
    """The precision the plugin actually uses (it may ignore a hint the hardware cannot honour)."""
    got = compiled.get_property("INFERENCE_PRECISION_HINT")
    return got.to_string() if hasattr(got, "to_string") else str(got)  # an ov.Type: "f32", "bf16", "f16"


def infer(compiled, x: np.ndarray, batch: int = 64) -> list[np.ndarray]:
    """Every output of the compiled model on `x`, in the model's output order."""
    request = compiled.create_infer_request()
    runs = [request.infer({0: x[i:i + batch]}) for i in range(0, len(x), batch)]
    return [np.concatenate([np.array(r[out]) for r in runs]) for out in compiled.outputs]


def convert(onnx_path: Path, out_dir: Path, precision: str, calib: np.ndarray | None = None) -> None:
    """Write model.xml/.bin into out_dir: f32 weights, f16-compressed weights, or NNCF post-training INT8."""
    ov = require_openvino()
    try:
        model = ov.convert_model(str(onnx_path))
    except Exception as e:  # the converter raises its own OpConversionFailure and friends
        raise UserError(f"OpenVINO's converter failed: {str(e).strip().splitlines()[0][:200]}") from None
    if precision == "int8":
        if calib is None:
            raise UserError("int8 export needs calibration data (the model's dataset or `data`)")
        model = _quantize(model, calib)
    ov.save_model(model, str(out_dir / XML), compress_to_fp16=precision == "fp16")


def _quantize(model, calib: np.ndarray, batch: int = 32):
    try:
        import nncf
    except ImportError as e:
        raise NotAvailable("OpenVINO int8 (NNCF)", f"the nncf package does not import ({e}); "
                                                   "install it with pip install -e '.[openvino]'") from None
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

    batches = [calib[i:i + batch] for i in range(0, len(calib), batch)]
    # Bias correction off: on our digits ResNet-20 NNCF's (fast) bias correction cut top-1 agreement with
    # PyTorch from 97 % to 70 %, at batch 1 or 32; plain min-max int8 matches ONNX Runtime's quantizer.
    return nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches),  # NNCF counts items: batches
                         advanced_parameters=AdvancedQuantizationParameters(disable_bias_correction=True))


def write_ir(onnx_path: Path, out_dir: Path, *, precision: str, reference: list[np.ndarray], inputs: np.ndarray, within,
             calib: np.ndarray | None = None) -> dict:
    """Convert the checked ONNX at `onnx_path` into `out_dir` (the caller's staging directory), then compare
    the IR in f32 with the PyTorch `reference` outputs on `inputs`; `within(agreement)` returns None or the
    reason to refuse (raised as one line)."""
    from .onnx_export import compare

    if precision not in IR_PRECISIONS:
        raise UserError(f"`precision` must be one of {', '.join(IR_PRECISIONS)}")
    convert(onnx_path, out_dir, precision, calib)
    compiled = compile_model(out_dir / XML, "cpu", "f32")
    agreement = compare(reference, infer(compiled, inputs))
    problem = within(agreement)
    if problem:
        raise UserError(f"refusing to write the OpenVINO IR: OpenVINO vs PyTorch: {problem}")
    return {"files": {n: {"bytes": (out_dir / n).stat().st_size, "sha256": atomic.sha256_file(out_dir / n)} for n in (XML, BIN)},
            "openvino": version(), "precision": precision, "agreement": agreement.to_json(),
            "inference_precision_checked": applied_precision(compiled)}


def top1(compiled, batches) -> float:
    """Top-1 of a compiled model over (images, labels) batches."""
    right = total = 0
    for x, y in batches:
        pred = infer(compiled, x.numpy())[0].argmax(1)
        right += int((pred == y.numpy()).sum())
        total += len(y)
    return right / max(total, 1)
