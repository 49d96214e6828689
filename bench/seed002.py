"""Seed 002 at CPU scale: layer-or-filter by CKA against layer-only, filter-only (same filter budget)
and the random walk, on a ResNet-32 trained on real Fashion-MNIST.

Scale-downs: 8,000 training / 2,000 test images; 1 candidate epoch and 1 more for the winner per
iteration (the seed: 10 and up to 190); 6 iterations; KL from 100 calibration images.
"""

import time

from common import RUNS, compress, load, md_table, require_fashion_mnist, write_section

require_fashion_mnist()
started = time.time()
log: list[str] = []
DATA = ["--data", "fashion-mnist", "--train-size", "8000", "--test-size", "2000"]
base = RUNS / "seed002"
parent = base / "parent"
compress("finetune", "--model", "resnet32", *DATA, "--epochs", "15", "--lr", "1e-3", "--lr-schedule", "cosine", "--weight-decay", "1e-4",
         "--out", parent, "--overwrite", "-q", log=log, done=(parent / "model.json").exists())
# Measured before the paper-faithful defaults (KL(child || parent), the release's filter allocation) and
# before held-out splits the parent never trains on: these two flags keep the published numbers
# reproducible (the parent here trains on its whole subset; prune auto now says so). See issue 16.
LOOP = ["--kl-direction", "parent-child", "--filter-allocation", "eligible", "--iterations", "6", "--candidate-epochs", "1", "--epochs-per-iteration", "1",
        "--calib-size", "100", "--seed", "0"]
methods = {"CKA (ours / seed 002)": [], "random walk": ["--similarity", "random"], "layers only": ["--only", "layers"],
           "filters only (same budget)": ["--only", "filters"]}
rows, paths = [], []
for name, extra in methods.items():
    out = base / name.split(" ")[0].replace("(", "")
    compress("prune", "auto", "--model", parent, *DATA, *LOOP, *extra, "--out", out, "--overwrite", "-q", log=log,
             done=(out / "model.json").exists())
    logd = load(out / "auto_log.json")
    root = logd["root"]
    ok = [r for r in logd["iterations"] if r["holdout_top1"] >= root["holdout_top1"]]
    best = max(ok, key=lambda r: r["flops_reduction"]) if ok else None
    last = logd["iterations"][-1]
    prof = base / f"profile_{out.name}"
    timed = best or last  # no child at the parent's held-out accuracy: time the last iteration instead
    compress("profile", out / timed["dir"], "--baseline", parent, "--backend", "onnxruntime", "--batch-sizes", "1,32",
             "--rounds", "8", "--out", prof, "--overwrite", "-q", log=log)
    res = load(prof / "profile.json")["results"]
    speed = " / ".join(f"{r['speedup']['median']:.2f}x" for r in res if r["speedup"])
    rows.append([name, logd["path"], logd["stopped"], "-" if best is None else f"{100 * best['flops_reduction']:.1f}% (iter {best['iteration']})",
                 f"{100 * last['flops_reduction']:.1f}%", f"{last['holdout_top1']:.2f}", f"{last['test_top1']:.2f}", f"{speed} (iter {timed['iteration']})"])
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    paths.append(f"- {name}: " + ", ".join(f"{r['decision']} (CKA L {fmt(r['cka_layer'])} / F {fmt(r['cka_filter'])}; "
                                           f"{100 * r['flops_reduction']:.1f}% FLOPs, held-out {r['holdout_top1']:.2f})"
                                           for r in logd["iterations"]))
p = load(base / "CKA" / "auto_log.json")["root"]
body = (f"Parent ResNet-32: {p['params']:,} params, {p['macs']:,} MACs, held-out top-1 {p['holdout_top1']:.2f}, "
        f"test top-1 {p['test_top1']:.2f}. \"Before accuracy drops\" compares the held-out split (10 % of the training "
        "subset, never the test set) with the parent's; the speedup is ONNX Runtime on this CPU at batch 1 / 32 for that "
        "iteration (the best at the parent's accuracy, else the last). The training that precedes this table gives the "
        "parent 15 epochs and every child 1 + 1 (the seed: 10 + up to 190), so no child regains the parent's held-out "
        "accuracy here and the comparison is of accuracy at a given FLOPs reduction.\n\n"
        + md_table(["method", "decision path", "stopped", "FLOPs red. before held-out accuracy drops", "FLOPs red. (last iteration)",
                    "held-out top-1 (last)", "test top-1 (last)", "ORT speedup b1 / b32"], rows)
        + "\n\nDecisions and CKA values per iteration:\n\n" + "\n".join(paths))
write_section("seed002", "Seed 002: layers or filters, chosen by CKA", body, log, started)
