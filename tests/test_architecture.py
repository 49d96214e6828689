"""Imports run one way: cli -> orchestration -> profilers -> exporters -> compressor (the contract in
pyproject.toml, checked by import-linter, function-local imports included); the code passes ruff."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_layers_contract_is_kept(monkeypatch, capsys):
    from importlinter.cli import lint_imports

    monkeypatch.chdir(ROOT)
    code = lint_imports()
    out = capsys.readouterr().out
    assert code == 0, out
    assert "one-way layers KEPT" in out


def test_ruff_is_clean():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "compressor", "exporters", "profilers", "orchestration", "cli",
                        "tests", "bench"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
