"""``train.dist_bn='reduce'``: timm's ``--dist-bn reduce`` (``timm.utils.distribute_bn``, the default of OFA-KD's and
PAT's train.py), the BatchNorm running statistics averaged over the ranks of ``train.world``.

What the references' ranks hold, and so what is averaged:

* **the model** (the student and the method's modules; timm reduces the whole distiller, see the README for the
  frozen teacher): after every epoch, before evaluation. Under DDP a rank's running statistics are rank 0's of the
  step before (DDP's broadcast at every forward) updated with its own batch, so at an epoch's end they differ by its
  last micro-batch: each rank's statistics after its last micro-batch of the epoch are averaged, and every rank
  trains the next epoch from the mean;
* **the EMA model**: at the evaluated epochs, before its evaluation. Each rank's EMA follows its own model, so its
  BatchNorm statistics are an EMA of that rank's statistics after each of its micro-batches: a process that trains
  several ranks keeps those of its ranks other than the first (:meth:`RankBatchNorm.after_optimiser_step`, timm's
  lerp on each), and the checkpoint keeps every rank's.

The mean is summed as DDP's all-reduce sums it (a balanced tree in rank order, across processes an all-reduce),
then divided by ``float(world)`` as timm's ``bn_buf /= float(world_size)``.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from hkdbench.benchmark.engine.pairwise import PairwiseSum

BN_STATS = ("running_mean", "running_var")  # timm's distribute_bn: buffers whose name holds one of these
STUDENT = "student.model."  # where the EMA's model sits in the trained module (TrainModule.student.model)


def bn_stats(module: nn.Module) -> Dict[str, torch.Tensor]:
    """The module's BatchNorm running statistics by name (the buffers themselves)."""
    return {name: buf for name, buf in module.named_buffers() if any(s in name for s in BN_STATS)}


def _cloned(stats: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {name: buf.detach().clone() for name, buf in stats.items()}


class RankBatchNorm:
    """The running statistics of the ranks one process trains (``layout``: a ``ranks.RankLayout``) that
    ``train.dist_bn='reduce'`` averages: the module's (``module``) and the EMA model's (``ema``, or None)."""

    def __init__(self, layout, module: nn.Module, ema=None):
        self.layout, self.module, self.ema = layout, module, ema
        self._last: Dict[int, Dict[str, torch.Tensor]] = {}  # local rank -> its module statistics after its micro-batch
        # local rank >= 1 -> its EMA's statistics (the first's are the EMA model's own)
        self._ema: Dict[int, Dict[str, torch.Tensor]] = (
            {j: _cloned(bn_stats(ema.module)) for j in range(1, layout.per_process)} if ema is not None else {})

    # -- during the step (ranks trained in turn) ----------------------------------------------------------------------

    def after_micro_batch(self, j: int) -> None:
        """Keeps local rank ``j``'s statistics as its micro-batch left them (before rank 0's are put back)."""
        if self.layout.emulated:
            self._last[j] = _cloned(bn_stats(self.module))

    @contextlib.contextmanager
    def first_rank_statistics(self):
        """The module holds its first local rank's statistics after its micro-batch while inside (for the EMA model's
        update: that rank's EMA; a process without rank 0 holds rank 0's after the step), then its own again."""
        if not self.layout.emulated or self.ema is None:
            yield
            return
        stats = bn_stats(self.module)
        own = _cloned(stats)
        self._assign(stats, list(self._last[0].values()))
        try:
            yield
        finally:
            self._assign(stats, list(own.values()))

    def after_optimiser_step(self) -> None:
        """Each local rank's EMA but the first (the EMA model, updated with the first rank's) follows its own
        statistics, with the EMA's own lerp and decay."""
        if not self.layout.emulated or self.ema is None:
            return
        weight = 1.0 - self.ema.get_decay()
        for j, ema_stats in self._ema.items():
            model = [self._last[j][STUDENT + name] for name in ema_stats]
            if self.ema.foreach:
                self.ema._foreach_lerp_(list(ema_stats.values()), model, weight=weight)
            else:
                for ema_v, model_v in zip(ema_stats.values(), model):
                    self.ema._lerp_(ema_v, model_v, weight=weight)

    # -- at the epoch's end ------------------------------------------------------------------------------------------

    def reduce_model(self) -> None:
        """The module's statistics become their mean over every rank (after each rank's last micro-batch)."""
        local = [self._last[j] for j in range(self.layout.per_process)] if self.layout.emulated else [
            bn_stats(self.module)]
        self._assign(bn_stats(self.module), self._mean(local))

    def reduce_ema(self) -> None:
        """The EMA model's statistics (and every local rank's EMA's) become their mean over every rank."""
        if self.ema is None:
            return
        own = bn_stats(self.ema.module)
        means = self._mean([own, *self._ema.values()])
        for stats in (own, *self._ema.values()):
            self._assign(stats, means)

    def _mean(self, local: List[Dict[str, torch.Tensor]]) -> List[torch.Tensor]:
        tree = PairwiseSum()
        for stats in local:
            tree.add([buf.detach().clone() for buf in stats.values()])
        sums = tree.total()
        if self.layout.processes > 1 and sums:
            comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            flat = torch.cat([s.reshape(-1) for s in sums]).to(comm)
            dist.all_reduce(flat)
            sums = [p.to(s.device).view_as(s) for p, s in zip(flat.split([s.numel() for s in sums]), sums)]
        return [s / float(self.layout.world) for s in sums]

    @staticmethod
    @torch.no_grad()
    def _assign(stats: Dict[str, torch.Tensor], values: List[torch.Tensor]) -> None:
        for buf, value in zip(stats.values(), values):
            buf.copy_(value)

    # -- checkpoints -------------------------------------------------------------------------------------------------

    def ema_state(self, j: int) -> Optional[Dict[str, torch.Tensor]]:
        """Local rank ``j``'s EMA statistics, for the checkpoint (None without an EMA)."""
        if self.ema is None:
            return None
        stats = bn_stats(self.ema.module) if j == 0 else self._ema[j]
        return {name: buf.detach().cpu() for name, buf in stats.items()}

    def load_ema_state(self, j: int, saved: Optional[Dict[str, torch.Tensor]]) -> None:
        if self.ema is None or saved is None:
            return
        stats = bn_stats(self.ema.module) if j == 0 else self._ema[j]
        self._assign(stats, [saved[name] for name in stats])

