"""The Python API: compress inside your own training script, for any nn.Module your code builds.

    from orchestration import api

    base = api.wrap(model, "mynets.models:build", example_inputs=torch.randn(1, 3, 32, 32), kwargs={"width": 16})
    child = api.prune(base, sparsity=0.5)                        # or target_speedup=2.0 (measured)
    train(child.model)                                           # your own loop
    api.save(child, "runs/pruned", stage="finetune", metrics={"top1": 91.2})
    again = api.load("runs/pruned")                              # rebuilt from the factory, no pickles
    api.export(again, "runs/pruned.onnx")                        # checked against PyTorch on every output
    doc = api.profile(["runs/pruned"], baseline="runs/base")     # the profile document (compress-profile/1)

Everything here is what the commands run; the functions are typed and keep their names across releases.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from compressor.data import InputSpec
from compressor.errors import UserError
from compressor.flops import count
from compressor.modeldir import LoadedModel, ModelRecord, load_model_dir, run_info, save_model_dir
from compressor.models import ArchSpec, user_code
from compressor.pruning import WidthConfig, check_runs, validate
from compressor.workflows import dataset_for, pick_device, width_prune

__all__ = ["LoadedModel", "wrap", "load", "save", "prune", "export", "profile"]


def wrap(model: nn.Module, factory: str, *, example_inputs: torch.Tensor, kwargs: dict[str, Any] | None = None,
         mean: Sequence[float] | None = None, std: Sequence[float] | None = None, labels: Sequence[str] | None = None,
         num_classes: int | None = None) -> LoadedModel:
    """Your model in memory with what its directory records: `factory(**kwargs)` rebuilds its architecture
    (package.module:function, importable where it will be loaded), `example_inputs` give the input shape."""
    user_code.split(factory)
    if not isinstance(model, nn.Module):
        raise UserError(f"wrap() takes a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_inputs, torch.Tensor) or example_inputs.dim() != 4:
        raise UserError("example_inputs must be one image batch tensor, N x C x H x W")
    user_code.trust(factory)  # named in the caller's own code
    c, h, w = (int(v) for v in example_inputs.shape[1:])
    spec = InputSpec(c, h, w, tuple(mean or (0.5,) * c), tuple(std or (0.25,) * c))
    outs = check_runs(model, spec, "as given")
    first = outs["shapes"][0]  # a multi-task head's first output is often its class logits
    classes = int(first[0]) if outs["classifier"] or (num_classes is None and len(first) == 1 and first[0] > 1) else (num_classes or 1)
    arch = ArchSpec(user_code.SOURCE, factory, dict(kwargs or {}), user_code.fingerprint(factory))
    rec = ModelRecord(arch, classes, spec, list(labels or [str(i) for i in range(classes)]), None, outputs=outs)
    rec.metrics = {k: v for k, v in count(model, (c, h, w)).items() if k in ("params", "macs")}
    rec.lineage.append(run_info("create", {"model": factory, "origin": "python api"}, None, {}, None))
    return LoadedModel(model.eval(), rec, None)


def load(path: str | Path, *, strict: bool = False) -> LoadedModel:
    """A model directory (any of ours), rebuilt and reshaped from model.json; `strict` refuses a factory
    module that changed since the directory was written (otherwise a warning)."""
    user_code.set_strict(strict)
    try:
        return load_model_dir(path)
    finally:
        user_code.set_strict(False)


def save(lm: LoadedModel, path: str | Path, *, stage: str | None = None, metrics: dict[str, Any] | None = None,
         settings: dict[str, Any] | None = None, overwrite: bool = False) -> ModelRecord:
    """Write `lm` as a model directory (atomically; reloaded and compared before it is finished). `stage`
    adds a lineage entry (e.g. "finetune" after your own training loop) with your `metrics`."""
    from compressor import atomic

    atomic.check_output_path(Path(path), overwrite, kind="dir")
    rec = lm.record.child()
    rec.lineage = [dict(e) for e in lm.record.lineage]
    measured = {k: v for k, v in count(lm.model, (rec.input.channels, rec.input.height, rec.input.width)).items()
                if k in ("params", "macs")}
    rec.metrics = {**lm.record.metrics, **measured, **(metrics or {})}
    if stage is not None:
        rec.lineage.append(run_info(stage, dict(settings or {}), None if lm.path is None else str(lm.path),
                                    {**measured, **(metrics or {})}, None))
    return save_model_dir(path, lm.model, rec)


def prune(lm: LoadedModel, *, sparsity: float | None = None, target_speedup: float | None = None, metric: str = "l2",
          ignore_layers: Sequence[str] = (), round_to: int | None = None, loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
          data: str | None = None, data_dir: str | None = None, calib_size: int = 256, backend: str = "onnxruntime",
          batch: int = 1, seed: int = 0, device: str = "cpu") -> LoadedModel:
    """A pruned copy: `sparsity` (a fraction of every layer's channels / heads / FFN neurons), or
    `target_speedup` measured on `backend` at `batch` (latency-aware). Layers that produce the outputs and
    those matching `ignore_layers` keep their widths. `loss_fn(outputs, targets)` lets `taylor` rank a model
    that is not a classifier; `data` names the calibration data set (as --data) for metrics that need it."""
    if (sparsity is None) == (target_speedup is None):
        raise UserError("give one of sparsity or target_speedup")
    cfg = WidthConfig(metric=metric, sparsity=0.5 if sparsity is None else sparsity, round_to=round_to, seed=seed,
                      ignore_layers=tuple(ignore_layers), loss=loss_fn)
    validate(cfg)
    dev = pick_device(device)
    ds = dataset_for(data, data_dir, None, None, False, None,
                     fake_shape=(lm.record.input.channels, lm.record.input.height, lm.record.input.width),
                     fake_classes=max(2, lm.record.num_classes)) if data else None
    if target_speedup is None:
        model, rec, _ = width_prune(lm, ds, cfg, calib_size, dev)
    else:
        from profilers.layer_latency import default_cache_dir

        from .latency_prune import LatencyTarget, latency_prune

        target = LatencyTarget(speedup=target_speedup, backend=backend, batch=batch, cache_dir=default_cache_dir())
        model, rec, _ = latency_prune(lm, ds, cfg, target, calib_size, dev)
    return LoadedModel(model.cpu().eval(), rec, None)


def export(lm: LoadedModel | str | Path, out: str | Path, *, format: str = "onnx", precision: str = "fp32",
           data: str | None = None) -> dict[str, Any]:
    """Export to ONNX / OpenVINO IR / TensorRT, checked against PyTorch on every output; returns the sidecar."""
    from exporters.model_export import FORMATS

    if format not in FORMATS:
        raise UserError(f"format must be one of {', '.join(FORMATS)}")
    model = load(lm) if isinstance(lm, (str, Path)) else lm
    return FORMATS[format].write(model, Path(out), precision, data)


def profile(targets: Sequence[str | Path], *, baseline: str | Path | None = None, backends: Sequence[str] = ("onnxruntime",),
            batch_sizes: Sequence[int] = (1,), rounds: int = 5, threads: int | None = None, energy: bool = False) -> dict[str, Any]:
    """Interleaved latency (and memory, energy where a counter exists) of model directories or exported
    files against `baseline`; returns the profile document (schema compress-profile/1)."""
    from profilers.session import Settings, run
    from profilers.targets import resolve

    s = Settings(backends=tuple(backends), batch_sizes=tuple(batch_sizes), rounds=rounds, threads=threads, energy=energy)
    s.validate()
    found = [t for p in targets for t in resolve(str(p))]
    base = resolve(str(baseline))[0] if baseline is not None else None
    return run(found, base, s).to_json()
