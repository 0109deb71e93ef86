"""The model families: per family, how to recognise its timm model, which modules are its four stages, which module
each stage's input enters (for pre-hooks) and how its stage tensors are laid out. A new family is one
:func:`register_family` call; taps (:class:`~hkdbench.benchmark.models.taps.TappedModel`), PAT's prompts and the
probes read everything from here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch.nn as nn
from timm.models import convnext as timm_convnext
from timm.models import efficientnet as timm_efficientnet
from timm.models import mlp_mixer as timm_mixer
from timm.models import resnet as timm_resnet
from timm.models import swin_transformer as timm_swin
from timm.models import vision_transformer as timm_vit

STAGES = (1, 2, 3, 4)
# how a stage's tensors (what enters and what leaves it) come out of the timm model
RAW_LAYOUTS = ("nchw", "nhwc", "tokens")  # (B, C, H, W), (B, H, W, C), (B, prefix + H*W, D)


@dataclass(frozen=True)
class StageModules:
    """The module names of one model's four stages."""
    outputs: List[str]   # the module whose output is the stage feature
    entries: List[str]   # the module whose input is the stage's input (a pre-hook there alters it)
    num_prefix: int = 0  # prefix (cls/dist) tokens at the front of a token sequence


@dataclass(frozen=True)
class Family:
    name: str
    classes: Tuple[type, ...]                     # the timm model classes of the family (isinstance)
    raw_layout: str                               # one of RAW_LAYOUTS
    stage_modules: Callable[[nn.Module], StageModules]


_FAMILIES: Dict[str, Family] = {}


def register_family(name: str, classes: Sequence[type], raw_layout: str):
    """Decorator over ``stage_modules(model) -> StageModules`` that registers the family ``name``."""
    if raw_layout not in RAW_LAYOUTS:
        raise ValueError(f"family {name!r}: unknown raw layout {raw_layout!r}; layouts are {RAW_LAYOUTS}")

    def wrap(fn: Callable[[nn.Module], StageModules]):
        if name in _FAMILIES:
            raise ValueError(f"family {name!r} registered twice")
        _FAMILIES[name] = Family(name, tuple(classes), raw_layout, fn)
        return fn
    return wrap


def families() -> Dict[str, Family]:
    return dict(_FAMILIES)


def family_of(model: nn.Module) -> Family:
    """The registered family whose classes ``model`` is an instance of."""
    for family in _FAMILIES.values():
        if isinstance(model, family.classes):
            return family
    supported = ", ".join(c.__name__ for f in _FAMILIES.values() for c in f.classes)
    raise NotImplementedError(f"no feature taps for {type(model).__name__}; supported: {supported}")


# --------------------------------------------------------------------------------------------------------------
# The families (the order is the isinstance order: a subclass goes before its base)
# --------------------------------------------------------------------------------------------------------------

@register_family("resnet", [timm_resnet.ResNet], "nchw")
def _resnet(model) -> StageModules:
    names = [f"layer{i}" for i in STAGES]
    return StageModules(names, names)


@register_family("efficientnet", [timm_efficientnet.EfficientNet], "nchw")
def _efficientnet(model) -> StageModules:
    # Stage outputs at strides 4, 8, 16 and the head conv (OFA's MobileNetV2 taps: blocks 2, 5, 12 and bn2).
    reductions = [info["reduction"] for info in model.feature_info]
    picks = [i for i, r in enumerate(reductions) if r in (4, 8, 16)]
    # feature_info lists the last block stage of each stride; take its module index
    stage_idx = [int(model.feature_info[i]["module"].split(".")[1]) for i in picks]
    outputs = [f"blocks.{i}" for i in stage_idx] + ["bn2"]
    entries = [f"blocks.{stage_idx[0]}"] + [f"blocks.{i + 1}" for i in stage_idx]
    return StageModules(outputs, entries)


@register_family("convnext", [timm_convnext.ConvNeXt], "nchw")
def _convnext(model) -> StageModules:
    names = [f"stages.{i}" for i in range(4)]
    return StageModules(names, names)


@register_family("swin", [timm_swin.SwinTransformer], "nhwc")
def _swin(model) -> StageModules:
    # A Swin stage is its blocks (OFA-KD's split, timm 0.6.5 merged at the *end* of a BasicLayer). timm >= 0.9
    # merges at the *start* of SwinTransformerStage, so the stage's input is what enters its first block,
    # after the merge: a pre-hook on layers.i would see the pre-merge tensor (what PAT's reference never prompts).
    return StageModules([f"layers.{i}" for i in range(4)], [f"layers.{i}.blocks.0" for i in range(4)])


def block_stack_stage_ends(depth: int) -> List[int]:
    """Last block of each stage for a plain stack of blocks, following the papers' split of 12 blocks into
    2-2-6-2 (stage ends 1, 3, 9, 11, the depths of Swin-T), scaled to other depths."""
    if depth < 4:
        raise ValueError(f"a block stack needs at least 4 blocks to have 4 stages, got {depth}")
    ends, previous = [], -1
    for fraction in (2 / 12, 4 / 12, 10 / 12, 12 / 12):
        end = max(previous + 1, round(depth * fraction) - 1)
        ends.append(end)
        previous = end
    return ends


def _block_stack(model) -> StageModules:
    ends = block_stack_stage_ends(len(model.blocks))
    starts = [0] + [e + 1 for e in ends[:-1]]
    return StageModules([f"blocks.{e}" for e in ends], [f"blocks.{s}" for s in starts],
                        getattr(model, "num_prefix_tokens", 0))


register_family("vit", [timm_vit.VisionTransformer], "tokens")(_block_stack)
register_family("mixer", [timm_mixer.MlpMixer], "tokens")(_block_stack)  # MLP-Mixer and ResMLP
