"""``crd``: Tian, Krishnan and Isola, "Contrastive Representation Distillation" (ICLR 2020), as the OFA-KD code
base runs it (OFAKD ``distillers/crd.py``, after RepDistiller ``crd/criterion.py`` and ``crd/memory.py``).

Each model's pre-logits go through an embed head (Linear, then L2 normalisation) to ``feat_dim``. Two memory
banks hold one embedding per training sample: ``memory_student`` (the student's, updated by momentum from the
student's embeddings) and ``memory_teacher``. For a batch, every sample ``i`` has its own index (the positive)
and ``nce_k`` negatives: training samples of *other* classes drawn uniformly with replacement (the reference's
``CIFAR100InstanceSample(is_sample=True)``, RepDistiller's ``mode='exact'``). The student's embedding is scored
against the teacher bank's rows at those indices and vice versa::

    p = exp(<bank[j], v> / nce_t) / Z        Z = N * mean(exp(<bank[j], v> / nce_t)) of the first batch (then fixed)

and each side's NCE loss (noise probability P_n = 1/N, m = nce_k) is::

    L = -(1/B) * sum_i [ log(p_i0 / (p_i0 + m P_n + 1e-7)) + sum_k log(m P_n / (p_ik + m P_n + 1e-7)) ]

The distillation term is ``crd_weight * (L_student + L_teacher)``, beside the task loss. After the scores, each
bank's rows of the batch are replaced by ``normalize(nce_m * row + (1 - nce_m) * embedding)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import DISTRIBUTED, PRE_LOGITS, TASK_LOSS, Distiller, RankExchange, TrainingSet, check_numbers
from .registry import register_method

NCE_EPS = 1e-7  # the reference's eps in the NCE loss's denominators


class Embed(nn.Module):
    """The reference's embed head: flatten, Linear(dim_in, dim_out), L2 normalisation of each row."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


def nce_loss(scores: torch.Tensor, num_data: int) -> torch.Tensor:
    """CRD's NCE loss of ``scores`` (B, 1 + K): column 0 the positive's normalised score, then the K negatives'."""
    batch, m = scores.shape[0], scores.shape[1] - 1
    noise = m / num_data  # m * P_n, P_n = 1 / N
    log_pos = torch.log(scores[:, 0] / (scores[:, 0] + noise + NCE_EPS))
    log_neg = torch.log(noise / (scores[:, 1:] + noise + NCE_EPS))
    return -(log_pos.sum() + log_neg.sum()) / batch


class ContrastMemory(nn.Module):
    """The two momentum memory banks and their normalisation constants (all buffers: a resume is exact)."""

    def __init__(self, dim: int, num_data: int, temperature: float, momentum: float):
        super().__init__()
        self.temperature, self.momentum = temperature, momentum
        bound = 1.0 / math.sqrt(dim / 3)  # the reference's init: uniform in [-bound, bound)
        self.register_buffer("memory_student", torch.rand(num_data, dim) * 2 * bound - bound)
        self.register_buffer("memory_teacher", torch.rand(num_data, dim) * 2 * bound - bound)
        # Z of each side, estimated on the first batch and then fixed; -1 = not estimated yet
        self.register_buffer("z_student", torch.tensor(-1.0))
        self.register_buffer("z_teacher", torch.tensor(-1.0))
        # whether both Z are estimated, kept on the host: reading the buffers would synchronise on every step
        self._z_known = False
        # kept identical on every rank through the exchange (Z from every rank's batch, every rank's batch in the
        # update): DDP's broadcast of rank 0's buffers at every forward would copy the banks again (~51 MB a step on
        # CIFAR-100, ~1.3 GB on ImageNet)
        self._ddp_params_and_buffers_to_ignore = ["memory_student", "memory_teacher", "z_student", "z_teacher"]
        # ... identical on every rank, not a rank's own (as PAT's feedback): ranks trained in turn share one copy
        self._same_on_every_rank = list(self._ddp_params_and_buffers_to_ignore)

    def _scores(self, bank: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, z: torch.Tensor,
                exchange: RankExchange) -> Tuple[torch.Tensor, torch.Tensor]:
        """exp(<bank[rows], v> / T) / Z, (B, 1 + K), in float32 (exp(1/0.07) overflows fp16), and the Z it took.
        The dot products come from v @ bank^T (B, N), of which the sampled columns are taken: the reference's values
        without gathering the (B, 1 + K, D) rows (1 GB per side at B 128, K 16384; 20x slower on a CPU here). The
        bank is copied because the backward needs it as it was and the update after the step changes it in place."""
        with torch.autocast(v.device.type, enabled=False):  # autocast would run the product in bf16/fp16
            raw = torch.exp((v.float() @ bank.clone().T).gather(1, rows) / self.temperature)
        if not self._z_known:  # the reference's Z: N times the mean of the first batch's raw scores (every rank's)
            # on the device, without reading z: a float32 product rounds as the float64 one did before
            z = torch.where(z < 0, exchange.mean(raw.detach().mean()) * bank.shape[0], z)
        return raw / z, z

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._z_known = False  # the loaded Z may be -1 (not estimated yet)

    def forward(self, v_student: torch.Tensor, v_teacher: torch.Tensor, rows: torch.Tensor,
                exchange: RankExchange = DISTRIBUTED) -> Tuple[torch.Tensor, torch.Tensor]:
        """Scores of the student's embeddings against the teacher's bank and of the teacher's against the
        student's, at ``rows`` (B, 1 + K; column 0 = each sample's own index); then Z fixed and the banks' momentum
        update with every rank's batch (``exchange.update_shared``: under DDP at once, emulated ranks after the
        last one's forward, so that every rank scores against the banks as the step found them)."""
        out_student, z_student = self._scores(self.memory_teacher, v_student, rows, self.z_student, exchange)
        out_teacher, z_teacher = self._scores(self.memory_student, v_teacher, rows, self.z_teacher, exchange)
        if not self._z_known:
            exchange.update_shared(lambda: self._fix_z(z_student, z_teacher))
        exchange.update_shared(self.update, rows[:, 0], v_student.detach().float(), v_teacher.detach().float())
        return out_student, out_teacher

    @torch.no_grad()
    def _fix_z(self, z_student: torch.Tensor, z_teacher: torch.Tensor) -> None:
        self.z_student.copy_(z_student)
        self.z_teacher.copy_(z_teacher)
        self._z_known = True

    @torch.no_grad()
    def update(self, index: torch.Tensor, v_student: torch.Tensor, v_teacher: torch.Tensor) -> None:
        """Each bank's rows at ``index`` (every rank's batch) become normalize(m * row + (1 - m) * v): every rank
        applies every rank's batch, so the banks stay identical across ranks."""
        for bank, v in ((self.memory_student, v_student), (self.memory_teacher, v_teacher)):
            mixed = bank[index] * self.momentum + v * (1 - self.momentum)
            bank.index_copy_(0, index, F.normalize(mixed, dim=1))


