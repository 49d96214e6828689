"""Width pruning: CNN output channels, ViT attention heads / FFN neurons / embedding channels.

All surgery is torch-pruning's (DependencyGraph + BasePruner). This module chooses what is prunable, the
ratios, and the importance, checks the request is possible before touching the model, and keeps timm's
Attention modules consistent after heads are removed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch_pruning as tp

from . import importance as imp
from .data import ImageSet, InputSpec
from .errors import UserError
from .models import get_classifier, is_vit
from .progress import QUIET, Reporter
from .structures import GroupInfo, describe

VIT_SCOPES = ("heads", "ffn", "embed")


@dataclass
class WidthConfig:
    metric: str = "l2"
    sparsity: float = 0.5
    scope: tuple[str, ...] = ("heads", "ffn")  # ViT only
    ffn_metric: str = "l2"
    global_ranking: bool = False
    round_to: int | None = None
    seed: int = 0
    greedy_step: int = 1
    calib_batch: int = 128

    def to_json(self) -> dict:
        return {"metric": self.metric, "sparsity": self.sparsity, "scope": list(self.scope), "ffn_metric": self.ffn_metric,
                "global": self.global_ranking, "round_to": self.round_to, "seed": self.seed, "greedy_step": self.greedy_step}


@dataclass
class WidthReport:
    groups: list[dict] = field(default_factory=list)
    layers: dict[str, list[int]] = field(default_factory=dict)  # module -> [before, after] output width
    heads: dict[str, list[int]] = field(default_factory=dict)


def validate(cfg: WidthConfig) -> None:
    imp.check_metric(cfg.metric)
    imp.check_metric(cfg.ffn_metric)
    if not (0.0 <= cfg.sparsity < 1.0) or math.isnan(cfg.sparsity):
        raise UserError(f"--sparsity must be in [0, 1), got {cfg.sparsity}")
    bad = [s for s in cfg.scope if s not in VIT_SCOPES]
    if bad or not cfg.scope:
        raise UserError(f"--scope takes a comma list of {', '.join(VIT_SCOPES)} (got {','.join(cfg.scope) or 'nothing'})")
    if cfg.round_to is not None and cfg.round_to < 1:
        raise UserError("--round-to must be a positive integer")
    if cfg.greedy_step < 1:
        raise UserError("--greedy-step must be at least 1")
    if cfg.global_ranking and "output-norm-greedy" in (cfg.metric, cfg.ffn_metric):
        raise UserError("output-norm-greedy removes a per-layer quota one unit at a time; it does not support --global")


def _widths(model: nn.Module) -> dict[str, int]:
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            out[n] = m.out_channels
        elif isinstance(m, nn.Linear):
            out[n] = m.out_features
    return out


def _local_quota(n: int, s: float, round_to: int | None) -> int:
    """Units torch-pruning removes from a group of n at ratio s (its own arithmetic)."""
    keep = int(n * (1 - s))
    if round_to:
        keep -= keep % round_to
    return n - keep


def _make_pruner(model: nn.Module, spec: InputSpec, cfg: WidthConfig):
    example = torch.zeros(1, spec.channels, spec.height, spec.width, device=next(model.parameters()).device)
    head = get_classifier(model)
    common = dict(global_pruning=cfg.global_ranking, round_to=cfg.round_to, ignored_layers=[head])
    placeholder = tp.importance.GroupMagnitudeImportance(p=2)
    if not is_vit(model):
        pruner = tp.pruner.BasePruner(model, example, placeholder, pruning_ratio=cfg.sparsity,
                                      root_module_types=[nn.modules.conv._ConvNd], **common)
        return pruner, set()
    from timm.layers import Attention

    attns = [m for m in model.modules() if isinstance(m, Attention)]
    for a in attns:
        if not hasattr(a, "attn_dim"):
            raise UserError("head pruning needs a timm whose Attention has attn_dim (timm >= 1.0.20)")
    fc1s = [m.fc1 for m in model.modules() if hasattr(m, "fc1") and hasattr(m, "fc2") and isinstance(m.fc1, nn.Linear)]
    s = cfg.sparsity
    # torch-pruning only reaches its head-removal step for an attention group with a non-zero width
    # ratio; prune_head_dims=False keeps head_dim intact, so the ratio on qkv removes whole heads only.
    ratios = {a.qkv: (s if "heads" in cfg.scope else 0.0) for a in attns}
    ratios.update({f: (s if "ffn" in cfg.scope else 0.0) for f in fc1s})
    pruner = tp.pruner.BasePruner(
        model, example, placeholder, pruning_ratio=s if "embed" in cfg.scope else 0.0, pruning_ratio_dict=ratios,
        num_heads={a.qkv: a.num_heads for a in attns}, prune_num_heads="heads" in cfg.scope, prune_head_dims=False,
        head_pruning_ratio=s if "heads" in cfg.scope else 0.0,
        root_module_types=[nn.modules.conv._ConvNd, nn.Linear], **common,
    )
    return pruner, {id(f) for f in fc1s}


def _plan(infos: list[GroupInfo], model: nn.Module, cfg: WidthConfig) -> int:
    """Set each group's removal count; refuse a request that would empty a layer. Returns the groups in scope."""
    vit = is_vit(model)
    in_scope = 0
    for info in infos:
        if info.kind == "head":
            active = "heads" in cfg.scope
        elif info.kind == "ffn":
            active = "ffn" in cfg.scope
        else:
            active = (not vit) or "embed" in cfg.scope
        if not active:
            continue
        in_scope += 1
        if cfg.sparsity == 0:
            continue
        if info.kind == "head":
            info.n_remove = math.ceil(cfg.sparsity * info.n_units)
        else:
            info.n_remove = info.n_units if cfg.global_ranking else _local_quota(info.n_units, cfg.sparsity, cfg.round_to)
        if not cfg.global_ranking and info.n_remove >= info.n_units:
            what = "heads" if info.kind == "head" else "channels"
            hint = f" with --round-to {cfg.round_to}" if cfg.round_to else ""
            raise UserError(
                f"sparsity {cfg.sparsity}{hint} would remove every one of the {info.n_units} {what} of {info.name}; "
                "lower --sparsity"
            )
    return in_scope


