"""Layer pruning: removing whole residual blocks (CIFAR/torchvision ResNets, timm ViT blocks, and the
inverted residuals of MobileNetV2 / EfficientNet-style networks from torchvision and timm).

A block is removable when its output has its input's shape (no downsampling shortcut) and it is not a
stage's first block; each stage keeps at least `min_per_stage` blocks. In a mobile network a stage is a
run of blocks that starts with a block without a skip connection (the one that changes the shape). A removed block becomes an
identity, so the model is physically shallower and its directory records which blocks are gone.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import importance as imp
from .data import Batches, ImageSet, InputSpec
from .errors import UserError
from .progress import QUIET, Reporter
from .similarity import linear_cka, penultimate

LAYER_METRICS = ("kl", "taylor", "l1", "random", "cka")


@dataclass
class Block:
    path: str
    stage: str
    index: int
    shape_preserving: bool


def find_blocks(model: nn.Module) -> list[Block]:
    """Residual blocks in forward order; removed ones (identities) are not listed."""
    blocks = []
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        for i, b in enumerate(model.blocks):
            if not isinstance(b, nn.Identity):
                blocks.append(Block(f"blocks.{i}", "blocks", i, True))
        return blocks
    stages = [n for n, m in model.named_children() if n.startswith("layer") and isinstance(m, nn.Sequential)]
    if not stages:
        mobile = _inverted_residuals(model)
        if mobile:
            return mobile
        raise UserError(f"layer pruning supports residual stages (ResNet layerN, timm ViT blocks, inverted "
                        f"residuals); {type(model).__name__} has none")
    for stage in stages:
        for i, b in enumerate(getattr(model, stage)):
            if isinstance(b, nn.Identity):
                continue
            preserving = getattr(b, "downsample", None) is None and i > 0
            blocks.append(Block(f"{stage}.{i}", stage, i, preserving))
    return blocks


def _skips(m: nn.Module) -> bool | None:
    """torchvision's InvertedResidual says `use_res_connect`, timm's efficientnet blocks `has_skip`;
    None: not such a block."""
    for attr in ("use_res_connect", "has_skip"):
        v = getattr(m, attr, None)
        if isinstance(v, bool):
            return v
    return None


def _inverted_residuals(model: nn.Module) -> list[Block]:
    blocks = []
    for path, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        start = None
        for i, b in enumerate(seq):
            skip = _skips(b)
            if skip is None:
                start = None  # a stem or head between stages
                continue
            if not skip or start is None:
                start = i
            blocks.append(Block(f"{path}.{i}" if path else str(i), f"{path}@{start}", i, skip))
    return blocks


def removable(model: nn.Module, min_per_stage: int) -> list[Block]:
    blocks = find_blocks(model)
    per_stage: dict[str, int] = {}
    for b in blocks:
        per_stage[b.stage] = per_stage.get(b.stage, 0) + 1
    return [b for b in blocks if b.shape_preserving and per_stage[b.stage] > min_per_stage]


@contextlib.contextmanager
def without(model: nn.Module, path: str):
    """Temporarily replace a block by an identity (the block removed)."""
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    block = getattr(parent, child)
    setattr(parent, child, nn.Identity())
    try:
        yield
    finally:
        setattr(parent, child, block)


def _filter_l1(block: nn.Module) -> float:
    """Mean over the block's conv/linear layers of their mean filter L1 norm."""
    vals = [m.weight.detach().abs().flatten(1).sum(1).mean().item()
            for m in block.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    return sum(vals) / len(vals) if vals else 0.0


@torch.no_grad()
def score_blocks(model: nn.Module, blocks: list[Block], metric: str, calib: ImageSet | None, spec: InputSpec,
                 batch_size: int = 128, device="cpu", seed: int = 0, reporter: Reporter = QUIET,
                 kl_direction: str = imp.KL_DEFAULT) -> dict[str, float]:
    """Lower score = removed first."""
    if metric not in LAYER_METRICS:
        raise UserError(f"layer metric must be one of {', '.join(LAYER_METRICS)}")
    if metric == "random":
        g = torch.Generator().manual_seed(seed)
        return {b.path: float(v) for b, v in zip(blocks, torch.rand(len(blocks), generator=g))}
    if metric == "l1":
        return {b.path: _filter_l1(model.get_submodule(b.path)) for b in blocks}
    if calib is None:
        raise UserError(f"layer metric {metric} needs calibration data (pass `data`)")
    model.eval()
    if metric == "taylor":
        return _taylor(model, blocks, calib, spec, batch_size, device, reporter)
    batches = Batches(calib, spec, batch_size, device=device)
    scores = {}
    if metric == "kl":
        base = imp.log_probs(model, batches)
        with reporter.task("kl: scoring blocks", len(blocks)) as advance:
            for b in blocks:
                with without(model, b.path):
                    scores[b.path] = imp.kl_divergence(model, batches, base, kl_direction)
                advance()
        return scores
    ref = penultimate(model, calib, spec, batch_size, device)
    with reporter.task("cka: scoring blocks", len(blocks)) as advance:
        for b in blocks:
            with without(model, b.path):
                scores[b.path] = 1.0 - linear_cka(ref, penultimate(model, calib, spec, batch_size, device))
            advance()
    return scores


def _taylor(model: nn.Module, blocks: list[Block], calib: ImageSet, spec: InputSpec, batch_size: int, device,
            reporter: Reporter) -> dict[str, float]:
    """First-order Taylor (Molchanov et al. 2019) of removing a block: the sum of |w * dL/dw| over every
    parameter in it. Removing a residual block is zeroing all its parameters (the branch then adds zero),
    and a channel's Taylor score is the same sum over the parameters that removing the channel zeroes
    (torch-pruning's GroupTaylorImportance), so block and channel scores are on one scale."""
    with torch.enable_grad():
        imp.accumulate_gradients(model, calib, spec, batch_size, device, reporter)
    scores: dict[str, float] = {}
    for b in blocks:
        params = [p for p in model.get_submodule(b.path).parameters() if p.grad is not None]
        scores[b.path] = sum((float((p * p.grad).abs().sum()) for p in params), 0.0)  # type: ignore[operator]  # grad checked above
    model.zero_grad(set_to_none=True)
    return scores


def choose_blocks(model: nn.Module, scores: dict[str, float], n: int, min_per_stage: int) -> list[str]:
    """The n lowest-scored removable blocks, never taking a stage below its minimum."""
    candidates = {b.path: b for b in removable(model, min_per_stage)}
    left: dict[str, int] = {}
    for b in find_blocks(model):
        left[b.stage] = left.get(b.stage, 0) + 1
    chosen: list[str] = []
    for path in sorted(candidates, key=lambda p: (scores[p], p)):
        b = candidates[path]
        if len(chosen) == n:
            break
        if left[b.stage] > min_per_stage:
            chosen.append(path)
            left[b.stage] -= 1
    return chosen


def conv_channels(module: nn.Module) -> int:
    """Output channels of every conv inside (do Nascimento et al.'s count of filters a layer removal takes)."""
    return sum(m.out_channels for m in module.modules() if isinstance(m, nn.modules.conv._ConvNd))
