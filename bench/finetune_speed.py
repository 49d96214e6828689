"""Issue 7: does fine-tuning cost fall with FLOPs, and is the data path never the bottleneck?

Times fine-tuning on real Fashion-MNIST padded to 32x32 (crop + flip augmentation) for ResNet-20,
ResNet-56 and the small ViT at 0/25/50/75 % pruning, with (a) our path: uint8 tensor in memory, batched
augmentation, and (b) the plain loop: torchvision per-image PIL transforms in a DataLoader with 2
workers. Both in the same run, alternating. Each measurement trains BATCHES batches of 128 after 3
warm-up batches; images/s is reported and the epoch time for 60,000 images extrapolated.
"""

import time

import torch
import torch.nn.functional as F
import torchvision.transforms as T

from common import RUNS, compress, md_table, require_fashion_mnist, write_section

require_fashion_mnist()
from compressor.data import Batches, DataSpec, load_dataset  # noqa: E402
from compressor.modeldir import load_model_dir  # noqa: E402

BATCHES, BS, WARM = 25, 128, 3
started = time.time()
log: list[str] = []
ds = load_dataset(DataSpec("fashion-mnist"))


class PlainFMNIST(torch.utils.data.Dataset):
    """What a typical training script does: one PIL image at a time through torchvision transforms."""

    def __init__(self, images, labels, mean, std):
        self.images, self.labels = images, labels
        self.tf = T.Compose([T.Pad(2), T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.Grayscale(3), T.ToTensor(),
                             T.Normalize(mean, std)])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.tf(T.functional.to_pil_image(self.images[i])), self.labels[i]


def time_loop(model, batches) -> tuple[float, float]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-3)
    model.train()
    seen, wait, t0 = 0, 0.0, None
    it = iter(batches)
    for i in range(WARM + BATCHES):
        tw = time.perf_counter()
        if i == WARM:
            t0 = tw  # the timed region starts with the first measured batch's fetch
        x, y = next(it)
        if i >= WARM:
            wait += time.perf_counter() - tw
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= WARM:
            seen += y.numel()
    dt = time.perf_counter() - t0
    return seen / dt, wait / dt


rows = []
for model in ("resnet20", "resnet56", "vit_cifar"):
    parent = RUNS / "speed" / model / "s0"
    compress("prune", "--model", model, "--num-classes", "10", "--sparsity", "0", "--out", parent, "--overwrite", "-q", log=log)
    for s in (0, 25, 50, 75):
        d = parent if s == 0 else RUNS / "speed" / model / f"s{s}"
        if s:
            compress("prune", "--model", parent, "--metric", "l2", "--sparsity", s / 100, "--out", d, "--overwrite", "-q", log=log)
        lm = load_model_dir(d)
        spec = lm.record.input
        ours = Batches(ds.train, spec, BS, shuffle=True, augment_ops=("crop", "flip"), seed=0, epoch=0, drop_last=True)
        plain = torch.utils.data.DataLoader(PlainFMNIST(ds.train.images[:, 0], ds.train.labels, spec.mean, spec.std),
                                            batch_size=BS, shuffle=True, num_workers=2, drop_last=True, persistent_workers=False)
        ips_ours, wait_ours = time_loop(lm.model, ours)
        lm = load_model_dir(d)  # same starting weights for the other path
        ips_plain, wait_plain = time_loop(lm.model, plain)
        rows.append([model, f"{s}%", f"{lm.record.metrics['macs']:,}" if lm.record.metrics.get("macs") else "-",
                     f"{ips_ours:.0f}", f"{100 * wait_ours:.1f}%", f"{60000 / ips_ours:.0f}",
                     f"{ips_plain:.0f}", f"{100 * wait_plain:.1f}%", f"{60000 / ips_plain:.0f}", f"{ips_ours / ips_plain:.2f}x"])
        print(rows[-1], flush=True)
log.append(f"python bench/finetune_speed.py   # in-process timing loop, {BATCHES} batches of {BS} after {WARM} warm-up")
body = ("Fine-tuning throughput on this CPU (torch threads = 2); epoch = 60,000 images, extrapolated from the measured "
        "images/s. 'data wait' is the share of training time spent waiting for the next batch.\n\n"
        + md_table(["model", "pruned", "MACs", "ours img/s", "ours data wait", "ours epoch s", "plain img/s", "plain data wait",
                    "plain epoch s", "ours / plain"], rows))
write_section("finetune_speed", "Fine-tuning cost vs FLOPs, and the data path (issue 7)", body, log, started)
