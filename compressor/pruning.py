"""Width pruning: CNN output channels, ViT attention heads / FFN neurons / embedding channels.

All surgery is torch-pruning's (DependencyGraph + BasePruner). This module chooses what is prunable, the
ratios, and the importance, checks the request is possible before touching the model, and keeps timm's
Attention modules consistent after heads are removed.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch_pruning as tp

from . import importance as imp
from . import outputs
from .data import ImageSet, InputSpec
from .errors import UserError
from .models import clone, get_classifier, is_vit
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
    kl_direction: str = imp.KL_DEFAULT
    layer_sparsity: tuple[tuple[str, float], ...] = ()  # (glob on the group's root layer, ratio): first match wins
    ignore_layers: tuple[str, ...] = ()  # globs on module names kept untouched (torch-pruning's ignored_layers)
    loss: Callable[[Any, torch.Tensor], torch.Tensor] | None = None  # API only: taylor on a non-classifier

    def to_json(self) -> dict:
        out = {"metric": self.metric, "sparsity": self.sparsity, "scope": list(self.scope), "ffn_metric": self.ffn_metric,
               "global": self.global_ranking, "round_to": self.round_to, "seed": self.seed, "greedy_step": self.greedy_step,
               "kl_direction": self.kl_direction}
        if self.layer_sparsity:
            out["layer_sparsity"] = [list(p) for p in self.layer_sparsity]
        if self.ignore_layers:
            out["ignore_layers"] = list(self.ignore_layers)
        if self.loss is not None:
            out["loss"] = getattr(self.loss, "__qualname__", type(self.loss).__name__)
        return out

    def ratio_for(self, group: str) -> float:
        """The sparsity of the group rooted at layer `group`: its --layer-sparsity pattern, else `sparsity`."""
        return next((r for pattern, r in self.layer_sparsity if fnmatch.fnmatchcase(group, pattern)), self.sparsity)

    def asks_pruning(self) -> bool:
        return self.sparsity > 0 or any(r > 0 for _, r in self.layer_sparsity)


@dataclass
class WidthReport:
    groups: list[dict] = field(default_factory=list)
    layers: dict[str, list[int]] = field(default_factory=dict)  # module -> [before, after] output width
    heads: dict[str, list[int]] = field(default_factory=dict)
    left_alone: dict[str, str] = field(default_factory=dict)  # group root -> why torch-pruning cannot remove it
    units: int = 0  # removable units (channels, heads, FFN neurons) in scope, left-alone groups included
    removed: int = 0

    @property
    def achieved(self) -> float:
        """Share of the units in scope that were removed (the figure --sparsity asks for)."""
        return self.removed / self.units if self.units else 0.0


def validate(cfg: WidthConfig) -> None:
    imp.check_metric(cfg.metric)
    imp.check_metric(cfg.ffn_metric)
    imp.check_kl_direction(cfg.kl_direction)
    if not (0.0 <= cfg.sparsity < 1.0) or math.isnan(cfg.sparsity):
        raise UserError(f"`sparsity` must be in [0, 1), got {cfg.sparsity}")
    bad = [s for s in cfg.scope if s not in VIT_SCOPES]
    if bad or not cfg.scope:
        raise UserError(f"`scope` takes a comma list of {', '.join(VIT_SCOPES)} (got {','.join(cfg.scope) or 'nothing'})")
    if cfg.round_to is not None and cfg.round_to < 1:
        raise UserError("`round_to` must be a positive integer")
    if cfg.greedy_step < 1:
        raise UserError("`greedy_step` must be at least 1")
    for pattern, r in cfg.layer_sparsity:
        if not pattern or not (0.0 <= r < 1.0) or math.isnan(r):
            raise UserError(f"`layer_sparsity` takes PATTERN=RATIO with 0 <= RATIO < 1 (got {pattern}={r})")
    if cfg.layer_sparsity and cfg.global_ranking:
        raise UserError("`layer_sparsity` sets per-layer ratios; it does not combine with `global`")
    if cfg.global_ranking and "output-norm-greedy" in (cfg.metric, cfg.ffn_metric):
        raise UserError("output-norm-greedy removes a per-layer quota one unit at a time; it does not support `global`")


def _widths(model: nn.Module) -> dict[str, int]:
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            out[n] = m.out_channels
        elif isinstance(m, nn.Linear):
            out[n] = m.out_features
    return out


def round_kept(keep: int, width: int, multiple: int) -> int:
    """The kept width rounded to the nearest multiple, never below one multiple nor above the width."""
    return min(width, max(multiple, (2 * keep + multiple) // (2 * multiple) * multiple))


def _local_quota(n: int, s: float, round_to: int | None) -> int:
    """Units torch-pruning removes from a group of n at ratio s (its own arithmetic, rounded as _Pruner does)."""
    keep = int(n * (1 - s))
    if round_to and keep < n:
        keep = round_kept(keep, n, round_to)
    return n - keep


class _Pruner(tp.pruner.BasePruner):
    """torch-pruning's pruner with `round_to` rounding the kept width to the nearest multiple (its own
    rounds down, which empties a 16-channel layer at --round-to 16 and 25 %)."""

    def _round_to(self, n_pruned, current_channels, round_to):
        return current_channels - round_kept(current_channels - n_pruned, current_channels, round_to)


def _mlp_fc1s(model: nn.Module) -> list[nn.Linear]:
    """The first layer of every fc1/fc2 MLP (a transformer's FFN): its outputs are the FFN neurons."""
    out = []
    for m in model.modules():
        first = getattr(m, "fc1", None) if hasattr(m, "fc2") else getattr(m, "ln1", None) if hasattr(m, "ln2") else None
        if first is None and isinstance(m, nn.Sequential) and type(m).__name__.lower() in ("mlp", "mlpblock"):
            linears = [c for c in m if isinstance(c, nn.Linear)]  # torchvision's MLP: Linear, act, drop, Linear, drop
            first = linears[0] if len(linears) == 2 else None
        first = getattr(first, "linear", first)  # LeViT's MLP layers are LinearNorm (linear + BatchNorm1d)
        if isinstance(first, nn.Linear):
            out.append(first)
    return out


MAX_GROUP_ITEMS = 5_000  # real groups are far smaller (measured: ViT-B/16 180, DenseNet-121 102, ResNet-50 33)


class GraphBlowUp(Exception):
    """A torch-pruning group grew past MAX_GROUP_ITEMS."""


@contextlib.contextmanager
def _bounded_groups():
    """torch-pruning re-walks a group while index mappings keep changing the indices; on residuals that add
    into a channel slice (ReXNet) that never settles. Bound it and refuse instead of running for ever."""
    from torch_pruning.dependency.group import Group

    original = Group.add_dep

    def add_dep(self, dep, idxs):
        if len(self._group) >= MAX_GROUP_ITEMS:
            raise GraphBlowUp()
        original(self, dep, idxs)

    Group.add_dep = add_dep
    try:
        yield
    finally:
        Group.add_dep = original


def _make_pruner(model: nn.Module, spec: InputSpec, cfg: WidthConfig, skip: frozenset[str] = frozenset()):
    """torch-pruning's pruner for this model; groups rooted at a module named in `skip` are left alone."""
    try:
        with _bounded_groups(), warnings.catch_warnings():
            # cls_token/pos_embed: torch-pruning's default (their last dimension, the embedding) is right
            warnings.filterwarnings("ignore", "Unwrapped parameters detected", UserWarning)
            return _build_pruner(model, spec, cfg, skip)
    except GraphBlowUp:
        raise UserError(f"torch-pruning's dependency graph for {type(model).__name__} does not settle (more than "
                        f"{MAX_GROUP_ITEMS:,} coupled layers in one group: residuals that add into a slice of the "
                        "channels, as in ReXNet); refused") from None


def _build_pruner(model: nn.Module, spec: InputSpec, cfg: WidthConfig, skip: frozenset[str]):
    example = torch.zeros(1, spec.channels, spec.height, spec.width, device=next(model.parameters()).device)
    by_name = dict(model.named_modules())
    ignored = kept_layers(model, spec, cfg) + [by_name[n] for n in sorted(skip) if n in by_name]
    common = dict(global_pruning=cfg.global_ranking, round_to=cfg.round_to)
    placeholder = tp.importance.GroupMagnitudeImportance(p=2)
    fc1s = _mlp_fc1s(model)
    if not is_vit(model):
        per_layer = {m: cfg.ratio_for(n) for n, m in by_name.items()
                     if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and cfg.ratio_for(n) != cfg.sparsity}
        if not fc1s:
            pruner = _Pruner(model, example, placeholder, pruning_ratio=cfg.sparsity, ignored_layers=ignored,
                             pruning_ratio_dict=per_layer, root_module_types=[nn.modules.conv._ConvNd], **common)
            return pruner, set()
        # Hybrids and non-timm-Attention transformers (Swin, MobileViT...): channels of convs and FFN neurons;
        # a group that also writes through another linear layer (a residual stream) is left alone.
        fc1_ids = {id(f) for f in fc1s}
        others = [m for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in fc1_ids]
        pruner = _Pruner(model, example, placeholder, pruning_ratio=cfg.sparsity, ignored_layers=ignored + others,
                         pruning_ratio_dict=per_layer, root_module_types=[nn.modules.conv._ConvNd, nn.Linear], **common)
        return pruner, fc1_ids
    if cfg.layer_sparsity:
        raise UserError("`layer_sparsity` sets CNN layers' ratios; for a ViT use `sparsity` and `scope`")
    from timm.layers import Attention

    attns = [m for m in model.modules() if isinstance(m, Attention)]
    for a in attns:
        if not hasattr(a, "attn_dim"):
            raise UserError("head pruning needs a timm whose Attention has attn_dim (timm >= 1.0.20)")
    s = cfg.sparsity
    # torch-pruning only reaches its head-removal step for an attention group with a non-zero width
    # ratio; prune_head_dims=False keeps head_dim intact, so the ratio on qkv removes whole heads only.
    ratios = {a.qkv: (s if "heads" in cfg.scope else 0.0) for a in attns}
    ratios.update({f: (s if "ffn" in cfg.scope else 0.0) for f in fc1s})
    pruner = _Pruner(
        model, example, placeholder, pruning_ratio=s if "embed" in cfg.scope else 0.0, pruning_ratio_dict=ratios,
        num_heads={a.qkv: a.num_heads for a in attns}, prune_num_heads="heads" in cfg.scope, prune_head_dims=False,
        head_pruning_ratio=s if "heads" in cfg.scope else 0.0, ignored_layers=ignored,
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
        ratio = cfg.sparsity if vit else cfg.ratio_for(info.name)
        if ratio == 0:
            continue
        if info.kind == "head":
            info.n_remove = math.ceil(ratio * info.n_units)
        else:
            info.n_remove = info.n_units if cfg.global_ranking else _local_quota(info.n_units, ratio, cfg.round_to)
        if not cfg.global_ranking and info.n_remove >= info.n_units:
            what = "heads" if info.kind == "head" else "channels"
            hint = f" with `round_to` {cfg.round_to}" if cfg.round_to else ""
            raise UserError(
                f"sparsity {ratio}{hint} would remove every one of the {info.n_units} {what} of {info.name}; "
                "lower `sparsity`"
            )
    return in_scope


def _importance(model, pruner, infos, spec, cfg, calib, device, reporter):
    metric_of = {"head": cfg.metric, "ffn": cfg.ffn_metric if is_vit(model) else cfg.metric, "channel": cfg.metric}
    used = {imp.REGISTRY[metric_of[i.kind]] for i in infos if i.n_remove}
    needs_data = sorted(m.name for m in used if m.needs_data)
    if needs_data and calib is None:
        raise UserError(f"metric {', '.join(needs_data)} needs calibration data (pass `data`)")
    if any(m.needs_batchnorm for m in used) and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise UserError("bn-scale ranks structures by the BatchNorm after them; this model has no BatchNorm")
    loss_based = sorted(m.name for m in used if m.gradients and cfg.loss is None or m.name == "kl")
    if loss_based and not outputs.probe(model, spec.channels, spec.height, spec.width)["classifier"]:
        raise UserError(f"metric {', '.join(loss_based)} needs a loss on class logits and this model is not a classifier; "
                        "use l1, l2, random, bn-scale or output-norm-greedy (the Python API's prune takes a loss for taylor)")
    if any(m.gradients for m in used):
        imp.accumulate_gradients(model, calib, spec, cfg.calib_batch, device, reporter, cfg.loss)
    by_kind = {}
    for kind in ("head", "ffn", "channel"):
        metric = imp.REGISTRY[metric_of[kind]]
        targets = [i for i in infos if i.kind == kind and i.n_remove]
        if metric.library is not None or not targets:
            by_kind[kind] = None if metric.library is None else metric.library(cfg.global_ranking)
        else:
            by_kind[kind] = imp.ScoreTable(metric.scores(model, targets, calib, spec, cfg.calib_batch, device, reporter,
                                                         greedy_step=cfg.greedy_step, kl_direction=cfg.kl_direction))
    return imp.ByKind(kinds={i.key: i.kind for i in infos}, by_kind=by_kind)


def _window_attentions(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """timm's Swin window attention: heads own rows of qkv, columns of proj and of the relative-position
    bias table, which torch-pruning cannot trace (the table is indexed, not multiplied)."""
    try:
        from timm.models.swin_transformer import WindowAttention
    except ImportError:  # pragma: no cover - timm always has Swin
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, WindowAttention)]


@torch.no_grad()
def prune_window_heads(model: nn.Module, cfg: WidthConfig) -> dict[str, list[int]]:
    """Remove ceil(sparsity * heads) heads of every Swin window attention (at least one kept), ranked by
    the L1/L2 norm of their qkv rows and proj columns (random: seeded); slicing by hand keeps
    num_heads, qkv, proj and the bias table consistent."""
    out: dict[str, list[int]] = {}
    gen = torch.Generator().manual_seed(cfg.seed)
    for name, a in _window_attentions(model):
        qkv, proj = a.get_submodule("qkv"), a.get_submodule("proj")
        assert isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)
        table = a.get_parameter("relative_position_bias_table")
        n = int(a.num_heads)  # type: ignore[arg-type]  # an int attribute; nn.Module types attributes as Tensor | Module
        hd = qkv.out_features // (3 * n)
        remove = min(math.ceil(cfg.sparsity * n), n - 1)
        if remove <= 0:
            continue
        w = qkv.weight.view(3, n, hd, -1)
        pw = proj.weight.view(proj.out_features, n, hd)
        if cfg.metric == "random":
            score = torch.rand(n, generator=gen)
        else:
            p = 1 if cfg.metric == "l1" else 2  # data-driven metrics rank window heads by L2 magnitude
            score = w.abs().pow(p).sum((0, 2, 3)) + pw.abs().pow(p).sum((0, 2))
        keep = torch.sort(torch.argsort(score, descending=True)[: n - remove]).values
        rows = torch.cat([(s * n + keep)[:, None] * hd + torch.arange(hd) for s in range(3)]).flatten()
        cols = (keep[:, None] * hd + torch.arange(hd)).flatten()
        dev = qkv.weight.device
        rows, cols = rows.to(dev), cols.to(dev)
        new_qkv = nn.Linear(qkv.in_features, len(rows), bias=qkv.bias is not None).to(dev)
        new_qkv.weight.copy_(qkv.weight[rows])
        if qkv.bias is not None:
            new_qkv.bias.copy_(qkv.bias[rows])
        new_proj = nn.Linear(len(cols), proj.out_features, bias=proj.bias is not None).to(dev)
        new_proj.weight.copy_(proj.weight[:, cols])
        if proj.bias is not None:
            new_proj.bias.copy_(proj.bias)
        a.qkv, a.proj = new_qkv, new_proj
        a.relative_position_bias_table = nn.Parameter(table[:, keep.to(dev)].clone())
        a.num_heads = len(keep)  # type: ignore[assignment]  # a plain int attribute (see above)
        out[name] = [n, len(keep)]
    return out


