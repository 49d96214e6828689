"""What can be profiled: a model directory, an ONNX file, a TensorRT engine, a compare run (its parent
and children), or a stock model by name (--reference)."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch.nn as nn

from compressor.errors import UserError
from compressor.modeldir import LoadedModel, is_model_dir, load_model_dir

from compressor.flops import count
from exporters.openvino_export import ir_path


@dataclass
class Target:
    name: str
    kind: str  # "model" | "onnx" | "engine" | "openvino-ir" | "reference"
    path: Path | None = None
    model: nn.Module | None = None
    shape: tuple[int, int, int] | None = None
    params: int | None = None
    macs: int | None = None
    top1: float | None = None
    onnx: Path | None = None
    engine: Path | None = None
    ir: Path | None = None  # an OpenVINO model.xml
    notes: list[str] = field(default_factory=list)

    def supports(self, backend: str) -> bool:
        return {"torch": self.model is not None, "onnxruntime": self.model is not None or self.onnx is not None,
                "tensorrt": self.engine is not None,
                "openvino": self.model is not None or self.onnx is not None or self.ir is not None}[backend]

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "path": None if self.path is None else str(self.path),
                "params": self.params, "macs": self.macs, "top1": self.top1,
                "input_shape": None if self.shape is None else list(self.shape), "notes": self.notes}


def from_loaded(name: str, lm: LoadedModel) -> Target:
    """A profiling target for a model already in memory."""
    spec = lm.record.input
    shape = (spec.channels, spec.height, spec.width)
    c = count(lm.model, shape)
    return Target(name, "model", lm.path, lm.model, shape, c["params"], c["macs"], lm.record.metrics.get("top1"))


def _sidecar(path: Path) -> dict:
    side = path.with_name(path.name + ".json")
    if side.is_file():
        try:
            return json.loads(side.read_text())
        except json.JSONDecodeError:
            return {}
    return {}


def resolve(arg: str) -> list[Target]:
    p = Path(arg)
    if p.is_dir() and (p / "compare.json").is_file():
        try:
            doc = json.loads((p / "compare.json").read_text())
            doc["parent"], list(doc.get("cells", []))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{p / 'compare.json'} is not a compare record ({type(e).__name__})") from None
        out = [from_loaded("parent", load_model_dir(doc["parent"]))]
        for cell in doc.get("cells", []):
            d = p / cell["dir"]
            if (d / "model.json").is_file():
                out.append(from_loaded(cell["name"], load_model_dir(d)))
        return out
    xml = ir_path(p)
    if xml is not None:
        side = _sidecar(xml)
        m = side.get("model", {})
        shape = tuple(side.get("input", {}).get("shape", [])[1:]) or None
        return [Target(p.name, "openvino-ir", p, None, shape, m.get("params"), m.get("macs"), m.get("top1"), ir=xml)]
    if p.is_dir() or is_model_dir(p):
        return [from_loaded(p.name or str(p), load_model_dir(p))]
    if p.suffix == ".onnx":
        if not p.is_file():
            raise UserError(f"no such ONNX file: {p}")
        side = _sidecar(p)
        import onnx

        try:
            g = onnx.load(str(p), load_external_data=False).graph
        except Exception as e:  # protobuf's DecodeError and friends
            raise UserError(f"{p} is not a readable ONNX file ({type(e).__name__})") from None
        dims = [d.dim_value for d in g.input[0].type.tensor_type.shape.dim[1:]]
        m = side.get("model", {})
        return [Target(p.name, "onnx", p, None, tuple(dims), m.get("params"), m.get("macs"), m.get("top1"), onnx=p)]
    if p.suffix in (".engine", ".plan", ".trt"):
        if not p.is_file():
            raise UserError(f"no such engine file: {p}")
        side = _sidecar(p)
        m = side.get("model", {})
        shape = tuple(side.get("input_shape", [])[1:]) or None
        return [Target(p.name, "engine", p, None, shape, m.get("params"), m.get("macs"), m.get("top1"), engine=p)]
    if p.exists():
        raise UserError(f"cannot profile {p}: expected a model directory, a compare run, .onnx, .engine or an OpenVINO IR")
    raise UserError(f"profile target {arg} does not exist")


def reference(name: str, like: Target) -> Target:
    """A stock model at the same input size and class count, with random weights (latency only)."""
    from compressor.models import ArchSpec, build, resolve as resolve_name

    if like.shape is None:
        raise UserError("`reference` needs a baseline whose input shape is known")
    source, bare = resolve_name(name)
    classes = 10
    if like.model is not None:
        from compressor.models import get_classifier

        classes = int(get_classifier(like.model).out_features)  # type: ignore[arg-type]
    kwargs = {}
    if source == "timm" and like.shape[1] != 224:
        kwargs["img_size"] = like.shape[1]
    model = build(ArchSpec(source, bare, kwargs), classes).eval()
    c = count(model, like.shape)
    t = Target(f"reference:{name}", "reference", None, model, like.shape, c["params"], c["macs"], None)
    t.notes.append("stock architecture, random weights: latency and size only")
    return t


def ensure_onnx(t: Target, workdir: Path) -> Path:
    """An ONNX file for the ONNX Runtime backend (exported and checked on the fly for model targets)."""
    if t.onnx is not None:
        return t.onnx
    from exporters.onnx_export import export

    assert t.model is not None and t.shape is not None  # a target without ONNX is a model target
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in t.name)
    out = Path(tempfile.mkdtemp(dir=workdir)) / f"{safe}.onnx"
    x = np.random.default_rng(0).standard_normal((8, *t.shape)).astype(np.float32)
    export(t.model, t.shape, out, inputs=x, inputs_are="random")
    t.onnx = out
    return out


def slow_width(n: int) -> bool:
    """A channel count that is not a multiple of 8 (above 8): slow paths on most kernels."""
    return n > 8 and n % 8 != 0


def narrow_layers(model: nn.Module) -> list[dict]:
    """Conv/linear layers whose channel counts are not multiples of 8 (slow paths on most kernels)."""
    from compressor.models import get_classifier

    head = get_classifier(model)
    flags = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            cin, cout = m.in_channels, m.out_channels
        elif isinstance(m, nn.Linear):
            cin, cout = m.in_features, m.out_features
        else:
            continue
        dims = (("in", cin),) if m is head else (("in", cin), ("out", cout))  # the class count is not ours to choose
        bad = [f"{k}={v}" for k, v in dims if slow_width(v)]
        if bad:
            flags.append({"module": name, "type": type(m).__name__, "channels": ", ".join(bad)})
    return flags
