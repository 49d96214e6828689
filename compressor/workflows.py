"""The steps every command shares: get a model, prune it, fine-tune it, record what happened.

Each returns the model and its new ModelRecord (metrics measured, lineage extended); callers decide
where the directory goes.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from . import distributed
from .flops import count

from .data import DataSpec, Dataset, InputSpec, load_dataset
from .errors import UserError
from .evaluate import evaluate
from .finetune import TrainConfig, TrainResult, learned_nothing, train
from .layers import choose_blocks, removable, score_blocks
from .modeldir import LoadedModel, ModelRecord, load_model_dir, remove_blocks, run_info
from .models import ArchSpec, build, clone, default_input, pretrained_normalisation, resolve, user_code
from .progress import QUIET, Reporter
from .pruning import WidthConfig, check_runs, prune_width


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("`device` cuda: no CUDA device is available here (torch.cuda.is_available() is False)")
    if name not in ("cpu", "cuda"):
        raise UserError("`device` must be cpu, cuda or auto")
    return torch.device(name)


def load_state_file(path: Path, trust_pickle: bool) -> dict:
    """User weights: safetensors, or a state dict via torch.load(weights_only=True); full unpickling only
    with --trust-pickle (it runs code from the file)."""
    import pickle

    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from .modeldir import load_weights_file

        return load_weights_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        blocked = next((ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln), None)
        if blocked is None:
            raise UserError(f"cannot read checkpoint {path}: not a torch checkpoint") from None
        what = blocked.split("GLOBAL", 1)[-1].split(" was not", 1)[0].strip()
        raise UserError(f"{path} holds Python objects ({what}), not just tensors; refused without `trust_pickle` "
                        "(which executes code from the file)") from None
    except Exception as e:  # a corrupt file can fail anywhere inside the reader
        first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise UserError(f"cannot read checkpoint {path}: {first}") from None
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "net"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} is not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_into(model: nn.Module, state: dict, path: Path) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if missing or extra:
        raise UserError(f"{path} does not match the architecture: "
                        + (f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"))
    bad = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if bad:
        k = bad[0]
        raise UserError(f"{path}: {k} has shape {tuple(state[k].shape)}, the model expects {tuple(own[k].shape)} "
                        "(different number of classes or a pruned model? pruned models load from their directory)")
    model.load_state_dict(state)


@dataclass
class Source:
    """Where a command's input model comes from."""

    model: str
    checkpoint: Path | None = None
    pretrained: bool = False
    trust_pickle: bool = False
    model_args: dict | None = None
    input_size: int | None = None
    num_classes: int | None = None
    seed: int = 0  # fixes the random initialisation of a model built by name
    input_channels: int | None = None  # the user's own factory: channels of its input (default 3)


