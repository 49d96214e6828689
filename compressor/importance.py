"""Importance metrics for channels, FFN neurons and attention heads.

l1/l2/taylor/random/bn-scale are torch-pruning's own importance classes, configured so the score of a
structure is the sum over every conv/linear weight removed with it (for a head: its Q, K, V rows and its
output-projection columns; for an FFN neuron: its fc1 row and fc2 column; for a CNN channel: its filters
and the next layers' input slices). kl and output-norm-greedy need forward passes over calibration data,
so they are computed here and handed to torch-pruning through its Importance interface.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from .data import Batches, ImageSet, InputSpec
from .errors import UserError
from .progress import QUIET, Reporter
from . import masked_eval, outputs
from .structures import PRODUCER_FNS, GroupInfo, Masks, execution_order, group_key

_WEIGHTED = [nn.modules.conv._ConvNd, nn.Linear]
# KL(child || parent) = sum q (log q - log p), q the model without the unit: Luo & Wu's code and do Nascimento
# et al.'s release. parent-child, KL(p || q), is what compress computed before; kept as an option.
KL_DIRECTIONS = ("child-parent", "parent-child")
KL_DEFAULT = "child-parent"


def _norm(global_ranking: bool) -> str | None:
    # Per-group normalisation only matters when ranks are compared across groups (global ranking).
    return "mean" if global_ranking else None


@dataclass(frozen=True)
class Metric:
    """One importance metric: torch-pruning's class where it implements the metric exactly (`library`),
    else our scorer (`scores(model, groups, calib, spec, batch, device, reporter, greedy_step=, kl_direction=)`)."""

    name: str
    needs_data: bool = False  # ranks by the model's outputs on the calibration set
    gradients: bool = False  # needs dL/dw accumulated over the calibration set first
    needs_batchnorm: bool = False
    library: Callable[[bool], tp.importance.Importance] | None = None
    scores: Callable[..., dict] | None = None
    calib_default: int = 3000  # calibration images when none are asked for (Molchanov et al.'s Taylor: 3,000)


def _greedy(model, infos, calib, spec, batch, device, reporter, *, greedy_step=1, **_):
    return greedy_output_norm_scores(model, infos, calib, spec, batch, device, greedy_step, reporter)


def filter_norm_scores(model, infos, calib, spec, batch, device, reporter, **_) -> dict[tuple[int, str], torch.Tensor]:
    """Li et al. (2017), as Lajić et al. use it: the L1 norm of each filter itself, summed over the convs that
    produce the channel (residual-coupled groups have several), without the next layers' input slices."""
    out = {}
    for info in infos:
        s = torch.zeros(info.n_dims)
        for i, (dep, idxs) in enumerate(info.group):
            m = dep.target.module
            if dep.handler not in PRODUCER_FNS or not isinstance(m, (nn.Conv2d, nn.Linear)):
                continue
            roots = info.group[i].root_idxs
            keep = [j for j, r in enumerate(roots) if r is not None]
            norms = m.weight.detach().abs().flatten(1).sum(1).cpu()
            s.index_add_(0, torch.tensor([roots[j] for j in keep]), norms[torch.tensor([idxs[j] for j in keep])])
        out[info.key] = s
    return out


def _kl_metric(model, infos, calib, spec, batch, device, reporter, *, kl_direction=KL_DEFAULT, **_):
    return kl_scores(model, infos, calib, spec, batch, device, reporter, kl_direction)


REGISTRY: dict[str, Metric] = {m.name: m for m in (
    Metric("l1", library=lambda g: tp.importance.GroupMagnitudeImportance(
        p=1, group_reduction="sum", normalizer=_norm(g), target_types=_WEIGHTED)),
    Metric("l1-filter", scores=filter_norm_scores),  # Li et al. 2017's filter norm, as Lajić et al. use it
    Metric("l2", library=lambda g: tp.importance.GroupMagnitudeImportance(
        p=2, group_reduction="sum", normalizer=_norm(g), target_types=_WEIGHTED)),
    Metric("random", library=lambda g: tp.importance.RandomImportance()),
    Metric("taylor", needs_data=True, gradients=True,  # first-order Taylor (Molchanov et al. 2019)
           library=lambda g: tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=_norm(g),
                                                                   target_types=_WEIGHTED)),
    Metric("bn-scale", needs_batchnorm=True,  # network slimming (Liu et al. 2017)
           library=lambda g: tp.importance.BNScaleImportance(group_reduction="sum", normalizer=_norm(g))),
    Metric("output-norm-greedy", needs_data=True, scores=_greedy),  # Lajić et al.
    Metric("kl", needs_data=True, scores=_kl_metric, calib_default=256),  # Luo & Wu 2020 (256 images)
)}
METRICS = tuple(REGISTRY)


