"""do Nascimento et al. (Pruning Everything, Everywhere, All at Once, arXiv 2506.04513): at each iteration
remove either a residual block or an equal number of filters, whichever candidate stays closer to its
parent by linear CKA after a short fine-tune. For a timm ViT the width candidate takes as many attention
heads and FFN neurons as the block holds, spread over every block: the block's parameters less its
LayerNorms and the two output-layer biases (the embedding width is fixed, so a head or a neuron costs the same anywhere).

Differences from the authors' release, on purpose: candidates are compared on a held-out split of the
training data (the release used the test set), and KL is computed from logits (the release applied
softmax twice).
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch_pruning as tp

from compressor import atomic, importance as imp
from compressor.data import Dataset, ImageSet, InputSpec
from compressor.data.splits import balanced_subset
from compressor.errors import UserError
from compressor.evaluate import evaluate
from compressor.finetune import TrainConfig, train
from compressor.layers import choose_blocks, conv_channels, find_blocks, removable, score_blocks
from compressor.modeldir import LoadedModel, remove_blocks, run_info, save_model_dir
from compressor.workflows import trained_on
from compressor.models import clone, is_vit
from compressor.pruning import WidthConfig, attention_heads, prune_to_widths, unit_scores
from compressor.progress import QUIET, Reporter
from compressor.similarity import linear_cka, penultimate
from compressor.structures import group_info
from compressor.flops import count

SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


@dataclass
class AutoConfig:
    iterations: int = 10
    target_flops_reduction: float | None = None  # fraction, e.g. 0.75
    min_accuracy: float | None = None  # held-out top-1 floor, percent
    candidate_epochs: int = 10
    epochs_per_iteration: int = 10
    similarity: str = "cka"  # "cka" | "random" (the paper's random-walk baseline)
    only: str | None = None  # "layers" | "filters": single-structure baselines with the same budget
    layer_bias: float = 0.0  # the paper's epsilon preference for layers
    metric: str = "kl"  # criterion for blocks and filters: "kl" | "l1"
    min_blocks_per_stage: int = 2
    holdout: float = 0.1
    calib_size: int = 500
    seed: int = 0
    kl_direction: str = imp.KL_DEFAULT
    filter_allocation: str = "authors"  # "authors": p = count / all conv filters; "eligible": / the first convs' filters

    def validate(self) -> None:
        if self.iterations < 1:
            raise UserError("`iterations` must be >= 1")
        if self.similarity not in ("cka", "random"):
            raise UserError("`similarity` must be cka or random")
        if self.only not in (None, "layers", "filters"):
            raise UserError("`only` must be layers or filters")
        if self.metric not in ("kl", "l1"):
            raise UserError("prune auto ranks blocks and filters with `metric` kl or l1")
        if self.target_flops_reduction is not None and not (0 < self.target_flops_reduction < 1):
            raise UserError("`target_flops_reduction` must be in (0, 1)")
        if not (0 < self.holdout < 0.5):
            raise UserError("`holdout` must be in (0, 0.5)")
        if self.min_blocks_per_stage < 1:
            raise UserError("`min_blocks_per_stage` must be >= 1")
        imp.check_kl_direction(self.kl_direction)
        if self.filter_allocation not in ALLOCATIONS:
            raise UserError(f"`filter_allocation` must be {' or '.join(ALLOCATIONS)}")
        if self.candidate_epochs < 0 or self.epochs_per_iteration < 0:
            raise UserError("epoch counts must be >= 0")


def decision_path(decisions: list[str]) -> str:
    """['L','F','F','L','L','L'] -> 'L, F², L³' (the paper's notation)."""
    runs: list[list] = []
    for d in decisions:
        if runs and runs[-1][0] == d:
            runs[-1][1] += 1
        else:
            runs.append([d, 1])
    return ", ".join(d if n == 1 else d + str(n).translate(SUPERSCRIPT) for d, n in runs)


def _first_convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    out = []
    for b in find_blocks(model):
        conv = getattr(model.get_submodule(b.path), "conv1", None)
        if isinstance(conv, nn.Conv2d):
            out.append((f"{b.path}.conv1", conv))
    return out


ALLOCATIONS = ("authors", "eligible")


def allocate(widths: list[int], count: int, rng: random.Random, total: int | None = None) -> list[int]:
    """Filters to take from each conv: floor(count * width / total), then one at a time from random convs;
    every conv keeps at least one filter. `total`: the authors' release divides by every conv filter of the
    network, so most of the budget is placed at random; None divides by these convs' widths (ours: almost all
    of it proportional)."""
    total = total or sum(widths)
    share = [min(count * w // total, w - 1) for w in widths]
    left = count - sum(share)
    while left > 0:
        open_ = [i for i, w in enumerate(widths) if share[i] < w - 1]
        if not open_:
            break
        share[rng.choice(open_)] += 1
        left -= 1
    return share


def filter_candidate(parent: nn.Module, spec: InputSpec, count: int, metric: str, calib: ImageSet, seed: int,
                     device, reporter: Reporter = QUIET, kl_direction: str = imp.KL_DEFAULT,
                     allocation: str = "authors") -> tuple[nn.Module, dict[str, int]] | None:
    """A copy of `parent` without `count` filters taken from the first conv of every residual block."""
    model = clone(parent).eval()
    convs = _first_convs(model)
    if not convs or sum(c.out_channels - 1 for _, c in convs) < count:
        return None
    example = torch.zeros(1, spec.channels, spec.height, spec.width, device=next(model.parameters()).device)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    infos = [group_info(dg.get_pruning_group(c, tp.prune_conv_out_channels, list(range(c.out_channels))), name)
             for name, c in convs]
    if metric == "kl":
        for i in infos:
            i.n_remove = 1
        table = imp.kl_scores(model, infos, calib, spec, 128, device, reporter, kl_direction)
        scores = [table[i.key] for i in infos]
    else:
        scores = [c.weight.detach().abs().flatten(1).sum(1).cpu() for _, c in convs]
    every = sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)) if allocation == "authors" else None
    share = allocate([c.out_channels for _, c in convs], count, random.Random(seed), every)
    removed = {}
    for (name, conv), s, k in zip(convs, scores, share):
        if k:
            idxs = torch.argsort(s)[:k].tolist()
            dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs).prune()
            removed[name] = k
    return model, removed


