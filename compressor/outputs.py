"""What a model returns: one logits tensor (a classifier), or several tensors in a tuple or dict (a backbone
with several feature maps, a detection- or segmentation-style head).

Every check that compares outputs (reload, export parity, bundles) compares all of them, flattened in
the order torch.export flattens them (tuples in order, dicts by insertion order); accuracy and the
loss-based metrics need a classifier's logits and say so otherwise.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import UserError

LOGITS = "logits"


def flatten(out: Any) -> list[torch.Tensor]:
    """The tensors of a (nested) tensor / tuple / list / dict output, in torch.export's order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flatten(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flatten(v)]
    raise UserError(f"the model returned a {type(out).__name__}; outputs must be tensors, or tuples, lists or dicts of tensors")


def names(out: Any, prefix: str = "") -> list[str]:
    """Output names for ONNX and reports: `logits` for a single tensor, dict keys, `output0`... in tuples."""
    if isinstance(out, torch.Tensor):
        return [prefix or LOGITS]
    if isinstance(out, dict):
        return [n for k, v in out.items() for n in names(v, f"{prefix}.{k}" if prefix else str(k))]
    return [n for i, v in enumerate(out) for n in names(v, f"{prefix}.{i}" if prefix else f"output{i}")]


def describe(out: Any) -> dict[str, Any]:
    """model.json's `outputs`: names, per-image shapes, and whether the model is a classifier."""
    tensors = flatten(out)
    return {"names": names(out), "shapes": [list(t.shape[1:]) for t in tensors],
            "classifier": is_classifier(out)}


def is_classifier(out: Any) -> bool:
    return isinstance(out, torch.Tensor) and out.dim() == 2


@torch.no_grad()
def probe(model: torch.nn.Module, channels: int, height: int, width: int) -> dict[str, Any]:
    """Run two zero images through the model and describe its outputs."""
    device = next(iter(model.parameters()), torch.empty(0)).device
    was = model.training
    model.eval()
    try:
        return describe(model(torch.zeros(2, channels, height, width, device=device)))
    finally:
        model.train(was)


def logits(out: Any, what: str) -> torch.Tensor:
    """The classifier's logits, or one line saying why `what` cannot run on this model."""
    if is_classifier(out):
        return out
    shapes = ", ".join(str(list(t.shape)) for t in flatten(out))
    raise UserError(f"{what} needs a classifier's logits (one tensor, batch x classes); this model returns {shapes}")


def changed_shapes(before: dict[str, Any], after: dict[str, Any]) -> str | None:
    """None when the outputs kept their names and shapes, else what changed (a pruned head)."""
    if before.get("names") != after.get("names"):
        return f"outputs {before.get('names')} became {after.get('names')}"
    for name, a, b in zip(before["names"], before["shapes"], after["shapes"]):
        if list(a) != list(b):
            return f"output '{name}' changed shape from {a} to {b}"
    return None
