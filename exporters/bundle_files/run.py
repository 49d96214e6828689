#!/usr/bin/env python3
"""Classify images with the model in this bundle.

    python run.py IMAGE_OR_FOLDER [...] [--runtime onnxruntime|tensorrt] [--device cpu|cuda] [--top 3] [--json]

Needs only numpy, Pillow and the target runtime (see requirements.txt). Preprocessing is read from
manifest.json and is the same as during training: grey/RGB conversion, /255, fit to the model's size
(centred zero padding for a small enlargement, otherwise bilinear resizing), per-channel mean/std.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def manifest(root: Path = HERE) -> dict:
    return json.loads((root / "manifest.json").read_text())


def fit_size(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """x: float32 (C, h, w) in [0, 1] -> (C, height, width)."""
    from PIL import Image

    c, h, w = x.shape
    if (h, w) == (height, width):
        return x
    if height >= h and width >= w and height - h <= max(4, h // 4) and width - w <= max(4, w // 4):
        top, left = (height - h) // 2, (width - w) // 2
        out = np.zeros((c, height, width), dtype=np.float32)
        out[:, top:top + h, left:left + w] = x
        return out
    chans = [np.asarray(Image.fromarray(x[i], mode="F").resize((width, height), Image.BILINEAR), dtype=np.float32)
             for i in range(c)]
    return np.stack(chans)


def preprocess(path: Path, pre: dict) -> np.ndarray:
    from PIL import Image

    c, h, w = pre["shape"]
    with Image.open(path) as im:
        im = im.convert("L" if c == 1 else "RGB")
        arr = np.asarray(im, dtype=np.float32) / 255.0
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    if arr.shape[0] == 1 and c == 3:
        arr = np.repeat(arr, 3, axis=0)
    arr = fit_size(arr, h, w)
    mean = np.asarray(pre["mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(pre["std"], dtype=np.float32)[:, None, None]
    return ((arr - mean) / std).astype(np.float32)


class OnnxRuntimeModel:
    def __init__(self, path: Path, device: str = "cpu"):
        import onnxruntime as ort

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), providers=providers)
        self.name = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.name: x})[0].astype(np.float32)


class TensorRTModel:
    """Builds an engine for this GPU from the bundled ONNX on first use (engines are GPU-specific), then
    runs it with execute_async_v3 on device buffers allocated through cuda-python."""

    def __init__(self, onnx_path: Path, max_batch: int = 32):
        import tensorrt as trt
        from cuda.bindings import runtime as cudart

        self.trt, self.cudart = trt, cudart
        logger = trt.Logger(trt.Logger.WARNING)
        engine_path = onnx_path.with_suffix(f".trt{trt.__version__}.engine")
        if not engine_path.exists():
            builder = trt.Builder(logger)
            network = builder.create_network(0)
            parser = trt.OnnxParser(network, logger)
            if not parser.parse_from_file(str(onnx_path)):
                raise RuntimeError("TensorRT cannot parse the bundled ONNX")
            config = builder.create_builder_config()
            inp = network.get_input(0)
            shape = tuple(inp.shape[1:])
            profile = builder.create_optimization_profile()
            profile.set_shape(inp.name, (1, *shape), (max(1, max_batch // 4), *shape), (max_batch, *shape))
            config.add_optimization_profile(profile)
            plan = builder.build_serialized_network(network, config)
            if plan is None:
                raise RuntimeError("TensorRT failed to build an engine")
            engine_path.write_bytes(bytes(plan))
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(engine_path.read_bytes())
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inp = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.out = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)

    def _check(self, result):
        err = result[0] if isinstance(result, tuple) else result
        if int(err) != 0:
            raise RuntimeError(f"CUDA error {err}")
        return result[1] if isinstance(result, tuple) and len(result) > 1 else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        cudart = self.cudart
        x = np.ascontiguousarray(x, dtype=np.float32)
        self.context.set_input_shape(self.inp, x.shape)
        out = np.empty(tuple(self.context.get_tensor_shape(self.out)), dtype=np.float32)
        d_in = self._check(cudart.cudaMalloc(x.nbytes))
        d_out = self._check(cudart.cudaMalloc(out.nbytes))
        try:
            stream = self._check(cudart.cudaStreamCreate())
            self._check(cudart.cudaMemcpy(d_in, x.ctypes.data, x.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
            self.context.set_tensor_address(self.inp, int(d_in))
            self.context.set_tensor_address(self.out, int(d_out))
            if not self.context.execute_async_v3(int(stream)):
                raise RuntimeError("TensorRT execution failed")
            self._check(cudart.cudaStreamSynchronize(stream))
            self._check(cudart.cudaMemcpy(out.ctypes.data, d_out, out.nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost))
            cudart.cudaStreamDestroy(stream)
        finally:
            cudart.cudaFree(d_in)
            cudart.cudaFree(d_out)
        return out


def load(root: Path = HERE, runtime: str | None = None, device: str | None = None):
    m = manifest(root)
    runtime = runtime or m["runtime"]["name"]
    if runtime == "tensorrt":
        return TensorRTModel(root / m["model_file"])
    return OnnxRuntimeModel(root / m["model_file"], device or m["runtime"].get("device", "cpu"))


def images_in(paths: list[str]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.suffix.lower() in SUFFIXES)
        elif p.is_file():
            out.append(p)
        else:
            raise SystemExit(f"error: no such file or folder: {p}")
    return out


def classify(paths: list[Path], model, m: dict, top: int = 1, batch: int = 32) -> list[dict]:
    labels = m["labels"]
    results = []
    for i in range(0, len(paths), batch):
        chunk = paths[i:i + batch]
        logits = model(np.stack([preprocess(p, m["preprocessing"]) for p in chunk]))
        z = logits - logits.max(1, keepdims=True)
        prob = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        for p, pr in zip(chunk, prob):
            order = np.argsort(-pr)[:top]
            results.append({"file": str(p), "top": [{"label": labels[k], "index": int(k), "p": float(pr[k])} for k in order]})
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Classify images with the bundled model.")
    ap.add_argument("inputs", nargs="+", help="image files or folders")
    ap.add_argument("--runtime", choices=["onnxruntime", "tensorrt"], default=None)
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None)
    ap.add_argument("--top", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print JSON")
    a = ap.parse_args(argv)
    m = manifest()
    paths = images_in(a.inputs)
    if not paths:
        print("error: no images found", file=sys.stderr)
        return 2
    res = classify(paths, load(HERE, a.runtime, a.device), m, a.top)
    if a.json:
        print(json.dumps(res, indent=1))
    else:
        for r in res:
            print(r["file"] + "\t" + "  ".join(f"{t['label']} ({t['p']:.3f})" for t in r["top"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
