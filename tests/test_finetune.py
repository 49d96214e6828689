"""Fine-tuning: it recovers accuracy; interrupted runs resume to the same result (real signals)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compressor.modeldir import load_model_dir


def test_short_finetune_improves_a_pruned_model(cli, cnn_parent, tmp_path):
    cli("prune", "--model", cnn_parent, "--metric", "l2", "--sparsity", "0.5", "--out", tmp_path / "p", "-q")
    before = load_model_dir(tmp_path / "p").record.metrics["top1"]
    _, out, _ = cli("finetune", tmp_path / "p", "--epochs", "4", "--lr", "2e-3", "--out", tmp_path / "ft", "-q")
    after = load_model_dir(tmp_path / "ft").record.metrics["top1"]
    assert after > before + 10, (before, after)
    assert "images/s" in out and "waiting for data" in out
    hist = json.loads((tmp_path / "ft" / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4] and all(0 <= h["data_wait_share"] <= 1 for h in hist)
    lineage = load_model_dir(tmp_path / "ft").record.lineage
    assert [e["stage"] for e in lineage][-2:] == ["prune", "finetune"]
    assert lineage[-1]["parent"] == str(tmp_path / "p") and lineage[-1]["settings"]["optimizer"] == "adam"


def test_a_collapsed_network_is_refused_not_written(cli, cnn_parent, tmp_path):
    """A network whose outputs ignore the input (its stem zeroed, so every ReLU after it is dead and passes no
    gradient): training loss at least ln 10 and top-1 at chance after the run, a failed fine-tune, not a result."""
    from compressor.data import DataSpec, load_dataset
    from compressor.finetune import TrainConfig, learned_nothing
    from compressor.modeldir import save_model_dir
    from compressor.workflows import finetune

    lm = load_model_dir(cnn_parent)
    conv = next(m for m in lm.model.modules() if isinstance(m, torch.nn.Conv2d))
    bn = next(m for m in lm.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with torch.no_grad():
        for t in (conv.weight, bn.weight, bn.bias):
            t.zero_()
    save_model_dir(tmp_path / "dead", lm.model, lm.record)
    _, _, err = cli("finetune", tmp_path / "dead", "--epochs", "2", "--lr", "2e-3", "--out", tmp_path / "ft", "-q",
                    expect=2)
    assert "learned nothing" in err and "ln 10 = 2.303" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ft").exists()
    # A comparison grid keeps such a run as a result and says what it is.
    dead = load_model_dir(tmp_path / "dead")
    ds = load_dataset(DataSpec("digits", None, 200, 100))
    _, _, result = finetune(dead, ds, TrainConfig(epochs=1, lr=2e-3, batch_size=64), None, False, "cpu",
                            refuse_collapse=False)
    assert result.learned_nothing and "chance 10.0 %" in result.learned_nothing
    # The rule itself: a network that learned a little is not flagged, and neither is one without a held-out split.
    row = {"epoch": 3, "train_loss": 2.30, "top1": 10.5}
    assert learned_nothing([row], 10) and not learned_nothing([{**row, "train_loss": 2.1}], 10)
    assert not learned_nothing([{**row, "top1": 14.0}], 10) and not learned_nothing([{"epoch": 1, "train_loss": 2.3}], 10)


def _bn_scale_l1(d) -> float:
    return sum(m.weight.abs().sum().item() for m in load_model_dir(d).model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_sgd_step_schedule_distill_and_bn_l1(cli, cnn_parent, tmp_path):
    common = ["--epochs", "3", "--optimizer", "sgd", "--lr", "1e-2", "--lr-schedule", "step", "--nesterov",
              "--augment", "crop,rotate", "-q"]
    cli("finetune", cnn_parent, *common, "--distill", "--bn-l1", "0.5", "--out", tmp_path / "ft")
    cli("finetune", cnn_parent, *common, "--out", tmp_path / "plain")
    hist = json.loads((tmp_path / "ft" / "history.json").read_text())
    assert [round(h["lr"], 6) for h in hist] == [0.01, 0.001, 0.0001]  # Lajić et al.'s decades
    # network slimming's penalty pulls BatchNorm scales towards zero; the same run without it does not
    assert _bn_scale_l1(tmp_path / "ft") < 0.9 * _bn_scale_l1(tmp_path / "plain")
    s = load_model_dir(tmp_path / "ft").record.lineage[-1]["settings"]
    assert s["distill"] is True and s["bn_l1"] == 0.5 and s["nesterov"] is True


def test_dataloader_path_trains_too(cli, cnn_parent, tmp_path):
    """Per-image loading must feed the same images, labels and normalisation as the tensor path: one more
    epoch keeps a trained model's accuracy (a mismatch drops it to chance)."""
    cli("finetune", cnn_parent, "--epochs", "1", "--loader", "dataloader", "--workers", "0", "--out", tmp_path / "ft", "-q")
    before = load_model_dir(cnn_parent).record.metrics["top1"]
    after = load_model_dir(tmp_path / "ft").record.metrics["top1"]
    assert after > 50 and after > before - 15, (before, after)


