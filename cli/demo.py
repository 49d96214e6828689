"""compress demo: the whole chain on the embedded digits data, in a few minutes on a laptop CPU."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from compressor import atomic
from compressor.data import DataSpec, load_dataset
from compressor.finetune import TrainConfig, default_augment
from compressor.modeldir import load_model_dir, save_model_dir
from compressor.pruning import WidthConfig, validate
from compressor.workflows import Source, finetune, get_model, pick_device, width_prune
from exporters.model_export import export_onnx
from profilers import report
from profilers.session import Settings, run as run_profile
from profilers.targets import from_loaded

from . import common as c
from .output import emit, out as console_out


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the demo writes its models, ONNX files and report.")] = Path("compress-demo"),
    model: Annotated[str, typer.Option(help="Architecture for the baseline.")] = "resnet20",
    epochs: Annotated[int, typer.Option(help="Baseline training epochs.")] = 15,
    finetune_epochs: Annotated[int, typer.Option(help="Fine-tuning epochs after pruning.")] = 8,
    metric: Annotated[str, typer.Option(help="Importance metric.")] = "l2",
    sparsity: Annotated[float, typer.Option(help="Fraction of channels removed per layer.")] = 0.5,
    lr: Annotated[float, typer.Option(help="Adam learning rate for training and fine-tuning (fine-tuning decays it by cosine).")] = 1e-3,
    device: c.Device = "auto",
    seed: c.Seed = 0,
    overwrite: c.Overwrite = False,
    quiet: c.Quiet = False,
):
    """Train a baseline on digits, prune it, fine-tune, export both to ONNX, profile both, print the comparison."""
    atomic.check_output_path(out, overwrite)
    dev = pick_device(device)
    rep = c.reporter(quiet)
    ds = load_dataset(DataSpec("digits"))
    base_cfg = TrainConfig(epochs=epochs, lr=lr, weight_decay=1e-4, batch_size=64, augment=default_augment("digits"), seed=seed)
    ft_cfg = replace(base_cfg, epochs=finetune_epochs, schedule="cosine")  # a decaying lr ends on a settled model, not on one step of lr 1e-3
    wcfg = WidthConfig(metric=metric, sparsity=sparsity, seed=seed)
    for cfg in (base_cfg, ft_cfg):  # every argument is checked before the first epoch, not after it
        cfg.validate()
    validate(wcfg)
    with atomic.staged_dir(out) as tmp:
        rep.log(f"1/5 training {model} on digits ({len(ds.train)} train / {len(ds.test)} test images, {epochs} epochs)")
        fresh = get_model(Source(model, seed=seed), ds)
        m, rec, _ = finetune(fresh, ds, base_cfg, None, False, dev, reporter=rep, settings={"demo": True})
        save_model_dir(tmp / "baseline", m, rec)
        baseline = load_model_dir(tmp / "baseline")
        rep.log(f"2/5 pruning {100 * sparsity:.0f}% of every conv's channels by {metric}")
        pm, prec, summary = width_prune(baseline, ds, wcfg, 512, dev, rep)
        save_model_dir(tmp / "pruned", pm, prec)
        pruned = load_model_dir(tmp / "pruned")
        rep.log(f"3/5 fine-tuning the pruned model ({finetune_epochs} epochs)")
        fm, frec, _ = finetune(pruned, ds, ft_cfg, None, False, dev, reporter=rep, settings={"demo": True})
        save_model_dir(tmp / "finetuned", fm, frec)
        tuned = load_model_dir(tmp / "finetuned")
        rep.log("4/5 exporting both to ONNX (checked against PyTorch on digits test images)")
        ex_b = export_onnx(baseline, tmp / "baseline.onnx")
        ex_f = export_onnx(tuned, tmp / "finetuned.onnx")
        rep.log("5/5 profiling both with ONNX Runtime on this CPU (interleaved rounds)")
        # the very files written above are measured (not exported again), recorded where they will be
        doc = run_profile([replace(from_loaded("finetuned", tuned), onnx=tmp / "finetuned.onnx", path=out / "finetuned")],
                          replace(from_loaded("baseline", baseline), onnx=tmp / "baseline.onnx", path=out / "baseline"),
                          Settings(backends=("onnxruntime",), batch_sizes=(1, 32), rounds=10), rep).to_json()
        report.write_all(doc, tmp / "profile")
    b, p, f = baseline.record.metrics, summary.after, tuned.record.metrics
    emit(report.markdown(doc))
    console_out.print(
        f"Accuracy on the digits test split: baseline {b['top1']:.2f}%, pruned {p['top1']:.2f}% before fine-tuning, "
        f"{f['top1']:.2f}% after. ONNX files: {ex_b['bytes']:,} -> {ex_f['bytes']:,} bytes.\n"
        f"Everything is in {out}/ (model directories, ONNX files, profile/ with JSON, CSV, Markdown and plots)."
    )
