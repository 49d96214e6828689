"""`compress compare` produces seed-000-style tables and resumes; `compress demo` runs the whole chain."""

import csv
import json
import os
from types import SimpleNamespace

import pytest

from compressor.data import DataSpec, load_dataset
from compressor.finetune import TrainConfig
from compressor.modeldir import load_model_dir
from compressor.progress import QUIET
from orchestration import speed_matched
from orchestration.compare import CompareConfig, markdown
from orchestration.latency_prune import LatencyTarget


def test_compare_grid_tables_plots_and_resume(cli, cnn_parent, tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "--model", cnn_parent, "--metrics", "l1,taylor", "--sparsities", "0.5", "--finetune-epochs", "1",
            "--lr", "2e-3", "--calib-size", "32", "--profile-rounds", "3", "--profile-backend", "torch", "--out", out, "-q"]
    _, stdout, _ = cli(*args)
    for name in ("table.md", "table.csv", "table.json", "compare.json", "accuracy_vs_flops.png", "speedup_vs_flops.png"):
        assert (out / name).is_file(), name
    assert (out / "accuracy_vs_flops.png").read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader((out / "table.csv").open()))
    assert [(r["metric"], float(r["sparsity"])) for r in rows] == [("l1", 0.5), ("taylor", 0.5)]
    for r in rows:
        assert float(r["flops_reduction"]) > 0 and float(r["finetune_s"]) > 0 and float(r["speedup"]) > 0
        assert r["top1_before_ft"] and r["top1_after_ft"]
    md = (out / "table.md").read_text()
    assert "| metric | sparsity | params | MACs | FLOPs red. | top-1 before FT" in md and "| taylor | 50% |" in md
    cells = json.loads((out / "table.json").read_text())
    assert load_model_dir(out / cells[0]["dir"]).record.metrics["top1"] == cells[0]["top1_after_ft"]
    # Every cell says whether its fine-tune learned anything; a dead one stays in the grid, marked.
    assert [c["learned_nothing"] for c in cells] == [None, None]
    dead = json.loads((out / "compare.json").read_text())
    dead["cells"][0]["learned_nothing"] = "after epoch 1 the training loss is 2.310"
    assert markdown(dead).count("(learned nothing)") == 1

    # A stopped run resumes without redoing finished cells.
    doc = json.loads((out / "compare.json").read_text())
    (out / "cells" / "taylor_s50" / "cell.json").unlink()
    doc["cells"] = [c for c in doc["cells"] if c["name"] != "taylor_s50"]
    (out / "compare.json").write_text(json.dumps(doc))
    stamps = {c: (out / "cells" / c / "cell.json").stat().st_mtime_ns for c in ("l1_s50",)}
    cli(*args, "--resume")
    assert {c: (out / "cells" / c / "cell.json").stat().st_mtime_ns for c in stamps} == stamps
    assert (out / "cells" / "taylor_s50" / "cell.json").is_file()
    # Profiling a compare run uses its parent as the baseline (torch here: ONNX Runtime profiles are test_profile's).
    _, prof, _ = cli("profile", out, "--backend", "torch", "--rounds", "2", "--min-time", "0.02", "--warmup", "1", "--min-iters", "3",
                     "--batch-sizes", "1")
    assert "taylor_s50" in prof and "baseline" in prof


def test_compare_shards_then_gather(cli, cnn_parent, tmp_path):
    """Two shards (as two array-job tasks) each run their half of the grid; --resume gathers the cells into
    one table without running any of them again."""
    out = tmp_path / "grid"
    args = ["compare", "--model", cnn_parent, "--metrics", "l1,l2", "--sparsities", "0.5", "--finetune-epochs", "1",
            "--profile-backend", "none", "--out", out, "-q"]
    _, text, _ = cli(*args, "--shard", "1/2")
    assert "shard 1/2: 1 cells" in text and (out / "cells" / "l2_s50" / "cell.json").is_file()
    assert not (out / "cells" / "l1_s50").exists() and not (out / "table.md").exists()
    cli(*args, "--shard", "0/2")
    stamps = {c: (out / "cells" / c / "cell.json").stat().st_mtime_ns for c in ("l1_s50", "l2_s50")}
    cli(*args, "--resume")
    assert {c: (out / "cells" / c / "cell.json").stat().st_mtime_ns for c in stamps} == stamps
    rows = list(csv.DictReader((out / "table.csv").open()))
    assert [r["metric"] for r in rows] == ["l1", "l2"]
    _, _, err = cli(*args, "--shard", "2/2", expect=2)
    assert "0 <= I < N" in err


