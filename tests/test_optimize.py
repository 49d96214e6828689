"""compress optimize on the digits data: the whole command, a pass (both bounds hold on the deployed
artifact: exit 0, bundle) and a refusal (a bound that cannot be met: exit 1, report, no bundle), resume,
and bad input refused before any work."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def small_parent(tmp_path_factory):
    """A ResNet-8 (the CIFAR ResNet at depth 8, 78k parameters, 32x32) named by its factory, as a user names
    their own architecture, after one epoch on digits (the bounds these tests ask for do not depend on how
    well it learned). A third of ResNet-20's graph: each in-loop ONNX export and measurement is cheaper."""
    from cli.main import run

    home = pytest.MonkeyPatch()  # the factory is trusted in a throwaway home, not the user's
    home.setenv("COMPRESS_HOME", str(tmp_path_factory.mktemp("home")))
    out = tmp_path_factory.mktemp("opt") / "parent"
    assert run(["finetune", "--model", "compressor.models.cifar_resnet:CifarResNet", "--model-arg", "depth=8",
                "--input-size", "32", "--data", "digits", "--epochs", "1", "--lr", "2e-3", "--batch-size", "64",
                "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    yield out
    home.undo()


def _optimize(cli, parent, out, cache, *extra, expect):
    return cli("optimize", "--model", parent, "--batch", "32", "--epochs", "1", "--metric", "l2", "--round-to", "8",
               "--latency-rounds", "5", "--latency-iterations", "3", "--profile-rounds", "5", "--latency-cache", cache,
               "--compute-device", "cpu", "--allow-busy", "--out", out, "-q", *extra, expect=expect)  # busy refusals: test_quiet


def test_optimize_passes_and_ships_the_artifact_it_measured(cli, small_parent, tmp_path_factory):
    tmp = tmp_path_factory.getbasetemp()
    out = tmp / "opt-pass"
    _, text, _ = _optimize(cli, small_parent, out, tmp / "cache", "--target-speedup", "1.2", "--max-accuracy-drop", "100", expect=0)
    doc = json.loads((out / "report.json").read_text())
    assert doc["schema"] == "compress-optimize/1" and doc["passed"] is True
    best = next(a for a in doc["attempts"] if a["attempt"] == doc["chosen"])
    sp = best["stages"]["measure"]["speedup"]
    assert sp["ci_low"] >= 0.9 * 1.2  # the promise, on the deployed ONNX file against the parent's
    assert best["stages"]["accuracy"]["runtime"] == "onnxruntime" and best["stages"]["accuracy"]["images"] > 0
    assert set(best["stages"]) == {"prune", "finetune", "export", "measure", "accuracy"}
    # the bundle holds the very file that was measured
    import tarfile

    with tarfile.open(out / "bundle.tar.gz") as tar:
        shipped = tar.extractfile("bundle/model.onnx").read()
    assert shipped == (out / best["dir"] / "deploy-fp32" / "model.onnx").read_bytes()
    assert (out / "report.md").read_text().startswith("# compress optimize") and (out / "accuracy_vs_speedup.png").is_file()
    assert any(c.startswith("compress prune ") for c in doc["commands"]) and "both bounds hold" in text
    cli("package", "--verify", out / "bundle.tar.gz")
    # Killed while the fine-tune wrote its model: --resume keeps the finished prune, continues the fine-tune
    # from its checkpoint (no epoch trained again) and redoes the later stages on the same weights.
    att = out / best["dir"]
    weights = (att / "finetuned" / "model.safetensors").read_bytes()
    state = json.loads((att / "state.json").read_text())
    state["stages"] = {"prune": state["stages"]["prune"]}
    (att / "state.json").write_text(json.dumps(state))
    for f in ("model.json", "model.safetensors"):
        (att / "finetuned" / f).unlink()
    assert (att / "finetuned" / "checkpoints" / "last.pt").is_file()
    _optimize(cli, small_parent, out, tmp / "cache", "--target-speedup", "1.2", "--max-accuracy-drop", "100", "--resume", expect=0)
    again = json.loads((att / "state.json").read_text())["stages"]
    assert again["prune"] == state["stages"]["prune"] and again["finetune"]["resumed_from_epoch"] == 1
    assert (att / "finetuned" / "model.safetensors").read_bytes() == weights and set(again) == set(best["stages"])


def test_a_bound_that_cannot_be_met_is_exit_1_with_a_report_and_no_bundle(cli, small_parent, tmp_path_factory):
    tmp = tmp_path_factory.getbasetemp()
    out = tmp / "opt-fail"
    # torch as the runtime: the refusal path is the same on every runtime, and torch times without exports
    _, _, err = _optimize(cli, small_parent, out, tmp / "cache", "--target-speedup", "40", "--max-accuracy-drop", "1",
                          "--speed-attempts", "1", "--no-depth", "--latency-iterations", "1", "--runtime", "torch", expect=1)
    assert "gate failed: optimize: the speed bound does not hold" in err
    doc = json.loads((out / "report.json").read_text())
    assert doc["passed"] is False and doc["failed"]["bound"] == "speed" and doc["bundle"] is None
    assert not (out / "bundle.tar.gz").exists() and "FAILED" in (out / "report.md").read_text()


def test_a_fine_tune_that_learned_nothing_fails_the_attempt_on_accuracy(cli, small_parent, tmp_path_factory, monkeypatch):
    """The rule itself is tested in test_finetune; here optimize's answer to it: that attempt fails the accuracy
    bound (exit 1, the reason in the report), nothing is exported from it and no bundle is written."""
    from compressor import workflows
    from compressor.pruning import WidthConfig
    from orchestration import optimize

    tmp = tmp_path_factory.getbasetemp()
    out = tmp / "opt-dead"
    monkeypatch.setattr(workflows, "learned_nothing", lambda history, num_classes: "the training loss is 2.303")
    # the latency-aware prune is test_optimize_passes_...'s; a uniform cut is enough to reach the fine-tune
    monkeypatch.setattr(optimize, "latency_prune", lambda parent, ds, wcfg, target, calib, device, rep, settings:
                        workflows.width_prune(parent, ds, WidthConfig(sparsity=0.25), calib, device, rep, settings))
    _, _, err = _optimize(cli, small_parent, out, tmp / "cache", "--target-speedup", "1.2", "--max-accuracy-drop", "100",
                          "--speed-attempts", "1", expect=1)
    assert "accuracy bound does not hold" in err
    doc = json.loads((out / "report.json").read_text())
    assert doc["failed"]["bound"] == "accuracy" and "fine-tuning learned nothing" in doc["failed"]["why"]
    assert set(doc["attempts"][0]["stages"]) == {"prune"} and doc["bundle"] is None


@pytest.mark.parametrize("args,words", [
    (["--target-speedup", "fast"], "number or max"),
    (["--target-speedup", "2", "--target-latency-ms", "3"], "one of"),
    (["--target-speedup", "0.5"], "above 1"),
    (["--target-speedup", "2", "--runtime", "tvm"], "--runtime"),
    (["--target-speedup", "2", "--runtime", "torch", "--precision", "int8"], "torch runtime"),
    (["--target-speedup", "2", "--runtime", "tensorrt", "--device", "cpu"], "NVIDIA GPU"),
    (["--target-speedup", "2", "--max-accuracy-drop", "-1"], "max-accuracy-drop"),
    (["--target-speedup", "2", "--resume"], "does not exist"),
])
def test_bad_optimize_input_is_refused_before_any_work(cli, small_parent, tmp_path, args, words):
    out = tmp_path / "x"
    _, _, err = cli("optimize", "--model", small_parent, "--out", out, *args, expect=2)
    assert words in err and len(err.strip().splitlines()) == 1 and not out.exists()
