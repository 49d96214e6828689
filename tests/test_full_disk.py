"""A full or size-limited disk is one line naming the path (exit 1), with nothing left behind, for every
writer: safetensors (prune), torch checkpoints (finetune), OpenVINO IR, bundles (their ONNX export and the
archive) and reports. The limit is RLIMIT_FSIZE on a real process, as `ulimit -f` sets it."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_CNN, without_progress

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 16 * 1024  # bytes: below every artefact of the tiny ResNet-20


def _limited():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def _openvino() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


CASES = {
    "prune (safetensors)": lambda p, o: ["prune", *TINY_CNN, "--data", "fake", "--sparsity", "0.5", "--out", o],
    "finetune (checkpoint)": lambda p, o: ["finetune", p, "--epochs", "1", "--train-size", "64", "--test-size", "64", "--out", o],
    "export openvino": lambda p, o: ["export", p, "--format", "openvino", "--out", o],
    "package": lambda p, o: ["package", p, "--target", "onnxruntime-cpu", "--no-profile", "--out", f"{o}.tar.gz"],
    "profile report": lambda p, o: ["profile", p, "--backend", "torch", "--batch-sizes", "1", "--rounds", "2", "--no-energy", "--out", o],
}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c == "export openvino" else c for c in CASES])  # the OpenVINO export writes through the same atomic path as the ONNX one
def test_a_size_limited_disk_is_one_line_and_leaves_nothing(cnn_parent, tmp_path, case):
    if case == "export openvino" and not _openvino():
        pytest.skip("openvino is not installed")
    where = tmp_path / "outs"
    where.mkdir()
    args = CASES[case](str(cnn_parent), str(where / "result"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    p = subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300, preexec_fn=_limited)
    lines = [ln for ln in without_progress(p.stderr).splitlines() if ln.strip()]
    assert p.returncode == 1, p.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: writing failed: "), p.stderr[-2000:]
    assert ("File too large" in lines[0] or "file-size limit" in lines[0]) and f"({where}/result" in lines[0], lines[0]
    assert list(where.iterdir()) == [], f"left behind: {list(where.iterdir())}"
