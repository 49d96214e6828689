"""The peers' own pruning recipes, called through their public APIs as their documentation shows, for
bench/peers.py. Bench-only: `pip install -e '.[peers]'` adds NVIDIA ModelOpt; Torch-Pruning is already ours.

Each recipe takes the parent (a compress model directory, loaded) and one knob, and returns the pruned
nn.Module with the parent's module names, so `compressor.modeldir` records it like any child and every
later `compress` command (finetune, export, profile) reads it.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn

from compressor.data import Batches
from compressor.data.splits import balanced_subset
from compressor.evaluate import evaluate
from compressor.modeldir import LoadedModel, run_info, save_model_dir
from compressor.models import clone


def torch_pruning_recipe(parent: LoadedModel, flops_speedup: float, round_to: int | None = None) -> nn.Module:
    """Torch-Pruning's CIFAR ResNet recipe (benchmarks/main.py, `--method group_norm --global-pruning
    --speed-up S`): group L2 magnitude, one global ranking over all groups, 400 small steps taken until the
    MACs fall by `flops_speedup`, the classifier's outputs kept. `round_to`: its README's advice to round
    every width to a multiple (8) for hardware-friendly shapes; the CIFAR script leaves it unset."""
    import torch_pruning as tp

    model = clone(parent.model).eval()
    spec = parent.record.input
    example = torch.randn(1, spec.channels, spec.height, spec.width)
    ignored = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == parent.record.num_classes]
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  global_pruning=True, pruning_ratio=1.0, max_pruning_ratio=1.0, iterative_steps=400,
                                  ignored_layers=ignored, round_to=round_to)
    base, _ = tp.utils.count_ops_and_params(model, example_inputs=example)
    reached = 1.0
    while reached < flops_speedup and pruner.current_step < pruner.iterative_steps:
        pruner.step()
        ops, _ = tp.utils.count_ops_and_params(model, example_inputs=example)
        reached = base / ops
    return model


class _Loader:
    """Batches as ModelOpt iterates a data loader (it also asks for len())."""

    def __init__(self, data, spec, batch_size: int):
        self.data, self.spec, self.batch_size = data, spec, batch_size

    def __iter__(self):
        return iter(Batches(self.data, self.spec, self.batch_size, shuffle=False))

    def __len__(self) -> int:
        return -(-len(self.data) // self.batch_size)


def fastnas_recipe(parent: LoadedModel, ds, flops_fraction: float, seed: int, checkpoint: str) -> nn.Module:
    """NVIDIA ModelOpt FastNAS as its ResNet-20/CIFAR-10 notebook runs it: `mtp.prune(mode=[("fastnas",
    config)], constraints={"flops": F})` with channel and feature divisors of 16 (the notebook's choice for a
    network this small; the default is 32), the training loader for BN calibration, and validation top-1 as
    the score, here on the parent's held-out split (never trained on, not the test split). The notebook's
searcher settings are kept as they are."""
    import modelopt.torch.prune as mtp

    torch.manual_seed(seed)
    spec = parent.record.input
    config = mtp.fastnas.FastNASConfig()
    config["nn.Conv2d"]["*"]["channel_divisor"] = 16
    config["nn.BatchNorm2d"]["*"]["feature_divisor"] = 16
    if ds.held is None:
        raise SystemExit("the FastNAS score needs the parent's held-out split (train it with --holdout)")
    # 1,000 held-out images: ModelOpt's advice when the score takes long (every probe scores ~40 subnets)
    held = ds.held.subset(balanced_subset(ds.held.labels, 1000, 0))

    def score(m: nn.Module) -> float:
        return evaluate(m, held, spec)["top1"]

    model = clone(parent.model).eval()
    pruned, _ = mtp.prune(model=model, mode=[("fastnas", config)], constraints={"flops": f"{100 * flops_fraction:.2f}%"},
                          dummy_input=torch.randn(1, spec.channels, spec.height, spec.width),
                          config={"data_loader": _Loader(ds.train, spec, 256), "score_func": score, "checkpoint": checkpoint})
    return pruned  # mtp.prune returns the exported subnet


def save_child(parent: LoadedModel, model: nn.Module, out, method: str, settings: dict, ds) -> dict:
    """Write `model` as a compress model directory (reloaded and checked before it is finished) with its
    test top-1 before fine-tuning; returns that evaluation. (ModelOpt's returned subnet is already made of
    plain torch modules.)"""
    acc = evaluate(model, ds.test, parent.record.input)
    rec = parent.record.child()
    rec.metrics = {"top1": acc["top1"], "top5": acc["top5"], "eval_split": "test", "eval_images": acc["n"]}
    rec.lineage.append(run_info("prune", {"method": method, **settings}, str(parent.path), rec.metrics))
    save_model_dir(out, model, rec)
    return acc


def timed(fn, *a, **kw):
    t = time.time()
    out = fn(*a, **kw)
    return out, time.time() - t
