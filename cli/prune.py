"""compress prune: channel/head widths (the default), `prune layers` (whole residual blocks) and `prune auto`
(do Nascimento et al.'s layer-or-filter loop chosen by CKA). Each shows only its own options."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from compressor import atomic
from compressor.data import Dataset
from compressor.errors import UserError
from compressor.importance import KL_DEFAULT, METRICS, REGISTRY, check_kl_direction
from compressor.layers import LAYER_METRICS, find_blocks
from compressor.modeldir import LoadedModel, load_model_dir, save_model_dir, write_model_files
from compressor.pruning import WidthConfig, sparsity_for, validate
from compressor.workflows import (PruneResult, Source, dataset_for, get_model, keep_holdout, layer_prune, parse_model_args,
                                  pick_device, width_prune)
from orchestration.auto_loop import AutoConfig, run as run_auto
from orchestration.latency_prune import LatencyTarget, latency_prune
from profilers.layer_latency import LayerLatency, default_cache_dir
from profilers.targets import slow_width

from . import common as c
from .output import before_after, out

app = typer.Typer(
                  no_args_is_help=False, add_completion=False)

LAT = "Latency-aware widths (--target-speedup)"
Out = Annotated[Optional[Path], typer.Option("--out", "-o", help="Output model directory (required).")]
MinBlocks = Annotated[int, typer.Option(help="Blocks every stage keeps.")]


def _lat(help_text: str):
    return typer.Option(help=f"Latency-aware: {help_text}", rich_help_panel=LAT)


@app.callback(invoke_without_command=True)
def prune(
    ctx: typer.Context,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help=c.MODEL_HELP + " (required)")] = None,
    out_dir: Out = None,
    metric: Annotated[str, typer.Option(help=f"Importance: {', '.join(METRICS)}.")] = "l2",
    sparsity: Annotated[float, typer.Option(help="Fraction of channels / heads / FFN neurons removed in every layer, 0 <= S < 1.")] = 0.5,
    layer_sparsity: Annotated[Optional[list[str]], typer.Option(help="PATTERN=RATIO (repeatable): the sparsity of the channel groups whose root layer matches the glob (e.g. 'layer3.*=0.6'; names as in model.json's groups), first match wins; the rest take --sparsity. CNNs.")] = None,
    keep_params: Annotated[Optional[float], typer.Option(help="Instead of --sparsity: the uniform sparsity whose child keeps this fraction of the parameters (e.g. 0.75), to compare methods at matched size.")] = None,
    keep_macs: Annotated[Optional[float], typer.Option(help="Instead of --sparsity: the uniform sparsity whose child keeps this fraction of the MACs.")] = None,
    scope: Annotated[str, typer.Option(help="ViT: comma list of heads, ffn, embed.")] = "heads,ffn",
    ffn_metric: Annotated[str, typer.Option(help="ViT: metric for FFN neurons (the metric-comparison study uses l2).")] = "l2",
    global_ranking: Annotated[bool, typer.Option("--global", help="Rank across layers instead of a uniform ratio per layer.")] = False,
    round_to: Annotated[Optional[int], typer.Option(help="Round every kept width to the nearest multiple of this (e.g. 8 or 16), never below one multiple.")] = None,
    greedy_step: Annotated[int, typer.Option(help="output-norm-greedy: removals between re-evaluations in residual-coupled groups (1 = exact).")] = 1,
    kl_direction: c.KlDirection = KL_DEFAULT,
    target_speedup: Annotated[Optional[float], _lat("choose every layer's width for this measured speedup on the latency backend (instead of --sparsity).")] = None,
    target_latency_ms: Annotated[Optional[float], _lat("a latency budget in ms instead of --target-speedup.")] = None,
    latency_backend: Annotated[str, _lat("onnxruntime, openvino (f32), torch, or tensorrt (fp32 engines, NVIDIA GPU).")] = "onnxruntime",
    latency_device: Annotated[str, _lat("cpu; cuda (torch, tensorrt); gpu or npu (openvino).")] = "cpu",
    latency_batch: Annotated[int, _lat("batch size the latency is measured at.")] = 1,
    latency_cache: Annotated[Optional[Path], _lat("directory of measured layer tables, reused across runs (default ~/.cache/compress/latency).")] = None,
    latency_rounds: Annotated[int, _lat("interleaved parent/child rounds of each whole-model measurement.")] = 9,
    latency_iterations: Annotated[int, _lat("plan, prune and measure attempts; each corrects the budget by what the last ones measured.")] = 5,
    min_width_fraction: Annotated[float, _lat("every layer keeps at least this share of its channels.")] = 0.2,
    depth: Annotated[bool, _lat("also remove whole residual blocks where that loses less importance per ms saved than narrowing layers (how batch-1 targets that widths alone cannot reach are met); --no-depth keeps every block.")] = True,
    min_blocks_per_stage: Annotated[int, _lat("with --depth, blocks every stage keeps (its first block always stays).")] = 1,
    threads: Annotated[Optional[int], _lat("CPU threads for every latency measurement (default: the runtime's).")] = None,
    allow_busy: Annotated[bool, _lat("write the child even when the machine was busy while measuring (other processes using over half its CPU time, rounds spreading 2x, or the parent's latency drifting 2x); recorded in model.json. Without it such a run is refused.")] = False,
    ignore_layers: c.IgnoreLayers = None,
    checkpoint: c.Checkpoint = None, pretrained: c.Pretrained = False, trust_pickle: c.TrustPickle = False,
    model_arg: c.ModelArg = None, input_size: c.InputSize = None, input_channels: c.InputChannels = None, num_classes: c.NumClasses = None,
    data: c.Data = None, data_dir: c.DataDir = None, train_size: c.TrainSize = None, test_size: c.TestSize = None,
    download: c.Download = False,
    calib_size: Annotated[Optional[int], typer.Option(help="Class-balanced calibration images from the training split (taylor, kl, greedy); default per metric: kl 256 (Luo & Wu), others 3000.")] = None,
    seed: c.Seed = 0, device: c.Device = "auto",
    overwrite: c.Overwrite = False, quiet: c.Quiet = False, config: c.Config = None,
):
    """Remove channels (CNN) or attention heads and FFN neurons (ViT): at a sparsity, or at a measured speedup.

    Whole residual blocks: `compress prune layers`; the layer-or-filter loop: `compress prune auto`."""
    if ctx.invoked_subcommand is not None:
        given = [p.opts[0] for p in ctx.command.params if getattr(ctx.get_parameter_source(p.name), "name", "") == "COMMANDLINE"]
        if given:
            raise UserError(f"{given[0]} goes after `prune {ctx.invoked_subcommand}`, not before it")
        return
    model, out_dir = _required(model, out_dir)
    keep = _keep_target(ctx, keep_params, keep_macs, target_speedup is not None or target_latency_ms is not None)
    if calib_size is None:
        used = [REGISTRY[m] for m in {metric, ffn_metric} if m in REGISTRY and REGISTRY[m].needs_data]
        calib_size = max((m.calib_default for m in used), default=3000)
    cfg = WidthConfig(metric=metric, sparsity=sparsity, scope=tuple(c.csv_list(scope)), ffn_metric=ffn_metric,
                      global_ranking=global_ranking, round_to=round_to, seed=seed, greedy_step=greedy_step,
                      kl_direction=kl_direction, layer_sparsity=_layer_ratios(layer_sparsity or []),
                      ignore_layers=tuple(ignore_layers or ()))
    target = None
    if target_speedup is not None or target_latency_ms is not None:
        target = LatencyTarget(target_speedup, target_latency_ms, latency_backend, latency_device, latency_batch, threads,
                               latency_cache or default_cache_dir(), latency_rounds, latency_iterations, min_width_fraction,
                               allow_busy, depth, min_blocks_per_stage)
    _check_common(out_dir, overwrite, calib_size)
    validate(cfg)
    if target is not None and cfg.layer_sparsity:
        raise UserError("--layer-sparsity and --target-speedup/--target-latency-ms choose widths two ways; give one")
    if target is not None:
        target.validate()
        LayerLatency(latency_backend, latency_device, latency_batch, threads, None)  # refuses bad backend/device/batch
    src = Source(model, checkpoint, pretrained, trust_pickle, parse_model_args(model_arg), input_size, num_classes, seed,
                 input_channels=input_channels)
    lm, ds, dev, settings = _load(src, data, data_dir, train_size, test_size, download, device)
    rep = c.reporter(quiet)
    if target is not None:
        _latency_aware(lm, ds, cfg, target, calib_size, dev, rep, settings, out_dir)
        return
    if keep is not None:
        what, fraction = keep
        cfg.sparsity, got = sparsity_for(lm.model, lm.record.input, cfg, what, fraction, dev, rep)
        settings = {**settings, f"keep_{what}": fraction, f"kept_{what}": round(got, 4)}
        out.print(f"sparsity {cfg.sparsity:.4f} keeps {100 * got:.1f}% of the {what} (asked {100 * fraction:g}%)")
    pruned, rec, summary = width_prune(lm, ds, cfg, calib_size, dev, rep, settings)
    save_model_dir(out_dir, pruned, rec)
    _report_width(summary, f"width pruning, {metric}, sparsity {cfg.sparsity:.4g}", cfg.sparsity, out_dir)


@app.command("layers")
def layers(
    model: c.Model,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output model directory.")],
    num_blocks: Annotated[str, typer.Option(help="Blocks to remove, or 'max'.")],
    metric: Annotated[str, typer.Option(help=f"Block importance: {', '.join(LAYER_METRICS)}.")] = "kl",
    min_blocks_per_stage: MinBlocks = 2,
    kl_direction: c.KlDirection = KL_DEFAULT,
    checkpoint: c.Checkpoint = None, pretrained: c.Pretrained = False, trust_pickle: c.TrustPickle = False,
    model_arg: c.ModelArg = None, input_size: c.InputSize = None, input_channels: c.InputChannels = None, num_classes: c.NumClasses = None,
    data: c.Data = None, data_dir: c.DataDir = None, train_size: c.TrainSize = None, test_size: c.TestSize = None,
    download: c.Download = False, calib_size: c.CalibSize = 3000, seed: c.Seed = 0, device: c.Device = "auto",
    overwrite: c.Overwrite = False, quiet: c.Quiet = False, config: c.Config = None,
):
    """Remove whole residual blocks, ranked by the metric (the model keeps --min-blocks-per-stage per stage)."""
    _check_common(out_dir, overwrite, calib_size)
    check_kl_direction(kl_direction)
    if metric not in LAYER_METRICS:
        raise UserError(f"prune layers takes --metric {', '.join(LAYER_METRICS)}")
    if min_blocks_per_stage < 1:
        raise UserError("--min-blocks-per-stage must be >= 1")
    n = None if num_blocks == "max" else _int(num_blocks, "--num-blocks")
    src = Source(model, checkpoint, pretrained, trust_pickle, parse_model_args(model_arg), input_size, num_classes, seed,
                 input_channels=input_channels)
    lm, ds, dev, settings = _load(src, data, data_dir, train_size, test_size, download, device)
    pruned, rec, summary = layer_prune(lm, ds, metric, n, min_blocks_per_stage, calib_size, seed, dev, c.reporter(quiet), settings,
                                       kl_direction)
    save_model_dir(out_dir, pruned, rec)
    out.print(before_after(f"layer pruning, {metric}", summary.before, summary.after))
    out.print(f"removed blocks: {', '.join(summary.removed_blocks)}; wrote {out_dir}")


@app.command("auto")
def auto(
    model: c.Model,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output model directory (holds every iteration and auto_log.md).")],
    metric: Annotated[str, typer.Option(help="Criterion for blocks and filters: kl or l1 (do Nascimento et al.: kl).")] = "kl",
    iterations: Annotated[int, typer.Option(help="Iterations (each removes one block or as many filters).")] = 10,
    target_flops_reduction: Annotated[Optional[float], typer.Option(help="Stop at this FLOPs reduction (0-1).")] = None,
    min_accuracy: Annotated[Optional[float], typer.Option(help="Stop when held-out top-1 (%) falls below this.")] = None,
    candidate_epochs: Annotated[int, typer.Option(help="Fine-tuning epochs for each candidate before CKA.")] = 10,
    epochs_per_iteration: Annotated[int, typer.Option(help="Further epochs for the chosen candidate.")] = 10,
    similarity: Annotated[str, typer.Option(help="cka, or random (a random walk between the two candidates).")] = "cka",
    only: Annotated[Optional[str], typer.Option(help="layers or filters only (baselines with the same budget; on a ViT filters are heads and FFN neurons).")] = None,
    layer_bias: Annotated[float, typer.Option(help="Epsilon added to the layer candidate's CKA.")] = 0.0,
    holdout: Annotated[float, typer.Option(help="Where the data has no recorded held-out share (compress finetune --holdout): the fraction of the training split cut now for CKA and the accuracy floor.")] = 0.1,
    min_blocks_per_stage: MinBlocks = 2,
    kl_direction: c.KlDirection = KL_DEFAULT,
    filter_allocation: Annotated[str, typer.Option(help="authors: floor(p x width) with p = filters to remove / every conv filter of the network, the rest at random (the release); eligible: p over the candidate convs only.")] = "authors",
    batch_size: c.BatchSize = 128,
    optimizer: Annotated[str, typer.Option(help="adam or sgd (do Nascimento et al.: sgd).")] = "sgd",
    lr: Annotated[float, typer.Option(help="Learning rate (do Nascimento et al.: 0.01).")] = 0.01,
    weight_decay: Annotated[float, typer.Option(help="Weight decay (do Nascimento et al.: 5e-4).")] = 5e-4,
    momentum: c.Momentum = c.TRAIN.momentum,
    nesterov: Annotated[bool, typer.Option("--nesterov/--no-nesterov", help="Nesterov momentum (SGD).")] = True,
    decay_on: c.DecayOn = c.TRAIN.decay_on,
    lr_schedule: c.Schedule = c.TRAIN.schedule,
    milestones: c.Milestones = None,
    augment: c.Augment = None, amp: c.Amp = True,
    checkpoint: c.Checkpoint = None, pretrained: c.Pretrained = False, trust_pickle: c.TrustPickle = False,
    model_arg: c.ModelArg = None, input_size: c.InputSize = None, input_channels: c.InputChannels = None, num_classes: c.NumClasses = None,
    data: c.Data = None, data_dir: c.DataDir = None, train_size: c.TrainSize = None, test_size: c.TestSize = None,
    download: c.Download = False, calib_size: c.CalibSize = 3000, seed: c.Seed = 0, device: c.Device = "auto",
    overwrite: c.Overwrite = False, quiet: c.Quiet = False, config: c.Config = None,
):
    """do Nascimento et al.: each iteration removes a residual block or as many filters, whichever stays closer
    to its parent by linear CKA after a short fine-tune. On a timm ViT the width candidate takes as many
    attention heads and FFN neurons as the block holds, across every block (the same parameter budget)."""
    _check_common(out_dir, overwrite, calib_size)
    acfg = AutoConfig(iterations=iterations, target_flops_reduction=target_flops_reduction, min_accuracy=min_accuracy,
                      candidate_epochs=candidate_epochs, epochs_per_iteration=epochs_per_iteration, similarity=similarity,
                      only=only, layer_bias=layer_bias, metric=metric, min_blocks_per_stage=min_blocks_per_stage,
                      holdout=holdout, calib_size=calib_size, seed=seed, kl_direction=kl_direction,
                      filter_allocation=filter_allocation)
    acfg.validate()
    src = Source(model, checkpoint, pretrained, trust_pickle, parse_model_args(model_arg), input_size, num_classes, seed,
                 input_channels=input_channels)
    lm, ds, dev, settings = _load(src, data, data_dir, train_size, test_size, download, device)
    if ds is None:
        raise UserError("prune auto fine-tunes candidates: it needs --data")
    tcfg = c.train_config(epochs=max(candidate_epochs, epochs_per_iteration, 1), batch_size=batch_size, optimizer=optimizer,
                          lr=lr, weight_decay=weight_decay, decay_on=decay_on, momentum=momentum, nesterov=nesterov,
                          schedule=lr_schedule, milestones=milestones, augment=augment, amp=amp, seed=seed,
                          dataset=ds.spec.name, device=dev)
    find_blocks(lm.model)  # fail now, not after the first fine-tune, for models without residual stages
    with atomic.staged_dir(out_dir) as tmp:
        log = run_auto(lm, ds, acfg, tcfg, tmp, device=dev, reporter=c.reporter(quiet), settings=settings)
        if log["final"] is None:
            why = log["stopped"] if not log["iterations"] else f"no iteration stayed above the accuracy floor ({log['stopped']})"
            raise UserError(f"{why}; nothing written")
        best = load_model_dir(tmp / log["final"])
        write_model_files(tmp, best.model, best.record)
    if log["holdout"]["unseen_by_parent"] is False:
        out.print("warning: the held-out images were in the parent's training data (retrain it with compress finetune "
                  "--holdout 0.1 for an unseen held-out split); recorded in auto_log.json", style="bold red")
    out.print(f"path {log['path']}; stopped: {log['stopped']}; final = {log['final']}; wrote {out_dir} (log: auto_log.md)")


def _layer_ratios(items: list[str]) -> tuple[tuple[str, float], ...]:
    out = []
    for item in items:
        pattern, sep, ratio = item.rpartition("=")
        try:
            out.append((pattern, float(ratio)))
        except ValueError:
            sep = ""
        if not sep or not pattern:
            raise UserError(f"--layer-sparsity takes PATTERN=RATIO, e.g. 'layer3.*=0.6' (got {item!r})")
    return tuple(out)


def _keep_target(ctx: typer.Context, keep_params: float | None, keep_macs: float | None,
                 latency: bool) -> tuple[str, float] | None:
    """("params" | "macs", fraction) when the child's size is asked for instead of a sparsity."""
    given = [(w, v) for w, v in (("params", keep_params), ("macs", keep_macs)) if v is not None]
    if not given:
        return None
    if len(given) > 1:
        raise UserError("give one of --keep-params and --keep-macs")
    if latency:
        raise UserError(f"--keep-{given[0][0]} and --target-speedup/--target-latency-ms choose widths two ways; give one")
    if getattr(ctx.get_parameter_source("sparsity"), "name", "") == "COMMANDLINE":
        raise UserError(f"--keep-{given[0][0]} chooses the sparsity; do not also give --sparsity")
    what, fraction = given[0]
    if not (0.0 < fraction < 1.0):
        raise UserError(f"--keep-{what} must be in (0, 1), got {fraction}")
    return what, fraction


