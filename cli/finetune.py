"""compress finetune."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from compressor import atomic, distributed, provenance
from compressor.data import DataSpec, load_dataset
from compressor.errors import UserError
from compressor.modeldir import CHECKPOINT_DIR, SPEC, write_model_files
from compressor.workflows import (Source, check_feedable, dataset_for, finetune as run_finetune, get_model, keep_holdout,
                                  parse_model_args, pick_device)

from . import common as c, interrupts
from .output import before_after, out


def _prepare_out(out_dir: Path, resume: bool, overwrite: bool) -> bool:
    """Decide what to do with an existing output directory; returns whether a checkpoint will be resumed."""
    if not out_dir.exists():
        return False
    if not out_dir.is_dir():
        raise UserError(f"output {out_dir} exists and is not a directory")
    finished = (out_dir / SPEC).is_file()
    unfinished = (out_dir / CHECKPOINT_DIR).is_dir()
    if overwrite:
        return False
    if resume and finished:
        raise UserError(f"{out_dir} already holds a finished model; pass --overwrite to train again")
    if resume and unfinished:
        return True
    if unfinished:
        raise UserError(f"{out_dir} holds an unfinished run: --resume to continue it or --overwrite to start over")
    if any(out_dir.iterdir()):
        raise UserError(f"output {out_dir} already exists (pass --overwrite to replace it)")
    return False


def finetune(
    directory: Annotated[Optional[Path], typer.Argument(help="Model directory to fine-tune (omit and use --model NAME to train a baseline from scratch).")] = None,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output model directory (also holds per-epoch checkpoints).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model name to train from scratch (or a model directory).")] = None,
    data: c.Data = None,
    data_dir: c.DataDir = None,
    train_size: c.TrainSize = None,
    test_size: c.TestSize = None,
    download: c.Download = False,
    epochs: c.Epochs = c.TRAIN.epochs,
    batch_size: c.BatchSize = c.TRAIN.batch_size,
    optimizer: c.Optimizer = c.TRAIN.optimizer,
    lr: c.Lr = None,
    weight_decay: c.WeightDecay = c.TRAIN.weight_decay,
    decay_on: c.DecayOn = c.TRAIN.decay_on,
    momentum: c.Momentum = c.TRAIN.momentum,
    nesterov: c.Nesterov = c.TRAIN.nesterov,
    lr_schedule: c.Schedule = c.TRAIN.schedule,
    milestones: c.Milestones = None,
    augment: c.Augment = None,
    bn_l1: c.BnL1 = c.TRAIN.bn_l1,
    distill: c.Distill = False,
    distill_temperature: c.DistillT = c.TRAIN.distill_temperature,
    distill_weight: c.DistillW = c.TRAIN.distill_weight,
    amp: c.Amp = True,
    channels_last: c.ChannelsLast = None,
    compile: c.Compile = c.TRAIN.compile,
    loader: c.Loader = c.TRAIN.loader,
    workers: c.Workers = c.TRAIN.workers,
    checkpoint: c.Checkpoint = None,
    pretrained: c.Pretrained = False,
    trust_pickle: c.TrustPickle = False,
    model_arg: c.ModelArg = None,
    input_size: c.InputSize = None,
    input_channels: c.InputChannels = None,
    num_classes: c.NumClasses = None,
    seed: c.Seed = 0,
    device: c.Device = "auto",
    holdout: Annotated[Optional[float], typer.Option(help="Keep this share of the training split out of training (class-balanced, the same images every run), recorded in model.json: descendants never train on it, and prune auto's CKA and --min-accuracy use it as unseen data. Default: the model's recorded share, else none.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its last complete epoch.")] = False,
    nproc: Annotated[int, typer.Option(help="Data-parallel processes on this machine (PyTorch DDP through torchrun: NCCL on GPUs, one GPU each; gloo on CPUs, the cores shared). --batch-size stays the global batch. Under torchrun, leave it at 1.")] = 1,
    overwrite: c.Overwrite = False,
    quiet: c.Quiet = False,
    config: c.Config = None,
):
    """Fine-tune a model directory (or train a model name from scratch), checkpointing every epoch."""
    if out_dir is None:
        raise UserError("--out is required")
    _launch_if_asked(nproc, batch_size, out_dir, resume, overwrite)
    if (directory is None) == (model is None):
        raise UserError("give either a model DIRECTORY or --model NAME, not both or neither")
    if distill and directory is None and model is not None and not Path(model).exists():
        raise UserError("--distill needs a trained parent (a model directory)")
    resuming = _prepare_out(out_dir, resume, overwrite)  # reads the disk only: every process decides the same
    atomic.check_output_path(out_dir, True)
    world, dev = distributed.init(pick_device(device))
    if not world.main:
        quiet = True
    src = Source(str(directory or model), checkpoint, pretrained, trust_pickle, parse_model_args(model_arg), input_size, num_classes, seed,
                 input_channels=input_channels)
    ds = dataset_for(data, data_dir, train_size, test_size, download, holdout=holdout)
    lm = get_model(src, ds)
    if ds is None:
        ds = (dataset_for(None, None, train_size, test_size, False, lm.record, holdout=holdout)
              or load_dataset(DataSpec("digits", None, train_size, test_size, holdout=holdout or 0.0)))
        check_feedable(ds, lm.record.input, lm.record.num_classes, str(directory or model))
    elif holdout is None:
        ds = keep_holdout(ds, lm.record)
    assert ds is not None  # named, recorded, or digits
    cfg = c.train_config(epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr, weight_decay=weight_decay,
                         decay_on=decay_on, momentum=momentum, nesterov=nesterov, schedule=lr_schedule, milestones=milestones, augment=augment,
                         bn_l1=bn_l1, distill_temperature=distill_temperature, distill_weight=distill_weight, amp=amp,
                         channels_last=channels_last, compile=compile, loader=loader, workers=workers, seed=seed,
                         dataset=ds.spec.name, device=dev)
    created = _make_out(out_dir, overwrite, world)
    from compressor.workflows import measure

    before = measure(lm.model, lm.record.input, ds, dev) if directory is not None else None
    model_out, rec, result = _train(lm, ds, cfg, out_dir, resuming, dev, distill, quiet, created, world.main,
                                    str(directory or model))
    if not world.main:
        distributed.finish()
        return
    atomic.write_json(out_dir / "history.json", result.history)
    write_model_files(out_dir, model_out, rec)
    _print_history(result.history)
    if before is not None:
        out.print(before_after("fine-tuning", before, rec.metrics))
    if result.learned_nothing:  # from scratch only: a fine-tune that learned nothing was refused
        out.print(f"warning: training has learned nothing yet: {result.learned_nothing}; train for more epochs")
    last = result.history[-1] if result.history else {}
    out.print(f"{len(result.history)} epochs, {result.wall_s:.1f} s this run"
              + (f" (resumed after epoch {result.resumed_from})" if result.resumed_from else "")
              + (f"; {last.get('images_per_s')} images/s, {100 * (last.get('data_wait_share') or 0):.1f}% of the time waiting for data" if last else "")
              + (f"; {world.size} processes (DDP)" if world.size > 1 else "")
              + f"; wrote {out_dir}")
    distributed.finish()


def _train(lm, ds, cfg, out_dir: Path, resuming: bool, dev, distill: bool, quiet: bool, created: bool, main: bool, source: str):
    """The training run, and what an interruption or a failure leaves behind."""
    try:
        return run_finetune(lm, ds, cfg, out_dir, resuming, dev, distill, c.reporter(quiet), {"model": source})
    except KeyboardInterrupt:
        interrupts.report(f"interrupted: completed epochs are checkpointed in {out_dir / CHECKPOINT_DIR}; "
                          f"re-run the same command with --resume to continue")
        raise typer.Exit(130)
    except UserError:
        if created and main:  # a run that failed (diverged, bad data) leaves nothing worth resuming
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    except OSError:  # a full disk: keep a complete checkpoint to --resume from, else leave nothing
        if created and main and not (out_dir / CHECKPOINT_DIR / "last.pt").is_file():
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _launch_if_asked(nproc: int, batch_size: int, out_dir: Path, resume: bool, overwrite: bool) -> None:
    """--nproc N > 1: refuse what every process would refuse, then run this command as N processes."""
    if nproc < 1:
        raise UserError("--nproc must be >= 1")
    if nproc == 1:
        return
    if distributed.launched():
        raise UserError("--nproc starts its own processes; under torchrun leave it out")
    if batch_size % nproc:
        raise UserError(f"--batch-size {batch_size} must be a multiple of --nproc {nproc} (it is the global batch)")
    _prepare_out(out_dir, resume, overwrite)
    atomic.check_output_path(out_dir, True)
    raise typer.Exit(distributed.launch(_without_nproc(shlex.split(provenance.command())[1:]), nproc))


def _make_out(out_dir: Path, overwrite: bool, world) -> bool:
    """Process 0 (re)creates the output directory while the others wait; whether it was created now."""
    created = not out_dir.exists()
    if world.main:
        if overwrite and out_dir.exists():
            shutil.rmtree(out_dir)
            created = True
        out_dir.mkdir(parents=True, exist_ok=True)
    world.barrier()
    return created


def _without_nproc(args: list[str]) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _print_history(history: list[dict]) -> None:
    if not history:
        return
    t = Table(title="epochs", title_justify="left")
    for col in ("epoch", "lr", "train loss", "top-1", "top-5", "img/s", "data wait"):
        t.add_column(col, justify="right")
    for r in history:
        t.add_row(str(r["epoch"]), f"{r['lr']:.2g}", f"{r['train_loss']:.4f}", f"{r.get('top1', 0):.2f}",
                  f"{r.get('top5', 0):.2f}", f"{r['images_per_s']}", f"{100 * (r['data_wait_share'] or 0):.1f}%")
    out.print(t)
