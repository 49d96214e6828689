"""Ctrl-C at any moment ends a command within a couple of seconds: exit 130, one line, nothing written.
The signal is sent to a real process (SIGINT at its default, as a terminal sends it) while it imports its
libraries, while it loads data and while it scores units."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import without_progress

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("after_s", [0.4, 1.5, pytest.param(5.0, marks=pytest.mark.slow)])  # 5 s: the same path, later
def test_sigint_ends_the_command_within_two_seconds_and_writes_nothing(tmp_path, after_s):
    out = tmp_path / "runs" / "kl"
    cmd = [sys.executable, "-m", "cli.main", "prune", "--model", "resnet20", "--model-arg", "width=8", "--input-size", "16",
           "--data", "digits", "--metric", "kl", "--calib-size", "512", "--out", str(out), "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    p = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(after_s)
    if p.poll() is not None:
        pytest.fail(f"the command ended before the signal: {p.communicate()}")
    sent = time.monotonic()
    p.send_signal(signal.SIGINT)
    try:
        _, err = p.communicate(timeout=10)
    finally:
        p.kill()
    took = time.monotonic() - sent
    lines = [ln for ln in without_progress(err).splitlines() if ln.strip()]
    assert p.returncode == 130, err[-2000:]
    assert took < 3.5, f"{took:.1f} s after Ctrl-C"
    assert lines == ["interrupted"], err[-2000:]
    assert not out.exists() and not any((tmp_path / "runs").glob("*")) if (tmp_path / "runs").exists() else True
