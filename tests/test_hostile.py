"""Hostile and degenerate inputs beyond the bad-flag matrix: paths that cannot be written, files that are
not what they claim, degenerate data, a full disk. Each case: the exit code, one line without a
traceback, and the state of the disk afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image


def _one_line(err: str) -> None:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err and "internal error" not in err, err


def test_refused_prune_creates_no_parent_directories(cli, cnn_parent, tmp_path):
    out = tmp_path / "newparent" / "deeper" / "out"
    _, _, err = cli("prune", "--model", cnn_parent, "--sparsity", "1.5", "--out", out, expect=2)
    _one_line(err)
    assert not (tmp_path / "newparent").exists()


def test_parent_that_is_a_file(cli, cnn_parent, tmp_path):
    (tmp_path / "plain").write_text("x")
    _, _, err = cli("prune", "--model", cnn_parent, "--out", tmp_path / "plain" / "out", expect=2)
    _one_line(err)
    assert "is a file" in err


def test_name_too_long(cli, cnn_parent, tmp_path):
    _, _, err = cli("prune", "--model", cnn_parent, "--out", tmp_path / ("x" * 300), expect=2)
    _one_line(err)
    assert "longer than" in err and list(tmp_path.iterdir()) == []


def test_export_onto_a_directory(cli, cnn_parent, tmp_path):
    (tmp_path / "d").mkdir()
    _, _, err = cli("export", cnn_parent, "--out", tmp_path / "d", "--overwrite", expect=2)
    _one_line(err)
    assert "is a directory" in err and (tmp_path / "d").is_dir()


def test_random_bytes_as_onnx(cli, tmp_path):
    bad = tmp_path / "m.onnx"
    bad.write_bytes(os.urandom(2048))
    _, _, err = cli("profile", bad, "--rounds", "3", expect=2)
    _one_line(err)
    assert "not a readable ONNX file" in err


def test_compare_json_that_is_not_json(cli, tmp_path):
    d = tmp_path / "grid"
    d.mkdir()
    (d / "compare.json").write_text("{ nope")
    _, _, err = cli("profile", d, "--rounds", "3", expect=2)
    _one_line(err)
    assert "not a compare record" in err


def test_zero_byte_checkpoint(cli, tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    out = tmp_path / "o"
    _, _, err = cli("prune", "--model", "resnet20", "--model-arg", "width=4", "--input-size", "16", "--checkpoint",
                    tmp_path / "empty.pt", "--out", out, expect=2)
    _one_line(err)
    assert not out.exists()


def test_test_size_zero_is_not_ignored(cli, cnn_parent, tmp_path):
    _, _, err = cli("finetune", cnn_parent, "--test-size", "0", "--epochs", "1", "--out", tmp_path / "o", expect=2)
    _one_line(err)
    assert "--test-size" in err and not (tmp_path / "o").exists()


def test_one_class_image_folder(cli, tmp_path):
    root = tmp_path / "imgs"
    for split in ("train", "val"):
        (root / split / "only").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), (i, 2 * i, 3 * i)).save(root / split / "only" / f"{i}.png")
    out = tmp_path / "o"
    _, _, err = cli("finetune", "--model", "resnet20", "--model-arg", "width=4", "--input-size", "16", "--data", "imagefolder",
                    "--data-dir", root, "--epochs", "1", "--out", out, expect=2)
    _one_line(err)
    assert "fewer than 2 classes" in err and not out.exists()


def test_compare_profile_batch_zero_refused_before_work(cli, cnn_parent, tmp_path):
    out = tmp_path / "grid"
    _, _, err = cli("compare", "--model", cnn_parent, "--metrics", "l1", "--sparsities", "0.5", "--profile-batch", "0",
                    "--out", out, expect=2)
    _one_line(err)
    assert "--profile-batch" in err and not out.exists() and list(tmp_path.iterdir()) == []


def test_full_disk_fails_in_one_line_and_leaves_nothing(cnn_parent, tmp_path):
    """RLIMIT_FSIZE makes every write past 64 KiB fail with EFBIG, as a full disk would."""
    out = tmp_path / "m.onnx"
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536)); "
            "from cli.main import main; sys.argv = ['compress'] + sys.argv[1:]; main()")
    r = subprocess.run([sys.executable, "-c", code, "export", str(cnn_parent), "--out", str(out)], capture_output=True,
                       text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode in (1, 2), r.stderr
    _one_line(r.stderr)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_history_is_strict_json(cnn_parent, tmp_path):
    """NaN never reaches history.json (json.loads would accept NaN; strict parsing does not)."""
    from cli.main import run

    assert run(["finetune", str(cnn_parent), "--epochs", "1", "--out", str(tmp_path / "ft"), "-q"]) == 0
    text = (tmp_path / "ft" / "history.json").read_text()

    def no_constants(c):
        raise ValueError(c)

    json.loads(text, parse_constant=no_constants)


@pytest.mark.parametrize("field,value", [("input", {"channels": -3, "height": 16, "width": 16}),
                                         ("num_classes", "ten"), ("changed_modules", {"fc": {"tensors": {"weight": [-1, 4]}}})])
def test_model_json_fields_of_the_wrong_type(cli, cnn_parent, tmp_path, field, value):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(cnn_parent, d)
    rec = json.loads((d / "model.json").read_text())
    rec[field] = value
    (d / "model.json").write_text(json.dumps(rec))
    _, _, err = cli("export", d, "--out", tmp_path / "m.onnx", expect=2)
    _one_line(err)
    assert not (tmp_path / "m.onnx").exists()


JSON = st.recursive(st.none() | st.booleans() | st.integers(-5, 300) | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=8)


@pytest.fixture(scope="module")
def record_text(cnn_parent):
    return (cnn_parent / "model.json").read_text()


def _fuzz_paths(rec: dict) -> list[tuple]:
    out = [(k,) for k in rec]
    out += [("input", k) for k in rec["input"]] + [("arch", k) for k in rec["arch"]] + [("weights", k) for k in rec["weights"]]
    for name, ch in list(rec["changed_modules"].items())[:3]:
        out += [("changed_modules", name, "attrs"), ("changed_modules", name, "tensors")]
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_model_json_loads_or_is_refused_in_one_line(tmp_path_factory, cnn_parent, record_text, data):
    """Any value in any field of model.json: the model loads, or a UserError says what is wrong."""
    import shutil

    from compressor.errors import UserError
    from compressor.modeldir import load_model_dir

    rec = json.loads(record_text)
    path = data.draw(st.sampled_from(_fuzz_paths(rec)))
    value = data.draw(JSON)
    node = rec
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    d = tmp_path_factory.mktemp("fuzz") / "m"
    shutil.copytree(cnn_parent, d)
    (d / "model.json").write_text(json.dumps(rec))
    try:
        load_model_dir(d)
    except UserError as e:
        assert "\n" not in str(e)
