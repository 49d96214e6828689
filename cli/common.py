"""Options shared by several commands, declared once."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Optional

import typer

from compressor.data import DATASETS
from compressor.errors import UserError
from compressor.finetune import TrainConfig, default_augment
from compressor.progress import Reporter

MODEL_HELP = ("Model directory, or a name: resnet20/32/44/56/110, vgg16_bn_cifar, vit_cifar, any torchvision or timm model "
              "(torchvision:NAME / timm:NAME to pick a library), or your own code as package.module:factory (imported "
              "as `python -m` would, the working directory first on the path, and called with --model-arg; "
              "this runs that code)")
Model = Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP + ".")]
Checkpoint = Annotated[Optional[Path], typer.Option(help="Weights for a model name: .safetensors, or a state dict loaded with torch.load(weights_only=True).")]
Pretrained = Annotated[bool, typer.Option("--pretrained", help="Library weights for a model name (downloads; needs a network).")]
TrustPickle = Annotated[bool, typer.Option("--trust-pickle", help="Allow full unpickling of --checkpoint. Runs code from the file: only for files you trust.")]
ModelArg = Annotated[Optional[list[str]], typer.Option("--model-arg", help="Constructor (or factory) argument for a model name, key=value (repeatable, values as JSON where they parse), e.g. width=8.")]
InputSize = Annotated[Optional[int], typer.Option(help="Input height/width for a model name (default: the architecture's; 224 for your own factory unless it carries a timm pretrained_cfg).")]
InputChannels = Annotated[Optional[int], typer.Option(help="Input channels of your own factory's model (default 3).")]
NumClasses = Annotated[Optional[int], typer.Option(help="Classes for a model name built without data (default: the dataset's); passed to your own factory as num_classes where it takes that argument.")]
IgnoreLayers = Annotated[Optional[list[str]], typer.Option("--ignore-layers", help="Glob on module names kept untouched (repeatable; torch-pruning's ignored_layers), e.g. 'head.*' for a detection or segmentation head. Layers that produce the model's outputs are kept anyway.")]
Data = Annotated[Optional[str], typer.Option("--data", "-d", help=f"Dataset: {', '.join(DATASETS)}, or none. Default: the dataset the model was trained on.")]
DataDir = Annotated[Optional[str], typer.Option(help="Dataset directory (Fashion-MNIST IDX files, CIFAR torchvision layout, ImageFolder).")]
TrainSize = Annotated[Optional[int], typer.Option(help="Use a class-balanced subset of this many training images.")]
TestSize = Annotated[Optional[int], typer.Option(help="Use a class-balanced subset of this many test images.")]
Download = Annotated[bool, typer.Option("--download", help="Download CIFAR where you are online.")]
CalibSize = Annotated[int, typer.Option(help="Class-balanced calibration images from the training split (taylor, kl, greedy).")]
Seed = Annotated[int, typer.Option(help="Seed for splits, random choices and training.")]
Device = Annotated[str, typer.Option(help="cpu, cuda or auto.")]
KlDirection = Annotated[str, typer.Option(help="kl: child-parent, KL(pruned || parent) as Luo & Wu's and do Nascimento et al.'s code; or parent-child.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]

Epochs = Annotated[int, typer.Option(help="Training epochs.")]
BatchSize = Annotated[int, typer.Option(help="Training batch size.")]
Optimizer = Annotated[str, typer.Option(help="adam (the metric-comparison study) or sgd (Lajić et al.; do Nascimento et al.).")]
Lr = Annotated[Optional[float], typer.Option(help="Learning rate (default 1e-4 for adam, 1e-3 for sgd).")]
WeightDecay = Annotated[float, typer.Option(help="Weight decay.")]
DecayOn = Annotated[str, typer.Option(help="Weight decay on all parameters, or conv kernels only (do Nascimento et al.'s release; its Keras l2(1e-4) equals --weight-decay 2e-4 --decay-on conv).")]
Momentum = Annotated[float, typer.Option(help="SGD momentum.")]
Nesterov = Annotated[bool, typer.Option("--nesterov", help="Nesterov momentum (SGD).")]
Schedule = Annotated[str, typer.Option("--lr-schedule", help="constant, step (lr/10 at the milestones) or cosine.")]
Milestones = Annotated[Optional[str], typer.Option(help="Epochs where step decay divides the lr by 10, e.g. 100,150 (default: thirds).")]
Augment = Annotated[Optional[str], typer.Option(help="Comma list of crop, flip, rotate, or none (default: crop,flip; crop for digits).")]
BnL1 = Annotated[float, typer.Option("--bn-l1", help="L1 penalty on BatchNorm scales (network slimming) while training.")]
Distill = Annotated[bool, typer.Option("--distill", help="Distil from the input model (the parent) while fine-tuning.")]
DistillT = Annotated[float, typer.Option(help="Distillation temperature.")]
DistillW = Annotated[float, typer.Option(help="Weight of the distillation loss (0-1).")]
Amp = Annotated[bool, typer.Option("--amp/--no-amp", help="bf16 autocast (CUDA only).")]
ChannelsLast = Annotated[Optional[bool], typer.Option("--channels-last/--no-channels-last", help="channels-last convolutions (default on CUDA).")]
Compile = Annotated[bool, typer.Option("--compile", help="torch.compile the training step.")]
Loader = Annotated[str, typer.Option(help="tensor (in-memory, batched augmentation) or dataloader (per image).")]
Workers = Annotated[int, typer.Option(help="DataLoader workers (dataloader path and image folders).")]


def load_config(ctx: typer.Context, param, value: Path | None) -> Path | None:
    """--config FILE: a TOML recipe whose keys are this command's long option names (`sparsity`, `out`,
    `lr-schedule`); the command's table ([compare], [prune], [prune.auto]...) when present, else the top level.
    Options given on the command line win. Click's default_map does the mapping (no parser of our own)."""
    if value is None:
        return None
    try:
        data = tomllib.loads(Path(value).read_text())
    except OSError as e:
        raise UserError(f"--config {value}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"--config {value} is not valid TOML ({e})") from None
    path: list[str] = []
    c = ctx
    while c.parent is not None:  # e.g. ["prune", "layers"] for `compress prune layers`: table [prune.layers]
        path.insert(0, c.info_name or "")
        c = c.parent  # type: ignore[assignment]  # Typer's Context and its vendored click's are one class at runtime
    node: dict = data
    for part in path:
        sub_table = node.get(part)
        node = sub_table if isinstance(sub_table, dict) else (data if node is data else {})
    section = {k: v for k, v in node.items() if not isinstance(v, dict)}
    where = f"--config {value}" + (f" [{'.'.join(path)}]" if node is not data else "")
    ctx.default_map = {**(ctx.default_map or {}), **config_defaults(ctx.command, section, where)}
    return value


def config_defaults(command, section: dict, where: str) -> dict:
    """Map recipe keys onto a command's parameters (refusing unknown keys); lists become comma lists."""
    by_key = {}
    for p in command.params:
        by_key[p.name] = p
        by_key.update({o[2:]: p for o in getattr(p, "opts", []) if o.startswith("--")})
    out = {}
    for key, v in section.items():
        p = by_key.get(key)
        if p is None or p.name == "config" or getattr(p, "param_type_name", "") != "option":
            raise UserError(f"{where}: '{key}' is not an option of this command")
        out[p.name] = v if p.multiple or not isinstance(v, list) else ",".join(map(str, v))
    return out


Config = Annotated[Optional[Path], typer.Option("--config", help="TOML recipe: option names as keys (e.g. configs/*.toml); flags given here win.",
                                                is_eager=True, callback=load_config)]


def csv_list(text: str | None, kind=str, what: str = "list") -> list:
    if text is None:
        return []
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(kind(part))
        except ValueError:
            raise UserError(f"bad value {part!r} in {what}") from None
    return out


TRAIN = TrainConfig()  # the one set of training defaults: finetune, compare and prune auto start from it


def train_config(*, dataset: str, device, epochs=TRAIN.epochs, batch_size=TRAIN.batch_size, optimizer=TRAIN.optimizer,
                 lr=None, weight_decay=TRAIN.weight_decay, decay_on=TRAIN.decay_on, momentum=TRAIN.momentum, nesterov=TRAIN.nesterov,
                 schedule=TRAIN.schedule, milestones=None, augment=None, bn_l1=TRAIN.bn_l1,
                 distill_temperature=TRAIN.distill_temperature, distill_weight=TRAIN.distill_weight, amp=True,
                 channels_last=None, compile=TRAIN.compile, loader=TRAIN.loader, workers=TRAIN.workers,
                 seed=TRAIN.seed) -> TrainConfig:
    """A TrainConfig from command options; what a command does not expose keeps the shared default.
    amp and channels_last mean "where CUDA is used"."""
    if optimizer not in ("adam", "sgd"):
        raise UserError("--optimizer must be adam or sgd")
    if augment is None:
        ops = default_augment(dataset)
    elif augment.strip().lower() == "none":
        ops = ()
    else:
        ops = tuple(csv_list(augment, str, "--augment"))
    cuda = str(device) == "cuda"
    cfg = TrainConfig(
        epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr if lr is not None else (1e-4 if optimizer == "adam" else 1e-3),
        weight_decay=weight_decay, decay_on=decay_on, momentum=momentum, nesterov=nesterov, schedule=schedule,
        milestones=tuple(csv_list(milestones, int, "--milestones")), augment=ops, bn_l1=bn_l1,
        distill_temperature=distill_temperature, distill_weight=distill_weight, amp=amp and cuda,
        channels_last=cuda if channels_last is None else channels_last, compile=compile, seed=seed, loader=loader,
        workers=workers,
    )
    cfg.validate()
    return cfg


def reporter(quiet: bool) -> Reporter:
    return Reporter(enabled=False) if quiet else Reporter()