def check_kl_direction(direction: str) -> None:
    if direction not in KL_DIRECTIONS:
        raise UserError(f"`kl_direction` must be {' or '.join(KL_DIRECTIONS)}")


class ScoreTable(tp.importance.Importance):
    """Precomputed per-index scores, looked up by the group's root (torch-pruning's Importance API)."""

    def __init__(self, scores: dict[tuple[int, str], torch.Tensor]):
        self.scores = scores

    def __call__(self, group):
        return self.scores.get(group_key(group))


class ByKind(tp.importance.Importance):
    """Route each group to the metric for its kind (ViT: heads vs FFN neurons vs embedding channels)."""

    def __init__(self, kinds: dict[tuple[int, str], str], by_kind: dict[str, tp.importance.Importance]):
        self.kinds, self.by_kind = kinds, by_kind

    def __call__(self, group):
        kind = self.kinds.get(group_key(group))
        imp = self.by_kind.get(kind)
        return None if imp is None else imp(group)


# ----------------------------------------------------------------------------- data-driven metrics
def _batches(calib: ImageSet, spec: InputSpec, batch_size: int, device) -> Batches:
    return Batches(calib, spec, batch_size, device=device)


def accumulate_gradients(model: nn.Module, calib: ImageSet, spec: InputSpec, batch_size: int, device,
                         reporter: Reporter = QUIET, loss_fn=None) -> None:
    """dL/dw summed over the calibration set (mean loss per image), for the Taylor metric. The loss is
    cross-entropy on the logits, or `loss_fn(outputs, targets)` (a batch's mean loss) for other models."""
    model.eval()  # BatchNorm uses its running statistics; nothing is updated
    model.zero_grad(set_to_none=True)
    n = len(calib)
    batches = _batches(calib, spec, batch_size, device)
    with reporter.task("taylor: gradients", len(batches)) as advance:
        for x, y in batches:
            out = model(x)
            if loss_fn is None:
                loss = F.cross_entropy(outputs.logits(out, "taylor"), y, reduction="sum") / n
            else:
                loss = loss_fn(out, y) * (x.shape[0] / n)
            loss.backward()
            advance()


@torch.no_grad()
def log_probs(model: nn.Module, batches: Batches) -> list[torch.Tensor]:
    """The parent's log-probabilities on every calibration batch, computed once."""
    return [F.log_softmax(outputs.logits(model(x), "kl").float(), dim=1) for x, _ in batches]


@torch.no_grad()
def kl_divergence(model: nn.Module, batches: Batches, base: list[torch.Tensor], direction: str = KL_DEFAULT) -> float:
    """Mean KL per image between the model as it is now (q: a unit or block removed) and the parent (p)."""
    total, n = 0.0, 0
    for (x, _), lp in zip(batches, base):
        lq = F.log_softmax(outputs.logits(model(x), "kl").float(), dim=1)
        if direction == "child-parent":  # sum q (log q - log p), as Luo & Wu's and do Nascimento et al.'s code
            total += float(F.kl_div(lp, lq, log_target=True, reduction="sum"))
        else:  # sum p (log p - log q)
            total += float(F.kl_div(lq, lp, log_target=True, reduction="sum"))
        n += x.shape[0]
    return total / max(n, 1)


