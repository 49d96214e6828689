"""In-house networks as a user would write them: residual and depthwise blocks, a two-output head, a dict
output, a timm backbone under a custom head, and factories that fail in the ways users' factories do."""

from __future__ import annotations

import torch
import torch.nn as nn


class Block(nn.Module):
    """conv-bn-relu, depthwise conv-bn, pointwise conv-bn, plus the input (shapes match)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.pw = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.relu(x + self.pw(self.dw(self.conv(x))))


class Trunk(nn.Module):
    def __init__(self, in_chans: int, width: int, blocks: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(*[Block(width) for _ in range(blocks)])
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU())

    def forward(self, x):
        return self.down(self.blocks(self.stem(x)))


class ResidualDW(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 16, blocks: int = 2, in_chans: int = 3):
        super().__init__()
        self.trunk = Trunk(in_chans, width, blocks)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.fc(self.trunk(x).mean((2, 3)))


class TwoHead(nn.Module):
    """A classification head and a dense (segmentation-style) head: returns (logits, mask logits)."""

    def __init__(self, num_classes: int = 10, seg_classes: int = 3, width: int = 16, blocks: int = 2):
        super().__init__()
        self.trunk = Trunk(3, width, blocks)
        self.cls = nn.Linear(2 * width, num_classes)
        self.seg = nn.Sequential(nn.Conv2d(2 * width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, seg_classes, 1))

    def forward(self, x):
        f = self.trunk(x)
        return self.cls(f.mean((2, 3))), self.seg(f)


class DictOut(nn.Module):
    """Returns {"logits", "embedding"}, as retrieval and multi-task models do."""

    def __init__(self, num_classes: int = 10, width: int = 16, dim: int = 8):
        super().__init__()
        self.trunk = Trunk(3, width, 1)
        self.fc = nn.Linear(2 * width, num_classes)
        self.embed = nn.Linear(2 * width, dim)

    def forward(self, x):
        f = self.trunk(x).mean((2, 3))
        return {"logits": self.fc(f), "embedding": self.embed(f)}


def residual_dw(num_classes: int = 10, width: int = 16, blocks: int = 2, in_chans: int = 3) -> nn.Module:
    return ResidualDW(num_classes, width, blocks, in_chans)


def two_head(num_classes: int = 10, seg_classes: int = 3, width: int = 16, blocks: int = 2) -> nn.Module:
    return TwoHead(num_classes, seg_classes, width, blocks)


def dict_out(num_classes: int = 10, width: int = 16) -> nn.Module:
    return DictOut(num_classes, width)


def timm_backbone(num_classes: int = 10, backbone: str = "resnet10t") -> nn.Module:
    """A timm backbone (features only, no classifier) under an in-house head."""
    import timm

    body = timm.create_model(backbone, pretrained=False, num_classes=0, global_pool="avg")
    return nn.Sequential(body, nn.Linear(body.num_features, 64), nn.ReLU(), nn.Linear(64, num_classes))


def not_a_module():
    return {"weights": 1}


def broken(width: int = 16):
    raise RuntimeError("CUDA out of memory in the user's factory")
