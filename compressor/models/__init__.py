"""Build a model by name: our CIFAR models first, then torchvision, then timm.

`torchvision:NAME` or `timm:NAME` picks a library explicitly where a name exists in both;
`package.module:factory` is the user's own code (models/user_code.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from ..errors import UserError
from . import user_code
from .cifar_resnet import CifarResNet
from .cifar_vgg import CifarVGG

CIFAR_RESNET_DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _vit_cifar(num_classes: int, in_chans: int = 3, img_size: int = 32, **kw):
    """A small ViT for 32x32 inputs, built with timm's VisionTransformer so every ViT path is timm's."""
    from timm.models.vision_transformer import VisionTransformer

    cfg: dict[str, Any] = dict(patch_size=4, embed_dim=192, depth=6, num_heads=12, mlp_ratio=2.0)
    cfg.update(kw)
    return VisionTransformer(img_size=img_size, in_chans=in_chans, num_classes=num_classes, **cfg)


OWN_MODELS = {
    **{name: (lambda d: (lambda num_classes, **kw: CifarResNet(depth=d, num_classes=num_classes, **kw)))(d)
       for name, d in CIFAR_RESNET_DEPTHS.items()},
    "vgg16_bn_cifar": lambda num_classes, **kw: CifarVGG(num_classes=num_classes, **kw),
    "vit_cifar": _vit_cifar,
}
OWN_INPUT_SIZE = 32


@dataclass
class ArchSpec:
    """What model.json records to rebuild the architecture."""

    source: str  # "compress" | "torchvision" | "timm" | "python" (the user's module:factory)
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    code: dict[str, Any] | None = None  # python: the module's file, SHA-256 and version when recorded

    def to_json(self) -> dict:
        d = {"source": self.source, "name": self.name, "kwargs": self.kwargs}
        if self.code is not None:
            d["code"] = self.code
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ArchSpec":
        return cls(source=d["source"], name=d["name"], kwargs=dict(d.get("kwargs", {})), code=d.get("code"))


def resolve(name: str) -> tuple[str, str]:
    """Map a user-facing model name to (source, library name)."""
    if user_code.is_factory_spec(name):
        return user_code.SOURCE, name
    if ":" in name:
        source, _, bare = name.partition(":")
        if source not in ("compress", "torchvision", "timm"):
            raise UserError(f"unknown model source '{source}' in '{name}' (use torchvision:NAME, timm:NAME, or package.module:factory for your own code)")
        _check_exists(source, bare)
        return source, bare
    if name in OWN_MODELS:
        return "compress", name
    for source in ("torchvision", "timm"):
        if _exists(source, name):
            return source, name
    raise UserError(
        f"unknown model '{name}': not one of ours ({', '.join(sorted(OWN_MODELS))}), "
        "nor a torchvision classification model, nor a timm model"
    )


def _exists(source: str, name: str) -> bool:
    if source == "compress":
        return name in OWN_MODELS
    if source == "torchvision":
        import torchvision

        return name in torchvision.models.list_models(module=torchvision.models)
    import timm

    return name in timm.list_models()


def _check_exists(source: str, name: str) -> None:
    if not _exists(source, name):
        raise UserError(f"unknown {source} model '{name}'")


def build(spec: ArchSpec, num_classes: int, pretrained: bool = False, named_by_user: bool = False) -> nn.Module:
    """Instantiate the architecture (random init unless pretrained). The user's own factory is called with
    its recorded keyword arguments only (`named_by_user`: named on this command line, not read from a file)."""
    kw = dict(spec.kwargs)
    if spec.source == user_code.SOURCE:
        if pretrained:
            raise UserError("`pretrained` loads a library's weights; for your own model give `checkpoint`")
        return user_code.build(spec.name, kw, spec.code, named_by_user=named_by_user)
    try:
        if spec.source == "compress":
            fn = OWN_MODELS.get(spec.name)
            if fn is None:  # a hand-edited or corrupt model.json
                raise UserError(f"unknown architecture compress:{spec.name} (ours are {', '.join(OWN_MODELS)})")
            return fn(num_classes=num_classes, **kw)
        if spec.source == "torchvision":
            import torchvision

            if pretrained:
                model = torchvision.models.get_model(spec.name, weights="DEFAULT", **kw)
                return reset_classifier(model, num_classes)
            return torchvision.models.get_model(spec.name, weights=None, num_classes=num_classes, **kw)
        if spec.source == "timm":
            import timm

            return timm.create_model(spec.name, pretrained=pretrained, num_classes=num_classes, **kw)
    except UserError:
        raise
    except TypeError as e:
        raise UserError(f"bad model argument for {spec.name}: {e}") from None
    except (OSError, RuntimeError, ValueError) as e:
        if pretrained:
            raise UserError(
                f"cannot load pretrained weights for {spec.name} (they download from the internet): "
                f"{str(e).splitlines()[0][:200]}"
            ) from None
        raise UserError(f"cannot build {spec.name}: {str(e).splitlines()[0][:200]}") from None
    raise UserError(f"unknown model source '{spec.source}'")


def default_input(spec: ArchSpec, model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) the architecture expects by default."""
    chans = int(spec.kwargs.get("in_chans", 3))
    if spec.source == "compress":
        size = int(spec.kwargs.get("img_size", OWN_INPUT_SIZE))
        return chans, size, size
    if spec.source == "timm":
        cfg = getattr(model, "pretrained_cfg", None) or {}
        c, h, w = cfg.get("input_size", (chans, 224, 224))
        img = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if img is not None:
            h, w = img
        return chans, int(h), int(w)
    return 3, 224, 224


