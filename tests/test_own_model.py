"""Your own model: `--model package.module:factory` (tests/userpkg stands for the user's package), models
that are not classifiers (a tuple and a dict of outputs), the refusals, and the README's Python example."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
ROOT = HERE.parent
SMALL = ["--data", "fake", "--input-size", "32", "--quiet"]


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """The trust list lives in a fresh COMPRESS_HOME per test."""
    monkeypatch.setenv("COMPRESS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _compress(args: list[str], cwd: Path, env_home: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "COMPRESS_HOME": str(env_home), "PYTHONPATH": ""}
    return subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], cwd=cwd, env={**env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=timeout)


def _user_dir(tmp_path: Path) -> Path:
    """A working directory holding the user's package, as `python -m` would see it."""
    work = tmp_path / "work"
    shutil.copytree(HERE / "userpkg", work / "userpkg", ignore=shutil.ignore_patterns("__pycache__"))
    return work


def test_two_output_model_by_factory_prunes_reloads_exports_profiles_and_bundles(cli, tmp_path, home):
    child = tmp_path / "th50"
    cli("prune", "--model", "userpkg.nets:two_head", "--model-arg", "width=16", *SMALL, "--sparsity", "0.5", "--out", child)
    rec = json.loads((child / "model.json").read_text())
    assert rec["arch"]["source"] == "python" and rec["arch"]["name"] == "userpkg.nets:two_head"
    assert rec["arch"]["kwargs"] == {"width": 16, "num_classes": 10}  # num_classes from the data, recorded
    assert len(rec["arch"]["code"]["sha256"]) == 64 and rec["arch"]["code"]["version"] == "0.3.1"
    assert rec["outputs"] == {"names": ["output0", "output1"], "shapes": [[10], [3, 16, 16]], "classifier": False}
    assert "top1" not in rec["metrics"] and "not a classifier" in rec["metrics"]["eval_note"]
    changed = rec["changed_modules"]  # the heads lost inputs, never outputs
    assert changed["seg.2"]["tensors"]["weight"][:2] == [3, 8] and changed["cls"]["tensors"]["weight"] == [10, 16]
    # reloaded from the factory and exported (a fresh process does the same in test_untrusted_directory_...)
    onnx = tmp_path / "th50.onnx"
    cli("export", child, "--format", "onnx", "--out", onnx, "--data", "fake")
    side = json.loads(Path(str(onnx) + ".json").read_text())
    assert side["outputs"] == ["output0", "output1"] and side["agreement"]["outputs"] == 2
    assert side["agreement"]["max_abs_diff"] < 1e-4
    try:
        import openvino  # noqa: F401

        cli("export", child, "--format", "openvino", "--out", tmp_path / "th50-ir", "--data", "fake")
        assert json.loads((tmp_path / "th50-ir" / "model.xml.json").read_text())["agreement"]["outputs"] == 2
    except ImportError:
        pass
    _, out, _ = cli("profile", child, "--backend", "onnxruntime", "--batch-sizes", "1", "--rounds", "2", "--no-energy",
                    "--json", tmp_path / "p.json")
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["results"][0]["latency_ms"]["p50"] > 0
    bundle = tmp_path / "th50.tar.gz"
    cli("package", child, "--target", "onnxruntime-cpu", "--out", bundle)
    _, out, _ = cli("package", "--verify", bundle)
    assert "bundle OK" in out
    cli("package", child, "--target", "tensorrt", "--out", tmp_path / "t.tar.gz", expect=2)  # one output only