def attention_heads(model: nn.Module) -> dict[str, int]:
    """Heads of every timm Attention module, by name."""
    from timm.layers import Attention

    return {name: int(a.num_heads) for name, a in model.named_modules() if isinstance(a, Attention)}


def _sync_attention_heads(model: nn.Module) -> dict[str, list[int]]:
    """After whole heads were cut from qkv/proj by group surgery (head_dim kept: prune_head_dims=False, so
    the scale stays too): timm Attention's num_heads and attn_dim from the new qkv width; the changed ones."""
    from timm.layers import Attention

    heads = {}
    for name, a in model.named_modules():
        if isinstance(a, Attention):
            n = a.qkv.out_features // (3 * a.head_dim)
            if n != a.num_heads:
                heads[name] = [a.num_heads, n]
                a.num_heads, a.attn_dim = n, n * a.head_dim
    return heads


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


class SurgeryFailed(Exception):
    """torch-pruning's surgery raised, or left a model that no longer runs."""


def _prune_once(model: nn.Module, spec: InputSpec, cfg: WidthConfig, skip: frozenset[str], calib, device,
                reporter: Reporter, cheap: bool = False) -> tuple[list[GroupInfo], dict]:
    """One torch-pruning pass leaving the groups rooted in `skip` alone. `cheap` ranks by magnitude:
    only used to find which groups torch-pruning cannot remove (that does not depend on the ranking).
    Raises UserError for a request that cannot be met, SurgeryFailed when torch-pruning breaks the model."""
    try:
        pruner, ffn_ids = _make_pruner(model, spec, cfg, skip)
    except UserError:
        raise
    except Exception as e:  # tracing failures: architectures torch-pruning does not cover
        raise UserError(f"torch-pruning cannot prune {type(model).__name__}: {_first_line(e)}") from None
    infos = describe(pruner, model, ffn_ids)
    if not _plan(infos, model, cfg):
        raise UserError("nothing to prune: the model has no prunable structure in the chosen scope")
    if not any(i.n_remove for i in infos):
        return infos, {}
    if cheap:
        pruner.importance = tp.importance.GroupMagnitudeImportance(p=2)
    else:
        pruner.importance = _importance(model, pruner, infos, spec, cfg, calib, device, reporter)
    torch.manual_seed(cfg.seed)  # the random metric draws from torch's global generator
    try:
        with torch.no_grad():
            pruner.step()
        model.zero_grad(set_to_none=True)
        heads = _sync_attention_heads(model) if is_vit(model) else {}
        if "heads" in cfg.scope and cfg.sparsity > 0:
            heads.update(prune_window_heads(model, cfg))
        check_runs(model, spec, "after pruning")
    except UserError as e:
        raise SurgeryFailed(str(e)) from None
    except Exception as e:
        raise SurgeryFailed(_first_line(e)) from None
    return infos, heads


