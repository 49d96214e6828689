"""Bad input never crashes: one line on stderr, exit code 2, no traceback, nothing written.
Property tests: pruned models always run, export and keep their output size. Same seed, same bits."""

import json

import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings, strategies as st

from compressor.data import InputSpec
from compressor.models import ArchSpec, build
from compressor.pruning import WidthConfig, prune_width

OUT = "OUT"  # replaced by a fresh path per case: it must not exist afterwards


@pytest.fixture(scope="module")
def files(tmp_path_factory, cnn_parent):
    d = tmp_path_factory.mktemp("bad")
    (d / "garbage.pt").write_bytes(b"\x00\x01 not a checkpoint")
    torch.save({"model": torch.nn.Linear(2, 2)}, d / "pickled.pt")  # a module object, not a state dict
    (d / "exists").mkdir()
    (d / "notmodel").mkdir()
    (d / "notabundle.tar.gz").write_bytes(b"nope")
    bad_json = d / "badjson"
    bad_json.mkdir()
    (bad_json / "model.json").write_text("{")
    rgba = d / "rgba"
    for cls in ("a", "b"):
        (rgba / "train" / cls).mkdir(parents=True)
        (rgba / "val" / cls).mkdir(parents=True)
        from PIL import Image

        for split in ("train", "val"):
            Image.new("RGB", (20, 20), (10, 20, 30)).save(rgba / split / cls / "x.png")
    (d / "empty_folder").mkdir()
    return {"dir": d, "parent": cnn_parent}


