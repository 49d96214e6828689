#!/usr/bin/env python3
"""Classify images with the model in this bundle.

    python run.py IMAGE_OR_FOLDER [...] [--runtime onnxruntime|tensorrt|openvino] [--device cpu|cuda] [--top 3] [--json]

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
        got = self.session.get_providers()[0]
        if got != providers[0]:  # ONNX Runtime falls back to the CPU silently when CUDA libraries do not load
            raise RuntimeError(f"ONNX Runtime fell back to {got}: install onnxruntime-gpu (not onnxruntime) with "
                               "matching CUDA/cuDNN, or pass --device cpu")
        self.name = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        return [o.astype(np.float32) for o in self.session.run(None, {self.name: x})]


class OpenVINOModel:
    """The bundled OpenVINO IR, computed in f32 as it was checked (OpenVINO's CPU plugin would otherwise
    pick bf16 on CPUs that have it)."""

    def __init__(self, xml_path: Path, device: str = "cpu", precision: str = "f32"):
        import openvino as ov

        self.compiled = ov.Core().compile_model(str(xml_path), device.upper(), {"INFERENCE_PRECISION_HINT": precision})
        self.request = self.compiled.create_infer_request()

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        runs = [self.request.infer({0: x[i:i + 64]}) for i in range(0, len(x), 64)]
        return [np.concatenate([np.array(r[out]) for r in runs]).astype(np.float32) for out in self.compiled.outputs]


def _cudart():
    """cuda-python's runtime API: `cuda.bindings` from 12.6.1 on, `cuda.cudart` before (JetPack 6.0)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart
    return cudart


def engine_cache_dir() -> Path:
    """Engines are built per GPU and TensorRT version, outside the (possibly read-only, shared) bundle."""
    import os

    base = os.environ.get("COMPRESS_ENGINE_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                                   os.path.expanduser("~/.cache"), "compress-engines")
    return Path(base)


class TensorRTModel:
    """Builds an engine for this GPU from the bundled ONNX on first use (engines are GPU-specific), then
    runs it with execute_async_v3 on device buffers allocated through cuda-python."""

    def __init__(self, onnx_path: Path, max_batch: int = 32):
        import hashlib
        import os
        import re

        import tensorrt as trt

        self.trt, self.cudart, self.max_batch = trt, _cudart(), max_batch
        logger = trt.Logger(trt.Logger.WARNING)
        props = self._check(self.cudart.cudaGetDeviceProperties(0))
        gpu = re.sub(r"[^A-Za-z0-9]+", "-", props.name.decode() if isinstance(props.name, bytes) else str(props.name))
        model = hashlib.sha256(onnx_path.read_bytes()).hexdigest()[:16]
        engine_path = engine_cache_dir() / f"{model}-trt{trt.__version__}-{gpu}-sm{props.major}{props.minor}-b{max_batch}.engine"
        if not engine_path.exists():
            builder = trt.Builder(logger)
            network = builder.create_network(0)
            parser = trt.OnnxParser(network, logger)
            if not parser.parse_from_file(str(onnx_path)):
                raise RuntimeError("TensorRT cannot parse the bundled ONNX")
            config = builder.create_builder_config()
            if hasattr(trt.BuilderFlag, "TF32"):
                config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: the bundle was checked at 1e-4
            inp = network.get_input(0)
            shape = tuple(inp.shape[1:])
            profile = builder.create_optimization_profile()
            profile.set_shape(inp.name, (1, *shape), (max(1, max_batch // 4), *shape), (max_batch, *shape))
            config.add_optimization_profile(profile)
            plan = builder.build_serialized_network(network, config)
            if plan is None:
                raise RuntimeError("TensorRT failed to build an engine")
            engine_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = engine_path.with_name(f".{engine_path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(bytes(plan))
            os.replace(tmp, engine_path)  # a concurrent or killed build never leaves half an engine
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT cannot load {engine_path}; delete it to rebuild")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inp = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.out = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)

    def _check(self, result):
        err = result[0] if isinstance(result, tuple) else result
        if int(err) != 0:
            raise RuntimeError(f"CUDA error {err}")
        return result[1] if isinstance(result, tuple) and len(result) > 1 else None

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        return [np.concatenate([self._run(x[i:i + self.max_batch]) for i in range(0, len(x), self.max_batch)])]

    def _run(self, x: np.ndarray) -> np.ndarray:
        cudart = self.cudart
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not self.context.set_input_shape(self.inp, x.shape):
            lo, _, hi = self.engine.get_tensor_profile_shape(self.inp, 0)
            raise RuntimeError(f"batch {x.shape[0]} is outside the engine's profile (batch {lo[0]} to {hi[0]})")
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
    if runtime == "openvino":
        return OpenVINOModel(root / m["model_file"], device or m["runtime"].get("device", "cpu"))
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
        logits = model(np.stack([preprocess(p, m["preprocessing"]) for p in chunk]))[0]
        z = logits - logits.max(1, keepdims=True)
        prob = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        for p, pr in zip(chunk, prob):
            order = np.argsort(-pr)[:top]
            results.append({"file": str(p), "top": [{"label": labels[k], "index": int(k), "p": float(pr[k])} for k in order]})
    return results


def outputs_of(paths: list[Path], model, m: dict, save: Path, batch: int = 32) -> list[dict]:
    """A model that is not a classifier: every output of every image, saved as save/<image>.npz."""
    names = m.get("outputs", {}).get("names") or [f"output{i}" for i in range(64)]
    save.mkdir(parents=True, exist_ok=True)
    results = []
    for i in range(0, len(paths), batch):
        chunk = paths[i:i + batch]
        outs = model(np.stack([preprocess(p, m["preprocessing"]) for p in chunk]))
        for j, p in enumerate(chunk):
            arrays = {names[k]: o[j] for k, o in enumerate(outs)}
            np.savez(save / (p.stem + ".npz"), **arrays)
            results.append({"file": str(p), "outputs": {k: list(v.shape) for k, v in arrays.items()}})
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Classify images with the bundled model.")
    ap.add_argument("inputs", nargs="+", help="image files or folders")
    ap.add_argument("--runtime", choices=["onnxruntime", "tensorrt", "openvino"], default=None)
    ap.add_argument("--device", choices=["cpu", "cuda", "gpu", "npu"], default=None, help="cuda: ONNX Runtime; gpu/npu: OpenVINO")
    ap.add_argument("--top", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print JSON")
    ap.add_argument("--save", default="outputs", help="a model that is not a classifier: folder for one .npz per image")
    a = ap.parse_args(argv)
    m = manifest()
    paths = images_in(a.inputs)
    if not paths:
        print("error: no images found", file=sys.stderr)
        return 2
    if not m.get("outputs", {}).get("classifier", True):
        res = outputs_of(paths, load(HERE, a.runtime, a.device), m, Path(a.save))
        for r in res:
            print(json.dumps(r) if a.json else r["file"] + "\t" + ", ".join(f"{k} {v}" for k, v in r["outputs"].items()))
        return 0
    res = classify(paths, load(HERE, a.runtime, a.device), m, a.top)
    if a.json:
        print(json.dumps(res, indent=1))
    else:
        for r in res:
            print(r["file"] + "\t" + "  ".join(f"{t['label']} ({t['p']:.3f})" for t in r["top"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
