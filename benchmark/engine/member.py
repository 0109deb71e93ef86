"""One run of a cohort while it trains (:class:`Member`) and what a run's training ends with (:class:`RunResult`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from hkdbench.benchmark.core.config import RunConfig
from hkdbench.benchmark.core.store import RunDir
from hkdbench.benchmark.engine.step import TrainStep
from hkdbench.benchmark.models.taps import TappedModel


@dataclass
class RunResult:
    status: str                      # 'done', 'interrupted', 'failed' (diverged), 'owned' (locked elsewhere)
    run_dir: RunDir
    summary: Optional[Dict[str, Any]] = None
    reason: Optional[str] = None     # why it failed


class Member:
    """One run of a cohort: its run directory, its models and optimiser (``ctx``), its history, its
    position in the stream (the epoch and step it trains next), its RNG (a model's own randomness) and its status."""

    def __init__(self, cfg: RunConfig, run_dir: RunDir, saved: Optional[Dict[str, Any]] = None):
        self.cfg, self.run_dir = cfg, run_dir
        self.saved = saved                       # the checkpoint it resumes from, until it is built
        self.status = "training"                 # 'training', 'done', 'failed', 'interrupted'
        self.result: Optional[RunResult] = None
        self.ctx: Optional[TrainStep] = None
        self.student: Optional[TappedModel] = None
        self.ema = None
        self.tracker = None
        self.step_log = None                     # its per-step records (step_log.StepLog)
        self.state: Dict[str, Any] = {}          # epoch, step, history, partial, teacher_top1 (records.RESUMED)
        self.rng: Optional[Dict[str, Any]] = None
        self.ranks = None                        # its ranks of train.world on this process (ranks.RankStates)
        self.sums = None                         # the running sums of the epoch in training (records.EpochSums)
        self.progress = None

    @property
    def name(self) -> str:
        return self.run_dir.path.name

    @property
    def position(self) -> Tuple[int, int]:
        return self.state["epoch"], self.state["step"]

    def trains_at(self, epoch: int, step: int) -> bool:
        return self.status == "training" and epoch < self.cfg.train.epochs and self.position <= (epoch, step)

    def end(self, status: str, **result: Any) -> None:
        """Ends the member's training with ``status`` (its RunResult's)."""
        self.status, self.result = status, RunResult(status, self.run_dir, **result)
