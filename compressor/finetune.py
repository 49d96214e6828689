"""Training and fine-tuning: the seeds' optimisers and schedules, resumable per-epoch checkpoints.

Batches, augmentation and dropout of epoch e depend only on (seed, e), so resuming from the checkpoint
of epoch e-1 reproduces an uninterrupted run exactly on CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import atomic, distributed
from .data import Batches, ImageSet, InputSpec
from .data.augment import AUGMENTATIONS
from .errors import UserError
from .evaluate import evaluate
from .progress import QUIET, Reporter

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "step", "cosine")
CHECKPOINT = "checkpoints/last.pt"


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 1e-4  # the metric-comparison study: Adam, lr 1e-4, weight decay 1e-3
    weight_decay: float = 1e-3
    decay_on: str = "all"  # "all" parameters, or "conv" kernels only (do Nascimento et al.'s release)
    momentum: float = 0.9
    nesterov: bool = False
    schedule: str = "constant"
    milestones: tuple[int, ...] = ()  # epochs where step decay divides lr by 1/gamma; default: thirds
    gamma: float = 0.1
    augment: tuple[str, ...] = ("crop", "flip")
    bn_l1: float = 0.0  # network slimming: L1 penalty on BatchNorm scales
    distill: bool = False
    distill_temperature: float = 4.0
    distill_weight: float = 0.5
    amp: bool = False  # bf16 autocast (CUDA)
    channels_last: bool = False
    compile: bool = False
    seed: int = 0
    loader: str = "tensor"  # "tensor" (in-memory fast path) or "dataloader" (per-image)
    workers: int = 2
    eval_batch: int = 256

    def validate(self) -> None:
        if self.epochs < 0:
            raise UserError("`epochs` must be >= 0")
        if self.batch_size < 1:
            raise UserError("`batch_size` must be >= 1")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"`optimizer` must be one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"`lr_schedule` must be one of {', '.join(SCHEDULES)}")
        if not (self.lr > 0) or math.isinf(self.lr):
            raise UserError("`lr` must be a positive number")
        if self.decay_on not in ("all", "conv"):
            raise UserError("`decay_on` must be all or conv")
        if self.weight_decay < 0 or self.bn_l1 < 0:
            raise UserError("`weight_decay` and `bn_l1` must be >= 0")
        bad = [a for a in self.augment if a not in AUGMENTATIONS]
        if bad:
            raise UserError(f"unknown augmentation {bad[0]} (choose from {', '.join(AUGMENTATIONS)}, or none)")
        if self.loader not in ("tensor", "dataloader"):
            raise UserError("`loader` must be tensor or dataloader")
        if not (0 <= self.distill_weight <= 1) or self.distill_temperature <= 0:
            raise UserError("`distill_weight` must be in [0, 1] and `distill_temperature` > 0")

    def to_json(self) -> dict:
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        d["augment"] = list(self.augment)
        return d

    def fingerprint(self) -> str:
        """Settings that must not change across a resume (epochs may be extended)."""
        d = self.to_json()
        for k in ("epochs", "workers", "eval_batch", "compile"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    wall_s: float = 0.0
    resumed_from: int = 0
    ranks_identical: bool | None = None  # data parallel: all processes ended with the same weights
    learned_nothing: str | None = None  # why the run looks collapsed (compressor.workflows.finetune), else None


def default_augment(dataset: str) -> tuple[str, ...]:
    """Crop + flip as the seeds do, except digits (a flipped 2 is not a 2) and fake data."""
    return {"digits": ("crop",), "fake": ()}.get(dataset, ("crop", "flip"))


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    params: list = [p for p in model.parameters() if p.requires_grad]
    if cfg.decay_on == "conv":  # weight decay on conv kernels only; biases, norms and linear layers without
        convs = {id(m.weight) for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)}
        params = [{"params": [p for p in params if id(p) in convs]},
                  {"params": [p for p in params if id(p) not in convs], "weight_decay": 0.0}]
    fused: dict = {"fused": True} if device.type == "cuda" else {}
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                           weight_decay=cfg.weight_decay, **fused)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig):
    """Per-epoch schedule: constant, step decay (Lajić et al.: 1e-3 -> 1e-4 -> 1e-5 at thirds), or cosine."""
    if cfg.schedule == "step":
        ms = list(cfg.milestones) or [max(1, round(cfg.epochs / 3)), max(2, round(2 * cfg.epochs / 3))]
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=sorted(set(ms)), gamma=cfg.gamma)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)


def _bn_l1(model: nn.Module) -> torch.Tensor:
    terms = [m.weight.abs().sum() for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def _distill_loss(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True,
                    reduction="batchmean") * (t * t)


def _save_checkpoint(path: Path, epoch: int, model, opt, sched, history, fingerprint: str) -> None:
    state = {"epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(), "history": json.dumps(history), "fingerprint": fingerprint}
    with atomic.temp_path_for(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # our own file, still never full unpickling
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path}: {str(e).splitlines()[0][:160]}") from None


def train(model: nn.Module, train_set: ImageSet, test_set: ImageSet | None, spec: InputSpec, cfg: TrainConfig, *,
          device: str | torch.device = "cpu", run_dir: Path | None = None, resume: bool = False,
          teacher: nn.Module | None = None, reporter: Reporter = QUIET, label: str = "train") -> TrainResult:
    """Train `model` in place for cfg.epochs; checkpoints go to run_dir/checkpoints/last.pt. Inside a
    torch.distributed process group (compressor.distributed) it trains data-parallel: every process a
    slice of each global batch of cfg.batch_size, gradients averaged, process 0 writing checkpoints."""
    cfg.validate()
    world = distributed.current()
    if world.size > 1 and (cfg.batch_size % world.size or len(train_set) < cfg.batch_size):
        raise UserError(f"`batch_size` {cfg.batch_size} must be a multiple of the {world.size} processes and at most "
                        f"the {len(train_set)} training images")
    device = torch.device(device)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg, device)
    sched = make_scheduler(opt, cfg)
    result = TrainResult()
    start = 0
    ckpt_path = None if run_dir is None else Path(run_dir) / CHECKPOINT
    if resume and ckpt_path is not None and ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path)
        if ck.get("fingerprint") != cfg.fingerprint():
            raise UserError(f"{ckpt_path} was written with different settings; resume with the same flags or use `overwrite`")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        result.history = json.loads(ck["history"])
        start = result.resumed_from = int(ck["epoch"])
        reporter.log(f"resuming {label} after epoch {start}")
    if teacher is not None:
        teacher.to(device).eval()
    step_model: Any = model
    if world.size > 1:  # broadcasts process 0's weights and buffers, then averages gradients every step
        step_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    step_model = torch.compile(step_model) if cfg.compile else step_model
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.amp and device.type == "cuda" else contextlib.nullcontext()
    t_all = time.perf_counter()
    with reporter.task(label, max(cfg.epochs - start, 0)) as advance_epoch:
        for epoch in range(start, cfg.epochs):
            torch.manual_seed(cfg.seed * 1_000_003 + epoch)  # dropout and any other global draws
            batches = Batches(train_set, spec, cfg.batch_size, shuffle=True, augment_ops=cfg.augment, seed=cfg.seed,
                              epoch=epoch, device=device, drop_last=len(train_set) > cfg.batch_size or world.size > 1,
                              workers=cfg.workers if cfg.loader == "dataloader" else 0,
                              channels_last=cfg.channels_last, shard=(world.rank, world.size))
            if cfg.loader == "dataloader" and train_set.images is not None:
                batches.force_loader()  # the per-image path, for comparison
            model.train()
            t0 = time.perf_counter()
            seen, loss_sum, correct = 0, 0.0, 0
            with reporter.task(f"epoch {epoch + 1}/{cfg.epochs}", len(batches)) as advance:
                for x, y in batches:
                    with amp:
                        out = step_model(x)
                        loss = F.cross_entropy(out.float(), y)
                        if teacher is not None:
                            with torch.no_grad():
                                t_out = teacher(x)
                            kd = _distill_loss(out.float(), t_out.float(), cfg.distill_temperature)
                            loss = (1 - cfg.distill_weight) * loss + cfg.distill_weight * kd
                    if cfg.bn_l1:
                        loss = loss + cfg.bn_l1 * _bn_l1(model)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    # The mean over the processes: every one takes the same decision below.
                    loss_value = world.sum([loss.item()], device)[0] / world.size
                    if not math.isfinite(loss_value):
                        raise UserError(f"training diverged at epoch {epoch + 1} (loss {loss_value}); lower `lr`")
                    seen += y.numel()
                    loss_sum += loss_value * y.numel()
                    correct += int((out.argmax(1) == y).sum())
                    advance(info=f"loss {loss_sum / seen:.3f}")
            if device.type == "cuda":
                torch.cuda.synchronize()
            train_s = time.perf_counter() - t0
            if world.size > 1:
                seen_f, loss_f, correct_f = world.sum([seen, loss_sum, correct], device)
                seen, loss_sum, correct = int(seen_f), loss_f, int(correct_f)
            lr = opt.param_groups[0]["lr"]
            sched.step()
            row = {"epoch": epoch + 1, "lr": lr, "train_loss": round(loss_sum / max(seen, 1), 5),
                   "train_top1": round(100.0 * correct / max(seen, 1), 3), "train_s": round(train_s, 3),
                   "images_per_s": round(seen / train_s, 1) if train_s > 0 else None,
                   "data_wait_share": round(batches.wait_s / train_s, 4) if train_s > 0 else None}
            if world.size > 1:  # BatchNorm statistics ran on each process's slice: keep process 0's, as DDP does
                world.broadcast_buffers(model)
            if test_set is not None:
                ev = evaluate(model, test_set, spec, cfg.eval_batch, device)
                row.update({"top1": ev["top1"], "top5": ev["top5"], "test_loss": ev["loss"]})
            bad = [n for n, t in model.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
            if bad or not math.isfinite(row.get("test_loss", 0.0)):
                what = f"non-finite weights in {bad[0]}" if bad else f"test loss {row['test_loss']}"
                raise UserError(f"training diverged at epoch {epoch + 1} ({what}); lower `lr`; nothing written")
            result.history.append(row)
            if ckpt_path is not None and world.main:
                _save_checkpoint(ckpt_path, epoch + 1, model, opt, sched, result.history, cfg.fingerprint())
            world.barrier()  # nobody runs ahead of a checkpoint it might resume from
            advance_epoch(info=f"top1 {row.get('top1', '-')}  {row['images_per_s']} img/s  data wait {100 * row['data_wait_share']:.0f}%")
    result.wall_s = time.perf_counter() - t_all
    if world.size > 1:
        result.ranks_identical = _same_everywhere(model, world, device)
        if not result.ranks_identical:
            raise UserError("the processes' weights differ after training (a data-parallel bug); nothing written")
    model.eval()
    return result


def learned_nothing(history: list[dict], num_classes: int) -> str | None:
    """Why the last epoch shows a network that learned nothing, or None. The signature of a collapsed network:
    its training loss still at ln(C), a uniform guess, and its held-out top-1 at chance."""
    if not history or num_classes < 2 or "top1" not in history[-1]:
        return None
    last, uniform, chance = history[-1], math.log(num_classes), 100.0 / num_classes
    # 2 % of ln(C) and 2 points: a network that learned anything at all is far below both.
    if last["train_loss"] >= 0.98 * uniform and last["top1"] <= chance + 2.0:
        return (f"after epoch {last['epoch']} the training loss is {last['train_loss']:.3f} (a uniform guess over "
                f"{num_classes} classes scores ln {num_classes} = {uniform:.3f}) and held-out top-1 {last['top1']:.1f} % "
                f"(chance {chance:.1f} %)")
    return None


def _same_everywhere(model: nn.Module, world, device) -> bool:
    """Every process holds the same weights and buffers (the sum of squared differences from process 0's is 0)."""
    import torch.distributed as dist

    flat = torch.cat([t.detach().double().flatten() for t in model.state_dict().values() if t.is_floating_point()])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    return world.sum([float((flat - ref).pow(2).sum())], device)[0] == 0.0
