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


def test_much_less_pruned_than_asked_is_said_and_recorded(cli, cnn_parent, tmp_path):
    """--round-to 16 keeps the 8- and 16-channel stages whole: 29 % of the units go where 60 % were asked."""
    out = tmp_path / "p"
    _, stdout, _ = cli("prune", "--model", cnn_parent, "--sparsity", "0.6", "--round-to", "16", "--out", out)
    assert "much less pruned than asked: removed 28.6% of the prunable units (asked 60%)" in stdout
    outcome = json.loads((out / "model.json").read_text())["lineage"][-1]["metrics"]
    assert outcome["short_of_request"] is True and outcome["achieved_sparsity"] == round(64 / 224, 4)


def test_history_is_strict_json(cnn_parent, tmp_path):
    """NaN never reaches history.json (json.loads would accept NaN; strict parsing does not)."""
    from cli.main import run

    assert run(["finetune", str(cnn_parent), "--epochs", "1", "--out", str(tmp_path / "ft"), "-q"]) == 0
    text = (tmp_path / "ft" / "history.json").read_text()

    def no_constants(c):
        raise ValueError(c)

    json.loads(text, parse_constant=no_constants)


@pytest.mark.parametrize("field,value", [("input", {"channels": -3, "height": 16, "width": 16}),
                                         ("num_classes", "ten"), ("changed_modules", {"fc": {"tensors": {"weight": [-1, 4]}}}),
                                         ("removed_blocks", [None])])
def test_model_json_fields_of_the_wrong_type(cli, cnn_parent, tmp_path, field, value):
    """The schema check names the field."""
    import shutil

    d = tmp_path / "m"
    shutil.copytree(cnn_parent, d)
    rec = json.loads((d / "model.json").read_text())
    rec[field] = value
    (d / "model.json").write_text(json.dumps(rec))
    _, _, err = cli("export", d, "--out", tmp_path / "m.onnx", expect=2)
    _one_line(err)
    assert f"field {field}" in err and not (tmp_path / "m.onnx").exists()


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


# SIGKILL runs no cleanup. Every rename goes through os.replace, which this hook announces on stderr and
# slows down, so the test can kill the command at the k-th rename: mid-write or between staging and the final swap.
KILL_HOOK = ("import os, sys, time\nreal = os.replace\n"
             "def slow(s, d, **kw):\n    sys.stderr.write(f'RENAME {d}\\n'); sys.stderr.flush(); time.sleep(0.3)\n"
             "    return real(s, d, **kw)\n"
             "os.replace = slow\nfrom cli.main import main\nsys.argv = ['compress'] + sys.argv[1:]\nmain()")


def _killed_at_rename(args: list, k: int) -> int:
    """Run `compress args` and SIGKILL it during its k-th rename; returns the renames seen (< k: it finished)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-c", KILL_HOOK, *map(str, args)], stderr=subprocess.PIPE,
                         stdout=subprocess.DEVNULL, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    seen = 0
    for line in p.stderr:
        seen += line.startswith("RENAME ")
        if seen == k:
            p.kill()
            break
    p.wait(timeout=300)
    return seen


def _hidden(d: Path) -> list[str]:
    return [p.name for p in d.iterdir() if p.name.startswith(".")]


# later renames, and package (its archive goes through the same atomic.temp_path_for as export's file, and
# test_full_disk's package case checks that a failed bundle leaves nothing): the same staging paths
@pytest.mark.parametrize("command,k", [("prune", 1), pytest.param("prune", 3, marks=pytest.mark.slow),
                                       ("export", 1), pytest.param("package", 1, marks=pytest.mark.slow),
                                       pytest.param("compare", 2, marks=pytest.mark.slow)])
def test_sigkill_leaves_output_absent_or_complete(cli, cnn_parent, tmp_path, command, k):
    """Killed at a rename, `--out` is absent or complete and loadable (a compare grid: resumable); the next
    run of the same command succeeds and removes what the killed one left behind."""
    import onnx

    from compressor.modeldir import load_model_dir

    out = tmp_path / {"prune": "p", "export": "m.onnx", "package": "b.tar.gz", "compare": "grid"}[command]
    args = {"prune": ["prune", "--model", cnn_parent, "--sparsity", "0.5", "--out", out, "-q"],
            "export": ["export", cnn_parent, "--out", out],
            "package": ["package", cnn_parent, "--no-profile", "--out", out],
            "compare": ["compare", "--model", cnn_parent, "--metrics", "l1", "--sparsities", "0.5", "--finetune-epochs", "1",
                        "--calib-size", "32", "--profile-backend", "none", "--out", out, "-q"]}[command]
    seen = _killed_at_rename(args, k)
    assert seen >= k, f"{command} finished after {seen} renames: pick an earlier kill point"
    if command == "prune" and out.exists():
        load_model_dir(out)
    elif command == "export" and out.exists():
        onnx.checker.check_model(onnx.load(str(out)))
    elif command == "package" and out.exists():
        cli("package", "--verify", out)
    elif command == "compare" and out.exists():
        json.loads((out / "compare.json").read_text())
        load_model_dir(out / "parent")
    again = args + (["--resume"] if command == "compare" else ["--overwrite"])
    cli(*again)
    assert out.exists() and _hidden(tmp_path) == [], _hidden(tmp_path)
