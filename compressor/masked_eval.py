"""Evaluate a network many times, each time with one unit of a group masked, at the cost of a few passes.

For a group, everything before its first consumer computes the same activations whatever unit is masked:
that prefix runs once per calibration batch (the model traced by torch.fx, cut at the first consumer's
node). The rest runs on K masked copies stacked along the batch axis: every activation still needed after
the cut is repeated K times, and each consumer multiplies copy k's input by unit k's mask. Eval-mode
networks treat the samples of a batch independently, so copy k's outputs are exactly those of a forward
pass with unit k masked (to float rounding). Hand-written because no library cuts a traced graph and
replays its suffix on stacked masks; a model torch.fx cannot trace falls back to one pass per unit.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.fx
import torch.nn as nn

from .structures import GroupInfo, _channel_dim


class _Stop(Exception):
    """Raised by _Prefix at the cut: the rest of the graph is the suffix's work."""


class _Prefix(torch.fx.Interpreter):
    """Runs the graph up to (not including) `stop`, keeping every value computed."""

    def __init__(self, gm: torch.fx.GraphModule, stop: torch.fx.Node):
        super().__init__(gm, garbage_collect_values=False)
        self.stop = stop

    def run_node(self, n):
        if n is self.stop:
            raise _Stop
        return super().run_node(n)


def trace(model: nn.Module) -> torch.fx.GraphModule | None:
    """The traced model (sharing the model's own submodules), or None when torch.fx cannot trace it."""
    try:
        return torch.fx.symbolic_trace(model)
    except Exception:  # torch.fx raises TraceError, TypeError, NotImplementedError... on dynamic control flow
        return None


class MaskedEvaluator:
    """outputs(x, units) -> logits of shape (len(units), batch, classes), unit k masked in row k."""

    def __init__(self, gm: torch.fx.GraphModule, info: GroupInfo, memory_budget_mb: float = 256.0):
        self.gm, self.info = gm, info
        mods = {id(m): name for name, m in gm.named_modules()}
        names = {mods[id(c.module)] for c in info.consumers if id(c.module) in mods}
        if len(names) != len({id(c.module) for c in info.consumers}):
            raise LookupError("a consumer of the group is not a module of the traced graph")
        nodes = list(gm.graph.nodes)
        self.split = next(n for n in nodes if n.op == "call_module" and n.target in names)
        cut = nodes.index(self.split)
        self.prefix = nodes[:cut]
        later = set(nodes[cut:])
        self.live = [n for n in self.prefix if any(u in later for u in n.users)]
        self.batch_dependent = _batch_dependent(nodes)
        self.budget = memory_budget_mb * 2**20
        self._copies = 1

    def chunks(self, n_units: int, per_sample_bytes: int, batch: int) -> Iterator[list[int]]:
        # The suffix holds a few activations of the live size at once: budget for four.
        k = max(1, int(self.budget // max(1, 4 * per_sample_bytes * batch)))
        for i in range(0, n_units, k):
            yield list(range(i, min(n_units, i + k)))

    @torch.no_grad()
    def prefix_values(self, x: torch.Tensor) -> tuple[dict, int]:
        interp = _Prefix(self.gm, self.split)
        with contextlib.suppress(_Stop):  # the prefix ends by raising at the cut
            interp.run(x)
        env = interp.env
        per_sample = sum(v[0].numel() * v.element_size() for n in self.live
                         if isinstance(v := env.get(n), torch.Tensor) and self.batch_dependent.get(n) and v.dim() > 0)
        return env, per_sample

    @torch.no_grad()
    def outputs(self, env: dict, batch: int, units: list[int]) -> torch.Tensor:
        k = len(units)
        start: dict = {n: None for n in self.prefix}  # dead prefix values: never read again
        # Values derived from the batch size (x.shape[0] fed to a reshape) are recomputed from the repeated
        # tensors, not reused: a cached 16 would reshape 16 x k samples wrongly.
        prefix = set(self.prefix)
        recompute, need = set(), set(self.live)
        stack = [n for n in self.live if self.batch_dependent.get(n) and not isinstance(env.get(n), torch.Tensor)]
        while stack:
            n = stack.pop()
            if n in recompute:
                continue
            recompute.add(n)
            for a in n.all_input_nodes:
                if a in prefix and self.batch_dependent.get(a) and not isinstance(env.get(a), torch.Tensor):
                    stack.append(a)
                elif a in prefix:
                    need.add(a)
        for n in need - recompute:
            v = env[n]
            if isinstance(v, torch.Tensor) and self.batch_dependent.get(n) and v.dim() > 0 and v.shape[0] == batch:
                v = v.repeat(k, *([1] * (v.dim() - 1)))
            start[n] = v
        for n in recompute:
            del start[n]
        handles = [c.module.register_forward_pre_hook(self._hook(c, units, batch))
                   for c in {id(c.module): c for c in self.info.consumers}.values()]
        try:
            out = torch.fx.Interpreter(self.gm).run(None, initial_env=start)
        finally:
            for h in handles:
                h.remove()
        return out.reshape(k, batch, *out.shape[1:])

    def _hook(self, consumer, units: list[int], batch: int) -> Callable:
        module = consumer.module
        n_in = int(module.in_channels if isinstance(module, nn.modules.conv._ConvNd) else module.in_features)
        w: torch.Tensor = module.weight
        # Every consumer entry of this module (a module can consume several slices of the group).
        entries = [c for c in self.info.consumers if c.module is module]
        mask = torch.ones(len(units), n_in, dtype=w.dtype, device=w.device)
        for row, u in enumerate(units):
            dims = torch.tensor(self.info.unit_dims(u), dtype=torch.long)
            for c in entries:
                mask[row, c.local[torch.isin(c.root, dims)].to(w.device)] = 0.0
        cdim = _channel_dim(module)

        def hook(mod, args):
            x = args[0]
            shape = [len(units), 1] + [1] * (x.dim() - 1)
            shape[1 + cdim % x.dim()] = n_in
            y = x.reshape(len(units), batch, *x.shape[1:]) * mask.view(shape)
            return (y.reshape(x.shape),) + tuple(args[1:])

        return hook


class CachedPrefix:
    """The activations entering one group's part of the network, for every calibration batch, computed
    once; `run(i)` replays the rest of the network on batch i (hooks on the model's modules fire as usual,
    and may stop the pass early). For metrics that run many unreplicated passes per group (greedy)."""

    def __init__(self, ev: MaskedEvaluator, batches, limit_bytes: int = 1 << 30):
        self.ev, self.envs = ev, []
        size = 0
        for x, _ in batches:
            env, _ = ev.prefix_values(x)
            kept = {n: env[n] for n in ev.live}
            size += sum(v.numel() * v.element_size() for v in kept.values() if isinstance(v, torch.Tensor))
            if size > limit_bytes:
                raise MemoryError("the cached activations would exceed the memory limit")
            self.envs.append(kept)

    def __len__(self) -> int:
        return len(self.envs)

    @torch.no_grad()
    def run(self, i: int):
        start: dict = {n: None for n in self.ev.prefix}
        start.update(self.envs[i])
        return torch.fx.Interpreter(self.ev.gm).run(None, initial_env=start)


def _batch_dependent(nodes: list[torch.fx.Node]) -> dict[torch.fx.Node, bool]:
    """Values derived from the input (repeated per copy) vs constants such as parameters (shared)."""
    dep: dict[torch.fx.Node, bool] = {}
    for n in nodes:
        dep[n] = n.op == "placeholder" or any(dep.get(a, False) for a in n.all_input_nodes)
    return dep
