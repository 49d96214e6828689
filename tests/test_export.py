"""ONNX export (fp32/fp16/int8 in the graph), its numerical gate, and TensorRT where it exists."""

import importlib.util
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from compressor.data import DataSpec, load_dataset, to_model_input
from compressor.modeldir import load_model_dir
from exporters.precision import non_int8_dequantize_inputs


def _accuracy(onnx_path, lm):
    ds = load_dataset(DataSpec("digits"))
    x = to_model_input(ds.test.images, lm.record.input).numpy()
    sess = ort.InferenceSession(str(onnx_path))
    pred = np.concatenate([sess.run(None, {"input": x[i:i + 128]})[0].argmax(1) for i in range(0, len(x), 128)])
    return 100.0 * float((pred == ds.test.labels.numpy()).mean())


def test_initialisers_have_the_pruned_shapes(cli, cnn_parent, tmp_path):
    cli("prune", "--model", cnn_parent, "--sparsity", "0.5", "--out", tmp_path / "p", "-q")
    cli("export", tmp_path / "p", "--out", tmp_path / "p.onnx")
    g = onnx.load(str(tmp_path / "p.onnx")).graph
    shapes = sorted(tuple(i.dims) for i in g.initializer if len(i.dims) == 4)
    assert shapes and all(s[0] in (4, 8, 16) for s in shapes)  # widths 8/16/32 halved
    assert [d.dim_param for d in g.input[0].type.tensor_type.shape.dim][:1] == ["batch"]
    side = json.loads((tmp_path / "p.onnx.json").read_text())
    assert side["agreement"]["max_abs_diff"] < 1e-4 and side["model"]["params"] == load_model_dir(tmp_path / "p").record.metrics["params"]


@pytest.mark.parametrize("parent", ["cnn_parent", pytest.param("vit_parent", marks=pytest.mark.slow)])  # the ViT's: bench/seed000.py
def test_fp16_and_int8_graphs_run_and_keep_accuracy(cli, request, tmp_path, parent):
    d = request.getfixturevalue(parent)
    lm = load_model_dir(d)
    acc = {}
    for prec in ("fp32", "fp16", "int8"):
        out = tmp_path / f"{prec}.onnx"
        cli("export", d, "--out", out, "--precision", prec)
        acc[prec] = _accuracy(out, lm)
        types = {i.data_type for i in onnx.load(str(out)).graph.initializer}
        ops = {n.op_type for n in onnx.load(str(out)).graph.node}
        if prec == "fp16":
            assert onnx.TensorProto.FLOAT16 in types
        if prec == "int8":
            assert {"QuantizeLinear", "DequantizeLinear"} <= ops and onnx.TensorProto.INT8 in types
            # TensorRT builds Q/DQ of INT8 only: no INT32 bias DequantizeLinear (onnx-tensorrt #850)
            assert non_int8_dequantize_inputs(onnx.load(str(out))) == []
    assert abs(acc["fp32"] - lm.record.metrics["top1"]) < 0.01
    assert abs(acc["fp16"] - acc["fp32"]) <= 1.0  # stated tolerance: 1 point
    assert acc["int8"] >= acc["fp32"] - 5.0  # stated tolerance: 5 points on digits


def test_export_refuses_output_beyond_tolerance(cli, cnn_parent, tmp_path):
    _, _, err = cli("export", cnn_parent, "--out", tmp_path / "m.onnx", "--tolerance", "1e-12", expect=2)
    assert "refusing to write" in err and "input #" in err
    assert not (tmp_path / "m.onnx").exists() and not list(tmp_path.glob(".*tmp"))


HAS_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here: the real build test runs instead")
def test_tensorrt_absent_is_one_clear_line(cli, cnn_parent, tmp_path):
    _, _, err = cli("export", cnn_parent, "--format", "tensorrt", "--out", tmp_path / "m.engine", expect=2)
    assert err.count("\n") == 1 and "TensorRT is not available here" in err and "pip install" in err
    assert not (tmp_path / "m.engine").exists()


@pytest.mark.skipif(not HAS_TRT, reason="not available here: TensorRT and a CUDA GPU are needed to build engines")
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt_engine_matches_onnxruntime(cli, cnn_parent, tmp_path, precision):
    engine = tmp_path / f"m_{precision}.engine"
    cli("export", cnn_parent, "--format", "tensorrt", "--precision", precision, "--out", engine,
        "--timing-cache", tmp_path / "cache.bin", "--max-batch", "32")
    side = json.loads(engine.with_name(engine.name + ".json").read_text())
    assert side["agreement_vs_onnxruntime"]["top1_agreement"] >= 0.9 and (tmp_path / "cache.bin").stat().st_size > 0
    cli("profile", engine, "--backend", "tensorrt", "--device", "cuda", "--batch-sizes", "1,8", "--rounds", "3")