def parse_model_args(items: list[str] | None) -> dict:
    import json

    out = {}
    for it in items or []:
        k, sep, v = it.partition("=")
        if not sep or not k:
            raise UserError(f"`model_arg` expects key=value, got {it!r}")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def get_model(src: Source, ds: Dataset | None) -> LoadedModel:
    """A model directory as saved, or a fresh/pretrained/checkpointed architecture by name."""
    p = Path(src.model)
    if p.exists():
        if src.checkpoint or src.pretrained or src.model_args or src.input_size or src.input_channels:
            raise UserError("`checkpoint`/`pretrained`/`model_arg`/`input_size`/`input_channels` apply to a model name, "
                            "not a model directory")
        lm = load_model_dir(p)
        if ds is not None:
            check_feedable(ds, lm.record.input, lm.record.num_classes, str(p), lm.record.classifier)
        return lm
    if "/" in src.model or src.model.startswith("."):
        raise UserError(f"model directory {src.model} does not exist")
    source, name = resolve(src.model)
    kwargs = dict(src.model_args or {})
    if src.input_size is not None and src.input_size < 8:
        raise UserError("`input_size` must be at least 8")
    if src.input_channels is not None and not 1 <= src.input_channels <= 64:
        raise UserError("`input_channels` must be between 1 and 64")
    if source == user_code.SOURCE:
        return _user_model(src, name, kwargs, ds)
    if src.input_channels is not None:
        raise UserError("`input_channels` is for your own factory (package.module:function); library models take "
                        "`model_arg` in_chans=N where they support it")
    if src.input_size is not None:
        if source == "timm" or (source == "compress" and name == "vit_cifar"):
            kwargs["img_size"] = src.input_size  # dropped below for the models that take any size
    classes = src.num_classes or (ds.num_classes if ds is not None else (10 if source == "compress" else 1000))
    if ds is not None and classes != ds.num_classes:
        raise UserError(f"`num_classes` {classes} but dataset {ds.spec.name} has {ds.num_classes} classes")
    if name == "vgg16_bn_cifar" and src.input_size is not None and src.input_size % 32:
        raise UserError("vgg16_bn_cifar has five 2x2 poolings: `input_size` must be a multiple of 32")
    arch = ArchSpec(source, name, kwargs)
    torch.manual_seed(src.seed)
    try:
        model = build(arch, classes, pretrained=src.pretrained)
    except UserError as e:
        # ViTs, Swin and LeViT fix their input size in the constructor; timm's CNNs take any size and
        # refuse the argument, so the size is then only the input spec's.
        if "img_size" not in kwargs or "img_size" not in str(e) or "img_size" in (src.model_args or {}):
            raise
        kwargs.pop("img_size")
        arch = ArchSpec(source, name, kwargs)
        torch.manual_seed(src.seed)
        model = build(arch, classes, pretrained=src.pretrained)
    c, h, w = default_input(arch, model)
    if src.input_size is not None:
        h = w = src.input_size
    if src.pretrained:
        mean, std = pretrained_normalisation(arch, model)
        spec = InputSpec(c, h, w, tuple(mean), tuple(std))
    elif ds is not None:
        spec = ds.input_spec(c, h, w)
    else:
        spec = InputSpec(c, h, w, (0.5,) * c, (0.25,) * c)
    if src.checkpoint is not None:
        load_into(model, load_state_file(src.checkpoint, src.trust_pickle), src.checkpoint)
    outs = check_runs(model, spec, "as built")
    if ds is not None:
        check_feedable(ds, spec, classes, src.model)
    return _created(src, model, arch, classes, spec, ds, outs)


def _created(src: Source, model: nn.Module, arch: ArchSpec, classes: int, spec: InputSpec, ds: Dataset | None,
             outs: dict) -> LoadedModel:
    labels = ds.classes if ds is not None and outs["classifier"] else [str(i) for i in range(classes)]
    rec = ModelRecord(arch, classes, spec, labels, ds.spec if ds is not None else None, outputs=outs)
    origin = "pretrained" if src.pretrained else ("checkpoint" if src.checkpoint else "random init")
    rec.lineage.append(run_info("create", {"model": src.model, "origin": origin,
                                           "checkpoint": str(src.checkpoint) if src.checkpoint else None},
                                None, {}, None))
    model.eval()
    return LoadedModel(model, rec, None)


