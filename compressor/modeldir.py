"""The model directory: `model.safetensors` + `model.json`, the unit every command reads and writes.

model.json records how to rebuild the architecture and every module whose shape pruning changed, so
loading never unpickles anything: build the architecture, reshape the changed modules, load tensors.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import platform
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import __version__, atomic, outputs, provenance
from .data import DataSpec, InputSpec
from .errors import UserError
from .models import ArchSpec, build

FORMAT = "compress-model/1"
WEIGHTS = "model.safetensors"
SPEC = "model.json"
CHECKPOINT_DIR = "checkpoints"
# Constructor-level attributes that pruning changes and forward() reads.
TRACKED_ATTRS = (
    "in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
    "normalized_shape", "num_heads", "head_dim", "attn_dim", "scale", "embed_dim",
)


@dataclass
class ModelRecord:
    arch: ArchSpec
    num_classes: int
    input: InputSpec
    labels: list[str]
    dataset: DataSpec | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    lineage: list[dict[str, Any]] = field(default_factory=list)
    changed_modules: dict[str, dict] = field(default_factory=dict)
    removed_blocks: list[str] = field(default_factory=list)
    weights: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] | None = None  # names, per-image shapes, classifier (absent in older records: a classifier)

    @property
    def classifier(self) -> bool:
        return self.outputs is None or bool(self.outputs.get("classifier", True))

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "arch": self.arch.to_json(),
            "num_classes": self.num_classes,
            "input": self.input.to_json(),
            "labels": self.labels,
            "dataset": None if self.dataset is None else self.dataset.to_json(),
            "metrics": self.metrics,
            "removed_blocks": self.removed_blocks,
            "changed_modules": self.changed_modules,
            "weights": self.weights,
            **({"outputs": self.outputs} if self.outputs is not None else {}),
            "lineage": self.lineage,
        }

    @classmethod
    def from_json(cls, d: dict, where: str = SPEC) -> "ModelRecord":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise UserError(f"{where} is not a compress model record (format {d.get('format') if isinstance(d, dict) else '?'})")
        check_schema(d, where)
        try:
            return cls(
                arch=ArchSpec.from_json(d["arch"]),
                num_classes=int(d["num_classes"]),
                input=InputSpec.from_json(d["input"]),
                labels=list(d.get("labels") or []),
                dataset=None if not d.get("dataset") else DataSpec.from_json(d["dataset"]),
                metrics=dict(d.get("metrics") or {}),
                lineage=list(d.get("lineage") or []),
                changed_modules=dict(d.get("changed_modules") or {}),
                removed_blocks=list(d.get("removed_blocks") or []),
                weights=dict(d.get("weights") or {}),
                outputs=d.get("outputs"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{where} is malformed: missing or bad field {e}") from None

    def child(self) -> "ModelRecord":
        """A copy for a derived model (metrics are re-measured, lineage extended)."""
        return ModelRecord(self.arch, self.num_classes, self.input, list(self.labels), self.dataset,
                           dict(self.metrics), [dict(e) for e in self.lineage], {}, list(self.removed_blocks), {},
                           None if self.outputs is None else dict(self.outputs))


def check_schema(d: dict, where: str) -> None:
    """model.json against model.schema.json: the first wrong field, by its path, in one line."""
    import jsonschema

    error = jsonschema.exceptions.best_match(_validator().iter_errors(d))
    if error is not None:
        field_path = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
        what = " ".join(error.message.split())
        raise UserError(f"{where}: field {field_path or '(top level)'}: {what[:160]}")


@functools.lru_cache(maxsize=1)
def _validator():
    import jsonschema

    return jsonschema.Draft202012Validator(json.loads(Path(__file__).with_name("model.schema.json").read_text()))


@dataclass
class LoadedModel:
    model: nn.Module
    record: ModelRecord
    path: Path | None = None


# ----------------------------------------------------------------------------- structure diff
def _module_tensors(m: nn.Module) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {k: v for k, v in m.named_parameters(recurse=False) if v is not None}
    out.update({k: v for k, v in m.named_buffers(recurse=False) if v is not None})
    return out


def _json_attr(v):
    return list(v) if isinstance(v, tuple) else v


def _derived(module: nn.Module, attr: str) -> bool:
    """A read-only property (timm's ConvNormAct.out_channels...): computed from the inner modules, which
    are recorded themselves, so it is neither recorded nor set."""
    prop = getattr(type(module), attr, None)
    return isinstance(prop, property) and prop.fset is None


def _plain(v) -> bool:
    return isinstance(v, (int, float, tuple, list)) and not isinstance(v, bool) and all(
        isinstance(x, (int, float)) for x in (v if isinstance(v, (tuple, list)) else [v]))


def structure_diff(model: nn.Module, reference: nn.Module) -> dict[str, dict]:
    """Modules of `model` whose tracked attributes or tensor shapes differ from `reference`."""
    ref = dict(reference.named_modules())
    changed = {}
    for name, m in model.named_modules():
        r = ref.get(name)
        if r is None:
            continue
        attrs = {}
        for a in TRACKED_ATTRS:
            if _derived(m, a):
                continue
            # Only constructor values: a module may hold a tensor under a tracked name (PoolFormer's
            # LayerScale `scale`), which is a parameter and recorded with the tensors.
            v, was = getattr(m, a, None), getattr(r, a, None)
            if _plain(v) and _plain(was) and v != was:
                attrs[a] = _json_attr(v)
        rt = _module_tensors(r)
        tensors = {k: list(v.shape) for k, v in _module_tensors(m).items() if k in rt and rt[k].shape != v.shape}
        if attrs or tensors:
            changed[name] = {"type": type(m).__name__, "attrs": attrs, "tensors": tensors}
    return changed


def remove_blocks(model: nn.Module, paths: list[str]) -> None:
    """Replace the named blocks with identities (a removed residual block computes nothing)."""
    for path in paths:
        parent_name, _, child = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            parent.get_submodule(child)
        except AttributeError:
            raise UserError(f"cannot remove block '{path}': no such module") from None
        setattr(parent, child, nn.Identity())


def apply_structure(model: nn.Module, changed: dict[str, dict]) -> None:
    """Reshape a freshly built model to the recorded pruned shapes (values are loaded afterwards)."""
    modules = dict(model.named_modules())
    for name, ch in changed.items():
        m = modules.get(name)
        if m is None:
            raise UserError(f"model.json names module '{name}', which the architecture does not have")
        if not isinstance(ch, dict) or not isinstance(ch.get("attrs", {}), dict) or not isinstance(ch.get("tensors", {}), dict):
            raise UserError(f"model.json: changed_modules['{name}'] must map attrs and tensors")
        for a, v in ch.get("attrs", {}).items():
            if a not in TRACKED_ATTRS:
                raise UserError(f"model.json sets unknown attribute '{a}' on {name}")
            if not isinstance(v, (int, float, list)) or isinstance(v, bool) or (isinstance(v, (int, float)) and v < 0):
                raise UserError(f"model.json sets {name}.{a} to {v!r}; expected a non-negative number or a list")
            if _derived(m, a):
                continue  # older records list these too; the inner modules carry the shape
            setattr(m, a, tuple(v) if isinstance(v, list) else v)
        own = _module_tensors(m)
        for t, shape in ch.get("tensors", {}).items():
            if t not in own:
                raise UserError(f"model.json reshapes '{name}.{t}', which does not exist")
            if not isinstance(shape, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in shape):
                raise UserError(f"model.json gives '{name}.{t}' the shape {shape!r}; shapes are lists of positive integers")
            new = torch.empty(*[int(s) for s in shape], dtype=own[t].dtype)
            if isinstance(own[t], nn.Parameter):
                setattr(m, t, nn.Parameter(new, requires_grad=own[t].requires_grad))
            else:
                m.register_buffer(t, new)


# ----------------------------------------------------------------------------- save / load
def run_info(stage: str, settings: dict, parent: str | None, metrics: dict, seed: int | None = None) -> dict:
    """One lineage entry: what made this model, from what, how, and what it measured."""
    import numpy
    import onnx
    import timm
    import torch_pruning

    return {
        "stage": stage,
        "parent": parent,
        "settings": settings,
        "metrics": metrics,
        "seed": seed,
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": provenance.command(),
        "versions": {
            "compress": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "torch_pruning": getattr(torch_pruning, "__version__", "?"),
            "onnx": onnx.__version__, "numpy": numpy.__version__,
        },
        "host": platform.node(),
    }


def write_model_files(directory: str | os.PathLike, model: nn.Module, record: ModelRecord) -> ModelRecord:
    """Write weights then model.json (last, so a complete model.json means a complete directory).

    Before model.json is written the model is rebuilt from the record and the weights file exactly as
    every later command will load it, and must compute what the in-memory model computes: a directory
    that cannot be read back is never finished."""
    from safetensors.torch import save_file

    broken = [n for n, t in model.named_parameters() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if broken:
        raise UserError(f"refusing to write a model with non-finite weights (NaN or inf in {broken[0]})")
    if record.outputs is not None:  # a pruned head would change what the model returns: never written
        spec = record.input
        changed = outputs.changed_shapes(record.outputs, outputs.probe(model, spec.channels, spec.height, spec.width))
        if changed:
            raise UserError(f"refusing to write a model whose {changed}: keep that head with `ignore_layers`")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fresh = build(record.arch, record.num_classes)
    remove_blocks(fresh, record.removed_blocks)
    try:  # the one guard around recording a pruned graph: an architecture we cannot record is refused
        record.changed_modules = structure_diff(model, fresh)
    except Exception as e:
        raise UserError(f"cannot record the pruned structure of {type(model).__name__} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160] if str(e) else ''}); nothing written") from None
    del fresh
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    with atomic.temp_path_for(directory / WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT})
        digest, size = atomic.sha256_file(tmp), tmp.stat().st_size
        record.weights = {"file": WEIGHTS, "sha256": digest, "bytes": size,
                          "dtype": str(next(iter(state.values())).dtype).replace("torch.", "")}
        verify_reload(model, record, tmp)
    atomic.write_json(directory / SPEC, record.to_json())
    return record


def verify_reload(model: nn.Module, record: ModelRecord, weights: Path) -> None:
    """Rebuild from the JSON form of `record` and `weights`; refuse unless it computes what `model` does."""
    rec = ModelRecord.from_json(json.loads(json.dumps(record.to_json(), default=atomic.json_default)))
    try:
        again = rebuild(rec, weights, None)
    except UserError as e:
        raise UserError(f"refusing to write a model directory that would not load again: {e}") from None
    except Exception as e:  # a module whose shape cannot be restored from the record
        raise UserError(f"refusing to write a model directory that would not load again: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160] if str(e) else ''}") from None
    spec = record.input
    device = next(iter(model.parameters()), torch.empty(0)).device
    x = torch.randn(2, spec.channels, spec.height, spec.width, generator=torch.Generator().manual_seed(0)).to(device)
    was_training = model.training
    with torch.no_grad():
        wants = [t.float().cpu() for t in outputs.flatten(model.eval()(x))]
        gots = [t.float().cpu() for t in outputs.flatten(again.to(device)(x))]
    model.train(was_training)
    for want, got in zip(wants, gots, strict=False):
        if len(wants) != len(gots) or want.shape != got.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5, equal_nan=True):
            diff = (got - want).abs().max().item() if want.shape == got.shape else float("nan")
            raise UserError(f"refusing to write a model directory that would not load again: the reloaded "
                            f"{type(model).__name__} differs from the pruned one (max |diff| {diff:.3g})")


def save_model_dir(path: str | os.PathLike, model: nn.Module, record: ModelRecord) -> ModelRecord:
    """Write a complete model directory at `path` atomically (replacing any previous one)."""
    with atomic.staged_dir(path) as tmp:
        rec = write_model_files(tmp, model, record)
    return rec


def read_record(path: str | os.PathLike) -> ModelRecord:
    path = Path(path)
    spec = path / SPEC
    if not path.is_dir():
        raise UserError(f"{path} is not a directory")
    if not spec.is_file():
        if (path / CHECKPOINT_DIR).is_dir():
            raise UserError(f"{path} is an unfinished fine-tuning run (no model.json yet); continue it with `resume`")
        raise UserError(f"{path} is not a model directory (no model.json)")
    try:
        d = json.loads(spec.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{spec} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except OSError as e:
        raise UserError(f"cannot read {spec}: {e.strerror}") from None
    return ModelRecord.from_json(d, str(spec))


def load_weights_file(path: Path, expected_sha: str | None = None) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(f"missing weights file {path}")
    if expected_sha is not None:
        got = atomic.sha256_file(path)
        if got != expected_sha:
            raise UserError(f"{path} does not match the SHA-256 recorded in model.json (modified or truncated)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} is not a readable safetensors file: {str(e).splitlines()[0][:160]}") from None


def load_model_dir(path: str | os.PathLike) -> LoadedModel:
    path = Path(path)
    record = read_record(path)
    return LoadedModel(rebuild(record, path / WEIGHTS, record.weights.get("sha256")), record, path)


def rebuild(record: ModelRecord, weights: Path, expected_sha: str | None) -> nn.Module:
    """The architecture from the record, reshaped as recorded, with the weights file loaded."""
    model = build(record.arch, record.num_classes)
    remove_blocks(model, record.removed_blocks)
    apply_structure(model, record.changed_modules)
    state = load_weights_file(weights, expected_sha)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise UserError(f"{weights} does not fit the architecture in model.json: {what}")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise UserError(
                f"{weights} disagrees with model.json: {k} has shape {tuple(state[k].shape)}, "
                f"model.json implies {tuple(v.shape)}"
            )
    # Modules that version their state-dict layout (torchvision's MNASNet) read it from the metadata,
    # which safetensors does not keep: it is the layout of the architecture just built.
    state = OrderedDict(state)
    state._metadata = getattr(own, "_metadata", None)  # type: ignore[attr-defined]
    model.load_state_dict(state, strict=True)
    model.eval()
    return model


def is_model_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / SPEC).exists() or (p / CHECKPOINT_DIR).exists())