class NegativeSampler(nn.Module):
    """Draws, for each sample, ``k`` training-set indices of other classes, uniformly with replacement: the
    training set sorted by class, a draw u in [0, N - n_y) skips the block of the sample's own class y."""

    def __init__(self, labels: torch.Tensor, k: int):
        super().__init__()
        labels = labels.long().cpu()
        counts = torch.bincount(labels)
        if (counts > 0).sum() < 2:
            raise ValueError("crd needs a training set with at least 2 classes (its negatives are samples of other "
                             f"classes), got labels {labels.unique().tolist()}")
        self.k = k
        # derived from the data, not state: rebuilt on every run, so kept out of the state dict
        self.register_buffer("labels", labels, persistent=False)
        self.register_buffer("by_class", torch.argsort(labels, stable=True), persistent=False)
        self.register_buffer("class_start", torch.cumsum(counts, 0) - counts, persistent=False)
        self.register_buffer("class_count", counts, persistent=False)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        """(B, 1 + k) rows: each sample's own index, then its k negatives."""
        y = self.labels[index]
        start, count = self.class_start[y][:, None], self.class_count[y][:, None]
        others = len(self.labels) - count  # (B, 1): how many samples are of another class
        u = (torch.rand(len(index), self.k, device=index.device) * others).long().clamp_(max=others - 1)
        position = torch.where(u < start, u, u + count)
        return torch.cat([index[:, None], self.by_class[position]], dim=1)


@register_method
class CRD(Distiller):
    name = "crd"
    teacher_reads = PRE_LOGITS
    version = 1  # of its computation: bump when its numbers change (tests/test_golden.py says when)
    paper = "Tian et al., ICLR 2020, Contrastive Representation Distillation"
    needs_sample_indices = True

    @dataclass(frozen=True)
    class Config:
        gt_weight: float = 1.0
        crd_weight: float = 1.0     # OFAKD's --kd-loss-weight default (RepDistiller's CIFAR runs: -b 0.8)
        feat_dim: int = 128
        nce_k: int = 16384          # negatives per sample
        nce_t: float = 0.07         # temperature of the scores
        nce_m: float = 0.5          # momentum of the memory banks
        head_lr_scale: float = 1.0  # lr of the embed heads / the schedule's (1: one group with the student's)

        def __post_init__(self):
            check_numbers(self, "crd", nonnegative=("gt_weight", "crd_weight"),
                          positive=("nce_t", "head_lr_scale"))
            if not 0 <= self.nce_m < 1:
                raise ValueError(f"crd nce_m must be in [0, 1), got {self.nce_m}")
            for name in ("feat_dim", "nce_k"):
                if getattr(self, name) < 1:
                    raise ValueError(f"crd {name} must be >= 1, got {getattr(self, name)}")

    def __init__(self, cfg, student, teacher, num_classes, criterion=None, train_set: Optional[TrainingSet] = None):
        super().__init__(cfg, student, teacher, num_classes, criterion, train_set)
        self.num_data = train_set.size
        self.embed_student = Embed(student.num_features, cfg.feat_dim)
        self.embed_teacher = Embed(teacher.num_features, cfg.feat_dim)
        self.memory = ContrastMemory(cfg.feat_dim, self.num_data, cfg.nce_t, cfg.nce_m)
        self.sampler = NegativeSampler(train_set.labels, cfg.nce_k)

    def optimizer_groups(self):
        if self.cfg.head_lr_scale == 1:
            return []
        heads = nn.ModuleList([self.embed_student, self.embed_teacher])
        return [{"params": heads, "lr_scale": self.cfg.head_lr_scale}]

    def takes_rank_means(self) -> bool:
        return not self.memory._z_known  # the first batch's Z (or the first after a resume)

    def losses(self, student, teacher, targets, epoch=0):
        if targets.index is None:
            raise ValueError("crd needs Targets.index (each sample's training-set index) on every step")
        v_student = self.embed_student(student.pre_logits)
        v_teacher = self.embed_teacher(teacher.pre_logits)
        out_student, out_teacher = self.memory(v_student, v_teacher, self.sampler(targets.index), self.exchange)
        contrast = nce_loss(out_student, self.num_data) + nce_loss(out_teacher, self.num_data)
        return {TASK_LOSS: self.cfg.gt_weight * self.task_loss(student.logits, targets),
                "crd": self.cfg.crd_weight * contrast}
