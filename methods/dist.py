"""``dist``: Huang et al., "Knowledge Distillation from A Stronger Teacher" (NeurIPS 2022).

With P = softmax(Z/T) for the student and the teacher, (B, C) each, and rho the Pearson correlation:

* inter-class: 1 - mean over samples i of rho(P_s[i, :], P_t[i, :])   (each row's class profile)
* intra-class: 1 - mean over classes j of rho(P_s[:, j], P_t[:, j])   (each class across the batch)
* L = gt_weight * CE(z_s, y) + beta * T^2 * inter + gamma * T^2 * intra

Defaults beta=1, gamma=1, T=1, CE weight 1: the OFA-KD code base's ``train.py`` defaults (``--dist-beta 1
--dist-gamma 1 --dist-tau 1``, read from its released source), the code the heterogeneous-KD papers ran DIST
with. The DIST paper's own runs use other values (larger beta/gamma, T>1 on CIFAR); set them per experiment.

rho is the cosine of the mean-centred vectors, with the product of norms clamped below at 1e-8 so a constant
vector (e.g. the intra-class term of a batch of one) gives correlation 0, not NaN. The intra-class term needs a
batch of several samples to carry signal. Computed in float32 (autocast-safe), on any device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import LOGITS, TASK_LOSS, Distiller, check_numbers
from .registry import register_method

_EPS = 1e-8


def pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = _EPS) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``: (N, D), (N, D) -> (N,)."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    norms = torch.linalg.vector_norm(a, dim=1) * torch.linalg.vector_norm(b, dim=1)
    return (a * b).sum(1) / norms.clamp_min(eps)


def dist_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float):
    """(inter-class loss, intra-class loss), each already multiplied by T^2."""
    p_s = torch.softmax(student_logits.float() / temperature, dim=1)
    p_t = torch.softmax(teacher_logits.float() / temperature, dim=1)
    inter = 1.0 - pearson_rows(p_s, p_t).mean()
    intra = 1.0 - pearson_rows(p_s.t(), p_t.t()).mean()
    return temperature ** 2 * inter, temperature ** 2 * intra


@register_method
class DIST(Distiller):
    name = "dist"
    teacher_reads = LOGITS
    version = 1  # of its computation: bump when its numbers change (tests/test_golden.py says when)
    paper = "Huang et al. NeurIPS 2022, Knowledge Distillation from A Stronger Teacher"

    @dataclass(frozen=True)
    class Config:
        gt_weight: float = 1.0
        beta: float = 1.0           # inter-class weight
        gamma: float = 1.0          # intra-class weight
        temperature: float = 1.0

        def __post_init__(self):
            check_numbers(self, "dist", nonnegative=("gt_weight", "beta", "gamma"), positive=("temperature",))

    def losses(self, student, teacher, targets, epoch=0):
        cfg = self.cfg
        inter, intra = dist_terms(student.logits, teacher.logits, cfg.temperature)
        return {
            TASK_LOSS: cfg.gt_weight * self.task_loss(student.logits, targets),
            "dist_inter": cfg.beta * inter,
            "dist_intra": cfg.gamma * intra,
        }
