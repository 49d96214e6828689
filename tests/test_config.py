"""--config FILE: a TOML recipe maps onto a command's options; flags on the command line win; a key that
is not an option is refused in one line; every recipe in configs/ names only real options."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import typer

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> dict:
    from cli.main import application

    app = application()

    root = typer.main.get_command(app)
    out = {}
    for name, cmd in root.commands.items():
        out[name] = cmd
        for sub, subcmd in getattr(cmd, "commands", {}).items():
            out[f"{name}.{sub}"] = subcmd
    return out


def _tables(data: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out[prefix + k] = {kk: vv for kk, vv in v.items() if not isinstance(vv, dict)}
            out.update(_tables(v, prefix + k + "."))
    return out


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_recipe_names_real_options(recipe):
    from cli.common import config_defaults

    commands = _commands()
    tables = _tables(tomllib.loads(recipe.read_text()))
    assert tables, "a recipe holds one table per command"
    for name, section in tables.items():
        assert name in commands, f"{recipe.name}: no command `compress {name.replace('.', ' ')}`"
        assert len(config_defaults(commands[name], section, recipe.name)) == len(section)  # raises on a non-option


def _settings(out: Path) -> dict:
    return json.loads((out / "model.json").read_text())["lineage"][-1]["settings"]


def test_recipe_sets_options_and_flags_win(cli, cnn_parent, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[prune]\nmetric = "l1"\nsparsity = 0.25\nround-to = 2\n\n[prune.layers]\nnum-blocks = "1"\n')
    cli("prune", "--config", recipe, "--model", cnn_parent, "--out", tmp_path / "a", "-q")
    s = _settings(tmp_path / "a")
    assert (s["metric"], s["sparsity"], s["round_to"]) == ("l1", 0.25, 2)
    cli("prune", "--model", cnn_parent, "--config", recipe, "--sparsity", "0.5", "--out", tmp_path / "b", "-q")
    assert _settings(tmp_path / "b")["sparsity"] == 0.5  # the flag wins, wherever it stands
    cli("prune", "layers", "--config", recipe, "--model", cnn_parent, "--calib-size", "32", "--out", tmp_path / "c", "-q")
    assert len(json.loads((tmp_path / "c" / "model.json").read_text())["removed_blocks"]) == 1  # [prune.layers] only


@pytest.mark.parametrize("text,words", [('sparsity = 0.5\nwings = 2\n', "'wings' is not an option"),
                                        ('sparsity = [0.5\n', "not valid TOML")])
def test_bad_recipe_is_one_line(cli, cnn_parent, tmp_path, text, words):
    recipe = tmp_path / "r.toml"
    recipe.write_text(text)
    _, _, err = cli("prune", "--config", recipe, "--model", cnn_parent, "--out", tmp_path / "o", expect=2)
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "o").exists()