def pretrained_normalisation(spec: ArchSpec, model: nn.Module) -> tuple[tuple, tuple]:
    if spec.source == "timm":
        cfg = getattr(model, "pretrained_cfg", None) or {}
        return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    return IMAGENET_MEAN, IMAGENET_STD


def get_classifier(model: nn.Module) -> nn.Module:
    """The final linear layer (its input is the penultimate representation); for all-convolutional
    classifiers (SqueezeNet) the last convolution."""
    get = getattr(model, "get_classifier", None)
    if callable(get):
        head = get()
        if isinstance(head, nn.Linear):
            return head
    last: nn.Module | None = None
    last_conv: nn.Module | None = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
        elif isinstance(m, nn.modules.conv._ConvNd):
            last_conv = m
    if last is None:
        last = last_conv
    if last is None:
        raise UserError(f"{type(model).__name__} has no final linear or convolutional classifier")
    return last


def reset_classifier(model: nn.Module, num_classes: int) -> nn.Module:
    """Give a library model a fresh head for `num_classes` (pretrained backbones on a new task)."""
    reset = getattr(model, "reset_classifier", None)
    if callable(reset):
        reset(num_classes)
        return model
    head = get_classifier(model)
    if not isinstance(head, nn.Linear):
        raise UserError(f"cannot replace the convolutional classifier of {type(model).__name__}")
    if head.out_features == num_classes:
        return model
    for name, m in model.named_modules():
        for child_name, child in m.named_children():
            if child is head:
                setattr(m, child_name, nn.Linear(head.in_features, num_classes, bias=head.bias is not None))
                return model
    raise UserError("cannot replace the classifier of this model")


def clone(model: nn.Module) -> nn.Module:
    """A deep copy that works for models caching tensors in eval mode (LeViT's attention-bias cache is
    not copyable; train mode drops it)."""
    import copy

    was_training = model.training
    model.train()
    try:
        twin = copy.deepcopy(model)
    finally:
        model.train(was_training)
    return twin.train(was_training)


def is_vit(model: nn.Module) -> bool:
    from timm.layers import Attention

    return any(isinstance(m, Attention) for m in model.modules())
