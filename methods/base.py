"""The distiller base class: the contract every method follows.

A method is an ``nn.Module`` that owns only its train-time modules (projectors, attention, prompts). The student
and the teacher are held as plain references, not submodules, so ``method.parameters()`` and
``method.state_dict()`` are exactly the method's own (extra parameters, EMA baselines, feedback buffers).

Per training step the trainer calls :meth:`Distiller.training_step`, which by default runs the student with the
taps the method asked for, the teacher once without gradients, and :meth:`Distiller.losses`. The returned dict
maps term names to already-weighted scalar losses; the trainer sums them and logs each.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from hkdbench.benchmark.models.taps import Features, TappedModel

# The key of the task (classification) term in a method's losses; the gradient-conflict probe measures every other
# term against it.
TASK_LOSS = "ce"


@dataclass
class Targets:
    """Labels of a batch: ``hard`` class indices (B,) and, under mixup/cutmix, ``soft`` label rows (B, C)."""
    hard: torch.Tensor
    soft: Optional[torch.Tensor] = None


def check_stages(stages, field: str = "stages", allow_empty: bool = False) -> None:
    """A method's stage list: distinct values among 1-4 (non-empty unless ``allow_empty``)."""
    stages = tuple(stages)
    if (not stages and not allow_empty) or any(s not in (1, 2, 3, 4) for s in stages) \
            or len(set(stages)) != len(stages):
        raise ValueError(f"{field} must be distinct values of 1,2,3,4, got {stages}")


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's KD term: KL(softmax(z_t/T) || softmax(z_s/T)) * T^2, averaged over the batch."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()
    return kl * temperature ** 2


class Distiller(nn.Module):
    """Base of every method. Subclasses set ``name`` and ``Config`` and implement :meth:`losses`."""

    name: ClassVar[str] = ""
    Config: ClassVar[type]
    paper: ClassVar[str] = ""
    # Set when the method back-propagates through the teacher (e.g. PAT's prompts); the trainer then does not
    # wrap the teacher forward in no_grad for it (the teacher's weights stay frozen all the same).
    needs_teacher_grad: ClassVar[bool] = False
    # False for methods that train the student alone (no teacher is built or trained for them)
    uses_teacher: ClassVar[bool] = True

    def __init__(self, cfg, student: TappedModel, teacher: Optional[TappedModel], num_classes: int,
                 criterion: Optional[nn.Module] = None):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        # plain references: not submodules, so they are not in this module's parameters or state dict
        self.__dict__["student"] = student
        self.__dict__["teacher"] = teacher
        if teacher is not None:  # the teacher is frozen; a method may still back-propagate *through* it
            teacher.requires_grad_(False).eval()
        self.__dict__["criterion"] = criterion if criterion is not None else nn.CrossEntropyLoss()

    # -- what the method needs from the models -------------------------------------------------------------------
    def student_stages(self) -> Tuple[int, ...]:
        return ()

    def teacher_stages(self) -> Tuple[int, ...]:
        return ()

    # -- the step -------------------------------------------------------------------------------------------------
    def task_loss(self, logits: torch.Tensor, targets: Targets) -> torch.Tensor:
        """The trainer's classification criterion (label smoothing, or soft-target CE under mixup)."""
        return self.criterion(logits, targets.soft if targets.soft is not None else targets.hard)

    def teacher_forward(self, images: torch.Tensor) -> Features:
        teacher = self.teacher
        teacher.eval()  # the teacher stays in eval mode whatever train() was called on
        if self.needs_teacher_grad:
            return teacher(images, stages=self.teacher_stages())
        with torch.no_grad():
            return teacher(images, stages=self.teacher_stages())

    def training_step(self, images: torch.Tensor, targets: Targets, epoch: int = 0
                      ) -> Tuple[Features, Dict[str, torch.Tensor]]:
        """One step's forward passes and loss terms; returns the student's outputs and the named losses."""
        s_out = self.student(images, stages=self.student_stages())
        t_out = self.teacher_forward(images) if self.uses_teacher else None
        return s_out, self.losses(s_out, t_out, targets, epoch)

    def losses(self, student: Features, teacher: Optional[Features], targets: Targets,
               epoch: int = 0) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    # -- logging and reporting ------------------------------------------------------------------------------------
    def statistics(self) -> Dict[str, float]:
        """Named statistics of the last step (e.g. adaptive weights), logged alongside the losses."""
        return {}

    def extra_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    @classmethod
    def config_fields(cls) -> Dict[str, object]:
        defaults = cls.Config()
        return {f.name: getattr(defaults, f.name) for f in fields(cls.Config)}
