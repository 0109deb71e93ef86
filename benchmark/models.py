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
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
from timm.models import convnext as timm_convnext
from timm.models import efficientnet as timm_efficientnet
from timm.models import mlp_mixer as timm_mixer
from timm.models import resnet as timm_resnet
from timm.models import swin_transformer as timm_swin
from timm.models import vision_transformer as timm_vit

FAMILIES = ("cnn", "vit", "swin", "convnext", "mlp")
STAGES = (1, 2, 3, 4)


class UnknownModelError(KeyError):
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
        _ZOO[name] = ZooEntry(name, family, fn, img_size, crop_pct, description, paper, interpolation)
        return fn
    return wrap


def _timm(name: str, **fixed):
    def build(num_classes: int, in_chans: int, img_size: int, **options) -> nn.Module:
        kwargs = {**fixed, **options}
        if img_size != 224 and "img_size" not in kwargs and _accepts_img_size(name):
            kwargs["img_size"] = img_size
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    return build


def _accepts_img_size(timm_name: str) -> bool:
    return any(k in timm_name for k in ("vit", "deit", "swin", "mixer", "resmlp"))


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
        _timm(_timm_name))


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
    ``pretrained``: timm's pretrained weights to load (benchmark/pretrained.py), checked against their hash."""
    entry = zoo_entry(name)
    size = img_size or entry.img_size
    options = {} if drop_path_rate is None else {"drop_path_rate": drop_path_rate}
    model = entry.build(num_classes=num_classes, in_chans=in_chans, img_size=size, **options)
    if pretrained:
        from .pretrained import load_pretrained_into

        load_pretrained_into(model, pretrained, pretrained_sha256, num_classes, in_chans)
    return TappedModel(model, name=name, family=entry.family, img_size=size, in_chans=in_chans)


# --------------------------------------------------------------------------------------------------------------
# Feature taps
# --------------------------------------------------------------------------------------------------------------

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
    def stage_module(self, stage: int) -> nn.Module:
        return self.model.get_submodule(self._stage_module_names[_check_stage(stage)])

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
