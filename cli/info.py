"""compress info."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from compressor.modeldir import read_record

from .output import fmt_int, out


def info(
    directory: Annotated[Path, typer.Argument(help="A model directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print model.json as it is.")] = False,
):
    """Print a model directory's record: architecture, input, size, accuracy, pruned shapes and lineage."""
    rec = read_record(directory)
    if as_json:
        print(json.dumps(rec.to_json(), indent=2))
        return
    m = rec.metrics
    out.print(f"{directory}: {rec.arch.source}:{rec.arch.name} {rec.arch.kwargs or ''}, {rec.num_classes} classes")
    i = rec.input
    out.print(f"input {i.channels}x{i.height}x{i.width}, mean {list(i.mean)}, std {list(i.std)}; "
              f"trained on {rec.dataset.name if rec.dataset else 'unknown data'}")
    out.print(f"params {fmt_int(m.get('params'))}, MACs {fmt_int(m.get('macs'))}"
              + (f", top-1 {m['top1']:.2f}% / top-5 {m['top5']:.2f}% on {m.get('eval_dataset', '?')} {m.get('eval_split', '')}" if "top1" in m else ""))
    if rec.arch.code:
        code = rec.arch.code
        out.print(f"code {code.get('module')} ({code.get('file')}, version {code.get('version') or '?'}, sha256 {str(code.get('sha256'))[:16]}...)")
    if rec.outputs and not rec.classifier:
        out.print("outputs " + ", ".join(f"{n} {s}" for n, s in zip(rec.outputs["names"], rec.outputs["shapes"]))
                  + " (not a classifier: no accuracy)")
    elif m.get("eval_note"):
        out.print(m["eval_note"])
    out.print(f"weights {rec.weights.get('file')} ({fmt_int(rec.weights.get('bytes'))} bytes, sha256 {rec.weights.get('sha256', '')[:16]}...)")
    if rec.removed_blocks:
        out.print(f"removed blocks: {', '.join(rec.removed_blocks)}")
    if rec.changed_modules:
        out.print(f"{len(rec.changed_modules)} modules reshaped by pruning (model.json 'changed_modules')")
    t = Table(title="lineage", title_justify="left")
    for col in ("stage", "time", "parent", "params", "MACs", "top-1", "settings"):
        t.add_column(col)
    for e in rec.lineage:
        met = e.get("metrics") or {}
        met = met.get("after", met)
        s = e.get("settings") or {}
        brief = ", ".join(f"{k}={s[k]}" for k in ("metric", "sparsity", "structure", "epochs", "lr", "optimizer", "origin", "decision") if k in s)
        t.add_row(e.get("stage", "?"), (e.get("time") or "")[:19], str(e.get("parent") or "-"), fmt_int(met.get("params")),
                  fmt_int(met.get("macs")), "-" if met.get("top1") is None else f"{met['top1']:.2f}", brief)
    out.print(t)
