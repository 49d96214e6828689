"""Lajić, Peer and Emeršič's three criteria at CPU scale, 3 seeds each: greedy output-norm, Li et al.'s L1
filter norm (`l1-filter`) and BN scale at 40 % on VGG-16-BN and ResNet-18, SGD retraining lr 1e-3 -> 1e-4
-> 1e-5, batch 32, random rotation and flip, on real Fashion-MNIST.

Scale-downs: 4,000 training images for the parents (6 epochs) and 3,000 for retraining, 2,000 test
images, 3 retraining epochs (one per learning rate) instead of 10-20; torchvision's ResNet-18 at 32x32 (its 7x7 stem is kept). The criteria remove 40 % of every layer's
filters, so all three children of a model have the same widths: the comparison is at an equal cut.
"""

import time

from common import RUNS, compress, load, md_table, mean_sd, require_fashion_mnist, speedup_text, verdict, write_section

require_fashion_mnist()
started = time.time()
log: list[str] = []
TEST = ["--data", "fashion-mnist", "--test-size", "2000"]
SEEDS = (0, 1, 2)
METRICS = {"output-norm-greedy": "greedy", "l1-filter": "L1 (filter norm)", "bn-scale": "slimming (BN scale)"}
base = RUNS / "seed001"
rows, verdicts, speeds = [], [], []
for model, args in (("vgg16_bn_cifar", ["--model", "vgg16_bn_cifar"]), ("resnet18", ["--model", "torchvision:resnet18", "--input-size", "32"])):
    parent = base / model / "parent"
    compress("finetune", *args, *TEST, "--train-size", "4000", "--epochs", "6", "--lr", "1e-3", "--lr-schedule", "cosine", "--weight-decay", "1e-4", "--out", parent,
             "--overwrite", "-q", log=log, done=(parent / "model.json").exists())
    grids = {}
    for seed in SEEDS:
        out = base / model / f"compare_s{seed}"
        compress("compare", "--model", parent, *TEST, "--train-size", "3000", "--metrics", ",".join(METRICS), "--sparsities", "0.4",
                 "--finetune-epochs", "3", "--optimizer", "sgd", "--lr", "1e-3", "--lr-schedule", "step", "--batch-size", "32",
                 "--augment", "rotate,flip", "--calib-size", "500", "--profile-backend", "none", "--seed", seed, "--out", out,
                 "--resume" if out.exists() else "--overwrite", "-q", log=log)
        grids[seed] = {c["metric"]: c for c in load(out / "compare.json")["cells"]}
    after = {m: [grids[s][m]["top1_after_ft"] for s in SEEDS] for m in METRICS}
    before = {m: [grids[s][m]["top1_before_ft"] for s in SEEDS] for m in METRICS}
    p = grids[SEEDS[0]]["l1-filter"]
    rows.append([model, f"{p['parent_top1']:.2f}"] + [f"{mean_sd(before[m], len(SEEDS))} -> {mean_sd(after[m], len(SEEDS))}" for m in METRICS]
                + [f"{100 * p['flops_reduction']:.1f}%"])
    verdicts.append(verdict(f"{model}, after retraining", {METRICS[m]: v for m, v in after.items()}, len(SEEDS), 2000))
    # The three criteria give the same widths: one measurement per model. Beside it, the same criterion and
    # sparsity with every width rounded to a multiple of 16 (untrained: speed only) shows what the widths cost.
    child, rounded, prof = base / model / f"compare_s{SEEDS[0]}" / p["dir"], base / model / "round16", base / model / "profile"
    compress("prune", "--model", parent, *TEST, "--metric", "l1-filter", "--sparsity", "0.4", "--round-to", "16", "--out", rounded,
             "--overwrite", "-q", log=log)
    compress("profile", child, rounded, "--baseline", parent, "--backend", "onnxruntime", "--batch-sizes", "1,32", "--rounds", "8",
             "--out", prof, "--overwrite", "-q", log=log)
    r16 = load(rounded / "model.json")
    cut16 = 1 - r16["metrics"]["macs"] / p["parent_macs"]
    speeds.append([model, f"{p['params']:,} of {p['parent_params']:,}", f"{100 * p['flops_reduction']:.1f}%", speedup_text(prof, child.name),
                   f"{100 * cut16:.1f}%", speedup_text(prof, rounded.name)])
body = ("Top-1 on 2,000 Fashion-MNIST test images the parents never trained on; each cell is accuracy right after pruning "
        "-> after retraining, mean ± standard deviation over seeds 0, 1, 2 (the seed sets the retraining order and "
        "augmentation and the calibration images; one parent per model). L1 is Li et al.'s filter norm (sum of |w| of "
        "the filter itself), as the paper uses it. BN scale is without the L1 training of the original slimming method, "
        "as the paper does. A difference is stated only beyond 2 standard errors.\n\n"
        + md_table(["model", "pre-pruning", *METRICS.values(), "FLOPs cut"], rows)
        + "\n\n" + "\n".join(f"- {v}" for v in verdicts)
        + "\n\nONNX Runtime on this CPU, child vs parent, batch 1 / batch 32, median [95% CI], measured side by side in one "
        "run with the same child pruned with `--round-to 16` (every kept width a multiple of 16; not retrained, speed only):\n\n"
        + md_table(["model", "params", "FLOPs cut", "speedup b1 / b32", "FLOPs cut, --round-to 16", "speedup b1 / b32, --round-to 16"], speeds))
write_section("seed001", "Lajić et al.: greedy output norm, L1 filter norm and BN scale at 40 % (3 seeds)", body, log, started)
