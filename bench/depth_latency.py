"""Depth and width under one measured latency budget (issue 30), at batch 1 where widths alone stall.

For each model and target, `compress prune --target-speedup T --latency-batch 1` twice, side by side on one
machine: with depth (whole residual blocks are planner moves; the default) and with `--no-depth` (widths
only). Per row: the achieved measured speedup with its interval or the refusal, the blocks removed, and the
latency model's prediction error on the final child.

    .venv/bin/python bench/depth_latency.py                      # ONNX Runtime
    .venv/bin/python bench/depth_latency.py --backend openvino
"""

import argparse
import time

from common import RUNS, compress, load, md_table, write_section

ap = argparse.ArgumentParser()
ap.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "openvino"])
ap.add_argument("--models", default="resnet20,resnet56,torchvision:mobilenet_v2")
args = ap.parse_args()
started = time.time()
log: list[str] = []
base = RUNS / "depth_latency" / args.backend
rows = []
for name in args.models.split(","):
    tag = name.replace(":", "_")
    for t in (1.5, 2.0, 3.0):
        for depth in ("--depth", "--no-depth"):
            out = base / tag / f"x{t}{depth.replace('--', '_')}"
            code = compress("prune", "--model", name, "--input-size", 32, "--data", "fake", "--num-classes", 10, "--metric", "l2",
                            "--target-speedup", t, "--latency-batch", 1, "--latency-backend", args.backend,
                            "--latency-cache", base / "cache", depth, "--out", out, "--overwrite", "-q", log=log, allow_fail=True)
            mode = "depth + width" if depth == "--depth" else "width only"
            if code != 0:
                rows.append([name, f"{t:g}x", mode, "refused", "-", "-", "-", str(code).strip()[:140]])
                continue
            lat = load(out / "model.json")["metrics"]["latency"]
            sp, lo, hi = lat["measured_speedup"], lat["speedup_ci"][0], lat["speedup_ci"][1]
            err = sp / t - 1
            removed = lat.get("removed_blocks") or []
            rows.append([name, f"{t:g}x", mode, f"{sp:.2f}x [{lo:.2f}, {hi:.2f}]", f"{100 * err:+.0f}%",
                         f"{len(removed)}: {', '.join(removed)}" if removed else "0", f"{100 * lat['prediction_error']:+.0f}%",
                         "" if abs(err) <= 0.10 else ("missed: " + ("slower" if err < 0 else "faster") + " than asked")])
done = [r for r in rows if r[2] == "depth + width"]
body = ("`compress prune --target-speedup T --latency-batch 1` on randomly initialised models (latency does not depend on the "
        f"weights; l2 importance) at 32x32 inputs, {args.backend} on the CPU. Each pair of rows ran back to back on the same "
        "machine. *achieved*: paired median speedup over the parent with its 96% interval (9 interleaved rounds); *error*: "
        "achieved/target - 1; *prediction*: the latency model's error on the final child.\n\n"
        + md_table(["model", "target", "planner", "achieved [96% CI]", "error", "blocks removed", "prediction", "note"], rows)
        + f"\n\nWith depth: {sum(1 for r in done if r[3] != 'refused')} of {len(done)} requests measured, "
        f"{sum(1 for r in done if r[3] != 'refused' and abs(float(r[4].rstrip('%'))) <= 10)} within ±10 % of the target; "
        f"widths only: {sum(1 for r in rows if r[2] == 'width only' and r[3] != 'refused')} of "
        f"{sum(1 for r in rows if r[2] == 'width only')} measured.")
write_section(f"depth_latency_{args.backend}", f"Depth and width under one latency budget at batch 1, {args.backend} (issue 30)",
              body, log, started, script="depth_latency.py" + ("" if args.backend == "onnxruntime" else f" --backend {args.backend}"))
