"""``kd``: Hinton et al., "Distilling the Knowledge in a Neural Network" (2015).

L = gt_weight * CE(z_s, y) + kd_weight * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)).
Defaults follow the OFA-KD/PAT code base (T=1, weights 1:1), not the CIFAR convention T=4.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import LOGITS, TASK_LOSS, Distiller, check_numbers, kd_kl
from .registry import register_method


@register_method
class KD(Distiller):
    name = "kd"
    teacher_reads = LOGITS
    version = 1  # of its computation: bump when its numbers change (tests/test_golden.py says when)
    paper = "Hinton et al. 2015, Distilling the Knowledge in a Neural Network"

    @dataclass(frozen=True)
    class Config:
        gt_weight: float = 1.0
        kd_weight: float = 1.0
        temperature: float = 1.0

        def __post_init__(self):
            check_numbers(self, "kd", positive=("temperature",))

    def losses(self, student, teacher, targets, epoch=0):
        return {
            TASK_LOSS: self.cfg.gt_weight * self.task_loss(student.logits, targets),
            "kd": self.cfg.kd_weight * kd_kl(student.logits, teacher.logits, self.cfg.temperature),
        }
