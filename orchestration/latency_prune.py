"""`compress prune --target-speedup S`: widths chosen for measured speed on the target backend.

1. Score every unit (channel; a ViT's head or FFN neuron) of every group with --metric
   (compressor.pruning.unit_scores).
2. Build the latency model: each conv/linear layer's (and attention core's) cost at given in/out widths,
   measured alone on the target (profilers.layer_latency, cached), calibrated against the whole parent
   measured on the same backend, so predictions are in real milliseconds.
   Each removable residual block is also timed whole at the parent's widths (cached like the layers): what
   it costs beyond its layers (normalisation, activations, the add, per-op dispatch) is what removing it
   saves on top of its layers' cost.
3. Choose widths and blocks to remove (compressor.latency_plan: least importance lost per ms saved, until
   the budget; a removed block loses the importance of every unit inside it).
4. Prune, then measure parent and child in interleaved rounds and report predicted vs measured.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from compressor.data import Dataset
from compressor.errors import TargetNotReached, UserError
from compressor.latency_plan import Curve, DepthBlock, Group, Layer, ladder, plan_widths, removal_indices
from compressor.layers import find_blocks, removable, score_blocks
from compressor.modeldir import LoadedModel, ModelRecord, remove_blocks, run_info
from compressor.models import clone
from compressor.progress import QUIET, Reporter
from compressor.pruning import LOSS_ESTIMATES, WidthConfig, attention_heads, layer_groups, prune_to_widths, unit_scores
from compressor.structures import capture_inputs
from compressor.workflows import PruneResult, measure
from profilers.layer_latency import LayerLatency, network_node_ms, op_shapes
from profilers import quiet
from profilers.paired import exported, model_runner, paired
from profilers.runners import measure as time_runner


@dataclass
class LatencyTarget:
    speedup: float | None = None
    latency_ms: float | None = None
    backend: str = "onnxruntime"
    device: str = "cpu"
    batch: int = 1
    threads: int | None = None
    cache_dir: Path | None = None
    rounds: int = 9
    iterations: int = 5  # plan -> prune -> measure attempts (a miss either way is corrected by the next)
    min_fraction: float = 0.2  # every group keeps at least this share of its units
    allow_busy: bool = False  # write the child even when the machine was busy while measuring (recorded)
    depth: bool = True  # whole residual blocks are planner moves beside the widths (where the model has them)
    min_blocks_per_stage: int = 1

    def validate(self) -> None:
        if (self.speedup is None) == (self.latency_ms is None):
            raise UserError("give one of `target_speedup` or `target_latency_ms`")
        if self.speedup is not None and not (self.speedup > 1.0):
            raise UserError(f"`target_speedup` must be above 1 (got {self.speedup})")
        if self.latency_ms is not None and not (self.latency_ms > 0):
            raise UserError(f"`target_latency_ms` must be positive (got {self.latency_ms})")
        if self.rounds < 3:
            raise UserError("`latency_rounds` must be at least 3")
        if self.iterations < 1:
            raise UserError("`latency_iterations` must be at least 1")
        if not (0.0 < self.min_fraction <= 1.0):
            raise UserError("`min_width_fraction` must be in (0, 1]")
        if self.threads is not None and self.threads < 1:
            raise UserError("`threads` must be >= 1")
        if self.min_blocks_per_stage < 1:
            raise UserError("`min_blocks_per_stage` must be >= 1")

    def to_json(self) -> dict:
        return {"target_speedup": self.speedup, "target_latency_ms": self.latency_ms, "latency_backend": self.backend,
                "latency_device": self.device, "latency_batch": self.batch, "threads": self.threads,
                "depth": self.depth, "min_blocks_per_stage": self.min_blocks_per_stage,
                **({"allow_busy": True} if self.allow_busy else {})}


def latency_prune(lm: LoadedModel, ds: Dataset | None, cfg: WidthConfig, target: LatencyTarget, calib_size: int,
                  device, reporter: Reporter = QUIET, settings: dict | None = None) -> tuple[nn.Module, ModelRecord, PruneResult]:
    target.validate()
    spec = lm.record.input
    shape = (spec.channels, spec.height, spec.width)
    table = LayerLatency(target.backend, target.device, target.batch, target.threads, target.cache_dir)
    machine = quiet.MachineCheck(target.allow_busy)
    machine.sample_load("before")
    _refuse_if_busy(machine, target)  # before minutes of work on a machine already too busy to measure
    parent = clone(lm.model).to(device).eval()
    before = measure(parent, spec, ds, device, lm.record.classifier)
    calib = ds.calibration(calib_size, cfg.seed) if ds is not None else None
    t0 = time.perf_counter()
    pruner, infos, scores = unit_scores(parent, spec, cfg, calib, device, reporter)
    layers = _layers(parent, pruner, infos, op_shapes(parent, shape), table)
    groups = [Group(i.name, i.n_units, scores[i.name],  # `round_to` counts channels, not heads
                    ladder(i.n_units, None if i.kind == "head" else cfg.round_to, min_fraction=target.min_fraction,
                           align=table.align if i.kind == "channel" else (1, 1)))
              for i in infos]
    if table.gridded:
        with reporter.task("latency table: every layer on a grid of widths", None) as advance:
            table.on_measure = lambda: advance(0, info=f"{table.measured} entries measured")
            table.use_grid(_grid_axes(layers, groups))
            table.on_measure = None
        table.save()
    blocks, stage_sizes = _depth_blocks(parent, layers, target) if target.depth else ([], {})
    _score_blocks(parent, blocks, cfg, calib, spec, device, reporter)
    with tempfile.TemporaryDirectory(prefix="compress-latency-") as tmp:
        fit = _calibrate(parent, spec, groups, layers, table, target, Path(tmp), reporter)
        parent_runner, parent_ms = fit.pop("parent_runner"), fit["parent_ms"]
        curve = Curve([(fit["layers_floor_ms"], fit["floor_width_ms"]), (fit["layers_half_ms"], fit["half_width_ms"]),
                       (fit["layers_parent_ms"], parent_ms)])
        fit.update(_block_overheads(parent, spec, blocks, layers, groups, curve, table, parent_runner, target, Path(tmp),
                                    reporter))
        if target.speedup is not None:
            goal_ms = parent_ms / target.speedup
        else:
            assert target.latency_ms is not None  # validate(): one of the two is given
            goal_ms = target.latency_ms
        if goal_ms >= parent_ms:
            raise UserError(f"the parent already runs in {parent_ms:.4g} ms at batch {target.batch} on "
                            f"{target.backend} {target.device}; `target_latency_ms` {goal_ms:g} asks for nothing")
        # Closed loop (NetAdapt's empirical step): plan, prune a copy, measure it whole; when the
        # measurement misses the goal, correct the budget by measured/predicted and plan again.
        budget, tries, stop = goal_ms, [], ""
        best: dict | None = None
        for attempt in range(target.iterations):
            with reporter.task(f"latency-aware widths, attempt {attempt + 1} (ms predicted)", None) as advance:
                table.on_measure = lambda: advance(0, info=f"{table.measured} layers measured")
                plan = plan_widths(groups, layers, table, budget, best_effort=True, curve=curve,
                                   on_step=lambda ms: advance(1, info=f"{ms:.3f} ms, {table.measured} layers measured"),
                                   blocks=blocks, min_per_stage=target.min_blocks_per_stage, stage_sizes=stage_sizes)
            table.on_measure = None
            table.save()
            child, changed = _with_widths(parent, spec, groups, plan.widths, plan.removed)
            runner = model_runner(clone(child), target.backend, target.device, target.batch, shape, Path(tmp),
                                  f"child{attempt}", target.threads)
            with reporter.task(f"measuring parent vs child, attempt {attempt + 1}", None):
                check = paired(parent_runner, runner, rounds=target.rounds)
            runner.close()
            machine.rounds("the parent", check["parent_rounds"])
            machine.rounds("the child", check["child_rounds"])
            machine.drift("the parent", parent_ms, check["parent_ms"])
            # A speedup target is judged by the paired speedup (the parent's own latency drifts between
            # measurements); a latency target by the child's latency.
            eff = parent_ms / check["speedup"]["median"] if target.speedup else check["child_ms"]
            row = {"attempt": attempt + 1, "budget_ms": budget, "predicted_ms": plan.predicted_ms, "check": check,
                   "effective_ms": eff, "widths": plan.widths, "removed": plan.removed, "model": child, "changed": changed}
            reporter.log(f"attempt {attempt + 1}: predicted {plan.predicted_ms:.4g} ms, measured {check['child_ms']:.4g} ms "
                         f"({check['speedup']['median']:.2f}x; goal {goal_ms:.4g} ms)"
                         + (f"; removed {', '.join(plan.removed)}" if plan.removed else ""))
            tries.append(row)
            ratio = eff / goal_ms  # 1.0 = on target
            if best is None or better_attempt(ratio, best["effective_ms"] / goal_ms):
                best = row
            if 0.95 <= 1 / ratio <= 1.05 or attempt + 1 == target.iterations:
                break
            # Only a planner out of moves ends the loop early; any other miss corrects the budget and plans again.
            if plan.exhausted and ratio > 1:
                stop = f"; the fastest plan the table allows predicted {plan.predicted_ms:.4g} ms for a {budget:.4g} ms budget"
                break
            budget = _next_budget(tries, goal_ms)
        parent_runner.close()
    table_s = time.perf_counter() - t0
    assert best is not None  # at least one attempt ran (validate(): iterations >= 1)
    machine.sample_load("after")
    _refuse_if_busy(machine, target)
    if not reached(best["effective_ms"], goal_ms, bool(target.speedup)):
        what = (f"{target.speedup:g}x" if target.speedup else f"{target.latency_ms:g} ms")
        got = best["check"]["speedup"]
        measured = ", ".join(f"{t['check']['speedup']['median']:.2f}x" for t in tries)
        raise TargetNotReached(f"target {what} not reached on {target.backend} {target.device} at batch {target.batch}: the "
                        f"closest child measured {got['median']:.2f}x [{got['ci_low']:.2f}, {got['ci_high']:.2f}] "
                        f"({best['check']['child_ms']:.4g} ms; attempts measured {measured}{stop}); ask for less, "
                        "or lower `min_width_fraction`; nothing written")
    model = best["model"]
    after = measure(model, spec, ds, device, lm.record.classifier)
    sp = best["check"]["speedup"]
    proof = {
        "backend": target.backend, "device": target.device, "batch": target.batch,
        "goal_ms": round(goal_ms, 5), "target_speedup": target.speedup,
        "calibration": {k: round(v, 6) for k, v in fit.items()},
        "predicted_ms": round(best["predicted_ms"], 5), "predicted_speedup": round(parent_ms / best["predicted_ms"], 4),
        "measured_parent_ms": round(best["check"]["parent_ms"], 5), "measured_child_ms": round(best["check"]["child_ms"], 5),
        "measured_speedup": round(sp["median"], 4), "speedup_ci": [round(sp["ci_low"], 4), round(sp["ci_high"], 4)],
        "ci_confidence": sp["confidence"], "rounds": sp["rounds"],
        # Against the child's latency at the parent's calibrated speed (parent ms / paired speedup): the
        # model predicts for the machine as it was calibrated, and a drift of the whole machine between
        # calibration and check (10-40 % here on OpenVINO at batch 1) is not the model's error.
        "prediction_error": round(best["predicted_ms"] * sp["median"] / parent_ms - 1.0, 4),
        "prediction_error_raw": round(best["predicted_ms"] / best["check"]["child_ms"] - 1.0, 4),
        "attempts": [{"attempt": t["attempt"], "budget_ms": round(t["budget_ms"], 5), "predicted_ms": round(t["predicted_ms"], 5),
                      "measured_child_ms": round(t["check"]["child_ms"], 5), "measured_parent_ms": round(t["check"]["parent_ms"], 5),
                      "measured_speedup": round(t["check"]["speedup"]["median"], 4), "removed_blocks": t["removed"]}
                     for t in tries],
        "table": {"entries_measured": table.measured, "cache_hits": table.hits, "measure_s": round(table.measure_s, 2),
                  "cache": None if table.path is None else str(table.path)},
        "widths": {g.name: [g.n, best["widths"][g.name]] for g in groups if not _inside(g.name, best["removed"], blocks)},
        "removed_blocks": best["removed"],
        "blocks": {b.name: {"overhead_ms": round(b.overhead_ms, 5), "floor_overhead_ms": round(b.floor_overhead_ms, 5),
                            "groups": b.groups} for b in blocks},
        "machine": machine.to_json(),
    }
    slow = sp["ci_high"] < 1.0
    if slow:
        proof["slower_layers"] = _worst_layers(layers, table, groups, best["widths"])
    rec = lm.record.child()
    rec.removed_blocks = list(lm.record.removed_blocks) + best["removed"]
    rec.metrics = {**after, "latency": proof}
    heads_before, heads_after = attention_heads(parent), attention_heads(model)
    heads = {n: [h, heads_after[n]] for n, h in heads_before.items() if heads_after.get(n, h) != h}
    res = PruneResult(before, after, round(table_s, 2), best["changed"], heads, calib_images=None if calib is None else len(calib),
                      latency=proof, slower=slow, removed_blocks=best["removed"])
    rec.lineage.append(run_info("prune", {**(settings or {}), **cfg.to_json(), **target.to_json(),
                                          "structure": "width+depth" if best["removed"] else "width",
                                          "calib_size": res.calib_images},
                                None if lm.path is None else str(lm.path),
                                {"before": before, "after": after, "prune_s": res.prune_s, "latency": proof},
                                cfg.seed))
    return model, rec, res


def _refuse_if_busy(machine: quiet.MachineCheck, target: LatencyTarget) -> None:
    if not machine.quiet and not target.allow_busy:
        hint = ("; no other process was busy, so the runtime itself switched speeds: with `threads` 1 it runs one steady "
                "speed" if machine.unsteady_alone and target.threads != 1 else "")
        raise UserError(f"the machine was busy while measuring ({machine.summary()}): a speedup measured now cannot be "
                        "trusted, so no target is called reached and nothing is written; rerun on a quiet machine, or "
                        f"pass `allow_busy` to write the child anyway (recorded in model.json){hint}")


def _next_budget(tries: list[dict], goal_ms: float) -> float:
    """Where to plan next. With attempts on both sides of the goal: inside the bracket of budgets between the
    loosest budget that came out too fast and the tightest that came out too slow (linear in measured ms),
    so the bracket shrinks and no budget is planned twice (the planner is deterministic: the same budget
    is the same child). Without, the last budget corrected by how far its measurement missed."""
    slow = [t for t in tries if t["effective_ms"] > goal_ms]
    fast = [t for t in tries if t["effective_ms"] <= goal_ms]
    if slow and fast:
        a = min(slow, key=lambda t: t["budget_ms"])
        b = max(fast, key=lambda t: t["budget_ms"])
        if b["budget_ms"] >= a["budget_ms"]:  # measured out of budget order (noise): the closest on either side
            a = min(slow, key=lambda t: t["effective_ms"])
            b = max(fast, key=lambda t: t["effective_ms"])
        ma, mb = a["effective_ms"], b["effective_ms"]
        nxt = b["budget_ms"] + (goal_ms - mb) * (a["budget_ms"] - b["budget_ms"]) / (ma - mb)
        if any(math.isclose(nxt, t["budget_ms"], rel_tol=1e-6) for t in tries):
            nxt = (a["budget_ms"] + b["budget_ms"]) / 2
        return nxt
    last = tries[-1]
    return last["budget_ms"] * goal_ms / last["effective_ms"]


def band(ratio: float) -> bool:
    """An attempt (measured ms / goal ms) whose speedup is within 10 % of the goal's."""
    return abs(1 / ratio - 1) <= 0.10


