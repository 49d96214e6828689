"""A written model directory always reloads; torch-pruning's failures on some groups leave those groups
alone instead of refusing the model; --round-to rounds to the nearest multiple; nothing pruned is refused."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

from compressor import modeldir, pruning
from compressor.data import DataSpec, InputSpec
from compressor.errors import UserError
from compressor.modeldir import ModelRecord, load_model_dir, save_model_dir
from compressor.models import ArchSpec, build
from compressor.pruning import WidthConfig, prune_width, round_kept

SPEC16 = InputSpec(3, 16, 16, (0.5,) * 3, (0.25,) * 3)


def _record(arch, spec=SPEC16):
    return ModelRecord(arch, 10, spec, [str(i) for i in range(10)], DataSpec("digits"))


def test_read_only_width_properties_reload(tmp_path):
    """timm's ConvNormAct exposes out_channels as a read-only property: pruned RegNet/RepVGG reload."""
    arch = ArchSpec("timm", "regnetx_002")
    torch.manual_seed(0)
    model = build(arch, 10).eval()
    prune_width(model, SPEC16, WidthConfig(metric="l1", sparsity=0.5))
    save_model_dir(tmp_path / "m", model, _record(arch))
    changed = json.loads((tmp_path / "m" / "model.json").read_text())["changed_modules"]
    assert changed and not any("out_channels" in c["attrs"] and c["type"] == "ConvNormAct" for c in changed.values())
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(load_model_dir(tmp_path / "m").model(x), model(x))


def test_directory_that_would_not_reload_is_never_written(tmp_path, monkeypatch):
    arch = ArchSpec("compress", "resnet20", {"width": 8})
    model = build(arch, 10).eval()
    prune_width(model, SPEC16, WidthConfig(metric="l1", sparsity=0.5))
    monkeypatch.setattr(modeldir, "structure_diff", lambda m, ref: {})  # forget the pruned shapes
    with pytest.raises(UserError, match="would not load again"):
        save_model_dir(tmp_path / "m", model, _record(arch))
    assert not list(tmp_path.iterdir())


class TwoBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.c(torch.relu(self.b(torch.relu(self.a(x)))))
        return self.fc(x.mean((2, 3)))


def test_groups_torch_pruning_breaks_are_left_alone(monkeypatch):
    """A group whose surgery breaks the model (here: any change to b's width) is found and left alone;
    the other groups are pruned."""
    real = pruning.check_runs

    def check(model, spec, when):
        if model.b.out_channels != 8:
            raise UserError("TwoBranch does not run after pruning (b is special)")
        real(model, spec, when)

    monkeypatch.setattr(pruning, "check_runs", check)
    model = TwoBranch().eval()
    report = prune_width(model, SPEC16, WidthConfig(metric="l1", sparsity=0.5))
    assert list(report.left_alone) == ["b"] and "b is special" in report.left_alone["b"]
    assert (model.a.out_channels, model.b.out_channels, model.c.out_channels) == (4, 8, 4)
    assert (report.units, report.removed) == (24, 8)  # b's 8 channels count as asked-for but not removed
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_nothing_pruned_is_refused():
    model = TwoBranch().eval()
    with pytest.raises(UserError, match="nothing was pruned"):
        prune_width(model, SPEC16, WidthConfig(metric="l1", sparsity=0.1, round_to=8))  # 7 kept rounds back to 8


@pytest.mark.parametrize("keep,width,multiple,want", [(12, 16, 16, 16), (4, 16, 16, 16), (23, 32, 16, 16),
                                                      (24, 32, 16, 32), (40, 64, 16, 48), (5, 6, 8, 6), (9, 64, 8, 8)])
def test_round_kept_is_nearest_and_never_empty(keep, width, multiple, want):
    assert round_kept(keep, width, multiple) == want


def test_round_to_16_prunes_resnet56_at_25_percent():
    """Rounding down refused this outright (it would empty every 16-channel conv of the first stage)."""
    model = build(ArchSpec("compress", "resnet56"), 10).eval()
    spec = InputSpec(3, 32, 32, (0.5,) * 3, (0.25,) * 3)
    report = prune_width(model, spec, WidthConfig(metric="l2", sparsity=0.25, round_to=16))
    assert (report.removed, report.units) == (10 * 16, 10 * (16 + 32 + 64))  # only the 10 groups of stage 3 lose 16
    widths = {m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)}
    assert widths <= {16, 32, 48, 64} and 48 in widths  # 32 * 0.75 = 24 -> 32; 64 * 0.75 = 48


