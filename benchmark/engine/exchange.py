"""What a method's forward takes from every rank (``Distiller.exchange``) where a process trains several ranks of
``train.world`` in turn (``benchmark/engine/ranks.py``), given as DDP's collectives give them to one process per rank.

A step runs in two passes when the method asks for a mean over the ranks (``Distiller.takes_rank_means``):

1. **collecting**: every local rank's forward, as that rank (its generators and buffers restored afterwards), only
   to record the values it asks the mean of; what it asks to change is dropped;
2. **the step**: every local rank's forward and backward; its i-th :meth:`EmulatedExchange.mean` returns the i-th
   mean of pass 1, summed as DDP's all-reduce sums it: the local ranks' values as a balanced tree in rank order
   (:class:`~hkdbench.benchmark.engine.pairwise.PairwiseSum`), the processes' sums by an all-reduce, over ``world``
   (2 ranks: (a + b) / 2 as gloo's; 4 on 1 or 2 processes: ((a + b) + (c + d)) / 4 both).

A change of the state every rank holds (:meth:`EmulatedExchange.update_shared`: CRD's banks and Z, SPOFA's baselines)
waits until every local rank has run its forward, so each reads the state as the step found it, as each DDP rank
reads its own copy; it is then applied once, with every rank's values concatenated in rank order (across processes by
an all-gather), the tensors a DDP rank's all-gather gives.
"""
from __future__ import annotations

import contextlib
from typing import Callable, List, Tuple

import torch
import torch.distributed as dist

from hkdbench.methods import RankExchange

from hkdbench.benchmark.engine.pairwise import PairwiseSum


class EmulatedExchange(RankExchange):
    """The exchange of the ranks one process trains in turn (``layout``: a ``ranks.RankLayout``)."""

    def __init__(self, layout):
        self.layout = layout
        self._collecting = False
        self._records: List[List[torch.Tensor]] = []  # per local rank of pass 1: the values it asked the mean of
        self._means: List[torch.Tensor] = []
        self._asked = 0  # means the current rank has taken in pass 2
        self._updates: List[List[Tuple[Callable[..., None], Tuple[torch.Tensor, ...]]]] = []  # per local rank

    # -- what the method calls -------------------------------------------------------------------------------------

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self._collecting:
            self._records[-1].append(value.detach().clone())
            return value  # pass 1's results are dropped
        if self._asked >= len(self._means):
            raise RuntimeError("the method took a mean over the ranks in a step it did not announce "
                               "(Distiller.takes_rank_means), or more than its collecting pass took")
        self._asked += 1
        return self._means[self._asked - 1].to(value.dtype)

    def update_shared(self, update: Callable[..., None], *values: torch.Tensor) -> None:
        if not self._collecting:
            self._updates[-1].append((update, tuple(v.detach() for v in values)))

    # -- what the step calls ---------------------------------------------------------------------------------------

    def begin_step(self) -> None:
        self._records, self._means, self._updates = [], [], []

    @contextlib.contextmanager
    def collecting(self):
        """Pass 1 for the next local rank."""
        self._collecting = True
        self._records.append([])
        try:
            yield
        finally:
            self._collecting = False

    def settle_means(self) -> None:
        """The means of pass 1's values over every rank of train.world (the sum over processes: one all-reduce)."""
        counts = {len(r) for r in self._records}
        if len(counts) != 1:
            raise RuntimeError(f"the ranks asked for different numbers of means over the ranks ({sorted(counts)}): "
                               "a method's forward must ask for the same ones on every rank")
        tree = PairwiseSum()
        for values in self._records:
            tree.add(list(values))
        sums = tree.total()
        if self.layout.processes > 1 and sums:
            packed = torch.cat([v.reshape(-1) for v in sums]).to(_collective_device())
            dist.all_reduce(packed)
            parts = packed.split([v.numel() for v in sums])
            sums = [p.to(v.device).view_as(v) for p, v in zip(parts, sums)]
        self._means = [total / self.layout.world for total in sums]

    def next_rank(self) -> None:
        """Pass 2 for the next local rank."""
        self._asked = 0
        self._updates.append([])

    def finish_step(self) -> None:
        """The changes the ranks asked for, each once: with values, every rank's concatenated in rank order."""
        if len({len(u) for u in self._updates}) > 1:
            raise RuntimeError("the ranks asked for different changes of the state they share: a method's forward "
                               "must ask for the same ones on every rank")
        for slot in zip(*self._updates):
            update, values = slot[0]
            if not values:
                update()  # every rank asked for the same change (the exchange's rules)
                continue
            local = [torch.cat([v[i] for _, v in slot]) for i in range(len(values))]
            update(*(_all_processes(t) if self.layout.processes > 1 else t for t in local))
        self._updates = []


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _all_processes(x: torch.Tensor) -> torch.Tensor:
    """``x`` of every process concatenated along dim 0, in process (so rank) order."""
    comm = _collective_device()
    parts = [torch.empty_like(x, device=comm) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous().to(comm))
    return torch.cat(parts).to(x.device)
