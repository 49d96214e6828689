"""Readers for the supported datasets, each returning uint8 images at their native size.

No reader unpickles arbitrary objects: CIFAR's python batches go through an allow-list unpickler
that can only rebuild NumPy arrays and plain containers.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DEFAULT_FASHION_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}

# Per-dataset normalisation (at native channel count); digits and folders are measured.
KNOWN_STATS = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@dataclass
class ImageSet:
    """Images as uint8 (N, C, H, W) in memory, or as file paths decoded on demand."""

    labels: torch.Tensor  # int64 (N,)
    images: torch.Tensor | None = None
    paths: list[str] | None = None

    def __len__(self) -> int:
        return int(self.labels.numel())

    def subset(self, idx: torch.Tensor) -> "ImageSet":
        idx = idx.long()
        return ImageSet(
            labels=self.labels[idx],
            images=None if self.images is None else self.images[idx],
            paths=None if self.paths is None else [self.paths[i] for i in idx.tolist()],
        )


@dataclass
class RawDataset:
    name: str
    classes: list[str]
    train: ImageSet
    test: ImageSet
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


# ----------------------------------------------------------------------------- digits
def load_digits() -> RawDataset:
    """scikit-learn's 1,797 real 8x8 handwritten digits; fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits as _ld
    from sklearn.model_selection import train_test_split

    d = _ld()
    imgs = np.round(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    idx_tr, idx_te = train_test_split(np.arange(len(d.target)), test_size=0.2, random_state=0, stratify=d.target)
    images = torch.from_numpy(imgs)
    labels = torch.from_numpy(d.target.astype(np.int64))
    tr = ImageSet(labels=labels[idx_tr], images=images[idx_tr])
    te = ImageSet(labels=labels[idx_te], images=images[idx_te])
    mean, std = _measure(images[idx_tr])
    return RawDataset("digits", [str(i) for i in range(10)], tr, te, 1, mean, std)


def _measure(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.float().div_(255)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


# ----------------------------------------------------------------------------- Fashion-MNIST (IDX)
def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) as a uint8 array, validating its header."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if len(raw) < 4:
        raise UserError(f"{path} is not an IDX file (too short)")
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08 or ndim not in (1, 3):
        raise UserError(f"{path} is not an unsigned-byte IDX file")
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    body = raw[4 + 4 * ndim :]
    if len(body) != int(np.prod(dims)):
        raise UserError(f"{path} is truncated: header says {dims}, found {len(body)} bytes of data")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _find(data_dir: Path, stem: str) -> Path:
    for cand in (data_dir / f"{stem}.gz", data_dir / stem):
        if cand.is_file():
            return cand
    raise UserError(f"{data_dir} has no {stem}[.gz] (expected the four Fashion-MNIST IDX files)")


def load_fashion_mnist(data_dir: str | None) -> RawDataset:
    root = Path(data_dir or DEFAULT_FASHION_DIR)
    if not root.is_dir():
        raise UserError(
            f"Fashion-MNIST directory {root} does not exist (on Debian: apt-get install dataset-fashion-mnist, "
            "or pass `data_dir` with the IDX .gz files)"
        )
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
        y = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise UserError(f"{root}: {prefix} images and labels disagree ({x.shape} vs {y.shape})")
        parts[split] = ImageSet(labels=torch.from_numpy(y.astype(np.int64)), images=torch.from_numpy(x.copy())[:, None])
    mean, std = KNOWN_STATS["fashion-mnist"]
    return RawDataset("fashion-mnist", FASHION_CLASSES, parts["train"], parts["test"], 1, mean, std)


# ----------------------------------------------------------------------------- CIFAR
class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds only NumPy arrays and builtin containers; anything else is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("copy_reg", "_reconstructor"),
        ("copyreg", "_reconstructor"),
        ("__builtin__", "object"),
        ("builtins", "object"),
        ("_codecs", "encode"),  # how Python 3 pickles an array's raw bytes at protocol 2
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_cifar_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise UserError(f"missing CIFAR file {path}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise UserError(f"{path} is not a CIFAR python batch: {e}") from None
    if not isinstance(d, dict):
        raise UserError(f"{path} is not a CIFAR python batch")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def _cifar_arrays(batches: list[dict], label_key: str, path: Path) -> ImageSet:
    xs, ys = [], []
    for b in batches:
        if "data" not in b or label_key not in b:
            raise UserError(f"{path}: CIFAR batch lacks 'data' or '{label_key}'")
        x = np.asarray(b["data"], dtype=np.uint8)
        if x.ndim != 2 or x.shape[1] != 3072:
            raise UserError(f"{path}: CIFAR data has shape {x.shape}, expected (N, 3072)")
        xs.append(x.reshape(-1, 3, 32, 32))
        ys.append(np.asarray(b[label_key], dtype=np.int64))
    return ImageSet(labels=torch.from_numpy(np.concatenate(ys)), images=torch.from_numpy(np.concatenate(xs)))


def load_cifar(name: str, data_dir: str | None, download: bool = False) -> RawDataset:
    if not data_dir:
        raise UserError(f"{name} needs `data_dir` pointing at the torchvision layout (the extracted python batches)")
    root = Path(data_dir)
    sub = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    if not sub.is_dir() and ((root / "data_batch_1").exists() or (root / "train").is_file()):
        sub = root  # the batches themselves were given
    if not sub.is_dir() or not any(sub.iterdir()):
        if download:
            _download_cifar(name, root)
            sub = root / sub.name
        else:
            raise UserError(
                f"{root} has no {sub.name}/ (torchvision layout); pass `download` where you are online"
            )
    if name == "cifar10":
        train = _cifar_arrays([_load_cifar_batch(sub / f"data_batch_{i}") for i in range(1, 6)], "labels", sub)
        test = _cifar_arrays([_load_cifar_batch(sub / "test_batch")], "labels", sub)
        meta = _load_cifar_batch(sub / "batches.meta") if (sub / "batches.meta").exists() else {}
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get("label_names", [])] or [str(i) for i in range(10)]
    else:
        train = _cifar_arrays([_load_cifar_batch(sub / "train")], "fine_labels", sub)
        test = _cifar_arrays([_load_cifar_batch(sub / "test")], "fine_labels", sub)
        meta = _load_cifar_batch(sub / "meta") if (sub / "meta").exists() else {}
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get("fine_label_names", [])] or [str(i) for i in range(100)]
    mean, std = KNOWN_STATS[name]
    return RawDataset(name, names, train, test, 3, mean, std)


