"""Experiment trackers: ``train.log=tensorboard`` or ``train.log=wandb`` mirrors every epoch record of
``metrics.jsonl`` (per-term losses, statistics, accuracies, lr, throughput, probes) under the same keys, with the
epoch as the step, and the run's name, hash and config. The run store stays the source of truth: a tracker only
shows what the store already holds.

Files go to the run's ``tracking/`` folder (TensorBoard's events; W&B's local files, synced later with
``wandb sync`` when offline). W&B runs offline by default on a Slurm node (``SLURM_JOB_ID`` set), where compute
nodes rarely reach the internet; ``WANDB_MODE`` set by the user wins. On resume the same W&B run continues (its id
comes from the run's hash) and TensorBoard drops events at or after the resumed epoch, so no epoch shows twice.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
from typing import Any, Dict, Mapping

from hkdbench.benchmark.core.config import RunConfig
from hkdbench.benchmark.core.errors import HkdbenchError

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
    """The numeric values of an epoch record (a probe that could not be computed is None: left out)."""
    return {k: float(v) for k, v in record.items()
            if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class NullTracker:
    def log_epoch(self, record: Mapping[str, Any]) -> None:
        pass

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(NullTracker):
    def __init__(self, cfg: RunConfig, run_name: str, log_dir: str, start_epoch: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events a killed attempt logged for epochs after its last checkpoint are hidden
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=start_epoch + 1 if start_epoch else None)
        if not start_epoch:
            self.writer.add_text("run", f"{run_name} (hash {cfg.run_hash()})", 0)
            self.writer.add_text("config", "```\n" + json.dumps(cfg.to_dict(), indent=2, default=str) + "\n```", 0)

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, record["epoch"])
        self.writer.flush()

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

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        self.run.log(scalars(record), step=int(record["epoch"]))

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        for key in ("best_top1", "best_top5", "best_epoch", "last_top1", "last_top5", "teacher_top1"):
            if summary.get(key) is not None:
                self.run.summary[key] = summary[key]

    def close(self) -> None:
        self.run.finish()


def open_tracker(cfg: RunConfig, run_name: str, log_dir: str, start_epoch: int = 0) -> NullTracker:
    """The tracker ``cfg.train.log`` asks for; ``start_epoch`` is the number of epochs already recorded."""
    check_tracker_available(cfg.train.log)
    if cfg.train.log == "tensorboard":
        return TensorBoardTracker(cfg, run_name, os.path.join(log_dir, "tensorboard"), start_epoch)
    if cfg.train.log == "wandb":
        return WandbTracker(cfg, run_name, log_dir)
    return NullTracker()