def reached(effective_ms: float, goal_ms: float, speedup_target: bool) -> bool:
    """The promise: a speedup target within the loop's `band` of its speedup (1.81x reaches 2x); a latency
    target within 10 % of its milliseconds. Faster than asked always reaches it."""
    ratio = effective_ms / goal_ms
    return ratio <= 1 or (band(ratio) if speedup_target else ratio <= 1.1)


def better_attempt(ratio: float, best_ratio: float) -> bool:
    """Is an attempt (measured ms / goal ms) better than the best so far? Within the accepted band (speedup
    within 10 % of the goal) the closest wins; a child in the band beats one outside it; outside it, a
    child that reaches the goal beats one that does not (a 1.9x child for 2x is kept over a 2.6x one)."""
    if band(ratio) != band(best_ratio):
        return band(ratio)
    if not band(ratio) and (ratio <= 1) != (best_ratio <= 1):
        return ratio <= 1
    return abs(ratio - 1) < abs(best_ratio - 1)


def _with_widths(parent, spec, groups: list[Group], widths: dict[str, int], removed: list[str] | None = None):
    """A copy of `parent` with every group cut to its width (least important units first) and the `removed`
    blocks replaced by identities (after the widths: the dependency graph is the parent's)."""
    child = clone(parent)
    changed = prune_to_widths(child, spec, {g.name: removal_indices(g, widths[g.name]) for g in groups})
    remove_blocks(child, list(removed or []))
    return child, changed


