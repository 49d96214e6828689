"""Export a model directory: the inputs used to check it, and the sidecar JSON next to every artefact."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from compressor import atomic
from compressor.data import Dataset, to_model_input
from compressor.errors import UserError
from compressor.modeldir import LoadedModel
from compressor.workflows import dataset_for

from . import onnx_export
from .precision import PRECISIONS, TOLERANCE


def check_inputs(lm: LoadedModel, ds: Dataset | None, n: int = 64) -> tuple[np.ndarray, str]:
    """Real test images in the model's input format where the dataset is known; else random inputs."""
    spec = lm.record.input
    if ds is not None:
        data = ds.test.subset(torch.arange(min(n, len(ds.test))))
        if data.images is not None:
            return to_model_input(data.images, spec).numpy(), f"{len(data)} {ds.spec.name} test images"
        from compressor.data import Batches

        x = torch.cat([b for b, _ in Batches(data, spec, 64)])
        return x.numpy(), f"{len(data)} {ds.spec.name} test images"
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, spec.channels, spec.height, spec.width, generator=g).numpy(), f"{n} random inputs (dataset unknown)"


def calibration(lm: LoadedModel, ds: Dataset | None, n: int) -> np.ndarray | None:
    if ds is None:
        return None
    calib = ds.calibration(n, 0)
    if calib.images is None:
        from compressor.data import Batches

        return torch.cat([b for b, _ in Batches(calib, lm.record.input, 64)]).numpy()
    return to_model_input(calib.images, lm.record.input).numpy()


def model_summary(lm: LoadedModel) -> dict:
    m = lm.record.metrics
    return {"dir": None if lm.path is None else str(lm.path), "arch": lm.record.arch.to_json(),
            "params": m.get("params"), "macs": m.get("macs"), "top1": m.get("top1"), "top5": m.get("top5")}


def export_onnx(lm: LoadedModel, out: Path, precision: str = "fp32", data: str | None = None, tolerance: float | None = None,
                calib_size: int = 256, check_size: int = 64) -> dict:
    ds = dataset_for(data, None, None, None, False, lm.record)
    inputs, what = check_inputs(lm, ds, check_size)
    calib = calibration(lm, ds, calib_size) if precision == "int8" else None
    spec = lm.record.input
    report = onnx_export.export(lm.model, (spec.channels, spec.height, spec.width), out, inputs=inputs, inputs_are=what,
                                precision=precision, calib=calib, tolerance=tolerance)
    report["model"] = model_summary(lm)
    if calib is not None:
        report["calibration_images"] = len(calib)
    report["tolerance"] = dict(zip(("atol", "rtol", "min_top1_agreement"), TOLERANCE[precision]))
    atomic.write_json(out.with_name(out.name + ".json"), report)
    return report


def single_output(lm: LoadedModel, what: str) -> None:
    names = (lm.record.outputs or {}).get("names") or ["logits"]
    if len(names) > 1:
        raise UserError(f"{what} runs models with one output; {lm.path or 'this model'} returns {len(names)} "
                        f"({', '.join(names)}): export it to ONNX or OpenVINO")


