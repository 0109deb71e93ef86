"""The training data stream: one batch per step, its randomness keyed by (seed, epoch, step).

Every random draw of the pipeline (crops, flips, RandAugment, colour jitter, erasing, mixup/cutmix) is made under
the global RNGs re-seeded from (seed, epoch, step) and put back afterwards, so it never touches (and is never
touched by) a model's own randomness: initialisation, dropout, drop-path, a method's sampling. Every run of a cell
therefore sees the same batches whatever its method, alone or in a cohort (paired comparisons: common random
numbers), and a run resumed mid-epoch sees the batches it would have seen. The epoch's order comes from (seed,
epoch) through its own generator (``loaders.epoch_permutation``).
"""
from __future__ import annotations

import contextlib
import random
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
