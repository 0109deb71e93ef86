"""A model's randomness (initialisation, dropout, drop-path, a method's sampling) in the global generators of
Python, NumPy and torch: seeded for a run and for each epoch, and its state taken and put back (a mid-epoch
checkpoint keeps it; a cohort swaps each member's in for its turn). The data's randomness is not here: the stream
keys its own by (seed, epoch, step) (``data/stream.py``), so a model's draws never shift the batches."""
from __future__ import annotations

import random
from typing import Any, Dict, Optional

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of a run's model randomness in ``epoch`` (its initialisation takes ``seed`` itself)."""
    return seed * 100_003 + epoch


def rng_state(device: Optional[torch.device] = None) -> Dict[str, Any]:
    """The generators' states; with a CUDA ``device`` (the one the run uses) its generator's too, and no other
    GPU's: another GPU's draws are not the run's, and a resume may see fewer GPUs."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = [torch.cuda.get_rng_state(device)]
    return state


def set_rng_state(state: Dict[str, Any], device: Optional[torch.device] = None) -> None:
    """Puts back a :func:`rng_state`. Its CUDA state (the first of its list: the run's device; a checkpoint of older
    code holds one per GPU it saw, the run's first) goes to ``device`` when that is a CUDA device, and is left
    unused on a CPU, whatever GPUs the saving process had."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    saved = state.get("cuda") or []
    if saved and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(saved[0].cpu(), device)