def _fails(original: nn.Module, spec: InputSpec, cfg: WidthConfig, skip: frozenset[str], device) -> str | None:
    """Why pruning a copy with `skip` left alone breaks it (None if it works or prunes nothing)."""
    trial = clone(original)
    try:
        _prune_once(trial, spec, cfg, skip, None, device, QUIET, cheap=True)
    except SurgeryFailed as e:
        return str(e)
    except UserError:
        return None
    return None


def find_unprunable(original: nn.Module, spec: InputSpec, cfg: WidthConfig, names: list[str], device,
                    reporter: Reporter = QUIET) -> dict[str, str]:
    """The groups (by root name) whose removal torch-pruning gets wrong, found by bisection: prune only a
    half of the suspects on a copy; a half that works is cleared, a failing half is split again."""
    bad: dict[str, str] = {}
    everything = frozenset(names)
    stack = [list(names)]
    with reporter.task("finding layers torch-pruning cannot prune", total=None) as task:
        while stack:
            part = stack.pop()
            why = _fails(original, spec, cfg, everything - frozenset(part), device)
            task(1)
            if why is None:
                continue
            if len(part) == 1:
                bad[part[0]] = why
                continue
            mid = len(part) // 2
            stack += [part[mid:], part[:mid]]
    return bad


def prune_width(model: nn.Module, spec: InputSpec, cfg: WidthConfig, calib: ImageSet | None = None,
                device: str | torch.device = "cpu", reporter: Reporter = QUIET,
                original: nn.Module | None = None) -> WidthReport:
    """Prune `model` in place. Returns per-layer widths before/after, and the groups left alone.

    Where torch-pruning cannot remove some group correctly (its surgery breaks the model), those groups
    are found, left alone and reported, and the rest is pruned. `original`: an untouched copy of `model`
    the caller already holds (saves a copy of a large model)."""
    validate(cfg)
    model.eval()
    before = _widths(model)
    here = next(model.parameters()).device
    if original is None or next(original.parameters()).device != here:
        original = clone(model)  # only read from: trials and the restore work on copies of it
    left_alone: dict[str, str] = {}
    alone_units = 0
    try:
        infos, heads = _prune_once(model, spec, cfg, frozenset(), calib, device, reporter)
    except SurgeryFailed as e:
        first = str(e)
        pruner, ffn_ids = _make_pruner(original, spec, cfg)
        every = describe(pruner, original, ffn_ids)
        names = [i.name for i in every]
        left_alone = find_unprunable(original, spec, cfg, names, device, reporter)
        if not left_alone or len(left_alone) == len(names):
            raise UserError(f"torch-pruning cannot prune {type(model).__name__}: {first}") from None
        alone_units = sum(i.n_units for i in every if i.name in left_alone)
        _restore(model, original)
        try:
            infos, heads = _prune_once(model, spec, cfg, frozenset(left_alone), calib, device, reporter)
        except SurgeryFailed as e2:
            raise UserError(f"torch-pruning cannot prune {type(model).__name__}: {e2}") from None
    after = _widths(model)
    empty = [n for n, w in after.items() if w == 0]
    if empty:
        raise UserError(f"pruning left {empty[0]} with no channels; lower `sparsity`")
    if cfg.asks_pruning() and after == before and not any(v[0] != v[1] for v in heads.values()):
        why = "; ".join(f"{k}: {v}" for k, v in list(left_alone.items())[:2]) or "no group lost a whole unit"
        raise UserError(f"nothing was pruned at sparsity {cfg.sparsity} ({why}); nothing written")
    return WidthReport(
        groups=[{"group": i.name, "kind": i.kind, "units": i.n_units, "planned_removal": i.n_remove} for i in infos if i.n_remove],
        layers={n: [before[n], after[n]] for n in after if n in before and before[n] != after[n]},
        heads={k: v for k, v in heads.items() if v[0] != v[1]},
        left_alone=left_alone,
        units=sum(i.n_units for i in infos) + alone_units,
        removed=sum(i.n_remove for i in infos),
    )


