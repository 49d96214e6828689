"""Seeded, class-balanced index selection: held-out splits, subsets and calibration sets."""

from __future__ import annotations

import torch


def _per_class(labels: torch.Tensor, seed: int) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        out[c] = idx[torch.randperm(len(idx), generator=g)]
    return out


def stratified_split(labels: torch.Tensor, frac: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (rest, held_out) with `frac` of every class held out."""
    keep, held = [], []
    for idx in _per_class(labels, seed).values():
        k = int(round(len(idx) * frac))
        if len(idx) > 1:
            k = min(max(k, 1), len(idx) - 1)
        held.append(idx[:k])
        keep.append(idx[k:])
    return torch.sort(torch.cat(keep)).values, torch.sort(torch.cat(held)).values


def balanced_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """`n` indices, as equal a number per class as the data allows (seeded)."""
    groups = _per_class(labels, seed)
    if n >= len(labels):
        return torch.arange(len(labels))
    classes = sorted(groups)
    base, extra = divmod(n, len(classes))
    quota = {c: base + (1 if i < extra else 0) for i, c in enumerate(classes)}
    # Classes with too few images give their surplus quota to the others.
    chosen, short = [], 0
    for c in classes:
        take = min(quota[c], len(groups[c]))
        short += quota[c] - take
        chosen.append(groups[c][:take])
    if short:
        rest = torch.cat([groups[c][min(quota[c], len(groups[c])):] for c in classes])
        g = torch.Generator().manual_seed(seed + 1)
        chosen.append(rest[torch.randperm(len(rest), generator=g)[:short]])
    return torch.sort(torch.cat(chosen)).values
