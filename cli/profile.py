"""compress profile."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from compressor import atomic
from compressor.errors import GateFailed, UserError
from profilers import gates as gates_mod, report
from profilers.session import Settings, run
from profilers.targets import reference, resolve

from . import common as c
from .output import emit


def profile(
    targets: Annotated[list[str], typer.Argument(help="Model directories, .onnx files, .engine files, OpenVINO IR directories, or a compare run directory.")],
    baseline: Annotated[Optional[str], typer.Option(help="The parent to measure speedups against (a compare run uses its parent).")] = None,
    backend: Annotated[str, typer.Option(help="Comma list of torch, onnxruntime, tensorrt, openvino.")] = "onnxruntime",
    device: Annotated[str, typer.Option(help="cpu, cuda, or auto (cuda where available).")] = "cpu",
    batch_sizes: Annotated[str, typer.Option(help="Comma list of batch sizes.")] = "1,32",
    threads: Annotated[Optional[int], typer.Option(help="CPU threads (emulate a smaller CPU).")] = None,
    rounds: Annotated[int, typer.Option(help="Interleaved rounds per target (the speedup's sample size).")] = 10,
    warmup: Annotated[int, typer.Option(help="Warm-up iterations before the first round.")] = 10,
    min_iters: Annotated[int, typer.Option(help="Minimum timed iterations per round.")] = 20,
    min_time: Annotated[float, typer.Option(help="Minimum seconds per round.")] = 0.3,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the result document (schema in README).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write JSON, Markdown, CSV and PNG plots here.")] = None,
    energy: Annotated[bool, typer.Option("--energy/--no-energy", help="Measure energy where a counter exists.")] = True,
    energy_window: Annotated[float, typer.Option(help="Seconds of inference per energy window.")] = 5.0,
    idle_window: Annotated[float, typer.Option(help="Seconds of idle baseline before each energy window.")] = 2.0,
    energy_estimate: Annotated[Optional[float], typer.Option(help="Labelled estimate from this power in watts (TDP) where no counter exists.")] = None,
    include_transfers: Annotated[bool, typer.Option("--include-transfers", help="GPU: time host-device copies too.")] = False,
    cuda_graphs: Annotated[bool, typer.Option("--cuda-graphs", help="torch on CUDA: replay a captured CUDA graph.")] = False,
    ort_provider: Annotated[Optional[str], typer.Option(help="onnxruntime: cpu, cuda or tensorrt execution provider (default: --device).")] = None,
    ov_device: Annotated[str, typer.Option(help="openvino: cpu, gpu or npu (where OpenVINO reports it).")] = "cpu",
    inference_precision: Annotated[str, typer.Option(help="openvino: f32, bf16 or f16; pinned and recorded in every row (OpenVINO's CPU plugin would otherwise pick bf16 on CPUs that have it).")] = "f32",
    breakdown: Annotated[bool, typer.Option("--breakdown", help="Top operators by time for each target.")] = False,
    reference_models: Annotated[Optional[list[str]], typer.Option("--reference", help="Stock model name to add to the table (repeatable).")] = None,
    assert_speedup: Annotated[Optional[float], typer.Option(help="Fail unless every child is at least this much faster.")] = None,
    assert_realised: Annotated[Optional[float], typer.Option(help="Fail unless speedup / FLOPs speedup reaches this.")] = None,
    max_latency_ms: Annotated[Optional[float], typer.Option(help="Fail if any target's p50 latency exceeds this.")] = None,
    gate_batch_sizes: Annotated[Optional[str], typer.Option(help="Apply --assert-speedup/--assert-realised/--max-latency-ms at these batch sizes only (a small CNN on a big GPU is launch-bound at batch 1).")] = None,
    against: Annotated[Optional[Path], typer.Option(help="A previous profile JSON: fail on latency regressions.")] = None,
    max_regression: Annotated[str, typer.Option(help="Allowed p50 latency regression against --against, e.g. 10% or 0.1.")] = "10%",
    allow_busy: Annotated[bool, typer.Option("--allow-busy", help="Let gates pass on numbers measured while the machine was busy (other processes using over half its CPU time, or a target's rounds spreading 2x); recorded in the JSON. Without it such a profile is marked unreliable and its gates fail.")] = False,
    overwrite: c.Overwrite = False,
    quiet: c.Quiet = False,
    config: c.Config = None,
):
    """Measure latency, throughput, memory and energy; show the FLOPs reduction next to the speedup it bought."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = Settings(backends=tuple(c.csv_list(backend)), device=device, batch_sizes=tuple(c.csv_list(batch_sizes, int, "--batch-sizes")),
                        threads=threads, rounds=rounds, warmup=warmup, min_iters=min_iters, min_time_s=min_time, energy=energy,
                        energy_window_s=energy_window, idle_s=idle_window, energy_estimate_w=energy_estimate,
                        include_transfers=include_transfers, cuda_graphs=cuda_graphs, ort_provider=ort_provider, breakdown=breakdown,
                        ov_device=ov_device, inference_precision=inference_precision, allow_busy=allow_busy)
    settings.validate()
    g = gates_mod.Gates(assert_speedup, assert_realised, max_latency_ms, against, gates_mod.parse_tolerance(max_regression),
                        None if gate_batch_sizes is None else tuple(c.csv_list(gate_batch_sizes, int, "--gate-batch-sizes")))
    if g.batches is not None and not set(g.batches) <= set(settings.batch_sizes):
        raise UserError(f"--gate-batch-sizes {gate_batch_sizes} must be among --batch-sizes {batch_sizes}")
    if against is not None and not against.is_file():
        raise UserError(f"--against {against} does not exist")
    for p, kind in ((json_out, "file"), (out_dir, "dir")):
        if p is not None:
            atomic.check_output_path(p, overwrite, kind=kind)
    if (assert_speedup is not None or assert_realised is not None) and baseline is None and not any(
            (Path(t) / "compare.json").is_file() for t in targets):
        raise UserError("--assert-speedup/--assert-realised need --baseline (or a compare run)")
    resolved = []
    base = None
    for t in targets:
        found = resolve(t)
        if (Path(t) / "compare.json").is_file() and baseline is None:
            base = found[0]
        resolved += found
    if baseline is not None:
        base = resolve(baseline)[0]
        resolved = [t for t in resolved if t.path is None or base.path is None or t.path.resolve() != base.path.resolve()]
    for name in reference_models or []:
        like = base or resolved[0]
        resolved.append(reference(name, like))
    doc = run(resolved, base, settings, c.reporter(quiet))
    failures = gates_mod.check(doc, g) if g.active() else []
    check = doc.machine_check
    if not check.get("quiet", True):
        reporter_line = (f"warning: UNRELIABLE measurement: the machine was busy while timing ({'; '.join(check['reasons'])}); "
                         + ("--allow-busy given, recorded in the JSON" if allow_busy else "every figure is marked unreliable"))
        print(reporter_line, file=sys.stderr)
        if g.active() and not allow_busy and not failures:
            failures = [f"the machine was busy while timing ({check['reasons'][0]}): the gates' numbers are unreliable; "
                        "run on a quiet machine, or pass --allow-busy to accept them"]
    doc.gates = [{"failure": f} for f in failures]
    data = doc.to_json()
    md = report.markdown(data)
    if json_out is not None:
        atomic.write_json(json_out, data)
    if out_dir is not None:
        report.write_all(data, out_dir)
    emit(md)
    gates_mod.step_summary(md, failures, g.active())
    if failures:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise GateFailed(failures[0] + more)
