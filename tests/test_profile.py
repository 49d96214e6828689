"""Profiling: statistics, gates, report files, JSON schema, energy readers, real CPU measurements."""

import json
import os
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

from profilers import energy, stats
from profilers.energy import JetsonRailCounter, find_jetson_rail, nvml_counter, rapl_counter

SCHEMA = json.loads((Path(__file__).parents[1] / "profilers" / "profile.schema.json").read_text())
FAST = ["--rounds", "3", "--warmup", "2", "--min-iters", "5", "--min-time", "0.05", "--batch-sizes", "1,4"]
# The gate logic depends on neither batch size nor backend, nor on a steady machine: --allow-busy keeps a
# CI box's noisy neighbour out of it (the busy refusal has its own tests in test_quiet.py).
GATE = [*FAST[:-1], "1", "--backend", "torch", "--allow-busy"]


def test_percentiles_on_known_samples():
    s = stats.summary(list(range(1, 101)), batch_size=4)
    assert (s["p50"], s["p90"], s["p99"]) == (50.5, pytest.approx(90.1), pytest.approx(99.01))
    assert s["mean"] == 50.5 and s["n"] == 100 and s["throughput_ips"] == pytest.approx(4000 / 50.5)
    assert s["std"] == pytest.approx(np.std(np.arange(1, 101), ddof=1))


def test_median_interval_uses_exact_binomial_coverage():
    lo, hi, cover = stats.median_ci(list(range(1, 11)), 0.95)
    assert (lo, hi) == (2, 9) and cover == pytest.approx(1 - 2 * 11 / 1024)  # [x(2), x(9)] of 10: 97.85 %
    lo, hi, cover = stats.median_ci([3, 1, 2], 0.95)  # too few samples: the widest interval, honest coverage
    assert (lo, hi) == (1, 3) and cover == pytest.approx(0.75)


def test_paired_speedup_and_significance():
    base = [10.0, 11.0, 10.5, 12.0, 10.2, 10.8, 11.5, 10.1, 10.9, 11.1]
    sp = stats.paired_speedup(base, [b / 2 for b in base])
    assert sp["median"] == pytest.approx(2.0) and sp["significant"]
    same = stats.paired_speedup(base, [b * f for b, f in zip(base, [1.02, 0.98, 1.01, 0.99, 1.0, 1.03, 0.97, 1.0, 1.01, 0.99])])
    assert not same["significant"] and same["ci_low"] <= 1 <= same["ci_high"]


def test_profile_types_carry_every_field_the_schema_requires():
    """The document is built from profilers.document's types: each type has the fields its part of the
    schema requires, and a document built from them validates."""
    import dataclasses

    from profilers import document as d

    def names(t):
        return {f.name for f in dataclasses.fields(t)}

    row = SCHEMA["properties"]["results"]["items"]
    parts = [(d.ProfileDocument, SCHEMA), (d.ResultRow, row), (d.Latency, row["properties"]["latency_ms"]),
             (d.Memory, row["properties"]["memory"]), (d.Speedup, row["properties"]["speedup"]),
             (energy.EnergyResult, row["properties"]["energy"])]
    for t, part in parts:
        assert set(part["required"]) <= names(t), (t.__name__, set(part["required"]) - names(t))
    lat = d.Latency(p50=1.0, p90=1.1, p99=1.2, mean=1.0, std=0.1, min=0.9, max=1.3, n=20)
    sp = d.Speedup(vs="a", **stats.paired_speedup([2.0, 2.1, 2.2], [1.0, 1.0, 1.1]), flops_speedup=2.0,
                   flops_reduction=0.5, realised_fraction=1.0)
    r = d.ResultRow("b", "torch", "cpu", 1, None, lat, 1000.0, [1.0], d.Memory(10.0, None, None, None), {}, None, None,
                    None, energy.unavailable("none here"), sp)
    doc = d.ProfileDocument("2026-01-01T00:00:00+00:00", "compress profile", {
        "host": "h", "os": "linux", "gpu": None, "torch_threads": 1,
        "cpu": {k: None for k in ("model", "arch", "logical_cpus", "usable_cpus", "mhz_now", "governor")},
        "versions": {k: None for k in ("python", "torch", "onnxruntime", "tensorrt")}},
        {k: 1 for k in ("backends", "device", "batch_sizes", "threads", "rounds", "warmup", "min_iters", "min_time_s",
                        "confidence")}, "a", [], [r])
    data = doc.to_json()
    jsonschema.validate(data, SCHEMA)
    assert next(iter(data)) == "schema" and doc.row("b").speedup is sp
    with pytest.raises(KeyError):
        doc.row("b", backend="onnxruntime")


