"""`compress optimize` end to end: the promise (target speedup, at most 1 point of top-1) checked on the
deployed artifact in its runtime and precision, on real Fashion-MNIST.

    .venv/bin/python bench/optimize.py            # the whole grid (hours on 2 cores)
    .venv/bin/python bench/optimize.py --quick    # ResNet-20, ONNX Runtime, batch 32: 2x and max, fp32 and int8
    .venv/bin/python bench/optimize.py --models resnet20,resnet56 --precisions fp32 --targets 1.5   # a slice

Grid: ResNet-20 and ResNet-56 (parents trained with a held-out split), ONNX Runtime and OpenVINO on the CPU,
fp32 and int8, batch 1 and 32, targets 1.5x / 2x / 3x and max, --max-accuracy-drop 1. Per row: the deployed
artifact's measured speedup with its interval (and the pruning and precision shares), the accuracy drop
measured in the runtime, pass/fail and the wall time of each stage; the max search's frontier is plotted
by each run (accuracy_vs_speedup.png).
"""

import argparse
import time

from common import FMNIST, RUNS, compress, load, md_table, require_fashion_mnist, write_section

ap = argparse.ArgumentParser()
ap.add_argument("--quick", action="store_true")
ap.add_argument("--models", help="comma-separated slice of the grid (default: all)")
ap.add_argument("--runtimes")
ap.add_argument("--precisions")
ap.add_argument("--batches")
ap.add_argument("--targets")
ap.add_argument("--epochs", type=int, help="fine-tuning epochs per attempt (default 3); a section of its own")
args = ap.parse_args()
require_fashion_mnist()
started = time.time()
log: list[str] = []
base = RUNS / "optimize"
MODELS = ["resnet20"] if args.quick else ["resnet20", "resnet56"]
RUNTIMES = ["onnxruntime"] if args.quick else ["onnxruntime", "openvino"]
BATCHES = [32] if args.quick else [1, 32]
TARGETS = ["2", "max"] if args.quick else ["1.5", "2", "3", "max"]
PRECISIONS = ["fp32", "int8"]
SLICE = [f"--{k} {v}" for k, v in vars(args).items() if k != "quick" and v]
EPOCHS = args.epochs or 3
MODELS = args.models.split(",") if args.models else MODELS
RUNTIMES = args.runtimes.split(",") if args.runtimes else RUNTIMES
PRECISIONS = args.precisions.split(",") if args.precisions else PRECISIONS
BATCHES = [int(b) for b in args.batches.split(",")] if args.batches else BATCHES
TARGETS = args.targets.split(",") if args.targets else TARGETS


def _attempt(a: dict) -> str:
    m = (a.get("stages") or {}).get("measure")
    got = "not pruned" if m is None else f"{m['speedup']['median']:.2f}x"
    drop = "" if a.get("accuracy_drop") is None else f", {a['accuracy_drop']:+.2f} points"
    verdict = "pass" if a.get("passed") else f"fail ({a.get('failed')})"
    asked = "the latency target" if a.get("prune_target_speedup") is None else f"{a['prune_target_speedup']:.3g}x"
    return f"pruned for {asked} -> {got}{drop}, {verdict}"


