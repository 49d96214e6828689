"""Seed 000 at CPU scale: L1 / L2 / random / Taylor at 25/50/75 % on a CIFAR ResNet and a small ViT,
trained on real Fashion-MNIST (padded to 32x32), fine-tuned with the seed's Adam 1e-4 / wd 1e-3.

Scale-downs, said in the output: ResNet-20 instead of ResNet-56, a 10,000-image class-balanced training
subset and 2,000 test images, 5 fine-tuning epochs instead of 50.
"""

import time

from common import RUNS, compress, load, md_table, require_fashion_mnist, write_section

require_fashion_mnist()
started = time.time()
log: list[str] = []
DATA = ["--data", "fashion-mnist", "--train-size", "10000", "--test-size", "2000"]
base = RUNS / "seed000"
tables = []
for model, args in (("resnet20", ["--model", "resnet20"]), ("vit_cifar", ["--model", "vit_cifar"])):
    parent = base / model / "parent"
    compress("finetune", *args, *DATA, "--epochs", "15", "--lr", "1e-3", "--lr-schedule", "cosine", "--weight-decay", "1e-4", "--out", parent,
             "--overwrite", "-q", log=log, done=(parent / "model.json").exists())
    cmp_dir = base / model / "compare"
    compress("compare", "--model", parent, *DATA, "--metrics", "l1,l2,random,taylor", "--sparsities", "0.25,0.5,0.75",
             "--finetune-epochs", "5", "--calib-size", "3000", "--out", cmp_dir, "--resume" if cmp_dir.exists() else "--overwrite",
             "-q", log=log)
    doc = load(cmp_dir / "compare.json")
    cells = doc["cells"]
    p = cells[0]
    rows = [[c["metric"], f"{100 * c['sparsity']:.0f}%", f"{c['params']:,}", f"{c['macs']:,}",
             f"{c['top1_before_ft']:.2f} / {c['top5_before_ft']:.2f}", f"{c['top1_after_ft']:.2f} / {c['top5_after_ft']:.2f}",
             f"{c['finetune_s']:.0f}", f"{c['speedup']['median']:.2f}x"] for c in cells]
    tables.append(f"**{model}** parent: {p['parent_params']:,} params, {p['parent_macs']:,} MACs, top-1 / top-5 "
                  f"{p['parent_top1']:.2f} / {p['parent_top5']:.2f}.\n\n"
                  + md_table(["metric", "sparsity", "params", "MACs", "top-1 / top-5 before FT", "top-1 / top-5 after FT",
                              "FT time (s, 5 epochs)", "ORT speedup (batch 1)"], rows))
body = ("Fashion-MNIST (real, 10,000 training / 2,000 test images, class-balanced), 32x32. ResNet-20 stands in for "
        "ResNet-56 and a 6-block, 12-head, 192-wide timm ViT for ViT-B/16 (2 CPU cores); 5 fine-tuning epochs instead "
        "of 50. ViT: heads pruned with the metric, FFN neurons with L2, as the seed does.\n\n" + "\n\n".join(tables))
write_section("seed000", "Seed 000: four metrics on a CNN and a ViT", body, log, started)
