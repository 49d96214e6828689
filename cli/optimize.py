"""compress optimize: prune for a measured target, fine-tune, export, and prove both bounds on the deployed artifact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated, Optional

import typer

from compressor import atomic
from compressor.errors import GateFailed, UserError
from compressor.importance import METRICS
from compressor.workflows import Source, dataset_for, get_model, keep_holdout, parse_model_args, pick_device
from orchestration import optimize_report
from orchestration.optimize import RUNTIMES, OptimizeConfig, Optimizer

from . import common as c, interrupts
from .output import out as console

TARGET, PRUNE, TUNE, MEASURE = "The promise", "Stage 1: latency-aware prune", "Stage 2: fine-tune", "Stages 3-5: export, measure, accuracy"


def _opt(panel: str, help_text: str, *flags: str):
    return typer.Option(*flags, help=help_text, rich_help_panel=panel)


def optimize(
    model: Annotated[Optional[str], _opt(TARGET, c.MODEL_HELP + " (required).", "--model", "-m")] = None,
    data: Annotated[Optional[str], _opt(TARGET, "Dataset for calibration, fine-tuning and the test split the accuracy bound is checked on (default: the model's own).", "--data", "-d")] = None,
    target_speedup: Annotated[Optional[str], _opt(TARGET, "Measured speedup of the deployed artifact over the parent's, e.g. 2; or max: the fastest attempt within the accuracy bound.")] = None,
    target_latency_ms: Annotated[Optional[float], _opt(TARGET, "A latency budget for the deployed artifact's p50 instead of --target-speedup.")] = None,
    runtime: Annotated[str, _opt(TARGET, f"Where it deploys: {', '.join(RUNTIMES)}.")] = "onnxruntime",
    device: Annotated[str, _opt(TARGET, "cpu or cuda (onnxruntime, torch, tensorrt); cpu, gpu or npu (openvino).")] = "cpu",
    batch: Annotated[int, _opt(TARGET, "Batch size the speed is promised at.")] = 1,
    precision: Annotated[str, _opt(TARGET, "Precision of the deployed artifact: fp32, fp16 or int8 (int8 calibrated on the calibration set).")] = "fp32",
    baseline_precision: Annotated[str, _opt(TARGET, "Precision of the parent's artifact the speedup is measured against (what you run today).")] = "fp32",
    max_accuracy_drop: Annotated[float, _opt(TARGET, "Top-1 points the deployed artifact may lose against the parent's artifact (both run in the runtime).")] = 1.0,
    out_dir: Annotated[Optional[Path], _opt(TARGET, "Output directory: every stage, the report and (when both bounds hold) bundle.tar.gz (required).", "--out", "-o")] = None,
    metric: Annotated[str, _opt(PRUNE, f"Importance: {', '.join(METRICS)}.")] = "taylor",
    round_to: Annotated[Optional[int], _opt(PRUNE, "Kept widths are multiples of this.")] = None,
    min_width_fraction: Annotated[float, _opt(PRUNE, "Every layer keeps at least this share of its channels.")] = 0.2,
    depth: Annotated[bool, _opt(PRUNE, "Also remove whole residual blocks where that loses less importance per ms saved than narrowing layers; --no-depth keeps every block.", "--depth/--no-depth")] = True,
    latency_rounds: Annotated[int, _opt(PRUNE, "Interleaved rounds of each in-loop measurement.")] = 9,
    latency_iterations: Annotated[int, _opt(PRUNE, "Plan/measure attempts inside each prune.")] = 5,
    speed_attempts: Annotated[int, _opt(PRUNE, "Whole attempts (prune -> ... -> measure); a speed miss on the artifact corrects the pruning target by what it measured.")] = 3,
    max_probes: Annotated[int, _opt(PRUNE, "--target-speedup max: targets tried (each pruned, fine-tuned, exported and measured).")] = 4,
    calib_size: Annotated[int, _opt(PRUNE, "Calibration images (importance, int8).")] = 256,
    latency_cache: Annotated[Optional[Path], _opt(PRUNE, "Directory of measured layer tables, reused across runs (default ~/.cache/compress/latency).")] = None,
    epochs: Annotated[int, _opt(TUNE, "Fine-tuning epochs of each attempt.")] = 10,
    lr: Annotated[Optional[float], _opt(TUNE, "Learning rate (default 1e-4 for adam, 1e-3 for sgd).")] = None,
    optimizer: Annotated[str, _opt(TUNE, "adam or sgd.")] = "adam",
    batch_size: Annotated[int, _opt(TUNE, "Training batch size.")] = 128,
    distill: Annotated[bool, _opt(TUNE, "Distil from the parent while fine-tuning.", "--distill/--no-distill")] = True,
    profile_rounds: Annotated[int, _opt(MEASURE, "Interleaved rounds of the artifact measurement (the interval's sample size).")] = 10,
    test_size: Annotated[Optional[int], _opt(MEASURE, "Class-balanced test images for both accuracies.")] = None,
    allow_busy: Annotated[bool, _opt(MEASURE, "Accept measurements taken while the machine was busy (recorded); without it they fail the run.", "--allow-busy")] = False,
    threads: Annotated[Optional[int], _opt(MEASURE, "CPU threads for every measurement.")] = None,
    train_size: c.TrainSize = None, data_dir: c.DataDir = None, download: c.Download = False,
    checkpoint: c.Checkpoint = None, trust_pickle: c.TrustPickle = False, model_arg: c.ModelArg = None,
    input_size: c.InputSize = None, input_channels: c.InputChannels = None, num_classes: c.NumClasses = None,
    seed: c.Seed = 0, compute_device: Annotated[str, typer.Option("--compute-device", help="Where pruning and fine-tuning run: cpu, cuda or auto.")] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in --out from its last finished stage.")] = False,
    overwrite: c.Overwrite = False, quiet: c.Quiet = False, config: c.Config = None,
):
    """One command from a trained model to a verified deployable artifact: latency-aware prune for the target on
    the runtime, fine-tune, export in the deployed precision, then measure the artifact itself against the
    parent's (speed) and run it on the test split (accuracy). Exit 0 when both bounds hold (and bundle.tar.gz is
    written), 1 when one fails (report written, no bundle), 2 for bad input."""
    if model is None or out_dir is None:
        raise UserError("--model and --out are required")
    speed: float | None = None
    if target_speedup is not None:
        if target_speedup.strip().lower() == "max":
            speed = float("inf")
        else:
            try:
                speed = float(target_speedup)
            except ValueError:
                raise UserError(f"--target-speedup takes a number or max, got {target_speedup!r}") from None
    dev = pick_device(compute_device)
    train = c.train_config(epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr, seed=seed,
                           dataset=data or "digits", device=dev)
    cfg = OptimizeConfig(speed, target_latency_ms, runtime, device, batch, precision, baseline_precision, max_accuracy_drop,
                         metric=metric, round_to=round_to, min_width_fraction=min_width_fraction, depth=depth, latency_rounds=latency_rounds,
                         latency_iterations=latency_iterations, speed_attempts=speed_attempts, max_probes=max_probes,
                         profile_rounds=profile_rounds, calib_size=calib_size, test_limit=None, allow_busy=allow_busy,
                         threads=threads, seed=seed, cache_dir=latency_cache, train=train, distill=distill)
    cfg.validate()
    from profilers.layer_latency import LayerLatency

    LayerLatency(runtime, device, batch, threads, None)  # refuses what the runtime cannot time
    replace = _check_out(out_dir, resume, overwrite, cfg)
    src = Source(model, checkpoint, False, trust_pickle, parse_model_args(model_arg), input_size, num_classes, seed,
                 input_channels=input_channels)
    ds = dataset_for(data, data_dir, train_size, test_size, download)
    lm = get_model(src, ds)
    if ds is None:
        ds = dataset_for(None, None, train_size, test_size, False, lm.record)
    else:
        ds = keep_holdout(ds, lm.record)
    if ds is None:
        raise UserError("optimize checks accuracy on a test split: pass --data")
    if not lm.record.classifier:
        raise UserError("optimize bounds top-1 accuracy and fine-tunes on labels; this model is not a classifier "
                        "(prune, export and profile it with the single commands)")
    cfg.train = c.train_config(epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr, seed=seed,
                               dataset=ds.spec.name, device=dev)  # the dataset's own augmentation
    if replace:
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out_dir / "optimize.json", {"settings": cfg.to_json(), "model": model})
    opt = Optimizer(lm, ds, cfg, out_dir, dev, c.reporter(quiet))
    try:
        doc = opt.run()
    except KeyboardInterrupt:
        interrupts.report(f"interrupted: finished stages are kept in {out_dir}; re-run the same command with --resume to continue")
        raise typer.Exit(130)
    if doc["passed"]:
        opt.bundle(doc)
    optimize_report.write(doc, out_dir)
    _summary(doc, out_dir)
    if not doc["passed"]:
        raise _gate_failed(doc["failed"], cfg.max_accuracy_drop, out_dir)


def _gate_failed(f: dict, max_drop: float, out_dir: Path) -> GateFailed:
    """The exit line of a run that shipped nothing: the bound that failed and by how much, or why."""
    detail = (f"accuracy drop {f['accuracy_drop']:.2f} points > {max_drop:g}"
              if f["bound"] == "accuracy" and f.get("accuracy_drop") is not None else
              f"speed short by {f['speed_shortfall']}" if f["bound"] == "speed" and f.get("speed_shortfall") is not None else
              (f.get("why") or f["bound"] or "no attempt finished"))
    return GateFailed(f"optimize: the {f['bound']} bound does not hold on the deployed artifact ({detail}); "
                      f"report in {out_dir / 'report.md'}, no bundle written")


def _check_out(out_dir: Path, resume: bool, overwrite: bool, cfg: OptimizeConfig) -> bool:
    """Whether an existing output is to be replaced (after the inputs are checked)."""
    if not out_dir.exists():
        if resume:
            raise UserError(f"--resume: {out_dir} does not exist")
        atomic.check_output_path(out_dir, False)
        return False
    if not out_dir.is_dir():
        raise UserError(f"output {out_dir} exists and is not a directory")
    if overwrite:
        return True
    if resume:
        try:
            before = json.loads((out_dir / "optimize.json").read_text())["settings"]
        except (OSError, ValueError, KeyError):
            raise UserError(f"--resume: {out_dir} is not an optimize run") from None
        now = {k: v for k, v in json.loads(json.dumps(cfg.to_json(), default=str)).items() if k != "train"}
        if {k: v for k, v in before.items() if k != "train"} != now:
            raise UserError(f"--resume: {out_dir} was started with other settings; give the same options, or --overwrite")
        return False
    raise UserError(f"output {out_dir} already exists (--resume to continue it, --overwrite to replace it)")


def _summary(doc: dict, out_dir: Path) -> None:
    for a in doc["attempts"]:
        m, acc = a.get("stages", {}).get("measure"), a.get("stages", {}).get("accuracy")
        if m is None:
            console.print(f"attempt {a['attempt']}: {a.get('failed')}: {a.get('why', '')}")
            continue
        sp = m["speedup"]
        console.print(f"attempt {a['attempt']} (pruned for {a['prune_target_speedup']}x): deployed artifact {sp['median']:.2f}x "
                      f"[{sp['ci_low']:.2f}, {sp['ci_high']:.2f}] (pruning {m['pruning_speedup']:.2f}x, precision "
                      f"{m['precision_speedup']:.2f}x), top-1 {acc['top1']:.2f} (drop {a['accuracy_drop']:.2f}): "
                      + ("pass" if a["passed"] else f"fail ({a['failed']})"))
        if m["precision_speedup"] < 0.95:
            console.print(f"note: the {doc['settings']['precision']} artifact ran {m['precision_speedup']:.2f}x the speed of the "
                          f"same child in {doc['settings']['baseline_precision']} on this runtime: it costs speed here")
    if doc["passed"]:
        b = doc.get("bundle")
        console.print(f"both bounds hold on the deployed artifact (attempt {doc['chosen']}); "
                      + (f"bundle {b['path']} (SHA-256 {b['sha256']}); " if b else "no bundle target for this runtime; ")
                      + f"report {out_dir / 'report.md'}")
