"""`compress compare`: every metric x sparsity from one parent, in the form of the metric-comparison study's Tables 3 and 5.

Each finished cell writes cell.json; a re-run with --resume skips finished cells and continues an
interrupted fine-tune from its last epoch. `shard=(i, n)` runs every n-th cell from the i-th, so cluster
array jobs can share a grid: shards create the skeleton if it is absent (whoever is first), write only
their own cells, and a final --resume without a shard gathers every cell.json into the tables.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from compressor import atomic
from compressor.data import Dataset
from compressor.errors import UserError
from compressor.finetune import TrainConfig
from compressor.modeldir import LoadedModel, load_model_dir, save_model_dir, write_model_files
from compressor.progress import QUIET, Reporter
from compressor.pruning import WidthConfig, validate
from compressor.workflows import finetune, width_prune
from profilers.session import Settings, run as run_profile
from profilers.targets import from_loaded


@dataclass
class CompareConfig:
    metrics: list[str]
    sparsities: list[float]
    train: TrainConfig
    calib_size: int = 3000
    seed: int = 0
    scope: tuple[str, ...] = ("heads", "ffn")
    ffn_metric: str = "l2"
    global_ranking: bool = False
    round_to: int | None = None
    profile_backend: str | None = "onnxruntime"
    profile_batch: int = 1
    profile_rounds: int = 7

    def width(self, metric: str, sparsity: float) -> WidthConfig:
        return WidthConfig(metric=metric, sparsity=sparsity, scope=self.scope, ffn_metric=self.ffn_metric,
                           global_ranking=self.global_ranking, round_to=self.round_to, seed=self.seed)

    def to_json(self) -> dict:
        return {"metrics": self.metrics, "sparsities": self.sparsities, "train": self.train.to_json(),
                "calib_size": self.calib_size, "seed": self.seed, "scope": list(self.scope), "ffn_metric": self.ffn_metric,
                "global": self.global_ranking, "round_to": self.round_to, "profile_backend": self.profile_backend,
                "profile_batch": self.profile_batch, "profile_rounds": self.profile_rounds}

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]

    def validate(self) -> None:
        if not self.metrics or not self.sparsities:
            raise UserError("`metrics` and `sparsities` must not be empty")
        for m in self.metrics:
            for s in self.sparsities:
                validate(self.width(m, s))
        self.train.validate()
        if self.profile_batch < 1:
            raise UserError("`profile_batch` must be >= 1")
        if self.profile_rounds < 3:
            raise UserError("`profile_rounds` must be >= 3")


def cell_name(metric: str, sparsity: float) -> str:
    return f"{metric}_s{round(100 * sparsity):02d}"


def _speedup(parent: LoadedModel, child: LoadedModel, cfg: CompareConfig) -> dict | None:
    if cfg.profile_backend is None:
        return None
    s = Settings(backends=(cfg.profile_backend,), batch_sizes=(cfg.profile_batch,), rounds=cfg.profile_rounds,
                 warmup=5, min_iters=10, min_time_s=0.2, energy=False)
    base, tgt = from_loaded("parent", parent), from_loaded("child", child)
    doc = run_profile([tgt], base, s)
    row = doc.row("child")
    sp = row.speedup
    assert sp is not None  # every non-baseline row carries its speedup
    return {"backend": cfg.profile_backend, "batch": cfg.profile_batch, "median": sp.median, "ci_low": sp.ci_low,
            "ci_high": sp.ci_high, "significant": sp.significant, "p50_ms": row.latency_ms.p50,
            "parent_p50_ms": doc.row("parent").latency_ms.p50}


def skeleton(lm: LoadedModel, ds: Dataset, cfg: CompareConfig, out: Path, replace: bool) -> dict:
    """The grid's parent and compare.json, appearing whole (a kill leaves no grid or a resumable one).
    replace=False (shards): only if no grid is there yet; a concurrent shard's skeleton wins and is used."""
    doc = {"fingerprint": cfg.fingerprint(), "settings": cfg.to_json(), "parent": str((out / "parent").resolve()),
           "dataset": ds.spec.to_json(), "cells": []}
    if replace:
        with atomic.staged_dir(out) as tmp:
            save_model_dir(tmp / "parent", lm.model, lm.record)
            atomic.write_json(tmp / "compare.json", doc)
        return doc
    if not (out / "compare.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.shard-"))
        try:
            save_model_dir(tmp / "parent", lm.model, lm.record)
            atomic.write_json(tmp / "compare.json", doc)
            os.rename(tmp, out)  # fails when another shard's grid is already there (a non-empty directory)
        except OSError:  # another shard created the grid first: use theirs
            pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return existing_grid(out, cfg)


