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
from zlib import error as zlib_error
from pathlib import Path
from typing import Callable

import numpy as np

from compressor import __version__, atomic
from compressor.errors import GateFailed, UserError
from compressor.modeldir import LoadedModel
from compressor.workflows import dataset_for

from .model_export import export_onnx, export_openvino, single_output
from .precision import TOLERANCE

# Requirements come in matching pairs: a TensorRT wheel and the cuda-python of the same CUDA major. The
# bare `tensorrt` and `cuda-python` packages now resolve to CUDA 13, which a CUDA 12 driver cannot run
# (CUDA error 35); cuda-python before 12.6.1 has no `cuda.bindings` (run.py also takes the older layout).
TARGETS = {
    "onnxruntime-cpu": {"runtime": "onnxruntime", "device": "cpu", "requirements": ["onnxruntime>=1.17", "numpy>=1.24", "pillow>=10.0"]},
    "onnxruntime-cuda": {"runtime": "onnxruntime", "device": "cuda", "requirements": ["onnxruntime-gpu>=1.17", "numpy>=1.24", "pillow>=10.0"]},
    # x86-64 / SBSA servers with a CUDA 12 driver (TensorRT 10.x)
    "tensorrt": {"runtime": "tensorrt", "device": "cuda", "requirements": ["tensorrt-cu12>=10.3,<11", "cuda-python>=12.6.1,<13",
                                                                          "numpy>=1.24", "pillow>=10.0"]},
    # servers with a CUDA 13 driver (TensorRT 10.13+ and 11.x)
    "tensorrt-cu13": {"runtime": "tensorrt", "device": "cuda", "requirements": ["tensorrt-cu13>=10.13,<12", "cuda-python>=13,<14",
                                                                               "numpy>=1.24", "pillow>=10.0"]},
    # JetPack 6 (CUDA 12.2 or 12.6, TensorRT 10.3 from apt: python3-libnvinfer): never pip TensorRT or CUDA 13
    "jetson": {"runtime": "tensorrt", "device": "cuda", "requirements": ["cuda-python>=12.2,<12.7", "numpy>=1.24", "pillow>=10.0"]},
    # Intel/AMD CPUs through OpenVINO; `openvino` is pinned at build time to the version that wrote and checked the IR
    "openvino-cpu": {"runtime": "openvino", "device": "cpu", "requirements": ["openvino", "numpy>=1.24", "pillow>=10.0"]},
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


def _our_run_py():
    """This package's own run.py (never a bundle's: verifying a bundle must not execute its code)."""
    spec = importlib.util.spec_from_file_location("compress_bundle_run", RUN_PY)
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


def build(lm: LoadedModel, target: str, out: Path, precision: str = "fp32", samples: int = 8,
          profile: Callable[[Path, str], dict] | None = None, artifact: Path | None = None) -> dict:
    """`profile(model_file, runtime)` (from the command, which owns measurement) records the build machine's latency.
    `artifact`: an already exported and checked file (ONNX, or an OpenVINO IR directory) to ship as it is (the
    file `compress optimize` measured), instead of exporting `lm` again."""
    if target not in TARGETS:
        raise UserError(f"`target` must be one of {', '.join(TARGETS)}")
    t = TARGETS[target]
    runtime, requirements = str(t["runtime"]), list(t["requirements"])
    if runtime == "tensorrt":
        single_output(lm, f"the {target} bundle")
    with atomic.writing(out):
        return _build(lm, target, out, precision, samples, profile, t, runtime, requirements, artifact)


def _build(lm: LoadedModel, target: str, out: Path, precision: str, samples: int, profile, t: dict, runtime: str,
           requirements: list[str], artifact: Path | None = None) -> dict:
    ds = dataset_for(None, None, None, None, False, lm.record)
    spec = lm.record.input
    files: dict[str, bytes] = {}
    openvino = runtime == "openvino"
    with tempfile.TemporaryDirectory() as tmp:
        if openvino:
            from .openvino_export import BIN, XML

            ir = Path(tmp) / "ir"
            if artifact is None:
                rep = export_openvino(lm, ir, precision)
            else:
                ir, rep = artifact, json.loads((artifact / (XML + ".json")).read_text())
            rep["opset"] = rep["onnx_opset"]
            model_file = XML
            for name in (XML, BIN):
                files[name] = (ir / name).read_bytes()
            requirements[0] = f"openvino=={rep['openvino']}"
            model_path = ir / XML
        else:
            model_file = "model.onnx"
            model_path = Path(tmp) / model_file
            if artifact is None:
                rep = export_onnx(lm, model_path, precision)
            else:
                model_path, rep = artifact, json.loads(Path(str(artifact) + ".json").read_text())
            files[model_file] = model_path.read_bytes()
        profile_doc = profile(model_path, runtime) if profile is not None else None
    files["run.py"] = RUN_PY.read_bytes()
    files["requirements.txt"] = ("\n".join(requirements) + "\n").encode()
    sample_names: list[str] = []
    if ds is not None and ds.test.images is not None:
        for i in range(min(samples, len(ds.test))):
            name = f"samples/{i:03d}_{ds.classes[int(ds.test.labels[i])].replace('/', '-').replace(' ', '_')}.png"
            files[name] = _png(ds.test.images[i].numpy())
            sample_names.append(name)
    manifest: dict = {
        "schema": SCHEMA,
        "model": {"arch": lm.record.arch.to_json(), "num_classes": lm.record.num_classes,
                  "lineage": [{k: e.get(k) for k in ("stage", "parent", "time", "settings")} for e in lm.record.lineage]},
        "model_file": model_file,
        "input": {"name": rep["input"]["name"], "shape": rep["input"]["shape"], "dtype": "float32", "precision": precision},
        "preprocessing": {"shape": [spec.channels, spec.height, spec.width], "mean": list(spec.mean), "std": list(spec.std),
                          "channel_order": "RGB" if spec.channels == 3 else "L", "scale": "pixel/255",
                          "resize": "centred zero padding for a small enlargement, else bilinear"},
        "labels": list(lm.record.labels),
        "outputs": dict(lm.record.outputs or {"names": ["logits"], "classifier": True}),
        "metrics": {k: lm.record.metrics.get(k) for k in ("params", "macs", "top1", "top5", "eval_dataset", "eval_split")},
        "runtime": {"target": target, "name": runtime, "device": t["device"], "requirements": requirements,
                    "onnx_opset": rep["opset"], **({"openvino": rep["openvino"], "inference_precision": "f32"} if openvino else {})},
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
            run = _our_run_py()
            x = np.stack([run.preprocess(root / n, manifest["preprocessing"]) for n in sample_names])
            outs = _runtime_model(run, root, manifest)(x)
            manifest["samples"]["expected_outputs"] = [np.round(_sampled(o).astype(np.float64), 6).tolist() for o in outs]
            if lm.record.classifier:
                manifest["samples"]["expected_labels"] = [int(v) for v in outs[0].argmax(1)]
    manifest["files"] = {name: atomic.sha256_bytes(data) for name, data in sorted(files.items())}
    manifest["build"] = {"time": _now(), "host": platform.node(), "compress": __version__, "python": platform.python_version(),
                         "export_check": rep["agreement"], "profile": profile_doc}
    files["manifest.json"] = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    _tar(files, out)
    return manifest


SAMPLED_VALUES = 4096  # per image and output: a dense output (a mask) is checked on an even stride of its values


def _sampled(out: np.ndarray) -> np.ndarray:
    """(images, values): all of a logits row, every k-th value of a large output (k fixed by its size)."""
    flat = out.reshape(len(out), -1)
    return flat[:, ::max(1, -(-flat.shape[1] // SAMPLED_VALUES))]


def _runtime_model(run, root: Path, m: dict):
    """The bundled model on the CPU through this compress's own run.py classes (never the bundle's code):
    OpenVINO for an IR, ONNX Runtime for an ONNX graph (also the graph a TensorRT bundle builds from)."""
    model_file = root / m["model_file"]
    if m["runtime"]["name"] == "openvino":
        from .openvino_export import require_openvino

        require_openvino()
        return run.OpenVINOModel(model_file, "cpu")
    from exporters.onnx_export import ort_session, run_ort

    session = ort_session(model_file)
    return lambda x: run_ort(session, x)


def _now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _extract(bundle: Path, dest: Path) -> Path:
    """Unpack regular files under bundle/ only; anything else in the archive is refused."""
    try:
        with tarfile.open(bundle, "r:gz") as tar:
            members = tar.getmembers()
            odd = [m.name for m in members if not (m.name == "bundle" or m.name.startswith("bundle/")) or
                   not (m.isfile() or m.isdir())]
            if odd:
                raise GateFailed(f"{bundle} holds members outside bundle/ or that are not plain files: {', '.join(odd[:3])}")
            tar.extractall(dest, filter="data")  # refuses absolute paths, .., links out of the tree
    except (tarfile.TarError, OSError, EOFError, zlib_error) as e:
        raise UserError(f"{bundle} is not a readable bundle: {e}") from None
    root = dest / "bundle"
    if not (root / "manifest.json").is_file():
        raise UserError(f"{bundle} has no bundle/manifest.json")
    return root


def digests(bundle: Path) -> dict[str, str]:
    """SHA-256 of the archive and of its manifest: give the first to a receiver out of band."""
    with tarfile.open(bundle, "r:gz") as tar:
        f = tar.extractfile("bundle/manifest.json")
        manifest = f.read() if f is not None else b""
    return {"archive_sha256": atomic.sha256_file(bundle), "manifest_sha256": atomic.sha256_bytes(manifest)}


def verify(bundle: Path, expect_sha256: str | None = None, allow_custom_runner: bool = False) -> dict:
    """Digest, member list, checksums, schema, and the bundled model's outputs on the sample images,
    computed with this package's own preprocessing and ONNX Runtime: nothing from the bundle is executed.
    Raises GateFailed."""
    if not bundle.is_file():
        raise UserError(f"no such bundle: {bundle}")
    if expect_sha256 is not None:
        want = expect_sha256.strip().lower()
        if len(want) != 64 or any(ch not in "0123456789abcdef" for ch in want):
            raise UserError("`expect_sha256` takes the 64 hex digits of the archive's SHA-256")
        got = atomic.sha256_file(bundle)
        if got != want:
            raise GateFailed(f"{bundle} is not the bundle you expected: its SHA-256 is {got}")
    with tempfile.TemporaryDirectory() as tmp:
        root = _extract(bundle, Path(tmp))
        try:
            m = json.loads((root / "manifest.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise GateFailed(f"manifest.json is not valid JSON: {e}") from None
        try:
            return _verify_contents(root, m, allow_custom_runner)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise GateFailed(f"manifest.json has a malformed field ({type(e).__name__}: {str(e)[:120]})") from None


def runner_check(root: Path, allow_custom: bool) -> dict | None:
    """run.py is what the device executes: it must compile, and be byte-for-byte the one this version writes
    unless the user accepts a customised runner (then the difference is reported). Never executed here."""
    import difflib

    path = root / "run.py"
    if not path.is_file():
        raise GateFailed("the bundle has no run.py")
    source = path.read_bytes()
    try:
        compile(source, "bundle/run.py", "exec")  # parses only; nothing runs
    except (SyntaxError, ValueError) as e:
        where = f" (line {e.lineno}: {e.msg})" if isinstance(e, SyntaxError) else ""
        raise GateFailed(f"bundle/run.py does not compile{where}: the bundle cannot run") from None
    ours = RUN_PY.read_bytes()
    if source == ours:
        return None
    diff = list(difflib.unified_diff(ours.decode(errors="replace").splitlines(), source.decode(errors="replace").splitlines(), lineterm="", n=0))
    added = sum(1 for ln in diff if ln.startswith("+") and not ln.startswith("+++"))
    removed = sum(1 for ln in diff if ln.startswith("-") and not ln.startswith("---"))
    first = next((ln for ln in diff if ln.startswith("@@")), "")
    digest, our_digest = atomic.sha256_bytes(source), atomic.sha256_bytes(ours)
    what: dict[str, object] = {"sha256": digest, "ours_sha256": our_digest, "added_lines": added, "removed_lines": removed,
                               "first_hunk": first}
    if not allow_custom:
        raise GateFailed(f"bundle/run.py differs from the runner this compress version writes (+{added}/-{removed} lines, "
                         f"first at {first or '?'}; sha256 {digest[:16]}..., ours {our_digest[:16]}...): the code "
                         "the device would run is not verified; pass `allow_custom_runner` only for a runner you customised")
    return what


def _verify_contents(root: Path, m: dict, allow_custom_runner: bool = False) -> dict:
    missing = [k for k in REQUIRED if k not in m] if isinstance(m, dict) else list(REQUIRED)
    if not isinstance(m, dict) or m.get("schema") != SCHEMA or missing:
        raise GateFailed(f"manifest.json does not follow {SCHEMA}" + (f" (missing {', '.join(missing)})" if missing else ""))
    present = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} - {"manifest.json"}
    if not isinstance(m["files"], dict) or not all(isinstance(v, str) for v in m["files"].values()):
        raise GateFailed("manifest.json: files must map names to SHA-256 strings")
    listed = set(m["files"])
    if present - listed:
        raise GateFailed(f"files not in the manifest: {', '.join(sorted(present - listed))}")
    if listed - present:
        raise GateFailed(f"files missing from the bundle: {', '.join(sorted(listed - present))}")
    for name, digest in m["files"].items():
        if atomic.sha256_file(root / name) != digest:
            raise GateFailed(f"checksum mismatch for {name}: the bundle was modified")
    model_file = m["model_file"]
    if model_file not in listed:
        raise GateFailed(f"manifest.json names model file {model_file!r}, which the manifest does not list")
    samples = list(m["samples"]["files"])
    custom = runner_check(root, allow_custom_runner)
    result: dict = {"files": len(listed), "samples": len(samples), "run_py_is_ours": custom is None, "custom_runner": custom}
    if samples:
        if not set(samples) <= listed:
            raise GateFailed("manifest.json lists sample images that are not bundle files")
        run = _our_run_py()
        x = np.stack([run.preprocess(root / n, m["preprocessing"]) for n in samples])
        gots = [_sampled(o).astype(np.float64) for o in _runtime_model(run, root, m)(x)]
        recorded = m["samples"].get("expected_outputs")
        wants = [np.asarray(w, dtype=np.float64) for w in (recorded if recorded is not None else [m["samples"].get("expected_logits")])]
        if len(gots) != len(wants) or any(g.shape != w.shape for g, w in zip(gots, wants)):
            raise GateFailed(f"the bundled model gives outputs of shapes {[g.shape for g in gots]}; the manifest records "
                             f"{[w.shape for w in wants]}")
        if not all(np.isfinite(g).all() for g in gots):
            raise GateFailed("the bundled model gives non-finite outputs (NaN or inf) on the sample images")
        diff = max(float(np.abs(g - w).max()) for g, w in zip(gots, wants))
        got, want = gots[0], wants[0]
        agree = float((got.argmax(1) == want.argmax(1)).mean()) if m.get("outputs", {}).get("classifier", True) else 1.0
        tol = m["samples"]["tolerance"]
        # Both sides are this graph on the same runtime on a CPU: only run-to-run and rounding noise is allowed.
        limit = 1e-3 + 1e-3 * max(float(np.abs(w).max()) for w in wants)
        if diff > limit or agree < 1.0:
            raise GateFailed(f"sample outputs differ from the recorded ones (max |diff| {diff:.3g}, top-1 agreement {agree:.0%})")
        result.update({"max_abs_diff": diff, "top1_agreement": agree, "tolerance": tol})
    return {**result, "target": m["runtime"]["target"], "model": m["model"]["arch"]["name"]}
