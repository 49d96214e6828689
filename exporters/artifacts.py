"""Exported artifacts as a deployment runs them: the file for a runtime and precision, and its accuracy
computed in that runtime (not in PyTorch), so a promise is checked on what ships."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from compressor.data import Batches, Dataset
from compressor.errors import UserError
from compressor.modeldir import LoadedModel

from .model_export import FORMATS

# runtime -> (export format, artifact name under its directory); torch runs the model directory itself
RUNTIME_FORMAT = {"onnxruntime": ("onnx", "model.onnx"), "openvino": ("openvino", "ir"), "tensorrt": ("tensorrt", "model.engine")}
# runtime and device -> the bundle target that ships the artifact
BUNDLE_TARGET = {("onnxruntime", "cpu"): "onnxruntime-cpu", ("onnxruntime", "cuda"): "onnxruntime-cuda",
                 ("openvino", "cpu"): "openvino-cpu", ("tensorrt", "cuda"): "tensorrt"}


def write(lm: LoadedModel, runtime: str, precision: str, directory: Path) -> Path:
    """Export `lm` for `runtime` in `precision` into `directory` (checked against PyTorch); returns the artifact."""
    if runtime == "torch":
        if precision != "fp32":
            raise UserError("the torch runtime deploys the model directory in fp32; use onnxruntime, openvino or tensorrt for fp16/int8")
        assert lm.path is not None
        return lm.path
    fmt, name = RUNTIME_FORMAT[runtime]
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / name
    FORMATS[fmt].write(lm, out, precision)
    return out


def _predictor(path: Path, runtime: str) -> Callable[[np.ndarray], np.ndarray]:
    if runtime == "openvino":
        from .openvino_export import XML, compile_model, infer

        compiled = compile_model(path / XML, "cpu", "f32")
        return lambda x: infer(compiled, x)[0]
    if runtime == "tensorrt":
        from .tensorrt_export import load_engine, run_engine

        engine = load_engine(path)
        return lambda x: run_engine(engine, x)
    if runtime == "torch":
        import torch

        from compressor.modeldir import load_model_dir

        model = load_model_dir(path).model.eval()

        def run(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return model(torch.from_numpy(x)).float().numpy()
        return run
    from .onnx_export import ort_session, run_ort

    session = ort_session(path)
    return lambda x: run_ort(session, x)[0]


def top1(path: Path, runtime: str, lm: LoadedModel, ds: Dataset, limit: int | None = None, batch: int = 64) -> dict:
    """Top-1 (percent) of the artifact at `path`, run in `runtime`, on the test split (its first `limit` images)."""
    import torch

    if not lm.record.classifier:
        raise UserError("accuracy needs a classifier; this model's outputs are not class logits")
    test = ds.test if limit is None else ds.test.subset(torch.arange(min(limit, len(ds.test))))
    predict = _predictor(path, runtime)
    right = total = 0
    for x, y in Batches(test, lm.record.input, batch):
        pred = np.asarray(predict(x.numpy())).argmax(1)
        right += int((pred == y.numpy()).sum())
        total += len(y)
    return {"top1": round(100.0 * right / max(total, 1), 3), "images": total, "split": "test", "runtime": runtime}
