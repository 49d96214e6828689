"""Models by name, the model directory (bit-identical reload, refusal of bad files), MAC counting anchors."""

import json

import pytest
import torch

from compressor.data import DataSpec, InputSpec
from compressor.errors import UserError
from compressor.layers import find_blocks, removable
from compressor.modeldir import ModelRecord, load_model_dir, remove_blocks, save_model_dir
from compressor.models import ArchSpec, build, resolve
from compressor.pruning import WidthConfig, prune_width
from compressor.flops import count

SPEC16 = InputSpec(3, 16, 16, (0.5,) * 3, (0.25,) * 3)


@pytest.mark.parametrize("name,source", [("resnet56", "compress"), ("vgg16_bn_cifar", "compress"), ("vit_cifar", "compress"),
                                         ("resnet18", "torchvision"), ("mobilenet_v3_small", "torchvision"),
                                         ("deit_tiny_patch16_224", "timm"), ("timm:resnet18", "timm")])
def test_names_resolve_to_libraries(name, source):
    assert resolve(name)[0] == source


def test_unknown_model_is_a_user_error():
    with pytest.raises(UserError, match="unknown model"):
        resolve("resnet9000")


def _save(tmp_path, model, arch, spec=SPEC16, removed=()):
    rec = ModelRecord(arch, 10, spec, [str(i) for i in range(10)], DataSpec("digits"), removed_blocks=list(removed))
    save_model_dir(tmp_path / "m", model, rec)
    return tmp_path / "m"


@pytest.mark.parametrize("arch", [ArchSpec("compress", "resnet20", {"width": 8}),
                                  ArchSpec("compress", "vit_cifar", {"depth": 2, "embed_dim": 48, "num_heads": 4, "img_size": 16}),
                                  ArchSpec("torchvision", "resnet18")])
def test_pruned_directory_reloads_bit_identically(tmp_path, arch):
    torch.manual_seed(0)
    model = build(arch, 10).eval()
    prune_width(model, SPEC16, WidthConfig(metric="l1", sparsity=0.5, scope=("heads", "ffn", "embed")))
    removed = []
    if arch.name.startswith("resnet"):
        removed = [removable(model, 1)[0].path]
        remove_blocks(model, removed)
    d = _save(tmp_path, model, arch, removed=removed)
    loaded = load_model_dir(d)
    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(model(x), loaded.model(x))
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.model.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    rec = json.loads((d / "model.json").read_text())
    assert rec["changed_modules"] and rec["weights"]["sha256"]


def _tiny(tmp_path):
    arch = ArchSpec("compress", "resnet20", {"width": 8})
    return _save(tmp_path, build(arch, 10).eval(), arch)


def test_modified_weights_are_refused(tmp_path):
    d = _tiny(tmp_path)
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError, match="SHA-256"):
        load_model_dir(d)


def test_truncated_weights_are_refused_even_without_a_checksum(tmp_path):
    d = _tiny(tmp_path)
    rec = json.loads((d / "model.json").read_text())
    rec["weights"].pop("sha256")
    (d / "model.json").write_text(json.dumps(rec))
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:500])
    with pytest.raises(UserError, match="not a readable safetensors"):
        load_model_dir(d)


def test_malformed_json_is_refused(tmp_path):
    d = _tiny(tmp_path)
    (d / "model.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_model_dir(d)


def test_shapes_disagreeing_with_weights_are_refused(tmp_path):
    d = _tiny(tmp_path)
    rec = json.loads((d / "model.json").read_text())
    rec["changed_modules"] = {"layer1.0.conv1": {"type": "Conv2d", "attrs": {"out_channels": 4}, "tensors": {"weight": [4, 8, 3, 3]}}}
    (d / "model.json").write_text(json.dumps(rec))
    with pytest.raises(UserError, match="disagrees with model.json"):
        load_model_dir(d)


@pytest.mark.parametrize("name,expected", [("resnet32", 61.44), ("resnet44", 72.64), ("resnet56", 78.80)])
def test_layer_only_pruning_mac_reduction_matches_seed_002(name, expected):
    """Seed 002: removing blocks down to 2 per stage cuts conv+linear MACs by 61.44/72.64/78.80 %."""
    m = build(ArchSpec("compress", name), 10).eval()
    before = count(m, (3, 32, 32))["macs"]
    remove_blocks(m, [b.path for b in removable(m, 1) if b.index >= 2])
    assert all(sum(1 for b in find_blocks(m) if b.stage == s) == 2 for s in ("layer1", "layer2", "layer3"))
    after = count(m, (3, 32, 32))["macs"]
    assert round(100 * (1 - after / before), 2) == expected


@pytest.mark.slow  # ViT-B/16 at 224: bench/seed000.py reproduces the MAC steps
def test_vit_b16_mac_step_matches_seed_000():
    """Seed 000 Table 5: each 25 % step removes 8.366 GFLOPs (2 x conv+linear MACs) from ViT-B/16."""
    import timm

    m = timm.create_model("vit_base_patch16_224", num_classes=100).eval()
    spec = InputSpec(3, 224, 224, (0.5,) * 3, (0.5,) * 3)
    before = count(m, (3, 224, 224))["macs"]
    prune_width(m, spec, WidthConfig(metric="l2", sparsity=0.25))
    after = count(m, (3, 224, 224))["macs"]
    assert round(2 * (before - after) / 1e9, 3) == 8.366
