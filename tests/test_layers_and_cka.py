"""Layer pruning, the CKA anchors, and seed 002's layer-or-filter loop through the CLI."""

import json
import random

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy.stats import ortho_group

from compressor.data import DataSpec, load_dataset
from orchestration.auto_loop import allocate, decision_path
from compressor.layers import find_blocks, removable
from compressor.modeldir import load_model_dir, remove_blocks
from compressor.models import ArchSpec, build
from compressor.similarity import linear_cka
from exporters.model_export import check_inputs


def test_cka_matches_kornblith_reference():
    np.random.seed(1337)
    x = np.random.randn(100, 10)
    y = np.random.randn(100, 10) + x
    assert round(linear_cka(x, y), 5) == 0.55761
    assert round(linear_cka(x, y, debiased=True), 5) == 0.51346


reps = st.integers(min_value=0, max_value=10_000).map(lambda s: np.random.default_rng(s).standard_normal((40, 6)))


@settings(max_examples=25, deadline=None)
@given(reps, st.floats(min_value=0.01, max_value=100), st.integers(min_value=0, max_value=10_000))
def test_cka_invariances(x, scale, seed):
    assert linear_cka(x, x) == pytest.approx(1.0)
    q = ortho_group.rvs(x.shape[1], random_state=seed)
    y = np.random.default_rng(seed).standard_normal(x.shape)
    assert linear_cka(x, y) == pytest.approx(linear_cka(x @ q * scale, y), rel=1e-9, abs=1e-12)
    assert 0.0 <= linear_cka(x, y) <= 1.0 + 1e-12


@pytest.mark.parametrize("source,name", [("compress", "resnet20"), ("torchvision", "resnet50")])
def test_zeroing_the_last_batchnorm_equals_removing_the_block(source, name):
    torch.manual_seed(0)
    m = build(ArchSpec(source, name), 10).eval()
    for mod in m.modules():  # non-trivial BN statistics and affine terms
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.1, 0.1)
    x = torch.randn(2, 3, 64, 64)
    block = removable(m, 1)[0]
    mod = m.get_submodule(block.path)
    last_bn = mod.bn3 if hasattr(mod, "bn3") else mod.bn2
    with torch.no_grad():
        last_bn.weight.zero_()
        last_bn.bias.zero_()
        zeroed = m(x)
        remove_blocks(m, [block.path])
        removed = m(x)
    assert torch.allclose(zeroed, removed, atol=1e-6)


def test_block_eligibility():
    m = build(ArchSpec("compress", "resnet20"), 10)
    blocks = find_blocks(m)
    assert len(blocks) == 9
    assert [b.path for b in removable(m, 2)] == ["layer1.2", "layer2.2", "layer3.2"] or len(removable(m, 2)) == 6
    assert all(b.index > 0 for b in removable(m, 1))
    assert not any(b.path in ("layer2.0", "layer3.0") for b in removable(m, 1))  # downsampling blocks


def test_allocate_matches_count_and_keeps_one_filter():
    for seed in range(20):
        widths = [8, 8, 16, 16, 32]
        count = random.Random(seed).randint(1, sum(widths) - len(widths))
        share = allocate(widths, count, random.Random(seed))
        assert sum(share) == count and all(s <= w - 1 for s, w in zip(share, widths))
    assert allocate([8, 16], 12, random.Random(0)) == [4, 8]  # an exact proportional split needs no random fill


def test_authors_allocation_divides_by_every_conv_filter():
    """ResNet-32's first block convs (16x5, 32x5, 64x5 = 560 filters) losing 128: ours gives floor(128 w / 560)
    = 3/7/14 each (120) and 8 at random; the release divides by all 1,232 conv filters of the network
    (stem, both convs of every block, projections): 1/3/6 each (50) and 78 at random."""
    widths = [16] * 5 + [32] * 5 + [64] * 5
    ours = allocate(widths, 128, random.Random(0))
    authors = allocate(widths, 128, random.Random(0), total=1232)
    assert sum(ours) == sum(authors) == 128
    assert all(s >= f for s, f in zip(ours, [3] * 5 + [7] * 5 + [14] * 5))
    assert sum(min(s, f) for s, f in zip(authors, [1] * 5 + [3] * 5 + [6] * 5)) == 50  # the proportional floor
    model = build(ArchSpec("compress", "resnet32"), 10)
    assert sum(m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)) == 1232


def test_decision_path_notation():
    assert decision_path(["L", "F", "F", "L", "L", "L"]) == "L, F², L³"
    assert decision_path([]) == ""


def test_layer_pruning_through_cli(cli, cnn_parent, tmp_path):
    out = tmp_path / "layers"
    cli("prune", "layers", "--model", cnn_parent, "--metric", "kl", "--num-blocks", "max",
        "--calib-size", "64", "--out", out, "-q")
    lm = load_model_dir(out)
    assert len(lm.record.removed_blocks) == 3
    assert all(isinstance(lm.model.get_submodule(p), torch.nn.Identity) for p in lm.record.removed_blocks)
    assert lm.record.metrics["macs"] < load_model_dir(cnn_parent).record.metrics["macs"]
    _, _, err = cli("prune", "layers", "--model", cnn_parent, "--num-blocks", "5", "--out", tmp_path / "x", expect=2)
    assert "only 3 blocks can be removed" in err


