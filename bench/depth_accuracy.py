"""Issue 30: at the same measured speedup at batch 1, does planning depth and width together keep more
accuracy than widths alone, and than uniform --sparsity? Real Fashion-MNIST, ResNet-20 (or ResNet-56), ONNX Runtime on this
CPU at batch 1, Taylor importance, 3 seeds, through `compress compare --target-speedups` with `--depth` and
with `--no-depth` (each grid also makes a uniform child matched to its latency-aware child's speed).

    .venv/bin/python bench/depth_accuracy.py [--targets 1.5,2,3] [--model resnet56]

Another target set gets its own runs and section (ResNet-56 took 46, 73 and 20 min here at 1.5x, 2x and 3x);
a compare grid that finished (its table.json) is reused when the script is run again.
"""

import argparse
import statistics
import time

from common import FMNIST, RUNS, compress, load, md_table, require_fashion_mnist, write_section

ap = argparse.ArgumentParser()
ap.add_argument("--targets", default="1.5,2,3")
ap.add_argument("--model", default="resnet20", choices=["resnet20", "resnet56"], help="resnet56: a section of its own")
args = ap.parse_args()
started = time.time()
log: list[str] = []
require_fashion_mnist()
parent = RUNS / "optimize" / args.model / "parent"  # the same parent as bench/optimize.py (a held-out split kept)
compress("finetune", "--model", args.model, "--data", "fashion-mnist", "--data-dir", FMNIST, "--train-size", 10000,
         "--test-size", 2000, "--holdout", 0.1, "--epochs", 8, "--optimizer", "sgd", "--lr", 0.05, "--lr-schedule", "cosine",
         "--out", parent, "--overwrite", "-q", log=log, done=(parent / "model.json").exists())
targets = [float(t) for t in args.targets.split(",")]
subset = "" if targets == [1.5, 2, 3] else "x" + "_".join(f"{t:g}".replace(".", "p") for t in targets)
own_dir = RUNS / "depth_accuracy" / ("" if args.model == "resnet20" else args.model)
base, cache = own_dir / subset, own_dir / "cache"  # latency tables are keyed by what they measured: shared
runs: dict[tuple[str, int], dict] = {}
for seed in (0, 1, 2):
    for depth in ("--depth", "--no-depth"):
        d = base / f"{depth.strip('-')}_s{seed}"
        compress("compare", "--model", parent, "--metrics", "taylor", "--calib-size", 512, "--target-speedups",
                 ",".join(f"{t:g}" for t in targets), "--latency-batch", 1, "--threads", 1, "--latency-cache", cache, depth,
                 "--finetune-epochs", 3, "--optimizer", "sgd", "--lr", 0.01, "--lr-schedule", "cosine", "--seed", seed,
                 "--out", d, "--overwrite", "-q", log=log, done=(d / "table.json").exists())
        runs[(depth, seed)] = {c["name"]: c for c in load(d / "table.json")}


def cell(depth: str, kind: str, t: float, seed: int) -> dict | None:
    c = runs[(depth, seed)].get(f"taylor_{kind}_x{f'{t:g}'.replace('.', 'p')}")
    return None if c is None or "refused" in c else c


def ms(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else (f"{xs[0]:.2f}" if xs else "-")


def verdict(label: str, a: list[float], b: list[float]) -> str:
    """Paired per seed; a difference is claimed only beyond two standard errors of the per-seed differences."""
    diffs = [x - y for x, y in zip(a, b)]
    if len(diffs) < 2:
        return f"{label}: fewer than two seeds where both reached the target; no comparison"
    m, se = statistics.mean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5
    return (f"{label}: {m:+.2f} points, " + ("beyond 2 standard errors" if abs(m) > 2 * se else
                                           f"within 2 standard errors ({2 * se:.2f}): no difference claimed"))


rows, verdicts = [], []
for t in targets:
    arms = {"depth + width": ("--depth", "latency"), "widths only": ("--no-depth", "latency"),
            "uniform (matched to depth + width)": ("--depth", "uniform")}
    got = {name: [cell(d, k, t, s) for s in (0, 1, 2)] for name, (d, k) in arms.items()}
    for name, cells in got.items():
        ok = [c for c in cells if c is not None]
        rows.append([f"{t:g}x", name, f"{len(ok)}/3", ms([c["top1_before_ft"] for c in ok]), ms([c["top1_after_ft"] for c in ok]),
                     ", ".join(f"{c['speedup']['median']:.2f}x" for c in ok)])
    ours = got["depth + width"]
    for other in ("widths only", "uniform (matched to depth + width)"):  # each pair on the seeds where both reached it
        both = [(a["top1_after_ft"], b["top1_after_ft"]) for a, b in zip(ours, got[other]) if a is not None and b is not None]
        verdicts.append(verdict(f"{t:g}x, depth + width minus {other.split(' (')[0]}", [a for a, _ in both], [b for _, b in both]))
pretty = {"resnet20": "ResNet-20", "resnet56": "ResNet-56"}[args.model]
body = (f"Parent: {pretty} trained 8 epochs on 10,000 Fashion-MNIST images (10 % held out); top-1 on 2,000 test-split images "
        "it never trained on. Per seed, `compress compare --target-speedups` at batch 1 on ONNX Runtime (one thread), once with `--depth` and "
        "once with `--no-depth`; Taylor importance; every child fine-tuned 3 epochs (SGD 0.01, cosine); the uniform child's "
        "sparsity is searched to match the depth + width child's measured speed. Speedups are measured after fine-tuning.\n\n"
        + md_table(["target", "planner", "seeds reached", "top-1 before fine-tuning", "top-1 after", "measured speedups"], rows)
        + "\n\nVerdicts (paired by seed): " + "; ".join(verdicts) + ".")
own = args.model != "resnet20"
write_section("depth_accuracy" + (f"_{args.model}" if own else "") + (f"_{subset}" if subset else ""),
              "Depth + width vs widths only vs uniform at matched measured speed, batch 1" + (f", {pretty}" if own else "")
              + (f" at {', '.join(f'{t:g}x' for t in targets)}" if subset else "") + " (issue 30)", body, log, started,
              script="depth_accuracy.py" + (f" --targets {args.targets}" if subset else "") + (f" --model {args.model}" if own else ""))
