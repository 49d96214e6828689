"""Whole-model latency of a parent and a child, measured in interleaved rounds on one backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch.nn as nn

from . import stats
from .runners import OrtRunner, OvRunner, Runner, TorchRunner, TrtRunner, measure


def model_runner(model: nn.Module, backend: str, device: str, batch: int, shape: tuple[int, int, int], workdir: Path,
                 name: str, threads: int | None = None) -> Runner:
    """A runner for an in-memory model: torch directly; ONNX Runtime, OpenVINO (f32) and TensorRT (fp32, an
    engine for this batch) through a checked ONNX export."""
    if backend == "torch":
        return TorchRunner(model, shape, batch, device)
    path = exported(model, shape, workdir, name)
    if backend == "openvino":
        return OvRunner(path, batch, device, threads)
    if backend == "tensorrt":
        from exporters.tensorrt_export import build_engine

        plan = workdir / f"{name}.plan"
        build_engine(path, plan, precision="fp32", shape=shape, min_batch=batch, opt_batch=batch, max_batch=batch)
        return TrtRunner(plan, batch)
    return OrtRunner(path, batch, device, threads)


def exported(model: nn.Module, shape: tuple[int, ...], workdir: Path, name: str) -> Path:
    """`workdir/name.onnx`: the model exported with its outputs checked against torch on 8 random inputs."""
    from exporters.onnx_export import export

    x = np.random.default_rng(0).standard_normal((8, *shape)).astype(np.float32)
    path = workdir / f"{name}.onnx"
    export(model.cpu().eval(), shape, path, inputs=x, inputs_are="8 random inputs")  # type: ignore[arg-type]
    return path


def paired(base: Runner, child: Runner, rounds: int = 9, warmup: int = 5, min_iters: int = 20,
           min_time_s: float = 0.2) -> dict:
    """Median latency of each (ms) and the paired speedup with its confidence interval."""
    b, c = [], []
    for i in range(rounds):
        w = warmup if i == 0 else 2
        b.append(float(np.median(measure(base, w, min_iters, min_time_s))))
        c.append(float(np.median(measure(child, w, min_iters, min_time_s))))
    return {"parent_ms": float(np.median(b)), "child_ms": float(np.median(c)), "speedup": stats.paired_speedup(b, c),
            "parent_rounds": b, "child_rounds": c}


def latency_record(model_file: Path, runtime: str = "onnxruntime") -> dict:
    """The build machine's latency for a bundle's model (its runtime on the CPU, batch 1), as bundles record it."""
    from . import sysinfo

    runner: Runner = OvRunner(model_file, 1, "cpu") if runtime == "openvino" else OrtRunner(model_file, 1, "cpu")
    lat = measure(runner, 5, 30, 0.5)
    s = stats.summary(lat, 1)
    label = "openvino cpu f32" if runtime == "openvino" else "onnxruntime cpu"
    return {"machine": sysinfo.one_line(sysinfo.describe()), "backend": label, "batch_size": 1,
            "latency_ms": {k: round(s[k], 4) for k in ("p50", "p90", "p99", "mean", "std")},
            "throughput_ips": round(s["throughput_ips"], 1)}