TINY = ["--model", "resnet20", "--model-arg", "width=4", "--input-size", "16"]
CASES = [
    # (argv, expected words in the one-line error)
    (["prune", "--model", "resnet9000", "--out", OUT], "unknown model"),
    (["prune", "--model", "{parent}", "--metric", "magic", "--out", OUT], "unknown metric"),
    (["prune", "--model", "{parent}", "--data", "mnist", "--out", OUT], "unknown dataset"),
    (["prune", "--model", "{parent}", "--sparsity", "1.0", "--out", OUT], "[0, 1)"),
    (["prune", "--model", "{parent}", "--sparsity", "-0.1", "--out", OUT], "[0, 1)"),
    (["prune", "--model", "{parent}", "--sparsity", "nan", "--out", OUT], "[0, 1)"),
    (["prune", "--model", "{parent}", "--sparsity", "half", "--out", OUT], "--sparsity"),
    (["prune", "--model", "{parent}", "--sparsity", "0.97", "--out", OUT], "every one of"),
    (["prune", "--model", "{parent}", "--scope", "wings", "--out", OUT], "--scope"),
    (["prune", "--model", "{parent}", "--round-to", "0", "--out", OUT], "--round-to"),
    (["prune", "sideways", "--model", "{parent}", "--out", OUT], "No such command"),
    (["prune", "--model", "{parent}", "--out", OUT, "layers", "--num-blocks", "1"], "goes after `prune layers`"),
    (["prune", "layers", "--model", "{parent}", "--out", OUT], "--num-blocks"),
    (["prune", "--sparsity", "0.5"], "--model"),
    (["demo", "--epochs", "-1", "--out", OUT], "--epochs"),
    (["demo", "--metric", "vibes", "--epochs", "1", "--out", OUT], "unknown metric"),
    (["prune", "auto", "--model", "{parent}", "--min-accuracy", "50", "--calib-size", "32", "--out", OUT], "--holdout 0.1"),
    (["prune", "--model", "{dir}/missing", "--out", OUT], "does not exist"),
    (["prune", "--model", "{dir}/notmodel", "--out", OUT], "not a model directory"),
    (["prune", "--model", "{dir}/badjson", "--out", OUT], "not valid JSON"),
    (["prune", *TINY, "--checkpoint", "{dir}/garbage.pt", "--out", OUT], "cannot read checkpoint"),
    (["prune", *TINY, "--checkpoint", "{dir}/pickled.pt", "--out", OUT], "--trust-pickle"),
    (["prune", *TINY, "--checkpoint", "{dir}/nothere.pt", "--out", OUT], "does not exist"),
    (["prune", *TINY, "--num-classes", "5", "--data", "digits", "--out", OUT], "classes"),
    (["prune", "--model", "{parent}", "--data", "fashion-mnist", "--data-dir", "{dir}/nothere", "--out", OUT], "does not exist"),
    (["prune", "--model", "{parent}", "--data", "cifar10", "--out", OUT], "--data-dir"),
    (["prune", "--model", "{parent}", "--data", "imagefolder", "--data-dir", "{dir}/empty_folder", "--out", OUT], "no images"),
    (["prune", *TINY, "--model-arg", "in_chans=2", "--num-classes", "2", "--data", "imagefolder", "--data-dir", "{dir}/rgba", "--out", OUT], "channel"),
    (["prune", *TINY, "--data", "digits", "--train-size", "0", "--out", OUT], "--train-size"),
    (["prune", *TINY, "--model-arg", "nonsense=1", "--out", OUT], "bad model argument"),
    (["prune", *TINY, "--model-arg", "width", "--out", OUT], "key=value"),
    (["prune", "--model", "timm:pit_ti_224", "--num-classes", "10", "--input-size", "32", "--out", OUT], "torch-pruning cannot prune"),
    (["prune", "--model", "torchvision:inception_v3", "--num-classes", "10", "--input-size", "32", "--out", OUT], "does not run"),
    (["prune", "--model", "resnet18", "--pretrained", "--num-classes", "10", "--out", OUT], "pretrained weights"),
    (["prune", "--model", "{parent}", "--out", "{dir}/exists"], "already exists"),
    (["prune", "--model", "{parent}", "--device", "tpu", "--out", OUT], "--device"),
    (["finetune", "{parent}", "--epochs", "-1", "--out", OUT], "--epochs"),
    (["finetune", "{parent}", "--lr", "0", "--out", OUT], "--lr"),
    (["finetune", "{parent}", "--optimizer", "lion", "--out", OUT], "--optimizer"),
    (["finetune", "{parent}", "--lr-schedule", "zigzag", "--out", OUT], "--lr-schedule"),
    (["finetune", "{parent}", "--augment", "mixup", "--out", OUT], "augmentation"),
    (["finetune", "{parent}", "--batch-size", "0", "--out", OUT], "--batch-size"),
    (["finetune", "{parent}", "--model", "resnet20", "--out", OUT], "not both"),
    (["finetune", "{parent}"], "--out"),
    (["finetune", "{parent}", "--out", "{dir}/exists", "--resume"], None),  # empty dir + --resume starts fresh: allowed
    (["export", "{parent}", "--format", "tflite", "--out", OUT], "--format"),
    (["export", "{parent}", "--precision", "fp8", "--out", OUT], "--precision"),
    (["export", "{dir}/missing", "--out", OUT], "not a directory"),
    (["profile", "{parent}", "--backend", "tvm"], "unknown backend"),
    (["profile", "{parent}", "--batch-sizes", "0"], "--batch-sizes"),
    (["profile", "{parent}", "--batch-sizes", "one"], "--batch-sizes"),
    (["profile", "{dir}/missing"], "does not exist"),
    (["profile", "{parent}", "--max-regression", "lots"], "--max-regression"),
    (["profile", "{parent}", "--against", "{dir}/nothere.json"], "does not exist"),
    (["profile", "{parent}", "--assert-speedup", "2"], "--baseline"),
    (["profile", "{parent}", "--json", "{dir}/exists"], "already exists"),
    (["compare", "--model", "{parent}", "--sparsities", "1.2", "--out", OUT], "[0, 1)"),
    (["compare", "--model", "{parent}", "--metrics", "vibes", "--out", OUT], "unknown metric"),
    (["package", "{parent}", "--target", "toaster", "--out", OUT], "--target"),
    (["package", "--verify", "{dir}/notabundle.tar.gz"], "not a readable bundle"),
    (["package", "--verify", "{dir}/nothere.tar.gz"], "no such bundle"),
    (["info", "{dir}/notmodel"], "not a model directory"),
    (["prune", "--model", "{parent}", "--out", OUT, "--no-such-flag"], "No such option"),
    (["finetune", "{parent}", "--lr", "1e30", "--optimizer", "sgd", "--epochs", "1", "-q", "--out", OUT], "diverged"),
    (["profile", "{parent}", "--backend", "tensorrt", "--device", "cuda", "--rounds", "2"], "nothing was measured"),
    (["profile", "{parent}", "--backend", "tensorrt", "--rounds", "2"], "pass --device cuda"),
    (["profile", "{parent}", "--ort-provider", "cuda", "--rounds", "2"], "pass --device cuda"),
    (["profile", "{parent}", "--batch-sizes", "1", "--gate-batch-sizes", "32", "--assert-speedup", "1.1",
      "--baseline", "{parent}"], "--gate-batch-sizes"),
]


