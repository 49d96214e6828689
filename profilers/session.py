"""A profiling run: every target x backend x batch size, with interleaved rounds against the baseline.

Order of work per (backend, batch size): memory (each target alone, fresh peak), then latency (all
targets live, rounds A B C ... A B C ... so drift cancels in each round's ratio), then energy windows.
"""

from __future__ import annotations

import datetime as _dt
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from compressor import provenance
from compressor.errors import UserError
from compressor.progress import QUIET, Reporter

from . import energy, memory, quiet, stats, sysinfo
from .breakdown import top_ops
from .document import SCHEMA, Latency, Memory, ProfileDocument, ResultRow, Skipped, Speedup
from .runners import BACKENDS, OrtRunner, OvRunner, Runner, TorchRunner, TrtRunner, measure
from .targets import Target, ensure_onnx, narrow_layers

__all__ = ["SCHEMA", "ProfileDocument", "Settings", "run"]


@dataclass
class Settings:
    backends: tuple[str, ...] = ("onnxruntime",)
    device: str = "cpu"
    batch_sizes: tuple[int, ...] = (1, 32)
    threads: int | None = None
    rounds: int = 10
    warmup: int = 10
    min_iters: int = 20
    min_time_s: float = 0.3
    confidence: float = 0.95
    energy: bool = True
    energy_window_s: float = 5.0
    idle_s: float = 2.0
    energy_estimate_w: float | None = None
    include_transfers: bool = False
    cuda_graphs: bool = False
    ort_provider: str | None = None  # "tensorrt" to use ONNX Runtime's TensorRT EP
    ov_device: str = "cpu"  # OpenVINO's device (cpu, gpu, npu): its own, not CUDA's
    inference_precision: str = "f32"  # OpenVINO: pinned, or its CPU plugin picks bf16 where the CPU has it
    breakdown: bool = False
    allow_busy: bool = False  # gates on a busy machine's numbers: proceed anyway (recorded)

    def validate(self) -> None:
        bad = [b for b in self.backends if b not in BACKENDS]
        if bad:
            raise UserError(f"unknown backend {bad[0]} (choose from {', '.join(BACKENDS)})")
        if self.device not in ("cpu", "cuda"):
            raise UserError("`device` must be cpu or cuda")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise UserError("`batch_sizes` must be positive integers")
        if self.rounds < 1 or self.min_iters < 1 or self.min_time_s < 0 or self.warmup < 0:
            raise UserError("`rounds` and `min_iters` must be >= 1; `min_time` and `warmup` >= 0")
        if self.threads is not None and self.threads < 1:
            raise UserError("`threads` must be >= 1")
        if self.device == "cpu" and ("tensorrt" in self.backends or self.ort_provider in ("cuda", "tensorrt")):
            raise UserError("TensorRT and the ONNX Runtime CUDA/TensorRT providers run on a GPU: pass `device` cuda")
        from exporters.openvino_export import DEVICES, INFERENCE_PRECISIONS

        if self.ov_device not in DEVICES:
            raise UserError(f"`ov_device` must be one of {', '.join(DEVICES)}")
        if self.inference_precision not in INFERENCE_PRECISIONS:
            raise UserError(f"`inference_precision` must be one of {', '.join(INFERENCE_PRECISIONS)}")
        if self.energy_estimate_w is not None and self.energy_estimate_w <= 0:
            raise UserError("`energy_estimate` must be a positive power in watts")


def _runner(t: Target, backend: str, batch: int, s: Settings, workdir: Path) -> Runner:
    if backend == "torch":
        assert t.model is not None  # Target.supports("torch") holds only for in-memory models
        return TorchRunner(t.model, t.shape, batch, s.device, s.cuda_graphs, s.include_transfers)
    if backend == "onnxruntime":
        return OrtRunner(ensure_onnx(t, workdir), batch, s.device, s.threads, s.ort_provider, s.include_transfers)
    if backend == "openvino":
        return OvRunner(t.ir or ensure_onnx(t, workdir), batch, s.ov_device, s.threads, s.inference_precision)
    assert t.engine is not None  # Target.supports("tensorrt") holds only for engines
    return TrtRunner(t.engine, batch, s.include_transfers)


def _file_bytes(t: Target, runner: Runner) -> int | None:
    if runner.file_bytes is not None:
        return runner.file_bytes
    if t.path is not None and (t.path / "model.safetensors").is_file():
        return (t.path / "model.safetensors").stat().st_size
    return None


