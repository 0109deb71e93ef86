"""What a probe is (:class:`Probe`) and what it is given (:class:`ProbedRun`); the registry and the trainer's driver
are in ``hooks.py``."""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, Optional, Tuple

import torch


@dataclass(frozen=True)
class ProbedRun:
    """The run a probe measures: its config, its models (``teacher`` None for the student alone), its test loader and
    how the trainer runs the models (device, autocast context or None, channels_last); ``is_main``: this process
    writes the records; ``probe_teachers``: run name -> loaded teacher, for a run without a teacher of its own."""
    cfg: Any
    student: Any
    teacher: Any
    test_loader: Any
    device: torch.device
    autocast: Optional[Callable[[], Any]] = None
    channels_last: bool = False
    is_main: bool = True
    probe_teachers: Optional[Dict[str, Any]] = None


class Probe(abc.ABC):
    """One measurement taken during training and logged into ``metrics.jsonl``. It draws no random numbers and
    touches no ``.grad``, so switching it on does not change the training trajectory."""

    name: ClassVar[str]
    measures: ClassVar[str]             # one line: what it measures
    keys: ClassVar[Tuple[str, ...]]     # the metric keys it writes (``<...>`` marks a part that varies)
    # True: its on_losses differentiates the step's losses before the step's own backward (autograd.grad with
    # retain_graph), so a compiled step must keep its saved tensors for a second backward (engine/step.py)
    retains_graph: ClassVar[bool] = False

    def __init__(self, run: ProbedRun) -> None:
        self.run = run

    @staticmethod
    @abc.abstractmethod
    def enabled(cfg) -> bool:
        """Whether the run's config switches it on (its cadence field)."""

    @property
    def active(self) -> bool:
        """Whether it can measure anything in this process (e.g. a probe needing a teacher, in a run without one)."""
        return True

    def measures_step(self, global_step: int) -> bool:
        """Whether :meth:`on_losses` is called on this step."""
        return False

    def on_losses(self, losses: Dict[str, torch.Tensor], global_step: int, scaler=None) -> None:
        """Inside the step, after the forward pass and before ``backward()``; a probe whose :meth:`measures_step` can be
        true provides it."""
        raise NotImplementedError(f"probe {self.name!r} measures steps but has no on_losses")

    def measures_epoch(self, epoch: int, last_epoch: bool) -> bool:
        """Whether :meth:`epoch_values` is called at the end of this epoch."""
        return True

    @abc.abstractmethod
    def epoch_values(self, epoch: int) -> Dict[str, Any]:
        """The values it adds to the epoch's record (``{}``: none this epoch)."""