def _required(model: str | None, out_dir: Path | None) -> tuple[str, Path]:
    if model is None:
        raise UserError("missing option --model")
    if out_dir is None:
        raise UserError("missing option --out")
    return model, out_dir


def _check_common(out_dir: Path, overwrite: bool, calib_size: int) -> None:
    """What every prune command refuses before it loads anything or touches the disk."""
    atomic.check_output_path(out_dir, overwrite)
    if calib_size < 1:
        raise UserError("--calib-size must be >= 1")


def _load(src: Source, data, data_dir, train_size, test_size, download,
          device) -> tuple[LoadedModel, Dataset | None, torch.device, dict]:
    dev = pick_device(device)
    ds = dataset_for(data, data_dir, train_size, test_size, download, None)
    lm = get_model(src, ds)
    if ds is None and data is None:
        ds = dataset_for(None, None, train_size, test_size, False, lm.record)
    ds = keep_holdout(ds, lm.record)
    return lm, ds, dev, {"model": src.model, "data": None if ds is None else ds.spec.name}


def _report_width(summary: PruneResult, title: str, sparsity: float, out_dir: Path) -> None:
    out.print(before_after(title, summary.before, summary.after))
    if summary.after.get("eval_note"):
        out.print(f"note: {summary.after['eval_note']}")
    if summary.heads:
        first = next(iter(summary.heads.values()))
        out.print(f"attention heads per block: {first[0]} -> {first[1]}")
    for name, why in summary.left_alone.items():
        out.print(f"left alone: {name} (torch-pruning cannot remove its channels: {why})")
    assert summary.achieved_sparsity is not None  # set by every width prune
    achieved = f"removed {100 * summary.achieved_sparsity:.1f}% of the prunable units (asked {100 * sparsity:g}%)"
    if summary.short_of_request:
        out.print(f"warning: much less pruned than asked: {achieved}; the rest is left alone or rounded away "
                  "(see above); recorded in model.json", style="bold red")
    else:
        out.print(achieved)
    odd = [f"{name} ({w[1]})" for name, w in summary.layers.items() if slow_width(w[1])]
    if odd:  # measured: such widths made a 40 % ResNet-18 slower than its parent on ONNX Runtime CPU (docs/benchmarks.md)
        out.print(f"note: {len(odd)} kept widths are not multiples of 8 (e.g. {', '.join(odd[:2])}); such widths can leave "
                  "the child slower than its parent on CPU kernels; --round-to 8 or 16 avoids them (`compress profile` "
                  "measures it)")
    out.print(f"{len(summary.layers)} layers changed width; pruning took {summary.prune_s} s; wrote {out_dir}")


