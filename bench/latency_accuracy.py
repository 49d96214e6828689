"""Issue 14: at the same *measured* speedup, does latency-aware pruning keep more accuracy than uniform
--sparsity? Real Fashion-MNIST, ResNet-20, ONNX Runtime on this CPU at batch 32, 3 seeds, through
`compress compare --target-speedups` (one grid per seed).

    .venv/bin/python bench/latency_accuracy.py
"""

import statistics
import time

from common import FMNIST, RUNS, compress, load, md_table, require_fashion_mnist, write_section

started = time.time()
log: list[str] = []
base = RUNS / "latency_aware"
require_fashion_mnist()
parent = base / "fmnist" / "parent"
compress("finetune", "--model", "resnet20", "--data", "fashion-mnist", "--data-dir", FMNIST, "--train-size", 10000,
         "--test-size", 2000, "--epochs", 8, "--optimizer", "sgd", "--lr", 0.05, "--lr-schedule", "cosine",
         "--out", parent, "--overwrite", "-q", log=log, done=(parent / "model.json").exists())
acc_rows = []
verdicts = []
runs = {}
for seed in (0, 1, 2):  # one speed-matched grid per seed (compress compare --target-speedups)
    d = base / "fmnist" / f"matched_s{seed}"
    compress("compare", "--model", parent, "--metrics", "taylor", "--calib-size", 512, "--target-speedups", "1.5,2",
             "--latency-batch", 32, "--latency-cache", base / "cache", "--finetune-epochs", 3, "--optimizer", "sgd",
             "--lr", 0.01, "--lr-schedule", "cosine", "--seed", seed, "--out", d, "--overwrite", "-q", log=log)
    runs[seed] = {c["name"]: c for c in load(d / "table.json")}
for t in ("1p5", "2"):
    la = [runs[s][f"taylor_latency_x{t}"] for s in runs]
    un = [runs[s][f"taylor_uniform_x{t}"] for s in runs]
    ok = [(a, b) for a, b in zip(la, un) if "refused" not in a and "refused" not in b]
    if not ok:
        acc_rows.append([t.replace("p", ".") + "x", "refused", "refused", "", "", ""])
        continue
    top = lambda xs: [x["top1_after_ft"] for x in xs]  # noqa: E731
    diffs = [a["top1_after_ft"] - b["top1_after_ft"] for a, b in ok]
    ms = lambda xs: f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"  # noqa: E731
    if len(diffs) > 1:  # a difference is claimed only beyond two standard errors of the per-seed differences
        m, se = statistics.mean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5
        verdicts.append(f"{t.replace('p', '.')}x: " + (f"latency-aware {'higher' if m > 0 else 'lower'} by {abs(m):.2f} "
                        f"points (beyond 2 standard errors, {len(diffs)} seeds)" if abs(m) > 2 * se else
                        f"no difference measured ({m:+.2f}, 2 standard errors = {2 * se:.2f})"))
    acc_rows.append([t.replace("p", ".") + "x", ms(top([a for a, _ in ok])), ms(top([b for _, b in ok])), ms(diffs),
                     ", ".join(f"{a['speedup']['median']:.2f}x" for a, _ in ok),
                     ", ".join(f"{b['speedup']['median']:.2f}x" for _, b in ok)])
body = [
         "Parent: ResNet-20 trained 8 epochs on 10,000 Fashion-MNIST images; test top-1 on 2,000 test-split images (never trained on). "
         "`compress compare --target-speedups 1.5,2` per seed: both children ranked by Taylor importance, fine-tuned 3 epochs "
         "(SGD 0.01, cosine), seeds 0-2 (mean ± sd over seeds); the uniform sparsity is searched to match the latency-aware "
         "child's measured speedup. *difference* is latency-aware minus uniform per seed; speedups are measured after "
         "fine-tuning (ONNX Runtime, batch 32).", "",
         md_table(["target", "latency-aware top-1", "uniform top-1", "difference", "latency-aware speedups",
                   "uniform speedups"], acc_rows), "",
         "Verdict: " + "; ".join(verdicts) + "." if verdicts else ""]


write_section("latency_accuracy", "Latency-aware vs uniform pruning at matched measured speedup (issue 14)",
              "\n".join(body), log, started)
