"""compress package."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from compressor import atomic
from compressor.errors import UserError
from compressor.modeldir import load_model_dir
from exporters.bundle import TARGETS, build, digests, verify as verify_bundle
from profilers.paired import latency_record

from . import common as c
from .output import out as console_out


def package(
    directory: Annotated[Optional[Path], typer.Argument(help="Model directory to package.")] = None,
    target: Annotated[str, typer.Option(help=f"Where it will run: {', '.join(TARGETS)}.")] = "onnxruntime-cpu",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Bundle file (.tar.gz).")] = None,
    precision: Annotated[str, typer.Option(help="fp32, fp16 or int8 (in the ONNX graph).")] = "fp32",
    samples: Annotated[int, typer.Option(help="Sample test images (with recorded outputs) for --verify.")] = 8,
    no_profile: Annotated[bool, typer.Option("--no-profile", help="Skip the build machine's latency record.")] = False,
    verify: Annotated[Optional[Path], typer.Option("--verify", help="Check a bundle without running its code: member list, checksums, schema, sample outputs (with this compress's own preprocessing and ONNX Runtime).")] = None,
    expect_sha256: Annotated[Optional[str], typer.Option("--expect-sha256", help="--verify: the archive's SHA-256 as printed by `compress package`, obtained from its author out of band (the manifest inside authenticates nothing).")] = None,
    allow_custom_runner: Annotated[bool, typer.Option("--allow-custom-runner", help="--verify: accept a run.py that differs from the one this compress version writes (a runner you customised); the output says so. Without it such a bundle fails verification.")] = False,
    overwrite: c.Overwrite = False,
):
    """Write a self-contained deployment bundle, or --verify one."""
    if verify is not None:
        if directory is not None:
            raise UserError("--verify takes a bundle file, not a model directory")
        r = verify_bundle(verify, expect_sha256, allow_custom_runner)
        extra = f"; {r['samples']} sample outputs match (max |diff| {r['max_abs_diff']:.2g})" if r["samples"] else ""
        console_out.print(f"bundle OK: {r['files']} files match their SHA-256{extra}; target {r['target']}")
        if expect_sha256 is None:
            console_out.print("note: without --expect-sha256 this shows the bundle is consistent, not who made it")
        if r["custom_runner"]:
            cr = r["custom_runner"]
            console_out.print(f"CUSTOM RUNNER accepted (--allow-custom-runner): run.py differs from this compress version's "
                              f"(+{cr['added_lines']}/-{cr['removed_lines']} lines, sha256 {cr['sha256']}); it was not run "
                              "and is not verified: read it before you deploy")
        return
    if expect_sha256 is not None or allow_custom_runner:
        raise UserError("--expect-sha256 and --allow-custom-runner go with --verify BUNDLE")
    if directory is None or out is None:
        raise UserError("give a model DIRECTORY and --out bundle.tar.gz (or --verify BUNDLE)")
    atomic.check_output_path(out, overwrite, kind="file")
    m = build(load_model_dir(directory), target, out, precision, samples, None if no_profile else latency_record)
    console_out.print(f"wrote {out} ({out.stat().st_size:,} bytes): {len(m['files'])} files for {target}; "
                      f"run it with: tar xzf {out.name} && python bundle/run.py IMAGE_OR_FOLDER")
    d = digests(out)
    console_out.print(f"archive SHA-256 {d['archive_sha256']} (give it to the receiver for --verify --expect-sha256); "
                      f"manifest SHA-256 {d['manifest_sha256']}")