def _inside(group: str, removed: list[str], blocks: list[DepthBlock]) -> bool:
    return any(group in b.groups for b in blocks if b.name in removed)


def _grid_axes(layers: list[Layer], groups: list[Group]) -> dict[str, tuple[list[int], list[int], bool]]:
    """Per layer signature, every input and output width its layers can take (ladder x unit, or fixed),
    and whether in and out move together (depthwise, attention cores)."""
    ladders = {g.name: g.ladder for g in groups}
    axes: dict[str, tuple[list[int], list[int], bool]] = {}
    for layer in layers:
        ins = [k * layer.in_unit for k in ladders[layer.in_group]] if layer.in_group else [layer.in_fixed]
        outs = [k * layer.out_unit for k in ladders[layer.out_group]] if layer.out_group else [layer.out_fixed]
        diagonal = layer.depthwise or (layer.in_group is not None and layer.in_group == layer.out_group)
        a = axes.get(layer.signature, ([], [], diagonal))
        axes[layer.signature] = (a[0] + ins, a[1] + (ins if diagonal else outs), diagonal)
    return axes


def _depth_blocks(model: nn.Module, layers: list[Layer], target: LatencyTarget) -> tuple[list[DepthBlock], dict[str, int]]:
    """The removable blocks as planner moves: their layers and the groups that live only inside them. A
    block without such a group is left to the widths (its removal would have no importance to weigh)."""
    try:
        found = find_blocks(model)
    except UserError:
        return [], {}  # no residual stages: widths only
    stage_sizes: dict[str, int] = {}
    for b in found:
        stage_sizes[b.stage] = stage_sizes.get(b.stage, 0) + 1
    out = []
    for b in removable(model, target.min_blocks_per_stage):
        inside = [layer for layer in layers if layer.name.startswith(b.path + ".")]
        outside = {g for layer in layers if not layer.name.startswith(b.path + ".") for g in (layer.in_group, layer.out_group)}
        own = sorted({g for layer in inside for g in (layer.in_group, layer.out_group) if g is not None} - outside)
        if own:
            out.append(DepthBlock(b.path, b.stage, [layer.name for layer in inside], own))
    return out, stage_sizes


