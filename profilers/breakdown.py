"""Where the time went: top operators by time from the torch profiler or ONNX Runtime's profiler."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections import defaultdict
from pathlib import Path


from .runners import OrtRunner, Runner, TorchRunner


@contextlib.contextmanager
def _quiet_fd2():
    """Kineto (inside torch) logs every profiler start/stop straight to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def torch_top_ops(runner: TorchRunner, iters: int = 20, top: int = 10) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runner.device.type == "cuda" else [])
    with _quiet_fd2(), profile(activities=acts) as prof:
        for _ in range(iters):
            runner.run()
    key = "self_device_time_total" if runner.device.type == "cuda" else "self_cpu_time_total"
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)
    total = sum(getattr(e, key, 0) for e in rows) or 1
    return [{"op": e.key, "ms_per_iter": getattr(e, key, 0) / 1000 / iters, "share": getattr(e, key, 0) / total}
            for e in rows[:top]]


def ort_top_ops(onnx_path: Path, runner: OrtRunner, iters: int = 20, top: int = 10) -> list[dict]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(onnx_path).with_suffix("")) + ".ortprof"
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), sess_options=so, providers=runner.providers)
    name = sess.get_inputs()[0].name
    for _ in range(iters):
        sess.run(None, {name: runner.x})
    trace = sess.end_profiling()
    try:
        events = json.loads(Path(trace).read_text())
    finally:
        os.unlink(trace)
    by_op: dict[str, float] = defaultdict(float)
    for ev in events:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            by_op[ev.get("args", {}).get("op_name", "?")] += ev.get("dur", 0)
    total = sum(by_op.values()) or 1
    rows = sorted(by_op.items(), key=lambda kv: kv[1], reverse=True)[:top]
    return [{"op": op, "ms_per_iter": us / 1000 / iters, "share": us / total} for op, us in rows]


def top_ops(runner: Runner, onnx_path: Path | None = None) -> list[dict]:
    if isinstance(runner, TorchRunner):
        return torch_top_ops(runner)
    if isinstance(runner, OrtRunner) and onnx_path is not None:
        return ort_top_ops(onnx_path, runner)
    return []