def run(targets: list[Target], baseline: Target | None, s: Settings, reporter: Reporter = QUIET) -> ProfileDocument:
    s.validate()
    if s.threads:
        torch.set_num_threads(s.threads)
    everyone = ([baseline] if baseline is not None else []) + [t for t in targets if t is not baseline]
    doc = ProfileDocument(
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), command=provenance.command(),
        machine=sysinfo.describe(),
        settings={**asdict(s), "backends": list(s.backends), "batch_sizes": list(s.batch_sizes)},
        baseline=None if baseline is None else baseline.name, targets=[t.to_json() for t in everyone])
    for t in everyone:
        if t.model is not None:
            doc.flags += [{"target": t.name, **f} for f in narrow_layers(t.model)]
    counter, counter_reason = (None, "energy measurement disabled (--no-energy)")
    if s.energy and s.energy_estimate_w is None:
        counter, counter_reason = energy.detect(s.device, torch.cuda.current_device() if s.device == "cuda" and torch.cuda.is_available() else 0)
    check = quiet.MachineCheck(s.allow_busy)
    check.sample_load("before")
    workdir = Path(tempfile.mkdtemp(prefix="compress-profile-"))
    try:
        _prepare(everyone, s, workdir)
        for backend in s.backends:
            live = [t for t in everyone if t.supports(backend)]
            doc.skipped += [Skipped(t.name, backend, f"target kind {t.kind} cannot run on {backend}")
                            for t in everyone if t not in live]
            if baseline is not None and baseline not in live:
                raise UserError(f"the baseline {baseline.name} cannot run on {backend}")
            for batch in s.batch_sizes:
                doc.results += _one(live, baseline, backend, batch, s, counter, counter_reason, workdir, reporter, doc)
                for row in doc.results[-len(live):]:
                    check.rounds(f"{row.target} ({backend}, batch {batch})", row.round_medians_ms)
        check.sample_load("after")
        doc.machine_check = check.to_json()
    finally:
        if counter is not None:
            counter.close()
        shutil.rmtree(workdir, ignore_errors=True)
    if not doc.results:
        why = "; ".join(sorted({f"{k.target} on {k.backend}: {k.reason}" for k in doc.skipped})[:2])
        raise UserError(f"nothing was measured ({why or 'no target runs on the chosen backends'})")
    for t, tj in zip(everyone, doc.targets):
        tj["params"], tj["macs"] = t.params, t.macs
    return doc


def _prepare(everyone: list[Target], s: Settings, workdir: Path) -> None:
    """Work that would otherwise land inside the first target's memory window: the CUDA context, and
    exporting model targets to ONNX. Memory figures then do not depend on the order of the targets."""
    if s.device == "cuda" and torch.cuda.is_available():
        torch.empty(1, device="cuda")
    for t in everyone:
        if ("onnxruntime" in s.backends or ("openvino" in s.backends and t.ir is None)) and t.supports("onnxruntime"):
            ensure_onnx(t, workdir)


def _one(live: list[Target], baseline: Target | None, backend: str, batch: int, s: Settings,
         counter: energy.Counter | None, counter_reason: str | None, workdir: Path, reporter: Reporter,
         doc: ProfileDocument) -> list[ResultRow]:
    mem = {}
    for t in live:  # memory: each target alone, peak reset before it loads
        if s.device == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with memory.PeakWindow() as w:
            r = _runner(t, backend, batch, s, workdir)
            measure(r, 2, 3, 0.0)
        dev_peak = r.device_peak_bytes()
        mem[t.name] = Memory(peak_rss_mb=round(w.peak, 1), peak_rss_delta_mb=None if w.delta is None else round(w.delta, 1),
                             device_peak_mb=None if dev_peak is None else round(dev_peak / 2**20, 1),
                             file_bytes=_file_bytes(t, r))
        r.close()
    runners = {t.name: _runner(t, backend, batch, s, workdir) for t in live}
    per_round: dict[str, list[float]] = {t.name: [] for t in live}
    samples: dict[str, list[float]] = {t.name: [] for t in live}
    with reporter.task(f"{backend} batch {batch}", s.rounds * len(live)) as advance:
        for rnd in range(s.rounds):
            for t in live:
                lat = measure(runners[t.name], s.warmup if rnd == 0 else min(3, s.warmup), s.min_iters, s.min_time_s)
                samples[t.name] += lat
                per_round[t.name].append(float(np.median(lat)))
                advance()
    rows = []
    for t in live:
        r = runners[t.name]
        summ = stats.summary(samples[t.name], batch)
        throughput = summ.pop("throughput_ips")
        ov = backend == "openvino"
        speedup = None
        if baseline is not None and t is not baseline:
            flops_speedup = baseline.macs / t.macs if baseline.macs and t.macs else None
            sp = stats.paired_speedup(per_round[baseline.name], per_round[t.name], s.confidence)
            speedup = Speedup(vs=baseline.name, **sp, flops_speedup=flops_speedup,
                              flops_reduction=None if flops_speedup is None else 1 - 1 / flops_speedup,
                              realised_fraction=None if flops_speedup is None else sp["median"] / flops_speedup)
        if s.energy_estimate_w is not None:
            en = energy.estimate(s.energy_estimate_w, r.run, batch, min(s.energy_window_s, 2.0))
        elif counter is not None:
            en = energy.measure(counter, r.run, batch, s.energy_window_s, s.idle_s)
        else:
            en = energy.unavailable(counter_reason or "no energy counter")
        rows.append(ResultRow(
            target=t.name, backend=backend, device=s.ov_device if ov else s.device, batch_size=batch,
            inference_precision=r.info()["inference_precision"] if ov else None, latency_ms=Latency(**summ),
            throughput_ips=throughput, round_medians_ms=per_round[t.name], memory=mem[t.name], runner=r.info(),
            top1=t.top1, params=t.params, macs=t.macs, energy=en, speedup=speedup))
        if s.breakdown:
            doc.breakdown.append({"target": t.name, "backend": backend, "batch_size": batch,
                                  "top_ops": top_ops(r, t.onnx if backend == "onnxruntime" else None)})
    for r in runners.values():
        r.close()
    return rows