def _score_blocks(parent: nn.Module, blocks: list[DepthBlock], cfg: WidthConfig, calib, spec, device, reporter) -> None:
    """Taylor and KL score a block as they score a unit (the loss change of removing it); other metrics
    rank units within their group, so a block counts as the sum of its units' scores (DepthBlock.score None)."""
    if not blocks or cfg.metric not in LOSS_ESTIMATES or calib is None:
        return
    found = {b.path: b for b in find_blocks(parent)}
    scores = score_blocks(parent, [found[b.name] for b in blocks], cfg.metric, calib, spec, device=device,
                          seed=cfg.seed, reporter=reporter, kl_direction=cfg.kl_direction)
    for b in blocks:
        b.score = scores[b.name]


def _block_overheads(parent: nn.Module, spec, blocks: list[DepthBlock], layers: list[Layer], groups: list[Group],
                     curve: Curve, table: LayerLatency, parent_runner, target: LatencyTarget, tmp: Path,
                     reporter: Reporter) -> dict:
    """What removing each block saves beyond its layers' modelled cost, at the parent's widths and at the
    width floor (a plan may narrow a block before it removes it). Each block is timed whole on the target
    (identical blocks once, cached with the table), less the runtime's per-call cost, and each set's sum
    is calibrated by one whole-model measurement at its widths (below)."""
    if not blocks:
        return {}
    shape = (spec.channels, spec.height, spec.width)
    full = {g.name: g.n for g in groups}
    floor = {g.name: g.ladder[0] for g in groups}
    narrow, _ = _with_widths(parent, spec, groups, floor)
    names = [b.name for b in blocks]
    copies = {"": (dict(parent.named_modules()), _block_inputs(parent, shape, names)),
              "floor-": (dict(narrow.named_modules()), _block_inputs(narrow, shape, names))}
    by_layer = {layer.name: layer for layer in layers}
    alone: dict[str, float] = {}
    with reporter.task("timing residual blocks whole (parent and floor widths)", 2 * len(blocks)) as advance:
        for b in blocks:
            for tag, (modules, shapes) in copies.items():
                m, in_shape = modules[b.name], shapes[b.name]
                key = "block|" + hashlib.sha256(f"{m!r}|{in_shape}".encode()).hexdigest()[:20]
                alone[tag + b.name] = table.cached(key, functools.partial(_time_block, m, in_shape, tag + b.name, table,
                                                                          target, tmp))
                advance()
    table.save()
    # Timed alone, a block misses how the runtime schedules it inside the network, and at narrow widths its
    # nodes' profiled times are mostly the profiler's per-node floor: each set of timings is scaled by one
    # whole-model measurement at its widths, a copy against the same copy without every candidate block.
    factors, removed_ms = {}, {}
    with reporter.task("measuring the parent and a floor-width copy whole, with and without the candidate blocks", None):
        for tag, model in (("", parent), ("floor-", narrow)):
            shallow = clone(model)
            remove_blocks(shallow, names)
            with contextlib.ExitStack() as opened:  # the parent's runner stays open: the attempt loop uses it
                runner = model_runner(shallow, target.backend, target.device, target.batch, shape, tmp, tag + "shallow",
                                      target.threads)
                opened.callback(runner.close)
                base = parent_runner
                if tag:
                    base = model_runner(clone(model), target.backend, target.device, target.batch, shape, tmp, tag + "deep",
                                        target.threads)
                    opened.callback(base.close)
                both = paired(base, runner, rounds=5)
            removed_ms[tag] = max(both["parent_ms"] - both["child_ms"], 0.0)
            timed = sum(alone[tag + n] for n in names)
            factors[tag] = min(max(removed_ms[tag] / timed, 0.1), 2.0) if timed > 0 else 1.0
    total = sum(layer.cost(table, full) for layer in layers)
    total_floor = sum(layer.cost(table, floor) for layer in layers)
    for b in blocks:
        own = curve(total) - curve(total - sum(by_layer[n].cost(table, full) for n in b.layers))
        b.overhead_ms = max(factors[""] * alone[b.name] - own, -own)  # negative: its layers are modelled too dear
        b.layers_ms = own
        own = curve(total_floor) - curve(total_floor - sum(by_layer[n].cost(table, floor) for n in b.layers))
        b.floor_overhead_ms = max(factors["floor-"] * alone["floor-" + b.name] - own, -own)
        b.floor_layers_ms = own
    return {"blocks_alone_ms": round(sum(alone[n] for n in names), 5), "blocks_removed_measured_ms": round(removed_ms[""], 5),
            "block_factor": round(factors[""], 4), "floor_blocks_alone_ms": round(sum(alone["floor-" + n] for n in names), 5),
            "floor_blocks_removed_measured_ms": round(removed_ms["floor-"], 5), "floor_block_factor": round(factors["floor-"], 4)}


