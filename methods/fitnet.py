"""``fitnet``: FitNets hints (Romero et al. 2015) in the heterogeneous form the OFA-KD/PAT papers used as a baseline.

Each tapped student stage is projected onto the layout of the teacher's stage (NCHW map or tokens, its grid and
width) and compared with MSE; the papers' baseline adds the KD term at T=1 ("FitNet + KD", the author's code in
OFAKD issue #10). Set ``kd_weight=0`` for the pure hint loss.

Alignment, for student grid Hs and teacher grid Ht (tokens are laid on their grid, prefix tokens dropped):
* Hs = r*Ht: space-to-depth by r, then a 1x1 conv (= the reference's PatchEmbed with patch r, or its patch
  merging of student tokens followed by a Linear);
* Ht = r*Hs: a 1x1 conv to r^2 times the teacher width, then depth-to-space (= the reference's super-patch
  comparison, with the same element pairs, so the same MSE);
* other ratios: bilinear resize of the student map to the teacher grid, then a 1x1 conv.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from hkdbench.benchmark.models.taps import StageInfo, as_map, to_layout

from .base import STAGES, TASK_LOSS, Distiller, check_stages, kd_kl
from .registry import register_method


class HintProjector(nn.Module):
    """Maps a student stage feature onto a teacher stage's layout, grid and width."""

    def __init__(self, student: StageInfo, teacher: StageInfo):
        super().__init__()
        self.student_info, self.teacher_info = student, teacher
        (hs, ws), (ht, wt) = student.grid, teacher.grid
        cs, ct = student.channels, teacher.channels
        self.down = self.up = 1
        self.resize = None
        if hs >= ht and hs % ht == 0 and ws % wt == 0 and hs // ht == ws // wt:
            self.down = hs // ht
            self.proj = nn.Conv2d(cs * self.down ** 2, ct, 1, bias=False)
        elif ht % hs == 0 and wt % ws == 0 and ht // hs == wt // ws:
            self.up = ht // hs
            self.proj = nn.Conv2d(cs, ct * self.up ** 2, 1, bias=False)
        else:
            self.resize = (ht, wt)
            self.proj = nn.Conv2d(cs, ct, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = as_map(x, self.student_info)
        if self.down > 1:
            x = F.pixel_unshuffle(x, self.down)
        if self.resize is not None:
            x = F.interpolate(x, size=self.resize, mode="bilinear", align_corners=False)
        x = self.proj(x)
        if self.up > 1:
            x = F.pixel_shuffle(x, self.up)
        return to_layout(x, self.teacher_info)


@register_method
class FitNet(Distiller):
    name = "fitnet"
    teacher_reads = STAGES
    version = 1  # of its computation: bump when its numbers change (tests/test_golden.py says when)
    paper = "Romero et al. 2015, FitNets; heterogeneous form of OFA-KD (NeurIPS 2023) baselines"

    @dataclass(frozen=True)
    class Config:
        stages: Tuple[int, ...] = (1, 2, 3, 4)
        gt_weight: float = 1.0
        hint_weight: float = 1.0
        kd_weight: float = 1.0
        temperature: float = 1.0

        def __post_init__(self):
            check_stages(self.stages, "fitnet stages")

    def __init__(self, cfg, student, teacher, num_classes, criterion=None):
        super().__init__(cfg, student, teacher, num_classes, criterion)
        self.projectors = nn.ModuleDict({
            str(s): HintProjector(student.stage_info[s], teacher.stage_info[s]) for s in cfg.stages})

    def student_stages(self):
        return tuple(self.cfg.stages)

    def teacher_stages(self):
        return tuple(self.cfg.stages)

    def losses(self, student, teacher, targets, epoch=0):
        hint = sum(F.mse_loss(self.projectors[str(s)](student.stages[s]), teacher.stages[s])
                   for s in self.cfg.stages)
        out = {TASK_LOSS: self.cfg.gt_weight * self.task_loss(student.logits, targets),
               "hint": self.cfg.hint_weight * hint}
        if self.cfg.kd_weight:
            out["kd"] = self.cfg.kd_weight * kd_kl(student.logits, teacher.logits, self.cfg.temperature)
        return out
