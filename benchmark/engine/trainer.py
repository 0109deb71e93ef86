"""The common training harness: one loop for every method, teacher runs included, and for cohorts; the engine's
entry points :func:`train` (one run) and :func:`train_cohort`.

A cohort (``cohort.py``) is a set of runs on one data stream: per step one batch is drawn (``data/stream.py``,
its randomness keyed by (seed, epoch, step)) and, when two or more members read it, the plain teacher pass runs
once for all of them (the union of their stages, without gradients). Then each member in turn: its distiller's
``training_step`` (student forward with taps, the teacher pass it needs), the sum of its terms, backward (with a
GradScaler under fp16), optional gradient clipping, the optimiser step, the student EMA, each under the member's
own RNG state (init, dropout, drop-path: a model's randomness never shifts the batches). One run is a cohort of
one. Per epoch and member: evaluation (student and EMA), one metrics line, an atomic checkpoint. A resumed run
continues bit for bit: a checkpoint taken mid-epoch (on a stop request such as Slurm's USR2; every member at the
same step) also stores the member's RNG state and the partial epoch's sums. A member that diverges (a non-finite
loss at a step; a non-finite evaluation loss or weights at the end of an epoch) is marked FAILED with its step or
epoch and the others go on; a member already done is skipped. The teacher is prepared (its run trained, loaded and
checked) before any run directory of the cohort is written.

The jobs, each in its module: the runs against the store (``lifecycle.py``), where the teacher comes from
(``teacher.py``), the loop (``loop.py``, its members built by ``member_setup.py``), what a run keeps
(``records.py``); :class:`CohortTrainer` puts them together.
"""
from __future__ import annotations

import sys
from typing import Callable, List, Optional, Sequence, Tuple

from hkdbench.methods import get_method

from hkdbench.benchmark.core.config import ConfigError, RunConfig
from hkdbench.benchmark.core.store import RunStore
from hkdbench.benchmark.data.datasets import dataset_info
from hkdbench.benchmark.engine.cohort import check_cohort, cohort_reads_stored, reads_stored
from hkdbench.benchmark.engine.evaluation import select_device
from hkdbench.benchmark.engine.lifecycle import DivergedError, RunExistsError, RunLifecycle, unfinished_run_error
from hkdbench.benchmark.engine.loop import CohortLoop
from hkdbench.benchmark.engine.member import RunResult
from hkdbench.benchmark.engine.plan import teacher_settings_note
from hkdbench.benchmark.engine.teacher import (ProbeTeacherMissingError, TeacherRunError, TeacherUnavailableError,
                                               TeacherSource, check_probe_teachers, ensure_teacher_run,
                                               load_for_student, teacher_source)
from hkdbench.benchmark.engine.teacher_outputs import RecordedTeacher, check_can_store, ensure_outputs
from hkdbench.benchmark.models.taps import TappedModel

# the entry points' results and errors, importable from here with them
__all__ = ["CohortTrainer", "train", "train_cohort", "RunResult", "DivergedError", "RunExistsError",
           "TeacherUnavailableError", "ProbeTeacherMissingError", "check_probe_teachers", "unfinished_run_error"]

Teacher = Tuple[Optional[TappedModel], Optional[float]]