def _time_block(m: nn.Module, in_shape: tuple, name: str, table: LayerLatency, target: LatencyTarget,
                tmp: Path) -> float:
    """One block's ms on the target: the runtime's own node times where the table reads those (no layout
    reorders at its ends), else the wall clock less the per-call cost."""
    stem = "block-" + name.replace(".", "_")
    if table.node_timed:
        return network_node_ms(exported(clone(m), in_shape, tmp, stem), target.backend, target.device, target.batch,
                               target.threads)
    runner = model_runner(clone(m).cpu().eval(), target.backend, target.device, target.batch, in_shape, tmp, stem,
                          target.threads)
    try:
        whole = float(np.median(time_runner(runner, 3, 10, 0.1)))
    finally:
        runner.close()
    return max(0.0, whole - table.overhead((target.batch, *in_shape)))


@torch.no_grad()
def _block_inputs(model: nn.Module, shape: tuple[int, int, int], paths: list[str]) -> dict[str, tuple[int, ...]]:
    """The per-image input shape of each block, from one forward pass."""
    modules = [model.get_submodule(p) for p in paths]
    with capture_inputs(modules) as seen:
        model.eval()(torch.zeros(1, *shape, device=next(model.parameters()).device))
    return {p: tuple(seen[id(m)].shape[1:]) for p, m in zip(paths, modules)}