def test_uniform_search_matches_the_latency_aware_speedup(cnn_parent, tmp_path, monkeypatch):
    """The uniform cell bisects --sparsity until its measured speedup is within 5 % of the latency-aware
    child's. A fake timer stands in for ONNX Runtime: speedup = (parent params / child params) ** 0.7."""
    monkeypatch.setattr(speed_matched, "model_runner", lambda model, *a: SimpleNamespace(
        params=sum(p.numel() for p in model.parameters()), close=lambda: None))
    monkeypatch.setattr(speed_matched, "paired", lambda base, child, rounds: {"speedup": {"median": (base.params / child.params) ** 0.7}})
    monkeypatch.setattr(speed_matched, "_finish", lambda *a: a[-1])  # fine-tuning is tested by the end-to-end grid
    parent = load_model_dir(cnn_parent)
    cfg = CompareConfig(["l1"], [0.5], TrainConfig(epochs=1), calib_size=32)
    goal = 1.8
    cell = speed_matched._uniform_cell(parent, load_dataset(DataSpec("digits")), cfg, LatencyTarget(goal), "l1", goal,
                                       {"matched_speedup": goal}, tmp_path, "cpu", QUIET)
    probes = cell["probes"]
    assert cell["method"] == "uniform" and cell["match_goal"] == goal and abs(cell["matched_speedup"] / goal - 1) <= speed_matched.MATCH
    assert cell["sparsity"] == probes[-1]["sparsity"] and len(probes) <= speed_matched.PROBES
    assert probes[0]["sparsity"] == pytest.approx(1 - 1 / goal)  # the FLOPs-proportional first guess
    for a, b in zip(probes, probes[1:]):  # bisection: a probe below the goal cuts more next, one above cuts less
        assert (b["sparsity"] > a["sparsity"]) == (a["measured_speedup"] < goal)
    # A goal no uniform child can reach: the search stops after PROBES attempts (a sparsity that empties a
    # layer is an attempt without a probe) and keeps the closest probe.
    far = speed_matched._uniform_cell(parent, load_dataset(DataSpec("digits")), cfg, LatencyTarget(50.0), "l1", 50.0,
                                      {"matched_speedup": 50.0}, tmp_path, "cpu", QUIET)
    assert 1 < len(far["probes"]) <= speed_matched.PROBES and far["match_goal"] == 50.0
    assert far["matched_speedup"] == max(p["measured_speedup"] for p in far["probes"])


@pytest.mark.skipif(os.environ.get("COMPRESS_SLOW_TESTS") != "1",
                    reason="opt-in (COMPRESS_SLOW_TESTS=1): about a minute of real ONNX Runtime timings; the search logic "
                           "runs above with a fake timer and bench/latency_accuracy.py runs the grid at full size")
def test_compare_at_matched_measured_speedup(cli, cnn_parent, tmp_path):
    """--target-speedups: per target a latency-aware cell and a uniform cell whose sparsity was searched for
    the latency-aware child's measured speedup, both fine-tuned alike and measured again."""
    out = tmp_path / "matched"
    _, text, _ = cli("compare", "--model", cnn_parent, "--metrics", "l1", "--target-speedups", "1.3", "--finetune-epochs", "1",
                     "--latency-batch", "8", "--latency-rounds", "3", "--latency-iterations", "1", "--latency-cache", tmp_path / "cache", "--allow-busy", "--out", out, "-q")
    cells = {c["name"]: c for c in json.loads((out / "table.json").read_text())}
    lat, uni = cells["l1_latency_x1p3"], cells["l1_uniform_x1p3"]
    assert lat["method"] == "latency-aware" and uni["method"] == "uniform"
    assert "latency-aware vs uniform" in text.lower()
    if "refused" in lat:  # this machine could not reach the target: recorded, and nothing to match
        assert "not reached" in lat["refused"] and "refused" in uni
        return
    assert uni["probes"] and uni["match_goal"] == lat["matched_speedup"]
    closest = min(uni["probes"], key=lambda p: abs(p["measured_speedup"] / uni["match_goal"] - 1))
    assert uni["sparsity"] == closest["sparsity"]
    for c in (lat, uni):
        assert c["top1_after_ft"] is not None and c["speedup"]["median"] > 0 and c["flops_reduction"] > 0
        load_model_dir(out / c["dir"])


def test_demo_runs_the_whole_chain(cli, tmp_path):
    _, out, _ = cli("demo", "--out", tmp_path / "demo", "--epochs", "1", "--finetune-epochs", "1", "--quiet")
    assert "measured speedup" in out and "FLOPs red." in out and "Accuracy on the digits test split" in out
    for name in ("baseline", "pruned", "finetuned"):
        load_model_dir(tmp_path / "demo" / name)
    assert (tmp_path / "demo" / "finetuned.onnx").is_file() and (tmp_path / "demo" / "profile" / "profile.json").is_file()
    # the profile names the model directories where they ended up, not the staging directory they were built in
    targets = json.loads((tmp_path / "demo" / "profile" / "profile.json").read_text())["targets"]
    assert {t["name"] for t in targets} == {"baseline", "finetuned"} and all(os.path.isdir(t["path"]) for t in targets)
