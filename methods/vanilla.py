"""``none``: the student trained alone with the task loss (the papers' "from scratch" baseline)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import TASK_LOSS, Distiller
from .registry import register_method


@register_method
class Vanilla(Distiller):
    name = "none"
    version = 1  # of its computation: bump when its numbers change (tests/test_golden.py says when)
    paper = "student alone (cross-entropy)"

    @dataclass(frozen=True)
    class Config:
        gt_weight: float = 1.0

    uses_teacher = False

    def losses(self, student, teacher, targets, epoch=0):
        return {TASK_LOSS: self.cfg.gt_weight * self.task_loss(student.logits, targets)}