def _check_iteration(cli, d, tmp_path):
    lm = load_model_dir(d)
    onnx_path = tmp_path / f"{d.parent.parent.name}_{d.name}.onnx"
    cli("export", d, "--out", onnx_path, "--check-size", "16")
    x, _ = check_inputs(lm, load_dataset(DataSpec("digits")), 16)
    np.testing.assert_allclose(ort.InferenceSession(str(onnx_path)).run(None, {"input": x})[0],
                               lm.model(torch.from_numpy(x)).detach().numpy(), atol=1e-4, rtol=1e-4)


def test_auto_loop_end_to_end(cli, cnn_parent, tmp_path):
    """Three iterations of the random walk (both candidates are still built, fine-tuned and compared by CKA;
    a seed where the walk takes both kinds). bench/seed002.py runs the CKA choice at full length."""
    out = tmp_path / "auto"
    cli("prune", "auto", "--model", cnn_parent, "--iterations", "3", "--candidate-epochs", "1", "--epochs-per-iteration", "1",
        "--calib-size", "60", "--train-size", "500", "--seed", "1", "--similarity", "random", "--out", out, "-q")
    log = json.loads((out / "auto_log.json").read_text())
    assert len(log["iterations"]) == 3 and log["path"]
    for row in log["iterations"]:
        assert row["cka_layer"] is not None and row["cka_filter"] is not None
    assert {row["decision"] for row in log["iterations"]} == {"L", "F"}, log["path"]
    _check_iteration(cli, out / log["iterations"][-1]["dir"], tmp_path)
    assert log["holdout"]["unseen_by_parent"] is False  # the parent trained on all of digits' training split
    assert "the parent trained on them" in (out / "auto_log.md").read_text()
    assert (out / "auto_log.md").read_text().startswith("# Layer/filter pruning by CKA")
    load_model_dir(out)  # the run's directory is itself the final model


def test_auto_needs_residual_stages(cli, tmp_path):
    _, _, err = cli("prune", "auto", "--model", "vgg16_bn_cifar", "--data", "digits", "--out", tmp_path / "x", expect=2)
    assert "residual" in err and not (tmp_path / "x").exists()


def test_auto_loop_on_a_vit(cli, vit_parent, tmp_path):
    """On a timm ViT the layer candidate removes a block and the width candidate as many heads and FFN
    neurons as that block holds, spread over the blocks: the block's parameters less its two LayerNorms
    and the biases of attention's and the MLP's output layers. Both reload and export."""
    parent = load_model_dir(vit_parent)
    p_params = sum(p.numel() for p in parent.model.parameters())
    block = parent.model.blocks[0]
    b_params = sum(p.numel() for p in block.parameters())
    d = parent.model.embed_dim
    params = {}
    for only in ("layers", "filters"):
        out = tmp_path / only
        cli("prune", "auto", "--model", vit_parent, "--only", only, "--min-blocks-per-stage", "1", "--iterations", "1",
            "--metric", "l1", "--candidate-epochs", "0", "--epochs-per-iteration", "1", "--calib-size", "32", "--train-size", "300",
            "--out", out, "-q")
        row = json.loads((out / "auto_log.json").read_text())["iterations"][0]
        lm = load_model_dir(out / row["dir"])
        params[only] = sum(p.numel() for p in lm.model.parameters())
        assert params[only] == row["params"]
        _check_iteration(cli, out / row["dir"], tmp_path)
    assert params["layers"] == p_params - b_params
    assert params["filters"] == p_params - (b_params - 4 * d - 2 * d)  # two LayerNorms, proj and fc2 biases stay
    heads = [b.attn.num_heads for b in load_model_dir(tmp_path / "filters").model.blocks]
    assert sum(heads) == sum(b.attn.num_heads for b in parent.model.blocks) - block.attn.num_heads and min(heads) >= 1


def test_held_out_images_stay_out_of_every_descendant(cli, tmp_path):
    """A parent trained with --holdout never sees those images; its pruned, fine-tuned children inherit the
    split, and prune auto measures on exactly those images (and says they are unseen)."""
    from compressor.data import DataSpec, load_dataset

    parent = tmp_path / "parent"
    cli("finetune", "--model", "resnet20", "--model-arg", "width=4", "--input-size", "16", "--data", "digits", "--holdout", "0.1",
        "--epochs", "4", "--lr", "5e-3", "--out", parent, "-q")
    rec = load_model_dir(parent).record
    assert rec.dataset.holdout == 0.1 and rec.lineage[-1]["settings"]["data"]["holdout"] == 0.1
    # A parent that learned something and a cut it survives: a fine-tune left at chance is refused (test_finetune).
    cli("prune", "--model", parent, "--data", "digits", "--sparsity", "0.25", "--calib-size", "32", "--out", tmp_path / "p", "-q")
    cli("finetune", tmp_path / "p", "--data", "digits", "--epochs", "1", "--lr", "5e-3", "--out", tmp_path / "ft", "-q")
    assert load_model_dir(tmp_path / "ft").record.lineage[-1]["settings"]["data"]["holdout"] == 0.1
    full, split = load_dataset(DataSpec("digits")), load_dataset(DataSpec("digits", holdout=0.1))
    assert len(split.train) + len(split.held) == len(full.train) and abs(len(split.held) - 0.1 * len(full.train)) <= 10  # per class
    out = tmp_path / "auto"
    cli("prune", "auto", "--model", parent, "--iterations", "1", "--candidate-epochs", "0", "--epochs-per-iteration", "0",
        "--calib-size", "32", "--min-accuracy", "1", "--out", out, "-q")
    h = json.loads((out / "auto_log.json").read_text())["holdout"]
    assert h["unseen_by_parent"] is True and h["images"] == len(split.held)
