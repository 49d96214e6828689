"""Top-1 / top-5 accuracy on a split."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import outputs
from .data import Batches, ImageSet, InputSpec


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageSet, spec: InputSpec, batch_size: int = 256,
             device: str | torch.device = "cpu") -> dict:
    """{'top1', 'top5' (percent), 'loss', 'n'}; top-5 is top-k with k = min(5, classes)."""
    was = model.training
    model.eval()
    correct1 = correct5 = 0
    loss = 0.0
    n = 0
    for x, y in Batches(data, spec, batch_size, device=device):
        out = outputs.logits(model(x), "accuracy").float()
        loss += float(F.cross_entropy(out, y, reduction="sum"))
        k = min(5, out.shape[1])
        top = out.topk(k, dim=1).indices
        correct1 += int((top[:, 0] == y).sum())
        correct5 += int((top == y[:, None]).any(1).sum())
        n += y.numel()
    model.train(was)
    return {"top1": round(100.0 * correct1 / max(n, 1), 3), "top5": round(100.0 * correct5 / max(n, 1), 3),
            "loss": round(loss / max(n, 1), 5), "n": n}
