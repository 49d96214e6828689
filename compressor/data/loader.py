"""Batches for training and evaluation.

In-memory datasets (digits, Fashion-MNIST, CIFAR, fake) are decoded once into a uint8 tensor that lives
on the training device; each batch is indexed, converted, resized, augmented and normalised as one
tensor operation. Folder datasets use a standard DataLoader with per-image decoding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from . import augment
from .sources import ImageSet, decode_image


@dataclass(frozen=True)
class InputSpec:
    """What the model consumes: channels x height x width, and per-channel normalisation."""

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_json(self) -> dict:
        return {"shape": [self.channels, self.height, self.width], "mean": list(self.mean), "std": list(self.std),
                "channel_order": "RGB" if self.channels == 3 else "L", "scale": "pixel/255"}

    @classmethod
    def from_json(cls, d: dict) -> "InputSpec":
        c, h, w = (int(v) for v in d["shape"])
        mean, std = tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"])
        if min(c, h, w) < 1 or len(mean) != c or len(std) != c or not all(v > 0 for v in std):
            raise ValueError(f"input shape {[c, h, w]} with {len(mean)} means and {len(std)} stds")
        return cls(c, h, w, mean, std)


def adapt_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Grey -> RGB by repetition, RGB -> grey by ITU-R 601 luma."""
    c = x.shape[1]
    if c == channels:
        return x
    if c == 1:
        return x.expand(-1, channels, -1, -1)
    if channels == 1 and c == 3:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device)[None, :, None, None]
        return (x * w).sum(1, keepdim=True)
    raise ValueError(f"cannot map {c} channels to {channels}")


def fit_size(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bring a float batch to HxW: centred zero padding for a small enlargement (keeps pixels exact,
    e.g. Fashion-MNIST 28 -> 32), otherwise bilinear resizing (antialiased when shrinking)."""
    h, w = x.shape[-2:]
    if (h, w) == (height, width):
        return x
    if height >= h and width >= w and height - h <= max(4, h // 4) and width - w <= max(4, w // 4):
        top, left = (height - h) // 2, (width - w) // 2
        return F.pad(x, (left, width - w - left, top, height - h - top))
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False,
                         antialias=height < h or width < w)


def normalise(x: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device)[None, :, None, None]
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device)[None, :, None, None]
    return (x - mean) / std


def to_model_input(images_u8: torch.Tensor, spec: InputSpec, ops: tuple[str, ...] = (),
                   g: torch.Generator | None = None) -> torch.Tensor:
    """uint8 (N, C, h, w) -> normalised float (N, spec.channels, H, W), optionally augmented."""
    x = images_u8.float().div_(255.0)
    x = fit_size(adapt_channels(x, spec.channels), spec.height, spec.width)
    if ops:
        x = augment.apply(x, ops, g if g is not None else torch.Generator().manual_seed(0))
    return normalise(x, spec)


def epoch_generator(seed: int, epoch: int, device: torch.device | str = "cpu") -> torch.Generator:
    """One generator per (seed, epoch): shuffling and augmentation of an epoch never depend on history,
    so a resumed run sees exactly the batches an uninterrupted one would."""
    dev = torch.device(device)
    g = torch.Generator(device=dev if dev.type == "cuda" else "cpu")
    g.manual_seed(int(seed) * 1_000_003 + int(epoch))
    return g


class Batches:
    """Iterate (x, y) batches from an ImageSet; records the time spent producing batches."""

    def __init__(self, data: ImageSet, spec: InputSpec, batch_size: int, *, shuffle: bool = False,
                 augment_ops: tuple[str, ...] = (), seed: int = 0, epoch: int = 0,
                 device: torch.device | str = "cpu", drop_last: bool = False, workers: int = 0,
                 channels_last: bool = False, shard: tuple[int, int] = (0, 1)):
        self.data, self.spec, self.batch_size = data, spec, int(batch_size)
        # Data parallel: every process draws the same global order and takes its slice of each global
        # batch (as DistributedSampler does), so the global batch and the epoch's images are unchanged.
        self.rank, self.world = shard
        if self.world > 1 and (self.batch_size % self.world or not drop_last):
            raise ValueError("a sharded Batches needs drop_last and a batch size divisible by the world size")
        self.local_batch = self.batch_size // self.world
        self.shuffle, self.ops, self.seed, self.epoch = shuffle, tuple(augment_ops), seed, epoch
        self.device = torch.device(device)
        self.drop_last, self.workers, self.channels_last = drop_last, workers, channels_last
        self.wait_s = 0.0  # time the consumer spent waiting for data
        self.per_image = False  # True: decode and augment image by image even when a tensor is held

    def force_loader(self) -> None:
        self.per_image = True

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.data.images is not None and not self.per_image:
            yield from self._tensor_path()
        else:
            yield from self._loader_path()

    def _order(self) -> torch.Tensor:
        n = len(self.data)
        if not self.shuffle:
            order = torch.arange(n)
        else:
            g = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + int(self.epoch))
            order = torch.randperm(n, generator=g)
        if self.world == 1:
            return order
        full = order[: len(self) * self.batch_size].view(len(self), self.batch_size)
        return full[:, self.rank::self.world].reshape(-1)

    def _tensor_path(self):
        images = self.data.images
        labels = self.data.labels
        if images.device != self.device:
            images, labels = images.to(self.device), labels.to(self.device)
        # Each process draws its own augmentations (rank 0 draws what a single process draws).
        g = epoch_generator(self.seed, self.epoch + 7919 + 104_729 * self.rank, self.device) if self.ops else None
        order = self._order().to(self.device)
        bs = self.local_batch
        for i in range(len(self)):
            t0 = time.perf_counter()
            idx = order[i * bs:(i + 1) * bs]
            x = to_model_input(images[idx], self.spec, self.ops, g)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = labels[idx]
            self.wait_s += time.perf_counter() - t0
            yield x, y

    def _loader_path(self):
        ds = PerImageDataset(self.data, self.spec, self.ops, self.seed + self.epoch + 104_729 * self.rank)
        order = self._order()
        dl = torch.utils.data.DataLoader(
            torch.utils.data.Subset(ds, order.tolist()), batch_size=self.local_batch, shuffle=False,
            num_workers=self.workers, drop_last=self.drop_last, pin_memory=self.device.type == "cuda",
            worker_init_fn=_seed_worker if self.workers else None,
        )
        it = iter(dl)
        while True:
            t0 = time.perf_counter()
            try:
                x, y = next(it)
            except StopIteration:
                return
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            self.wait_s += time.perf_counter() - t0
            yield x, y


def _seed_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    if info is not None:  # None only outside a worker, where nothing needs reseeding
        info.dataset.dataset.reseed(info.seed)  # type: ignore[union-attr, attr-defined]  # our Subset of a PerImageDataset


class PerImageDataset(torch.utils.data.Dataset):
    """The standard path: each image is decoded and transformed on its own (DataLoader workers)."""

    def __init__(self, data: ImageSet, spec: InputSpec, ops: tuple[str, ...], seed: int):
        self.data, self.spec, self.ops = data, spec, tuple(ops)
        self.g = torch.Generator().manual_seed(seed)

    def reseed(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed % (2**63))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        if self.data.images is not None:
            img = self.data.images[i]
        else:
            assert self.data.paths is not None  # an ImageSet holds images or paths
            img = decode_image(self.data.paths[i], self.spec.channels)
        x = to_model_input(img[None], self.spec, self.ops, self.g)[0]
        return x, self.data.labels[i]
