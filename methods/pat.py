"""``pat``: Perspective-Aware Teaching (Lin et al., ICCV 2025; arXiv v1 "Feature-based One-For-All", FOFA).

Loss (all terms already weighted, keys as returned):

* ``ce``  = gt_weight  * CE(z_s, y)
* ``kd``  = kd_weight  * KL_T(z_t || z_s), z_t from the teacher *without* prompts
* ``hcl`` = mse_weight * sum_i HCL(Aligner_i(RAA(F_s)_i), F~_t,i), F~_t from the teacher *with* prompts
* ``reg`` = reg_weight * KL_1(z_t || z~_t), z~_t the prompted teacher's logits (only the prompts get its gradient)

Region-Aware Attention (RAA): each student stage is patchified (conv patch embed, nearest upsampling first when the
grid is too small) into N_q/4 tokens of width ``raa_dim``; the 4 x N_q/4 tokens are concatenated, layer-normed, and
attend to each other (multi-head softmax attention, sinusoidal PE added to q and k, no output projection and no
residual, as the reference). The result is split back per stage and each chunk is aligned to the matching teacher
stage's layout: CNN teacher -> (B, dim, g, g) map, resized to the teacher grid, BN, 1x1 conv; token teacher ->
BN1d over the N_q/4 tokens + Linear(dim -> D), then BN1d(D) + Linear(N_q/4 -> L) on the token axis.

HCL is ReviewKD's hierarchical context loss on maps (tokens are laid on their grid): MSE of the full maps plus
MSE of adaptive-average-pooled maps at each level l in ``hcl_levels`` with l < H. As in ReviewKD, the weights
``hcl_weights`` are consumed in order by the levels actually used, and the sum is divided by the total weight
(1 + 1/2 + 1/4 + 1/8 = 1.875 when all levels apply, which is always the case at 224 px).

Adaptive Feedback Prompts (AFP): one prompt block per teacher stage in ``afp_stages``, applied to what *enters*
that stage through a forward pre-hook on ``teacher.stage_entry_module(s)``, where the reference (timm 0.6.5)
prompts: ResNet before layer1..4, ConvNeXt before each stage (before its downsample, as the reference), ViT/Mixer
before the first block of each stage (blocks 0, 2, 4, 10 of 12), Swin before the first block of each stage, i.e.
after the previous stage's patch merging (Swin-T: 96@56, 192@28, 384@14, 768@7), which timm >= 0.9 runs at the
start of a stage and 0.6.5 at the end of the previous one. The hooks are registered once and act
only inside the prompted teacher forward of :meth:`PAT.training_step`; a plain teacher call is untouched. A block
maps x -> x + beta * prompt(x_fused), beta initialised to 0, x_fused = fusion(cat(x, feedback)) when feedback exists,
else x. The feedback of stage s is the previous iteration's (aligned student - prompted teacher) at stage s,
detached, mapped from the stage-output shape to the stage-input shape by ``fb_aligner`` (identity when equal:
ViT, Mixer and Swin at every stage; ResNet and ConvNeXt stages 2-4 need one).
It lives in registered buffers (``prompts.<s>.feedback`` plus a ``has_feedback`` flag), so it is checkpointed,
and is only updated in training mode. When the batch size changes (e.g. a last short batch), the stored feedback
rows are reused cyclically.

``reference_quirks`` (one switch) selects between the paper's description and the reference code
(jimmylin0979/PAT ``distillers/pat.py``), spec section 0 item 6:

=========================================  =====================================  ====================================
quirk                                       ``False`` (default, paper)             ``True`` (reference code)
=========================================  =====================================  ====================================
(a) SE block inside fusion/prompt branches  x * gate (real residual prompt)        returns the gate only: (B, C, 1, 1),
                                                                                   so the prompt is a per-channel bias
(b) token teacher, leaving the prompt       tokens put back with the permute       (B, D, H, W).reshape(B, HW, D): the
    block                                                                          tokens are scrambled even at beta=0
(c) prefix (cls) token                      split off the front, as timm puts it   the *last* token(s) taken as "cls"
                                                                                   (prompt block, student RAProjector),
                                                                                   re-attached at the end [inferred]
(d) RAA positional encoding                 indexed by token position              indexed by batch position (pe[:B])
=========================================  =====================================  ====================================

Same under both values: RAA is self-attention over the student's tokens only (reference and the paper's formula);
the KD term uses the un-prompted teacher; the HCL target is the prompted teacher's stage feature and is *not*
detached, so HCL back-propagates through the frozen teacher into the prompt blocks. (The reference does this; the
paper's joint objective needs it too: with a detached target the prompts would only see the ``reg`` term, whose
minimum is the identity prompt, and AFP would do nothing.)

Details as the reference (``distillers/pat.py``) or where it leaves none: SE is avg-pool -> Linear(C, C/16) ->
ReLU -> Linear(C/16, C) -> sigmoid, the reference's 1x1 convs with bias on the pooled map (same function, count
and default init; hidden width at least 1 for C < 16, mini models only); the convolutions have biases and no
activation between them; grouped 1x1 convolutions use gcd(4, C) groups (4, as the reference, for every C % 4 == 0);
``fb_aligner`` (when stage input and output shapes differ) is nearest resize + BN2d + 1x1 conv without bias, the
reference's CNN2CNNProjector (a token-to-token feedback aligner, the reference's ViT2ViTProjector, is never needed:
token teachers' stage inputs and outputs have the same shape); aligning to a teacher grid smaller than
the RAA grid (tiny models only) uses adaptive average pooling instead of nearest sampling, which would drop most
tokens. The HCL target for a ViT teacher is its patch tokens with the prefix split off the front in both modes.

Initialisation as the reference: every aligner and feedback aligner gets OFA-KD's ``init_weights`` (kaiming
fan_out convs, trunc_normal 0.02 Linear with zero bias, BN2d 1/0); the prompt blocks' fusion and prompt branches
and the RAA (patch embeddings, LayerNorm, q/kv) keep PyTorch's defaults, as the reference leaves them.

Distributed training: each rank keeps its own feedback, as in the reference. The feedback buffers are listed in
``_ddp_params_and_buffers_to_ignore`` so that DDP (when it wraps this module directly) neither broadcasts rank 0's
feedback nor trips over their changing shape. The fusion branch is unused at the first step (no feedback yet), so
DDP needs ``find_unused_parameters=True``, as in the reference.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from hkdbench.benchmark.models.taps import STAGES, StageInfo, as_map, nchw_to_tokens, tokens_to_nchw

from .base import OWN_PASS, TASK_LOSS, Distiller, check_numbers, check_stages, kd_kl
from .ofa import init_weights
from .registry import register_method



# ---------------------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------------------

def sinusoidal_encoding(n: int, dim: int, device, dtype) -> torch.Tensor:
    """(n, dim) sine/cosine position encoding (Vaswani et al.), computed on the fly on the input's device."""
    position = torch.arange(n, device=device, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(n, dim, device=device, dtype=torch.float32)
    pe[:, 0::2] = torch.sin(position * freq)
    pe[:, 1::2] = torch.cos(position * freq)[:, : dim // 2]
    return pe.to(dtype)


def resize_map(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Nearest resize when growing (as the reference); average pooling when shrinking (tiny grids only)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if size[0] >= x.shape[-2] and size[1] >= x.shape[-1]:
        return F.interpolate(x, size=size, mode="nearest")
    return F.adaptive_avg_pool2d(x, size)


def hcl_loss(fs: torch.Tensor, ft: torch.Tensor, levels=(4, 2, 1), weights=(0.5, 0.25, 0.125)) -> torch.Tensor:
    """ReviewKD's hierarchical context loss between two (B, C, H, W) maps (see the module docstring)."""
    loss = F.mse_loss(fs, ft)
    total = 1.0
    used = [level for level in levels if level < fs.shape[-2]]
    for level, weight in zip(used, weights):
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, level), F.adaptive_avg_pool2d(ft, level))
        total += weight
    return loss / total


# ---------------------------------------------------------------------------------------------------------------
# Region-Aware Attention
# ---------------------------------------------------------------------------------------------------------------

class RAProjector(nn.Module):
    """One student stage -> (B, side*side, dim) region tokens through a conv patch embedding."""

    def __init__(self, info: StageInfo, side: int, dim: int, quirks: bool):
        super().__init__()
        self.info, self.side, self.quirks = info, side, quirks
        h, w = info.grid
        self.patch = (math.ceil(h / side), math.ceil(w / side))
        self.size = (self.patch[0] * side, self.patch[1] * side)  # the grid the patch embedding expects
        self.embed = nn.Conv2d(info.channels, dim, kernel_size=self.patch, stride=self.patch)

    def to_map(self, x: torch.Tensor, prefix: Optional[torch.Tensor]) -> torch.Tensor:
        if self.info.layout == "tokens" and self.quirks and prefix is not None:
            # reference: the raw sequence is [cls, patches]; it drops the *last* token(s) as if they were cls
            raw = torch.cat([prefix, x], dim=1)
            x = raw[:, : raw.shape[1] - prefix.shape[1]]
        return as_map(x, self.info)

    def forward(self, x: torch.Tensor, prefix: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.to_map(x, prefix)
        if x.shape[-2] < self.size[0] or x.shape[-1] < self.size[1]:
            x = F.interpolate(x, size=self.size, mode="nearest")
        return self.embed(x).flatten(2).transpose(1, 2)


class RegionAttention(nn.Module):
    """Multi-head softmax self-attention over all region tokens; no output projection, no residual."""

    def __init__(self, dim: int, heads: int, quirks: bool):
        super().__init__()
        self.heads, self.quirks = heads, quirks
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        x = self.norm(x)
        q = self.to_q(x)
        k, v = self.to_kv(x).chunk(2, dim=-1)
        if self.quirks:  # reference: pe[:B] of a (max_len, 1, dim) table, i.e. one encoding per *sample*
            pe = sinusoidal_encoding(b, d, x.device, q.dtype).unsqueeze(1)
        else:            # paper: one encoding per token position
            pe = sinusoidal_encoding(n, d, x.device, q.dtype).unsqueeze(0)
        q, k = q + pe, k + pe
        split = lambda t: t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(q), split(k), split(v))  # scale (d/heads)^-0.5
        return out.transpose(1, 2).reshape(b, n, d)


# ---------------------------------------------------------------------------------------------------------------
# Aligners: region tokens (B, g*g, dim) -> a teacher stage's layout
# ---------------------------------------------------------------------------------------------------------------

class MapAligner(nn.Module):
    """Tokens -> (B, dim, g, g) -> resized to the target grid -> BN2d -> 1x1 conv to the target width."""

    def __init__(self, side: int, dim: int, out_channels: int, grid: Tuple[int, int]):
        super().__init__()
        self.grid, self.side = tuple(grid), side
        self.bn = nn.BatchNorm2d(dim)
        self.proj = nn.Conv2d(dim, out_channels, 1, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = resize_map(tokens_to_nchw(tokens, (self.side, self.side)), self.grid)
        return self.proj(self.bn(x))


class TokenAligner(nn.Module):
    """Tokens (B, n, dim) -> (B, L, D): BN1d(n) + Linear(dim -> D), then BN1d(D) + Linear(n -> L)."""

    def __init__(self, num_tokens: int, dim: int, out_tokens: int, out_dim: int):
        super().__init__()
        self.bn_tokens = nn.BatchNorm1d(num_tokens)
        self.channel = nn.Linear(dim, out_dim)
        self.bn_channels = nn.BatchNorm1d(out_dim)
        self.token = nn.Linear(num_tokens, out_tokens)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.channel(self.bn_tokens(tokens))                # (B, n, D)
        x = self.token(self.bn_channels(x.transpose(1, 2)))     # (B, D, L)
        return x.transpose(1, 2)


def make_aligner(side: int, dim: int, target: StageInfo) -> nn.Module:
    if target.layout == "nchw":
        aligner = MapAligner(side, dim, target.channels, target.grid)
    else:
        aligner = TokenAligner(side * side, dim, target.grid[0] * target.grid[1], target.channels)
    aligner.apply(init_weights)  # the reference's get_projector_module initialises every aligner so
    return aligner


# ---------------------------------------------------------------------------------------------------------------
# Adaptive Feedback Prompts
# ---------------------------------------------------------------------------------------------------------------

class SEBlock(nn.Module):
    """Squeeze-and-excitation. The reference returns only the gate; the paper's block rescales its input."""

    def __init__(self, channels: int, reduction: int, gate_only: bool):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.gate_only = gate_only
        # 1x1 convs with bias on the pooled vector in the reference = Linear layers with bias
        self.excite = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True),
                                    nn.Linear(hidden, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.excite(x.mean(dim=(2, 3)))[:, :, None, None]
        return gate if self.gate_only else x * gate


class EntryLayout:
    """How a stage's input is laid out and how to turn it into a (B, C, H, W) map and back.

    kind: the family's raw layout (``families.RAW_LAYOUTS``): 'nchw' (ResNet, ConvNeXt), 'nhwc' (timm>=0.9 Swin)
    or 'tokens' ((B, prefix + H*W, D): ViT, Mixer).
    """

    def __init__(self, kind: str, channels: int, grid: Tuple[int, int], num_prefix: int, quirks: bool):
        self.kind, self.channels, self.grid = kind, channels, tuple(grid)
        self.num_prefix, self.quirks = num_prefix, quirks

    def to_map(self, x: torch.Tensor):
        """Returns (map, prefix tokens or None)."""
        if self.kind == "nchw":
            return x, None
        if self.kind == "nhwc":
            return x.permute(0, 3, 1, 2), None
        p = self.num_prefix
        if p == 0:
            return tokens_to_nchw(x, self.grid), None
        if self.quirks:  # reference: the last token(s) are taken as cls; the sequence kept is [cls, patches[:-p]]
            return tokens_to_nchw(x[:, :-p], self.grid), x[:, -p:]
        return tokens_to_nchw(x[:, p:], self.grid), x[:, :p]

    def from_map(self, m: torch.Tensor, prefix: Optional[torch.Tensor]) -> torch.Tensor:
        if self.kind == "nchw":
            return m
        b, c, h, w = m.shape
        if self.quirks:  # reference: reshape (B, C, H, W) -> (B, HW, C) without the permute: scrambles tokens
            tokens = m.reshape(b, h * w, c)
        else:
            tokens = nchw_to_tokens(m)
        if self.kind == "nhwc":
            return tokens.reshape(b, h, w, c)
        if prefix is None:
            return tokens
        return torch.cat([tokens, prefix], 1) if self.quirks else torch.cat([prefix, tokens], 1)


class PromptBlock(nn.Module):
    """x -> x + beta * prompt(fusion(cat(x, feedback)) or x), on the input of one teacher stage."""

    def __init__(self, entry: EntryLayout, out_channels: int, out_grid: Tuple[int, int], quirks: bool):
        super().__init__()
        self.entry = entry
        c, g = entry.channels, math.gcd(4, entry.channels)
        if (out_channels, tuple(out_grid)) == (c, entry.grid):
            self.fb_aligner = nn.Identity()
        else:  # the feedback has the stage-output shape; bring it to the stage-input shape
            self.fb_aligner = nn.Sequential(nn.Upsample(size=entry.grid, mode="nearest"),
                                            nn.BatchNorm2d(out_channels), nn.Conv2d(out_channels, c, 1, bias=False))
            self.fb_aligner.apply(init_weights)  # as every reference aligner; fusion and prompt keep PyTorch's
        self.fusion = nn.Sequential(
            nn.Conv2d(2 * c, c, 1), nn.Conv2d(c, c, 5, padding=2), nn.Conv2d(c, c, 1),
            SEBlock(c, 16, gate_only=quirks), nn.Conv2d(c, c, 1))
        self.prompt = nn.Sequential(
            nn.Conv2d(c, c, 1, groups=g), nn.Conv2d(c, c, 5, padding=2, groups=c), nn.Conv2d(c, c, 1),
            SEBlock(c, 16, gate_only=quirks), nn.Conv2d(c, c, 1, groups=g))
        self.beta = nn.Parameter(torch.zeros(()))
        # previous iteration's (aligned student - prompted teacher) at the stage output, as a (B, C, H, W) map
        self.register_buffer("feedback", torch.zeros(0))
        self.register_buffer("has_feedback", torch.zeros((), dtype=torch.bool))

    def set_feedback(self, fb: torch.Tensor) -> None:
        self.feedback = fb.detach()
        self.has_feedback.fill_(True)

    def _feedback_for(self, batch: int) -> Optional[torch.Tensor]:
        if self.feedback.numel() == 0:  # set together with has_feedback; a shape test needs no device sync
            return None
        fb = self.feedback
        if fb.shape[0] != batch:  # another batch size than the previous step: reuse rows cyclically
            fb = fb[torch.arange(batch, device=fb.device) % fb.shape[0]]
        return fb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, prefix = self.entry.to_map(x)
        fused = m
        fb = self._feedback_for(m.shape[0])
        if fb is not None:
            fb = self.fb_aligner(fb.to(m.dtype))
            fused = self.fusion(torch.cat([m, fb.to(m.dtype)], dim=1))  # the aligner may run in autocast
        out = m + self.beta * self.prompt(fused)
        return self.entry.from_map(out.to(x.dtype), prefix)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the feedback's shape depends on the batch: take the checkpoint's shape before copying
        key = prefix + "feedback"
        if key in state_dict:
            self.feedback = torch.empty_like(state_dict[key], device=self.feedback.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def probe_entry_layouts(teacher, stages, quirks: bool) -> Dict[int, EntryLayout]:
    """One dry run of the teacher with pre-hooks that record what enters each stage."""
    seen: Dict[int, torch.Tensor] = {}
    handles = [teacher.stage_entry_module(s).register_forward_pre_hook(
        lambda module, args, s=s: seen.__setitem__(s, args[0])) for s in stages]
    was_training = teacher.training
    try:
        teacher.eval()
        device = next(teacher.parameters()).device
        with torch.no_grad():
            teacher(torch.zeros(1, teacher.in_chans, teacher.img_size, teacher.img_size, device=device))
    finally:
        for h in handles:
            h.remove()
        teacher.train(was_training)
    kind = teacher.raw_layout  # the family's: what enters a stage is laid out as what leaves it
    layouts = {}
    for s in stages:
        x = seen[s]
        if x.dim() != (3 if kind == "tokens" else 4):
            raise ValueError(f"{teacher.name}: stage {s} input has shape {tuple(x.shape)}, not the {kind!r} layout "
                             f"its family {teacher.family_spec.name!r} registers")
        if kind == "nchw":
            layouts[s] = EntryLayout("nchw", x.shape[1], tuple(x.shape[2:]), 0, quirks)
        elif kind == "nhwc":
            layouts[s] = EntryLayout("nhwc", x.shape[3], tuple(x.shape[1:3]), 0, quirks)
        else:
            p = teacher.num_prefix
            side = math.isqrt(x.shape[1] - p)
            layouts[s] = EntryLayout("tokens", x.shape[2], (side, side), p, quirks)
    return layouts


# ---------------------------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------------------------

@register_method
class PAT(Distiller):
    name = "pat"
    teacher_reads = OWN_PASS
    version = 1  # of its computation: bump when its numbers change (tests/test_golden.py says when)
    paper = "Lin et al., Perspective-Aware Teaching: Adapting Knowledge for Heterogeneous Distillation, ICCV 2025"
    needs_teacher_grad = True
    find_unused_parameters = True  # the fusion branches get no gradient before feedback exists (first step)

    @dataclass(frozen=True)
    class Config:
        gt_weight: float = 1.0
        kd_weight: float = 1.0
        mse_weight: float = 1.0
        reg_weight: float = 1.0
        temperature: float = 1.0
        afp_stages: Tuple[int, ...] = (1, 2, 3, 4)
        raa_num_queries: int = 64
        raa_dim: int = 512
        raa_heads: int = 8
        hcl_levels: Tuple[int, ...] = (4, 2, 1)
        hcl_weights: Tuple[float, ...] = (0.5, 0.25, 0.125)
        reference_quirks: bool = False

        def __post_init__(self):
            check_numbers(self, "pat", positive=("temperature",))
            check_stages(self.afp_stages, "pat afp_stages", allow_empty=True)
            per_stage = self.raa_num_queries // 4
            if self.raa_num_queries % 4 or math.isqrt(per_stage) ** 2 != per_stage or per_stage == 0:
                raise ValueError("pat raa_num_queries must be 4 times a square (16 tokens per stage = 64), "
                                 f"got {self.raa_num_queries}")
            if self.raa_dim % self.raa_heads or self.raa_dim % 2:
                raise ValueError(f"pat raa_dim ({self.raa_dim}) must be even and divisible by raa_heads "
                                 f"({self.raa_heads})")
            if len(self.hcl_levels) != len(self.hcl_weights):
                raise ValueError("pat hcl_levels and hcl_weights must have the same length")

    def __init__(self, cfg, student, teacher, num_classes, criterion=None):
        super().__init__(cfg, student, teacher, num_classes, criterion)
        quirks = cfg.reference_quirks
        side = math.isqrt(cfg.raa_num_queries // 4)
        self.projectors = nn.ModuleDict({
            str(s): RAProjector(student.stage_info[s], side, cfg.raa_dim, quirks) for s in STAGES})
        self.attention = RegionAttention(cfg.raa_dim, cfg.raa_heads, quirks)
        self.aligners = nn.ModuleDict({
            str(s): make_aligner(side, cfg.raa_dim, teacher.stage_info[s]) for s in STAGES})
        layouts = probe_entry_layouts(teacher, cfg.afp_stages, quirks)
        self.prompts = nn.ModuleDict({
            str(s): PromptBlock(layouts[s], teacher.stage_info[s].channels, teacher.stage_info[s].grid, quirks)
            for s in cfg.afp_stages})
        # each rank keeps its own feedback: keep DDP from broadcasting (and shape-checking) these buffers
        self._ddp_params_and_buffers_to_ignore = [
            f"prompts.{s}.{b}" for s in cfg.afp_stages for b in ("feedback", "has_feedback")]
        self._prompting = False
        self._hook_handles = self._register_prompt_hooks(teacher)

    # -- hooks ----------------------------------------------------------------------------------------------------
    def _register_prompt_hooks(self, teacher):
        ref = weakref.ref(self)  # the teacher must not keep a discarded distiller alive

        def make_hook(stage):
            def hook(module, args):
                method = ref()
                if method is None or not method._prompting:
                    return None  # a plain teacher forward: leave the stage input alone
                return (method.prompts[str(stage)](args[0]),) + tuple(args[1:])
            return hook

        return [teacher.stage_entry_module(s).register_forward_pre_hook(make_hook(s)) for s in self.cfg.afp_stages]

    def remove_hooks(self) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []

    def prompted_teacher_forward(self, images: torch.Tensor):
        """The teacher with the prompt blocks in front of its stages (grad flows to the prompts, not the teacher)."""
        self.teacher.eval()
        self._prompting = True
        try:
            return self.teacher(images, stages=STAGES)
        finally:
            self._prompting = False

    # -- what the method needs ------------------------------------------------------------------------------------
    def student_stages(self):
        return STAGES

    def teacher_stages(self):
        return STAGES

    def plain_teacher_stages(self):
        return ()  # the plain pass gives the KD term its logits; the stages come from the prompted pass

    # -- the step -------------------------------------------------------------------------------------------------
    def training_step(self, images, targets, epoch=0):
        s_out = self.student(images, stages=STAGES)
        t_plain = self.plain_teacher_forward(images)  # the KD term's teacher: no prompts
        t_prompted = self.prompted_teacher_forward(images)
        aligned = self.align_student(s_out)
        losses = self.pat_losses(s_out, t_plain, t_prompted, aligned, targets)
        if self.training:
            self.store_feedback(aligned, t_prompted)
        return s_out, losses

    def losses(self, student, teacher, targets, epoch=0):
        raise NotImplementedError("pat needs a plain and a prompted teacher pass; call training_step")

    def align_student(self, s_out) -> Dict[int, torch.Tensor]:
        """RAA over all student stages, each chunk aligned to the teacher stage of the same index."""
        regions = [self.projectors[str(s)](s_out.stages[s], s_out.prefix.get(s)) for s in STAGES]
        attended = self.attention(torch.cat(regions, dim=1)).split([r.shape[1] for r in regions], dim=1)
        return {s: self.aligners[str(s)](a) for s, a in zip(STAGES, attended)}

    def pat_losses(self, s_out, t_plain, t_prompted, aligned, targets) -> Dict[str, torch.Tensor]:
        cfg, info = self.cfg, self.teacher.stage_info
        hcl = sum(hcl_loss(as_map(aligned[s], info[s]), as_map(t_prompted.stages[s], info[s]),
                           cfg.hcl_levels, cfg.hcl_weights) for s in STAGES)
        # the KL terms in float32: under autocast the logits may be half precision
        z_s, z_t, z_t_prompted = s_out.logits.float(), t_plain.logits.float(), t_prompted.logits.float()
        return {
            TASK_LOSS: cfg.gt_weight * self.task_loss(s_out.logits, targets),
            "kd": cfg.kd_weight * kd_kl(z_s, z_t, cfg.temperature),
            "hcl": cfg.mse_weight * hcl,
            "reg": cfg.reg_weight * kd_kl(z_t_prompted, z_t, 1.0),
        }

    @torch.no_grad()
    def store_feedback(self, aligned, t_prompted) -> None:
        info = self.teacher.stage_info
        for s in self.cfg.afp_stages:
            diff = as_map(aligned[s], info[s]) - as_map(t_prompted.stages[s], info[s])
            self.prompts[str(s)].set_feedback(diff)

    def statistics(self):
        return {f"beta{s}": block.beta.detach() for s, block in self.prompts.items()}