def _user_model(src: Source, name: str, kwargs: dict, ds: Dataset | None) -> LoadedModel:
    """`--model package.module:factory`: the user's own code, named on this command line."""
    if src.pretrained:
        raise UserError("`pretrained` loads a library's weights; for your own model give `checkpoint`")
    fn = user_code.factory(name)
    classes_given = src.num_classes or (ds.num_classes if ds is not None else None)
    if "num_classes" not in kwargs and classes_given and user_code.accepts(fn, "num_classes"):
        kwargs["num_classes"] = classes_given  # recorded, so a reload calls the factory the same way
    arch = ArchSpec(user_code.SOURCE, name, kwargs, user_code.fingerprint(name))
    torch.manual_seed(src.seed)
    model = build(arch, 0, named_by_user=True)
    c = src.input_channels or 3
    cfg_size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")  # a timm backbone inside says
    h = w = src.input_size or (int(cfg_size[-1]) if cfg_size else 224)
    spec = ds.input_spec(c, h, w) if ds is not None else InputSpec(c, h, w, (0.5,) * c, (0.25,) * c)
    if src.checkpoint is not None:
        load_into(model, load_state_file(src.checkpoint, src.trust_pickle), src.checkpoint)
    outs = check_runs(model, spec, "as built")
    if outs["classifier"]:
        classes = int(outs["shapes"][0][0])
        if src.num_classes is not None and src.num_classes != classes:
            raise UserError(f"`num_classes` {src.num_classes} but {name} returns {classes} logits")
    else:
        classes = classes_given or 1
    if ds is not None:
        check_feedable(ds, spec, classes, name, outs["classifier"])
    return _created(src, model, arch, classes, spec, ds, outs)


def check_feedable(ds: Dataset, spec: InputSpec, classes: int, what: str, classifier: bool = True) -> None:
    """The data must fit the model: same classes (a classifier), and channels we can map (grey->N, RGB->grey)."""
    if classifier and ds.num_classes != classes:
        raise UserError(f"{what} has {classes} classes but dataset {ds.spec.name} has {ds.num_classes}")
    if ds.channels != spec.channels and ds.channels != 1 and not (ds.channels == 3 and spec.channels == 1):
        raise UserError(f"{ds.spec.name} has {ds.channels}-channel images; {what} takes {spec.channels} channels")


def dataset_for(name: str | None, data_dir: str | None, train_size, test_size, download: bool,
                record: ModelRecord | None = None, fake_shape=None, fake_classes: int = 10,
                holdout: float | None = None) -> Dataset | None:
    """--data if given, else the dataset the model was trained on (if known). `holdout` None: the
    model's recorded held-out share (its held-out images stay out of every descendant's training)."""
    if name is None or name == "none":
        if name is None and record is not None and record.dataset is not None:
            spec = record.dataset  # the model's own data; sizes given now replace the recorded ones
            return load_dataset(DataSpec(spec.name, spec.data_dir, spec.train_size if train_size is None else train_size,
                                         spec.test_size if test_size is None else test_size,
                                         holdout=spec.holdout if holdout is None else holdout),
                                fake_shape=fake_shape, fake_classes=fake_classes)
        return None
    return load_dataset(DataSpec(name, data_dir, train_size, test_size, download, holdout or 0.0), fake_shape=fake_shape,
                        fake_classes=fake_classes)


def keep_holdout(ds: Dataset | None, record: ModelRecord) -> Dataset | None:
    """The same data named again with --data: keep the images the model's lineage holds out."""
    rec = record.dataset
    if ds is None or rec is None or not rec.holdout or ds.spec.holdout or (ds.spec.name, ds.spec.data_dir) != (rec.name, rec.data_dir):
        return ds
    return load_dataset(dataclasses.replace(ds.spec, holdout=rec.holdout))


def trained_on(record: ModelRecord, spec: DataSpec) -> bool:
    """Whether the model's lineage trained on this dataset's whole training split (no held-out share)."""
    for e in record.lineage:
        data = (e.get("settings") or {}).get("data") or {}
        if e.get("stage") in ("train", "finetune") and data.get("name") == spec.name and not data.get("holdout"):
            return True
    return False


def measure(model: nn.Module, spec: InputSpec, ds: Dataset | None, device, classifier: bool = True) -> dict:
    stats = count(model, (spec.channels, spec.height, spec.width), device)
    out = {"params": stats["params"], "macs": stats["macs"], "flops_all": stats["flops_all"]}
    if ds is not None and not classifier:
        out["eval_note"] = "no accuracy: the model is not a classifier (its outputs are not batch x classes logits)"
    elif ds is not None:
        ev = evaluate(model, ds.test, spec, 256, device)
        out.update({"top1": ev["top1"], "top5": ev["top5"], "eval_split": "test", "eval_images": ev["n"],
                    "eval_dataset": ds.spec.name})
    return out