def _latency_aware(lm, ds, cfg, target: LatencyTarget, calib_size, dev, rep, settings, out_dir) -> None:
    pruned, rec, summary = latency_prune(lm, ds, cfg, target, calib_size, dev, rep, settings)
    save_model_dir(out_dir, pruned, rec)
    p = summary.latency
    assert p is not None  # latency_prune always records its measured proof
    goal = f"{target.speedup:g}x" if target.speedup else f"{target.latency_ms:g} ms"
    out.print(before_after(f"latency-aware pruning for {goal} on {p['backend']} {p['device']}, batch {p['batch']}, "
                           f"{cfg.metric}", summary.before, summary.after))
    if summary.after.get("eval_note"):
        out.print(f"note: {summary.after['eval_note']}")
    t = p["table"]
    out.print(f"latency table: {t['entries_measured']} layer entries measured ({t['measure_s']} s), {t['cache_hits']} "
              f"lookups from the cache; {len(p['attempts'])} plan/measure attempt(s)")
    out.print(f"predicted {p['predicted_ms']:.4g} ms ({p['predicted_speedup']:.2f}x); measured {p['measured_child_ms']:.4g} ms "
              f"vs parent {p['measured_parent_ms']:.4g} ms: speedup {p['measured_speedup']:.2f}x "
              f"[{p['speedup_ci'][0]:.2f}, {p['speedup_ci'][1]:.2f}] ({100 * p['ci_confidence']:.0f}% CI, {p['rounds']} rounds); "
              f"prediction error {100 * p['prediction_error']:+.1f}%")
    m = p.get("machine") or {}
    if not m.get("quiet", True):
        out.print(f"warning: UNRELIABLE: the machine was busy while measuring ({'; '.join(m['reasons'])}); written because "
                  "--allow-busy was given (recorded in model.json)", style="bold red")
    if summary.removed_blocks:
        out.print(f"removed blocks: {', '.join(summary.removed_blocks)}")
    cut = [f"{g} {a}->{b}" for g, (a, b) in p["widths"].items() if a != b]
    if cut:
        out.print(f"widths: {', '.join(cut[:6])}" + (f" and {len(cut) - 6} more (model.json)" if len(cut) > 6 else ""))
    if summary.heads:
        out.print("attention heads per block: " + ", ".join(f"{v[0]} -> {v[1]}" for v in summary.heads.values()))
    if summary.slower:
        worst = ", ".join(f"{r['layer']} {r['parent_ms']:.3g}->{r['child_ms']:.3g} ms" for r in p["slower_layers"][:3])
        out.print(f"warning: the pruned model is SLOWER than its parent on this backend (speedup interval below 1); "
                  f"layers that did not get faster: {worst}", style="bold red")
    out.print(f"{len(summary.layers)} layers changed width; pruning took {summary.prune_s} s; wrote {out_dir}")


def _int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{flag} must be an integer or max") from None
