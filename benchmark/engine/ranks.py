"""The ranks of ``train.world`` on the processes that run them: each process trains ``world / processes`` ranks,
one after another, as the reference's ranks trained side by side under DDP.

What a rank of the reference is, and how an emulated one (``per_process > 1``) is made the same:

* its slice of the global batch, augmented under its own key (``data/stream.py``): one loader per rank;
* its own model randomness (dropout, drop-path, a method's sampling), seeded per rank as timm's train.py seeds
  ``seed + rank``: rank 0's seed is the one-rank seed (:func:`rank_seed`); an emulated rank's generator state is
  swapped in for its micro-batch (:meth:`RankStates.as_rank`);
* its per-rank buffers, the ones a method keeps out of DDP's broadcast (``_ddp_params_and_buffers_to_ignore``,
  e.g. PAT's feedback): one copy per rank, swapped in likewise;
* the other buffers (BatchNorm's running statistics) are rank 0's: DDP broadcasts rank 0's before every forward,
  so a rank's own update outlives its step only where ``train.dist_bn='reduce'`` averages the ranks' at the epoch's
  end (``dist_bn.py``). Every rank starts its micro-batch from them as the step found them
  (:meth:`RankStates.begin_step`), a rank other than 0 has them put back after it, and after the step every process
  takes process 0's (:meth:`RankStates.sync_shared_buffers`);
* its gradient: the mean over the ranks, as DDP's all-reduce. The ranks' gradients are summed as a balanced tree
  in rank order (``pairwise.PairwiseSum``; across processes by an all-reduce SUM), then scaled by ``1 / world``: with
  power-of-two counts the same bits on 1 process x 4 ranks as on 2 x 2 (and as DDP's ``sum(g / P)`` on 2 x 1).

* the values its forward takes from every rank (``Distiller.exchange``: CRD's first-batch Z, SPOFA's mean
  statistics): a step whose method asks for them (``Distiller.takes_rank_means``) first runs every rank's forward
  as that rank, its generators and buffers restored afterwards, to collect them; their mean is then summed as
  DDP's all-reduce gives it (a balanced tree in rank order, across processes an all-reduce, over ``world``), and
  each rank's real forward takes it (:class:`EmulatedExchange`);
* the state every rank holds identically and changes with every rank's values (CRD's banks and Z, SPOFA's
  baselines; ``_same_on_every_rank``): one copy, changed once every rank of the step has run its forward, with
  every rank's values in rank order, as each DDP rank changes its own copy after an all-gather.

What cannot be emulated is refused before anything is written (:func:`check_layout`): ``train.sync_bn`` (the
statistics of every rank's slice at every layer, in one forward).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from hkdbench.benchmark.core.config import ConfigError, RunConfig
from hkdbench.benchmark.engine.dist_bn import RankBatchNorm
from hkdbench.benchmark.engine.distributed import ignored_names
from hkdbench.benchmark.engine.exchange import EmulatedExchange
from hkdbench.benchmark.engine.seeding import epoch_seed, rng_state, seed_everything, set_rng_state


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s model randomness where one rank would take ``seed`` (rank 0: ``seed`` itself)."""
    return seed if rank == 0 else (seed * 1_000_033 + rank) % (2 ** 63)


@dataclass(frozen=True)
class RankLayout:
    """Ranks ``process * per_process`` to ``(process + 1) * per_process - 1`` of ``world``, on this process."""
    world: int
    process: int = 0
    processes: int = 1

    @property
    def per_process(self) -> int:
        return self.world // self.processes

    @property
    def ranks(self) -> List[int]:
        return list(range(self.process * self.per_process, (self.process + 1) * self.per_process))

    @property
    def emulated(self) -> bool:
        return self.per_process > 1


def check_layout(cfg: RunConfig, processes: int, device: torch.device) -> None:
    """A clear error, before any write, where ``processes`` cannot run ``cfg``'s ranks as the reference did."""
    world = cfg.train.world
    if world % processes:
        raise ConfigError(f"train.world={world} ranks cannot be spread over {processes} processes: run a number of "
                          f"processes (GPUs) that divides {world} (each trains world / processes ranks in turn)")
    per_process = world // processes
    if per_process == 1:
        if cfg.train.sync_bn and torch.device(device).type != "cuda":
            raise ConfigError(f"train.sync_bn=true runs on CUDA GPUs only (torch's SyncBatchNorm), not on "
                              f"{torch.device(device).type}; leave it off here")
        return
    emulated = (f"train.world={world} on {processes} process(es) trains {per_process} ranks per process, one after "
                "another")
    if cfg.train.sync_bn:
        raise ConfigError(f"{emulated}, and train.sync_bn=true needs every rank's BatchNorm statistics at every layer "
                          f"in one forward, which ranks run in turn cannot give: run {world} processes (one per rank), "
                          "or leave train.sync_bn off")