def test_non_finite_weights_are_never_written_nor_exported(tmp_path):
    import numpy as np

    from exporters.onnx_export import export

    arch = ArchSpec("compress", "resnet20", {"width": 4})
    model = build(arch, 10).eval()
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    with pytest.raises(UserError, match="non-finite"):
        save_model_dir(tmp_path / "m", model, _record(arch))
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    with pytest.raises(UserError, match="not finite"):
        export(model, (3, 16, 16), tmp_path / "m.onnx", inputs=x, inputs_are="random")
    assert not list(tmp_path.iterdir())


def test_swin_window_heads_are_pruned_and_reload(tmp_path):
    """timm Swin: heads (qkv rows, proj columns, relative-position bias columns) and FFN neurons go; the
    directory reloads to the same function."""
    arch = ArchSpec("timm", "swin_tiny_patch4_window7_224", {"img_size": 64, "depths": [2, 2, 2, 2]})
    torch.manual_seed(0)
    model = build(arch, 10).eval()
    spec = InputSpec(3, 64, 64, (0.5,) * 3, (0.25,) * 3)
    before = {n: m.num_heads for n, m in model.named_modules() if type(m).__name__ == "WindowAttention"}
    report = prune_width(model, spec, WidthConfig(metric="l2", sparsity=0.5))
    after = {n: m.num_heads for n, m in model.named_modules() if type(m).__name__ == "WindowAttention"}
    assert all(after[n] == b - math.ceil(b / 2) for n, b in before.items()), (before, after)
    assert report.heads and any(v[0] > v[1] for v in report.heads.values())
    for n, m in model.named_modules():
        if type(m).__name__ == "WindowAttention":
            assert m.relative_position_bias_table.shape[1] == m.num_heads == m.qkv.out_features // (3 * 32)
    save_model_dir(tmp_path / "m", model, _record(arch, spec))
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(load_model_dir(tmp_path / "m").model(x), model(x), atol=1e-6)


def test_keep_params_finds_the_sparsity_of_a_matched_size(cli, cnn_parent, tmp_path):
    """--keep-params: the child keeps the asked share of the parent's parameters (compare methods at the same
    size, as the papers' per-ratio tables do); the choice is recorded."""
    out = tmp_path / "kp"
    _, text, _ = cli("prune", "--model", cnn_parent, "--metric", "l1", "--keep-params", "0.6", "--out", out, "-q")
    parent = json.loads((cnn_parent / "model.json").read_text())["metrics"]["params"]
    rec = json.loads((out / "model.json").read_text())
    assert abs(rec["metrics"]["params"] / parent - 0.6) < 0.05 and "keeps" in text
    last = rec["lineage"][-1]["settings"]
    assert last["keep_params"] == 0.6 and abs(last["kept_params"] - rec["metrics"]["params"] / parent) < 1e-3
    assert 0 < last["sparsity"] < 1
    for bad, words in ((["--keep-params", "0.6", "--sparsity", "0.3"], "do not also give --sparsity"),
                       (["--keep-params", "1.5"], "(0, 1)"), (["--keep-macs", "0.5", "--global"], "global")):
        _, _, err = cli("prune", "--model", cnn_parent, *bad, "--out", tmp_path / "x", expect=2)
        assert words in err and not (tmp_path / "x").exists()


def test_layer_sparsity_prunes_only_the_matched_groups(cli, cnn_parent, tmp_path):
    """--layer-sparsity PATTERN=RATIO: a per-layer allocation (as the papers' per-stage ratios); groups whose
    root layer matches take that ratio, the rest --sparsity (0 here: untouched)."""
    out = tmp_path / "stage3"
    cli("prune", "--model", cnn_parent, "--sparsity", "0", "--layer-sparsity", "layer3.*=0.5", "--out", out, "-q")
    rec = json.loads((out / "model.json").read_text())
    changed = list(rec["changed_modules"])
    assert any(n.startswith("layer3.") for n in changed)
    assert all(n.startswith("layer3.") or n == "fc" for n in changed), changed  # fc reads stage 3's residual width
    assert rec["lineage"][-1]["settings"]["layer_sparsity"] == [["layer3.*", 0.5]]
    for bad, words in ((["--layer-sparsity", "layer3.*"], "PATTERN=RATIO"), (["--layer-sparsity", "layer3.*=1.2"], "0 <= RATIO < 1"),
                       (["--layer-sparsity", "layer3.*=0.5", "--global"], "global")):
        _, _, err = cli("prune", "--model", cnn_parent, *bad, "--out", tmp_path / "x", expect=2)
        assert words in err and not (tmp_path / "x").exists()