class CohortTrainer:
    """Trains the runs of one cohort (one run is a cohort of one) on one data stream and one plain teacher pass per
    step. Each member keeps its own randomness and writes its own run directory, exactly as it would alone: the
    same metrics and weights, bit for bit on the CPU."""

    def __init__(self, cfgs: Sequence[RunConfig], store: RunStore, device: Optional[str] = None,
                 progress: Optional[bool] = None, should_stop: Callable[[], bool] = lambda: False, dist_ctx=None,
                 echo: bool = True):
        check_cohort(cfgs)
        self.runs = RunLifecycle(cfgs, store, select_device(device), dist_ctx, echo)
        # a tqdm bar when the output is a terminal; else (a Slurm log, a redirect) a line every train.log_interval steps
        self.progress = sys.stdout.isatty() and sys.stderr.isatty() if progress is None else progress
        self.should_stop = should_stop
        self.teacher: Teacher = (None, None)

    def run(self, resume: bool = False, restart: bool = False, wait_for_lock: bool = True) -> List[RunResult]:
        """Trains every run under its flock; ``wait_for_lock=False``: a run whose lock another process holds is
        left to it ('owned'), and a cohort of one raises RunLockedError."""
        self.runs.check_before_writes(resume, restart)
        self.teacher = self._teacher_before_writes(restart)
        return self.runs.under_locks(lambda cfgs: self._train_locked(cfgs, resume, restart), restart, wait_for_lock)

    def _train_locked(self, cfgs: List[RunConfig], resume: bool, restart: bool) -> List[RunResult]:
        members = [self.runs.open(cfg, resume, restart) for cfg in cfgs]
        training = [m for m in members if m.status == "training"]
        if training:
            CohortLoop(self.runs, self._teacher_for, self.progress, self.should_stop).train(training)
        return [m.result for m in members]

    # -- the teacher ----------------------------------------------------------------------------------------------
    def prepare_teacher(self, cfg: RunConfig, num_classes: int, in_chans: int) -> Teacher:
        """The teacher of ``cfg`` on the device and its top-1 (None when not yet known), its teacher run trained
        first when missing. Called before any run directory of the cohort is written, so a teacher that cannot
        teach leaves nothing behind."""
        source = teacher_source(cfg)
        if source is None:
            return None, None
        if source.is_run and (note := teacher_settings_note(cfg, source.run_config)):
            self.runs.say(note)
        if self._reads_stored():
            return self._stored_teacher(source, num_classes, in_chans)
        return self._live_teacher(source, num_classes, in_chans)

    def _reads_stored(self) -> bool:
        """The cohort reads stored teacher outputs when every member that uses the teacher does; else the teacher
        runs live, and the members that asked for stored outputs share its pass (the same numbers)."""
        users = [c for c in self.runs.cfgs if teacher_source(c) is not None]
        if any(c.train.teacher_outputs == "stored" for c in users) and not cohort_reads_stored(users):
            live = sorted({c.method for c in users if not reads_stored(c)})
            self.runs.say(f"train.teacher_outputs=stored: {', '.join(live)} needs the live teacher (it reads more "
                          "than its logits or pre-logits, probes it, or asked for it live), so this cohort runs the "
                          "teacher live")
        return cohort_reads_stored(users)

    def _live_teacher(self, source: TeacherSource, num_classes: int, in_chans: int) -> Teacher:
        teacher, top1 = load_for_student(source, self.runs.store, num_classes, in_chans, self.runs.say,
                                         self._train_teacher_run)
        return teacher.to(self.runs.device), top1

    def _stored_teacher(self, source: TeacherSource, num_classes: int, in_chans: int) -> Teacher:
        """A stand-in teacher that hands out the stored outputs (train.teacher_outputs=stored), computed first where
        missing or damaged: the live teacher is built only then, and let go before training."""
        runs = self.runs
        if source.is_run:
            ensure_teacher_run(source, runs.store, runs.say, self._train_teacher_run)
        readers = [c for c in runs.cfgs if reads_stored(c)]
        epochs = max(c.train.epochs for c in readers)
        check_can_store(readers, runs.dist is not None, runs.store, runs.device, epochs)
        outputs = ensure_outputs(readers, runs.store, runs.device, epochs,
                                 lambda: self._live_teacher(source, num_classes, in_chans), runs.say)
        return RecordedTeacher(outputs).to(runs.device), outputs.teacher_top1

    def _train_teacher_run(self, t_cfg: RunConfig) -> None:
        trainer = CohortTrainer([t_cfg], self.runs.store, device=str(self.runs.device), progress=self.progress,
                                should_stop=self.should_stop, dist_ctx=self.runs.dist, echo=self.runs.echo)
        (result,) = trainer.run(resume=True)
        if result.status == "failed":
            raise TeacherRunError(f"teacher run {result.run_dir.path.name} FAILED ({result.reason}); it cannot be a "
                                  "teacher, and the student run was not started. Change the teacher run's settings "
                                  "(teacher.<section>.<field>=value, e.g. teacher.optim.lr)")
        if result.status != "done":
            raise TeacherUnavailableError("interrupted while training the teacher")

    def _teacher_before_writes(self, restart: bool) -> Teacher:
        """The cohort's teacher, prepared before any of its run directories is written (nothing when every run is
        done already and none is restarted: no run will need it)."""
        user = next((c for c, rd in zip(self.runs.cfgs, self.runs.run_dirs)
                     if get_method(c.method).uses_teacher and c.teacher and (restart or not rd.is_done)), None)
        if user is None:
            return None, None
        info = dataset_info(user.data.dataset)
        return self.prepare_teacher(user, info.num_classes, info.in_chans)

    def _teacher_for(self, cfg: RunConfig, info) -> Teacher:
        """The teacher prepared before the writes, or prepared now for a run another process reset since then."""
        if self.teacher[0] is None:
            self.teacher = self.prepare_teacher(cfg, info.num_classes, info.in_chans)
        return self.teacher


def train(cfg: RunConfig, runs_dir: Optional[str] = None, resume: bool = False, restart: bool = False,
          device: Optional[str] = None, progress: Optional[bool] = None, **kwargs) -> RunResult:
    """Trains one run (its teacher first when needed) in the run store at ``runs_dir``: a cohort of one. A diverged
    run raises DivergedError."""
    (result,) = train_cohort([cfg], runs_dir, resume, restart, device, progress, **kwargs)
    if result.status == "failed":
        raise DivergedError(result.reason)
    return result


def train_cohort(cfgs: Sequence[RunConfig], runs_dir: Optional[str] = None, resume: bool = False,
                 restart: bool = False, device: Optional[str] = None, progress: Optional[bool] = None,
                 wait_for_lock: bool = True, **kwargs) -> List[RunResult]:
    """Trains the runs of one cohort (see cohort.py) in one process; one RunResult per run, in order. Status
    'done', 'interrupted' (a stop request: every member has a checkpoint at the same step), 'failed' (diverged;
    the others went on) or 'owned' (another process holds its lock, with ``wait_for_lock=False``)."""
    return CohortTrainer(cfgs, RunStore(runs_dir), device=device, progress=progress, **kwargs).run(
        resume, restart, wait_for_lock)


def compute_teacher_outputs(cfgs: Sequence[RunConfig], runs_dir: Optional[str] = None, device: Optional[str] = None,
                            echo: bool = True):
    """``hkdbench teacher-outputs``: the stored teacher outputs that ``cfgs`` read (one cohort's), their missing
    epochs computed (the teacher run trained first when needed), no run of ``cfgs`` trained. Returns them."""
    readers = [c for c in cfgs if reads_stored(c)]
    if not readers:
        raise ConfigError("none of these runs reads stored teacher outputs: a method that reads only the teacher's "
                          "logits or pre-logits (kd, dkd, dist, ofa, spofa, crd, hcd), a teacher, no CKA probe")
    trainer = CohortTrainer(readers, RunStore(runs_dir), device=device, progress=False, echo=echo)
    info = dataset_info(readers[0].data.dataset)
    teacher, _ = trainer.prepare_teacher(readers[0], info.num_classes, info.in_chans)
    return teacher.outputs