def existing_grid(out: Path, cfg: CompareConfig) -> dict:
    try:
        doc = json.loads((out / "compare.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{out / 'compare.json'} is not readable ({type(e).__name__})") from None
    if doc.get("fingerprint") != cfg.fingerprint():
        raise UserError(f"{out} was started with different settings; use the same flags to resume, or `overwrite`")
    return doc


def finished_cells(out: Path, doc: dict) -> dict[str, dict]:
    """Cells recorded in compare.json or written by any shard (their cell.json is the record)."""
    cells = {c["name"]: c for c in doc.get("cells", [])}
    for p in sorted((out / "cells").glob("*/cell.json")):
        try:
            c = json.loads(p.read_text())
            cells[c["name"]] = c
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            continue  # unreadable: the cell runs again
    return cells


def run(lm: LoadedModel, ds: Dataset, cfg: CompareConfig, out: Path, *, resume: bool, device="cpu",
        reporter: Reporter = QUIET, shard: tuple[int, int] | None = None) -> dict:
    cfg.validate()
    spec_path = out / "compare.json"
    if shard is not None:
        doc = skeleton(lm, ds, cfg, out, replace=False)
    elif resume and spec_path.is_file():
        doc = existing_grid(out, cfg)
    else:
        doc = skeleton(lm, ds, cfg, out, replace=True)
    parent = load_model_dir(out / "parent")
    cells = finished_cells(out, doc)
    full = [(m, s) for s in cfg.sparsities for m in cfg.metrics]
    grid = full if shard is None else [g for k, g in enumerate(full) if k % shard[1] == shard[0]]
    with reporter.task("compare grid" if shard is None else f"compare grid, shard {shard[0]}/{shard[1]}", len(grid)) as advance:
        for metric, sparsity in grid:
            name = cell_name(metric, sparsity)
            cdir = out / "cells" / name
            if name in cells and (cdir / "cell.json").is_file():
                advance()
                continue
            reporter.log(f"cell {name}: prune")
            child, rec, summary = width_prune(parent, ds, cfg.width(metric, sparsity), cfg.calib_size, device, reporter,
                                              {"compare": str(out)})
            pruned = LoadedModel(child, rec, None)
            pruned.path = parent.path  # lineage: the fine-tune's parent is the compare parent
            cdir.mkdir(parents=True, exist_ok=True)
            model, frec, result = finetune(pruned, ds, copy.deepcopy(cfg.train), cdir, True, device, reporter=reporter,
                                           settings={"compare": str(out), "cell": name}, refuse_collapse=False)
            write_model_files(cdir, model, frec)
            child_lm = load_model_dir(cdir)
            speed = _speedup(parent, child_lm, cfg)
            b, a = summary.before, summary.after
            cell = {"name": name, "dir": f"cells/{name}", "metric": metric, "sparsity": sparsity,
                    "params": a["params"], "macs": a["macs"], "parent_params": b["params"], "parent_macs": b["macs"],
                    "flops_reduction": 1 - a["macs"] / b["macs"], "parent_top1": b.get("top1"), "parent_top5": b.get("top5"),
                    "top1_before_ft": a.get("top1"), "top5_before_ft": a.get("top5"),
                    "top1_after_ft": frec.metrics.get("top1"), "top5_after_ft": frec.metrics.get("top5"),
                    "finetune_s": round(result.wall_s, 2), "finetune_epochs": len(result.history),
                    "images_per_s": result.history[-1]["images_per_s"] if result.history else None, "speedup": speed,
                    "learned_nothing": result.learned_nothing}
            atomic.write_json(cdir / "cell.json", cell)
            cells[name] = cell
            if shard is None:  # shards never write compare.json: they would overwrite each other's cells
                doc["cells"] = [cells[cell_name(m, s)] for m, s in full if cell_name(m, s) in cells]
                atomic.write_json(spec_path, doc)
            advance()
    if shard is not None:
        doc["cells"] = [cells[cell_name(m, s)] for m, s in grid]
        return doc
    doc["cells"] = [cells[cell_name(m, s)] for m, s in full]
    atomic.write_json(spec_path, doc)
    write_tables(doc, out)
    return doc


HEADER = ["metric", "sparsity", "params", "MACs", "FLOPs red.", "top-1 before FT", "top-5 before FT", "top-1 after FT",
          "top-5 after FT", "FT time (s)", "speedup"]


def top1_after(c: dict) -> str:
    """A cell's top-1 after fine-tuning, marked when that fine-tune learned nothing (both grids' tables)."""
    v = c.get("top1_after_ft")
    return ("-" if v is None else f"{v:.2f}") + (" (learned nothing)" if c.get("learned_nothing") else "")


def _row(c: dict) -> list[str]:
    sp = c.get("speedup")
    speed = "-" if not sp else f"{sp['median']:.2f}x [{sp['ci_low']:.2f}, {sp['ci_high']:.2f}]" + ("" if sp["significant"] else " n.s.")
    f = lambda v: "-" if v is None else f"{v:.2f}"
    return [c["metric"], f"{100 * c['sparsity']:.0f}%", f"{c['params']:,}", f"{c['macs']:,}", f"{100 * c['flops_reduction']:.1f}%",
            f(c["top1_before_ft"]), f(c["top5_before_ft"]), top1_after(c),
            f(c["top5_after_ft"]), f"{c['finetune_s']:.1f}", speed]


def markdown(doc: dict) -> str:
    cells = doc["cells"]
    p = cells[0] if cells else {}
    sp = (cells[0].get("speedup") or {}) if cells else {}
    lines = [f"Parent: {p.get('parent_params', 0):,} params, {p.get('parent_macs', 0):,} MACs, top-1 {p.get('parent_top1')}, "
             f"top-5 {p.get('parent_top5')} ({doc['dataset']['name']} test split). Fine-tuning: {doc['settings']['train']['epochs']} epochs, "
             f"{doc['settings']['train']['optimizer']} lr {doc['settings']['train']['lr']}."
             + (f" Speedup: {sp.get('backend')} batch {sp.get('batch')}, median of interleaved rounds [95% CI]." if sp else ""), "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(_row(c)) + " |" for c in cells]
    return "\n".join(lines) + "\n"


def write_tables(doc: dict, out: Path) -> None:
    atomic.write_text(out / "table.md", markdown(doc))
    buf = io.StringIO()
    keys = ["metric", "sparsity", "params", "macs", "flops_reduction", "top1_before_ft", "top5_before_ft", "top1_after_ft",
            "top5_after_ft", "finetune_s", "speedup", "speedup_ci_low", "speedup_ci_high"]
    w = csv.writer(buf)
    w.writerow(keys)
    for c in doc["cells"]:
        sp = c.get("speedup") or {}
        w.writerow([c["metric"], c["sparsity"], c["params"], c["macs"], round(c["flops_reduction"], 5), c["top1_before_ft"],
                    c["top5_before_ft"], c["top1_after_ft"], c["top5_after_ft"], c["finetune_s"], sp.get("median"),
                    sp.get("ci_low"), sp.get("ci_high")])
    atomic.write_text(out / "table.csv", buf.getvalue())
    atomic.write_json(out / "table.json", doc["cells"])
    _plots(doc, out)


def _plots(doc: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = doc["cells"]
    metrics = list(dict.fromkeys(c["metric"] for c in cells))
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for m in metrics:
        sel = sorted([c for c in cells if c["metric"] == m], key=lambda c: c["macs"])
        line, = ax.plot([c["macs"] / 1e6 for c in sel], [c["top1_after_ft"] for c in sel], "o-", label=f"{m} after FT")
        ax.plot([c["macs"] / 1e6 for c in sel], [c["top1_before_ft"] for c in sel], "x--", color=line.get_color(), alpha=0.6,
                label=f"{m} before FT")
    if cells and cells[0].get("parent_top1") is not None:
        ax.plot([cells[0]["parent_macs"] / 1e6], [cells[0]["parent_top1"]], "k*", ms=12, label="parent")
    ax.set_xlabel("MACs (millions)")
    ax.set_ylabel("top-1 (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic.temp_path_for(out / "accuracy_vs_flops.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    fig, ax = plt.subplots(figsize=(6, 4.5))
    pts = [c for c in cells if c.get("speedup")]
    if pts:
        xs = [100 * c["flops_reduction"] for c in pts]
        ideal_x = sorted(set(xs))
        ax.plot(ideal_x, [1 / (1 - x / 100) for x in ideal_x], "k--", lw=1, label="ideal (1 / (1 - reduction))")
        for m in metrics:
            sel = [c for c in pts if c["metric"] == m]
            ax.errorbar([100 * c["flops_reduction"] for c in sel], [c["speedup"]["median"] for c in sel],
                        yerr=[[c["speedup"]["median"] - c["speedup"]["ci_low"] for c in sel],
                              [c["speedup"]["ci_high"] - c["speedup"]["median"] for c in sel]], fmt="o", capsize=3, label=m)
        ax.legend(fontsize=7)
    ax.set_xlabel("FLOPs reduction (%)")
    ax.set_ylabel("measured speedup")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic.temp_path_for(out / "speedup_vs_flops.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close("all")