def take_grads(params: Sequence[nn.Parameter]) -> List[Optional[torch.Tensor]]:
    """The parameters' gradients, which are taken off them (the next backward writes fresh ones)."""
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    return grads


class RankStates:
    """The ranks a process trains for one run: their model randomness, their per-rank buffers, what a rank other
    than 0 leaves of the shared ones, and the mean of their gradients. With one rank per process it only seeds
    (the process's generators are its rank's); with several it keeps every rank's state but the first's, which is
    in the global generators and the module, as with one rank."""

    def __init__(self, layout: RankLayout, module: nn.Module, device: torch.device,
                 bn: Optional[RankBatchNorm] = None):
        self.layout, self.module, self.device = layout, module, device
        self.bn = bn  # every rank's BatchNorm statistics, where train.dist_bn='reduce' averages them
        # kept identical on every rank by the method itself, through the exchange (CRD's banks): one copy here
        self.same_on_every_rank = set(ignored_names(module, "_same_on_every_rank"))
        self.per_rank = [n for n in ignored_names(module) if n not in self.same_on_every_rank]  # PAT's feedback
        self.exchange = EmulatedExchange(layout)  # Distiller.exchange where this process trains several ranks
        self._step_start: Optional[Dict[str, torch.Tensor]] = None  # the shared buffers as the step found them
        self._rngs: Dict[int, Any] = {}  # local index >= 1 -> its generators' state
        self._buffers: Dict[int, Dict[str, torch.Tensor]] = {
            j: {name: buf.clone() for name, buf in self._own_buffers().items()}
            for j in range(1, layout.per_process)}

    # -- randomness and per-rank state -------------------------------------------------------------------------

    def seed_epoch(self, seed: int, epoch: int) -> None:
        """Seeds every local rank's generators for ``epoch``; leaves the first one's in the global generators."""
        for j in reversed(range(self.layout.per_process)):
            seed_everything(rank_seed(epoch_seed(seed, epoch), self.layout.ranks[j]))
            if j:
                self._rngs[j] = rng_state(self.device)

    @contextlib.contextmanager
    def as_rank(self, j: int):
        """Runs the block as local rank ``j``: its generators and per-rank buffers swapped in (rank 0's stay where
        they are), the shared buffers as the step found them (DDP broadcasts rank 0's before every rank's forward)
        and put back afterwards unless it is global rank 0."""
        shared = None if self.layout.ranks[j] == 0 else self._shared_buffers()
        if shared is not None and self._step_start is not None:  # rank 0 ran before it here
            self._put(self._step_start)
        if j:
            first_rng, first_buffers = rng_state(self.device), self._swap_buffers(self._buffers[j])
            set_rng_state(self._rngs[j], self.device)
        try:
            yield
        finally:
            if j:
                self._rngs[j], self._buffers[j] = rng_state(self.device), self._swap_buffers(first_buffers)
                set_rng_state(first_rng, self.device)
            if shared is not None:
                self._put(shared)

    def begin_step(self) -> None:
        """Keeps the shared buffers as the step finds them where global rank 0 runs first here, for its other ranks
        (a rank's statistics after its micro-batch are then DDP's: what train.dist_bn='reduce' averages)."""
        first_is_zero = self.layout.emulated and self.layout.ranks[0] == 0
        self._step_start = self._shared_buffers() if first_is_zero else None

    @torch.no_grad()
    def _put(self, values: Dict[str, torch.Tensor]) -> None:
        for name, saved in values.items():
            self.module.get_buffer(name).copy_(saved)

    @contextlib.contextmanager
    def restoring(self):
        """Runs the block (a collecting pass) and puts back the generators and every buffer it may have changed
        (BatchNorm's, a rank's own), so the step's real pass starts from the same state."""
        rng = rng_state(self.device)
        saved = {name: buf.clone() for name, buf in self.module.named_buffers()
                 if name not in self.same_on_every_rank}
        try:
            yield
        finally:
            set_rng_state(rng, self.device)
            self._put(saved)

    def _own_buffers(self) -> Dict[str, torch.Tensor]:
        return {name: self.module.get_buffer(name) for name in self.per_rank}

    def _shared_buffers(self) -> Dict[str, torch.Tensor]:
        return {name: buf.clone() for name, buf in self._rank_zero_buffers()}

    def _rank_zero_buffers(self):
        """The buffers every rank takes from rank 0 (DDP's broadcast): neither a rank's own nor kept identical."""
        return [(name, buf) for name, buf in self.module.named_buffers()
                if name not in self.per_rank and name not in self.same_on_every_rank]

    def _swap_buffers(self, incoming: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        outgoing = self._own_buffers()
        for name, buf in incoming.items():
            owner, _, attr = name.rpartition(".")
            setattr(self.module.get_submodule(owner), attr, buf)
        return outgoing

    def local_states(self, first_rng: Dict[str, Any]) -> Dict[int, Dict[str, Any]]:
        """Every local rank's state by its rank (``first_rng``: the first's generators, which a cohort keeps)."""
        states = {self.layout.ranks[0]: {"rng": first_rng,
                                         "buffers": {k: v.detach().cpu() for k, v in self._own_buffers().items()}}}
        for j in range(1, self.layout.per_process):
            states[self.layout.ranks[j]] = {"rng": self._rngs.get(j),
                                            "buffers": {k: v.detach().cpu() for k, v in self._buffers[j].items()}}
        if self.bn is not None:
            for j, rank in enumerate(self.layout.ranks):
                states[rank]["ema_bn"] = self.bn.ema_state(j)
        return states

    def load(self, states: Dict[int, Dict[str, Any]]) -> Optional[Dict[str, Any]]:
        """Takes this process's ranks' states from a checkpoint's ``states`` (every rank's); returns the first local
        rank's generator state (None where the checkpoint has none: an epoch's end, which the next epoch re-seeds)."""
        for j, rank in enumerate(self.layout.ranks):
            buffers = {k: v.to(self.device) for k, v in states[rank]["buffers"].items() if k in self.per_rank}
            if j:
                self._rngs[j], self._buffers[j] = states[rank]["rng"], buffers
            else:
                self._swap_buffers(buffers)
            if self.bn is not None:
                self.bn.load_ema_state(j, states[rank].get("ema_bn"))
        return states[self.layout.ranks[0]]["rng"]

    # -- the step's collective parts ---------------------------------------------------------------------------

    def mean_gradients(self, params: Sequence[nn.Parameter], local_sum: List[Optional[torch.Tensor]]) -> None:
        """Sets each parameter's gradient to the mean over the ranks: the local sum, summed over the processes,
        times 1 / world. A parameter that no rank gave a gradient keeps none, as under DDP."""
        if self.layout.processes > 1:
            local_sum = _all_reduce_sum(params, local_sum, self.device)
        for p, g in zip(params, local_sum):
            p.grad = None if g is None else g.mul_(1.0 / self.layout.world)

    def sync_shared_buffers(self) -> None:
        """Every process takes process 0's shared buffers (rank 0's), as DDP's broadcast before the next forward."""
        if self.layout.processes <= 1:
            return
        with torch.no_grad():
            for _, buf in self._rank_zero_buffers():
                if buf.numel() == 0:
                    continue
                tmp = buf.detach().to(_collective_device())
                dist.broadcast(tmp, 0)
                if tmp.data_ptr() != buf.data_ptr():
                    buf.copy_(tmp)


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _all_reduce_sum(params, grads: List[Optional[torch.Tensor]], device) -> List[Optional[torch.Tensor]]:
    """The gradients summed over the processes in one flat all-reduce; None where no process had one."""
    comm = _collective_device()
    used = torch.tensor([0.0 if g is None else 1.0 for g in grads], device=comm)
    flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).to(comm) for p, g in zip(params, grads)])
    dist.all_reduce(flat)
    dist.all_reduce(used, op=dist.ReduceOp.MAX)
    summed, offset = [], 0
    for p, any_rank in zip(params, used.tolist()):
        part = flat[offset:offset + p.numel()].view_as(p).to(device)
        offset += p.numel()
        summed.append(part if any_rank else None)
    return summed