@dataclass
class PruneResult:
    """What a prune step did: for the command to print, the lineage to record, compare to tabulate."""

    before: dict  # params, MACs (and top-1/top-5 with data) of the input model
    after: dict
    prune_s: float = 0.0
    layers: dict[str, list[int]] = field(default_factory=dict)  # module -> [before, after] width
    heads: dict[str, list[int]] = field(default_factory=dict)
    left_alone: dict[str, str] = field(default_factory=dict)  # group root -> why torch-pruning cannot remove it
    calib_images: int | None = None
    requested_sparsity: float | None = None
    achieved_sparsity: float | None = None
    short_of_request: bool = False  # much less pruned than asked
    removed_blocks: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)  # block -> score (layer pruning)
    latency: dict | None = None  # latency-aware pruning: the measured proof
    slower: bool = False  # latency-aware: the child measured slower than its parent


SHORT_OF_REQUEST = 0.5  # achieved below half the requested share of units is "much less pruned than asked"


def width_prune(lm: LoadedModel, ds: Dataset | None, cfg: WidthConfig, calib_size: int, device,
                reporter: Reporter = QUIET, settings: dict | None = None) -> tuple[nn.Module, ModelRecord, PruneResult]:
    spec = lm.record.input
    model = clone(lm.model).to(device).eval()
    before = measure(model, spec, ds, device, lm.record.classifier)
    calib = ds.calibration(calib_size, cfg.seed) if ds is not None else None
    t0 = time.perf_counter()
    report = prune_width(model, spec, cfg, calib, device, reporter, original=lm.model)
    prune_s = time.perf_counter() - t0
    after = measure(model, spec, ds, device, lm.record.classifier)
    rec = lm.record.child()
    rec.metrics = after
    # with per-layer ratios, what was asked is the share their plan removes
    asked = (sum(g["planned_removal"] for g in report.groups) / report.units if cfg.layer_sparsity and report.units
             else cfg.sparsity)
    res = PruneResult(before, after, round(prune_s, 2), report.layers, report.heads, report.left_alone,
                      None if calib is None else len(calib), round(asked, 4), round(report.achieved, 4),
                      # much less pruned than asked (left-alone groups, rounding, tiny layers): said loudly and recorded
                      asked > 0 and report.achieved < SHORT_OF_REQUEST * asked)
    rec.lineage.append(run_info("prune", {**(settings or {}), **cfg.to_json(), "structure": "width",
                                          "calib_size": res.calib_images},
                                None if lm.path is None else str(lm.path),
                                {"before": before, "after": after, "prune_s": res.prune_s,
                                 "left_alone": report.left_alone, "requested_sparsity": res.requested_sparsity,
                                 "achieved_sparsity": res.achieved_sparsity,
                                 "short_of_request": res.short_of_request}, cfg.seed))
    return model, rec, res


