"""Batched augmentation on tensors: one call per batch instead of one PIL round trip per image.

Every random draw comes from the caller's generator, so a (seed, epoch) pair fixes the augmentation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

AUGMENTATIONS = ("crop", "flip", "rotate")


def random_crop(x: torch.Tensor, padding: int, g: torch.Generator) -> torch.Tensor:
    """Zero-pad by `padding` and take a random HxW window per image (the CIFAR 'pad-4 crop')."""
    if padding <= 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=g, device=g.device).to(x.device)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=g, device=g.device).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device)[None])[:, :, None]  # n,h,1
    cols = (ox[:, None] + torch.arange(w, device=x.device)[None])[:, None, :]  # n,1,w
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def random_flip(x: torch.Tensor, g: torch.Generator, p: float = 0.5) -> torch.Tensor:
    flip = (torch.rand(x.shape[0], generator=g, device=g.device) < p).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def random_rotate(x: torch.Tensor, degrees: float, g: torch.Generator) -> torch.Tensor:
    """Rotate each image by a uniform angle in [-degrees, degrees] (bilinear, zero fill)."""
    n = x.shape[0]
    ang = (torch.rand(n, generator=g, device=g.device).to(x.device) * 2 - 1) * math.radians(degrees)
    cos, sin = torch.cos(ang), torch.sin(ang)
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def apply(x: torch.Tensor, ops: tuple[str, ...], g: torch.Generator, padding: int = 4, degrees: float = 15.0) -> torch.Tensor:
    """Apply the named augmentations, in a fixed order, to a float batch (N, C, H, W)."""
    if "rotate" in ops:
        x = random_rotate(x, degrees, g)
    if "crop" in ops:
        x = random_crop(x, padding, g)
    if "flip" in ops:
        x = random_flip(x, g)
    return x
