"""Parameter and MAC counts.

`macs` counts multiply-accumulates of convolution and linear layers only, the convention of the seed
papers (FLOPs = 2 x MACs); `flops_all` is torch's FlopCounterMode total over every counted operator
(attention matmuls included where torch counts them). Both come from one FlopCounterMode pass.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


@torch.no_grad()
def count(model: nn.Module, input_shape: tuple[int, int, int], device: str | torch.device = "cpu") -> dict:
    """{'params', 'macs', 'flops_all'} for one image of `input_shape` (C, H, W)."""
    was_training = model.training
    model.eval()
    x = torch.zeros(1, *input_shape, device=device)
    # FlopCounterMode's module tracker asserts on parameters fed straight into a submodule (e.g. PiT's
    # cls_token) while they require grad; counting needs no gradients.
    grads = {p: p.requires_grad for p in model.parameters()}
    for p in grads:
        p.requires_grad_(False)
    try:
        with FlopCounterMode(display=False) as fc:
            model(x)
    finally:
        for p, g in grads.items():
            p.requires_grad_(g)
    per_module = fc.get_flop_counts()
    root = type(model).__name__
    conv_linear = 0
    for name, m in model.named_modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            conv_linear += sum(per_module.get(f"{root}.{name}", {}).values())
    model.train(was_training)
    return {"params": count_params(model), "macs": int(conv_linear // 2), "flops_all": int(fc.get_total_flops())}


def reduction(base: float, new: float) -> float:
    """Fractional reduction, 0.75 = 75 % fewer."""
    return 0.0 if not base else 1.0 - new / base
