"""The per-step record of a run: every ``train.log_interval`` steps (and at an epoch's last step, where the progress
line is printed too) the step's own loss terms, the method's statistics, the lr, the training loss and the images/s
since the previous record, appended to the run's ``steps.jsonl`` and sent to its tracker at the run's global step.

It reads only the host values the step has already read (``TrainStep._read_values``: the step's one host
synchronisation), so logging adds none. It is how a run is watched, not what it computes: ``train.log_interval``
is outside the run's hash. Under DDP the main process logs its own ranks' values (the per-epoch record holds every
rank's mean)."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from hkdbench.benchmark.core.store import LOSS_PREFIX, STAT_PREFIX, STEP_KEY, RunDir


def step_record(values: Mapping[str, float], epoch: int, step: int, steps_per_epoch: int,
                images_per_s: float) -> Dict[str, Any]:
    """The record of step ``step`` (0-based) of epoch ``epoch`` (0-based): at STEP_KEY the optimiser steps done."""
    record: Dict[str, Any] = {STEP_KEY: epoch * steps_per_epoch + step + 1, "epoch": epoch + 1}
    record.update({k: float(v) for k, v in values.items() if k.startswith((LOSS_PREFIX, STAT_PREFIX))})
    record["train_loss"] = sum(v for k, v in record.items() if k.startswith(LOSS_PREFIX))
    record["lr"] = float(values["lr"])
    record["images_per_s"] = images_per_s
    return record


class StepLog:
    """One member's per-step log. ``run_dir``: where steps.jsonl goes (None on a process other than the main one);
    ``tracker``: its tracking.NullTracker (or TensorBoard's, W&B's)."""

    def __init__(self, run_dir: Optional[RunDir], tracker, interval: int, steps_per_epoch: int):
        self.run_dir, self.tracker = run_dir, tracker
        self.interval, self.steps_per_epoch = interval, steps_per_epoch
        self.images, self.seconds = 0, 0.0  # since the previous record

    def logs_at(self, step: int) -> bool:
        """Whether step ``step`` (0-based) of an epoch is recorded: the steps a progress line is printed at."""
        done = step + 1
        return self.interval > 0 and (done % self.interval == 0 or done == self.steps_per_epoch)

    def add(self, values: Mapping[str, float], epoch: int, step: int, images: int, seconds: float) -> None:
        """A step counted by the trainer: its host values, its images (every rank's) and its seconds."""
        self.images += images
        self.seconds += seconds
        if not self.logs_at(step):
            return
        record = step_record(values, epoch, step, self.steps_per_epoch, self.images / max(self.seconds, 1e-9))
        self.images, self.seconds = 0, 0.0
        if self.run_dir is not None:
            self.run_dir.append_steps([record])
        self.tracker.log_step(record)