@pytest.mark.parametrize("argv,words", CASES, ids=[" ".join(a[:3]) + f" #{i}" for i, (a, _) in enumerate(CASES)])
def test_bad_input_matrix(cli, files, tmp_path, argv, words):
    out = tmp_path / "out"
    args = [str(out) if a == OUT else a.format(dir=files["dir"], parent=files["parent"]) for a in argv]
    if words is None:
        args = args[:-2] + [str(tmp_path / "fresh"), "--resume", "--epochs", "1", "-q"]  # the allowed variant
        cli(*args)
        return
    code, stdout, err = cli(*args, expect=2)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert words in err, err
    assert "Traceback" not in err + stdout
    assert not out.exists(), "bad input left output behind"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_debug_shows_the_traceback(cli, files):
    _, _, err = cli("--debug", "prune", "--model", "resnet9000", "--out", "x", expect=2)
    assert "Traceback" in err


def _pruned_or_rightly_refused(m, spec, cfg) -> bool:
    """Prune; a refusal is right only when the ratio removes no whole unit or every unit of some layer
    (then the model must be untouched)."""
    from compressor.errors import UserError

    before = {k: v.shape for k, v in m.state_dict().items()}
    try:
        prune_width(m, spec, cfg)
    except UserError as e:
        assert "nothing was pruned" in str(e) or "would remove every one" in str(e), str(e)
        assert {k: v.shape for k, v in m.state_dict().items()} == before
        return False
    return True


@settings(max_examples=3, deadline=None)  # each example is a 3 s ONNX export
@given(name=st.sampled_from(["resnet20", "resnet32"]), width=st.sampled_from([4, 6, 8]), classes=st.integers(2, 12),
       size=st.sampled_from([8, 12, 16]), sparsity=st.floats(0.0, 0.7), seed=st.integers(0, 2**16),
       metric=st.sampled_from(["l1", "l2", "random", "bn-scale"]))
def test_pruned_cnns_always_run_export_and_keep_their_output(tmp_path_factory, name, width, classes, size, sparsity, seed, metric):
    from exporters.onnx_export import export

    torch.manual_seed(seed)
    m = build(ArchSpec("compress", name, {"width": width}), classes).eval()
    spec = InputSpec(3, size, size, (0.5,) * 3, (0.25,) * 3)
    if not _pruned_or_rightly_refused(m, spec, WidthConfig(metric=metric, sparsity=sparsity, seed=seed)):
        return
    x = torch.randn(3, 3, size, size)
    y = m(x)
    assert y.shape == (3, classes) and torch.isfinite(y).all()
    out = tmp_path_factory.mktemp("prop") / "m.onnx"
    export(m, (3, size, size), out, inputs=x.numpy(), inputs_are="random")
    assert ort.InferenceSession(str(out)).run(None, {"input": x.numpy()})[0].shape == (3, classes)


@settings(max_examples=6, deadline=None)
@given(heads=st.sampled_from([2, 4, 6]), depth=st.integers(1, 2), sparsity=st.floats(0.0, 0.6), seed=st.integers(0, 2**16),
       classes=st.integers(2, 12), scope=st.sampled_from([("heads", "ffn"), ("heads",), ("ffn",), ("heads", "ffn", "embed")]))
def test_pruned_vits_always_run_and_keep_their_output(heads, depth, sparsity, seed, classes, scope):
    torch.manual_seed(seed)
    m = build(ArchSpec("compress", "vit_cifar", {"embed_dim": 8 * heads, "num_heads": heads, "depth": depth, "img_size": 16}), classes).eval()
    spec = InputSpec(3, 16, 16, (0.5,) * 3, (0.25,) * 3)
    if not _pruned_or_rightly_refused(m, spec, WidthConfig(metric="random", sparsity=sparsity, scope=scope, seed=seed)):
        return
    assert m(torch.randn(2, 3, 16, 16)).shape == (2, classes)
    for blk in m.blocks:
        assert blk.attn.num_heads >= 1 and blk.attn.qkv.out_features == 3 * blk.attn.num_heads * blk.attn.head_dim


def test_same_command_same_seed_gives_identical_bits(cli, cnn_parent, tmp_path):
    for name in ("a", "b"):
        cli("prune", "--model", cnn_parent, "--metric", "taylor", "--sparsity", "0.4", "--seed", "5", "--calib-size", "100",
            "--out", tmp_path / name, "-q")
    a, b = (tmp_path / "a" / "model.safetensors").read_bytes(), (tmp_path / "b" / "model.safetensors").read_bytes()
    assert a == b
    ra, rb = (json.loads((tmp_path / n / "model.json").read_text()) for n in ("a", "b"))
    assert ra["changed_modules"] == rb["changed_modules"]
    run = ra["lineage"][-1]
    assert run["seed"] == 5 and "prune" in run["command"] and run["versions"]["torch"] == torch.__version__