@pytest.fixture(scope="module")
def child(cnn_parent, tmp_path_factory):
    from cli.main import run

    out = tmp_path_factory.mktemp("child") / "c"
    assert run(["prune", "--model", str(cnn_parent), "--sparsity", "0.5", "--out", str(out), "-q"]) == 0
    return out


def test_profile_cpu_for_real_with_reports_and_schema(cli, cnn_parent, child, tmp_path, monkeypatch):
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    _, out, _ = cli("profile", child, "--baseline", cnn_parent, "--backend", "torch,onnxruntime", "--threads", "1",
                    "--out", tmp_path / "rep", "--json", tmp_path / "p.json", "--breakdown", "--reference", "resnet20", *FAST)
    doc = json.loads((tmp_path / "p.json").read_text())
    jsonschema.validate(doc, SCHEMA)
    assert {p.name for p in (tmp_path / "rep").iterdir()} >= {"profile.json", "profile.md", "profile.csv",
                                                               "speedup_vs_flops.png", "latency_vs_batch.png"}
    assert (tmp_path / "rep" / "speedup_vs_flops.png").read_bytes()[:4] == b"\x89PNG"
    rows = [r for r in doc["results"] if r["target"] == child.name]
    assert len(rows) == 4 and all(r["speedup"]["flops_speedup"] > 3 for r in rows)
    assert all(r["latency_ms"]["p50"] > 0 and r["speedup"]["rounds"] == 3 for r in rows)
    assert doc["settings"]["threads"] == 1 and doc["machine"]["versions"]["torch"] == torch.__version__
    assert any(r["target"] == "reference:resnet20" for r in doc["results"])
    assert doc["breakdown"] and doc["breakdown"][0]["top_ops"]
    e = rows[0]["energy"]
    if e["joules_per_inference"] is None:  # this machine has no counter: null with the reason, never a guess
        assert e["reason"] and not e["estimate"]
    assert "| " + child.name in out and "realised" in out and "All gates passed" not in summary.read_text() and "## Profile" in summary.read_text()
    csv_lines = (tmp_path / "rep" / "profile.csv").read_text().splitlines()
    assert csv_lines[0].startswith("backend,device,batch_size,target") and len(csv_lines) == 1 + len(doc["results"])


def test_energy_estimate_is_labelled(cli, child, tmp_path):
    cli("profile", child, "--energy-estimate", "15", "--json", tmp_path / "p.json", "--energy-window", "0.2", *FAST)
    e = json.loads((tmp_path / "p.json").read_text())["results"][0]["energy"]
    assert e["estimate"] is True and e["joules_per_inference"] > 0 and "estimate" in e["scope"]


def test_gates_fail_with_one_line(cli, cnn_parent, child, tmp_path, monkeypatch):
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    _, _, err = cli("profile", child, "--baseline", cnn_parent, "--assert-speedup", "50", *GATE, expect=1)
    err = "".join(ln for ln in err.splitlines(keepends=True) if not ln.startswith("warning: UNRELIABLE"))
    assert err.startswith("gate failed:") and err.count("\n") == 1 and "speedup" in err
    assert ": done in " in cli.raw_err  # a log (not a terminal) gets a line per measured stage
    assert "Gate failures" in summary.read_text()
    _, _, err = cli("profile", child, "--baseline", cnn_parent, "--assert-realised", "5", *GATE, expect=1)
    assert "realised fraction" in err
    cli("profile", child, "--max-latency-ms", "1e-6", *GATE, expect=1)
    cli("profile", child, "--baseline", cnn_parent, "--assert-speedup", "0.01", "--max-latency-ms", "10000",
        "--json", tmp_path / "ok.json", *GATE)
    old = json.loads((tmp_path / "ok.json").read_text())
    for r in old["results"]:
        r["latency_ms"]["p50"] /= 100  # pretend the previous run was 100x faster
    (tmp_path / "old.json").write_text(json.dumps(old))
    _, _, err = cli("profile", child, "--baseline", cnn_parent, "--against", tmp_path / "old.json", "--max-regression", "10%", *GATE, expect=1)
    assert "regressed" in err
    cli("profile", child, "--baseline", cnn_parent, "--against", tmp_path / "ok.json", "--max-regression", "900%", *GATE)


