"""The model zoo (timm models of every family) and the one feature-tap interface over all of them.

Every model is wrapped in a :class:`TappedModel`, which returns logits, pre-logits and the requested stage
features (stages 1-4) in a recorded layout:

* ``nchw``   CNN feature maps, (B, C, H, W)
* ``tokens`` patch tokens, (B, L, D) with L = H*W on a ``grid`` (H, W); prefix (cls/dist) tokens are kept apart
  in ``Features.prefix``.

Stage outputs are taken with forward hooks on the stage modules and stage shapes are found by a dry run, so no
model's forward is rewritten and no shape is hard-coded. Each stage's entry module takes forward pre-hooks, through
which a method can alter what enters a stage (PAT's prompts): the stage module itself, the first block of a block
stack (ViT, Mixer), or a Swin stage's first block (after timm >= 0.9's patch merging, where timm 0.6.5 had it).
Which modules those are, per family, is registered in ``families.py``; a zoo entry names its family.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import timm
import torch.nn as nn
from timm.models import convnext as timm_convnext
from timm.models import mlp_mixer as timm_mixer
from timm.models import resnet as timm_resnet
from timm.models import swin_transformer as timm_swin
from timm.models import vision_transformer as timm_vit
from hkdbench.benchmark.models.pretrained import (PretrainedWeights, check_fits, is_weight_file, load_pretrained_into,
                                                  resolve_pretrained)
from hkdbench.benchmark.models.families import family_groups, family_of, group_takes_img_size
from hkdbench.benchmark.models.taps import TappedModel
from hkdbench.benchmark.core.config import ConfigError
from hkdbench.benchmark.core.errors import HkdbenchError


class UnknownModelError(HkdbenchError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


# --------------------------------------------------------------------------------------------------------------
# The zoo
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ZooEntry:
    name: str
    family: str
    build: Callable[..., nn.Module]  # build(num_classes, in_chans, img_size) -> nn.Module
    img_size: int                    # the resolution the configuration is meant for
    crop_pct: float                  # evaluation resize = img_size / crop_pct, as timm's eval transform
    description: str
    paper: bool = False              # one of the papers' 224 px models
    interpolation: str = "bilinear"  # timm 0.6.5's default_cfg interpolation (what data.eval_interpolation=model takes)


_ZOO: Dict[str, ZooEntry] = {}


def _register(name, family, img_size, crop_pct, description, paper=False, interpolation="bilinear"):
    def wrap(fn):
        if name in _ZOO:
            raise ValueError(f"model {name!r} registered twice")
        if family not in family_groups():  # the families registered in families.py
            raise ValueError(f"model {name!r}: unknown family {family!r}; families are {family_groups()}")
        _ZOO[name] = ZooEntry(name, family, fn, img_size, crop_pct, description, paper, interpolation)
        return fn
    return wrap


def _timm(name: str, family: str, **fixed):
    def build(num_classes: int, in_chans: int, img_size: int, **options) -> nn.Module:
        kwargs = {**fixed, **options}
        if img_size != 224 and "img_size" not in kwargs and group_takes_img_size(family):
            kwargs["img_size"] = img_size
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    return build


# The papers' 224 px models (OFA-KD / PAT CIFAR-100 and ImageNet matrices), with crop_pct and interpolation of
# their default_cfg in timm 0.6.5 (what the references' resolve_data_config read; some changed in timm 1.x).
for _name, _family, _timm_name, _crop, _interp in [
    ("resnet18", "cnn", "resnet18", 0.875, "bilinear"),
    ("resnet50", "cnn", "resnet50", 0.95, "bicubic"),  # 0.6.5's default weights are RSB-A1
    ("mobilenetv2_100", "cnn", "mobilenetv2_100", 0.875, "bicubic"),
    ("deit_tiny", "vit", "deit_tiny_patch16_224", 0.9, "bicubic"),
    ("vit_small", "vit", "vit_small_patch16_224", 0.9, "bicubic"),
    ("swin_tiny", "swin", "swin_tiny_patch4_window7_224", 0.9, "bicubic"),
    ("convnext_tiny", "convnext", "convnext_tiny", 0.875, "bicubic"),
    ("mixer_b16", "mlp", "mixer_b16_224", 0.875, "bicubic"),
    ("resmlp_12", "mlp", "resmlp_12_224", 0.875, "bicubic"),
]:
    _register(_name, _family, 224, _crop, f"timm {_timm_name}", paper=True, interpolation=_interp)(
        _timm(_timm_name, _family))


def _small_swin(embed_dim: int):
    def build(num_classes: int, in_chans: int, img_size: int, **options) -> nn.Module:
        return timm_swin.SwinTransformer(
            img_size=img_size, patch_size=4, window_size=7, embed_dim=embed_dim, depths=(2, 2, 2, 2),
            num_heads=(2, 4, 8, 16), num_classes=num_classes, in_chans=in_chans, **options)
    return build


# The papers' small Swins (OFAKD custom_model/swin_transformer.py): depths 2-2-2-2, heads 2-4-8-16, patch 4, window 7.
_register("swin_pico", "swin", 224, 0.9, "Swin-P: embed 48, depths 2-2-2-2", paper=True, interpolation="bicubic")(
    _small_swin(48))
_register("swin_nano", "swin", 224, 0.9, "Swin-N: embed 64, depths 2-2-2-2", paper=True, interpolation="bicubic")(
    _small_swin(64))


# Small-resolution configurations of the same families (32x32 input) for the demo and the tests.
def _small_resnet(layers, channels, stem_stride: int):
    def build(num_classes, in_chans, img_size, **options):
        model = timm_resnet.ResNet(block=timm_resnet.BasicBlock, layers=layers, channels=channels,
                                   num_classes=num_classes, in_chans=in_chans, **options)
        # Small-image stem: one 3x3 conv (timm's plain stem is 64 wide) and no max-pool, so stage 4 keeps a
        # 2x2 (stride 2) or 4x4 (stride 1) map at 32 px.
        model.conv1 = nn.Conv2d(in_chans, 64, 3, stride=stem_stride, padding=1, bias=False)
        model.maxpool = nn.Identity()
        return model
    return build


_register("resnet_mini", "cnn", 32, 1.0, "ResNet, BasicBlock 1-1-1-1, widths 16-32-64-128, 3x3 stride-2 stem")(
    _small_resnet((1, 1, 1, 1), (16, 32, 64, 128), stem_stride=2))
_register("resnet_small", "cnn", 32, 1.0, "ResNet, BasicBlock 2-2-2-2, widths 32-64-128-256, 3x3 stride-1 stem")(
    _small_resnet((2, 2, 2, 2), (32, 64, 128, 256), stem_stride=1))


@_register("vit_mini", "vit", 32, 1.0, "ViT with cls token, patch 4, dim 64, depth 4, 2 heads")
def _vit_mini(num_classes, in_chans, img_size, **options):
    return timm_vit.VisionTransformer(img_size=img_size, patch_size=4, embed_dim=64, depth=4, num_heads=2,
                                      mlp_ratio=2.0, num_classes=num_classes, in_chans=in_chans, **options)


@_register("swin_mini", "swin", 32, 1.0, "Swin, patch 2, window 4, dim 32, depths 1-1-1-1")
def _swin_mini(num_classes, in_chans, img_size, **options):
    return timm_swin.SwinTransformer(img_size=img_size, patch_size=2, window_size=4, embed_dim=32,
                                     depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), mlp_ratio=2.0,
                                     num_classes=num_classes, in_chans=in_chans, **options)


@_register("convnext_mini", "convnext", 32, 1.0, "ConvNeXt, patch-1 stem, dims 16-32-64-128, depths 1-1-1-1")
def _convnext_mini(num_classes, in_chans, img_size, **options):
    return timm_convnext.ConvNeXt(in_chans=in_chans, num_classes=num_classes, depths=(1, 1, 1, 1),
                                  dims=(16, 32, 64, 128), patch_size=1, **options)


@_register("mixer_mini", "mlp", 32, 1.0, "MLP-Mixer, patch 4, dim 64, depth 4")
def _mixer_mini(num_classes, in_chans, img_size, **options):
    return timm_mixer.MlpMixer(num_classes=num_classes, img_size=img_size, in_chans=in_chans, patch_size=4,
                               num_blocks=4, embed_dim=64, mlp_ratio=(0.5, 2.0), **options)


@_register("resmlp_mini", "mlp", 32, 1.0, "ResMLP, patch 4, dim 64, depth 4")
def _resmlp_mini(num_classes, in_chans, img_size, **options):
    return timm_mixer.MlpMixer(num_classes=num_classes, img_size=img_size, in_chans=in_chans, patch_size=4,
                               num_blocks=4, embed_dim=64, mlp_ratio=4, block_layer=timm_mixer.ResBlock,
                               norm_layer=timm_mixer.Affine, stem_norm=False, **options)


def zoo() -> Dict[str, ZooEntry]:
    return dict(_ZOO)


def zoo_entry(name: str) -> ZooEntry:
    try:
        return _ZOO[name]
    except KeyError:
        raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(_ZOO)}") from None


def create_model(name: str, num_classes: int, in_chans: int = 3, img_size: Optional[int] = None,
                 drop_path_rate: Optional[float] = None, pretrained: Optional[str] = None,
                 pretrained_sha256: Optional[str] = None) -> "TappedModel":
    """``drop_path_rate`` None keeps the timm model's default, as timm's ``create_model`` drops None kwargs.
    ``pretrained``: timm's pretrained weights to load (models/pretrained.py), checked against their hash."""
    entry = zoo_entry(name)
    size = img_size or entry.img_size
    options = {} if drop_path_rate is None else {"drop_path_rate": drop_path_rate}
    model = entry.build(num_classes=num_classes, in_chans=in_chans, img_size=size, **options)
    built = family_of(model).group
    if built != entry.family:
        raise ValueError(f"model {name!r} is registered as family {entry.family!r} but builds a {built!r} model "
                         f"({type(model).__name__})")
    if pretrained:
        load_pretrained_into(model, pretrained, pretrained_sha256, num_classes, in_chans)
    return TappedModel(model, name=name, family=entry.family, img_size=size, in_chans=in_chans)




