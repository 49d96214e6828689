"""compress package."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from compressor import atomic
from compressor.errors import UserError
from compressor.modeldir import load_model_dir
from exporters.bundle import TARGETS, build, verify as verify_bundle

from . import common as c
from .output import out as console_out


def package(
    directory: Annotated[Optional[Path], typer.Argument(help="Model directory to package.")] = None,
    target: Annotated[str, typer.Option(help=f"Where it will run: {', '.join(TARGETS)}.")] = "onnxruntime-cpu",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Bundle file (.tar.gz).")] = None,
    precision: Annotated[str, typer.Option(help="fp32, fp16 or int8 (in the ONNX graph).")] = "fp32",
    samples: Annotated[int, typer.Option(help="Sample test images (with recorded outputs) for --verify.")] = 8,
    no_profile: Annotated[bool, typer.Option("--no-profile", help="Skip the build machine's latency record.")] = False,
    verify: Annotated[Optional[Path], typer.Option("--verify", help="Check a bundle: checksums, schema, sample outputs.")] = None,
    overwrite: c.Overwrite = False,
):
    """Write a self-contained deployment bundle, or --verify one."""
    if verify is not None:
        if directory is not None:
            raise UserError("--verify takes a bundle file, not a model directory")
        r = verify_bundle(verify)
        extra = f"; {r['samples']} sample outputs match (max |diff| {r['max_abs_diff']:.2g})" if r["samples"] else ""
        console_out.print(f"bundle OK: {r['files']} files match their SHA-256{extra}; target {r['target']}")
        return
    if directory is None or out is None:
        raise UserError("give a model DIRECTORY and --out bundle.tar.gz (or --verify BUNDLE)")
    atomic.check_output_path(out, overwrite)
    m = build(load_model_dir(directory), target, out, precision, samples, not no_profile)
    console_out.print(f"wrote {out} ({out.stat().st_size:,} bytes): {len(m['files'])} files for {target}; "
                      f"run it with: tar xzf {out.name} && python bundle/run.py IMAGE_OR_FOLDER")