def kl_scores(model: nn.Module, infos: list[GroupInfo], calib: ImageSet, spec: InputSpec, batch_size: int,
              device, reporter: Reporter = QUIET, direction: str = KL_DEFAULT,
              fast: bool = True) -> dict[tuple[int, str], torch.Tensor]:
    """KL between the parent without the unit and the parent, on the calibration set, per unit (Luo & Wu 2020);
    `direction` child-parent (the papers' code, default) or parent-child.

    Computed from logits (log-softmax once); do Nascimento et al.'s release applies softmax twice, we do not.
    fast: the network before each group runs once per batch and the units of a group are evaluated side
    by side (compressor.masked_eval); each group's first unit is also scored the plain way and a
    disagreement falls back to one pass per unit.
    """
    check_kl_direction(direction)
    model.eval()
    batches = _materialise(_batches(calib, spec, batch_size, device))
    t0 = time.perf_counter()
    base = log_probs(model, batches)
    pass_s = time.perf_counter() - t0
    gm = masked_eval.trace(model) if fast else None
    out = {}
    units = sum(i.n_units for i in infos)
    total = units * len(base)
    if reporter.enabled:  # before a long run, say how long at most (one full pass per unit; the fast path skips prefixes)
        reporter.log(f"kl: {units} units x {len(calib)} calibration images: at most {units} forward passes of "
                     f"{pass_s:.2f} s (~{units * pass_s / 60:.1f} min)" + ("; each group's prefix runs once" if gm is not None else ""))
    with reporter.task("kl: scoring structures (unit x batch)", total) as advance, Masks() as masks:
        for info in infos:
            scores = _kl_group_fast(gm, info, batches, base, direction, advance, masks) if gm is not None else None
            if scores is None:
                scores = torch.zeros(info.n_units)
                for u in range(info.n_units):
                    masks.set(info, info.unit_dims(u), 0.0)
                    scores[u] = kl_divergence(model, batches, base, direction)
                    masks.set(info, info.unit_dims(u), 1.0)
                    advance(len(base))
            out[info.key] = scores.float().repeat_interleave(info.unit_size)
    return out


def _materialise(batches: Batches, limit_bytes: int = 1 << 30):
    """The calibration batches preprocessed once (every unit reads them again), within a memory limit."""
    kept, size = [], 0
    for x, y in batches:
        size += x.numel() * x.element_size()
        if size > limit_bytes:
            return batches
        kept.append((x, y))
    return kept


def _kl(lq: torch.Tensor, lp: torch.Tensor, direction: str) -> torch.Tensor:
    """Summed KL over images and classes, per leading row; lq (k, B, C), lp (B, C), both log-probabilities."""
    if direction == "child-parent":
        return (lq.exp() * (lq - lp)).sum((1, 2))
    return (lp.exp() * (lp - lq)).sum((1, 2))


@torch.no_grad()
def _kl_group_fast(gm, info: GroupInfo, batches, base: list[torch.Tensor], direction: str, advance,
                   masks: Masks) -> torch.Tensor | None:
    try:
        ev = masked_eval.MaskedEvaluator(gm, info)
    except (StopIteration, LookupError):
        return None
    totals = torch.zeros(info.n_units, dtype=torch.float64)
    n = 0
    try:
        for (x, _), lp in zip(batches, base):
            env, per_sample = ev.prefix_values(x)
            for units in ev.chunks(info.n_units, per_sample, x.shape[0]):
                lq = F.log_softmax(ev.outputs(env, x.shape[0], units).float(), dim=2)
                totals[units] += _kl(lq, lp, direction).double()
                advance(len(units))
            n += x.shape[0]
    except (RuntimeError, TypeError, ValueError):  # a graph the cut does not fit (shapes): one pass per unit
        return None
    scores = totals / max(n, 1)
    # The check: unit 0 the plain way (one pass); a mismatch means the cut is wrong for this model.
    masks.set(info, info.unit_dims(0), 0.0)
    plain = kl_divergence(gm, batches, base, direction)
    masks.set(info, info.unit_dims(0), 1.0)
    if not abs(float(scores[0]) - plain) <= 1e-4 * abs(plain) + 1e-6:
        return None
    return scores


class _Enough(Exception):
    """Raised from a hook once every consumer of a group has been seen: the rest of the forward is moot."""