def _calibrate(parent, spec, groups, layers, table, target, tmp: Path, reporter) -> dict:
    """Measure the parent, a uniformly half-width copy and a copy at every group's width floor whole on the
    target, with the layers' table sums at those widths: the points of the curve (latency_plan.Curve) from
    summed layer cost to whole-model ms. Layers timed alone miss graph-level fusion, layout work and what
    narrow layers still cost inside a network; the rest of the network (adds, pooling, dispatch) is in no
    layer's entry."""
    shape = (spec.channels, spec.height, spec.width)
    full = {g.name: g.n for g in groups}
    half_widths = {g.name: min(g.ladder, key=lambda k: abs(k - g.n / 2)) for g in groups}
    floor_widths = {g.name: g.ladder[0] for g in groups}
    points = (full, half_widths, floor_widths)
    sums = [0.0, 0.0, 0.0]
    with reporter.task("latency table: parent, half-width and floor-width layers", 3 * len(layers)) as advance:
        for layer in layers:
            for i, w in enumerate(points):
                sums[i] += table(layer.signature, *layer.widths(w))
                advance()
    with reporter.task("measuring parent, half-width and floor-width copies whole", None):
        parent_runner = model_runner(clone(parent), target.backend, target.device, target.batch, shape, tmp, "parent",
                                     target.threads)
        measured = []
        for name, w in (("half", half_widths), ("floor", floor_widths)):
            copy, _ = _with_widths(parent, spec, groups, w)
            runner = model_runner(copy, target.backend, target.device, target.batch, shape, tmp, name, target.threads)
            measured.append(paired(parent_runner, runner, rounds=5))
            runner.close()
    p_ms = measured[0]["parent_ms"]
    h_ms = measured[0]["child_ms"]
    f_ms = measured[1]["child_ms"] * p_ms / measured[1]["parent_ms"]  # the parent's own drift between the two
    return {"parent_runner": parent_runner, "parent_ms": p_ms, "half_width_ms": h_ms, "floor_width_ms": f_ms,
            "layers_parent_ms": sums[0], "layers_half_ms": sums[1], "layers_floor_ms": sums[2]}


