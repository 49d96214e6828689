"""OpenVINO as a target: IR export with its parity check, profiling with a pinned inference precision,
bundles, and the latency table. Runs where the `openvino` extra is installed (CI installs it)."""

from __future__ import annotations

import builtins
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

from compressor.modeldir import load_model_dir

SCHEMA = json.loads((Path(__file__).parents[1] / "profilers" / "profile.schema.json").read_text())


def test_missing_openvino_is_one_line_before_any_work(cli, cnn_parent, tmp_path, monkeypatch):
    """Runs everywhere: without the package, the export says what to install and writes nothing."""
    real_import = builtins.__import__

    def no_openvino(name, *a, **k):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError("No module named 'openvino'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    out = tmp_path / "ir"
    _, _, err = cli("export", cnn_parent, "--format", "openvino", "--out", out, expect=2)
    assert "not available here" in err and "[openvino]" in err and err.count("\n") == 1 and not out.exists()


try:
    import openvino as ov
except ImportError:
    ov = None
needs_openvino = pytest.mark.skipif(ov is None, reason="the openvino extra is not installed (pip install -e '.[openvino]')")


@pytest.fixture(scope="module")
def ir_fp32(cnn_parent, tmp_path_factory):
    from cli.main import run

    out = tmp_path_factory.mktemp("ov") / "ir"
    assert run(["export", str(cnn_parent), "--format", "openvino", "--out", str(out)]) == 0
    return out


@needs_openvino
def test_ir_export_matches_pytorch_and_reloads(cnn_parent, ir_fp32, cli, tmp_path):
    from exporters import openvino_export as ovx
    from exporters.model_export import check_inputs

    assert {p.name for p in ir_fp32.iterdir()} == {"model.xml", "model.bin", "model.xml.json"}
    side = json.loads((ir_fp32 / "model.xml.json").read_text())
    assert side["inference_precision_checked"] == "f32" and side["agreement"]["top1_agreement"] == 1.0
    assert side["agreement"]["max_abs_diff"] <= 1e-4 and "digits test images" in side["agreement"]["inputs_are"]
    # The written IR, compiled afresh, gives PyTorch's outputs on real test images.
    lm = load_model_dir(cnn_parent)
    x, _ = check_inputs(lm, None, 16)
    got = ovx.infer(ovx.compile_model(ir_fp32 / "model.xml", "cpu", "f32"), x)
    with torch.no_grad():
        want = lm.model.eval()(torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() < 1e-4
    # fp16 weight compression halves the weights file and still passes its own check.
    half = tmp_path / "ir16"
    cli("export", cnn_parent, "--format", "openvino", "--precision", "fp16", "--out", half)
    assert (half / "model.bin").stat().st_size < 0.6 * (ir_fp32 / "model.bin").stat().st_size


@needs_openvino
def test_ir_past_tolerance_is_refused_and_nothing_written(cli, cnn_parent, tmp_path):
    out = tmp_path / "ir16"
    _, _, err = cli("export", cnn_parent, "--format", "openvino", "--precision", "fp16", "--tolerance", "1e-9",
                    "--out", out, expect=2)
    assert "refusing to write" in err and "OpenVINO vs PyTorch" in err and not out.exists()
    assert not list(tmp_path.iterdir())  # no staging leftovers


@needs_openvino
def test_int8_ir_reports_accuracy_before_and_after(cli, cnn_parent, tmp_path):
    out = tmp_path / "ir8"
    _, text, _ = cli("export", cnn_parent, "--format", "openvino", "--precision", "int8", "--calib-size", "64", "--out", out)
    acc = json.loads((out / "model.xml.json").read_text())["accuracy"]
    assert acc["split"] == "test" and acc["images"] > 100
    assert acc["top1_fp32"] > 0.5 and abs(acc["top1_fp32"] - acc["top1_int8"]) < 0.1
    assert "(int8)" in text


@needs_openvino
def test_profile_side_by_side_with_pinned_precision(cli, cnn_parent, ir_fp32, tmp_path):
    js = tmp_path / "p.json"
    _, text, _ = cli("profile", cnn_parent, ir_fp32, "--baseline", cnn_parent, "--backend", "onnxruntime,openvino",
                     "--batch-sizes", "2", "--rounds", "2", "--min-iters", "3", "--min-time", "0", "--warmup", "1",
                     "--no-energy", "--json", js, "-q")
    doc = json.loads(js.read_text())
    jsonschema.validate(doc, SCHEMA)
    ov_rows = [r for r in doc["results"] if r["backend"] == "openvino"]
    assert {r["target"] for r in ov_rows} == {"parent", "ir"}
    assert all(r["inference_precision"] == "f32" and r["runner"]["inference_precision"] == "f32" for r in ov_rows)
    assert all(r["inference_precision"] is None for r in doc["results"] if r["backend"] == "onnxruntime")
    assert "openvino f32" in text and doc["machine"]["versions"]["openvino"]
    # The IR runs only on OpenVINO: skipped with the reason on ONNX Runtime, not silently dropped.
    assert any(s["target"] == "ir" and s["backend"] == "onnxruntime" for s in doc["skipped"])


@needs_openvino
def test_inference_precision_is_what_the_plugin_applies(ir_fp32):
    from compressor.errors import NotAvailable
    from profilers.runners import OvRunner

    r = OvRunner(ir_fp32 / "model.xml", 2, "cpu", 1, "f32")
    assert r.info()["inference_precision"] == "f32" and r.time_once() > 0
    core = ov.Core()
    caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if "BF16" in caps:  # the CPU has bf16: asked for, it is applied and recorded
        assert OvRunner(ir_fp32 / "model.xml", 2, "cpu", 1, "bf16").info()["inference_precision"] == "bf16"
    else:  # the plugin would fall back to f32: a bf16 row would be mislabelled, so it is refused
        with pytest.raises(NotAvailable):
            OvRunner(ir_fp32 / "model.xml", 2, "cpu", 1, "bf16")


@needs_openvino
@pytest.mark.parametrize("args,words", [
    (["--backend", "openvino", "--inference-precision", "fp64"], "inference_precision"),
    (["--backend", "openvino", "--ov-device", "tpu"], "ov_device"),
    (["--backend", "openvino", "--ov-device", "npu"], "not available here"),
])
def test_bad_openvino_profile_options_are_one_line(cli, ir_fp32, args, words):
    _, _, err = cli("profile", ir_fp32, *args, "--no-energy", "--rounds", "1", expect=2)
    assert words.replace("_", "-") in err or words in err
    assert err.count("\n") == 1


@needs_openvino
def test_openvino_bundle_builds_verifies_and_runs(cli, cnn_parent, tmp_path):
    out = tmp_path / "b.tar.gz"
    cli("package", cnn_parent, "--target", "openvino-cpu", "--out", out, "--samples", "4")
    with tarfile.open(out) as t:
        names = set(t.getnames())
        m = json.loads(t.extractfile("bundle/manifest.json").read())
        req = t.extractfile("bundle/requirements.txt").read().decode()
    assert {"bundle/model.xml", "bundle/model.bin", "bundle/run.py"} <= names and "bundle/model.onnx" not in names
    assert m["runtime"]["name"] == "openvino" and m["model_file"] == "model.xml"
    assert f"openvino=={ov.__version__.split('-')[0]}" in req.splitlines()
    assert m["build"]["profile"]["backend"] == "openvino cpu f32"
    _, text, _ = cli("package", "--verify", out)
    assert "4 sample outputs match" in text
    dest = tmp_path / "x"
    dest.mkdir()
    with tarfile.open(out) as t:
        t.extractall(dest, filter="data")
    r = subprocess.run([sys.executable, str(dest / "bundle" / "run.py"), str(dest / "bundle" / "samples"), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert [x["top"][0]["index"] for x in res] == m["samples"]["expected_labels"]
    # A changed weights file is caught by its digest.
    (dest / "bundle" / "model.bin").write_bytes(b"\0" * 64)
    repacked = tmp_path / "bad.tar.gz"
    with tarfile.open(repacked, "w:gz") as t:
        t.add(dest / "bundle", arcname="bundle")
    _, _, err = cli("package", "--verify", repacked, expect=1)
    assert "checksum mismatch for model.bin" in err


@needs_openvino
def test_openvino_latency_entry_grows_with_width():
    from profilers.layer_latency import LayerLatency, OpShape

    t = LayerLatency("openvino", "cpu", 8, 1, None, min_time_s=0.05)
    key = t.register(OpShape("conv", (3, 3), (1, 1), (1, 1), (1, 1), False, (16, 16), True))
    small, big = t(key, 4, 4), t(key, 64, 64)
    assert 0 <= small < big
    assert t.print["versions"]["openvino"] and t.print["backend"] == "openvino"


@needs_openvino
def test_openvino_table_times_many_layers_per_compile(monkeypatch):
    """A planning step's entries are compiled together (one model per 48 layers) and each read from the
    node counters: one compile for a dozen entries, each positive, a wider layer dearer, the attention core
    timed too, and the counters' table is cached apart from wall-clock ones."""
    import exporters.openvino_export as ove
    from profilers.layer_latency import LayerLatency, OpShape

    compiles = []
    real = ove.compile_model_object

    def counting(*a, **k):
        compiles.append(k.get("profiling", False))
        return real(*a, **k)

    monkeypatch.setattr(ove, "compile_model_object", counting)
    t = LayerLatency("openvino", "cpu", 4, 1, None, min_time_s=0.01)
    conv = t.register(OpShape("conv", (3, 3), (1, 1), (1, 1), (1, 1), False, (16, 16), True))
    dw = t.register(OpShape("conv", (3, 3), (1, 1), (1, 1), (1, 1), True, (16, 16), False))
    lin = t.register(OpShape("linear", spatial=(16,), bias=True))
    core = t.register(OpShape("attention", kernel=(8,), spatial=(16,), bias=False))
    wanted = [(conv, c, c) for c in (8, 16, 32, 64)] + [(dw, c, c) for c in (8, 32)] + [(lin, 32, c) for c in (16, 64)]
    wanted += [(core, h, h) for h in (1, 4)]
    t.prefetch(wanted + wanted[:3])  # duplicates are measured once
    assert compiles == [True] and t.measured == len(wanted)
    before = len(compiles)
    values = [t(*w) for w in wanted]  # all cached now: no further compile
    assert len(compiles) == before and all(v > 0 for v in values)
    assert t(conv, 64, 64) > t(conv, 8, 8) and t(core, 4, 4) > t(core, 1, 1)
    assert t.print.get("timing") == "node-counters-without-reorders"
    assert LayerLatency("onnxruntime", "cpu", 4, 1, None).print.get("timing") == "node-profile-without-reorders-vs-reference"
    assert "timing" not in LayerLatency("torch", "cpu", 4, 1, None).print


@needs_openvino
def test_openvino_conv_outputs_are_costed_on_whole_channel_blocks(monkeypatch):
    """OpenVINO's CPU convs compute output channels a SIMD block at a time, so a conv's output axis is
    gridded on whole blocks and a width between is costed at its padded size; input channels, a fixed
    width (the image's 3 channels), linear layers and other devices are left as they are."""
    from profilers import layer_latency as ll

    def fake_many(jobs, min_time_s):  # a kernel that pads outputs to 8
        return [1e-3 * ci * (-(-co // 8) * 8) for _op, _b, ci, co in jobs]

    monkeypatch.setattr(ll.sysinfo, "channel_block", lambda: 8)
    t = ll.LayerLatency("openvino", "cpu", 1, 1, None)
    monkeypatch.setattr(t.timer, "many", fake_many)
    conv = t.register(ll.OpShape("conv", (3, 3), (1, 1), (1, 1), (1, 1), False, (8, 8), False))
    stem = t.register(ll.OpShape("conv", (3, 3), (1, 1), (1, 1), (1, 1), False, (32, 32), False))
    dw = t.register(ll.OpShape("conv", (3, 3), (1, 1), (1, 1), (1, 1), True, (8, 8), False))
    lin = t.register(ll.OpShape("linear", spatial=(4,), bias=True))
    widths = list(range(7, 33))
    t.use_grid({conv: (widths, widths, False), stem: ([3], widths, False), dw: (widths, widths, True),
                lin: (widths, widths, False)}, points=6)
    assert all(c % 8 == 0 for c in t.grids[conv][1]) and any(c % 8 for c in t.grids[conv][0])
    assert t.grids[stem][0] == [3] and all(c % 8 == 0 for c in t.grids[dw][0])
    assert any(c % 8 for c in t.grids[lin][1])
    assert t(conv, 32, 17) == pytest.approx(t(conv, 32, 24)) and t(conv, 32, 17) > t(conv, 32, 16)
    assert t(stem, 3, 9) == pytest.approx(t(stem, 3, 16)) and t(dw, 9, 9) == pytest.approx(t(dw, 16, 16))
    monkeypatch.setattr(ll.sysinfo, "channel_block", lambda: 1)  # a CPU whose blocks are unknown
    assert ll.LayerLatency("openvino", "cpu", 1, 1, None).block == 1


def test_channel_block_follows_the_cpu(monkeypatch):
    from profilers import sysinfo

    monkeypatch.setattr(sysinfo.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(sysinfo, "_read", lambda path: "processor : 0\nflags : fpu sse4_2 avx2 fma\n")
    assert sysinfo.channel_block() == 8
    monkeypatch.setattr(sysinfo, "_read", lambda path: "flags : fpu avx2 avx512f avx512bw\n")
    assert sysinfo.channel_block() == 16
    monkeypatch.setattr(sysinfo.platform, "machine", lambda: "aarch64")
    assert sysinfo.channel_block() == 1


def test_layer_times_leave_out_the_plugins_layout_reorders():
    """A one-layer graph gets Reorder nodes at its input and output that a network does not run per
    layer; the layer's time is its own nodes' (a conv plus any fused bias add)."""
    from datetime import timedelta
    from types import SimpleNamespace as NS

    from profilers.layer_latency import _per_prefix

    def node(name, kind, us, status="Status.EXECUTED"):
        return NS(node_name=name, node_type=kind, status=status, real_time=timedelta(microseconds=us))

    info = [node("e0_x_abcd_acdb_e0_y", "Reorder", 6), node("e0_y", "Convolution", 37),
            node("e0_y_acdb_abcd_e0_y/sink_port_0", "Reorder", 41), node("e1_m", "MatMul", 10),
            node("e1_y", "Eltwise", 2), node("e1_skip", "Convolution", 99, "Status.NOT_EXECUTED")]
    assert _per_prefix(info, ["e0_", "e1_"]) == pytest.approx([0.037, 0.012])


@needs_openvino
def test_openvino_grid_answers_every_width_from_a_few_measured(monkeypatch):
    """OpenVINO measures each signature's grid in bulk once and answers the rest from the fitted cost form
    (tests/test_latency_aware.py checks the fit itself): every answer positive, wider dearer, and no
    lookup compiles anything more."""
    import exporters.openvino_export as ove
    from profilers.layer_latency import LayerLatency, OpShape

    t = LayerLatency("openvino", "cpu", 2, 1, None, min_time_s=0.01)
    assert t.gridded
    conv = t.register(OpShape("conv", (1, 1), (1, 1), (0, 0), (1, 1), False, (8, 8), True))
    dw = t.register(OpShape("conv", (3, 3), (1, 1), (1, 1), (1, 1), True, (8, 8), False))
    widths = list(range(8, 129, 8))
    t.use_grid({conv: (widths, widths, False), dw: (widths, widths, True)}, points=4)
    assert t.measured == 4 * 4 + 4
    compiles = []
    monkeypatch.setattr(ove, "compile_model_object", lambda *a, **k: compiles.append(1))
    xs = t.grids[conv][0]
    assert xs[0] == 8 and xs[-1] == 128 and len(xs) == 4
    assert 0 < t(conv, 8, 8) < t(conv, 128, 128) and t(conv, 40, 56) > 0
    assert t(dw, 20, 20) > 0 and compiles == [] and t.measured == 4 * 4 + 4


@needs_openvino
def test_a_blocks_cost_inside_a_network_is_its_own_nodes(tmp_path):
    """A residual block timed for the depth planner on OpenVINO: its nodes' counters, without the layout
    Reorders at its ends and the request's own cost, so no more than its wall-clock time."""
    import torch.nn as nn

    from profilers.layer_latency import network_node_ms
    from profilers.paired import exported, model_runner
    from profilers.runners import measure

    block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()).eval()
    path = exported(block, (16, 16, 16), tmp_path, "block")
    inside = network_node_ms(path, "openvino", "cpu", 1, 1, min_time_s=0.05)
    wall = float(np.median(measure(model_runner(block, "openvino", "cpu", 1, (16, 16, 16), tmp_path, "b", 1), 3, 20, 0.05)))
    assert 0 < inside < wall