# Which timm weights fit a zoo model (the weights themselves are models/pretrained.py's)
_ARCHITECTURES: Dict[str, Optional[str]] = {}


def zoo_architecture(zoo_name: str) -> Optional[str]:
    """The timm architecture a zoo model is built as (None for the suite's own small configurations), found by
    building it on the meta device (no memory, no weights)."""
    if zoo_name not in _ARCHITECTURES:
        import torch

        entry = zoo_entry(zoo_name)
        with torch.device("meta"):
            model = entry.build(num_classes=1, in_chans=3, img_size=entry.img_size)
        _ARCHITECTURES[zoo_name] = getattr(model, "pretrained_cfg", {}).get("architecture")
    return _ARCHITECTURES[zoo_name]


def resolve_for_model(zoo_name: str, name: str) -> PretrainedWeights:
    """``name``'s weights, checked to fit the zoo model ``zoo_name``."""
    architecture = zoo_architecture(zoo_name)
    if architecture is None:
        raise ConfigError(f"{zoo_name} is one of the suite's own configurations, not a timm architecture: it has no "
                          "pretrained weights (the papers' 224 px models do; see `hkdbench models`)")
    if is_weight_file(name):
        return _local_weights_for(zoo_name, name, architecture)
    weights = resolve_pretrained(name)
    if weights.architecture != architecture:
        raise ConfigError(f"pretrained weights {weights.name} are for {weights.architecture}; {zoo_name} is "
                          f"{architecture} (e.g. {architecture}.<tag>)")
    return weights


def _local_weights_for(zoo_name: str, name: str, architecture: str) -> PretrainedWeights:
    """A local weight file for the zoo model ``zoo_name``, checked key by key against it (built on the meta device
    with the file's classes) before any run is written."""
    import torch

    entry = zoo_entry(zoo_name)
    with torch.device("meta"):
        probe = entry.build(num_classes=1, in_chans=3, img_size=entry.img_size)
    head = probe.pretrained_cfg.get("classifier") or ""
    weights = resolve_pretrained(name, architecture, head[0] if isinstance(head, (tuple, list)) else head)
    with torch.device("meta"):
        model = entry.build(num_classes=weights.num_classes or 1, in_chans=3, img_size=entry.img_size)
    check_fits(weights.file, model)
    return weights