rows, probes = [], []
for name in MODELS:
    parent = base / name / "parent"
    compress("finetune", "--model", name, "--data", "fashion-mnist", "--data-dir", FMNIST, "--train-size", 10000,
             "--test-size", 2000, "--holdout", 0.1, "--epochs", 8, "--optimizer", "sgd", "--lr", 0.05, "--lr-schedule", "cosine",
             "--out", parent, "--overwrite", "-q", log=log, done=(parent / "model.json").exists())
    for runtime in RUNTIMES:
        for precision in PRECISIONS:
            for batch in BATCHES:
                for target in TARGETS:
                    out = base / name / (f"{runtime}_{precision}_b{batch}_x{target}" + (f"_e{EPOCHS}" if args.epochs else ""))
                    t0 = time.time()
                    code = compress("optimize", "--model", parent, "--target-speedup", target, "--runtime", runtime,
                                    "--batch", batch, "--precision", precision, "--max-accuracy-drop", 1, "--epochs", EPOCHS,
                                    "--optimizer", "adam", "--lr", 1e-4, "--calib-size", 512, "--max-probes", 3,
                                    "--latency-cache", base / "cache", "--out", out, "--overwrite", "-q", log=log, allow_fail=True)
                    wall = time.time() - t0
                    if not (out / "report.json").is_file():
                        rows.append([name, runtime, precision, batch, target, "-", "-", "-", "-", f"error: {code}", f"{wall:.0f}"])
                        continue
                    doc = load(out / "report.json")
                    pick = next((a for a in doc["attempts"] if a["attempt"] == doc.get("chosen")), doc["attempts"][-1] if doc["attempts"] else {})
                    m = pick.get("stages", {}).get("measure")
                    sp = "-" if m is None else f"{m['speedup']['median']:.2f}x [{m['speedup']['ci_low']:.2f}, {m['speedup']['ci_high']:.2f}]"
                    split = "-" if m is None else f"{m['pruning_speedup']:.2f} x {m['precision_speedup']:.2f}"
                    stages = {k: sum((a.get("stages", {}).get(k) or {}).get("seconds", 0) for a in doc["attempts"])
                              for k in ("prune", "finetune", "export", "measure", "accuracy")}
                    result = "pass" if doc["passed"] else f"fail ({doc['failed']['bound']})"
                    if m is None and pick.get("why"):  # refused before anything shipped: say why, not a blank
                        result += ": " + pick["why"].split("; ")[0].replace("|", "/")[:160]
                    if len(doc["attempts"]) > 1:  # every attempt or probe, not only the one chosen
                        probes.append(f"- {name} {runtime} {precision} batch {batch}, {target}: " + "; ".join(_attempt(a) for a in doc["attempts"]))
                    rows.append([name, runtime, precision, batch, target, sp, split, f"{doc['parent']['accuracy']['top1']:.2f}",
                                 "-" if pick.get("accuracy_drop") is None else f"{pick['accuracy_drop']:+.2f}", result,
                                 f"{wall:.0f} ({', '.join(f'{k} {v:.0f}' for k, v in stages.items())}); {len(doc['attempts'])} attempt(s)"])
body = md_table(["model", "runtime", "precision", "batch", "target", "deployed speedup [95% CI]", "pruning x precision",
                 "parent artifact top-1", "drop (points)", "result", "wall s (per stage)"], rows)
body += ("\n\nThe speed bound: the lower end of the deployed artifact's 95% interval >= 0.9 x target, measured against the "
         "parent's fp32 artifact in the same runtime (interleaved rounds). The accuracy bound: top-1 of the deployed artifact, "
         f"run in its runtime on 2,000 unseen test images, at most 1 point below the parent artifact's. Fine-tuning: {EPOCHS} epochs of "
         "Adam (lr 1e-4, the fine-tuning default) distilled from the parent, the held-out split kept out.")
if probes:
    body += "\n\nEvery attempt (speed corrections) and probe (`max`), in order:\n\n" + "\n".join(probes)
name, title = ("optimize_quick", " (quick grid)") if args.quick else ("optimize_slice", " (a slice of the grid)") if SLICE else ("optimize", "")
if SLICE:  # each slice keeps a section of its own: a later slice adds beside it, re-running the same slice replaces it
    name += "_" + "_".join(v.replace(",", "-") for k, v in vars(args).items() if k not in ("quick", "epochs") and v)
if args.epochs:  # another fine-tuning budget: beside the 3-epoch section, not over it
    name, title = name + f"_epochs{EPOCHS}", title + f", {EPOCHS} fine-tuning epochs"
write_section(name, "compress optimize: the promise checked on the deployed artifact" + title, body, log, started,
              script=" ".join(["optimize.py"] + (["--quick"] if args.quick else []) + SLICE))
