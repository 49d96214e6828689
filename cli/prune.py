"""compress prune."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from compressor import atomic
from compressor.errors import UserError
from compressor.importance import METRICS
from compressor.layers import LAYER_METRICS
from compressor.modeldir import save_model_dir, write_model_files
from compressor.pruning import WidthConfig, validate
from compressor.workflows import Source, dataset_for, get_model, layer_prune, parse_model_args, pick_device, width_prune
from orchestration.auto_loop import AutoConfig, run as run_auto
from orchestration.latency_prune import LatencyTarget, latency_prune
from profilers.layer_latency import LayerLatency, default_cache_dir

from . import common as c
from .output import before_after, out


def prune(
    model: c.Model,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output model directory.")],
    structure: Annotated[str, typer.Option(help="width: channels (CNN) / heads+FFN (ViT); layers: whole residual blocks; auto: do Nascimento et al.'s layer-or-filter loop by CKA.")] = "width",
    metric: Annotated[Optional[str], typer.Option(help=f"Importance: {', '.join(METRICS)} (default l2); layers: {', '.join(LAYER_METRICS)}; auto: kl or l1 (default kl, as do Nascimento et al.).")] = None,
    sparsity: Annotated[float, typer.Option(help="Fraction of channels / heads / FFN neurons removed in every layer, 0 <= S < 1.")] = 0.5,
    scope: Annotated[str, typer.Option(help="ViT: comma list of heads, ffn, embed.")] = "heads,ffn",
    ffn_metric: Annotated[str, typer.Option(help="ViT: metric for FFN neurons (the metric-comparison study uses l2).")] = "l2",
    global_ranking: Annotated[bool, typer.Option("--global", help="Rank across layers instead of a uniform ratio per layer.")] = False,
    round_to: Annotated[Optional[int], typer.Option(help="Round every kept width to the nearest multiple of this (e.g. 8 or 16), never below one multiple.")] = None,
    greedy_step: Annotated[int, typer.Option(help="output-norm-greedy: removals between re-evaluations in residual-coupled groups (1 = exact).")] = 1,
    target_speedup: Annotated[Optional[float], typer.Option(help="Latency-aware: choose every layer's width for this measured speedup on the latency backend (instead of --sparsity).", rich_help_panel="Latency-aware widths (--target-speedup)")] = None,
    target_latency_ms: Annotated[Optional[float], typer.Option(help="Latency-aware: a latency budget in ms instead of --target-speedup.", rich_help_panel="Latency-aware widths (--target-speedup)")] = None,
    latency_backend: Annotated[str, typer.Option(help="Latency-aware: onnxruntime or torch.", rich_help_panel="Latency-aware widths (--target-speedup)")] = "onnxruntime",
    latency_device: Annotated[str, typer.Option(help="Latency-aware: cpu, or cuda (torch).", rich_help_panel="Latency-aware widths (--target-speedup)")] = "cpu",
    latency_batch: Annotated[int, typer.Option(help="Latency-aware: batch size the latency is measured at.", rich_help_panel="Latency-aware widths (--target-speedup)")] = 1,
    latency_cache: Annotated[Optional[Path], typer.Option(help="Latency-aware: directory of measured layer tables, reused across runs (default ~/.cache/compress/latency).", rich_help_panel="Latency-aware widths (--target-speedup)")] = None,
    latency_rounds: Annotated[int, typer.Option(help="Latency-aware: interleaved parent/child rounds of each whole-model measurement.", rich_help_panel="Latency-aware widths (--target-speedup)")] = 9,
    latency_iterations: Annotated[int, typer.Option(help="Latency-aware: plan, prune and measure attempts; each corrects the budget by what the last one measured.", rich_help_panel="Latency-aware widths (--target-speedup)")] = 3,
    min_width_fraction: Annotated[float, typer.Option(help="Latency-aware: every layer keeps at least this share of its channels.", rich_help_panel="Latency-aware widths (--target-speedup)")] = 0.2,
    threads: Annotated[Optional[int], typer.Option(help="Latency-aware: CPU threads for every latency measurement (default: the runtime's).", rich_help_panel="Latency-aware widths (--target-speedup)")] = None,
    num_blocks: Annotated[Optional[str], typer.Option(help="layers: blocks to remove, or 'max'.", rich_help_panel="Layers and the auto loop (--structure layers|auto)")] = None,
    min_blocks_per_stage: Annotated[int, typer.Option(help="layers/auto: blocks every stage keeps.", rich_help_panel="Layers and the auto loop (--structure layers|auto)")] = 2,
    iterations: Annotated[int, typer.Option(help="auto: iterations.", rich_help_panel="Layers and the auto loop (--structure layers|auto)")] = 10,
    target_flops_reduction: Annotated[Optional[float], typer.Option(help="auto: stop at this FLOPs reduction (0-1).", rich_help_panel="Layers and the auto loop (--structure layers|auto)")] = None,
    min_accuracy: Annotated[Optional[float], typer.Option(help="auto: stop when held-out top-1 (%) falls below this.", rich_help_panel="Layers and the auto loop (--structure layers|auto)")] = None,
    candidate_epochs: Annotated[int, typer.Option(help="auto: fine-tuning epochs for each candidate before CKA.", rich_help_panel="Layers and the auto loop (--structure layers|auto)")] = 10,
    epochs_per_iteration: Annotated[int, typer.Option(help="auto: further epochs for the chosen candidate.", rich_help_panel="Layers and the auto loop (--structure layers|auto)")] = 10,
    similarity: Annotated[str, typer.Option(help="auto: cka, or random (the seed's random walk).", rich_help_panel="Layers and the auto loop (--structure layers|auto)")] = "cka",
    only: Annotated[Optional[str], typer.Option(help="auto: layers or filters only (baselines with the same budget).", rich_help_panel="Layers and the auto loop (--structure layers|auto)")] = None,
    layer_bias: Annotated[float, typer.Option(help="auto: epsilon added to the layer candidate's CKA.", rich_help_panel="Layers and the auto loop (--structure layers|auto)")] = 0.0,
    holdout: Annotated[float, typer.Option(help="auto: fraction of the training split held out for CKA and the accuracy floor.", rich_help_panel="Layers and the auto loop (--structure layers|auto)")] = 0.1,
    optimizer: Annotated[str, typer.Option(help="auto: optimizer (do Nascimento et al.: sgd).", rich_help_panel="Layers and the auto loop (--structure layers|auto)")] = "sgd",
    lr: Annotated[float, typer.Option(help="auto: learning rate (do Nascimento et al.: 0.01).", rich_help_panel="Layers and the auto loop (--structure layers|auto)")] = 0.01,
    weight_decay: Annotated[float, typer.Option(help="auto: weight decay.", rich_help_panel="Layers and the auto loop (--structure layers|auto)")] = 5e-4,
    batch_size: Annotated[int, typer.Option(help="auto: training batch size.", rich_help_panel="Layers and the auto loop (--structure layers|auto)")] = 128,
    augment: c.Augment = None,
    checkpoint: c.Checkpoint = None,
    pretrained: c.Pretrained = False,
    trust_pickle: c.TrustPickle = False,
    model_arg: c.ModelArg = None,
    input_size: c.InputSize = None,
    num_classes: c.NumClasses = None,
    data: c.Data = None,
    data_dir: c.DataDir = None,
    train_size: c.TrainSize = None,
    test_size: c.TestSize = None,
    download: c.Download = False,
    calib_size: c.CalibSize = 3000,
    seed: c.Seed = 0,
    device: c.Device = "auto",
    overwrite: c.Overwrite = False,
    quiet: c.Quiet = False,
):
    """Remove structures from a model and write a physically smaller model directory."""
    atomic.check_output_path(out_dir, overwrite)
    if structure not in ("width", "layers", "auto"):
        raise UserError("--structure must be width, layers or auto")
    if calib_size < 1:
        raise UserError("--calib-size must be >= 1")
    if min_blocks_per_stage < 1:
        raise UserError("--min-blocks-per-stage must be >= 1")
    if metric is None:
        metric = "l2" if structure == "width" else "kl"
    target = None
    if target_speedup is not None or target_latency_ms is not None:
        if structure != "width":
            raise UserError("--target-speedup/--target-latency-ms choose channel widths: use them with --structure width")
        if threads is not None and threads < 1:
            raise UserError("--threads must be >= 1")
        target = LatencyTarget(target_speedup, target_latency_ms, latency_backend, latency_device, latency_batch, threads,
                               latency_cache or default_cache_dir(), latency_rounds, latency_iterations, min_width_fraction)
        target.validate()
        LayerLatency(latency_backend, latency_device, latency_batch, threads, None)  # refuses bad backend/device/batch
    dev = pick_device(device)
    rep = c.reporter(quiet)
    src = Source(model, checkpoint, pretrained, trust_pickle, parse_model_args(model_arg), input_size, num_classes, seed)
    ds = dataset_for(data, data_dir, train_size, test_size, download, None)
    lm = get_model(src, ds)
    if ds is None and data is None:
        ds = dataset_for(None, None, None, None, False, lm.record)
    settings = {"model": model, "data": None if ds is None else ds.spec.name}

    if structure == "width":
        cfg = WidthConfig(metric=metric, sparsity=sparsity, scope=tuple(c.csv_list(scope)), ffn_metric=ffn_metric,
                          global_ranking=global_ranking, round_to=round_to, seed=seed, greedy_step=greedy_step)
        validate(cfg)
        if target is not None:
            _latency_aware(lm, ds, cfg, target, calib_size, dev, rep, settings, out_dir)
            return
        pruned, rec, summary = width_prune(lm, ds, cfg, calib_size, dev, rep, settings)
        save_model_dir(out_dir, pruned, rec)
        out.print(before_after(f"{structure} pruning, {metric}, sparsity {sparsity}", summary["before"], summary["after"]))
        if summary["heads"]:
            first = next(iter(summary["heads"].values()))
            out.print(f"attention heads per block: {first[0]} -> {first[1]}")
        for name, why in summary["left_alone"].items():
            out.print(f"left alone: {name} (torch-pruning cannot remove its channels: {why})")
        achieved = f"removed {100 * summary['achieved_sparsity']:.1f}% of the prunable units (asked {100 * sparsity:g}%)"
        if summary["short_of_request"]:
            out.print(f"warning: much less pruned than asked: {achieved}; the rest is left alone or rounded away "
                      "(see above); recorded in model.json", style="bold red")
        else:
            out.print(achieved)
        out.print(f"{len(summary['layers'])} layers changed width; pruning took {summary['prune_s']} s; wrote {out_dir}")
        return
    if structure == "layers":
        if metric not in LAYER_METRICS:
            raise UserError(f"--structure layers takes --metric {', '.join(LAYER_METRICS)}")
        n = None if num_blocks in (None, "max") else _int(num_blocks, "--num-blocks")
        if num_blocks is None:
            raise UserError("--structure layers needs --num-blocks N (or max)")
        pruned, rec, summary = layer_prune(lm, ds, metric, n, min_blocks_per_stage, calib_size, seed, dev, rep, settings)
        save_model_dir(out_dir, pruned, rec)
        out.print(before_after(f"layer pruning, {metric}", summary["before"], summary["after"]))
        out.print(f"removed blocks: {', '.join(summary['removed_blocks'])}; wrote {out_dir}")
        return
    # auto: do Nascimento et al.
    if ds is None:
        raise UserError("--structure auto fine-tunes candidates: it needs --data")
    acfg = AutoConfig(iterations=iterations, target_flops_reduction=target_flops_reduction, min_accuracy=min_accuracy,
                      candidate_epochs=candidate_epochs, epochs_per_iteration=epochs_per_iteration, similarity=similarity,
                      only=only, layer_bias=layer_bias, metric=metric, min_blocks_per_stage=min_blocks_per_stage,
                      holdout=holdout, calib_size=min(calib_size, 3000), seed=seed)
    acfg.validate()
    tcfg = c.train_config(epochs=1, batch_size=batch_size, optimizer=optimizer, lr=lr, weight_decay=weight_decay,
                          momentum=0.9, nesterov=optimizer == "sgd", schedule="constant", milestones=None, augment=augment,
                          bn_l1=0.0, distill_temperature=4.0, distill_weight=0.5, amp=True, channels_last=None,
                          compile=False, loader="tensor", workers=0, seed=seed, dataset=ds.spec.name, device=dev)
    from compressor.layers import find_blocks
    from compressor.models import is_vit

    if is_vit(lm.model):  # do Nascimento et al.'s filter candidate is defined on residual conv blocks
        raise UserError("--structure auto chooses between residual conv blocks and their filters (ResNets); "
                        "for a ViT use --structure layers or width")
    find_blocks(lm.model)  # fail now, not after the first fine-tune, for models without residual stages
    with atomic.staged_dir(out_dir) as tmp:
        log = run_auto(lm, ds, acfg, tcfg, tmp, device=dev, reporter=rep, settings=settings)
        if log["final"] is None:
            why = log["stopped"] if not log["iterations"] else f"no iteration stayed above the accuracy floor ({log['stopped']})"
            raise UserError(f"{why}; nothing written")
        from compressor.modeldir import load_model_dir

        best = load_model_dir(tmp / log["final"])
        write_model_files(tmp, best.model, best.record)
    out.print(f"path {log['path']}; stopped: {log['stopped']}; final = {log['final']}; wrote {out_dir} (log: auto_log.md)")


def _latency_aware(lm, ds, cfg, target, calib_size, dev, rep, settings, out_dir) -> None:
    pruned, rec, summary = latency_prune(lm, ds, cfg, target, calib_size, dev, rep, settings)
    save_model_dir(out_dir, pruned, rec)
    p = summary["latency"]
    goal = f"{target.speedup:g}x" if target.speedup else f"{target.latency_ms:g} ms"
    out.print(before_after(f"latency-aware pruning for {goal} on {p['backend']} {p['device']}, batch {p['batch']}, "
                           f"{cfg.metric}", summary["before"], summary["after"]))
    t = p["table"]
    out.print(f"latency table: {t['entries_measured']} layer entries measured ({t['measure_s']} s), {t['cache_hits']} "
              f"lookups from the cache; {len(p['attempts'])} plan/measure attempt(s)")
    out.print(f"predicted {p['predicted_ms']:.4g} ms ({p['predicted_speedup']:.2f}x); measured {p['measured_child_ms']:.4g} ms "
              f"vs parent {p['measured_parent_ms']:.4g} ms: speedup {p['measured_speedup']:.2f}x "
              f"[{p['speedup_ci'][0]:.2f}, {p['speedup_ci'][1]:.2f}] ({100 * p['ci_confidence']:.0f}% CI, {p['rounds']} rounds); "
              f"prediction error {100 * p['prediction_error']:+.1f}%")
    if summary["slower"]:
        worst = ", ".join(f"{r['layer']} {r['parent_ms']:.3g}->{r['child_ms']:.3g} ms" for r in p["slower_layers"][:3])
        out.print(f"warning: the pruned model is SLOWER than its parent on this backend (speedup interval below 1); "
                  f"layers that did not get faster: {worst}", style="bold red")
    out.print(f"{len(summary['layers'])} layers changed width; pruning took {summary['prune_s']} s; wrote {out_dir}")


def _int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{flag} must be an integer or max") from None
