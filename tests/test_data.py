"""Datasets, splits, calibration sets and the batched augmentation."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from compressor.data import DataSpec, load_dataset
from compressor.data.augment import random_crop, random_flip, random_rotate
from compressor.data.loader import Batches, fit_size
from compressor.data.sources import load_cifar, load_fashion_mnist, read_idx
from compressor.data.splits import balanced_subset, stratified_split
from compressor.errors import UserError


def test_digits_is_real_and_split_is_fixed():
    a = load_dataset(DataSpec("digits"))
    b = load_dataset(DataSpec("digits"))
    assert len(a.train) + len(a.test) == 1797 and a.num_classes == 10
    assert torch.equal(a.test.labels, b.test.labels) and torch.equal(a.test.images, b.test.images)
    assert a.train.images.dtype == torch.uint8 and a.train.images.shape[1:] == (1, 8, 8)


def test_calibration_is_class_balanced_and_seeded():
    ds = load_dataset(DataSpec("digits"))
    c = ds.calibration(300, seed=1)
    counts = torch.bincount(c.labels, minlength=10)
    assert counts.sum() == 300 and counts.max() - counts.min() <= 1
    assert torch.equal(c.labels, ds.calibration(300, seed=1).labels)
    assert not torch.equal(c.images, ds.calibration(300, seed=2).images)


def test_holdout_never_overlaps_training():
    labels = torch.arange(100) % 5
    rest, held = stratified_split(labels, 0.2, 0)
    assert len(set(rest.tolist()) & set(held.tolist())) == 0 and len(rest) + len(held) == 100
    assert torch.bincount(labels[held]).tolist() == [4] * 5


def test_balanced_subset_when_a_class_is_short():
    labels = torch.tensor([0] * 2 + [1] * 50)
    idx = balanced_subset(labels, 20, 0)
    assert len(idx) == 20 and (labels[idx] == 0).sum() == 2


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def test_idx_reader_and_truncation(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 255, (5, 28, 28), dtype=np.uint8)
    p = tmp_path / "x.gz"
    p.write_bytes(gzip.compress(_idx_bytes(imgs)))
    assert np.array_equal(read_idx(p), imgs)
    p.write_bytes(gzip.compress(_idx_bytes(imgs)[:-10]))
    with pytest.raises(UserError, match="truncated"):
        read_idx(p)


def test_fashion_mnist_layout(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 10)):
        (tmp_path / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(rng.integers(0, 255, (n, 28, 28)))))
        (tmp_path / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(np.arange(n) % 10)))
    ds = load_fashion_mnist(str(tmp_path))
    assert len(ds.train) == 20 and len(ds.test) == 10 and ds.classes[0] == "T-shirt/top"
    with pytest.raises(UserError, match="does not exist"):
        load_fashion_mnist(str(tmp_path / "missing"))


@pytest.mark.skipif(not __import__("os").path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"),
                    reason="real Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist():
    ds = load_dataset(DataSpec("fashion-mnist", train_size=1000))
    assert len(ds.train) == 1000 and len(ds.test) == 10000 and ds.train.images.shape[-1] == 28


def _cifar_dir(tmp_path, n=10):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), b"labels": list(range(n))}
        (root / name).write_bytes(pickle.dumps(d, protocol=2))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}, protocol=2))
    return root


def test_cifar_reader_without_unrestricted_unpickling(tmp_path):
    _cifar_dir(tmp_path)
    ds = load_cifar("cifar10", str(tmp_path))
    assert ds.train.images.shape == (50, 3, 32, 32) and ds.classes[3] == "c3"


class _Evil:
    def __reduce__(self):
        return (print, ("owned",))


def test_cifar_reader_refuses_code(tmp_path):
    root = _cifar_dir(tmp_path)
    (root / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": [1]}, protocol=2))
    with pytest.raises(UserError, match=r"refusing to load (__builtin__|builtins)\.print"):
        load_cifar("cifar10", str(tmp_path))


def test_cifar_without_files_says_so(tmp_path):
    with pytest.raises(UserError, match="torchvision layout"):
        load_cifar("cifar10", str(tmp_path))


def test_fit_size_pads_small_enlargements_and_resizes_otherwise():
    x = torch.rand(2, 1, 28, 28)
    y = fit_size(x, 32, 32)
    assert y.shape[-2:] == (32, 32) and torch.equal(y[..., 2:30, 2:30], x) and y[..., :2, :].abs().sum() == 0
    assert fit_size(torch.rand(1, 1, 8, 8), 32, 32).shape[-1] == 32


def test_augmentations_apply_and_are_seeded():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8).repeat(32, 1, 1, 1)
    g = lambda s: torch.Generator().manual_seed(s)
    flipped = random_flip(x, g(0))
    n_flipped = sum(torch.equal(flipped[i], x[i].flip(2)) for i in range(len(x)))
    assert 0 < n_flipped < len(x)
    assert torch.equal(random_flip(x, g(0)), flipped)
    crop = random_crop(x, 4, g(1))
    assert crop.shape == x.shape and not torch.equal(crop, x)
    assert torch.equal(crop, random_crop(x, 4, g(1)))
    rot = random_rotate(x, 30, g(2))
    assert rot.shape == x.shape and not torch.allclose(rot, x)


def test_epoch_batches_are_reproducible_and_differ_between_epochs():
    ds = load_dataset(DataSpec("digits"))
    spec = ds.input_spec(3, 16, 16)
    first = lambda epoch: next(iter(Batches(ds.train, spec, 32, shuffle=True, augment_ops=("crop", "flip"), seed=3, epoch=epoch)))
    (a, ya), (b, yb), (_, yc) = first(0), first(0), first(1)
    assert torch.equal(a, b) and torch.equal(ya, yb) and not torch.equal(ya, yc)
    assert a.shape == (32, 3, 16, 16)
