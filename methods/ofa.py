"""``ofa``: OFA-KD, "One-for-All: Bridge the Gap Between Heterogeneous Architectures in Knowledge Distillation"
(Hao et al., NeurIPS 2023; reference code Hao840/OFAKD ``distillers/ofa.py``).

Every tapped student stage gets a *branch projector* that turns the stage feature into logits; the branches and
the student's own logits are all pulled towards the teacher's logits with the adaptive target enhancement loss

    w = (p_t + onehot(y))^eps - onehot(y)          (not renormalised)
    L_ofa(z) = mean_b sum_c -w_c log softmax(z / T)_c   (no T^2 factor)

    L = gt_weight * CE(z_s, y) + kd_weight * L_ofa(z_s; eps[-1]) + ofa_weight * sum_i L_ofa(branch_i; eps[i])

Only the teacher's logits are used. The branches exist for training only; the student keeps its own head.

Branch projectors (:func:`build_branch_projector`, reused by ``spofa`` and ``hcd``), D_s/D_t the pre-logits
widths of student/teacher:

* CNN student: stage < 4 -> (4 - stage) SepConvs, each halving H and W, widths c -> 2c -> ... with the last one
  at max(D_s, D_t); stage 4 -> 1x1 conv to max(D_s, D_t). Then global average pooling and a Linear.
* token student: Swin-style PatchMerging steps towards a 7x7 grid, ``merge_num = max(int(log2(grid / 7)), 0)``
  (the reference's formula), then max(4 - stage, 1) ViT Blocks of width D_s, read out by the cls token when the
  student has prefix tokens, else by the token mean, then a Linear.

Generalisation to small models (the reference only ever sees 224 px models): the same ``merge_num`` formula gives
0 merges for every grid narrower than 14 tokens (2 x the target grid), so the mini models' 8/4/2/1-token grids
are never merged. When no merge happens and the stage width differs from D_s (which never occurs at 224: there
the widths only differ on stages that are merged), a stride-1 "merger" (LayerNorm + Linear + the merger's
activation, no 2x2 concatenation) adapts the width to D_s. Odd grids are zero-padded before a 2x2 merge. The
attention head count is the largest divisor of D_s not above ``num_heads`` (4 as in the reference).

Deviations from the reference code, all deliberate:
* prefix tokens come split off by the feature taps (``Features.prefix``), so the reference's ``num_tokens`` bug
  (DeiT crashes, OFAKD issue #38) cannot occur: patch tokens are merged, the prefix is put back in front;
* log p_s is computed with ``log_softmax`` in float32 instead of ``log(softmax(.))`` (same value, no underflow);
* the enhanced target ``w`` carries no gradient (the reference's teacher logits carry none either).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from hkdbench.benchmark.models.taps import StageInfo

from .base import LOGITS, TASK_LOSS, Distiller, check_numbers, check_stages
from .registry import register_method

PROJECTOR_STYLES = ("ofa", "spofa")


# --------------------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------------------

def enhanced_target(teacher_logits: torch.Tensor, hard: torch.Tensor, eps: float,
                    temperature: float = 1.0) -> torch.Tensor:
    """OFA's un-normalised target w = (p_t + onehot)^eps - onehot, in float32 and without gradient."""
    with torch.no_grad():
        p_t = F.softmax(teacher_logits.detach().float() / temperature, dim=-1)
        onehot = F.one_hot(hard.long(), p_t.shape[-1]).to(p_t.dtype)
        return (p_t + onehot).pow(eps) - onehot


def ofa_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, hard: torch.Tensor, eps: float = 1.0,
             temperature: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """OFA's adaptive-target-enhancement loss sum_c -w_c log p_s,c, per sample ('none') or its batch mean."""
    w = enhanced_target(teacher_logits, hard, eps, temperature)
    log_p_s = F.log_softmax(logits.float() / temperature, dim=-1)
    per_sample = -(w * log_p_s).sum(-1)
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


# --------------------------------------------------------------------------------------------------------------
# Branch projectors
# --------------------------------------------------------------------------------------------------------------