def export_tensorrt(lm: LoadedModel, out: Path, precision: str = "fp16", data: str | None = None, *, min_batch=1, opt_batch=8,
                    max_batch=64, workspace_gb=4.0, timing_cache: Path | None = None, version_compatible=False,
                    calib_size=256, check_size=64) -> dict:
    from . import tensorrt_export

    single_output(lm, "TensorRT export")
    tensorrt_export.require_tensorrt()  # fail before any work, with what to install
    spec = lm.record.input
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        onnx_rep = export_onnx(lm, onnx_path, precision, data, None, calib_size, check_size)
        with atomic.temp_path_for(out) as engine_tmp:
            trt_rep = tensorrt_export.build_engine(onnx_path, engine_tmp, precision=precision,
                                                   shape=(spec.channels, spec.height, spec.width), min_batch=min_batch,
                                                   opt_batch=opt_batch, max_batch=max_batch, workspace_gb=workspace_gb,
                                                   timing_cache=timing_cache, version_compatible=version_compatible)
            inputs, what = check_inputs(lm, dataset_for(data, None, None, None, False, lm.record), check_size)
            agreement = tensorrt_export.engine_vs_onnx(engine_tmp, onnx_path, inputs, max_batch, version_compatible)
            problem = onnx_export.within(onnx_export.Agreement(agreement["max_abs_diff"], agreement["worst_input"],
                                                               agreement["reference_max_abs"], agreement["top1_agreement"],
                                                               agreement["inputs"], agreement["top1_checked"],
                                                               agreement["outputs"]), precision)
            if problem:
                raise UserError(f"refusing to write {out}: TensorRT vs ONNX Runtime: {problem}")
    report = {"file": str(out), "tensorrt": trt_rep, "onnx": {k: onnx_rep[k] for k in ("precision", "opset", "agreement")},
              "agreement_vs_onnxruntime": {**agreement, "inputs_are": what}, "model": model_summary(lm),
              "input_shape": ["batch", spec.channels, spec.height, spec.width]}
    atomic.write_json(out.with_name(out.name + ".json"), report)
    return report


def export_openvino(lm: LoadedModel, out: Path, precision: str = "fp32", data: str | None = None,
                    tolerance: float | None = None, calib_size: int = 256, check_size: int = 64,
                    accuracy_size: int = 2000) -> dict:
    """An OpenVINO IR directory (model.xml, model.bin, model.xml.json) converted from the checked ONNX
    graph; int8 through NNCF with top-1 before and after on the test split."""
    from . import openvino_export as ovx

    ovx.require_openvino()  # fail before any work, with what to install
    with atomic.writing(out):
        return _export_openvino(lm, out, precision, data, tolerance, calib_size, check_size, accuracy_size)


def _export_openvino(lm: LoadedModel, out: Path, precision: str, data: str | None, tolerance: float | None,
                     calib_size: int, check_size: int, accuracy_size: int) -> dict:
    from compressor.data import Batches

    from . import openvino_export as ovx

    ds = dataset_for(data, None, None, None, False, lm.record)
    inputs, what = check_inputs(lm, ds, check_size)
    calib = calibration(lm, ds, calib_size) if precision == "int8" else None
    spec = lm.record.input
    shape = (spec.channels, spec.height, spec.width)
    model = lm.model.eval().cpu()
    reference = onnx_export.torch_outputs(model, inputs)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        onnx_rep = onnx_export.export(model, shape, onnx_path, inputs=inputs, inputs_are=what)
        with atomic.staged_dir(out) as stage:
            rep = ovx.write_ir(onnx_path, stage, precision=precision, reference=reference, inputs=inputs, calib=calib,
                               within=lambda a: onnx_export.within(a, precision, tolerance))
            rep["agreement"]["inputs_are"] = what
            if precision == "int8" and ds is not None:
                test = ds.test.subset(torch.arange(min(accuracy_size, len(ds.test))))
                before = ovx.top1(ovx.compile_model(onnx_path, "cpu", "f32"), Batches(test, spec, 64))
                after = ovx.top1(ovx.compile_model(stage / ovx.XML, "cpu", "f32"), Batches(test, spec, 64))
                rep["accuracy"] = {"split": "test", "images": len(test), "top1_fp32": before, "top1_int8": after}
                rep["calibration_images"] = len(calib) if calib is not None else None
            rep.update({"dir": str(out), "format": "openvino-ir", "onnx_opset": onnx_rep["opset"], "model": model_summary(lm),
                        "input": {"name": onnx_export.INPUT_NAME, "shape": ["batch", *shape], "dtype": "float32"},
                        "tolerance": dict(zip(("atol", "rtol", "min_top1_agreement"), TOLERANCE[precision]))})
            atomic.write_json(stage / (ovx.XML + ".json"), rep)
    return rep


@dataclass(frozen=True)
class Format:
    """One export format: its name, the precisions it writes, and the function that writes it."""

    name: str
    precisions: tuple[str, ...]
    write: Callable[..., dict]


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("onnx", PRECISIONS, export_onnx),
    Format("tensorrt", PRECISIONS, export_tensorrt),
    Format("openvino", PRECISIONS, export_openvino),
)}
