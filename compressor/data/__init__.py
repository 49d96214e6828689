"""Datasets by name, seeded splits and the batch iterator used everywhere."""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

from ..errors import UserError
from .loader import Batches, InputSpec, to_model_input
from .sources import ImageSet, RawDataset, load_cifar, load_digits, load_fake, load_fashion_mnist, load_imagefolder
from .splits import balanced_subset, stratified_split

DATASETS = ("digits", "fashion-mnist", "cifar10", "cifar100", "imagefolder", "fake")
__all__ = ["DATASETS", "DataSpec", "Dataset", "load_dataset", "Batches", "InputSpec", "ImageSet", "to_model_input"]


@dataclass(frozen=True)
class DataSpec:
    name: str
    data_dir: str | None = None
    train_size: int | None = None  # class-balanced subsets, for CPU-scale runs
    test_size: int | None = None
    download: bool = False
    holdout: float = 0.0  # share of the training split never trained on (class-balanced, fixed split)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("download")
        return d

    @classmethod
    def from_json(cls, d: dict) -> "DataSpec":
        return cls(name=d["name"], data_dir=d.get("data_dir"), train_size=d.get("train_size"), test_size=d.get("test_size"),
                   holdout=float(d.get("holdout") or 0.0))


@dataclass
class Dataset(RawDataset):
    """A loaded dataset after the spec's seeded subsetting; `spec` says how to load it again."""

    spec: DataSpec
    held: ImageSet | None = None  # spec.holdout of the training images, excluded from `train`

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def input_spec(self, channels: int, height: int, width: int) -> InputSpec:
        """Normalisation for a model trained on this data, at the model's channel count."""
        mean, std = self.mean, self.std
        if len(mean) != channels:
            if len(mean) == 1:
                mean, std = mean * channels, std * channels
            else:  # RGB data fed to a grey model: luma of the statistics
                w = (0.299, 0.587, 0.114)
                mean = (sum(a * b for a, b in zip(w, mean)),)
                std = (sum(a * b for a, b in zip(w, std)),)
        return InputSpec(channels, height, width, tuple(mean), tuple(std))

    def calibration(self, n: int, seed: int) -> ImageSet:
        """A class-balanced subset of the training split (the seeds' calibration set)."""
        return self.train.subset(balanced_subset(self.train.labels, n, seed))

    def holdout(self, frac: float, seed: int) -> tuple[ImageSet, ImageSet]:
        """(train minus held-out, held-out) cut now from the training split: unseen by a model only if it
        was not trained on this split (else use a spec with `holdout`, whose images no model trains on)."""
        rest, held = stratified_split(self.train.labels, frac, seed)
        return self.train.subset(rest), self.train.subset(held)


@functools.lru_cache(maxsize=4)
def _raw(name: str, data_dir: str | None, download: bool) -> RawDataset:
    if name == "digits":
        return load_digits()
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir)
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, data_dir, download)
    if name == "imagefolder":
        return load_imagefolder(data_dir)
    raise UserError(f"unknown dataset '{name}' (choose from {', '.join(DATASETS)})")


def load_dataset(spec: DataSpec, *, fake_shape: tuple[int, int, int] | None = None,
                 fake_classes: int = 10, seed: int = 0) -> Dataset:
    if spec.name not in DATASETS:
        raise UserError(f"unknown dataset '{spec.name}' (choose from {', '.join(DATASETS)})")
    if spec.name == "fake":
        c, h, w = fake_shape or (3, 32, 32)
        raw = load_fake(c, (h, w), fake_classes)
    else:
        raw = _raw(spec.name, spec.data_dir, spec.download)
    train, test = raw.train, raw.test
    held = None
    if spec.holdout:
        # Cut from the whole training split with a fixed seed, before any --train-size subset: every run and
        # every subset size holds out the same images, so no descendant of a model trains on them.
        if not (0 < spec.holdout < 0.5):
            raise UserError(f"`holdout` must be in (0, 0.5), got {spec.holdout}")
        rest, held_idx = stratified_split(train.labels, spec.holdout, 0)
        train, held = train.subset(rest), train.subset(held_idx)
    if spec.train_size is not None:
        if spec.train_size < 1:
            raise UserError("`train_size` must be at least 1")
        train = train.subset(balanced_subset(train.labels, spec.train_size, seed))
    if spec.test_size is not None:
        if spec.test_size < 1:
            raise UserError("`test_size` must be at least 1")
        test = test.subset(balanced_subset(test.labels, spec.test_size, seed))
    if len(train) == 0 or len(test) == 0:
        raise UserError(f"dataset {spec.name} is empty")
    if len(raw.classes) < 2 or len(set(train.labels.tolist())) < 2:
        raise UserError(f"dataset {spec.name} has fewer than 2 classes in its training split: nothing to classify")
    return Dataset(raw.name, list(raw.classes), train, test, raw.channels, raw.mean, raw.std, spec=spec, held=held)
