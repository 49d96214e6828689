"""Issue 20: the same parents and children on ONNX Runtime and OpenVINO (f32) side by side, and a child
pruned for each runtime's measured latency, each measured on both runtimes.

    .venv/bin/python bench/openvino_vs_ort.py [--quick]

--quick: ResNet-20 only, 3 rounds (a smoke test of the script, not numbers to quote).
"""

import sys
import time

from common import RUNS, compress, load, md_table, uniform_children, write_section

QUICK = "--quick" in sys.argv
MODELS = ["resnet20"] if QUICK else ["resnet20", "resnet56", "torchvision:resnet18", "torchvision:mobilenet_v2", "vit_cifar"]
ROUNDS = "3" if QUICK else "10"
started = time.time()
log: list[str] = []
base = RUNS / "openvino_vs_ort"


def sp(r: dict | None) -> str:
    if r is None or not r.get("speedup"):
        return "baseline"
    s = r["speedup"]
    return f"{s['median']:.2f}x [{s['ci_low']:.2f}, {s['ci_high']:.2f}]" + ("" if s["significant"] else " n.s.")


def rows_by(doc: dict) -> dict:
    return {(r["target"], r["backend"], r["batch_size"]): r for r in doc["results"]}


side_rows = []
for model in MODELS:
    safe = model.replace(":", "_")
    parent, kids = uniform_children(model, base / safe, log, "--input-size", "32", "--data", "fake")
    out = base / safe / "report.json"
    compress("profile", parent, *kids, "--baseline", parent, "--backend", "onnxruntime,openvino", "--batch-sizes", "1,32",
             "--rounds", ROUNDS, "--min-time", "0.3", "--no-energy", "--json", out, "--overwrite", "-q", log=log)
    by = rows_by(load(out))
    for batch in (1, 32):
        for t in ["parent"] + [k.name for k in kids]:
            o, v = by[(t, "onnxruntime", batch)], by[(t, "openvino", batch)]
            fs = (o.get("speedup") or {}).get("flops_speedup")
            side_rows.append([model, t, batch, "-" if fs is None else f"{fs:.2f}x", f"{o['latency_ms']['p50']:.3f}", sp(o),
                              f"{v['latency_ms']['p50']:.3f}", sp(v)])

# A child pruned for each runtime, measured on both (ResNet-56, 2x at batch 32; ResNet-20 with --quick).
cross_model = "resnet20" if QUICK else "resnet56"
cparent = base / cross_model / "parent"
children = {}
for backend in ("onnxruntime", "openvino"):
    kid = base / cross_model / f"for_{backend}"
    err = compress("prune", "--model", cparent, "--metric", "l2", "--target-speedup", "2", "--latency-backend", backend,
                   "--latency-batch", "32", "--latency-cache", base / "cache", "--out", kid, "--overwrite", "-q",
                   log=log, allow_fail=True)
    children[backend] = kid if err == 0 else err
made = [k for k in children.values() if not isinstance(k, str)]
cross_rows = []
if made:
    out = base / cross_model / "cross.json"
    compress("profile", cparent, *made, "--baseline", cparent, "--backend", "onnxruntime,openvino", "--batch-sizes", "32",
             "--rounds", ROUNDS, "--min-time", "0.3", "--no-energy", "--json", out, "--overwrite", "-q", log=log)
    by = rows_by(load(out))
    for backend, kid in children.items():
        if isinstance(kid, str):
            cross_rows.append([f"pruned for {backend}", "refused: " + kid[:120], "", ""])
            continue
        lat = load(kid / "model.json")["lineage"][-1]["metrics"]["latency"]
        cross_rows.append([f"pruned for {backend}", f"{lat['measured_speedup']:.2f}x",
                           sp(by[(kid.name, "onnxruntime", 32)]), sp(by[(kid.name, "openvino", 32)])])

body = (f"Parents with fresh weights at 32x32 and their uniform l2 children (ViT: heads and FFN neurons), profiled by "
        f"`compress profile --backend onnxruntime,openvino`: {ROUNDS} interleaved rounds per target, default threads, "
        "OpenVINO's inference precision pinned to f32 (its CPU plugin would pick bf16 on a CPU that has it). "
        "Speedups are against the parent on the same runtime, with their 95% interval.\n\n"
        + md_table(["model", "target", "batch", "FLOPs speedup", "ORT p50 ms", "ORT speedup", "OpenVINO p50 ms", "OpenVINO speedup"],
                   side_rows)
        + f"\n\nOne {cross_model} pruned by `--target-speedup 2 --latency-batch 32` for each runtime's measured latency, "
          "then both children measured on both runtimes in one interleaved run (batch 32):\n\n"
        + md_table(["child", "speedup when pruned (its own runtime)", "on ONNX Runtime", "on OpenVINO f32"], cross_rows))
if not QUICK:
    write_section("openvino_vs_ort", "ONNX Runtime and OpenVINO side by side (issue 20)", body, log, started)
else:
    print(body)
