"""`compress compare --target-speedups 1.5,2`: latency-aware pruning against uniform pruning at the same
*measured* speedup, with the same fine-tuning.

For each metric and target T: the latency-aware child is pruned for T on the latency backend and
measured against the parent (paired, interleaved rounds); its measured speedup S is what the uniform
child must match: uniform --sparsity is searched by bisection, each candidate pruned and measured the
same way, until one lands within 5 % of S (or the closest after a few probes). Both are fine-tuned with
the grid's settings and measured once more. A target the latency-aware search cannot reach is recorded
as refused, with its reason, and the grid goes on.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import replace
from pathlib import Path

from compressor import atomic
from compressor.data import Dataset
from compressor.errors import UserError
from compressor.modeldir import LoadedModel, load_model_dir, write_model_files
from compressor.models import clone
from compressor.progress import QUIET, Reporter
from compressor.workflows import PruneResult, finetune, width_prune
from profilers import quiet
from profilers.paired import model_runner, paired

from .compare import CompareConfig, existing_grid, finished_cells, skeleton, top1_after
from .latency_prune import LatencyTarget, latency_prune

MATCH = 0.05  # the uniform child's measured speedup within 5 % of the latency-aware child's
PROBES = 6


def cell_names(metric: str, target: float) -> tuple[str, str]:
    t = f"{target:g}".replace(".", "p")
    return f"{metric}_latency_x{t}", f"{metric}_uniform_x{t}"


def run(lm: LoadedModel, ds: Dataset, cfg: CompareConfig, latency: LatencyTarget, targets: list[float], out: Path, *,
        resume: bool, device="cpu", reporter: Reporter = QUIET) -> dict:
    cfg.validate()
    for t in targets:
        replace(latency, speedup=t, latency_ms=None).validate()
    doc = existing_grid(out, cfg) if resume and (out / "compare.json").is_file() else skeleton(lm, ds, cfg, out, replace=True)
    parent = load_model_dir(out / "parent")
    cells = finished_cells(out, doc)
    order = []
    with reporter.task("speed-matched grid", 2 * len(cfg.metrics) * len(targets)) as advance:
        for metric in cfg.metrics:
            for target in targets:
                lat_name, uni_name = cell_names(metric, target)
                order += [lat_name, uni_name]
                if lat_name not in cells:
                    cells[lat_name] = _latency_cell(parent, ds, cfg, latency, metric, target, out, device, reporter)
                advance()
                if uni_name not in cells:
                    cells[uni_name] = _uniform_cell(parent, ds, cfg, latency, metric, target, cells[lat_name], out, device, reporter)
                advance()
    doc["cells"] = [cells[n] for n in order]
    doc["speed_matched"] = {"targets": targets, "latency": latency.to_json()}
    atomic.write_json(out / "compare.json", doc)
    atomic.write_text(out / "table.md", markdown(doc))
    atomic.write_json(out / "table.json", doc["cells"])
    return doc


def _latency_cell(parent, ds, cfg, latency, metric, target, out, device, reporter) -> dict:
    name = cell_names(metric, target)[0]
    want = replace(latency, speedup=target, latency_ms=None)
    reporter.log(f"cell {name}: latency-aware prune for {target:g}x")
    try:
        child, rec, summary = latency_prune(parent, ds, cfg.width(metric, 0.5), want, cfg.calib_size, device, reporter,
                                            {"compare": str(out)})
    except UserError as e:
        cell = {"name": name, "method": "latency-aware", "metric": metric, "target_speedup": target, "refused": str(e)}
        _write_cell(out, name, cell)
        return cell
    lat = summary.latency or {}
    widths = list((lat.get("widths") or {}).values())  # group -> [units, kept]
    share = 1 - sum(k for _, k in widths) / sum(n for n, _ in widths) if widths else None
    return _finish(parent, ds, cfg, latency, out, name, child, rec, summary, device, reporter,
                   {"method": "latency-aware", "metric": metric, "target_speedup": target,
                    "matched_speedup": lat.get("measured_speedup"), "sparsity": share})


def _uniform_cell(parent, ds, cfg, latency, metric, target, lat_cell, out, device, reporter) -> dict:
    name = cell_names(metric, target)[1]
    if "refused" in lat_cell:
        cell = {"name": name, "method": "uniform", "metric": metric, "target_speedup": target,
                "refused": "no latency-aware child to match"}
        _write_cell(out, name, cell)
        return cell
    goal = float(lat_cell["matched_speedup"])
    reporter.log(f"cell {name}: uniform sparsity matching {goal:.2f}x")
    spec = parent.record.input
    shape = (spec.channels, spec.height, spec.width)
    lo, hi, best, probes = 0.0, 0.95, None, []
    with tempfile.TemporaryDirectory(prefix="compress-match-") as tmp:
        base = model_runner(clone(parent.model), latency.backend, latency.device, latency.batch, shape, Path(tmp), "parent",
                            latency.threads)
        try:
            for i in range(PROBES):
                s = round((lo + hi) / 2, 4) if i else min(0.9, max(0.05, 1 - 1 / goal))  # FLOPs-proportional first guess
                try:
                    child, rec, summary = width_prune(parent, ds, cfg.width(metric, s), cfg.calib_size, device, QUIET,
                                                      {"compare": str(out)})
                except UserError:  # a sparsity that empties a layer: too much
                    hi = s
                    continue
                runner = model_runner(clone(child), latency.backend, latency.device, latency.batch, shape, Path(tmp),
                                      f"u{i}", latency.threads)
                sp = paired(base, runner, rounds=latency.rounds)["speedup"]["median"]
                runner.close()
                probes.append({"sparsity": s, "measured_speedup": round(sp, 4)})
                if best is None or abs(sp / goal - 1) < abs(best[3] / goal - 1):
                    best = (child, rec, summary, sp, s)
                if abs(sp / goal - 1) <= MATCH:
                    break
                lo, hi = (s, hi) if sp < goal else (lo, s)
        finally:
            base.close()
    if best is None:
        cell = {"name": name, "method": "uniform", "metric": metric, "target_speedup": target,
                "refused": "no uniform sparsity could be pruned", "probes": probes}
        _write_cell(out, name, cell)
        return cell
    child, rec, summary, sp, s = best
    return _finish(parent, ds, cfg, latency, out, name, child, rec, summary, device, reporter,
                   {"method": "uniform", "metric": metric, "target_speedup": target, "matched_speedup": round(sp, 4),
                    "match_goal": goal, "sparsity": s, "probes": probes})


def _finish(parent, ds, cfg, latency, out, name, child, rec, summary: PruneResult, device, reporter, extra: dict) -> dict:
    """Fine-tune with the grid's settings, measure the result against the parent, record the cell."""
    cdir = out / "cells" / name
    cdir.mkdir(parents=True, exist_ok=True)
    pruned = LoadedModel(child, rec, None)
    pruned.path = parent.path
    model, frec, result = finetune(pruned, ds, copy.deepcopy(cfg.train), cdir, True, device, reporter=reporter,
                                   settings={"compare": str(out), "cell": name}, refuse_collapse=False)
    write_model_files(cdir, model, frec)
    spec = parent.record.input
    shape = (spec.channels, spec.height, spec.width)
    machine = quiet.MachineCheck(latency.allow_busy)
    machine.sample_load("before")
    with tempfile.TemporaryDirectory(prefix="compress-match-") as tmp:
        base = model_runner(clone(parent.model), latency.backend, latency.device, latency.batch, shape, Path(tmp), "p",
                            latency.threads)
        runner = model_runner(clone(model), latency.backend, latency.device, latency.batch, shape, Path(tmp), "c",
                              latency.threads)
        check = paired(base, runner, rounds=latency.rounds)
        base.close()
        runner.close()
    machine.rounds("the parent", check["parent_rounds"])
    machine.rounds("the child", check["child_rounds"])
    machine.sample_load("after")
    b, a = summary.before, summary.after
    cell = {"name": name, "dir": f"cells/{name}", **extra, "params": a["params"], "macs": a["macs"],
            "parent_params": b["params"], "parent_macs": b["macs"], "flops_reduction": 1 - a["macs"] / b["macs"],
            "parent_top1": b.get("top1"), "top1_before_ft": a.get("top1"), "top1_after_ft": frec.metrics.get("top1"),
            "top5_after_ft": frec.metrics.get("top5"), "finetune_s": round(result.wall_s, 2),
            "finetune_epochs": len(result.history), "learned_nothing": result.learned_nothing,
            "speedup": {"backend": latency.backend, "batch": latency.batch, **{k: check["speedup"][k] for k in
                                                                              ("median", "ci_low", "ci_high", "significant")},
                        "machine": machine.to_json()}}
    _write_cell(out, name, cell)
    return cell