def test_dict_output_and_timm_backbone_under_a_custom_head(cli, tmp_path):
    import torch

    from compressor.modeldir import load_model_dir

    d = tmp_path / "dict"
    cli("prune", "--model", "userpkg.nets:dict_out", *SMALL, "--sparsity", "0.5", "--out", d)
    lm = load_model_dir(d)
    out = lm.model(torch.zeros(2, 3, 32, 32))
    assert set(out) == {"logits", "embedding"} and out["embedding"].shape == (2, 8)
    cli("export", d, "--format", "onnx", "--out", tmp_path / "dict.onnx", "--data", "fake")
    t = tmp_path / "timm"
    cli("prune", "--model", "userpkg.nets:timm_backbone", *SMALL, "--sparsity", "0.4", "--out", t)
    assert json.loads((t / "model.json").read_text())["outputs"]["classifier"] is True
    assert load_model_dir(t).model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_ignore_layers_keeps_a_head_and_a_typo_is_refused(cli, tmp_path):
    d = tmp_path / "keep"
    cli("prune", "--model", "userpkg.nets:two_head", *SMALL, "--ignore-layers", "seg.*", "--out", d)
    changed = json.loads((d / "model.json").read_text())["changed_modules"]
    # the head's own widths stay (16 and 3); only its input follows the pruned trunk
    assert changed["seg.0"]["tensors"]["weight"][0] == 16 and "seg.2" not in changed
    _, _, err = cli("prune", "--model", "userpkg.nets:two_head", *SMALL, "--ignore-layers", "sgm.*", "--out", tmp_path / "x", expect=2)
    assert "matches no module" in err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("factory,words", [
    ("userpkg.nets:nope", "has no attribute 'nope'"),
    ("userpkg.nets:broken", "failed: RuntimeError"),
    ("userpkg.nets:not_a_module", "not a torch.nn.Module"),
    ("nosuchpkg.nets:build", "cannot import 'nosuchpkg.nets'"),
])
def test_bad_factories_are_refused_in_one_line(cli, tmp_path, factory, words):
    _, _, err = cli("prune", "--model", factory, *SMALL, "--out", tmp_path / "x", expect=2)
    assert words in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_loss_metrics_are_refused_for_a_model_that_is_not_a_classifier(cli, tmp_path):
    for metric in ("taylor", "kl"):
        _, _, err = cli("prune", "--model", "userpkg.nets:two_head", *SMALL, "--metric", metric, "--out", tmp_path / "x", expect=2)
        assert "not a classifier" in err
    _, _, err = cli("finetune", "--model", "userpkg.nets:two_head", *SMALL, "--epochs", "1", "--out", tmp_path / "x", expect=2)
    assert "not a classifier" in err


def test_untrusted_directory_and_changed_module(cli, tmp_path, home, monkeypatch):
    work = _user_dir(tmp_path)  # a copy of the package, byte for byte: the recorded hash matches it
    d = tmp_path / "rdw"
    cli("prune", "--model", "userpkg.nets:residual_dw", *SMALL, "--out", d)
    # a model.json is data: on a machine (home) where nobody named the factory, nothing is imported
    monkeypatch.setenv("COMPRESS_HOME", str(tmp_path / "elsewhere"))
    _, _, err = cli("export", d, "--format", "onnx", "--out", tmp_path / "a.onnx", expect=2)
    assert "never named on this machine" in err and not (tmp_path / "a.onnx").exists()
    with open(work / "userpkg" / "nets.py", "a") as f:
        f.write("\n# edited after the directory was written\n")
    p = _compress(["export", d, "--format", "onnx", "--out", tmp_path / "b.onnx"], work, home)
    assert p.returncode == 0 and re.search(r"warning: the module of userpkg.nets:residual_dw changed .*sha256 \w{12} then, \w{12} now", p.stderr)
    p = _compress(["--strict", "export", d, "--format", "onnx", "--out", tmp_path / "c.onnx"], work, home)
    assert p.returncode == 2 and "refused under --strict" in p.stderr and not (tmp_path / "c.onnx").exists()


def test_readme_python_example_runs(tmp_path, home):
    """The README's "Your own model" example, exactly as printed there, run in a fresh process."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- own-model-example -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README lost its own-model example"
    work = _user_dir(tmp_path)
    (work / "example.py").write_text(block.group(1))
    env = {**os.environ, "COMPRESS_HOME": str(home), "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "example.py"], cwd=work, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (work / "runs" / "own-pruned" / "model.json").is_file() and (work / "runs" / "own-pruned.onnx").is_file()
    assert "speedup" in p.stdout


def test_api_taylor_on_a_two_output_model_with_the_callers_loss(tmp_path):
    """Through the Python API a loss function lets first-order Taylor rank a model that is not a classifier;
    the pruned copy saves, reloads strictly and keeps both outputs."""
    import torch
    import torch.nn.functional as F

    from orchestration import api
    from userpkg.nets import two_head

    base = api.wrap(two_head(width=8), "userpkg.nets:two_head", kwargs={"width": 8}, example_inputs=torch.zeros(1, 3, 16, 16))
    assert base.record.classifier is False

    def loss(out, y):  # the caller's multi-task loss: classification plus the mask's mean square
        logits, mask = out
        return F.cross_entropy(logits, y) + mask.pow(2).mean()

    child = api.prune(base, sparsity=0.5, metric="taylor", loss_fn=loss, data="fake", calib_size=32)
    assert child.record.lineage[-1]["settings"]["loss"] == "test_api_taylor_on_a_two_output_model_with_the_callers_loss.<locals>.loss"
    api.save(child, tmp_path / "t50")
    again = api.load(tmp_path / "t50", strict=True)
    logits, mask = again.model(torch.zeros(2, 3, 16, 16))
    assert logits.shape == (2, 10) and mask.shape == (2, 3, 8, 8)
    assert sum(p.numel() for p in again.model.parameters()) < sum(p.numel() for p in base.model.parameters())
