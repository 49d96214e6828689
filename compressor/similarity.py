"""Linear CKA (Kornblith et al. 2019), feature-space form, and penultimate features of a model.

Hand-written: CKA is a few lines of linear algebra and no maintained package ships it for tensors.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from .data import Batches, ImageSet, InputSpec
from .models import get_classifier


def _debias(xty, rows_x, rows_y, sq_x, sq_y, n):
    return xty - n / (n - 2.0) * rows_x.dot(rows_y) + sq_x * sq_y / ((n - 1) * (n - 2))


def linear_cka(x, y, debiased: bool = False) -> float:
    """CKA between representations x (n, p) and y (n, q): the biased HSIC estimator unless `debiased`."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape[0] != y.shape[0]:
        raise ValueError("representations must cover the same examples")
    x = x - x.mean(0, keepdims=True)
    y = y - y.mean(0, keepdims=True)
    dot = np.linalg.norm(x.T @ y) ** 2
    nx = np.linalg.norm(x.T @ x)
    ny = np.linalg.norm(y.T @ y)
    if debiased:
        n = x.shape[0]
        rx, ry = np.einsum("ij,ij->i", x, x), np.einsum("ij,ij->i", y, y)
        sx, sy = rx.sum(), ry.sum()
        dot = _debias(dot, rx, ry, sx, sy, n)
        nx = np.sqrt(_debias(nx ** 2, rx, rx, sx, sx, n))
        ny = np.sqrt(_debias(ny ** 2, ry, ry, sy, sy, n))
    if nx == 0 or ny == 0:
        return 0.0
    return float(dot / (nx * ny))


@torch.no_grad()
def penultimate(model: nn.Module, data: ImageSet, spec: InputSpec, batch_size: int = 256,
                device: str | torch.device = "cpu") -> np.ndarray:
    """The classifier's input (global-average-pooled features for CNNs, pre-logits for ViTs)."""
    head = get_classifier(model)
    feats: list[torch.Tensor] = []

    def keep(m, a) -> None:
        feats.append(a[0].detach().float().flatten(1).cpu())

    handle = head.register_forward_pre_hook(keep)
    was = model.training
    model.eval()
    try:
        for x, _ in Batches(data, spec, batch_size, device=device):
            model(x)
    finally:
        handle.remove()
        model.train(was)
    return torch.cat(feats).numpy()
