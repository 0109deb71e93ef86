"""``dkd``: Zhao et al., "Decoupled Knowledge Distillation" (CVPR 2022).

With p = softmax(z/T), target class t and b = (p_t, 1 - p_t) the binary target/non-target split, and p_hat the
distribution over the non-target classes only (the target left out before the softmax):

* TCKD = KL(b^teacher || b^student)
* NCKD = KL(p_hat^teacher || p_hat^student)
* L = gt_weight * CE(z_s, y) + min(epoch / warmup_epochs, 1) * (alpha * TCKD + beta * NCKD) * T^2

Hinton's KL splits exactly as KL(p^teacher || p^student) = TCKD + (1 - p^teacher_t) * NCKD; DKD drops the
teacher's non-target mass as NCKD's weight and sets the two weights freely.

Defaults: alpha=1, beta=8, T=4, warm-up 20 epochs, CE weight 1 -- the DKD authors' CIFAR-100 setting
(mdistiller, ResNet students); beta depends on the pair in the paper. Note that the OFA-KD code base's
``train.py`` defaults differ (dkd alpha=1, beta=2, T=1, and its ``dkd.py`` has no warm-up); set
``beta=2, temperature=1, warmup_epochs=0`` to follow it.

The target class is ``targets.hard`` (under mixup/cutmix the trainer's hard label, as the reference takes the
arg-max of the soft row). The trainer counts epochs from 0 and mdistiller from 1, so the warm-up uses
``epoch + 1``: the first epoch already has 1/warmup_epochs of the DKD term, as in mdistiller;
``warmup_epochs=0`` disables the warm-up.

The non-target classes are gathered out exactly (no "subtract 1000" mask), and everything is computed in float32
without host synchronisation, so the loss is autocast-safe and runs on any device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F

from .base import LOGITS, TASK_LOSS, Distiller, check_numbers
from .registry import register_method


def non_target_index(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, C-1) indices of every class but ``target`` in each row, in increasing order."""
    base = torch.arange(num_classes - 1, device=target.device).unsqueeze(0)
    return base + (base >= target.unsqueeze(1)).long()


def decoupled_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
                 temperature: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample (TCKD, NCKD, teacher non-target mass), each (B,), at temperature T, without the T^2 factor.

    TCKD + mass * NCKD equals KL(softmax(z_t/T) || softmax(z_s/T)) row by row.
    """
    num_classes = student_logits.shape[-1]
    if num_classes < 2:
        raise ValueError(f"dkd needs at least 2 classes, got logits with {num_classes}")
    target = target.reshape(-1, 1).long()
    z_s = student_logits.float() / temperature
    z_t = teacher_logits.float() / temperature
    index = non_target_index(target.squeeze(1), num_classes)
    zs_nt, zt_nt = z_s.gather(1, index), z_t.gather(1, index)

    # binary (target, non-target) log-probabilities, from log-sum-exps (stable also for confident rows)
    lse_s, lse_t = torch.logsumexp(z_s, 1), torch.logsumexp(z_t, 1)
    log_bs = torch.stack([z_s.gather(1, target).squeeze(1) - lse_s, torch.logsumexp(zs_nt, 1) - lse_s], 1)
    log_bt = torch.stack([z_t.gather(1, target).squeeze(1) - lse_t, torch.logsumexp(zt_nt, 1) - lse_t], 1)
    tckd = (log_bt.exp() * (log_bt - log_bs)).sum(1)

    # distributions over the non-target classes alone
    log_ps_nt = F.log_softmax(zs_nt, 1)
    log_pt_nt = F.log_softmax(zt_nt, 1)
    nckd = (log_pt_nt.exp() * (log_pt_nt - log_ps_nt)).sum(1)
    return tckd, nckd, log_bt[:, 1].exp()


def warmup_factor(epoch: float, warmup_epochs: float) -> float:
    """Linear warm-up min(epoch / warmup_epochs, 1); 1 throughout when ``warmup_epochs`` is 0."""
    if warmup_epochs <= 0:
        return 1.0
    return min(max(float(epoch), 0.0) / warmup_epochs, 1.0)


@register_method
class DKD(Distiller):
    name = "dkd"
    teacher_reads = LOGITS
    version = 1  # of its computation: bump when its numbers change (tests/test_golden.py says when)
    paper = "Zhao et al. CVPR 2022, Decoupled Knowledge Distillation"

    @dataclass(frozen=True)
    class Config:
        gt_weight: float = 1.0
        alpha: float = 1.0          # TCKD weight
        beta: float = 8.0           # NCKD weight (pair-dependent in the paper)
        temperature: float = 4.0
        warmup_epochs: float = 20.0

        def __post_init__(self):
            check_numbers(self, "dkd", nonnegative=("gt_weight", "alpha", "beta", "warmup_epochs"),
                          positive=("temperature",))

    def losses(self, student, teacher, targets, epoch=0):
        cfg = self.cfg
        tckd, nckd, _ = decoupled_kl(student.logits, teacher.logits, targets.hard, cfg.temperature)
        scale = warmup_factor(epoch + 1, cfg.warmup_epochs) * cfg.temperature ** 2
        return {
            TASK_LOSS: cfg.gt_weight * self.task_loss(student.logits, targets),
            "dkd": scale * (cfg.alpha * tckd.mean() + cfg.beta * nckd.mean()),
        }
