"""Edge deployment bundles: a tar.gz that runs on the target with nothing but its runtime.

Contents: the exported model, manifest.json (model, lineage, input, preprocessing, labels, size, accuracy,
the build machine's profile, SHA-256 of every file, minimum runtime versions, sample outputs), run.py,
requirements.txt, and sample images. Archives are reproducible: sorted members, fixed owners and times,
gzip without a timestamp; only the manifest's "build" record changes from one build to the next.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import platform
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch

from compressor import __version__, atomic
from compressor.errors import GateFailed, UserError
from compressor.modeldir import LoadedModel
from compressor.workflows import dataset_for

from .model_export import export_onnx
from .precision import TOLERANCE

TARGETS = {
    "onnxruntime-cpu": {"runtime": "onnxruntime", "device": "cpu", "requirements": ["onnxruntime>=1.17", "numpy>=1.24", "pillow>=10.0"]},
    "onnxruntime-cuda": {"runtime": "onnxruntime", "device": "cuda", "requirements": ["onnxruntime-gpu>=1.17", "numpy>=1.24", "pillow>=10.0"]},
    "tensorrt": {"runtime": "tensorrt", "device": "cuda", "requirements": ["tensorrt>=10.0", "cuda-python>=12.6", "numpy>=1.24", "pillow>=10.0"]},
    # JetPack 6 ships TensorRT 10.x; install it from JetPack (apt), not pip, on the device.
    "jetson": {"runtime": "tensorrt", "device": "cuda", "requirements": ["cuda-python>=12.2", "numpy>=1.24", "pillow>=10.0"]},
}
SCHEMA = "compress-bundle/1"
RUN_PY = Path(__file__).with_name("bundle_files") / "run.py"
REQUIRED = ("schema", "model", "model_file", "input", "preprocessing", "labels", "runtime", "files", "samples", "metrics")


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    arr = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
    Image.fromarray(arr).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _load_run_py(root: Path):
    spec = importlib.util.spec_from_file_location("bundle_run", root / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tar(files: dict[str, bytes], out: Path) -> None:
    with atomic.temp_path_for(out) as tmp:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name in sorted(files):
                data = files[name]
                info = tarfile.TarInfo(f"bundle/{name}")
                info.size, info.mtime, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0, 0, "", ""
                info.mode = 0o755 if name == "run.py" else 0o644
                tar.addfile(info, io.BytesIO(data))


def build(lm: LoadedModel, target: str, out: Path, precision: str = "fp32", samples: int = 8, profile: bool = True) -> dict:
    if target not in TARGETS:
        raise UserError(f"--target must be one of {', '.join(TARGETS)}")
    t = TARGETS[target]
    ds = dataset_for(None, None, None, None, False, lm.record)
    spec = lm.record.input
    files: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        rep = export_onnx(lm, onnx_path, precision)
        files["model.onnx"] = onnx_path.read_bytes()
        profile_doc = _profile(onnx_path, lm) if profile else None
    files["run.py"] = RUN_PY.read_bytes()
    files["requirements.txt"] = ("\n".join(t["requirements"]) + "\n").encode()
    sample_names, raw = [], []
    if ds is not None and ds.test.images is not None:
        for i in range(min(samples, len(ds.test))):
            name = f"samples/{i:03d}_{ds.classes[int(ds.test.labels[i])].replace('/', '-').replace(' ', '_')}.png"
            files[name] = _png(ds.test.images[i].numpy())
            sample_names.append(name)
    manifest = {
        "schema": SCHEMA,
        "model": {"arch": lm.record.arch.to_json(), "num_classes": lm.record.num_classes,
                  "lineage": [{k: e.get(k) for k in ("stage", "parent", "time", "settings")} for e in lm.record.lineage]},
        "model_file": "model.onnx",
        "input": {"name": rep["input"]["name"], "shape": rep["input"]["shape"], "dtype": "float32", "precision": precision},
        "preprocessing": {"shape": [spec.channels, spec.height, spec.width], "mean": list(spec.mean), "std": list(spec.std),
                          "channel_order": "RGB" if spec.channels == 3 else "L", "scale": "pixel/255",
                          "resize": "centred zero padding for a small enlargement, else bilinear"},
        "labels": list(lm.record.labels),
        "metrics": {k: lm.record.metrics.get(k) for k in ("params", "macs", "top1", "top5", "eval_dataset", "eval_split")},
        "runtime": {"target": target, "name": t["runtime"], "device": t["device"], "requirements": t["requirements"],
                    "onnx_opset": rep["opset"]},
        "files": {},
        "samples": {"files": sample_names, "tolerance": dict(zip(("atol", "rtol", "min_top1_agreement"), TOLERANCE[precision]))},
    }
    # Expected outputs come from the bundled model run through the bundled run.py preprocessing.
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, data in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
        (root / "manifest.json").write_text(json.dumps(manifest))
        if sample_names:
            run = _load_run_py(root)
            x = np.stack([run.preprocess(root / n, manifest["preprocessing"]) for n in sample_names])
            logits = run.OnnxRuntimeModel(root / "model.onnx", "cpu")(x)
            manifest["samples"]["expected_logits"] = np.round(logits.astype(np.float64), 6).tolist()
            manifest["samples"]["expected_labels"] = [int(v) for v in logits.argmax(1)]
    manifest["files"] = {name: atomic.sha256_bytes(data) for name, data in sorted(files.items())}
    manifest["build"] = {"time": _now(), "host": platform.node(), "compress": __version__, "python": platform.python_version(),
                         "export_check": rep["agreement"], "profile": profile_doc}
    files["manifest.json"] = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    _tar(files, out)
    return manifest


def _now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _profile(onnx_path: Path, lm: LoadedModel) -> dict:
    """The build machine's latency for the bundled graph (ONNX Runtime, CPU, batch 1)."""
    from profilers import stats, sysinfo
    from profilers.runners import OrtRunner, measure

    r = OrtRunner(onnx_path, 1, "cpu")
    lat = measure(r, 5, 30, 0.5)
    s = stats.summary(lat, 1)
    return {"machine": sysinfo.one_line(sysinfo.describe()), "backend": "onnxruntime cpu", "batch_size": 1,
            "latency_ms": {k: round(s[k], 4) for k in ("p50", "p90", "p99", "mean", "std")},
            "throughput_ips": round(s["throughput_ips"], 1)}


