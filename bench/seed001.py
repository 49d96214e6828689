"""Seed 001 at CPU scale: greedy output-norm, L1 and BN-scale at 40 % on VGG-16-BN and ResNet-18,
SGD retraining lr 1e-3 -> 1e-4 -> 1e-5, batch 32, random rotation and flip, on real Fashion-MNIST.

Scale-downs: 6,000 training / 2,000 test images, 3 retraining epochs (one per learning rate) instead of
10-20; torchvision's ResNet-18 at 32x32 (its 7x7 stem is kept).
"""

import time

from common import RUNS, compress, load, md_table, require_fashion_mnist, write_section

require_fashion_mnist()
started = time.time()
log: list[str] = []
DATA = ["--data", "fashion-mnist", "--train-size", "6000", "--test-size", "2000"]
base = RUNS / "seed001"
rows = []
for model, args in (("vgg16_bn_cifar", ["--model", "vgg16_bn_cifar"]), ("resnet18", ["--model", "torchvision:resnet18", "--input-size", "32"])):
    parent = base / model / "parent"
    compress("finetune", *args, *DATA, "--epochs", "8", "--lr", "1e-3", "--lr-schedule", "cosine", "--weight-decay", "1e-4", "--out", parent,
             "--overwrite", "-q", log=log, done=(parent / "model.json").exists())
    cmp_dir = base / model / "compare"
    compress("compare", "--model", parent, *DATA, "--metrics", "output-norm-greedy,l1,bn-scale", "--sparsities", "0.4",
             "--finetune-epochs", "3", "--optimizer", "sgd", "--lr", "1e-3", "--lr-schedule", "step", "--batch-size", "32",
             "--augment", "rotate,flip", "--calib-size", "500", "--out", cmp_dir,
             "--resume" if cmp_dir.exists() else "--overwrite", "-q", log=log)
    cells = {c["metric"]: c for c in load(cmp_dir / "compare.json")["cells"]}
    p = next(iter(cells.values()))
    rows.append([model, f"{p['parent_top1']:.2f}"] + [f"{cells[m]['top1_before_ft']:.2f} -> {cells[m]['top1_after_ft']:.2f}"
                                                       for m in ("output-norm-greedy", "l1", "bn-scale")]
                + [f"{100 * p['flops_reduction']:.1f}%", f"{p['speedup']['median']:.2f}x"])
body = ("Top-1 on 2,000 Fashion-MNIST test images; each cell shows accuracy right after pruning -> after retraining. "
        "BN-scale without the L1 training of the original slimming method, as the seed does.\n\n"
        + md_table(["model", "pre-pruning", "greedy", "L1", "slimming (BN scale)", "FLOPs red. (greedy)", "ORT speedup b1 (greedy)"], rows))
write_section("seed001", "Seed 001: greedy output norm, L1 and BN scale at 40 %", body, log, started)
