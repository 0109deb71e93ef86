"""The model families: per family, the timm classes it recognises, the family name zoo entries give it (``group``),
which modules are its four stages, which module each stage's input enters (for pre-hooks), how its stage tensors
are laid out and whether it is built for one input size. A new family is one :func:`register_family` call: the zoo,
the taps (:class:`~hkdbench.benchmark.models.taps.TappedModel`, whose ``stage_info`` every method and probe reads)
and PAT's prompts take everything from here."""

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
    group: str                                    # the family a zoo entry names and the tables report ('cnn', ...)
    classes: Tuple[type, ...]                     # the timm model classes of the family (and their subclasses)
    raw_layout: str                               # one of RAW_LAYOUTS
    takes_img_size: bool                          # built for one input size (timm's img_size argument)
    stage_modules: Callable[[nn.Module], StageModules]


_FAMILIES: Dict[str, Family] = {}


def register_family(name: str, group: str, classes: Sequence[type], raw_layout: str, takes_img_size: bool):
    """Decorator over ``stage_modules(model) -> StageModules`` that registers the family ``name``."""
    if raw_layout not in RAW_LAYOUTS:
        raise ValueError(f"family {name!r}: unknown raw layout {raw_layout!r}; layouts are {RAW_LAYOUTS}")

    def wrap(fn: Callable[[nn.Module], StageModules]):
        if name in _FAMILIES:
            raise ValueError(f"family {name!r} registered twice")
        _FAMILIES[name] = Family(name, group, tuple(classes), raw_layout, takes_img_size, fn)
        return fn
    return wrap


def families() -> Dict[str, Family]:
    return dict(_FAMILIES)


def family_groups() -> Tuple[str, ...]:
    """The families zoo entries name, in registration order."""
    return tuple(dict.fromkeys(f.group for f in _FAMILIES.values()))


def group_takes_img_size(group: str) -> bool:
    return any(f.takes_img_size for f in _FAMILIES.values() if f.group == group)


def family_of(model: nn.Module) -> Family:
    """The registered family of ``model``'s class or its nearest base class (a subclass may be a family apart)."""
    for cls in type(model).__mro__:
        for family in _FAMILIES.values():
            if cls in family.classes:
                return family
    supported = ", ".join(c.__name__ for f in _FAMILIES.values() for c in f.classes)
    raise NotImplementedError(f"no feature taps for {type(model).__name__}; supported: {supported}")


# --------------------------------------------------------------------------------------------------------------
# The families (in the order of family_groups())
# --------------------------------------------------------------------------------------------------------------

@register_family("resnet", "cnn", [timm_resnet.ResNet], "nchw", takes_img_size=False)
def _resnet(model) -> StageModules:
    names = [f"layer{i}" for i in STAGES]
    return StageModules(names, names)


@register_family("efficientnet", "cnn", [timm_efficientnet.EfficientNet], "nchw", takes_img_size=False)
def _efficientnet(model) -> StageModules:
    # Stage outputs at strides 4, 8, 16 and the head conv (OFA's MobileNetV2 taps: blocks 2, 5, 12 and bn2).
    reductions = [info["reduction"] for info in model.feature_info]
    picks = [i for i, r in enumerate(reductions) if r in (4, 8, 16)]
    # feature_info lists the last block stage of each stride; take its module index
    stage_idx = [int(model.feature_info[i]["module"].split(".")[1]) for i in picks]
    outputs = [f"blocks.{i}" for i in stage_idx] + ["bn2"]
    entries = [f"blocks.{stage_idx[0]}"] + [f"blocks.{i + 1}" for i in stage_idx]
    return StageModules(outputs, entries)


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


register_family("vit", "vit", [timm_vit.VisionTransformer], "tokens", takes_img_size=True)(_block_stack)


@register_family("swin", "swin", [timm_swin.SwinTransformer], "nhwc", takes_img_size=True)
def _swin(model) -> StageModules:
    # A Swin stage is its blocks (OFA-KD's split, timm 0.6.5 merged at the *end* of a BasicLayer). timm >= 0.9
    # merges at the *start* of SwinTransformerStage, so the stage's input is what enters its first block,
    # after the merge: a pre-hook on layers.i would see the pre-merge tensor (what PAT's reference never prompts).
    return StageModules([f"layers.{i}" for i in range(4)], [f"layers.{i}.blocks.0" for i in range(4)])


@register_family("convnext", "convnext", [timm_convnext.ConvNeXt], "nchw", takes_img_size=False)
def _convnext(model) -> StageModules:
    names = [f"stages.{i}" for i in range(4)]
    return StageModules(names, names)


register_family("mixer", "mlp", [timm_mixer.MlpMixer], "tokens", takes_img_size=True)(_block_stack)  # and ResMLP
