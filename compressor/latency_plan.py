"""Choose per-group widths that keep the most importance within a latency budget (NetAdapt-style greedy).

The network's latency is modelled as a constant plus the sum over its conv/linear layers (and attention
cores) of a measured cost that depends on the layer's input and output widths: `cost(signature, c_in,
c_out)` in ms. Each step removes, from one group, the block of its least important remaining units that
loses the least importance per millisecond saved; several block sizes are tried per group, so a width the
hardware dislikes (one that is slower than a wider one) is stepped over because the table says so.

Depth is a move beside the widths: removing a whole residual block saves its layers' cost at their current
widths plus the block's own overhead (what the runtime spends on it beyond its conv/linear layers, measured
on the block whole: normalisation, activations, the residual add, per-op dispatch). It loses the importance
of every unit still inside the block, on the same scale as a width step (a block removed is its inner
units removed, plus for Taylor and KL the block's own first-order or measured loss change, which also
counts its output into the residual stream), so the planner compares the two by importance lost per ms saved. Pure algorithm: the
caller supplies the cost function (measured on the target, or a synthetic table in tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .errors import UserError

Cost = Callable[[str, int, int], float]


@dataclass
class Group:
    """A set of coupled units that is pruned together (a conv's output channels and all they touch)."""

    name: str
    n: int  # units in the parent
    scores: np.ndarray  # importance per unit (comparable across groups), length n
    ladder: list[int] = field(default_factory=list)  # allowed kept widths, ascending; the last is n

    def __post_init__(self):
        self.scores = np.asarray(self.scores, dtype=np.float64)
        if len(self.scores) != self.n:
            raise ValueError(f"group {self.name}: {len(self.scores)} scores for {self.n} units")
        if not self.ladder:
            self.ladder = list(range(1, self.n + 1))
        self.sorted_scores = np.sort(self.scores)  # least important first


@dataclass
class Layer:
    """A conv/linear layer (or an attention core): its widths come from groups (or are fixed, e.g. the
    image channels). A group's width counts units; a unit may span several of the layer's dimensions
    (a head is head_dim columns of proj and 3 x head_dim rows of qkv)."""

    name: str
    signature: str  # everything but the widths: kind, kernel, stride, groups mode, spatial size, batch
    in_group: str | None
    out_group: str | None
    in_fixed: int = 0
    out_fixed: int = 0
    depthwise: bool = False  # in = out = groups = the width of in_group
    in_unit: int = 1  # layer dimensions per unit of in_group
    out_unit: int = 1  # layer dimensions per unit of out_group

    def cost(self, cost: Cost, w: dict[str, int]) -> float:
        return cost(self.signature, *self.widths(w))

    def widths(self, w: dict[str, int]) -> tuple[int, int]:
        c_in = w[self.in_group] * self.in_unit if self.in_group is not None else self.in_fixed
        c_out = w[self.out_group] * self.out_unit if self.out_group is not None else self.out_fixed
        return (c_in, c_in) if self.depthwise else (c_in, c_out)


@dataclass
class DepthBlock:
    """A residual block the plan may remove: its conv/linear layers, the groups that live only inside it
    (a removed block takes all their units), and its measured overhead beyond those layers, in ms."""

    name: str
    stage: str
    layers: list[str]
    groups: list[str]
    overhead_ms: float = 0.0
    score: float | None = None  # the block's own importance on the units' scale; None: the sum of its units'
    layers_ms: float = 0.0  # its layers' modelled ms at the widths overhead_ms was measured at (0: unknown)
    floor_overhead_ms: float = 0.0  # the same, measured again with every group at its width floor
    floor_layers_ms: float = 0.0  # (0: not measured)

    def extra_ms(self, layers_now_ms: float) -> float:
        """The overhead at the layers' current modelled ms: between the parent's widths and the width floor,
        linear in the layers' ms (normalisation, activations and the add shrink with the channels; per-op
        dispatch does not), since a plan may narrow a block before it removes it. Without a floor
        measurement a negative overhead (its layers modelled too dear) shrinks with them, or a block
        narrowed first would look as if removing it saved nothing."""
        if 0 < self.floor_layers_ms < self.layers_ms:
            t = min(max((layers_now_ms - self.floor_layers_ms) / (self.layers_ms - self.floor_layers_ms), 0.0), 1.0)
            return self.floor_overhead_ms + t * (self.overhead_ms - self.floor_overhead_ms)
        if self.overhead_ms >= 0 or self.layers_ms <= 0:
            return self.overhead_ms
        return self.overhead_ms * min(layers_now_ms / self.layers_ms, 1.0)


def ladder(n: int, round_to: int | None = None, levels: int = 16, min_fraction: float = 0.0,
           align: tuple[int, int] = (1, 1)) -> list[int]:
    """Kept widths a group may take, at least `min_fraction` of n: multiples of round_to when given,
    otherwise about `levels` evenly spaced widths and every multiple of 8 in between (the widths CPU/GPU
    kernels favour; whether they are faster here is for the measured table to say). `align` = (multiple,
    least) keeps every width the runtime's fast kernels accept (see LayerLatency.align), n itself always."""
    floor = max(1, -(-int(n * min_fraction * 1000) // 1000))  # ceil without float surprises
    if round_to:
        multiples = [k for k in range(round_to, n + 1, round_to) if k >= floor]
        out = set(multiples) | {n} if multiples else {n}
    else:
        step = max(1, n // levels)
        out = {k for k in set(range(step, n + 1, step)) | set(range(8, n + 1, 8)) if k >= floor} | {n}
    multiple, least = align
    if multiple > 1 and n >= least:
        out = {min(n, max(least, -(-k // multiple) * multiple)) for k in out}
    return sorted(out)


@dataclass
class Plan:
    widths: dict[str, int]
    predicted_ms: float
    parent_ms: float
    steps: list[dict]
    removed: list[str] = field(default_factory=list)  # blocks, in the order the plan removed them
    exhausted: bool = False  # best effort: no move was left that saves time, and the budget is still out of reach

    @property
    def predicted_speedup(self) -> float:
        return self.parent_ms / self.predicted_ms


@dataclass
class Curve:
    """Whole-model ms as a function of the layers' summed table cost: piecewise linear through measured
    (sum, ms) points, extended past the ends with the end segments' slopes (below the first point at
    most in proportion to the work), never below 0. Layers timed
    alone do not shrink as the network does (narrow layers keep costs a one-layer graph does not show), so
    a straight line through the parent and a half-width copy overpromises at narrower widths; a third
    point at the width floor bends the line where the plans go."""

    points: list[tuple[float, float]]

    def __post_init__(self):
        pts = sorted((float(a), float(b)) for a, b in self.points)  # two points at least
        for i in range(1, len(pts)):  # more work never predicts less time (noise in the measured points)
            pts[i] = (pts[i][0], max(pts[i][1], pts[i - 1][1]))
        self.points = pts

    @classmethod
    def linear(cls, offset_ms: float, scale: float = 1.0) -> "Curve":
        return cls([(0.0, offset_ms), (1.0, offset_ms + scale)])

    def __call__(self, s: float) -> float:
        pts = self.points
        i = 1
        while i < len(pts) - 1 and s > pts[i][0]:
            i += 1
        (a, fa), (b, fb) = pts[i - 1], pts[i]
        slope = (fb - fa) / (b - a) if b > a else 0.0
        if s < a and a > 0:
            # Below the narrowest measured copy (plans that also remove blocks go there) time falls at
            # most in proportion to the work: the end segment's slope, steep where narrow layers keep
            # their cost, promised a ResNet-20 with two blocks removed 5.7x on OpenVINO where it ran 2.9x.
            slope = min(slope, fa / a)
        return max(fa + slope * (s - a), 0.0)


def predict(layers: list[Layer], widths: dict[str, int], cost: Cost, offset_ms: float,
            removed: list[DepthBlock] | None = None, curve: Curve | None = None) -> float:
    removed = removed or []
    curve = curve or Curve.linear(offset_ms)
    gone = {name for b in removed for name in b.layers}
    kept = sum(layer.cost(cost, widths) for layer in layers if layer.name not in gone)
    by_name = {layer.name: layer for layer in layers}
    extra = 0.0
    for b in removed:
        d = sum(by_name[n].cost(cost, widths) for n in b.layers)
        extra += b.extra_ms(curve(kept + d) - curve(kept))
    return curve(kept) - extra


def plan_widths(groups: list[Group], layers: list[Layer], cost: Cost, budget_ms: float, offset_ms: float = 0.0,
                tries: int = 4, on_step: Callable[[float], None] | None = None, best_effort: bool = False,
                blocks: list[DepthBlock] | None = None, min_per_stage: int = 1,
                stage_sizes: dict[str, int] | None = None, curve: Curve | None = None) -> Plan:
    """Greedy: until the predicted latency is within `budget_ms`, take the move with the least importance
    lost per ms saved. Width moves: for every group its next `tries` ladder widths and every ladder width
    within a quarter of its current width (all lower widths when none of those saves time). Depth moves:
    removing one of `blocks`, keeping `min_per_stage` blocks in each stage (`stage_sizes`: blocks per
    stage, removable or not). A budget out of reach is refused, or with `best_effort` answered with the
    fastest plan found. `curve` maps the layers' summed cost to whole-model ms (default: `offset_ms` plus
    the sum)."""
    widths = {g.name: g.n for g in groups}
    by_group = {g.name: g for g in groups}
    touching: dict[str, list[Layer]] = {g.name: [] for g in groups}
    for layer in layers:
        for gname in {layer.in_group, layer.out_group} - {None}:
            if gname not in touching:
                raise ValueError(f"layer {layer.name} names unknown group {gname}")
            touching[gname].append(layer)
    blocks = list(blocks or [])
    left = dict(stage_sizes or {})
    for b in blocks:
        left.setdefault(b.stage, sum(1 for o in blocks if o.stage == b.stage))
    by_layer = {layer.name: layer for layer in layers}
    removed: list[DepthBlock] = []
    extras: list[float] = []  # each removed block's overhead at the widths it was removed at
    curve = curve or Curve.linear(offset_ms)
    total = sum(layer.cost(cost, widths) for layer in layers)  # the layers' summed cost; the curve maps it to ms
    parent_ms = current = curve(total)
    steps: list[dict] = []
    exhausted = False

    def saving(d: float) -> float:
        return curve(total) - curve(total - d)
    while current > budget_ms:
        # (importance lost per ms saved, a block or a group's name, the group's new width, ms saved, lost, layer sum saved)
        best: tuple[float, DepthBlock | str, int, float, float, float] | None = None
        for b in blocks:
            if b in removed or left[b.stage] <= min_per_stage:
                continue
            d = sum(by_layer[n].cost(cost, widths) for n in b.layers)
            saved = b.extra_ms(saving(d)) + saving(d)
            if saved <= 0:
                continue
            # what is left of the block: its own score (or its units' sum) less what width steps took already
            taken = float(sum(by_group[g].sorted_scores[:by_group[g].n - widths[g]].sum() for g in b.groups))
            whole = b.score if b.score is not None else float(sum(by_group[g].sorted_scores.sum() for g in b.groups))
            lost = max(whole - taken, 0.0)
            ratio = lost / saved
            if best is None or ratio < best[0] - 1e-12:
                best = (ratio, b, 0, saved, lost, d)
        for g in groups:
            w = widths[g.name]
            below = [k for k in g.ladder if k < w]
            # the next few widths, and every width within a quarter below: far enough to step over a
            # run of widths the hardware dislikes (e.g. 63..49 when 48 is fast)
            near = sorted(set(below[-tries:]) | {k for k in below if k >= w - max(1, w // 4)})
            here = sum(layer.cost(cost, widths) for layer in touching[g.name])
            for lower in (near, [k for k in below if k not in near]):  # look further only if nothing near saves
                found = False
                for k in lower:
                    trial = dict(widths)
                    trial[g.name] = k
                    d = here - sum(layer.cost(cost, trial) for layer in touching[g.name])
                    saved = saving(d)
                    if d <= 0 or saved <= 0:
                        continue
                    found = True
                    lost = float(g.sorted_scores[g.n - w:g.n - k].sum())  # the next (w - k) least important units
                    ratio = lost / saved
                    if best is None or ratio < best[0] - 1e-12 or (abs(ratio - best[0]) <= 1e-12 and saved > best[3]):
                        best = (ratio, g.name, k, saved, lost, d)
                if found:
                    break
        if best is None:
            if best_effort:
                exhausted = True
                break  # the fastest plan the table knows; the caller measures whether it is enough
            raise UserError(f"the latency target {budget_ms:.4g} ms cannot be reached: no further width or depth reduction is "
                            f"predicted to save time below {current:.4g} ms (parent {parent_ms:.4g} ms); ask for less speedup")
        _, what, k, saved, lost, d = best
        if isinstance(what, DepthBlock):
            removed.append(what)
            extras.append(saved - saving(d))
            left[what.stage] -= 1
            gone = set(what.layers)
            touching = {g: [layer for layer in ls if layer.name not in gone] for g, ls in touching.items()}
            steps.append({"block": what.name, "saved_ms": saved, "importance_lost": lost})
        else:
            steps.append({"group": what, "from": widths[what], "to": k, "saved_ms": saved, "importance_lost": lost})
            widths[what] = k
        total -= d
        current = curve(total) - sum(extras)
        if on_step is not None:
            on_step(current)
    return Plan(widths, predict(layers, widths, cost, offset_ms, removed, curve), parent_ms, steps, [b.name for b in removed],
                exhausted)


def removal_indices(group: Group, keep: int) -> list[int]:
    """The units a kept width removes: the least important ones (stable order for ties)."""
    order = np.argsort(group.scores, kind="stable")
    return sorted(int(i) for i in order[:group.n - keep])