ARGS = ["finetune", "--model", "resnet20", "--model-arg", "width=8", "--input-size", "16", "--data", "digits",
        "--epochs", "3", "--lr", "2e-3", "--batch-size", "32", "--device", "cpu", "--quiet", "--seed", "3",
        "--train-size", "640"]  # a second an epoch: killed 50 ms into epoch 2 of 3, the run cannot have finished


def _compress(args, **kw):
    code = "import sys; from cli.main import main; sys.argv = ['compress'] + sys.argv[1:]; main()"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # SIGINT back to its default in the child: a test runner started in the background by a shell ignores
    # SIGINT, and an ignored signal stays ignored across exec (Python would not install its handler).
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kw)


def _checkpoint_epoch(run: Path) -> int:
    ck = run / "checkpoints" / "last.pt"
    if not ck.exists():
        return 0
    try:
        return int(torch.load(ck, weights_only=True)["epoch"])
    except Exception:
        return 0


def _interrupted_run(cli, tmp_path: Path, sig: int) -> Path:
    run = tmp_path / f"run_{sig}"
    p = _compress(ARGS + ["--out", run])
    deadline = time.time() + 240
    while _checkpoint_epoch(run) < 1:
        assert p.poll() is None, p.communicate()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    time.sleep(0.05)  # inside epoch 2, with 1 more epoch to run
    status = Path(f"/proc/{p.pid}/status")
    if sig == signal.SIGINT and status.exists():  # an inherited SIG_IGN would make the test meaningless
        ignored = int(next(ln for ln in status.read_text().splitlines() if ln.startswith("SigIgn:")).split()[1], 16)
        assert not ignored & (1 << (signal.SIGINT - 1)), "the training process ignores SIGINT"
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    assert not (run / "model.json").exists(), "an interrupted run must not look finished"
    if sig == signal.SIGINT:
        assert p.returncode == 130 and b"--resume" in out + err and b"Traceback" not in err
    else:
        assert p.returncode == -signal.SIGKILL
    assert _checkpoint_epoch(run) >= 1
    if sig == signal.SIGKILL:  # without --resume the run is not silently restarted or clobbered (either signal)
        _, _, err = cli(*ARGS, "--out", run, expect=2)  # refused before any work: in-process (no second torch start)
        assert "--resume" in err
    r = _compress(ARGS + ["--out", run, "--resume"])
    _, err = r.communicate(timeout=300)
    assert r.returncode == 0, err.decode()
    return run


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The same run, never interrupted."""
    out = tmp_path_factory.mktemp("straight") / "run"
    p = _compress(ARGS + ["--out", out])
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err.decode()
    return out


@pytest.mark.parametrize("sig", [signal.SIGKILL, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])  # SIGINT: the same resume path
def test_killed_finetune_resumes_to_the_uninterrupted_result(cli, tmp_path, straight, sig):
    resumed = _interrupted_run(cli, tmp_path, sig)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha = json.loads((straight / "history.json").read_text())
    hb = json.loads((resumed / "history.json").read_text())
    assert [h["top1"] for h in ha] == [h["top1"] for h in hb]


@pytest.mark.slow  # bench/ddp_accuracy.py runs torchrun with two processes for real
def test_data_parallel_two_gloo_processes_and_resume(cli, tmp_path):
    """`--nproc 2` runs two gloo processes under torchrun: one global batch split between them, the same
    weights on both at the end (checked by the processes themselves and recorded), process 0 writing;
    an interrupted run resumes from its checkpoint with the same two processes."""
    out = tmp_path / "ddp"
    args = ["finetune", "--model", "resnet20", "--model-arg", "width=8", "--input-size", "16", "--data", "digits",
            "--train-size", "512", "--batch-size", "64", "--device", "cpu", "--nproc", "2", "--out", out, "-q"]
    cli(*args, "--epochs", "1")
    rec = json.loads((out / "model.json").read_text())
    dp = rec["lineage"][-1]["settings"]["data_parallel"]
    assert dp == {"processes": 2, "backend": "gloo", "ranks_identical": True}
    assert load_model_dir(out).record.metrics["top1"] > 0
    # Interrupted after epoch 1: the checkpoint is there, the finished model is not.
    (out / "model.json").unlink()
    (out / "model.safetensors").unlink()
    _, text, _ = cli(*args, "--epochs", "2", "--resume")
    hist = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2]
    assert json.loads((out / "model.json").read_text())["lineage"][-1]["settings"]["data_parallel"]["ranks_identical"]


def test_data_parallel_refusals_are_one_line(cli, tmp_path):
    _, _, err = cli("finetune", "--model", "resnet20", "--batch-size", "63", "--nproc", "2", "--out", tmp_path / "x", expect=2)
    assert "multiple of --nproc" in err and not (tmp_path / "x").exists()
    _, _, err = cli("finetune", "--model", "resnet20", "--nproc", "0", "--out", tmp_path / "x", expect=2)
    assert "--nproc" in err
