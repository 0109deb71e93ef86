"""Data-parallel training: one process per GPU (or per CPU slot with gloo), wrapped in DDP.

The trainer takes a ``dist_ctx`` (an instance of :class:`DistContext`) and asks it for ``rank``,
``world_size`` and ``wrap(module)``; only rank 0 writes files. The pieces that live elsewhere:

* the loaders (``data.TensorLoader`` / ``data.ImageLoader``) shard every global batch: step ``s`` of an epoch
  covers ``order[s*B*W:(s+1)*B*W]`` of the epoch's permutation and rank ``r`` takes the slice
  ``[r*B:(r+1)*B]`` of it (``B`` = ``data.batch_size`` per process, ``W`` = world size). The global order is
  the same for every world size, so ``W=1`` is the single-process run bit for bit, and a ``W``-process run
  sees exactly the images of a single-process run with batch ``B*W``;
* evaluation is sharded too (rank-strided batches of the test set) and :func:`reduce_sums` adds the counts
  over the ranks, so every rank ends with the same top-1; :func:`sync_buffers` first copies rank 0's buffers
  (BatchNorm running statistics, the EMA model's) to every rank, so all ranks evaluate rank 0's model, which
  is the one that is saved;
* the stop request of a Slurm USR2 reaches rank 0 only (submitit checkpoints there); :meth:`DistContext.
  should_stop` turns the local flag into a collective decision (an all-reduce MAX per step), so every rank
  stops after the same step;
* divergence is decided the same way (:meth:`DistContext.first_rank`, one all-reduce per step): a NaN on one
  rank's shard marks the run FAILED on every rank at that step, with that rank's loss terms
  (:meth:`DistContext.from_rank`), so no rank waits in a collective of a run the others have left and, in a
  cohort, no rank pairs one member's collectives with another member's.

Methods with state: SPOFA all-reduces its EMA statistic and CRD gathers its banks' update through
``Distiller.exchange`` (CRD also lists its banks as ``_same_on_every_rank``); PAT lists its per-rank feedback buffers in
``_ddp_params_and_buffers_to_ignore``, which :meth:`DistContext.wrap` collects from every submodule (with the
submodule's prefix) so that DDP neither broadcasts nor shape-checks them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple:
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _collective_device() -> torch.device:
    """The device collective tensors must live on for the current backend (CUDA for nccl, CPU for gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def sync_buffers(module: nn.Module, src: int = 0) -> None:
    """Copies rank ``src``'s floating-point buffers to every rank (no-op when not distributed)."""
    if not is_distributed():
        return
    for buf in module.buffers():
        if buf.numel() == 0 or not buf.is_floating_point():
            continue
        dev = _collective_device()
        tmp = buf.detach().to(dev)
        dist.broadcast(tmp, src)
        if tmp.data_ptr() != buf.data_ptr():
            buf.copy_(tmp)


def reduce_sums(values: List[float]) -> List[float]:
    """Sums each value over the ranks (float64; itself when not distributed)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def ignored_names(root: nn.Module, listed_in: str = "_ddp_params_and_buffers_to_ignore") -> List[str]:
    """Every submodule's ``_ddp_params_and_buffers_to_ignore`` (or another list, ``listed_in``), prefixed with that
    submodule's name."""
    names: List[str] = []
    for prefix, sub in root.named_modules():
        for name in getattr(sub, listed_in, ()) or ():
            names.append(f"{prefix}.{name}" if prefix else name)
    return names


@dataclass
class DistContext:
    """What the trainer needs to know about the process group."""

    rank: int
    world_size: int
    local_rank: int = 0
    backend: str = "gloo"

    def device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def wrap(self, module: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
        """DDP around the trainable module. ``find_unused_parameters``: on for a method that declares that some
        trainable parameter may get no gradient in a step (``Distiller.find_unused_parameters``, e.g. PAT's
        fusion branch at the first step); off otherwise, sparing DDP a traversal of the graph every step."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        ignored = ignored_names(module)
        if ignored:  # DDP reads this attribute on the module it wraps only
            module._ddp_params_and_buffers_to_ignore = ignored
        device_ids = [self.device().index] if self.backend == "nccl" else None
        return DDP(module, device_ids=device_ids, find_unused_parameters=find_unused_parameters)

    def stop_fn(self, local: Callable[[], bool]) -> Callable[[], bool]:
        """A ``should_stop`` that is true on every rank as soon as ``local()`` is true on one of them.
        Called once per step on every rank (the trainer does), so the all-reduces line up."""

        def should_stop() -> bool:
            flag = torch.tensor([1.0 if local() else 0.0], device=self.device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return bool(flag.item() > 0)

        return should_stop

    def first_rank(self, flags: Sequence[bool]) -> List[Optional[int]]:
        """For each flag, the lowest rank on which it is true (None: on none), the same answer on every rank: one
        all-reduce MAX of ``world_size - rank`` where a flag is set. How the ranks decide together that a run
        diverged, so that each marks it FAILED at the same step and none waits in a collective of a run the others
        left. Every rank must call it at the same point with flags for the same runs."""
        if not flags:
            return []
        mine = [float(self.world_size - self.rank) if flag else 0.0 for flag in flags]
        reduced = torch.tensor(mine, dtype=torch.float64, device=self.device())
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
        return [self.world_size - int(v) if v > 0 else None for v in reduced.tolist()]

    def from_rank(self, value: Any, src: int) -> Any:
        """``value`` of rank ``src`` (any picklable object) on every rank."""
        box = [value]
        dist.broadcast_object_list(box, src=src, device=self.device())
        return box[0]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_from_env(backend: Optional[str] = None) -> Optional[DistContext]:
    """Initialises the default process group from the ``env://`` variables (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT, LOCAL_RANK) when WORLD_SIZE > 1; returns None for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    backend = backend or default_backend()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank if torch.cuda.device_count() > local_rank else 0)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, backend=backend)


def init_from_submitit(backend: Optional[str] = None) -> Optional[DistContext]:
    """In a submitit job with several tasks: exports the torch.distributed variables from submitit's job
    environment (``TorchDistributedEnvironment``) and initialises the process group; None for one task."""
    import submitit

    try:
        env = submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job
        return init_from_env(backend)
    if env.num_tasks <= 1:
        return None
    # each task sees only its own GPU (CUDA_VISIBLE_DEVICES), so the local device is cuda:0
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=torch.cuda.is_available())
    os.environ["LOCAL_RANK"] = "0" if torch.cuda.is_available() else os.environ.get("LOCAL_RANK", "0")
    return init_from_env(backend)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