def init_weights(module: nn.Module) -> None:
    """The reference's init (OFAKD, PAT and spofaKD ``distillers/utils.py``), for ``module.apply``.

    Conv2d: kaiming_normal fan_out (ReLU gain) on the weight; its bias (OFA's stage-4 1x1 conv) keeps PyTorch's
    default uniform(+-1/sqrt(fan_in)). BatchNorm2d: weight 1, bias 0. Linear: trunc_normal std 0.02 (bounds
    +-2, absolute, as timm's), bias 0. Everything else (LayerNorm, BatchNorm1d) keeps PyTorch's default (1, 0).
    """
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, nn.BatchNorm2d) and module.affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def sep_conv(c_in: int, c_out: int) -> nn.Sequential:
    """dw3x3 s2 -> pw1x1 -> BN -> ReLU -> dw3x3 s1 -> pw1x1 -> BN -> ReLU; halves H and W."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, stride=2, padding=1, groups=c_in, bias=False),
        nn.Conv2d(c_in, c_in, 1, bias=False),
        nn.BatchNorm2d(c_in),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_in, c_in, 3, stride=1, padding=1, groups=c_in, bias=False),
        nn.Conv2d(c_in, c_out, 1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class PatchMerging(nn.Module):
    """Swin-style merging of 2x2 neighbouring tokens: concat -> norm -> Linear (no bias) -> act.

    With ``merge=False`` it only adapts the width (norm -> Linear -> act on each token), for grids already small.
    Odd grids are zero-padded to even before merging.
    """

    def __init__(self, grid: Tuple[int, int], dim: int, out_dim: int, norm: bool = True,
                 act: Optional[type] = nn.GELU, merge: bool = True):
        super().__init__()
        self.grid, self.merge = tuple(grid), merge
        width = 4 * dim if merge else dim
        self.norm = nn.LayerNorm(width) if norm else nn.Identity()
        self.reduction = nn.Linear(width, out_dim, bias=False)
        self.act = act() if act is not None else nn.Identity()

    @property
    def out_grid(self) -> Tuple[int, int]:
        h, w = self.grid
        return ((h + 1) // 2, (w + 1) // 2) if self.merge else (h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merge:
            x = self._merge(x)
        return self.act(self.reduction(self.norm(x)))

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h, w = self.grid
        if n != h * w:
            raise ValueError(f"PatchMerging expects {h}x{w}={h * w} patch tokens, got {n}")
        x = x.view(b, h, w, c)
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return x.flatten(1, 2)


def heads_for(dim: int, requested: int) -> int:
    """The largest divisor of ``dim`` not above ``requested`` (attention needs heads | dim)."""
    return max(h for h in range(1, max(requested, 1) + 1) if dim % h == 0)


def merge_count(grid: int, target_grid: int = 7) -> int:
    """The reference's number of 2x2 merges towards ``target_grid``: 0 for grids narrower than 2*target."""
    return max(int(math.log2(grid / target_grid)), 0) if grid > 0 else 0


class CnnBody(nn.Module):
    """CNN stage map -> SepConvs (or 1x1 conv at stage 4) -> GAP -> (B, out_dim)."""

    def __init__(self, info: StageInfo, out_dim: int):
        super().__init__()
        c = info.channels
        if info.stage < 4:
            n = 4 - info.stage
            widths = [c * 2 ** i for i in range(n)] + [out_dim]  # c -> 2c -> ... -> out_dim
            self.convs = nn.Sequential(*[sep_conv(widths[i], widths[i + 1]) for i in range(n)])
        else:
            self.convs = nn.Conv2d(c, out_dim, 1)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor, prefix: Optional[torch.Tensor] = None) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.convs(x), 1).flatten(1)