def vit_width_candidate(parent: nn.Module, spec: InputSpec, block: str, metric: str, calib: ImageSet, seed: int,
                        device, reporter: Reporter = QUIET,
                        kl_direction: str = imp.KL_DEFAULT) -> tuple[nn.Module, dict[str, int]] | None:
    """A copy of the ViT `parent` without as many heads and FFN neurons as `block` holds, each block losing a
    proportional share (the rest from blocks chosen at random; every block keeps one of each), the
    lowest-scored units of each block first."""
    model = clone(parent).eval()
    cfg = WidthConfig(metric=metric, ffn_metric=metric, scope=("heads", "ffn"), seed=seed, kl_direction=kl_direction)
    _, infos, scores = unit_scores(model, spec, cfg, calib, device, reporter)
    budget = {"head": attention_heads(model)[f"{block}.attn"],
              "ffn": int(model.get_submodule(block).mlp.fc1.out_features)}  # type: ignore[arg-type,union-attr]
    rng = random.Random(seed)
    removed: dict[str, int] = {}
    plan: dict[str, list[int]] = {}
    for kind, n in budget.items():
        groups = [i for i in infos if i.kind == kind]
        if sum(i.n_units - 1 for i in groups) < n:
            return None
        for info, k in zip(groups, allocate([i.n_units for i in groups], n, rng)):
            if k:
                plan[info.name] = sorted(int(u) for u in scores[info.name].argsort(kind="stable")[:k])
                removed[info.name] = k
    prune_to_widths(model, spec, plan)
    return model, removed


def _held_out(loaded: LoadedModel, ds: Dataset, cfg: AutoConfig, reporter: Reporter) -> tuple[ImageSet, ImageSet, dict]:
    """The images CKA and the accuracy floor are measured on. Unseen by the parent only when its data
    spec held them out from training (compress finetune --holdout); otherwise cut now from a training
    split the parent may have trained on: said loudly, recorded, and refused for --min-accuracy.
    Returns (training images, held-out images, what the log records about them)."""
    if ds.held is not None:
        return ds.train, ds.held, {"source": f"the data's recorded held-out share ({ds.spec.holdout})",
                                   "images": len(ds.held), "unseen_by_parent": True}
    seen = trained_on(loaded.record, ds.spec)
    if seen and cfg.min_accuracy is not None:
        raise UserError(f"the parent trained on all of {ds.spec.name}'s training split, so a held-out accuracy floor would "
                        "measure training accuracy; retrain it with compress finetune `holdout` 0.1, or drop `min_accuracy`")
    if seen:
        reporter.log(f"warning: the parent trained on all of {ds.spec.name}'s training split: the held-out images CKA "
                     "compares on are not unseen (retrain the parent with compress finetune --holdout 0.1)")
    train_set, held = ds.holdout(cfg.holdout, cfg.seed)
    return train_set, held, {"source": f"--holdout {cfg.holdout} of the training split", "images": len(held),
                             "unseen_by_parent": None if not seen else False}