def sparsity_for(model: nn.Module, spec: InputSpec, cfg: WidthConfig, what: str, keep: float, device="cpu",
                 reporter: Reporter = QUIET, steps: int = 10) -> tuple[float, float]:
    """(sparsity, kept fraction): the uniform per-layer sparsity whose child keeps the share `keep` of the
    parent's `what` ("params" or "macs"), found by bisection on pruned copies. With per-layer ranking a
    child's widths depend on the sparsity alone, so the copies are ranked by L2 (data-free) whatever the
    metric of the real run."""
    from dataclasses import replace

    from .flops import count

    if what not in ("params", "macs"):
        raise ValueError(what)
    if not (0.0 < keep < 1.0) or math.isnan(keep):
        raise UserError(f"`keep_{what}` must be in (0, 1), got {keep}")
    if cfg.global_ranking:
        raise UserError(f"`keep_{what}` matches a uniform per-layer sparsity; it does not combine with `global`")
    shape = (spec.channels, spec.height, spec.width)
    full = count(model, shape, device)[what]

    def kept(sparsity: float) -> float | None:  # None: this sparsity would empty a layer
        trial = clone(model)
        try:
            prune_width(trial, spec, replace(cfg, sparsity=sparsity, metric="l2", ffn_metric="l2"), None, device, QUIET,
                        original=model)
        except UserError as e:
            return 1.0 if "nothing was pruned" in str(e) else None
        return count(trial, shape, device)[what] / full

    lo, hi = 0.0, 0.99
    best = (0.0, 1.0)
    with reporter.task(f"finding the sparsity that keeps {100 * keep:g}% of the {what}", steps) as advance:
        for _ in range(steps):
            mid = (lo + hi) / 2
            k = kept(mid)
            if k is not None and abs(k - keep) < abs(best[1] - keep):
                best = (mid, k)
            advance()
            if abs(best[1] - keep) < 0.002:
                break
            if k is None or k < keep:
                hi = mid
            else:
                lo = mid
    if abs(best[1] - keep) > 0.05:
        raise UserError(f"no uniform sparsity keeps {100 * keep:g}% of the {what} (closest: {100 * best[1]:.1f}% at "
                        f"sparsity {best[0]:.3f}); the widths move in steps too coarse for this model")
    return best


