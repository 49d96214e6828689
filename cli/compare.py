"""compress compare."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from compressor import atomic
from orchestration.compare import CompareConfig, run
from orchestration.latency_prune import LatencyTarget
from orchestration.speed_matched import run as run_matched
from profilers.layer_latency import LayerLatency, default_cache_dir
from compressor.errors import UserError
from compressor.workflows import Source, dataset_for, get_model, keep_holdout, parse_model_args, pick_device

from . import common as c
from .output import emit, out as console_out


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserError(f"--shard must be I/N, e.g. 0/4 (got {text})") from None
    if not (n >= 1 and 0 <= i < n):
        raise UserError(f"--shard {text}: need 0 <= I < N")
    return i, n


def compare(
    model: c.Model,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output directory for the grid, tables and plots.")],
    metrics: Annotated[str, typer.Option(help="Comma list of metrics.")] = "l1,l2,random,taylor",
    sparsities: Annotated[str, typer.Option(help="Comma list of sparsities.")] = "0.25,0.5,0.75",
    finetune_epochs: Annotated[int, typer.Option(help="Fine-tuning epochs per cell (the metric-comparison study: 50).")] = 5,
    scope: Annotated[str, typer.Option(help="ViT: comma list of heads, ffn, embed.")] = "heads,ffn",
    ffn_metric: Annotated[str, typer.Option(help="ViT: metric for FFN neurons.")] = "l2",
    global_ranking: Annotated[bool, typer.Option("--global", help="Rank across layers.")] = False,
    round_to: Annotated[Optional[int], typer.Option(help="Keep channel counts multiples of this.")] = None,
    profile_backend: Annotated[str, typer.Option(help="Backend for the measured speedup (onnxruntime, torch) or none.")] = "onnxruntime",
    profile_batch: Annotated[int, typer.Option(help="Batch size for the measured speedup.")] = 1,
    profile_rounds: Annotated[int, typer.Option(help="Interleaved parent/child rounds of each speedup measurement (>= 3).")] = 7,
    batch_size: c.BatchSize = c.TRAIN.batch_size,
    optimizer: c.Optimizer = c.TRAIN.optimizer,
    lr: c.Lr = None,
    weight_decay: c.WeightDecay = c.TRAIN.weight_decay,
    momentum: c.Momentum = c.TRAIN.momentum,
    nesterov: c.Nesterov = c.TRAIN.nesterov,
    lr_schedule: c.Schedule = c.TRAIN.schedule,
    milestones: c.Milestones = None,
    augment: c.Augment = None,
    checkpoint: c.Checkpoint = None,
    pretrained: c.Pretrained = False,
    trust_pickle: c.TrustPickle = False,
    model_arg: c.ModelArg = None,
    input_size: c.InputSize = None,
    input_channels: c.InputChannels = None,
    data: c.Data = None,
    data_dir: c.DataDir = None,
    train_size: c.TrainSize = None,
    test_size: c.TestSize = None,
    calib_size: c.CalibSize = 3000,
    seed: c.Seed = 0,
    device: c.Device = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue a stopped grid; finished cells are kept (also gathers the cells of --shard runs into the tables).")] = False,
    target_speedups: Annotated[Optional[str], typer.Option(help="Comma list, e.g. 1.5,2,3: instead of --sparsities, for each metric and target a latency-aware child (prune --target-speedup) and a uniform one whose sparsity is searched to reach the same measured speedup; both fine-tuned alike.")] = None,
    latency_backend: Annotated[str, typer.Option(help="--target-speedups: onnxruntime, openvino, torch or tensorrt.")] = "onnxruntime",
    latency_device: Annotated[str, typer.Option(help="--target-speedups: cpu; cuda (torch, tensorrt); gpu or npu (openvino).")] = "cpu",
    latency_batch: Annotated[int, typer.Option(help="--target-speedups: batch size the speedups are measured at.")] = 1,
    latency_cache: Annotated[Optional[Path], typer.Option(help="--target-speedups: directory of measured layer tables (default ~/.cache/compress/latency).")] = None,
    latency_rounds: Annotated[int, typer.Option(help="--target-speedups: interleaved rounds of each measurement.")] = 9,
    latency_iterations: Annotated[int, typer.Option(help="--target-speedups: plan, prune and measure attempts of each latency-aware child.")] = 5,
    depth: Annotated[bool, typer.Option(help="--target-speedups: the latency-aware child may also lose whole residual blocks (see prune --depth); --no-depth: widths only.")] = True,
    threads: Annotated[Optional[int], typer.Option(help="--target-speedups: CPU threads for every latency measurement (default: the runtime's; at batch 1, 1 runs steadier).")] = None,
    allow_busy: Annotated[bool, typer.Option("--allow-busy", help="--target-speedups: keep cells measured while the machine was busy (recorded in each cell); without it the latency-aware step refuses them.")] = False,
    shard: Annotated[Optional[str], typer.Option(help="I/N: run only every N-th cell from the I-th (0-based), e.g. one Slurm array task each; then gather with --resume.")] = None,
    overwrite: c.Overwrite = False,
    quiet: c.Quiet = False,
    config: c.Config = None,
):
    """Run every metric x sparsity from one parent, fine-tune each, measure its speedup; write tables (Markdown/CSV/JSON) and plots."""
    part = _parse_shard(shard) if shard is not None else None
    targets = c.csv_list(target_speedups, float, "--target-speedups") if target_speedups is not None else None
    if targets is not None and part is not None:
        raise UserError("--shard splits a --sparsities grid; --target-speedups runs in one process")
    if part is not None and overwrite:
        raise UserError("--overwrite with --shard would delete the other shards' cells; remove the grid yourself")
    if part is not None and out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "compare.json").is_file():
        raise UserError(f"{out_dir} is not a compare run (no compare.json)")
    if out_dir.exists() and not resume and not overwrite and part is None:
        raise UserError(f"output {out_dir} already exists (--resume to continue it, --overwrite to replace it)")
    if resume and out_dir.exists() and not (out_dir / "compare.json").is_file():
        raise UserError(f"{out_dir} is not a compare run (no compare.json)")
    dev = pick_device(device)
    ds = dataset_for(data, data_dir, train_size, test_size, False)
    lm = get_model(Source(model, checkpoint, pretrained, trust_pickle, parse_model_args(model_arg), input_size, seed=seed,
                        input_channels=input_channels), ds)
    if ds is None:
        ds = dataset_for(None, None, train_size, test_size, False, lm.record)
    ds = keep_holdout(ds, lm.record)
    if ds is None:
        raise UserError("compare fine-tunes and evaluates: pass --data")
    tcfg = c.train_config(epochs=finetune_epochs, batch_size=batch_size, optimizer=optimizer, lr=lr, weight_decay=weight_decay,
                          momentum=momentum, nesterov=nesterov, schedule=lr_schedule, milestones=milestones, augment=augment,
                          seed=seed, dataset=ds.spec.name, device=dev)
    cfg = CompareConfig(metrics=c.csv_list(metrics), sparsities=c.csv_list(sparsities, float, "--sparsities"), train=tcfg,
                        calib_size=calib_size, seed=seed, scope=tuple(c.csv_list(scope)), ffn_metric=ffn_metric,
                        global_ranking=global_ranking, round_to=round_to,
                        profile_backend=None if profile_backend == "none" else profile_backend, profile_batch=profile_batch, profile_rounds=profile_rounds)
    if cfg.profile_backend not in (None, "onnxruntime", "torch"):
        raise UserError("--profile-backend must be onnxruntime, torch or none")
    cfg.validate()
    atomic.check_output_path(out_dir, True)
    if targets is not None:
        lat = LatencyTarget(targets[0] if targets else None, None, latency_backend, latency_device, latency_batch, threads,
                            latency_cache or default_cache_dir(), latency_rounds, latency_iterations, allow_busy=allow_busy,
                            depth=depth)
        LayerLatency(latency_backend, latency_device, latency_batch, None, None)  # refuses a bad backend/device/batch
        run_matched(lm, ds, cfg, lat, targets, out_dir, resume=resume, device=dev, reporter=c.reporter(quiet))
        emit((out_dir / "table.md").read_text())
        console_out.print(f"wrote {out_dir}/table.md, table.json")
        return
    doc = run(lm, ds, cfg, out_dir, resume=resume, device=dev, reporter=c.reporter(quiet), shard=part)
    if part is not None:
        console_out.print(f"shard {part[0]}/{part[1]}: {len(doc['cells'])} cells in {out_dir}/cells; when every shard has "
                          f"finished, gather them with the same command, --resume and no --shard")
        return
    emit((out_dir / "table.md").read_text())
    console_out.print(f"wrote {out_dir}/table.md, table.csv, table.json, accuracy_vs_flops.png, speedup_vs_flops.png")
