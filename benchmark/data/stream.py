"""The training data stream: per step, one batch for each rank this process trains, its randomness keyed by
(seed, epoch, step, rank).

Every random draw of the pipeline (crops, flips, RandAugment, colour jitter, erasing, mixup/cutmix) is made under
the global RNGs re-seeded from (seed, epoch, step, rank) and put back afterwards, so it never touches (and is never
touched by) a model's own randomness: initialisation, dropout, drop-path, a method's sampling. Every run of a cell
therefore sees the same batches whatever its method, alone or in a cohort (paired comparisons: common random
numbers), and a run resumed mid-epoch sees the batches it would have seen. The epoch's order comes from (seed,
epoch) through its own generator (``loaders.epoch_permutation``).

Each rank of ``train.world`` (a real DDP process or one a process emulates, ``engine/ranks.py``) draws its own
numbers for its slice of the global batch, as timm's train.py seeds every rank apart: its own crops, flips,
RandAugment ops, erasing and mixup lambda. Rank 0's key is the key of before, so a one-rank run is unchanged.

The trainer reads the stream one batch ahead (:class:`Lookahead`): the next batch is drawn inside the current step,
once the step's work is queued on the device and before the step's one host read, so on a GPU the host issues the
next batch's augmentation while the device still runs the step. That changes no batch (each is a function of (seed,
epoch, step) alone) and no model's randomness (``keyed_rng`` puts back the states it finds, the member's inside its
step). The batched pipeline makes no host synchronisation per batch (``tests/test_host_sync.py`` counts them): a
draw that had to read the device would make the host wait for the step it is meant to overlap.
"""
from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch


@dataclass
class Targets:
    """Labels of a batch: ``hard`` class indices (B,), under mixup/cutmix ``soft`` label rows (B, C), and for a
    method that ``needs_sample_indices`` the training-set ``index`` (B,) of each row's (un-mixed) sample."""
    hard: torch.Tensor
    soft: Optional[torch.Tensor] = None
    index: Optional[torch.Tensor] = None


@dataclass
class Batch:
    """One training step's input: the images as the models get them (augmented, mixed, in the training memory
    format), the hard labels before mixing (train top-1 counts against them) and the method's targets."""
    images: torch.Tensor
    labels: torch.Tensor
    targets: Targets


def prepare_batch(images: torch.Tensor, labels: torch.Tensor, index: Optional[torch.Tensor] = None, mixup=None,
                  channels_last: bool = False) -> Batch:
    """Mixup/cutmix (with the erasing that follows it) and the memory format. ``index``: the samples'
    training-set indices, kept under mixup (row i mixes sample i, weight lambda, with its partner, as CRD's
    reference passes it)."""
    targets = Targets(hard=labels, index=index)
    if mixup is not None:
        images, soft = mixup(images, labels)
        targets = Targets(hard=soft.argmax(-1), soft=soft, index=index)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return Batch(images, labels, targets)


def step_seed(seed: int, epoch: int, step: int, rank: int = 0) -> int:
    """The seed of one rank's data draws at a step: distinct for every (seed, epoch, step, rank) a run can reach
    (rank 0's is the one-rank key, unchanged)."""
    key = ((seed * 1_000_003 + epoch) * 10_000_019 + step) % (2 ** 63)
    return key if rank == 0 else (key * 1_000_033 + rank) % (2 ** 63)


@contextlib.contextmanager
def keyed_rng(seed: int, epoch: int, step: int, device: torch.device, rank: int = 0):
    """Runs the block under Python's, NumPy's and torch's RNGs (CPU, and ``device`` when it is a GPU) seeded from
    (seed, epoch, step, rank); their previous states are put back after it."""
    key = step_seed(seed, epoch, step, rank)
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        random.seed(key)
        np.random.seed(key % 2 ** 32)
        torch.manual_seed(key)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class DataStream:
    """The batches of the training loaders of a run or a cohort, one loader per rank this process trains (``ranks``:
    their ranks in ``train.world``; default rank 0 of one): ``batches(epoch, start_step)`` yields ``(step, [Batch
    of each rank])`` from ``start_step`` to the epoch's end."""

    def __init__(self, loaders: Sequence, seed: int, device: torch.device, mixup=None, channels_last: bool = False,
                 with_index: bool = False, ranks: Sequence[int] = (0,)):
        if len(loaders) != len(ranks):
            raise ValueError(f"one loader per rank: {len(loaders)} loaders for ranks {list(ranks)}")
        self.loaders, self.ranks, self.seed, self.device = list(loaders), list(ranks), seed, device
        self.mixup, self.channels_last, self.with_index = mixup, channels_last, with_index

    def __len__(self) -> int:
        return len(self.loaders[0])

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[Tuple[int, List[Batch]]]:
        items = [loader.batches(self.seed, epoch, start_step, self.with_index) for loader in self.loaders]
        for step in range(start_step, len(self)):
            yield step, [self._next(rank_items, epoch, step, rank) for rank_items, rank in zip(items, self.ranks)]

    def _next(self, items, epoch: int, step: int, rank: int) -> Batch:
        with keyed_rng(self.seed, epoch, step, self.device, rank):  # the loader augments as it yields
            images, labels, *index = next(items)
            return prepare_batch(images, labels, index[0] if index else None, self.mixup, self.channels_last)

    def lookahead(self, epoch: int, start_step: int = 0) -> "Lookahead":
        """``batches(epoch, start_step)`` that can draw its next batch early (see :class:`Lookahead`)."""
        return Lookahead(self.batches(epoch, start_step))


_END = object()  # the epoch has no further batch


class Lookahead:
    """Iterates ``(step, batches)`` items (one batch per rank this process trains); ``draw_next()`` draws the next
    item now (at most one ahead), for the iteration to hand out when it gets there. The trainer calls it just before a
    step's host read: the device still has the step's work queued, so it never idles while the host draws and
    augments the next batch."""

    def __init__(self, items: Iterator[Tuple[int, List[Batch]]]):
        self._items = items
        self._ahead = None  # the next item drawn early, _END when there is none
        self._draw_seconds = 0.0  # host time spent in draw_next since take_draw_seconds

    def __iter__(self) -> "Lookahead":
        return self

    def __next__(self) -> Tuple[int, List[Batch]]:
        item, self._ahead = self._ahead, None
        if item is None:
            item = next(self._items, _END)
        if item is _END:
            raise StopIteration
        return item

    def draw_next(self) -> None:
        if self._ahead is None:
            tic = time.perf_counter()
            self._ahead = next(self._items, _END)
            self._draw_seconds += time.perf_counter() - tic

    def take_draw_seconds(self) -> float:
        """The host time spent drawing ahead since the last call (the step that drew it leaves it out of its own
        time)."""
        seconds, self._draw_seconds = self._draw_seconds, 0.0
        return seconds
