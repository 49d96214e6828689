"""do Nascimento et al.'s layer-or-filter loop at CPU scale: CKA against the random walk, layers only and
filters only (same filter budget), 3 seeds each, compared at matched FLOPs cuts, on a ResNet-32 trained on
real Fashion-MNIST with an unseen held-out split.

Scale-downs: the parent trains on 8,000 images, the loop's candidates on a 4,000-image subset of them;
2,000 test images; 1 candidate epoch and 1 more for the winner per iteration (the paper: 10 and up to 190);
5 iterations; KL from 100 calibration images. Everything else is the
paper's: KL(child || parent), the release's filter allocation, SGD lr 0.01 Nesterov, weight decay 5e-4.
"""

import statistics
import time

from common import RUNS, compress, load, md_table, require_fashion_mnist, write_section

require_fashion_mnist()
started = time.time()
log: list[str] = []
DATA = ["--data", "fashion-mnist", "--train-size", "8000", "--test-size", "2000"]
SEEDS = (0, 1, 2)
CUTS = (0.20, 0.35, 0.50)  # FLOPs reductions every method reaches; accuracy interpolated along each run's path
base = RUNS / "seed002"
parent = base / "parent"
# The parent never trains on its held-out 10 %: CKA and the held-out accuracies below are on unseen images.
compress("finetune", "--model", "resnet32", *DATA, "--holdout", "0.1", "--epochs", "15", "--lr", "1e-3", "--lr-schedule",
         "cosine", "--weight-decay", "1e-4", "--out", parent, "--overwrite", "-q", log=log, done=(parent / "model.json").exists())
LOOP = ["--train-size", "4000", "--iterations", "5", "--candidate-epochs", "1", "--epochs-per-iteration", "1", "--calib-size", "100"]
methods = {"CKA (do Nascimento et al.)": [], "random walk": ["--similarity", "random"], "layers only": ["--only", "layers"],
           "filters only (same budget)": ["--only", "filters"]}


def at_cut(path: list[tuple[float, float]], cut: float) -> float | None:
    """Accuracy at a FLOPs reduction, linear between the iterations around it (None past the run's end)."""
    for (f0, a0), (f1, a1) in zip(path, path[1:]):
        if f0 <= cut <= f1:
            return a0 + (a1 - a0) * (cut - f0) / (f1 - f0) if f1 > f0 else a1
    return None


def mean_sd(values: list[float]) -> str:
    if len(values) < len(SEEDS):
        return f"reached by {len(values)}/{len(SEEDS)} seeds"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


rows, speed_rows, curves = [], [], {}
root = None
for name, extra in methods.items():
    tag = name.split(" ")[0].replace("(", "")
    curves[name] = {cut: [] for cut in CUTS}
    lasts = []
    for seed in SEEDS:
        out = base / f"{tag}_s{seed}"
        compress("prune", "auto", "--model", parent, "--data", "fashion-mnist", "--test-size", "2000", *LOOP, "--seed", seed, *extra, "--out", out, "--overwrite", "-q",
                 log=log, done=(out / "model.json").exists())
        logd = load(out / "auto_log.json")
        root = logd["root"]
        path = [(0.0, root["test_top1"])] + [(r["flops_reduction"], r["test_top1"]) for r in logd["iterations"]]
        for cut in CUTS:
            v = at_cut(path, cut)
            if v is not None:
                curves[name][cut].append(v)
        lasts.append(logd["iterations"][-1])
        if seed == SEEDS[0]:
            last = logd["iterations"][-1]
            prof = base / f"profile_{tag}"
            compress("profile", out / last["dir"], "--baseline", parent, "--backend", "onnxruntime", "--batch-sizes", "1,32",
                     "--rounds", "8", "--out", prof, "--overwrite", "-q", log=log)
            res = load(prof / "profile.json")["results"]
            speed = " / ".join(f"{r['speedup']['median']:.2f}x [{r['speedup']['ci_low']:.2f}, {r['speedup']['ci_high']:.2f}]"
                               for r in res if r["speedup"])
            speed_rows.append([name, logd["path"], f"{100 * last['flops_reduction']:.1f}%", f"{last['test_top1']:.2f}", speed])
    rows.append([name, *[mean_sd(curves[name][cut]) for cut in CUTS],
                 f"{statistics.mean(r['flops_reduction'] for r in lasts) * 100:.1f}%",
                 ", ".join(load(base / f"{tag}_s{s}" / "auto_log.json")["path"] for s in SEEDS)])


def verdict(cut: float) -> str:
    """Differences stated only where the seed spread supports them: means more than 2 standard errors apart."""
    stats = {m: v[cut] for m, v in curves.items() if len(v[cut]) == len(SEEDS)}
    if len(stats) < 2:
        return f"at {100 * cut:.0f} % FLOPs, fewer than two methods reached the cut with every seed: no comparison."
    best = max(stats, key=lambda m: statistics.mean(stats[m]))
    se = lambda m: statistics.stdev(stats[m]) / len(stats[m]) ** 0.5  # noqa: E731
    beaten = [m for m in stats if m != best and statistics.mean(stats[best]) - statistics.mean(stats[m]) > 2 * (se(best) ** 2 + se(m) ** 2) ** 0.5]
    tied = [m for m in stats if m != best and m not in beaten]
    return (f"at {100 * cut:.0f} % FLOPs, {best} is highest; " + (f"ahead of {', '.join(beaten)} beyond 2 standard errors" if beaten else "")
            + ("; " if beaten and tied else "") + (f"no difference measured from {', '.join(tied)}" if tied else "") + ".")


body = (f"Parent ResNet-32: {root['params']:,} params, {root['macs']:,} MACs, test top-1 {root['test_top1']:.2f}, held-out "
        f"top-1 {root['holdout_top1']:.2f} on images it never trained on (`compress finetune --holdout 0.1`). Test top-1 "
        f"(2,000 test images, never used to choose anything) at matched FLOPs cuts, interpolated between the iterations "
        f"around each cut, mean ± standard deviation over seeds {', '.join(map(str, SEEDS))}. The parent trains 15 epochs and "
        "every child 1 + 1 per iteration on 4,000 of its images (the paper: 10 + up to 190), so children are under-trained and none regains the "
        "parent's accuracy: this compares accuracy at a given cut, not the paper's accuracy-preserving cut.\n\n"
        + md_table(["method", *[f"test top-1 at {100 * c:.0f} % FLOPs cut" for c in CUTS], "mean cut after 5 iterations",
                    "decision paths (seeds 0, 1, 2)"], rows)
        + "\n\n" + "\n".join(f"- {verdict(c)}" for c in CUTS)
        + "\n\nSpeedup of seed 0's last iteration, ONNX Runtime on this CPU, batch 1 / batch 32, median [95% CI]:\n\n"
        + md_table(["method", "decision path", "FLOPs cut", "test top-1", "speedup b1 / b32"], speed_rows))
write_section("seed002", "do Nascimento et al.: layers or filters, chosen by CKA (3 seeds, matched cuts)", body, log, started)
