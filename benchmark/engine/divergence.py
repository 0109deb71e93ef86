"""What a diverged run is: one rule for the trainer's own runs (each step's loss, each epoch's evaluation and
weights) and for the teacher runs a student would load."""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Mapping, Tuple

import torch

from hkdbench.benchmark.core.store import LOSS_PREFIX

# the values of an epoch record that a diverged run makes non-finite (accuracies are counts: always finite)
_LOSSES = ("train_loss", "eval_loss", "val_loss")


def nonfinite_losses(record: Mapping[str, Any]) -> Dict[str, float]:
    """The loss values of an epoch record (``train_loss``, ``eval_loss``, ``loss/<term>``) that are NaN or infinite."""
    return {k: v for k, v in record.items() if (k in _LOSSES or k.startswith(LOSS_PREFIX))
            and isinstance(v, (int, float)) and not math.isfinite(v)}


def nonfinite_tensors(named: Iterable[Tuple[str, torch.Tensor]]) -> List[str]:
    """The names of the floating-point tensors holding a NaN or an infinity (one host read when none does)."""
    floats = [(name, t) for name, t in named if t.is_floating_point()]
    if not floats:
        return []
    finite = torch.stack([torch.isfinite(t).all() for _, t in floats])
    if bool(finite.all()):
        return []
    return [name for (name, _), ok in zip(floats, finite.tolist()) if not ok]


def describe(losses: Mapping[str, float], tensors: List[str]) -> str:
    """What was seen, in words: ``eval_loss=nan; non-finite weights in 3 tensors (a, b, c)``."""
    parts = [", ".join(f"{k}={v}" for k, v in losses.items())] if losses else []
    if tensors:
        shown = ", ".join(tensors[:5]) + (", ..." if len(tensors) > 5 else "")
        parts.append(f"non-finite weights in {len(tensors)} tensor(s) ({shown})")
    return "; ".join(parts)