def _layers(model: nn.Module, pruner, infos, ops, table: LayerLatency) -> list[Layer]:
    """Every conv/linear layer and attention core that runs, with the groups that set its widths (a group
    outside the plan, e.g. a ViT's embedding width, counts as fixed)."""
    modules = dict(model.named_modules())
    units = {i.name: i.n_units for i in infos}
    out = []
    roles = layer_groups(pruner, infos, model)
    for name, (gin, gout) in roles.items():
        op = ops.get(name)
        if op is None:
            continue  # never ran in the forward pass
        if op.kind == "unsupported":
            raise UserError(f"latency-aware pruning cannot model {name}: grouped convolution (not depthwise); use `sparsity`")
        m = modules[name]
        c_in = m.in_channels if isinstance(m, nn.modules.conv._ConvNd) else m.in_features
        c_out = m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features
        gin, gout = (gin if gin in units else None), (gout if gout in units else None)
        if op.depthwise:
            gin = gout
        out.append(Layer(name, table.register(op), gin, gout, int(c_in), int(c_out), op.depthwise,
                         in_unit=int(c_in) // units[gin] if gin else 1, out_unit=int(c_out) // units[gout] if gout else 1))
    for name, op in ops.items():  # attention cores: their width is the head count of their qkv's group
        if op.kind != "attention":
            continue
        attn = name.removesuffix(":core")
        heads = int(getattr(modules[attn], "num_heads"))
        g = roles.get(f"{attn}.qkv", (None, None))[1]
        g = g if g in units else None
        out.append(Layer(name, table.register(op), g, g, heads, heads))
    return out


def _worst_layers(layers: list[Layer], table: LayerLatency, groups: list[Group], widths: dict[str, int]) -> list[dict]:
    """Layers whose measured cost did not fall (or rose) with the chosen widths: the likely culprits."""
    full = {g.name: g.n for g in groups}
    rows: list[dict] = []
    for layer in layers:
        a, b = table(layer.signature, *layer.widths(full)), table(layer.signature, *layer.widths(widths))
        rows.append({"layer": layer.name, "parent_ms": round(a, 5), "child_ms": round(b, 5)})
    rows.sort(key=lambda r: r["child_ms"] - r["parent_ms"], reverse=True)
    return rows[:5]
