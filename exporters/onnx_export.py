"""ONNX export with a dynamic batch axis, checked three ways before anything is written:
onnx.checker (full check with shape inference), ONNX Runtime execution, and agreement with PyTorch on
real inputs within the tolerance of the graph's precision.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn

from compressor import atomic, outputs
from compressor.errors import UserError

from .precision import PRECISIONS, TOLERANCE, to_fp16, to_int8

INPUT_NAME = "input"
INT8_RELATIVE = 0.1  # int8 of a model without class logits: |diff| <= 10 % of the largest output


@dataclass
class Agreement:
    max_abs_diff: float
    worst_input: int
    reference_scale: float
    top1_agreement: float
    n: int
    classified: bool = True  # some output is batch x classes; otherwise top-1 agreement is not defined (1.0)
    outputs: int = 1

    def to_json(self) -> dict:
        return {"max_abs_diff": self.max_abs_diff, "worst_input": self.worst_input,
                "reference_max_abs": self.reference_scale, "top1_agreement": self.top1_agreement, "inputs": self.n,
                "outputs": self.outputs, "top1_checked": self.classified}


def ort_session(path: str | os.PathLike, providers: list[str] | None = None, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:
        raise UserError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0][:200]}") from None


def run_ort(session, x: np.ndarray, batch: int = 64) -> list[np.ndarray]:
    """Every output of the graph on `x`, in the graph's output order."""
    name = session.get_inputs()[0].name
    runs = [session.run(None, {name: x[i:i + batch]}) for i in range(0, len(x), batch)]
    return [np.concatenate([r[k] for r in runs]) for k in range(len(runs[0]))]


@torch.no_grad()
def torch_outputs(model: nn.Module, inputs: np.ndarray, batch: int = 64) -> list[np.ndarray]:
    """Every output of the PyTorch model on `inputs` (flattened as torch.export flattens them)."""
    runs = [outputs.flatten(model(torch.from_numpy(inputs[i:i + batch]))) for i in range(0, len(inputs), batch)]
    return [torch.cat([r[k] for r in runs]).float().numpy() for k in range(len(runs[0]))]


def compare(reference: list[np.ndarray] | np.ndarray, got: list[np.ndarray] | np.ndarray) -> Agreement:
    """Agreement over every output: the largest |difference| per input, and top-1 agreement over the
    outputs that are batch x classes."""
    refs = [reference] if isinstance(reference, np.ndarray) else list(reference)
    gots = [got] if isinstance(got, np.ndarray) else list(got)
    if len(refs) != len(gots) or any(r.shape != g.shape for r, g in zip(refs, gots)):
        raise UserError(f"the exported graph returns {[list(g.shape) for g in gots]}; PyTorch returns {[list(r.shape) for r in refs]}")
    n = len(refs[0])
    diff = np.max([np.abs(r.astype(np.float64) - g.astype(np.float64)).reshape(n, -1).max(1) for r, g in zip(refs, gots)], axis=0)
    worst = int(diff.argmax())
    logits = [(r, g) for r, g in zip(refs, gots) if r.ndim == 2 and r.shape[1] > 1]
    agree = float(np.mean([(r.argmax(1) == g.argmax(1)).mean() for r, g in logits])) if logits else 1.0
    scale = float(max(np.abs(r).max() for r in refs))
    return Agreement(float(diff[worst]), worst, scale, agree, n, bool(logits), len(refs))


def within(agreement: Agreement, precision: str, tolerance: float | None = None) -> str | None:
    """None if acceptable, else the reason."""
    atol, rtol, min_agree = TOLERANCE[precision]
    if atol is None and not agreement.classified:  # int8 of a model with no logits: bound the error instead
        atol, rtol = 0.0, INT8_RELATIVE
    if not (math.isfinite(agreement.max_abs_diff) and math.isfinite(agreement.reference_scale)):
        return "the outputs are not finite (NaN or inf): the model's weights or the graph are broken"
    if tolerance is not None:
        atol, rtol = tolerance, 0.0
    if atol is not None and agreement.max_abs_diff > atol + (rtol or 0.0) * agreement.reference_scale:
        return (f"max |ONNX - PyTorch| = {agreement.max_abs_diff:.3g} on input #{agreement.worst_input} exceeds "
                f"the {precision} tolerance {atol + (rtol or 0.0) * agreement.reference_scale:.3g}")
    if agreement.top1_agreement < min_agree:
        return f"top-1 agrees with PyTorch on only {100 * agreement.top1_agreement:.1f}% of inputs (need {100 * min_agree:.0f}%)"
    return None


def _export_fp32(model: nn.Module, shape: tuple[int, int, int]) -> onnx.ModelProto:
    model = model.eval().cpu()
    example = torch.zeros(2, *shape)
    with torch.no_grad():
        names = outputs.names(model(example))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            prog = torch.onnx.export(model, (example,), None, dynamo=True, input_names=[INPUT_NAME],
                                     output_names=names, dynamic_shapes=({0: torch.export.Dim("batch")},),
                                     verbose=False)
        except Exception as e:
            raise UserError(f"torch.onnx.export failed: {str(e).splitlines()[0][:200]}") from None
    if prog is None:  # dynamo=True always returns the program; None would be an exporter bug
        raise UserError("torch.onnx.export returned no program")
    return prog.model_proto


def export(model: nn.Module, shape: tuple[int, int, int], out: Path, *, inputs: np.ndarray,
           inputs_are: str, precision: str = "fp32", calib: np.ndarray | None = None,
           tolerance: float | None = None) -> dict:
    """Write a checked ONNX file to `out` (atomically). `inputs` are real model inputs used to compare."""
    if precision not in PRECISIONS:
        raise UserError(f"`precision` must be one of {', '.join(PRECISIONS)}")
    proto = _export_fp32(model, shape)
    reference = torch_outputs(model, inputs)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp, atomic.writing(out):
        fp32 = Path(tmp) / "fp32.onnx"
        onnx.save(proto, str(fp32))
        final = fp32
        if precision == "fp16":
            final = Path(tmp) / "fp16.onnx"
            onnx.save(to_fp16(onnx.load(str(fp32))), str(final))
        elif precision == "int8":
            if calib is None:
                raise UserError("int8 export needs calibration data (the model's dataset or `data`)")
            final = Path(tmp) / "int8.onnx"
            to_int8(fp32, final, calib, INPUT_NAME)
        try:
            onnx.checker.check_model(str(final), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            raise UserError(f"the exported graph fails onnx.checker: {str(e).splitlines()[0][:200]}") from None
        got = run_ort(ort_session(final), inputs)
        agreement = compare(reference, got)
        problem = within(agreement, precision, tolerance)
        if problem:
            raise UserError(f"refusing to write {out}: {problem}")
        with atomic.temp_path_for(out) as tmp_out:
            os.replace(final, tmp_out)
    graph = onnx.load(str(out), load_external_data=False)
    return {
        "file": str(out), "bytes": out.stat().st_size, "sha256": atomic.sha256_file(out), "precision": precision,
        "opset": max((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), default=None),
        "input": {"name": INPUT_NAME, "shape": ["batch", *shape], "dtype": "float32"},
        "output": {"name": graph.graph.output[0].name}, "outputs": [o.name for o in graph.graph.output], "checker": "onnx.checker full_check passed",
        "agreement": {**agreement.to_json(), "inputs_are": inputs_are},
        "ops": sorted({n.op_type for n in graph.graph.node}),
    }


def initializer_shapes(path: str | os.PathLike) -> dict[str, list[int]]:
    g = onnx.load(str(path), load_external_data=False).graph
    return {i.name: list(i.dims) for i in g.initializer}