def _restore(model: nn.Module, original: nn.Module) -> None:
    """Put `original`'s modules back into `model` (whose surgery failed half-way)."""
    for name, child in list(original.named_children()):
        setattr(model, name, clone(child))
    for name, p in original.named_parameters(recurse=False):
        setattr(model, name, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
    for name, b in original.named_buffers(recurse=False):
        model.register_buffer(name, None if b is None else b.clone())
    for k, v in vars(original).items():
        if not k.startswith("_") and k != "training":
            setattr(model, k, copy.deepcopy(v))


def output_layers(model: nn.Module, spec: InputSpec) -> list[nn.Module]:
    """Modules whose output is one of the model's outputs (heads): pruning their widths would change what
    the model returns. A classifier's is its final layer."""
    device = next(model.parameters()).device
    produced: list[tuple[nn.Module, Any]] = []
    hooks = [m.register_forward_hook(lambda mod, _a, out: produced.append((mod, out)))
             for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(1, spec.channels, spec.height, spec.width, device=device))
    finally:
        for h in hooks:
            h.remove()
    if outputs.is_classifier(out):
        return [get_classifier(model)]
    ends = {id(t) for t in outputs.flatten(out)}
    return [m for m, o in produced if isinstance(o, torch.Tensor) and id(o) in ends]


def ignored_by_glob(model: nn.Module, patterns: tuple[str, ...]) -> list[nn.Module]:
    """Modules named by --ignore-layers globs; a glob that names nothing is refused (a typo would prune the head)."""
    found = []
    names = [n for n, _ in model.named_modules() if n]
    by_name = dict(model.named_modules())
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise UserError(f"`ignore_layers` {pattern!r} matches no module (names as in the model's named_modules(), "
                            f"e.g. {', '.join(names[:3])})")
        found += [by_name[n] for n in hits]
    return found


def kept_layers(model: nn.Module, spec: InputSpec, cfg: WidthConfig) -> list[nn.Module]:
    return output_layers(model, spec) + ignored_by_glob(model, cfg.ignore_layers)


def check_runs(model: nn.Module, spec: InputSpec, when: str) -> dict:
    """A model that cannot run a forward pass is never written. Returns what it outputs (outputs.describe)."""
    try:
        return outputs.probe(model, spec.channels, spec.height, spec.width)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{type(model).__name__} does not run {when} on {spec.channels}x{spec.height}x{spec.width} inputs "
                        f"({_first_line(e)})") from None