def run(loaded: LoadedModel, ds: Dataset, cfg: AutoConfig, train_cfg: TrainConfig, out_dir: Path, *,
        device="cpu", reporter: Reporter = QUIET, settings: dict | None = None) -> dict:
    """Run the loop, saving every iteration under out_dir/iterations; returns the log."""
    cfg.validate()
    spec = loaded.record.input
    shape = (spec.channels, spec.height, spec.width)
    train_set, held, held_out = _held_out(loaded, ds, cfg, reporter)
    calib = train_set.subset(balanced_subset(train_set.labels, cfg.calib_size, cfg.seed))
    parent = clone(loaded.model).to(device).eval()
    record = loaded.record
    root = count(parent, shape, device)
    rng = random.Random(cfg.seed)
    base_held = evaluate(parent, held, spec, 256, device)
    base_test = evaluate(parent, ds.test, spec, 256, device)
    vit = is_vit(parent)  # blocks and widths are removed, the model's kind stays
    log: dict = {"settings": {**asdict(cfg), "train": train_cfg.to_json()}, "parent": str(loaded.path) if loaded.path else None,
           "root": {**root, "holdout_top1": base_held["top1"], "test_top1": base_test["top1"], "test_top5": base_test["top5"]},
           "holdout": held_out, "candidates": {"L": "one transformer block" if vit else "one residual block",
                                               "F": ("as many attention heads and FFN neurons as that block holds, across the blocks"
                                                     if vit else "as many filters from the blocks' first convs")},
           "iterations": [], "stopped": None}
    decisions: list[str] = []
    best_dir = None
    removed_blocks = list(record.removed_blocks)
    for k in range(1, cfg.iterations + 1):
        t0 = time.perf_counter()
        blocks = removable(parent, cfg.min_blocks_per_stage)
        if not blocks:
            log["stopped"] = "nothing left to remove"
            break
        scores = score_blocks(parent, blocks, cfg.metric, calib, spec, 128, device, cfg.seed + k, reporter, cfg.kl_direction)
        block = choose_blocks(parent, scores, 1, cfg.min_blocks_per_stage)[0]
        budget = conv_channels(parent.get_submodule(block))
        cands: dict[str, nn.Module] = {}
        filt_removed: dict[str, int] = {}
        if cfg.only != "filters":
            lc = clone(parent)
            remove_blocks(lc, [block])
            cands["L"] = lc
        if cfg.only != "layers":
            fc = (vit_width_candidate(parent, spec, block, cfg.metric, calib, cfg.seed + k, device, reporter, cfg.kl_direction)
                  if vit else filter_candidate(parent, spec, budget, cfg.metric, calib, cfg.seed + k, device, reporter,
                                               cfg.kl_direction, cfg.filter_allocation))
            if fc is not None:
                cands["F"], filt_removed = fc
        if not cands:
            log["stopped"] = "no candidate can be built"
            break
        ref_feats = penultimate(parent, held, spec, 256, device)
        cka = {}
        for name, model in cands.items():
            tc = TrainConfig(**{**asdict(train_cfg), "epochs": cfg.candidate_epochs, "seed": train_cfg.seed + k})
            train(model, train_set, None, spec, tc, device=device, reporter=reporter, label=f"iter {k}: candidate {name}")
            cka[name] = linear_cka(ref_feats, penultimate(model, held, spec, 256, device))
        if len(cands) == 1:
            choice = next(iter(cands))
        elif cfg.similarity == "random":
            choice = "L" if rng.random() < 0.5 else "F"
        else:
            choice = "L" if cka["L"] + cfg.layer_bias >= cka["F"] else "F"  # ties go to layers
        winner = cands[choice]
        tw = TrainConfig(**{**asdict(train_cfg), "epochs": cfg.epochs_per_iteration, "seed": train_cfg.seed + 1000 + k})
        train(winner, train_set, None, spec, tw, device=device, reporter=reporter, label=f"iter {k}: fine-tune {choice}")
        decisions.append(choice)
        if choice == "L":
            removed_blocks.append(block)
        stats = count(winner, shape, device)
        ev_held = evaluate(winner, held, spec, 256, device)
        ev_test = evaluate(winner, ds.test, spec, 256, device)
        row = {
            "iteration": k, "decision": choice, "block": block if choice == "L" else None,
            "filters_removed": sum(filt_removed.values()) if choice == "F" else 0, "filter_allocation": filt_removed if choice == "F" else {},
            "cka_layer": cka.get("L"), "cka_filter": cka.get("F"), "params": stats["params"], "macs": stats["macs"],
            "flops_reduction": round(1 - stats["macs"] / root["macs"], 5), "holdout_top1": ev_held["top1"],
            "test_top1": ev_test["top1"], "test_top5": ev_test["top5"], "wall_s": round(time.perf_counter() - t0, 2),
        }
        rec = record.child()
        rec.removed_blocks = list(removed_blocks)
        rec.metrics = {"params": stats["params"], "macs": stats["macs"], "top1": ev_test["top1"], "top5": ev_test["top5"],
                       "eval_split": "test", "eval_dataset": ds.spec.name, "holdout_top1": ev_held["top1"]}
        rec.lineage.append(run_info("prune-auto", {**(settings or {}), "iteration": k, "decision": choice,
                                                   "path": decision_path(decisions)},
                                    str(loaded.path) if loaded.path else None, rec.metrics, cfg.seed))
        it_dir = out_dir / "iterations" / f"iter_{k:02d}"
        save_model_dir(it_dir, winner, rec)
        row["dir"] = str(it_dir.relative_to(out_dir))
        log["iterations"].append(row)
        reporter.log(f"iteration {k}: {choice}  CKA L={_fmt(cka.get('L'))} F={_fmt(cka.get('F'))}  "
                     f"FLOPs -{100 * row['flops_reduction']:.1f}%  held-out top-1 {ev_held['top1']:.2f}  "
                     f"path {decision_path(decisions)}")
        atomic.write_json(out_dir / "auto_log.json", {**log, "path": decision_path(decisions)})
        parent = winner
        if cfg.min_accuracy is not None and ev_held["top1"] < cfg.min_accuracy:
            row["below_floor"] = True
            log["stopped"] = f"held-out top-1 {ev_held['top1']:.2f} fell below {cfg.min_accuracy}"
            break
        best_dir = it_dir
        if cfg.target_flops_reduction is not None and row["flops_reduction"] >= cfg.target_flops_reduction:
            log["stopped"] = f"reached {100 * row['flops_reduction']:.2f}% FLOPs reduction"
            break
    else:
        log["stopped"] = f"ran {cfg.iterations} iterations"
    log["path"] = decision_path(decisions)
    log["final"] = None if best_dir is None else str(best_dir.relative_to(out_dir))
    atomic.write_json(out_dir / "auto_log.json", log)
    atomic.write_text(out_dir / "auto_log.md", render_log(log))
    return log


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def _held_note(h: dict) -> str:
    where = f"Held-out images: {h.get('images', '?')}, {h.get('source', '?')}"
    if h.get("unseen_by_parent") is False:
        return where + ": **the parent trained on them**, so held-out accuracy here is training accuracy."
    return where + ("; the parent never trained on them." if h.get("unseen_by_parent") else ".")


def render_log(log: dict) -> str:
    r = log["root"]
    lines = [f"# Layer/filter pruning by CKA — path {log['path'] or '(none)'}", "",
             f"Parent: {r['params']:,} params, {r['macs']:,} MACs, held-out top-1 {r['holdout_top1']:.2f}, "
             f"test top-1 {r['test_top1']:.2f}. Stopped: {log['stopped']}.", "", _held_note(log.get("holdout") or {}), "",
             *([f"Candidates: L = {log['candidates']['L']}; F = {log['candidates']['F']}.", ""] if log.get("candidates") else []),
             "| iter | choice | CKA layer | CKA filter | params | MACs | FLOPs red. | held-out top-1 | test top-1 | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in log["iterations"]:
        lines.append(f"| {row['iteration']} | {row['decision']}{' (' + row['block'] + ')' if row['block'] else ''} | "
                     f"{_fmt(row['cka_layer'])} | {_fmt(row['cka_filter'])} | {row['params']:,} | {row['macs']:,} | "
                     f"{100 * row['flops_reduction']:.2f}% | {row['holdout_top1']:.2f} | {row['test_top1']:.2f} | {row['wall_s']} |")
    return "\n".join(lines) + "\n"
