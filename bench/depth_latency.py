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
ap.add_argument("--models", default="resnet20,resnet56,torchvision:mobilenet_v2,vit_cifar",
                help="comma-separated NAME[@INPUT_SIZE] (default size 32); all @224: a section of their own, e.g. "
                     "torchvision:mobilenet_v2@224,torchvision:resnet18@224")
ap.add_argument("--targets", default="1.5,2,3")
ap.add_argument("--threads", default="1", help="runtime threads: 1 (the default here) because at batch 1 ONNX Runtime's "
                "two-thread pool switched between latency modes 1.2-2x apart on a 2-core VM, which the quiet-machine check refuses")
args = ap.parse_args()
started = time.time()
log: list[str] = []
base = RUNS / "depth_latency" / args.backend
rows = []
for spec in args.models.split(","):
    name, _, size = spec.partition("@")
    size = int(size or 32)
    tag = name.replace(":", "_") + ("" if size == 32 else f"_{size}")
    for t in [float(x) for x in args.targets.split(",")]:
        for depth in ("--depth", "--no-depth"):
            out = base / tag / f"x{t}{depth.replace('--', '_')}"
            t0 = time.time()
            code = compress("prune", "--model", name, "--input-size", size, "--data", "fake", "--num-classes", 10, "--metric", "l2",
                            "--target-speedup", t, "--latency-batch", 1, "--latency-backend", args.backend,
                            "--latency-cache", base / "cache", "--threads", args.threads, depth, "--out", out, "--overwrite", "-q", log=log, allow_fail=True)
            wall = f"{time.time() - t0:.0f}"
            mode = "depth + width" if depth == "--depth" else "width only"
            if code != 0:
                rows.append([spec, f"{t:g}x", mode, "refused", "-", "-", "-", "-", "-", wall, str(code).strip()[:140]])
                continue
            lat = load(out / "model.json")["metrics"]["latency"]
            sp, lo, hi = lat["measured_speedup"], lat["speedup_ci"][0], lat["speedup_ci"][1]
            err = sp / t - 1
            removed = lat.get("removed_blocks") or []
            rows.append([spec, f"{t:g}x", mode, f"{sp:.2f}x [{lo:.2f}, {hi:.2f}]", f"{100 * err:+.0f}%",
                         f"{len(removed)}: {', '.join(removed)}" if removed else "0", f"{100 * lat['prediction_error']:+.0f}%",
                         f"{100 * lat['prediction_error_raw']:+.0f}%", len(lat["attempts"]), wall,
                         "" if abs(err) <= 0.10 else ("missed: " + ("slower" if err < 0 else "faster") + " than asked")])
done = [r for r in rows if r[2] == "depth + width"]


def _prediction_summary(rows: list) -> str:
    errs = sorted(abs(float(r[6].rstrip("%"))) for r in rows if r[3] != "refused")
    if not errs:
        return ""
    mid = errs[len(errs) // 2] if len(errs) % 2 else (errs[len(errs) // 2 - 1] + errs[len(errs) // 2]) / 2
    return f"Prediction error over the {len(errs)} measured children: median {mid:.0f} %, largest {errs[-1]:.0f} %."


body = ("`compress prune --target-speedup T --latency-batch 1` on randomly initialised models (latency does not depend on the "
        f"weights; l2 importance) at 32x32 inputs (NAME@224: 224x224), {args.backend} on the CPU with {args.threads} thread(s). Each pair of rows ran back to back on the same "
        "machine. *achieved*: paired median speedup over the parent with its 96% interval (9 interleaved rounds); *error*: "
        "achieved/target - 1; *prediction*: the latency model's error on the final child, predicted ms against the child's "
        "measured ms at the parent's calibrated speed (the parent's calibration ms / the paired speedup), so the whole "
        "machine's drift between calibration and check is not counted; *raw*: against the child's ms as measured; "
        "*attempts*: plan/measure attempts; *wall s*: the whole command "
        "(table, plan, prune, measure; the table is cached across rows of one model).\n\n"
        + md_table(["model", "target", "planner", "achieved [96% CI]", "error", "blocks removed", "prediction", "raw",
                    "attempts", "wall s", "note"], rows)
        + f"\n\nWith depth: {sum(1 for r in done if r[3] != 'refused')} of {len(done)} requests measured, "
        f"{sum(1 for r in done if r[3] != 'refused' and abs(float(r[4].rstrip('%'))) <= 10)} within ±10 % of the target; "
        f"widths only: {sum(1 for r in rows if r[2] == 'width only' and r[3] != 'refused')} of "
        f"{sum(1 for r in rows if r[2] == 'width only')} measured. "
        + _prediction_summary(rows))
big = all(m.endswith("@224") for m in args.models.split(","))
write_section(f"depth_latency_{args.backend}" + ("_224" if big else ""),
              f"Depth and width under one latency budget at batch 1, {args.backend}" + (", 224x224" if big else "") + " (issue 30)",
              body, log, started, script=" ".join(["depth_latency.py"] + [f"--{k} {v}" for k, v in vars(args).items()
                                                      if v != ap.get_default(k)]))