def _download_cifar(name: str, root: Path) -> None:
    """For users online: torchvision's downloader (checks its MD5); fails here with a clear message."""
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        root.mkdir(parents=True, exist_ok=True)
        cls(str(root), train=True, download=True)
    except Exception as e:  # network errors come in many types
        raise UserError(f"cannot download {name}: {str(e).splitlines()[0][:160]} (no network?)") from None


# ----------------------------------------------------------------------------- image folders
def _scan_classes(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan(root: Path, classes: list[str]) -> ImageSet:
    paths, labels = [], []
    for i, c in enumerate(classes):
        d = root / c
        if not d.is_dir():
            continue
        for p in sorted(d.rglob("*")):
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
                paths.append(str(p))
                labels.append(i)
    return ImageSet(labels=torch.tensor(labels, dtype=torch.int64), paths=paths)


def load_imagefolder(data_dir: str | None, seed: int = 0) -> RawDataset:
    """torchvision ImageFolder layout: DIR/train/<class>/* and DIR/val|test/<class>/*, or DIR/<class>/*."""
    if not data_dir:
        raise UserError("imagefolder needs `data_dir`")
    root = Path(data_dir)
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist")
    test_dir = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        classes = _scan_classes(root / "train")
        train, test = _scan(root / "train", classes), _scan(test_dir, classes)
    else:
        classes = _scan_classes(root)
        full = _scan(root, classes)
        if not classes or len(full) == 0:
            raise UserError(f"{root} holds no images in class sub-folders (ImageFolder layout)")
        train, test = _split(full, 0.2, seed)
    if not classes or len(train) == 0:
        raise UserError(f"{root} holds no images in class sub-folders (ImageFolder layout)")
    if len(test) == 0:
        raise UserError(f"{root}: the test split is empty")
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return RawDataset("imagefolder", classes, train, test, 3, mean, std)


def _split(full: ImageSet, frac: float, seed: int) -> tuple[ImageSet, ImageSet]:
    from .splits import stratified_split

    a, b = stratified_split(full.labels, frac, seed)
    return full.subset(a), full.subset(b)


# ----------------------------------------------------------------------------- fake
def load_fake(channels: int, size: tuple[int, int], num_classes: int, n_train: int = 256, n_test: int = 64) -> RawDataset:
    """Random images for latency measurement only: accuracy on them means nothing."""
    g = torch.Generator().manual_seed(0)
    def make(n):
        return ImageSet(
            labels=torch.randint(0, num_classes, (n,), generator=g),
            images=torch.randint(0, 256, (n, channels, *size), generator=g, dtype=torch.uint8),
        )
    return RawDataset("fake", [str(i) for i in range(num_classes)], make(n_train), make(n_test), channels,
                      (0.5,) * channels, (0.25,) * channels)


def decode_image(path: str, channels: int) -> torch.Tensor:
    """Decode one image file to uint8 (C, H, W)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as raw:
            arr = np.asarray(raw.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as e:
        raise UserError(f"cannot decode image {path}: {e}") from None
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))
