"""Latency-aware pruning (`--target-speedup`) on this CPU with ONNX Runtime.

For each model, batch and target, the achieved measured speedup with its interval, the error against the
target, and the latency model's prediction error. Accuracy at matched speedup: bench/latency_accuracy.py.
"""

import argparse
import statistics
import time

from common import RUNS, compress, load, md_table, write_section

ap = argparse.ArgumentParser()
ap.add_argument("--quick", action="store_true", help="ResNet-20 only (a smoke run)")
ap.add_argument("--only", help="one model (e.g. vit_cifar): its rows go to their own section")
args = ap.parse_args()

started = time.time()
log: list[str] = []
base = RUNS / "latency_aware"
MODELS = [("resnet20", 32, []), ("resnet56", 32, []), ("torchvision:resnet18", 32, []),
          ("torchvision:mobilenet_v2", 32, []), ("vit_cifar", 32, [])]
if args.quick:
    MODELS = MODELS[:1]
if args.only:
    MODELS = [m for m in MODELS if m[0] == args.only]
    if not MODELS:
        raise SystemExit(f"--only: not one of this benchmark's models: {args.only}")
TARGETS = (1.5, 2.0, 3.0)
rows = []
for name, size, extra in MODELS:
    tag = name.replace(":", "_")
    for batch in (1, 32):
        for t in TARGETS:
            out = base / tag / f"b{batch}_x{t}"
            cmd = ["prune", "--model", name, "--input-size", size, *extra, "--data", "fake", "--num-classes", 10,
                   "--metric", "l2", "--target-speedup", t, "--latency-batch", batch, "--latency-cache", base / "cache",
                   "--out", out, "--overwrite", "-q"]
            code = compress(*cmd, log=log, allow_fail=True)
            if code != 0:
                rows.append([name, batch, f"{t:g}x", "refused", "-", "-", "-", code.strip()[:150]])
                continue
            lat = load(out / "model.json")["metrics"]["latency"]
            sp, lo, hi = lat["measured_speedup"], lat["speedup_ci"][0], lat["speedup_ci"][1]
            err = sp / t - 1
            rows.append([name, batch, f"{t:g}x", f"{sp:.2f}x [{lo:.2f}, {hi:.2f}]", f"{100 * err:+.0f}%",
                         f"{100 * lat['prediction_error']:+.0f}%", len(lat["attempts"]),
                         "" if abs(err) <= 0.10 else ("missed: " + ("slower" if err < 0 else "faster") + " than asked")])

within = [r for r in rows if r[3] != "refused" and abs(float(r[4].rstrip("%"))) <= 10]
measured = [r for r in rows if r[3] != "refused"]
pred = [abs(float(r[5].rstrip("%"))) for r in measured]
body = [
    "`compress prune --target-speedup T --latency-batch B` on randomly initialised models (latency does not depend on "
    "the weights) at 32x32 inputs, ONNX Runtime on the CPU, default threads. Each run builds (or reuses) the per-layer "
    "table, fits it to the parent and a half-width copy measured whole, plans, prunes a copy, measures it against the "
    "parent in 9 interleaved rounds, and re-plans up to 4 times (5 attempts). *achieved* is the paired median speedup with its 96% "
    "interval; *error* is achieved/target - 1; *prediction* is the latency model's error on the final child "
    "(predicted/measured - 1).",
    "",
    md_table(["model", "batch", "target", "achieved [CI]", "error", "prediction", "attempts", "note"], rows),
    "",
    f"Within ±10 % of the target: {len(within)} of {len(measured)} measured rows ({len(rows) - len(measured)} refused). "
    f"Latency-model error on the final children: median {statistics.median(pred) if pred else float('nan'):.0f} %, "
    f"max {max(pred) if pred else float('nan'):.0f} %.",
]

if args.only:
    tag = args.only.replace(":", "_")
    write_section(f"latency_aware_{tag}", f"Latency-aware pruning of {args.only}: achieved vs target speedup (issue 14)",
                  "\n".join(body), log, started, script=f"latency_aware.py --only {args.only}")
else:
    write_section("latency_aware", "Latency-aware pruning: achieved vs target speedup (issue 14)", "\n".join(body), log, started)
