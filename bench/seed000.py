"""The metric-comparison study (L1 / L2 / random / Taylor) at CPU scale, 3 seeds per metric, at matched cuts:
a CIFAR ResNet and a small ViT trained on real Fashion-MNIST (padded to 32x32), fine-tuned with the
study's Adam 1e-4 / weight decay 1e-3.

Cuts: the ResNet keeps the paper's ResNet-56 parameter shares (0.620 / 0.443 / 0.327 M of 0.826 M: 75 / 54 /
40 %), found by `compress prune --keep-params`; the ViT's 25/50/75 % of heads and FFN neurons are the paper's
exact counts. Every metric at one cut has the same widths, so the comparison is at equal size and MACs.

Scale-downs, said in the output: ResNet-20 instead of ResNet-56, an 8,000-image training subset for the
parents (3,000 for fine-tuning, 1,000 of them for calibration), 2,000 test images, 2 fine-tuning epochs
(the ViT: 1) instead of 50.
"""

import time

from common import RUNS, compress, load, md_table, mean_sd, require_fashion_mnist, speedup_text, verdict, write_section

require_fashion_mnist()
started = time.time()
log: list[str] = []
TEST = ["--data", "fashion-mnist", "--test-size", "2000"]
SEEDS = (0, 1, 2)
METRICS = ("l1", "l2", "random", "taylor")
PAPER_KEEP = {"resnet20": (0.75, 0.54, 0.40), "vit_cifar": None}  # None: uniform 25/50/75 %, the paper's ViT rows
EPOCHS = {"resnet20": "12", "vit_cifar": "8"}
FT_EPOCHS = {"resnet20": "2", "vit_cifar": "1"}
base = RUNS / "seed000"
sections = []
for model in ("resnet20", "vit_cifar"):
    parent = base / model / "parent"
    compress("finetune", "--model", model, *TEST, "--train-size", "8000", "--epochs", EPOCHS[model], "--lr", "1e-3",
             "--lr-schedule", "cosine", "--weight-decay", "1e-4", "--out", parent, "--overwrite", "-q", log=log,
             done=(parent / "model.json").exists())
    if PAPER_KEEP[model]:  # the uniform sparsity whose child keeps the paper's share of parameters
        sparsities = []
        for keep in PAPER_KEEP[model]:
            probe = base / model / f"keep_{keep}"
            compress("prune", "--model", parent, "--metric", "l2", "--keep-params", keep, "--out", probe, "--overwrite", "-q", log=log)
            sparsities.append(load(probe / "model.json")["lineage"][-1]["settings"]["sparsity"])
    else:
        sparsities = [0.25, 0.5, 0.75]
    grids = {}
    for seed in SEEDS:
        out = base / model / f"compare_s{seed}"
        compress("compare", "--model", parent, *TEST, "--train-size", "3000", "--metrics", ",".join(METRICS),
                 "--sparsities", ",".join(f"{s:.8g}" for s in sparsities), "--finetune-epochs", FT_EPOCHS[model], "--calib-size", "1000",
                 "--profile-backend", "none", "--seed", seed, "--out", out, "--resume" if out.exists() else "--overwrite", "-q", log=log)
        grids[seed] = load(out / "compare.json")["cells"]
    p = grids[SEEDS[0]][0]
    rows, verdicts, speeds = [], [], []
    beat_parent = []
    for k, s in enumerate(sparsities):
        at = {m: [c for g in grids.values() for c in g if c["metric"] == m and abs(c["sparsity"] - s) < 1e-9] for m in METRICS}
        cell = at["l2"][0]
        for m in METRICS:
            rows.append([m, f"{100 * s:.1f}%", f"{cell['params']:,} ({100 * cell['params'] / cell['parent_params']:.1f}%)",
                         f"{100 * cell['flops_reduction']:.1f}%", mean_sd([c["top1_before_ft"] for c in at[m]], len(SEEDS)),
                         mean_sd([c["top1_after_ft"] for c in at[m]], len(SEEDS)), mean_sd([c["top5_after_ft"] for c in at[m]], len(SEEDS)),
                         f"{sum(c['finetune_s'] for c in at[m]) / len(at[m]):.0f}"])
            if min(c["top1_after_ft"] for c in at[m]) > p["parent_top1"]:
                beat_parent.append(f"{m} at {100 * s:.1f}%")
        label = f"{100 * cell['params'] / cell['parent_params']:.0f} % of the parameters"
        verdicts.append(verdict(f"{label}, before fine-tuning", {m: [c["top1_before_ft"] for c in at[m]] for m in METRICS}, len(SEEDS), 2000))
        verdicts.append(verdict(f"{label}, after fine-tuning", {m: [c["top1_after_ft"] for c in at[m]] for m in METRICS}, len(SEEDS), 2000))
        prof = base / model / f"profile_{k}"  # every metric has these widths: one measurement per cut
        compress("profile", base / model / f"compare_s{SEEDS[0]}" / cell["dir"], "--baseline", parent, "--backend", "onnxruntime",
                 "--batch-sizes", "1,32", "--rounds", "8", "--out", prof, "--overwrite", "-q", log=log)
        speeds.append([f"{100 * s:.1f}%", f"{cell['params']:,}", f"{cell['macs']:,}", f"{100 * cell['flops_reduction']:.1f}%", speedup_text(prof)])
    trained = ("Every child ends below its parent after fine-tuning." if not beat_parent else
               "Children above their parent on every seed (" + ", ".join(beat_parent) + ") measure the parent's under-training "
               "(12/8 epochs) as much as the metric.")
    sections.append(f"**{model}** parent: {p['parent_params']:,} params, {p['parent_macs']:,} MACs, test top-1 / top-5 "
                    f"{p['parent_top1']:.2f} / {p['parent_top5']:.2f}.\n\n"
                    + md_table(["metric", "sparsity", "params kept", "FLOPs cut", "top-1 before FT", "top-1 after FT",
                                "top-5 after FT", f"FT time (s, {FT_EPOCHS[model]} epoch(s))"], rows)
                    + "\n\n" + "\n".join(f"- {v}" for v in verdicts) + f"\n- {trained}\n\n"
                    + "ONNX Runtime on this CPU, child vs parent, batch 1 / batch 32, median [95% CI] (the widths are the same "
                    "for every metric at a cut):\n\n" + md_table(["sparsity", "params", "MACs", "FLOPs cut", "speedup b1 / b32"], speeds))
body = ("Fashion-MNIST (real), 32x32; test top-1/top-5 on 2,000 test images the parents never trained on, mean ± standard "
        "deviation over seeds 0, 1, 2 (the seed sets the fine-tuning subset, its order and augmentation, the calibration "
        "images and random's choice; one parent per model). ResNet-20 stands in for ResNet-56 and a 6-block, 12-head, "
        "192-wide timm ViT for ViT-B/16 (2 CPU cores); parents trained on 8,000 images, 2 fine-tuning epochs (the ViT: 1) on "
        "3,000 images instead of 50 on CIFAR-100, calibration on 1,000 of them instead of 3,000. "
        "ViT: heads pruned with the metric, FFN neurons with L2, as the study does. A difference between metrics is "
        "stated only beyond 2 standard errors.\n\n" + "\n\n".join(sections))
write_section("seed000", "The metric-comparison study: four metrics on a CNN and a ViT (3 seeds, matched cuts)", body, log, started)
