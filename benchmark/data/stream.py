"""The training data stream: one batch per step, its randomness keyed by (seed, epoch, step).

Every random draw of the pipeline (crops, flips, RandAugment, colour jitter, erasing, mixup/cutmix) is made under
the global RNGs re-seeded from (seed, epoch, step) and put back afterwards, so it never touches (and is never
touched by) a model's own randomness: initialisation, dropout, drop-path, a method's sampling. Every run of a cell
therefore sees the same batches whatever its method, alone or in a cohort (paired comparisons: common random
numbers), and a run resumed mid-epoch sees the batches it would have seen. The epoch's order comes from (seed,
epoch) through its own generator (``loaders.epoch_permutation``).

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
from typing import Iterator, Optional, Tuple

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


def step_seed(seed: int, epoch: int, step: int) -> int:
    """The seed of one step's data draws: distinct for every (seed, epoch, step) a run can reach."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + step) % (2 ** 63)


@contextlib.contextmanager
def keyed_rng(seed: int, epoch: int, step: int, device: torch.device):
    """Runs the block under Python's, NumPy's and torch's RNGs (CPU, and ``device`` when it is a GPU) seeded from
    (seed, epoch, step); their previous states are put back after it."""
    key = step_seed(seed, epoch, step)
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
    """The batches of a training loader for a run or a cohort: ``batches(epoch, start_step)`` yields
    ``(step, Batch)`` from ``start_step`` to the epoch's end."""

    def __init__(self, loader, seed: int, device: torch.device, mixup=None, channels_last: bool = False,
                 with_index: bool = False):
        self.loader, self.seed, self.device = loader, seed, device
        self.mixup, self.channels_last, self.with_index = mixup, channels_last, with_index

    def __len__(self) -> int:
        return len(self.loader)

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[Tuple[int, Batch]]:
        items = self.loader.batches(self.seed, epoch, start_step, self.with_index)
        for step in range(start_step, len(self.loader)):
            with keyed_rng(self.seed, epoch, step, self.device):  # the loader augments as it yields
                images, labels, *index = next(items)
                batch = prepare_batch(images, labels, index[0] if index else None, self.mixup, self.channels_last)
            yield step, batch

    def lookahead(self, epoch: int, start_step: int = 0) -> "Lookahead":
        """``batches(epoch, start_step)`` that can draw its next batch early (see :class:`Lookahead`)."""
        return Lookahead(self.batches(epoch, start_step))


_END = object()  # the epoch has no further batch


class Lookahead:
    """Iterates ``(step, Batch)`` items; ``draw_next()`` draws the next item now (at most one ahead), for the
    iteration to hand out when it gets there. The trainer calls it just before a step's host read: the device still
    has the step's work queued, so it never idles while the host draws and augments the next batch."""

    def __init__(self, items: Iterator[Tuple[int, Batch]]):
        self._items = items
        self._ahead = None  # the next item drawn early, _END when there is none
        self._draw_seconds = 0.0  # host time spent in draw_next since take_draw_seconds

    def __iter__(self) -> "Lookahead":
        return self

    def __next__(self) -> Tuple[int, Batch]:
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