@torch.no_grad()
def _output_energy(model: nn.Module, info: GroupInfo, batches) -> torch.Tensor:
    """Sum of squares, per root index, of what the group's consumers receive (the structure's output).
    `batches`: calibration batches, or a masked_eval.CachedPrefix that replays only the group's part."""
    energy = torch.zeros(info.n_dims, dtype=torch.float64)
    pending: set[int] = set()

    def hook(mod, args):
        x = args[0].detach().float()
        dim = 1 if isinstance(mod, nn.modules.conv._ConvNd) else x.dim() - 1
        per = x.transpose(0, dim).reshape(x.shape[dim], -1).pow(2).sum(1).double().cpu()
        for c in info.consumers:
            if c.module is mod:
                energy.index_add_(0, c.root, per[c.local])
        pending.discard(id(mod))
        if not pending:
            raise _Enough

    handles = [c.module.register_forward_pre_hook(hook) for c in {id(c.module): c for c in info.consumers}.values()]
    cached = isinstance(batches, masked_eval.CachedPrefix)
    try:
        for i, item in enumerate(range(len(batches)) if cached else batches):
            pending.update(id(c.module) for c in info.consumers)
            try:
                batches.run(i) if cached else model(item[0])
            except _Enough:
                pass
    finally:
        for h in handles:
            h.remove()
    return energy


def greedy_output_norm_scores(model: nn.Module, infos: list[GroupInfo], calib: ImageSet, spec: InputSpec,
                              batch_size: int, device, step: int = 1,
                              reporter: Reporter = QUIET, fast: bool = True) -> dict[tuple[int, str], torch.Tensor]:
    """Lajić et al.'s greedy criterion: repeatedly remove the unit whose output has the lowest norm on the
    calibration set, recomputing after each removal, with every earlier removal in place.

    Groups are processed upstream first. In a group with a single producing layer, removing one unit does
    not change the others' outputs, so its whole quota is taken from one evaluation (the same set that
    one-at-a-time removal reaches). Residual-coupled groups are re-evaluated every `step` removals.
    """
    model.eval()
    batches = _materialise(_batches(calib, spec, batch_size, device))
    x0 = next(iter(batches))[0][:1]
    ordered = execution_order(model, [i for i in infos if i.n_remove > 0], x0)
    gm = masked_eval.trace(model) if fast else None
    passes = sum(1 if i.independent else -(-i.n_remove // max(1, step)) for i in ordered)
    out = {}
    with reporter.task("output-norm-greedy: forward passes", passes) as advance, Masks() as masks:
        for info in ordered:
            removed: list[int] = []
            norms = None
            # Passes of one group differ only at its consumers: what enters them is computed once (the
            # masks of groups already done are in place and stay so while this group is scored).
            source = _cached_prefix(gm, info, batches) if gm is not None and not info.independent else batches
            while len(removed) < info.n_remove:
                energy = _output_energy(model, info, source)
                norms = energy.view(info.n_units, info.unit_size).sum(1).sqrt()
                left = [u for u in torch.argsort(norms).tolist() if u not in removed]
                k = info.n_remove - len(removed) if info.independent else min(max(1, step), info.n_remove - len(removed))
                for u in left[:k]:
                    removed.append(u)
                    masks.set(info, info.unit_dims(u), 0.0)
                advance()
            # Removed units score by removal order (lowest first); kept units rank above all of them.
            score = torch.empty(info.n_units, dtype=torch.float64)
            kept = [u for u in torch.argsort(norms).tolist() if u not in removed] if norms is not None else []
            for rank, u in enumerate(removed + kept):
                score[u] = rank
            out[info.key] = score.float().repeat_interleave(info.unit_size)
    return out


def _cached_prefix(gm, info: GroupInfo, batches):
    """The group's cached prefix, or the plain batches where the cut does not apply or memory is short."""
    try:
        return masked_eval.CachedPrefix(masked_eval.MaskedEvaluator(gm, info), batches)
    except (StopIteration, LookupError, MemoryError, RuntimeError, TypeError, ValueError):
        return batches


def check_metric(metric: str) -> None:
    if metric not in REGISTRY:
        raise UserError(f"unknown metric '{metric}' (choose from {', '.join(METRICS)})")
