"""The one feature-tap interface over every family: :class:`TappedModel` returns logits, pre-logits and the
requested stage features (stages 1-4) in a recorded layout (``nchw`` feature maps or ``tokens`` on a grid, prefix
tokens kept apart), with stage shapes found by a dry run. Which modules are a family's stages is registered in
``families.py`` (with ``STAGES``); ``LAYOUTS`` is defined here, once."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Sequence, Tuple

import torch
import torch.nn as nn

from hkdbench.benchmark.models.families import STAGES, family_of

# the layouts of a stage feature as delivered: CNN maps (B, C, H, W) and patch tokens (B, L, D) on a grid
LAYOUTS = ("nchw", "tokens")


@dataclass(frozen=True)
class StageInfo:
    """Where a stage's feature lives and what it looks like (per sample, no batch dimension)."""
    stage: int
    module: str                 # the module whose output is the stage feature
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

    def select(self, stages: Sequence[int]) -> "Features":
        """The same outputs with only ``stages`` (a shared teacher pass handed to a method that asked for those)."""
        return Features(self.logits, self.pre_logits, {s: self.stages[s] for s in stages},
                        {s: self.prefix[s] for s in stages if s in self.prefix})


class TappedModel(nn.Module):
    """A timm model plus per-stage feature taps. ``forward(x, stages=(...))`` returns :class:`Features`."""

    def __init__(self, model: nn.Module, name: str, family: str, img_size: int, in_chans: int):
        super().__init__()
        self.model = model
        self.name, self.family, self.img_size, self.in_chans = name, family, img_size, in_chans
        self.family_spec = family_of(model)  # the registered family (stage modules, raw layout)
        self.raw_layout = self.family_spec.raw_layout  # how the stage tensors come out of the model
        modules_of_stages = self.family_spec.stage_modules(model)
        self.num_prefix = modules_of_stages.num_prefix
        self._stage_module_names = dict(zip(STAGES, modules_of_stages.outputs))
        self._entry_module_names = dict(zip(STAGES, modules_of_stages.entries))
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
        if self.raw_layout == "nchw":
            return raw, None
        if self.raw_layout == "nhwc":  # timm>=0.9 Swin stages are NHWC
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
            if self.raw_layout == "nchw":
                layout, shape, grid = "nchw", tuple(r.shape[1:]), tuple(r.shape[2:])
            elif self.raw_layout == "nhwc":
                layout, shape, grid = "tokens", (r.shape[1] * r.shape[2], r.shape[3]), (r.shape[1], r.shape[2])
            else:
                n = r.shape[1] - self.num_prefix
                side = math.isqrt(n)
                if side * side != n:
                    raise ValueError(f"{self.name}: {n} patch tokens do not form a square grid")
                layout, shape, grid = "tokens", (n, r.shape[2]), (side, side)
            prefix = self.num_prefix if layout == "tokens" else 0
            infos[stage] = StageInfo(stage, self._stage_module_names[stage], layout, shape, grid, prefix)
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


def as_map(x: torch.Tensor, info: StageInfo) -> torch.Tensor:
    """A stage feature (prefix tokens already split off) as a (B, C, H, W) map, whatever its layout."""
    return x if info.layout == "nchw" else tokens_to_nchw(x, info.grid)


def to_layout(x_map: torch.Tensor, info: StageInfo) -> torch.Tensor:
    """(B, C, H, W) map -> the layout of the stage described by ``info``."""
    return x_map if info.layout == "nchw" else nchw_to_tokens(x_map)