# ----------------------------------------------------------------------------- per-group widths (latency-aware)
def planned_groups(model: nn.Module, spec: InputSpec, cfg: WidthConfig):
    """(pruner, groups) torch-pruning would prune under `cfg`, each with the units this run removes (n_remove)."""
    pruner, ffn_ids = _make_pruner(model, spec, cfg)
    infos = describe(pruner, model, ffn_ids)
    _plan(infos, model, cfg)
    return pruner, infos


def channel_groups(model: nn.Module, spec: InputSpec, cfg: WidthConfig | None = None):
    """(pruner, groups with more than one unit): a CNN's channel groups; a timm ViT's attention heads and
    FFN neurons (the embedding width too where `scope` names it)."""
    cfg = cfg or WidthConfig()
    model.eval()
    pruner, ffn_ids = _make_pruner(model, spec, cfg)
    infos = [i for i in describe(pruner, model, ffn_ids) if i.n_units > 1]
    if is_vit(model):
        kinds = {"head": "heads", "ffn": "ffn", "channel": "embed"}
        infos = [i for i in infos if kinds.get(i.kind) in cfg.scope]
    if not infos:
        raise UserError("nothing to prune: the model has no prunable channel group")
    return pruner, infos


def prune_to_widths(model: nn.Module, spec: InputSpec, remove: dict[str, list[int]]) -> dict:
    """Remove the given units (channels, heads, FFN neurons) from each named group of `model` (its groups
    are found on `model` itself); returns widths before/after."""
    pruner, infos = channel_groups(model, spec, WidthConfig(scope=("heads", "ffn", "embed")))
    dims = {i.name: [d for u in remove[i.name] for d in i.unit_dims(u)] for i in infos if i.name in remove}
    if is_vit(model):
        changed = apply_widths(model, spec, pruner, infos, dims, check=False)
        _sync_attention_heads(model)
        check_runs(model, spec, "after pruning")
        return changed
    return apply_widths(model, spec, pruner, infos, dims)


