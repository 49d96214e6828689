"""Verify the whole GPU side on a machine with an NVIDIA GPU, in a few minutes, as a user runs it:

    .venv/bin/python bench/gpu_check.py            # writes the gpu_check section of docs/benchmarks.md

torch on CUDA (CUDA events, and CUDA graphs), NVML energy (gross and net of idle, with the window),
bf16 vs fp32 fine-tuning speed, device-memory figures that do not depend on the order of the targets,
ONNX Runtime's CUDA provider where an onnxruntime-gpu build is installed, and TensorRT where it is
installed (fp32/fp16/int8 engines: parity with ONNX Runtime at export, then profiled), and latency-aware
pruning for 2x at batch 1 on the device with and without depth (the launch-bound regime). Whatever cannot
run here is listed with the reason. `--device cpu` runs the same plumbing on a CPU (a smoke test of
this script; it writes only --out).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import ROOT, RUNS, compress, md_table, write_section

FAST = ["--rounds", "5", "--min-time", "0.2", "--warmup", "5"]


def _profile(targets: list, out: Path, log: list, *extra) -> dict | str:
    r = compress("profile", *targets, "--json", out, "--overwrite", *FAST, *extra, log=log, allow_fail=True)
    return json.loads(out.read_text()) if r == 0 else r


def _rows(doc: dict, label: str) -> list[list]:
    rows = []
    for r in doc["results"]:
        sp = r.get("speedup")
        e = r.get("energy") or {}
        rows.append([label, r["target"], r["backend"], r["batch_size"], f"{r['latency_ms']['p50']:.3f}",
                     "-" if not sp else f"{sp['median']:.2f}x [{sp['ci_low']:.2f}, {sp['ci_high']:.2f}]",
                     "-" if r["memory"]["device_peak_mb"] is None else r["memory"]["device_peak_mb"],
                     "-" if e.get("joules_per_inference") is None else
                     f"{1000 * e['joules_per_inference']:.2f} / {1000 * e['net_joules_per_inference']:.2f} mJ "
                     f"({e['window_s']:.1f} s{', throttled' if e.get('throttled') else ''})"])
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", type=Path, help="also write the section's Markdown here")
    args = ap.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("not available here: no CUDA device (torch.cuda.is_available() is False); nothing was measured", file=sys.stderr)
        return 2
    started, log, notes, rows = time.time(), [], [], []
    dev = args.device
    work = RUNS / f"gpu_check_{dev}"
    work.mkdir(parents=True, exist_ok=True)
    parent, child = work / "parent", work / "child"
    compress("finetune", "--model", "resnet20", "--data", "digits", "--epochs", "3", "--device", dev, "--out", parent,
             "--overwrite", "-q", log=log)
    compress("prune", "--model", parent, "--sparsity", "0.5", "--device", dev, "--out", child, "--overwrite", "-q", log=log)

    # 1. torch: events (and CUDA graphs on a GPU), NVML energy on the first run
    batches = "1,32,256" if dev == "cuda" else "1,32"
    doc = _profile([child], work / "torch.json", log, "--baseline", parent, "--backend", "torch", "--device", dev,
                   "--batch-sizes", batches, "--energy-window", "5")
    if isinstance(doc, str):
        notes.append(f"torch {dev}: FAILED: {doc}")
    else:
        rows += _rows(doc, "torch")
        if dev == "cuda" and all((r.get("energy") or {}).get("joules_per_inference") is None for r in doc["results"]):
            notes.append(f"NVML energy: not measured: {doc['results'][0]['energy'].get('reason')}")
    if dev == "cuda":
        doc = _profile([child], work / "graphs.json", log, "--baseline", parent, "--backend", "torch", "--device", dev,
                       "--batch-sizes", batches, "--cuda-graphs", "--no-energy")
        rows += _rows(doc, "torch + CUDA graphs") if not isinstance(doc, str) else []
        if isinstance(doc, str):
            notes.append(f"CUDA graphs: FAILED: {doc}")

    # 2. memory figures must not depend on which target is measured first
    a = _profile([parent, child], work / "order_a.json", log, "--backend", "torch", "--device", dev, "--batch-sizes", "32", "--no-energy")
    b = _profile([child, parent], work / "order_b.json", log, "--backend", "torch", "--device", dev, "--batch-sizes", "32", "--no-energy")
    if isinstance(a, str) or isinstance(b, str):
        notes.append(f"memory order check: FAILED: {a if isinstance(a, str) else b}")
    else:
        key = "device_peak_mb" if dev == "cuda" else "peak_rss_delta_mb"
        ma = {r["target"]: r["memory"][key] for r in a["results"]}
        mb = {r["target"]: r["memory"][key] for r in b["results"]}
        diff = {t: (ma[t], mb[t]) for t in ma if ma[t] is not None and mb.get(t) is not None and abs(ma[t] - mb[t]) > 1.0}
        verdict = "the same within 1 MB either way: " if not diff else ("DIFFERS: " if dev == "cuda" else "differs (CPU RSS, noisy): ")
        notes.append(f"memory ({key}) measured parent-first / child-first: {verdict}" + ", ".join(f"{t} {ma[t]} / {mb.get(t)}" for t in ma))

    # 3. bf16 autocast vs fp32 fine-tuning throughput
    speeds = {}
    for amp in ("--amp", "--no-amp"):
        out = work / f"ft{amp}"
        compress("finetune", parent, "--epochs", "2", "--device", dev, amp, "--out", out, "--overwrite", "-q", log=log)
        speeds[amp] = json.loads((out / "history.json").read_text())[-1]["images_per_s"]
    notes.append(f"fine-tuning ResNet-20 on digits, last epoch: bf16 autocast {speeds['--amp']:.0f} img/s, fp32 "
                 f"{speeds['--no-amp']:.0f} img/s ({speeds['--amp'] / speeds['--no-amp']:.2f}x)")

    # 4. ONNX Runtime on CUDA
    import onnxruntime as ort

    if dev == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        notes.append(f"ONNX Runtime CUDA: not available here: this onnxruntime build offers {', '.join(ort.get_available_providers())} "
                     "(replace onnxruntime by onnxruntime-gpu)")
    else:
        doc = _profile([child], work / "ort.json", log, "--baseline", parent, "--backend", "onnxruntime", "--device", dev,
                       "--batch-sizes", batches, "--no-energy")
        rows += _rows(doc, "onnxruntime") if not isinstance(doc, str) else []
        if isinstance(doc, str):
            notes.append(f"ONNX Runtime {dev}: FAILED: {doc}")

    # 5. TensorRT engines
    try:
        import tensorrt  # noqa: F401
        have_trt = dev == "cuda"
        why = "needs a GPU"
    except Exception as e:
        have_trt, why = False, f"the tensorrt package does not import ({type(e).__name__})"
    if not have_trt:
        notes.append(f"TensorRT fp32/fp16/int8 engines: not available here: {why}; unexecuted")
    else:
        for prec in ("fp32", "fp16", "int8"):
            for name, model in (("parent", parent), ("child", child)):
                r = compress("export", model, "--format", "tensorrt", "--precision", prec, "--out", work / f"{name}.{prec}.engine",
                             "--timing-cache", work / "trt.cache", "--overwrite", log=log, allow_fail=True)
                if r != 0:
                    notes.append(f"TensorRT {prec} {name}: FAILED: {r}")
            if (work / f"child.{prec}.engine").is_file() and (work / f"parent.{prec}.engine").is_file():
                parity = json.loads((work / f"child.{prec}.engine.json").read_text()).get("agreement_vs_onnxruntime", {})
                notes.append(f"TensorRT {prec}: engine vs ONNX Runtime max |diff| {parity.get('max_abs_diff')}, "
                             f"top-1 agreement {parity.get('top1_agreement')}")
                doc = _profile([work / f"child.{prec}.engine"], work / f"trt_{prec}.json", log, "--baseline",
                               work / f"parent.{prec}.engine", "--backend", "tensorrt", "--device", "cuda",
                               "--batch-sizes", batches, "--no-energy")
                rows += _rows(doc, f"tensorrt {prec}") if not isinstance(doc, str) else []

    # 6. latency-aware pruning at batch 1 on the device (launch-bound on a GPU): depth + width beside widths only
    for depth in ("--depth", "--no-depth"):
        out = work / f"latency_b1{depth.replace('--', '_')}"
        r = compress("prune", "--model", parent, "--metric", "l2", "--target-speedup", "2", "--latency-batch", "1",
                     "--latency-backend", "torch", "--latency-device", dev, "--device", dev, depth, "--out", out,
                     "--overwrite", "-q", log=log, allow_fail=True)
        mode = "depth + width" if depth == "--depth" else "widths only"
        if r != 0:  # a refusal (the child could not reach the target) is a finding, not a broken check
            notes.append(f"latency-aware 2x at batch 1 on torch {dev}, {mode}: refused: {r}")
            continue
        lat = json.loads((out / "model.json").read_text())["metrics"]["latency"]
        removed = lat.get("removed_blocks") or []
        notes.append(f"latency-aware 2x at batch 1 on torch {dev}, {mode}: {lat['measured_speedup']:.2f}x "
                     f"[{lat['speedup_ci'][0]:.2f}, {lat['speedup_ci'][1]:.2f}], {len(removed)} block(s) removed"
                     f"{': ' + ', '.join(removed) if removed else ''}, prediction error {100 * lat['prediction_error']:+.0f}%")

    body = md_table(["run", "target", "backend", "batch", "p50 ms", "speedup vs parent [95% CI]", "device peak MB",
                     "energy/image gross / net (window)"], rows)
    body += "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    print(body)
    if args.out:
        args.out.write_text(body)
    if dev == "cuda":
        write_section("gpu_check", "GPU check (issue 15)", body, log, started)
    return 1 if any("FAILED" in n or "DIFFERS" in n for n in notes) else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
