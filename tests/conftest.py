"""Shared fixtures: small real models trained on the real digits data, built once per session."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY_CNN = ["--model", "resnet20", "--model-arg", "width=8", "--input-size", "16"]
TINY_VIT = ["--model", "vit_cifar", "--model-arg", "depth=2", "--model-arg", "embed_dim=48", "--model-arg", "num_heads=4",
            "--input-size", "16"]


# The lines a non-terminal log gets per stage (compressor.progress): "X ...", "X: done in 1.2 s[; info]",
# "X: 3/10 info (30 s)". Error checks look at what is left: one line.
PROGRESS = re.compile(r"^(.* \.\.\.|.*: done in [0-9.]+ s(; .*)?|.*: \d+(/\d+)? .*\(\d+ s\))$")


def without_progress(err: str) -> str:
    kept = [ln for ln in err.splitlines() if not PROGRESS.match(ln)]
    return "\n".join(kept) + ("\n" if kept else "")


class CLI:
    """Run `compress` in-process and capture what a user would see (stderr without its progress lines;
    `raw_err` keeps them)."""

    def __init__(self, capsys):
        self.capsys = capsys

    def __call__(self, *args, expect: int | None = 0):
        from cli.main import run

        self.capsys.readouterr()
        code = run([str(a) for a in args])
        out, self.raw_err = self.capsys.readouterr()
        err = without_progress(self.raw_err)
        if expect is not None:
            assert code == expect, f"exit {code} (expected {expect})\nstdout:\n{out}\nstderr:\n{err}"
        return code, out, err


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.slow`: opt-in (COMPRESS_SLOW_TESTS=1), for what a benchmark covers better; each mark
    says which."""
    if os.environ.get("COMPRESS_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="opt-in: set COMPRESS_SLOW_TESTS=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _load_average_pinned(monkeypatch):
    """Tests that time for real judge the code, not how loaded the test machine is: the load sources of the
    quiet-machine check are pinned (tests/test_quiet.py sets its own)."""
    from profilers import quiet

    monkeypatch.setattr(quiet, "others_share", lambda since, now: 0.0)
    monkeypatch.setattr(quiet, "load_average", lambda: 0.0)


@pytest.fixture
def cli(capsys):
    return CLI(capsys)


def _train(out: Path, model_args: list[str], epochs: int, lr: str = "2e-3") -> Path:
    from cli.main import run

    code = run(["finetune", *model_args, "--data", "digits", "--epochs", str(epochs), "--lr", lr, "--batch-size", "64",
                "--out", str(out), "--quiet", "--device", "cpu"])
    assert code == 0
    return out


@pytest.fixture(scope="session")
def cnn_parent(tmp_path_factory) -> Path:
    """ResNet-20 (width 8, 16x16 input) trained on digits."""
    return _train(tmp_path_factory.mktemp("cnn") / "parent", TINY_CNN, epochs=8)


@pytest.fixture(scope="session")
def vit_parent(tmp_path_factory) -> Path:
    """A 2-block, 4-head timm ViT (16x16 input) trained on digits."""
    return _train(tmp_path_factory.mktemp("vit") / "parent", TINY_VIT, epochs=8, lr="1e-3")


# ----------------------------------------------------------------------------- ONNX exports, once per model
# The dynamo exporter takes about 3.5 s a model on a 2-core CPU, and many tests export the same session fixture
# (the parent as a profile baseline, a bundle, an export check). The same classes, repr, weights, inputs and
# options give the same graph, so the suite exports each such model once; a copy of the proto is handed out.
# Tests that patch torch.onnx.export replace this wrapper and see their own function.
_EXPORTS: dict[tuple, object] = {}  # key -> onnx.ModelProto, a private copy
_EXPORT_STATS = {"calls": 0, "hits": 0}


def _export_key(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
    import hashlib

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update((t.float() if t.dtype == torch.bfloat16 else t).detach().cpu().contiguous().numpy().tobytes())
    types = tuple(id(type(m)) for m in model.modules())
    shapes = tuple((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else repr(a) for a in args)
    return (types, repr(model), model.training, h.hexdigest(), shapes, repr(sorted(kwargs.items())))


class _Program:
    """What callers read of an ONNXProgram here: its model_proto."""

    def __init__(self, proto):
        self.model_proto = proto


def _cached_export(real):
    import functools

    import onnx

    def copy(proto):
        out = onnx.ModelProto()
        out.CopyFrom(proto)
        return out

    @functools.wraps(real)
    def export(model, args=(), f=None, **kwargs):
        _EXPORT_STATS["calls"] += 1
        if f is not None or not kwargs.get("dynamo", True) or not isinstance(model, torch.nn.Module):
            return real(model, args, f, **kwargs)
        key = _export_key(model, args if isinstance(args, tuple) else (args,), kwargs)
        if key in _EXPORTS:
            _EXPORT_STATS["hits"] += 1
            return _Program(copy(_EXPORTS[key]))
        prog = real(model, args, f, **kwargs)
        if prog is not None:
            _EXPORTS[key] = copy(prog.model_proto)  # the caller may change its own proto
        return prog

    return export


torch.onnx.export = _cached_export(torch.onnx.export)


def pytest_terminal_summary(terminalreporter):
    if _EXPORT_STATS["calls"]:
        terminalreporter.write_line(f"ONNX exports: {_EXPORT_STATS['calls']} asked, {_EXPORT_STATS['hits']} served from the suite's cache")