def layer_prune(lm: LoadedModel, ds: Dataset | None, metric: str, num_blocks: int | None, min_per_stage: int,
                calib_size: int, seed: int, device, reporter: Reporter = QUIET,
                settings: dict | None = None, kl_direction: str = "child-parent") -> tuple[nn.Module, ModelRecord, PruneResult]:
    """Remove the `num_blocks` lowest-scored removable blocks at once (None = all removable)."""
    spec = lm.record.input
    model = clone(lm.model).to(device).eval()
    before = measure(model, spec, ds, device, lm.record.classifier)
    blocks = removable(model, min_per_stage)
    if not blocks:
        raise UserError(f"no block can be removed while keeping {min_per_stage} per stage")
    if num_blocks is not None and num_blocks < 1:
        raise UserError("`num_blocks` must be >= 1")
    calib = ds.calibration(calib_size, seed) if ds is not None else None
    scores = score_blocks(model, blocks, metric, calib, spec, 128, device, seed, reporter, kl_direction)
    n = len(choose_blocks(model, scores, len(blocks), min_per_stage)) if num_blocks is None else num_blocks
    chosen = choose_blocks(model, scores, n, min_per_stage)
    if len(chosen) < n:
        raise UserError(f"only {len(chosen)} blocks can be removed while keeping {min_per_stage} per stage (asked {n})")
    remove_blocks(model, chosen)
    after = measure(model, spec, ds, device, lm.record.classifier)
    rec = lm.record.child()
    rec.removed_blocks = list(lm.record.removed_blocks) + chosen
    rec.metrics = after
    res = PruneResult(before, after, removed_blocks=chosen, scores=scores)
    rec.lineage.append(run_info("prune", {**(settings or {}), "structure": "layers", "metric": metric,
                                          "num_blocks": n, "min_blocks_per_stage": min_per_stage, "removed": chosen,
                                          "kl_direction": kl_direction},
                                None if lm.path is None else str(lm.path), {"before": before, "after": after}, seed))
    return model, rec, res


def finetune(lm: LoadedModel, ds: Dataset, cfg: TrainConfig, run_dir: Path | None, resume: bool, device,
             distill: bool = False, reporter: Reporter = QUIET, settings: dict | None = None,
             stage: str | None = None, teacher: nn.Module | None = None,
             refuse_collapse: bool = True) -> tuple[nn.Module, ModelRecord, TrainResult]:
    """`distill`: from `teacher` where given (optimize: the unpruned parent), else from the input model.
    A fine-tune that learned nothing (training loss still a uniform guess's, top-1 at chance) is refused, or with
    refuse_collapse=False (a comparison grid, where a dead cell is a result) recorded in result.learned_nothing,
    as it is for a network trained from scratch."""
    if not lm.record.classifier:
        raise UserError("fine-tuning trains on class labels and this model is not a classifier (it returns "
                        f"{', '.join(lm.record.outputs['names'] if lm.record.outputs else [])}); fine-tune it in your own "
                        "training loop (README: Your own model) and save it with the Python API")
    spec = lm.record.input
    model = clone(lm.model)
    teacher = (clone(teacher) if teacher is not None else clone(lm.model)) if distill else None
    result = train(model, ds.train, ds.test, spec, cfg, device=device, run_dir=run_dir, resume=resume,
                   teacher=teacher, reporter=reporter, label="fine-tune" if lm.path else "train")
    why = None if ds.spec.name == "fake" else learned_nothing(result.history, lm.record.num_classes)  # fake labels are noise
    result.learned_nothing = why
    # A fresh network at chance after a short run is undertrained (the caller says so); a trained one there has collapsed.
    if why and refuse_collapse and lm.path is not None:
        raise UserError(f"fine-tuning learned nothing: {why}; nothing written. Check the input model's own top-1 "
                        "(`compress info`); more `epochs` or another `lr` may train it")
    rec = lm.record.child()
    if rec.dataset is None:
        rec.dataset = ds.spec
    rec.metrics = measure(model, spec, ds, device)
    last = result.history[-1] if result.history else {}
    world = distributed.current()
    if world.size > 1:
        settings = {**(settings or {}), "data_parallel": {"processes": world.size, "backend": distributed.backend(),
                                                          "ranks_identical": result.ranks_identical}}
    rec.lineage.append(run_info(stage or ("finetune" if lm.path else "train"),
                                {**(settings or {}), **cfg.to_json(), "distill": distill, "data": ds.spec.to_json()},
                                None if lm.path is None else str(lm.path),
                                {**rec.metrics, "wall_s": round(result.wall_s, 2), "epochs_run": len(result.history),
                                 "images_per_s": last.get("images_per_s"), "data_wait_share": last.get("data_wait_share")},
                                cfg.seed))
    return model, rec, result
