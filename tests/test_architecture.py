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


def test_cli_functions_stay_short():
    """Commands parse options and call the library; no body (past the signature and docstring) over 60 lines."""
    import ast

    long = []
    for f in sorted((ROOT / "cli").glob("*.py")):
        for n in ast.walk(ast.parse(f.read_text())):
            if isinstance(n, ast.FunctionDef):
                first = n.body[1] if len(n.body) > 1 and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant) else n.body[0]
                if n.end_lineno - first.lineno + 1 > 60:
                    long.append(f"{f.name}:{n.name}")
    assert not long, long


def test_width_prune_help_shows_no_block_or_auto_options():
    from typer.testing import CliRunner

    from cli.main import app

    text = CliRunner().invoke(app, ["prune", "--help"], env={"COLUMNS": "200"}).output
    assert "--sparsity" in text and "--target-speedup" in text
    assert not any(o in text for o in ("--num-blocks", "--candidate-epochs", "--similarity", "--holdout")), text