LOSS_ESTIMATES = ("taylor", "kl")  # metrics whose scores estimate the loss change: comparable across groups as they are


def unit_scores(model: nn.Module, spec: InputSpec, cfg: WidthConfig, calib: ImageSet | None = None,
                device: str | torch.device = "cpu", reporter: Reporter = QUIET):
    """(pruner, groups, {group name: importance per unit}) for the groups of channel_groups, scores
    comparable across groups: magnitude-type metrics divided by their group's mean, as torch-pruning's
    global ranking does; taylor and kl estimate the damage itself and stay as they are, so a residual group
    (its Taylor terms summed over every coupled layer) weighs what it touches, as in HALP and Molchanov et
    al. 2019. A head's score is the mean over its dimensions, as torch-pruning ranks heads."""
    import numpy as np

    validate(cfg)
    pruner, infos = channel_groups(model, spec, cfg)
    for i in infos:
        i.n_remove = i.n_units - 1  # score every unit
    scorer = _importance(model, pruner, infos, spec, cfg, calib, device, reporter)
    torch.manual_seed(cfg.seed)
    scores = {}
    for i in infos:
        s = scorer(i.group)
        if s is None:
            raise UserError(f"metric {cfg.metric} gives no scores for {i.name}")
        s = s.detach().float().cpu().numpy().astype(np.float64)
        if len(s) == i.n_dims and i.unit_size > 1:
            s = s.reshape(i.n_units, i.unit_size).mean(1)
        if cfg.metric not in LOSS_ESTIMATES and s.mean() > 0:
            s = s / s.mean()
        scores[i.name] = s
    model.zero_grad(set_to_none=True)
    return pruner, infos, scores


