"""The probes' registry (:data:`PROBES`) and the trainer's driver (:class:`TrainingProbes`, from
:func:`build_probes`), which the trainer calls at three points: once after the models are built, inside the step
before ``backward()`` (``on_losses``), and when an epoch's record is written (``epoch_values``).

A probe is one :class:`~hkdbench.benchmark.probes.base.Probe` subclass in its own module of ``probes/`` plus one
line in :data:`PROBES` (and the config field that switches it on, in ``core/config.py``'s ``TrainConfig``). It
provides:

* ``name``, ``measures`` (one line: what it measures) and ``keys`` (the metric keys it writes; they must not clash
  with another probe's or with the trainer's own keys);
* ``enabled(cfg)``: whether the run's config switches it on; ``active``: whether it can measure in this process;
* when it runs: ``measures_step(global_step)`` for ``on_losses(losses, global_step, scaler)`` inside the step, and
  ``measures_epoch(epoch, last_epoch)`` for ``epoch_values(epoch)``, the values it adds to the epoch's record.

It is built from a :class:`~hkdbench.benchmark.probes.base.ProbedRun` (the config, the models, the test loader and
how the trainer runs the models). It must draw no random numbers and touch no ``.grad``, so that switching it on
leaves the training unchanged. Registered: CKA (``cka.py``) and gradient conflict (``conflict.py``); the records
hold their keys in this order.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Type

import torch

from hkdbench.benchmark.probes.base import Probe, ProbedRun
from hkdbench.benchmark.probes.cka import CKAProbe
from hkdbench.benchmark.probes.conflict import ConflictProbe

PROBES: Dict[str, Type[Probe]] = {cls.name: cls for cls in (CKAProbe, ConflictProbe)}


class TrainingProbes:
    """The probes of one run that its config switches on and that can measure in this process."""

    def __init__(self, cfg, student, teacher, test_loader, device, autocast=None, channels_last: bool = False,
                 is_main: bool = True, probe_teachers: Optional[Dict[str, Any]] = None):
        run = ProbedRun(cfg, student, teacher, test_loader, device, autocast, channels_last, is_main, probe_teachers)
        built = (cls(run) for cls in PROBES.values() if cls.enabled(cfg))
        self.probes: Dict[str, Probe] = {probe.name: probe for probe in built if probe.active}

    @property
    def active(self) -> bool:
        return bool(self.probes)

    @property
    def retains_graph(self) -> bool:
        """Whether a probe takes gradients of the step's losses before the step's backward (see Probe)."""
        return any(probe.retains_graph for probe in self.probes.values())

    def on_losses(self, losses: Dict[str, torch.Tensor], global_step: int, scaler=None) -> None:
        """Inside the step, before backward: the probes that measure this step."""
        for probe in self.probes.values():
            if probe.measures_step(global_step):
                probe.on_losses(losses, global_step, scaler)

    def epoch_values(self, epoch: int, last_epoch: bool) -> Dict[str, Any]:
        """When the epoch's record is written: what the probes that measure this epoch add to it."""
        out: Dict[str, Any] = {}
        for probe in self.probes.values():
            if probe.measures_epoch(epoch, last_epoch):
                out.update(probe.epoch_values(epoch))
        return out


def build_probes(cfg, student, teacher, test_loader, device, dtype=None, channels_last: bool = False,
                 is_main: bool = True, probe_teachers: Optional[Dict[str, Any]] = None) -> Optional[TrainingProbes]:
    """The run's probes, or None when none is on (the trainer then does nothing extra).
    ``probe_teachers``: run name -> loaded teacher, for a run without a teacher of its own."""
    if not any(cls.enabled(cfg) for cls in PROBES.values()):
        return None
    autocast = (lambda: torch.autocast(device_type=device.type, dtype=dtype)) if dtype is not None else None
    probes = TrainingProbes(cfg, student, teacher, test_loader, device, autocast, channels_last, is_main,
                            probe_teachers)
    return probes if probes.active else None
