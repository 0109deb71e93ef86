"""The distiller base class: the contract every method follows.

A method is an ``nn.Module`` that owns only its train-time modules (projectors, attention, prompts). The student
and the teacher are held as plain references, not submodules, so ``method.parameters()`` and
``method.state_dict()`` are exactly the method's own (extra parameters, EMA baselines, feedback buffers).

Per training step the trainer calls :meth:`Distiller.training_step`, which by default runs the student with the
taps the method asked for, the teacher once without gradients, and :meth:`Distiller.losses`. The returned dict
maps term names to already-weighted scalar losses; the trainer sums them and logs each.

The contract, beyond ``losses``:

* **The task term** is the loss named :data:`TASK_LOSS` (``"ce"``): the weighted classification loss on the
  student's logits. Every method that trains on the labels returns it under that key; the gradient-conflict
  probe takes it as the task side and every other term as the distillation side.
* **Parameter groups.** :meth:`Distiller.optimizer_groups` may return groups of the method's own parameters
  with their own options (``lr_scale``: a multiple of the scheduled lr, as timm's schedulers honour it;
  ``weight_decay``). The optimiser factory (``benchmark/engine/optim.py``) leaves those parameters out of its default
  groups and appends these; a group without ``weight_decay`` is split by the default rule (no decay for ndim <= 1
  and ``*.bias``). The default (no groups) is the reference's: every parameter in the default groups.
* **Sample indices.** A method with ``needs_sample_indices = True`` (memory banks, as CRD's) gets each sample's
  index in the training set as ``Targets.index`` (B,) on every training step, and the training set itself
  (:class:`TrainingSet`: its size and labels) as the ``train_set`` keyword of its constructor. Under
  mixup/cutmix the index is that of the un-mixed sample at the row (the one with weight lambda), as CRD's
  reference passes it. Other methods get neither.
* **Unused parameters under DDP.** ``find_unused_parameters = True`` declares that some trainable parameter of
  the student or the method may get no gradient in a step (PAT's fusion branch before feedback exists); DDP is
  then wrapped with unused-parameter detection, which costs a graph traversal per step, so it is off otherwise.
  ``tests/test_contract.py`` checks that a method without it gives every trainable parameter a gradient.
* **Values of every rank.** A forward that needs a value of every DDP rank (a mean, or a change of state all ranks
  hold, as CRD's Z and banks, SPOFA's baselines) asks :attr:`Distiller.exchange` (:class:`RankExchange`, whose rules
  it keeps) and says in :meth:`Distiller.takes_rank_means` when it takes a mean: ranks trained in turn in one process
  then give it the same values as one process per rank (``benchmark/engine/exchange.py``).
* **Unsupported pairs.** A method that cannot be built for a teacher/student pair raises
  ``NotImplementedError`` with the reason from its constructor. The harness reports it as an error of that run
  before the student's first step (``hkdbench train`` exits 2 with the reason), ``hkdbench methods
  --pair`` and ``hkdbench overhead`` list the method as not supported for the pair, and the contract tests skip
  that pair with the reason. Any other exception from a constructor is a bug.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from hkdbench.benchmark.core.errors import HkdbenchError
from hkdbench.benchmark.data.stream import Targets
from hkdbench.benchmark.models.taps import Features, TappedModel

# What a method reads of the teacher (Distiller.teacher_reads): its logits only; its logits and pre-logit embedding;
# stage features of a plain pass; or a pass of its own (altered, or back-propagated through). The first two are what
# stored teacher outputs hold (benchmark/engine/teacher_outputs.py); the others keep the live teacher.
LOGITS, PRE_LOGITS, STAGES, OWN_PASS = "logits", "pre_logits", "stages", "own_pass"
TEACHER_READS = (LOGITS, PRE_LOGITS, STAGES, OWN_PASS)

# The key of the task (classification) term in a method's losses; the gradient-conflict probe measures every other
# term against it.
TASK_LOSS = "ce"


@dataclass(frozen=True)
class TrainingSet:
    """What a method with ``needs_sample_indices`` knows of the training set: the label of every sample, in the
    order of ``Targets.index`` (after ``data.train_subset``)."""
    labels: torch.Tensor

    @property
    def size(self) -> int:
        return len(self.labels)

    @classmethod
    def stand_in(cls, num_classes: int) -> "TrainingSet":
        """The training set that cost reports (``hkdbench methods --pair``, ``hkdbench overhead``) size per-sample
        methods by: 500 images per class, balanced (CIFAR's 50,000 for 100 classes)."""
        return cls(torch.arange(500 * num_classes) % num_classes)


def check_numbers(cfg, method: str, nonnegative: Tuple[str, ...] = (), positive: Tuple[str, ...] = ()) -> None:
    """The one home of a config's finite/positive checks: each field named in ``nonnegative`` must be a finite
    number >= 0, each one in ``positive`` a finite number > 0 (NaN and infinity fail both)."""
    for names, bound, ok in ((nonnegative, ">=", lambda v: v >= 0), (positive, ">", lambda v: v > 0)):
        for name in names:
            value = getattr(cfg, name)
            if not (math.isfinite(value) and ok(value)):
                raise ValueError(f"{method} {name} must be {bound} 0 and finite, got {value}")


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


class RankExchange:
    """How a method's forward takes values from every rank of the run (``train.world``), as DDP's collectives give
    them: the process group's ranks here (each process one rank; alone, the value itself). Where a process trains
    several ranks in turn the engine puts its own in ``Distiller.exchange`` (``benchmark/engine/ranks.py``), which
    gives the same values. The rules a method keeps so that both give the same run:

    * a value it takes the mean of is computed from the rank's own inputs, not from an earlier mean;
    * state that every rank holds identically (CRD's banks and Z, SPOFA's baselines) changes only through
      :meth:`update_shared`, and the forward does not read it again after asking for the change."""

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """``value``'s mean over the ranks: the sum in one all-reduce, over the number of ranks."""
        if not _distributed():
            return value
        total = value.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total / dist.get_world_size()

    def update_shared(self, update: Callable[..., None], *values: torch.Tensor) -> None:
        """Calls ``update`` once with each of ``values`` of every rank concatenated along dim 0 in rank order (none:
        once without): under DDP at once, after an all-gather; the engine's once every rank of the step has run."""
        update(*(_gathered(v) for v in values))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gathered(x: torch.Tensor) -> torch.Tensor:
    """``x`` of every rank concatenated along dim 0 (itself without a process group); no gradient."""
    if not _distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


DISTRIBUTED = RankExchange()


class UnsupportedPairError(HkdbenchError, NotImplementedError):
    """A method's ``NotImplementedError`` from its constructor: it cannot be built for this teacher/student pair."""


class Distiller(nn.Module):
    """Base of every method. Subclasses set ``name`` and ``Config`` and implement :meth:`losses`."""

    name: ClassVar[str] = ""
    Config: ClassVar[type]
    paper: ClassVar[str] = ""
    # The version of the method's computation, part of every run's identity (methods/registry.py: method_code). A
    # built-in method declares its own and bumps it when its numbers change (its golden run fails until then); a
    # plugin is identified by its source, and may declare one to mark a change in code outside its file.
    version: ClassVar[int] = 0
    # Set when the method back-propagates through the teacher (e.g. PAT's prompts); the trainer then does not
    # wrap the teacher forward in no_grad for it (the teacher's weights stay frozen all the same).
    needs_teacher_grad: ClassVar[bool] = False
    # False for methods that train the student alone (no teacher is built or trained for them)
    uses_teacher: ClassVar[bool] = True
    # What the method reads of the teacher (one of TEACHER_READS). LOGITS or PRE_LOGITS: the run can read stored teacher
    # outputs (train.teacher_outputs=stored). The default, STAGES, keeps the live teacher: a plugin that reads only
    # logits declares LOGITS to gain from stored outputs
    teacher_reads: ClassVar[str] = STAGES
    # True: the method gets Targets.index every step and the TrainingSet as the constructor's train_set
    needs_sample_indices: ClassVar[bool] = False
    # True: some trainable parameter may get no gradient in a step, so DDP must look for unused parameters
    find_unused_parameters: ClassVar[bool] = False
    # How the forward reaches the other ranks of train.world (RankExchange): torch.distributed's collectives, or the
    # engine's where a process trains several ranks in turn (benchmark/engine/ranks.py sets it)
    exchange: RankExchange = DISTRIBUTED

    def __init__(self, cfg, student: TappedModel, teacher: Optional[TappedModel], num_classes: int,
                 criterion: Optional[nn.Module] = None, train_set: Optional[TrainingSet] = None):
        super().__init__()
        if self.needs_sample_indices and train_set is None:
            raise ValueError(f"method {self.name!r} needs the training set (train_set=TrainingSet(labels)): "
                             "it indexes per-sample state by Targets.index")
        self.cfg = cfg
        self.num_classes = num_classes
        # plain references: not submodules, so they are not in this module's parameters or state dict
        self.__dict__["student"] = student
        self.__dict__["teacher"] = teacher
        if teacher is not None:  # the teacher is frozen; a method may still back-propagate *through* it
            teacher.requires_grad_(False).eval()
        self.__dict__["criterion"] = criterion if criterion is not None else nn.CrossEntropyLoss()

    @classmethod
    def build(cls, cfg, student: TappedModel, teacher: Optional[TappedModel], num_classes: int,
              criterion: Optional[nn.Module] = None, train_set: Optional[TrainingSet] = None) -> "Distiller":
        """How the harness constructs a method: ``train_set`` reaches only a method that needs sample indices (so a
        method's ``__init__`` need not take it otherwise)."""
        extra = {"train_set": train_set} if cls.needs_sample_indices else {}
        try:
            return cls(cfg, student, teacher, num_classes, criterion, **extra)
        except NotImplementedError as err:
            raise UnsupportedPairError(str(err) or f"{cls.name} does not support this pair") from err

    # -- what the method needs from the models -------------------------------------------------------------------
    def student_stages(self) -> Tuple[int, ...]:
        return ()

    def teacher_stages(self) -> Tuple[int, ...]:
        return ()

    # -- the step -------------------------------------------------------------------------------------------------
    def task_loss(self, logits: torch.Tensor, targets: Targets) -> torch.Tensor:
        """The trainer's classification criterion (label smoothing, or soft-target CE under mixup)."""
        return self.criterion(logits, targets.soft if targets.soft is not None else targets.hard)

    def plain_teacher_stages(self) -> Optional[Tuple[int, ...]]:
        """The stages this method reads from a plain teacher pass of the step's batch (no gradients, nothing
        altered in the teacher), or None when it makes no such pass. A cohort runs the plain pass once per step for
        all its members (the union of their stages) and hands it to each through :meth:`plain_teacher_forward`."""
        if not self.uses_teacher or self.needs_teacher_grad:
            return None
        return tuple(self.teacher_stages())

    @contextlib.contextmanager
    def sharing_teacher_pass(self, images: Optional[torch.Tensor], features: Optional[Features]):
        """While inside, :meth:`plain_teacher_forward` of exactly ``images`` returns ``features`` (a plain teacher
        pass the harness ran already) instead of running the teacher again."""
        self.__dict__["_shared_pass"] = (images, features) if features is not None else None
        try:
            yield
        finally:
            self.__dict__["_shared_pass"] = None

    def plain_teacher_forward(self, images: torch.Tensor, stages: Tuple[int, ...] = ()) -> Features:
        """The teacher's outputs on ``images`` without gradients: the harness's shared pass when it holds these
        images and stages, else a pass of its own."""
        shared = self.__dict__.get("_shared_pass")
        if shared is not None and shared[0] is images and set(stages) <= set(shared[1].stages):
            return shared[1].select(stages)
        self.teacher.eval()  # the teacher stays in eval mode whatever train() was called on
        with torch.no_grad():
            return self.teacher(images, stages=stages)

    def teacher_forward(self, images: torch.Tensor) -> Features:
        if self.needs_teacher_grad:
            self.teacher.eval()
            return self.teacher(images, stages=self.teacher_stages())
        return self.plain_teacher_forward(images, tuple(self.teacher_stages()))

    def training_step(self, images: torch.Tensor, targets: Targets, epoch: int = 0
                      ) -> Tuple[Features, Dict[str, torch.Tensor]]:
        """One step's forward passes and loss terms; returns the student's outputs and the named losses."""
        s_out = self.student(images, stages=self.student_stages())
        t_out = self.teacher_forward(images) if self.uses_teacher else None
        return s_out, self.losses(s_out, t_out, targets, epoch)

    def losses(self, student: Features, teacher: Optional[Features], targets: Targets,
               epoch: int = 0) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def optimizer_groups(self) -> List[Dict[str, Any]]:
        """Groups of this method's own parameters with their own optimiser options: dicts of ``params`` (a module,
        or a list of parameters) and ``lr_scale`` and/or ``weight_decay``. Parameters not listed go in the default
        groups with the student's. Default: none (the reference's single set of groups)."""
        return []

    def takes_rank_means(self) -> bool:
        """Whether this step's forward takes a mean over the ranks (:meth:`RankExchange.mean`): where a process
        trains several ranks in turn, it then runs every rank's forward once to collect them first. Default: never."""
        return False

    # -- logging and reporting ------------------------------------------------------------------------------------
    def statistics(self) -> Dict[str, torch.Tensor]:
        """Named statistics of the last step (e.g. adaptive weights), logged alongside the losses: detached 0-dim
        tensors, left on the device. The train step reads them with the losses in one transfer (its one host
        synchronisation), so a method never calls ``.item()``/``float()`` on them (a Python float is accepted too,
        for a method written before this, but a float read from a device tensor costs a synchronisation)."""
        return {}

    def extra_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    @classmethod
    def config_fields(cls) -> Dict[str, object]:
        defaults = cls.Config()
        return {f.name: getattr(defaults, f.name) for f in fields(cls.Config)}