class TokenBody(nn.Module):
    """Patch tokens -> mergers -> (prefix put back) -> ViT Blocks -> cls token or token mean -> (B, dim)."""

    def __init__(self, info: StageInfo, dim: int, num_heads: int, target_grid: int, style: str):
        super().__init__()
        h, w = info.grid
        if h != w:
            raise ValueError(f"token branch projectors need a square grid, got {info.grid}")
        spofa = style == "spofa"
        n_merge = merge_count(h, target_grid)
        mergers, grid = [], (h, w)
        for i in range(n_merge):
            last = i == n_merge - 1
            if spofa:  # LayerNorm decoupling: no GELU; the last of several mergers has no norm
                norm, act = not (last and n_merge > 1), None
            else:      # OFA: GELU everywhere except on the last of several mergers
                norm, act = True, (None if last and i > 0 else nn.GELU)
            m = PatchMerging(grid, info.channels if i == 0 else dim, dim, norm=norm, act=act)
            mergers.append(m)
            grid = m.out_grid
        if n_merge == 0 and info.channels != dim:  # small models only: width adapter without merging
            mergers.append(PatchMerging(grid, info.channels, dim, act=None if spofa else nn.GELU, merge=False))
        self.mergers = nn.Sequential(*mergers)
        # SPOFA drops the prefix tokens (its merger strips them) and reads out the token mean.
        self.use_prefix = info.num_prefix > 0 and not spofa
        self.prefix_proj = (nn.Linear(info.channels, dim)
                            if self.use_prefix and info.channels != dim else nn.Identity())
        heads = heads_for(dim, num_heads)
        self.blocks = nn.Sequential(*[Block(dim=dim, num_heads=heads) for _ in range(max(4 - info.stage, 1))])
        self.out_dim = dim

    def forward(self, x: torch.Tensor, prefix: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.mergers(x)
        if self.use_prefix:
            if prefix is None:
                raise ValueError("this student has prefix tokens; pass Features.prefix[stage]")
            x = torch.cat([self.prefix_proj(prefix), x], dim=1)
        x = self.blocks(x)
        return x[:, 0] if self.use_prefix else x.mean(1)


class BranchProjector(nn.Module):
    """A stage feature (and its prefix tokens) -> a vector (``body``) -> logits (``head``, absent for HCD)."""

    def __init__(self, body: nn.Module, head: Optional[nn.Module]):
        super().__init__()
        self.body, self.head = body, head
        self.out_dim = body.out_dim

    def forward(self, x: torch.Tensor, prefix: Optional[torch.Tensor] = None) -> torch.Tensor:
        feat = self.body(x, prefix)
        return self.head(feat) if self.head is not None else feat


def build_branch_projector(info: StageInfo, student_dim: int, teacher_dim: int, num_classes: Optional[int],
                           num_heads: int = 4, target_grid: int = 7, style: str = "ofa") -> BranchProjector:
    """The branch of one student stage.

    ``style='ofa'`` is OFA's projector; ``'spofa'`` is SPOFA's LayerNorm-decoupled one (LayerNorm before the CNN
    head, GELU-free mergers, token-mean readout). ``num_classes=None`` leaves out the final Linear (HCD).
    """
    if style not in PROJECTOR_STYLES:
        raise ValueError(f"projector style must be one of {PROJECTOR_STYLES}, got {style!r}")
    if info.layout == "nchw":
        body = CnnBody(info, max(student_dim, teacher_dim))
    else:
        body = TokenBody(info, student_dim, num_heads, target_grid, style)
    head = None
    if num_classes is not None:
        linear = nn.Linear(body.out_dim, num_classes)
        head = nn.Sequential(nn.LayerNorm(body.out_dim), linear) if style == "spofa" and info.layout == "nchw" \
            else linear
    projector = BranchProjector(body, head)
    projector.apply(init_weights)
    return projector


# --------------------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------------------

@register_method
class OFA(Distiller):
    name = "ofa"
    teacher_reads = LOGITS
    version = 1  # of its computation: bump when its numbers change (tests/test_golden.py says when)
    paper = "Hao et al., NeurIPS 2023, One-for-All: Bridge the Gap Between Heterogeneous Architectures in KD"
    projector_style = "ofa"

    @dataclass(frozen=True)
    class Config:
        stages: Tuple[int, ...] = (1, 2, 3, 4)
        eps: Tuple[float, ...] = (1.0,)   # one value, or one per stage plus one (last) for the final logits
        ofa_weight: float = 1.0           # branch losses (the authors' CIFAR runs used 0.1, OFAKD issues #14/#32)
        gt_weight: float = 1.0
        kd_weight: float = 1.0
        temperature: float = 1.0
        num_heads: int = 4                # branch ViT Blocks; the largest divisor of D_s not above this is used
        target_grid: int = 7              # token branches merge towards this grid

        def __post_init__(self):
            check_stages(self.stages)
            if len(self.eps) not in (1, len(self.stages) + 1):
                raise ValueError(f"eps must have 1 or len(stages)+1={len(self.stages) + 1} values, got {self.eps}")
            if any(e <= 0 for e in self.eps):
                raise ValueError(f"eps values must be > 0, got {self.eps}")
            check_numbers(self, "ofa", positive=("temperature",))
            if self.num_heads < 1 or self.target_grid < 1:
                raise ValueError("num_heads and target_grid must be >= 1")

        @property
        def eps_values(self) -> Tuple[float, ...]:
            """eps per stage (in ``stages`` order) followed by the final-logit eps."""
            return tuple(self.eps) * (len(self.stages) + 1) if len(self.eps) == 1 else tuple(self.eps)

    def __init__(self, cfg, student, teacher, num_classes, criterion=None):
        super().__init__(cfg, student, teacher, num_classes, criterion)
        self.projectors = nn.ModuleDict({
            str(s): build_branch_projector(student.stage_info[s], student.num_features, teacher.num_features,
                                           num_classes, cfg.num_heads, cfg.target_grid, self.projector_style)
            for s in cfg.stages})

    def student_stages(self):
        return tuple(self.cfg.stages)

    def teacher_stages(self):
        return ()  # only the teacher's logits are used

    def branch_logits(self, student) -> Dict[int, torch.Tensor]:
        return {s: self.projectors[str(s)](student.stages[s], student.prefix.get(s)) for s in self.cfg.stages}

    def losses(self, student, teacher, targets, epoch=0):
        cfg, eps = self.cfg, self.cfg.eps_values
        branches = self.branch_logits(student)
        branch_loss = sum(ofa_loss(branches[s], teacher.logits, targets.hard, eps[i], cfg.temperature)
                          for i, s in enumerate(cfg.stages))
        return {
            TASK_LOSS: cfg.gt_weight * self.task_loss(student.logits, targets),
            "kd": cfg.kd_weight * ofa_loss(student.logits, teacher.logits, targets.hard, eps[-1], cfg.temperature),
            "ofa": cfg.ofa_weight * branch_loss,
        }