def _extract(bundle: Path, dest: Path) -> Path:
    try:
        with tarfile.open(bundle, "r:gz") as tar:
            tar.extractall(dest, filter="data")  # refuses absolute paths, .., links out of the tree
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"{bundle} is not a readable bundle: {e}") from None
    root = dest / "bundle"
    if not (root / "manifest.json").is_file():
        raise UserError(f"{bundle} has no bundle/manifest.json")
    return root


def verify(bundle: Path) -> dict:
    """Checksums, schema, and the bundled model's outputs on the sample images. Raises GateFailed."""
    if not bundle.is_file():
        raise UserError(f"no such bundle: {bundle}")
    with tempfile.TemporaryDirectory() as tmp:
        root = _extract(bundle, Path(tmp))
        try:
            m = json.loads((root / "manifest.json").read_text())
        except json.JSONDecodeError as e:
            raise GateFailed(f"manifest.json is not valid JSON: {e}") from None
        missing = [k for k in REQUIRED if k not in m]
        if m.get("schema") != SCHEMA or missing:
            raise GateFailed(f"manifest.json does not follow {SCHEMA}" + (f" (missing {', '.join(missing)})" if missing else ""))
        present = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} - {"manifest.json"}
        listed = set(m["files"])
        if present - listed:
            raise GateFailed(f"files not in the manifest: {', '.join(sorted(present - listed))}")
        if listed - present:
            raise GateFailed(f"files missing from the bundle: {', '.join(sorted(listed - present))}")
        for name, digest in m["files"].items():
            if atomic.sha256_file(root / name) != digest:
                raise GateFailed(f"checksum mismatch for {name}: the bundle was modified")
        result = {"files": len(listed), "samples": len(m["samples"]["files"])}
        if m["samples"]["files"]:
            run = _load_run_py(root)  # run.py's checksum was verified above
            x = np.stack([run.preprocess(root / n, m["preprocessing"]) for n in m["samples"]["files"]])
            got = run.OnnxRuntimeModel(root / m["model_file"], "cpu")(x)
            want = np.asarray(m["samples"]["expected_logits"], dtype=np.float64)
            diff = float(np.abs(got - want).max())
            agree = float((got.argmax(1) == want.argmax(1)).mean())
            tol = m["samples"]["tolerance"]
            # Both sides are this graph on ONNX Runtime: only run-to-run and rounding noise is allowed.
            limit = 1e-3 + 1e-3 * float(np.abs(want).max())
            if diff > limit or agree < 1.0:
                raise GateFailed(f"sample outputs differ from the recorded ones (max |diff| {diff:.3g}, top-1 agreement {agree:.0%})")
            result.update({"max_abs_diff": diff, "top1_agreement": agree, "tolerance": tol})
        return {**result, "target": m["runtime"]["target"], "model": m["model"]["arch"]["name"]}