def _write_cell(out: Path, name: str, cell: dict) -> None:
    (out / "cells" / name).mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / "cells" / name / "cell.json", cell)


def _f(v, fmt: str) -> str:
    return "-" if v is None else fmt.format(v)


def markdown(doc: dict) -> str:
    lat = doc["speed_matched"]["latency"]
    lines = [f"Latency-aware vs uniform pruning at the same measured speedup ({lat['latency_backend']} {lat['latency_device']}, "
             f"batch {lat['latency_batch']}); both fine-tuned for {doc['settings']['train']['epochs']} epochs "
             f"({doc['dataset']['name']} test split). *matched* is the speedup measured after pruning (the uniform "
             "sparsity is searched to match the latency-aware child's); *after FT* is measured again on the fine-tuned child.",
             "", "| metric | target | method | sparsity | MACs | FLOPs red. | matched speedup | top-1 before FT | top-1 after FT | speedup after FT [95% CI] |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in doc["cells"]:
        if "refused" in c:
            lines.append(f"| {c['metric']} | {c['target_speedup']:g}x | {c['method']} | refused: {c['refused'][:100]} | | | | | | |")
            continue
        sp = c["speedup"]
        lines.append(f"| {c['metric']} | {c['target_speedup']:g}x | {c['method']} | {_f(c.get('sparsity'), '{:.1%}')} | "
                     f"{c['macs']:,} | {c['flops_reduction']:.1%} | {_f(c.get('matched_speedup'), '{:.2f}x')} | "
                     f"{_f(c.get('top1_before_ft'), '{:.2f}')} | {top1_after(c)} | "
                     f"{sp['median']:.2f}x [{sp['ci_low']:.2f}, {sp['ci_high']:.2f}] |")
    return "\n".join(lines) + "\n"
