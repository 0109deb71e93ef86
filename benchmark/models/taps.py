"""The one feature-tap interface over every family: :class:`TappedModel` returns logits, pre-logits and the
requested stage features (stages 1-4) in a recorded layout (``nchw`` feature maps or ``tokens`` on a grid, prefix
tokens kept apart), with stage shapes found by a dry run. ``STAGES`` and ``LAYOUTS`` are defined here, once."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
from timm.models import convnext as timm_convnext
from timm.models import efficientnet as timm_efficientnet
from timm.models import mlp_mixer as timm_mixer
from timm.models import resnet as timm_resnet
from timm.models import swin_transformer as timm_swin
from timm.models import vision_transformer as timm_vit


STAGES = (1, 2, 3, 4)
# the layouts of a stage feature: CNN maps (B, C, H, W) and patch tokens (B, L, D) on a grid
LAYOUTS = ("nchw", "tokens")


@dataclass(frozen=True)
class StageInfo:
    """Where a stage's feature lives and what it looks like (per sample, no batch dimension)."""
    stage: int
    module: str                 # the module whose output is the stage feature
    entry_module: str           # the module whose input is the stage's input (for pre-hooks)
    layout: str                 # 'nchw' or 'tokens'
    shape: Tuple[int, ...]      # (C, H, W) or (L, D) without prefix tokens
    grid: Tuple[int, int]       # spatial grid (H, W) of the map or of the tokens
    num_prefix: int = 0         # prefix tokens split off the front of the token sequence

    @property
    def channels(self) -> int:
        return self.shape[0] if self.layout == "nchw" else self.shape[-1]


@dataclass
class Features:
    logits: torch.Tensor
    pre_logits: torch.Tensor
    stages: Dict[int, torch.Tensor] = field(default_factory=dict)
    prefix: Dict[int, torch.Tensor] = field(default_factory=dict)


def _vit_like_stage_blocks(depth: int) -> List[int]:
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


def _stage_modules(model: nn.Module) -> Tuple[List[str], List[str], str, int]:
    """(stage output module names, stage entry module names, layout kind, prefix token count) per timm class."""
    if isinstance(model, timm_resnet.ResNet):
        names = [f"layer{i}" for i in STAGES]
        return names, names, "nchw", 0
    if isinstance(model, timm_efficientnet.EfficientNet):
        # Stage outputs at strides 4, 8, 16 and the head conv (OFA's MobileNetV2 taps: blocks 2, 5, 12 and bn2).
        reductions = [info["reduction"] for info in model.feature_info]
        picks = [i for i, r in enumerate(reductions) if r in (4, 8, 16)]
        # feature_info lists the last block stage of each stride; take its module index
        stage_idx = [int(model.feature_info[i]["module"].split(".")[1]) for i in picks]
        outputs = [f"blocks.{i}" for i in stage_idx] + ["bn2"]
        entries = [f"blocks.{stage_idx[0]}"] + [f"blocks.{i + 1}" for i in stage_idx]
        return outputs, entries, "nchw", 0
    if isinstance(model, timm_convnext.ConvNeXt):
        names = [f"stages.{i}" for i in range(4)]
        return names, names, "nchw", 0
    if isinstance(model, timm_swin.SwinTransformer):
        # A Swin stage is its blocks (OFA-KD's split, timm 0.6.5 merged at the *end* of a BasicLayer). timm >= 0.9
        # merges at the *start* of SwinTransformerStage, so the stage's input is what enters its first block,
        # after the merge: a pre-hook on layers.i would see the pre-merge tensor (what PAT's reference never prompts).
        outputs = [f"layers.{i}" for i in range(4)]
        entries = [f"layers.{i}.blocks.0" for i in range(4)]
        return outputs, entries, "nhwc", 0
    if isinstance(model, (timm_vit.VisionTransformer, timm_mixer.MlpMixer)):
        ends = _vit_like_stage_blocks(len(model.blocks))
        starts = [0] + [e + 1 for e in ends[:-1]]
        prefix = getattr(model, "num_prefix_tokens", 0)
        return [f"blocks.{e}" for e in ends], [f"blocks.{s}" for s in starts], "nlc", prefix
    raise NotImplementedError(
        f"no feature taps for {type(model).__name__}; supported: ResNet, EfficientNet/MobileNet, ConvNeXt, "
        "SwinTransformer, VisionTransformer, MlpMixer")


