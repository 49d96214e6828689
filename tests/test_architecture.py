"""Imports run one way: cli -> orchestration -> profilers -> exporters -> compressor (the contract in
pyproject.toml, checked by import-linter, function-local imports included)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_layers_contract_is_kept(monkeypatch, capsys):
    from importlinter.cli import lint_imports

    monkeypatch.chdir(ROOT)
    code = lint_imports()
    out = capsys.readouterr().out
    assert code == 0, out
    assert "one-way layers KEPT" in out
