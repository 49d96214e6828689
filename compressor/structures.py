"""Which structures a pruning run removes, and how to switch them off without removing them.

Groups come from torch-pruning's DependencyGraph exactly as its pruner enumerates them. A structure
(a channel, an FFN neuron, an attention head) is switched off by zeroing its index at the input of
every conv/linear layer that consumes it: for those layers that is the same function as physically
removing it, which is what the data-driven metrics (kl, output-norm-greedy) need to evaluate.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch_pruning as tp

CONSUMER_FNS = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)
PRODUCER_FNS = (tp.prune_conv_out_channels, tp.prune_linear_out_channels)


@dataclass
class Consumer:
    module: nn.Module
    local: torch.Tensor  # consumer input indices ...
    root: torch.Tensor  # ... and the root index each one belongs to


@dataclass
class GroupInfo:
    key: tuple[int, str]  # (id(root module), handler name): how an Importance call finds its scores
    name: str
    group: tp.dependency.Group  # over every root index
    kind: str  # "channel" | "head" | "ffn" | "embed"
    n_dims: int  # root indices
    unit_size: int  # root indices per removable unit (head_dim for heads, 1 otherwise)
    n_remove: int = 0  # units this run removes
    consumers: list[Consumer] = field(default_factory=list)
    producers: list[nn.Module] = field(default_factory=list)

    @property
    def n_units(self) -> int:
        return self.n_dims // self.unit_size

    @property
    def independent(self) -> bool:
        """One producing layer: removing one unit does not change the others' outputs."""
        return len(self.producers) == 1

    def unit_dims(self, u: int) -> list[int]:
        return list(range(u * self.unit_size, (u + 1) * self.unit_size))


def group_key(group) -> tuple[int, str]:
    dep = group[0].dep
    return id(dep.target.module), dep.handler.__name__


def iter_pruner_groups(pruner):
    """The groups torch-pruning's BasePruner ranks, in its order, re-rooted as it does for attention."""
    for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types):
        is_attn, _ = pruner._is_atten_group(group)
        if is_attn:
            group = pruner._downstream_node_as_root_if_attention(group)
            if group is None:
                continue
        yield group, is_attn


def describe(pruner, model: nn.Module, ffn_modules: set[int]) -> list[GroupInfo]:
    names = {id(m): n for n, m in model.named_modules()}
    infos = []
    for group, is_attn in iter_pruner_groups(pruner):
        root = group[0].dep.target.module
        unit = 1
        if is_attn:
            kind = "head"
            qkv = [d.target.module for d, _ in group if d.target.module in pruner.num_heads and d.handler in PRODUCER_FNS]
            unit = len(group[0].idxs) // pruner.num_heads[qkv[0]]
        else:
            kind = "ffn" if id(root) in ffn_modules else "channel"
        infos.append(group_info(group, names.get(id(root), type(root).__name__), kind, unit))
    return infos


def group_info(group, name: str, kind: str = "channel", unit_size: int = 1) -> GroupInfo:
    """Describe a torch-pruning group over all its root indices: its producers and consumers."""
    info = GroupInfo(group_key(group), name, group, kind, len(group[0].idxs), unit_size)
    for i, (dep, idxs) in enumerate(group):
        mod = dep.target.module
        if not isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)):
            continue
        if dep.handler in CONSUMER_FNS:
            root_idxs = group[i].root_idxs
            keep = [j for j, r in enumerate(root_idxs) if r is not None]
            info.consumers.append(Consumer(mod, torch.tensor([idxs[j] for j in keep]),
                                           torch.tensor([root_idxs[j] for j in keep])))
        elif dep.handler in PRODUCER_FNS and mod not in info.producers:
            info.producers.append(mod)
    return info


def _channel_dim(module: nn.Module) -> int:
    return 1 if isinstance(module, nn.modules.conv._ConvNd) else -1


class Masks:
    """Forward pre-hooks that zero chosen root indices of chosen groups at their consumers' inputs."""

    def __init__(self):
        self._masks: dict[int, tuple[nn.Module, torch.Tensor]] = {}
        self._handles = []

    def _mask_for(self, module: nn.Module) -> torch.Tensor:
        if id(module) not in self._masks:
            n = int(module.in_channels if isinstance(module, nn.modules.conv._ConvNd) else module.in_features)  # type: ignore[arg-type]
            w: torch.Tensor = module.weight  # type: ignore[assignment]  # consumers are conv/linear
            self._masks[id(module)] = (module, torch.ones(n, dtype=w.dtype, device=w.device))
            self._handles.append(module.register_forward_pre_hook(self._hook))
        return self._masks[id(module)][1]

    def _hook(self, module, args):
        x = args[0]
        mask = self._masks[id(module)][1]
        if bool((mask == 1).all()):
            return None
        shape = [1] * x.dim()
        shape[_channel_dim(module)] = -1
        return (x * mask.view(shape),) + tuple(args[1:])

    def set(self, info: GroupInfo, root_dims: list[int], value: float = 0.0) -> None:
        dims = torch.tensor(root_dims, dtype=torch.long)
        for c in info.consumers:
            sel = c.local[torch.isin(c.root, dims)]
            mask = self._mask_for(c.module)
            mask[sel.to(mask.device)] = value

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._masks.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@contextlib.contextmanager
def capture_inputs(modules: list[nn.Module]):
    """Record the input tensor of each module (by id) during a forward pass."""
    seen: dict[int, torch.Tensor] = {}
    def hook(mod, args):
        seen[id(mod)] = args[0]

    handles = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def execution_order(model: nn.Module, infos: list[GroupInfo], example: torch.Tensor) -> list[GroupInfo]:
    """Sort groups by when their first consumer runs in a forward pass (upstream first)."""
    order: dict[int, int] = {}
    mods = {id(c.module): c.module for i in infos for c in i.consumers}
    def hook(mod, args):  # a pre-hook's non-None return value would replace the input
        order.setdefault(id(mod), len(order))

    handles = [m.register_forward_pre_hook(hook) for m in mods.values()]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    big = len(order) + 1
    return sorted(infos, key=lambda i: min((order.get(id(c.module), big) for c in i.consumers), default=big))