def layer_groups(pruner, infos: list[GroupInfo], model: nn.Module) -> dict[str, tuple[str | None, str | None]]:
    """For every conv/linear layer, the group that sets its input width and the one that sets its output
    width (None: fixed). A layer whose input joins several groups (a concatenation) is refused."""
    names = {id(m): n for n, m in model.named_modules()}
    ins: dict[str, list[str]] = {}
    outs: dict[str, str] = {}
    for info in infos:
        for dep, _ in info.group:
            m = dep.target.module
            if not isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
                continue
            n = names[id(m)]
            if pruner.DG.is_out_channel_pruning_fn(dep.handler):
                outs[n] = info.name
            elif info.name not in ins.setdefault(n, []):
                ins[n].append(info.name)
    out: dict[str, tuple[str | None, str | None]] = {}
    for n, m in model.named_modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            if len(ins.get(n, [])) > 1:
                raise UserError(f"latency-aware pruning cannot model {n}: its input concatenates several channel "
                                "groups (DenseNet/Inception-style); use `sparsity`")
            out[n] = (ins[n][0] if ins.get(n) else None, outs.get(n))
    return out


def apply_widths(model: nn.Module, spec: InputSpec, pruner, infos: list[GroupInfo], remove: dict[str, list[int]],
                 check: bool = True) -> dict:
    """Remove the given root indices from each named group (torch-pruning surgery); returns widths before/after."""
    before = _widths(model)
    by_name = {i.name: i for i in infos}
    with torch.no_grad():
        for name, idxs in remove.items():
            if not idxs:
                continue
            dep = by_name[name].group[0].dep
            pruner.DG.get_pruning_group(dep.target.module, dep.handler, idxs).prune()
    if check:
        check_runs(model, spec, "after pruning")
    after = _widths(model)
    return {n: [before[n], after[n]] for n in after if n in before and before[n] != after[n]}