# ----------------------------------------------------------------------------- energy readers
def _rapl(root: Path, value: int, max_range: int = 1000):
    d = root / "intel-rapl:0"
    d.mkdir(parents=True, exist_ok=True)
    (d / "energy_uj").write_text(str(value))
    (d / "max_energy_range_uj").write_text(str(max_range))
    (root / "intel-rapl:0:0").mkdir(exist_ok=True)  # a sub-domain (core): not a package, not summed


def test_rapl_counter_handles_wraparound(tmp_path):
    _rapl(tmp_path, 900)
    c, why = rapl_counter(str(tmp_path))
    assert why is None and c.joules() == 0
    _rapl(tmp_path, 950)
    assert c.joules() == pytest.approx(50e-6)
    _rapl(tmp_path, 20)  # wrapped: 950 -> 1000 -> 0 -> 20 is 71 uJ
    assert c.joules() == pytest.approx(121e-6)


def test_rapl_missing_and_unreadable(tmp_path):
    c, why = rapl_counter(str(tmp_path / "none"))
    assert c is None and "does not exist" in why
    _rapl(tmp_path, 1)
    (tmp_path / "intel-rapl:0" / "energy_uj").chmod(0)
    c, why = rapl_counter(str(tmp_path))
    if os.geteuid() != 0:
        assert c is None and "permission denied" in why


def _jetson(root: Path, mv: int, ma: int) -> Path:
    h = root / "1-0040" / "hwmon" / "hwmon3"
    h.mkdir(parents=True, exist_ok=True)
    (h / "in1_label").write_text("VDD_IN\n")
    (h / "in2_label").write_text("VDD_CPU_GPU_CV\n")
    (h / "in1_input").write_text(str(mv))
    (h / "curr1_input").write_text(str(ma))
    return h


def test_jetson_rail_integrates_power_over_time(tmp_path):
    h = _jetson(tmp_path, 5000, 2000)  # 5 V x 2 A = 10 W
    assert find_jetson_rail(str(tmp_path)) == (h, "1")
    t = [0.0]
    c = JetsonRailCounter(h, "1", period_s=3600, clock=lambda: t[0])
    try:
        t[0] = 2.0
        assert c.joules() == pytest.approx(20.0)  # 10 W for 2 s
        _jetson(tmp_path, 5000, 4000)  # 20 W now: trapezoid over the next second averages 15 W
        t[0] = 3.0
        assert c.joules() == pytest.approx(35.0)
    finally:
        c.close()
    assert energy.jetson_counter(str(tmp_path / "none"))[0] is None


class FakeNvml:
    """Stands in for pynvml at the boundary only: a counter in mJ and clock-event reasons."""

    def __init__(self):
        self.mj, self.reasons = 1_000_000, 0

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("gpu", i)

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        return self.mj

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        return self.reasons


def test_nvml_counter_and_window_arithmetic():
    nv = FakeNvml()
    c, why = nvml_counter(0, nv)
    assert why is None and c.joules() == 1000.0
    calls = []

    def run_once():  # each inference costs 2 J of counter time
        calls.append(1)
        nv.mj += 2000

    res = energy.measure(c, run_once, batch=4, window_s=0.05, idle_s=0.0, settle_s=0.0)
    assert res.source == "nvml" and res.inferences == 4 * len(calls)
    assert res.joules_per_inference == pytest.approx(0.5)  # 2 J per batch of 4
    assert res.throttled is False
    nv.reasons = 0x4  # SW power cap
    res = energy.measure(c, run_once, batch=1, window_s=0.02, idle_s=0.0, settle_s=0.0)
    assert res.throttled is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="not available here: no CUDA device")
def test_torch_cuda_backend(cli, cnn_parent, child, tmp_path):
    cli("profile", child, "--baseline", cnn_parent, "--backend", "torch", "--device", "cuda", "--cuda-graphs",
        "--json", tmp_path / "p.json", *FAST)
    doc = json.loads((tmp_path / "p.json").read_text())
    assert all(r["memory"]["device_peak_mb"] > 0 for r in doc["results"])


@pytest.mark.skipif("CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers(),
                    reason="not available here: onnxruntime has no CUDA execution provider (install onnxruntime-gpu)")
def test_onnxruntime_cuda_backend(cli, cnn_parent, child, tmp_path):
    cli("profile", child, "--baseline", cnn_parent, "--device", "cuda", "--json", tmp_path / "p.json", *FAST)


def test_cuda_asked_where_absent_is_a_clear_error(cli, child, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    _, _, err = cli("profile", child, "--backend", "torch", "--device", "cuda", *FAST, expect=2)
    assert "not available here" in err
