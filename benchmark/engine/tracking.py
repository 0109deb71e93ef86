"""Experiment trackers: ``train.log=tensorboard`` or ``train.log=wandb`` mirrors every epoch record of
``metrics.jsonl`` (per-term losses, statistics, accuracies, lr, throughput, probes) under the same keys, and every
per-step record of ``steps.jsonl`` (engine/step_log.py: every ``train.log_interval`` steps) under ``step/`` and the
same keys, with the run's name, hash and config. The run store stays the source of truth: a tracker only shows what
the store already holds.

The x axes: in TensorBoard, the epoch for the epoch records and the global step (optimiser steps done) for the
per-step ones. W&B wants one increasing step: both are logged at the global step (an epoch's record at its last
step), and W&B's own charts plot each epoch key against ``epoch`` and each ``step/`` key against ``step/step``.

Files go to the run's ``tracking/`` folder (TensorBoard's events; W&B's local files, synced later with
``wandb sync`` when offline). W&B runs offline by default on a Slurm node (``SLURM_JOB_ID`` set), where compute
nodes rarely reach the internet; ``WANDB_MODE`` set by the user wins. On resume the same W&B run continues (its id
comes from the run's hash; W&B's history cannot be rewound: it refuses, with a warning, a step below the last it
holds, so steps a killed attempt logged past its checkpoint keep their first values) and TensorBoard drops the events
a killed attempt logged past the resumed step, so no step or epoch shows twice there.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
from typing import Any, Dict, Mapping

from hkdbench.benchmark.core.config import RunConfig
from hkdbench.benchmark.core.errors import HkdbenchError
from hkdbench.benchmark.core.store import STEP_KEY, STEP_PREFIX

# train.log value -> (module to import, extra that installs it)
_NEEDS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


class TrackerUnavailableError(HkdbenchError, RuntimeError):
    """The tracker's package is not installed."""


def check_tracker_available(kind: str) -> None:
    """Raises before anything is written when ``train.log`` names a tracker whose package is missing."""
    if kind not in _NEEDS:
        return
    module, extra = _NEEDS[kind]
    if importlib.util.find_spec(module) is None:
        raise TrackerUnavailableError(f"train.log={kind} needs the {module} package, which is not installed: "
                                      f"pip install 'hkdbench[{extra}]' (or pip install {module}), or train.log=none")


def scalars(record: Mapping[str, Any]) -> Dict[str, float]:
    """The numeric values of an epoch or step record, without its position (a probe that could not be computed is
    None: left out)."""
    return {k: float(v) for k, v in record.items() if k not in ("epoch", STEP_KEY)
            and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def step_scalars(record: Mapping[str, Any]) -> Dict[str, float]:
    """A per-step record's values by their tracker tags (``step/loss/kd``, ``step/lr``, ...)."""
    return {STEP_PREFIX + k: v for k, v in scalars(record).items()}


class NullTracker:
    def log_epoch(self, record: Mapping[str, Any], global_step: int) -> None:
        """An epoch record of metrics.jsonl, logged once the run has done ``global_step`` optimiser steps."""

    def log_step(self, record: Mapping[str, Any]) -> None:
        """A per-step record of steps.jsonl (its STEP_KEY: the optimiser steps done)."""

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(NullTracker):
    def __init__(self, cfg: RunConfig, run_name: str, log_dir: str, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: the reader hides every event at a larger step that a killed attempt logged past its last
        # checkpoint (``start_step`` optimiser steps done; the epoch events' x, an epoch count, never exceeds it), and
        # on a fresh start every event of an attempt killed before its first checkpoint
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=start_step + 1 if start_step else 0)
        if not start_step:
            self.writer.add_text("run", f"{run_name} (hash {cfg.run_hash()})", 0)
            self.writer.add_text("config", "```\n" + json.dumps(cfg.to_dict(), indent=2, default=str) + "\n```", 0)

    def log_epoch(self, record: Mapping[str, Any], global_step: int) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, record["epoch"])
        self.writer.flush()

    def log_step(self, record: Mapping[str, Any]) -> None:
        for key, value in step_scalars(record).items():
            self.writer.add_scalar(key, value, record[STEP_KEY])
        self.writer.flush()  # watched live: the events reach the file at every record, as the epoch's do

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        for key in ("best_top1", "best_top5", "last_top1", "teacher_top1"):
            if isinstance(summary.get(key), (int, float)):
                self.writer.add_scalar(f"summary/{key}", summary[key], summary.get("epochs", 0))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def wandb_mode() -> str:
    """W&B's mode: the user's WANDB_MODE, else offline on a Slurm node, else online."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "offline" if os.environ.get("SLURM_JOB_ID") else "online"


class WandbTracker(NullTracker):
    def __init__(self, cfg: RunConfig, run_name: str, log_dir: str):
        import wandb

        os.makedirs(log_dir, exist_ok=True)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "hkdbench"), name=run_name, id=f"hkdbench-{cfg.run_hash()}",
            resume="allow", dir=log_dir, mode=wandb_mode(), config={**cfg.to_dict(), "run_hash": cfg.run_hash()},
            tags=[cfg.kind, cfg.method, cfg.data.dataset], settings=wandb.Settings(console="off", silent=True))
        self.run.define_metric("epoch")
        self.run.define_metric(STEP_PREFIX + STEP_KEY)
        self.run.define_metric(STEP_PREFIX + "*", step_metric=STEP_PREFIX + STEP_KEY)
        self.epoch_keys: set = set()

    def log_epoch(self, record: Mapping[str, Any], global_step: int) -> None:
        values = scalars(record)
        for key in values.keys() - self.epoch_keys:  # W&B's charts: the epoch as their x
            self.run.define_metric(key, step_metric="epoch")
        self.epoch_keys |= values.keys()
        self.run.log({**values, "epoch": int(record["epoch"])}, step=global_step)

    def log_step(self, record: Mapping[str, Any]) -> None:
        self.run.log({**step_scalars(record), STEP_PREFIX + STEP_KEY: record[STEP_KEY]}, step=record[STEP_KEY])

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        for key in ("best_top1", "best_top5", "best_epoch", "last_top1", "last_top5", "teacher_top1"):
            if summary.get(key) is not None:
                self.run.summary[key] = summary[key]

    def close(self) -> None:
        self.run.finish()


def open_tracker(cfg: RunConfig, run_name: str, log_dir: str, start_step: int = 0) -> NullTracker:
    """The tracker ``cfg.train.log`` asks for; ``start_step`` is the number of optimiser steps already done (the
    run's checkpoint's)."""
    check_tracker_available(cfg.train.log)
    if cfg.train.log == "tensorboard":
        return TensorBoardTracker(cfg, run_name, os.path.join(log_dir, "tensorboard"), start_step)
    if cfg.train.log == "wandb":
        return WandbTracker(cfg, run_name, log_dir)
    return NullTracker()