class TappedModel(nn.Module):
    """A timm model plus per-stage feature taps. ``forward(x, stages=(...))`` returns :class:`Features`."""

    def __init__(self, model: nn.Module, name: str, family: str, img_size: int, in_chans: int):
        super().__init__()
        self.model = model
        self.name, self.family, self.img_size, self.in_chans = name, family, img_size, in_chans
        outputs, entries, self._raw_layout, self.num_prefix = _stage_modules(model)
        self._stage_module_names = dict(zip(STAGES, outputs))
        self._entry_module_names = dict(zip(STAGES, entries))
        self._captured: Dict[int, torch.Tensor] = {}
        self._active: Tuple[int, ...] = ()
        modules = dict(model.named_modules())
        for stage, module_name in self._stage_module_names.items():
            modules[module_name].register_forward_hook(self._make_hook(stage))
        self.stage_info: Dict[int, StageInfo] = self._dry_run()
        self.num_features = self._pre_logits_dim

    # -- stage modules, for methods that hook into the model --------------------------------------------------
    def stage_entry_module(self, stage: int) -> nn.Module:
        """The module whose input is the stage's input (a forward pre-hook there alters what enters the stage)."""
        return self.model.get_submodule(self._entry_module_names[_check_stage(stage)])

    @property
    def is_token_model(self) -> bool:
        return self._raw_layout != "nchw"

    # -- forward ------------------------------------------------------------------------------------------------
    def _make_hook(self, stage: int):
        def hook(module, inputs, output):
            if stage in self._active:
                self._captured[stage] = output
        return hook

    def forward(self, x: torch.Tensor, stages: Sequence[int] = ()) -> Features:
        self._active = tuple(_check_stage(s) for s in stages)
        self._captured = {}
        try:
            pre_logits = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
            logits = self.model.get_classifier()(pre_logits)
            out = Features(logits=logits, pre_logits=pre_logits)
            for stage in self._active:
                out.stages[stage], prefix = self._to_layout(self._captured[stage])
                if prefix is not None:
                    out.prefix[stage] = prefix
        finally:
            self._captured, self._active = {}, ()
        return out

    def _to_layout(self, raw: torch.Tensor):
        if self._raw_layout == "nchw":
            return raw, None
        if self._raw_layout == "nhwc":  # timm>=0.9 Swin stages are NHWC
            return raw.flatten(1, 2), None
        if self.num_prefix:
            return raw[:, self.num_prefix:], raw[:, :self.num_prefix]
        return raw, None

    @torch.no_grad()
    def _dry_run(self) -> Dict[int, StageInfo]:
        was_training = self.training
        self.eval()
        probe = torch.zeros(1, self.in_chans, self.img_size, self.img_size,
                            device=next(self.model.parameters()).device)
        self._active, self._captured = STAGES, {}
        pre_logits = self.model.forward_head(self.model.forward_features(probe), pre_logits=True)
        raw = dict(self._captured)
        self._active, self._captured = (), {}
        self.train(was_training)
        self._pre_logits_dim = pre_logits.shape[-1]
        infos = {}
        for stage in STAGES:
            r = raw[stage]
            if self._raw_layout == "nchw":
                layout, shape, grid = "nchw", tuple(r.shape[1:]), tuple(r.shape[2:])
            elif self._raw_layout == "nhwc":
                layout, shape, grid = "tokens", (r.shape[1] * r.shape[2], r.shape[3]), (r.shape[1], r.shape[2])
            else:
                n = r.shape[1] - self.num_prefix
                side = math.isqrt(n)
                if side * side != n:
                    raise ValueError(f"{self.name}: {n} patch tokens do not form a square grid")
                layout, shape, grid = "tokens", (n, r.shape[2]), (side, side)
            infos[stage] = StageInfo(stage, self._stage_module_names[stage], self._entry_module_names[stage],
                                     layout, shape, grid, self.num_prefix if layout == "tokens" else 0)
        return infos

    def deploy_parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def _check_stage(stage: int) -> int:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")
    return stage


def tokens_to_nchw(x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """(B, H*W, D) tokens -> (B, D, H, W) map."""
    b, n, d = x.shape
    return x.transpose(1, 2).reshape(b, d, grid[0], grid[1])


def nchw_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) map -> (B, H*W, C) tokens."""
    return x.flatten(2).transpose(1, 2)
