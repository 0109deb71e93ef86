"""A model's randomness (initialisation, dropout, drop-path, a method's sampling) in the global generators of
Python, NumPy and torch: seeded for a run and for each epoch, and its state taken and put back (a mid-epoch
checkpoint keeps it; a cohort swaps each member's in for its turn). The data's randomness is not here: the stream
keys its own by (seed, epoch, step) (``data/stream.py``), so a model's draws never shift the batches."""
from __future__ import annotations

import random
from typing import Any, Dict

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of a run's model randomness in ``epoch`` (its initialisation takes ``seed`` itself)."""
    return seed * 100_003 + epoch


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