def _importance(model, pruner, infos, spec, cfg, calib, device, reporter):
    needs_data = {cfg.metric, cfg.ffn_metric} & imp.DATA_METRICS if is_vit(model) else {cfg.metric} & imp.DATA_METRICS
    if needs_data and calib is None:
        raise UserError(f"metric {', '.join(sorted(needs_data))} needs calibration data (pass --data)")
    kinds = {i.key: i.kind for i in infos}
    metric_of = {"head": cfg.metric, "ffn": cfg.ffn_metric if is_vit(model) else cfg.metric, "channel": cfg.metric}
    if "bn-scale" in {metric_of[i.kind] for i in infos if i.n_remove}:
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            raise UserError("bn-scale ranks structures by the BatchNorm after them; this model has no BatchNorm")
    if "taylor" in {metric_of[i.kind] for i in infos if i.n_remove}:
        imp.accumulate_gradients(model, calib, spec, cfg.calib_batch, device, reporter)
    by_kind = {}
    for kind in ("head", "ffn", "channel"):
        metric = metric_of[kind]
        targets = [i for i in infos if i.kind == kind and i.n_remove]
        lib = imp.library_importance(metric, cfg.global_ranking)
        if lib is not None or not targets:
            by_kind[kind] = lib
        elif metric == "kl":
            by_kind[kind] = imp.ScoreTable(imp.kl_scores(model, targets, calib, spec, cfg.calib_batch, device, reporter))
        else:
            by_kind[kind] = imp.ScoreTable(imp.greedy_output_norm_scores(model, targets, calib, spec, cfg.calib_batch,
                                                                         device, cfg.greedy_step, reporter))
    return imp.ByKind(kinds, by_kind)


def _fix_attention(model: nn.Module, pruner) -> dict[str, list[int]]:
    from timm.layers import Attention

    heads = {}
    for name, a in model.named_modules():
        if isinstance(a, Attention) and a.qkv in pruner.num_heads:
            before = a.num_heads
            a.num_heads = int(pruner.num_heads[a.qkv])
            a.head_dim = a.qkv.out_features // (3 * a.num_heads)
            a.attn_dim = a.num_heads * a.head_dim
            a.scale = a.head_dim ** -0.5
            heads[name] = [before, a.num_heads]
    return heads


def prune_width(model: nn.Module, spec: InputSpec, cfg: WidthConfig, calib: ImageSet | None = None,
                device: str | torch.device = "cpu", reporter: Reporter = QUIET) -> WidthReport:
    """Prune `model` in place. Returns per-layer widths before/after."""
    validate(cfg)
    model.eval()
    before = _widths(model)
    try:
        pruner, ffn_ids = _make_pruner(model, spec, cfg)
        infos = describe(pruner, model, ffn_ids)
        if not _plan(infos, model, cfg):
            raise UserError("nothing to prune: the model has no prunable structure in the chosen scope")
        if not any(i.n_remove for i in infos):
            return WidthReport()  # a sparsity too small to remove a whole unit anywhere
        pruner.importance = _importance(model, pruner, infos, spec, cfg, calib, device, reporter)
        torch.manual_seed(cfg.seed)  # the random metric draws from torch's global generator
        with torch.no_grad():
            pruner.step()
        model.zero_grad(set_to_none=True)
        heads = _fix_attention(model, pruner) if is_vit(model) else {}
    except UserError:
        raise
    except Exception as e:  # tracing and surgery failures come from architectures torch-pruning does not cover
        raise UserError(f"torch-pruning cannot prune {type(model).__name__}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160] if str(e) else ''}") from None
    after = _widths(model)
    empty = [n for n, w in after.items() if w == 0]
    if empty:
        raise UserError(f"pruning left {empty[0]} with no channels; lower --sparsity")
    check_runs(model, spec, "after pruning")
    return WidthReport(
        groups=[{"group": i.name, "kind": i.kind, "units": i.n_units, "planned_removal": i.n_remove} for i in infos if i.n_remove],
        layers={n: [before[n], after[n]] for n in after if n in before and before[n] != after[n]},
        heads={k: v for k, v in heads.items() if v[0] != v[1]},
    )


def check_runs(model: nn.Module, spec: InputSpec, when: str) -> None:
    """A model that cannot run a forward pass is never written."""
    x = torch.zeros(2, spec.channels, spec.height, spec.width, device=next(model.parameters()).device)
    try:
        with torch.no_grad():
            model.eval()(x)
    except Exception as e:
        raise UserError(f"{type(model).__name__} does not run {when} on {spec.channels}x{spec.height}x{spec.width} inputs "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None
