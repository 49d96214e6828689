"""compress export."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from compressor import atomic
from compressor.errors import UserError
from compressor.modeldir import load_model_dir
from exporters.model_export import FORMATS

from . import common as c
from .output import out as console_out


def export(
    directory: Annotated[Path, typer.Argument(help="Model directory to export.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output: a .onnx or .engine file; a directory for openvino (model.xml + model.bin).")],
    format: Annotated[str, typer.Option("--format", "-f", help=f"{' or '.join(FORMATS)}.")] = "onnx",
    precision: Annotated[str, typer.Option(help="fp32, fp16 or int8: written into the ONNX graph (openvino: f32 or f16-compressed weights, or NNCF int8).")] = "fp32",
    data: c.Data = None,
    tolerance: Annotated[Optional[float], typer.Option(help="Max |ONNX - PyTorch| allowed (default per precision).")] = None,
    calib_size: Annotated[int, typer.Option(help="int8: calibration images (class-balanced, training split).")] = 256,
    check_size: Annotated[int, typer.Option(help="Test images compared between PyTorch and the export.")] = 64,
    min_batch: Annotated[int, typer.Option(help="tensorrt: smallest batch of the optimization profile.")] = 1,
    opt_batch: Annotated[int, typer.Option(help="tensorrt: batch the engine is tuned for.")] = 8,
    max_batch: Annotated[int, typer.Option(help="tensorrt: largest batch.")] = 64,
    workspace_gb: Annotated[float, typer.Option(help="tensorrt: builder workspace limit (GiB).")] = 4.0,
    timing_cache: Annotated[Optional[Path], typer.Option(help="tensorrt: timing cache file, read and updated.")] = None,
    version_compatible: Annotated[bool, typer.Option("--version-compatible", help="tensorrt: engine the lean runtime (tensorrt_lean) can run.")] = False,
    overwrite: c.Overwrite = False,
):
    """Write the physically smaller model as ONNX, an OpenVINO IR (both checked against PyTorch) or a TensorRT engine."""
    fmt = FORMATS.get(format)
    if fmt is None:
        raise UserError(f"--format must be {' or '.join(FORMATS)}")
    if precision not in fmt.precisions:
        raise UserError(f"--precision must be one of {', '.join(fmt.precisions)}")
    if calib_size < 1 or check_size < 1:
        raise UserError("--calib-size and --check-size must be >= 1")
    atomic.check_output_path(out, overwrite, kind="dir" if fmt.name == "openvino" else "file")
    lm = load_model_dir(directory)
    if fmt.name == "openvino":
        rep = fmt.write(lm, out, precision, data, tolerance, calib_size, check_size)
        a = rep["agreement"]
        size = sum(f["bytes"] for f in rep["files"].values())
        acc = rep.get("accuracy")
        extra = (f"; top-1 on {acc['images']} test images {100 * acc['top1_fp32']:.2f}% (fp32) -> "
                 f"{100 * acc['top1_int8']:.2f}% (int8)") if acc else ""
        console_out.print(f"wrote {out}/ (OpenVINO {rep['openvino']} IR, {size:,} bytes, {precision}); OpenVINO (f32 inference) "
                          f"vs PyTorch on {a['inputs_are']}: max |diff| {a['max_abs_diff']:.3g}, top-1 agreement "
                          f"{100 * a['top1_agreement']:.1f}%{extra}")
        return
    if fmt.name == "onnx":
        rep = fmt.write(lm, out, precision, data, tolerance, calib_size, check_size)
        a = rep["agreement"]
        console_out.print(f"wrote {out} ({rep['bytes']:,} bytes, opset {rep['opset']}, {precision}); onnx.checker passed; "
                          f"ONNX Runtime vs PyTorch on {a['inputs_are']}: max |diff| {a['max_abs_diff']:.3g}, "
                          f"top-1 agreement {100 * a['top1_agreement']:.1f}%")
        return
    rep = fmt.write(lm, out, precision, data, min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch,
                          workspace_gb=workspace_gb, timing_cache=timing_cache, version_compatible=version_compatible,
                          calib_size=calib_size, check_size=check_size)
    a = rep["agreement_vs_onnxruntime"]
    console_out.print(f"wrote {out} (TensorRT {rep['tensorrt']['tensorrt']}, {precision}, GPU {rep['tensorrt']['gpu']['name']}); "
                      f"vs ONNX Runtime: max |diff| {a['max_abs_diff']:.3g}, top-1 agreement {100 * a['top1_agreement']:.1f}%")
