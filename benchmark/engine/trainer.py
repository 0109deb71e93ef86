"""The common training harness: one loop for every method, teacher runs included, and for cohorts.

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
"""
from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from hkdbench.methods import TrainingSet, check_method_code, get_method, method_source

from hkdbench.benchmark.data import loaders
from hkdbench.benchmark.core.config import PIPELINE_VERSION, RunConfig
from hkdbench.benchmark.models.taps import Features, TappedModel
from hkdbench.benchmark.models.zoo import create_model, zoo_entry
from hkdbench.benchmark.engine.environment import environment
from hkdbench.benchmark.core.store import LOSS_PREFIX, RunDir, RunStore, StoreWriteError, timestamp
from hkdbench.benchmark.engine.checkpoint import (_get_rng, _set_rng, atomic_torch_save, load_teacher_weights,
                                                  load_weights, save_weights)
from hkdbench.benchmark.data.stream import DataStream
from hkdbench.benchmark.engine.divergence import describe, nonfinite_losses, nonfinite_tensors
from hkdbench.benchmark.engine.evaluation import autocast_dtype, evaluate, select_device, use_channels_last
from hkdbench.benchmark.engine.teacher import TeacherRunError, load_teacher_run, refuse_failed
from hkdbench.benchmark.engine.step import TrainStep, _EpochSums, _make_ema, build_criterion, setup_training
from hkdbench.benchmark.core.errors import HkdbenchError

log = logging.getLogger("hkdbench")


class DivergedError(HkdbenchError, RuntimeError):
    """The loss became NaN or infinite; the run is marked FAILED."""


class TeacherUnavailableError(HkdbenchError, RuntimeError):
    """A stop request arrived while the teacher of this run was being trained (its checkpoint is saved)."""


class ProbeTeacherMissingError(HkdbenchError, RuntimeError):
    """A teacher run named by ``train.probe_teachers`` has not finished (nothing of the run is written)."""


@dataclass
class RunResult:
    status: str                      # 'done', 'interrupted', 'failed' (diverged), 'owned' (locked elsewhere)
    run_dir: RunDir
    summary: Optional[Dict[str, Any]] = None
    reason: Optional[str] = None     # why it failed


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------

class _Member:
    """One run of a cohort: its run directory, its models and optimiser (``ctx``), its history, its position in
    the stream (the epoch and step it trains next), its RNG (a model's own randomness) and its status."""

    def __init__(self, cfg: RunConfig, run_dir: RunDir, saved: Optional[Dict[str, Any]]):
        self.cfg, self.run_dir, self.saved = cfg, run_dir, saved
        self.status = "training"                 # 'training', 'done', 'failed', 'interrupted'
        self.result: Optional[RunResult] = None
        self.ctx: Optional[TrainStep] = None
        self.student: Optional[TappedModel] = None
        self.ema = None
        self.tracker = None
        self.state: Dict[str, Any] = {}
        self.rng: Optional[Dict[str, Any]] = None
        self.sums: Optional[_EpochSums] = None
        self.progress = None

    @property
    def name(self) -> str:
        return self.run_dir.path.name

    @property
    def position(self) -> Tuple[int, int]:
        return self.state["epoch"], self.state["step"]

    def trains_at(self, epoch: int, step: int) -> bool:
        return self.status == "training" and epoch < self.cfg.train.epochs and self.position <= (epoch, step)


class CohortTrainer:
    """Trains the runs of one cohort (``cohort.py``; one run is a cohort of one) on one data stream and one plain
    teacher pass per step. Each member keeps its own randomness and writes its own run directory, exactly as it
    would alone: the same metrics and weights, bit for bit on the CPU."""

    def __init__(self, cfgs: Sequence[RunConfig], store: RunStore, device: Optional[str] = None,
                 progress: Optional[bool] = None, should_stop: Callable[[], bool] = lambda: False, dist_ctx=None,
                 echo: bool = True):
        from hkdbench.benchmark.engine.cohort import check_cohort

        check_cohort(cfgs)
        self.cfgs, self.store = list(cfgs), store
        self.device = select_device(device)
        # a tqdm bar when the output is a terminal; else (a Slurm log, a redirect) a line every train.log_interval steps
        self.progress = sys.stdout.isatty() and sys.stderr.isatty() if progress is None else progress
        self.should_stop = should_stop
        self.dist = dist_ctx
        self.echo = echo
        self.run_dirs = [store.run_dir(cfg) for cfg in self.cfgs]
        self.log_dirs: List[RunDir] = []  # the logs of the runs being trained (a done run's log is left alone)
        self.early_lines: List[str] = []  # said while the teacher was prepared, before the runs' logs existed
        self.teacher: Tuple[Optional[TappedModel], Optional[float]] = (None, None)
        self.swap_rng = False  # several runs in training: each member's RNG state is swapped in for its work

    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.rank == 0

    @property
    def world_size(self) -> int:
        return self.dist.world_size if self.dist else 1

    def say(self, message: str, members: Optional[Sequence[_Member]] = None) -> None:
        """Logs, prints (``echo``) and appends the line to the log of each member (default: every run in training)."""
        if self.is_main:
            log.info(message)
            if self.echo:
                print(message, flush=True)
            if members is None and not self.log_dirs:  # before any run directory exists: kept for their logs
                self.early_lines.append(message)
            for rd in [m.run_dir for m in members] if members is not None else self.log_dirs:
                with open(rd.log_file, "a") as f:
                    f.write(message + "\n")

    # -- teacher --------------------------------------------------------------------------------------------------
    def prepare_teacher(self, cfg: RunConfig, num_classes: int, in_chans: int
                        ) -> Tuple[Optional[TappedModel], Optional[float]]:
        """The teacher of ``cfg`` and its top-1 (None when not yet known: a checkpoint's is measured later): its
        checkpoint or pretrained weights, or its teacher run's weights (the run trained first when missing). Called
        before any run directory of the cohort is written, so a teacher that cannot teach leaves nothing behind."""
        if cfg.teacher is None or not get_method(cfg.method).uses_teacher:
            return None, None
        as_is = cfg.teacher_recipe is None  # a checkpoint, or pretrained weights used as they are: no teacher run
        teacher = create_model(cfg.teacher.name, num_classes, in_chans=in_chans, img_size=cfg.data.img_size,
                               pretrained=cfg.teacher.pretrained if as_is else None,
                               pretrained_sha256=cfg.teacher.pretrained_sha256)
        if cfg.teacher.checkpoint:
            load_teacher_weights(teacher, cfg.teacher.checkpoint, cfg.teacher.checkpoint_ema)
        if as_is:
            return teacher.to(self.device), None
        from hkdbench.benchmark.engine.plan import teacher_settings_note
        from hkdbench.benchmark.recipes.resolve import teacher_run_config

        t_cfg = teacher_run_config(cfg)
        t_dir = self.store.run_dir(t_cfg)
        if note := teacher_settings_note(cfg, t_cfg):
            self.say(note)
        refuse_failed(t_dir)
        if not t_dir.is_done:
            self.say(f"teacher {cfg.teacher.name}: no finished run at {t_dir.path}; training it first")
            self._train_teacher_run(t_cfg, t_dir)
        which = cfg.teacher.weights
        recorded = load_teacher_run(teacher, t_dir, which)
        self.say(f"teacher {cfg.teacher.name}: the {which} weights of {t_dir.path.name} "
                 f"(epoch {recorded.get(f'{which}_epoch', '?')}, top-1 {recorded[f'{which}_top1']:.2f})")
        return teacher.to(self.device), recorded[f"{which}_top1"]

    def _train_teacher_run(self, t_cfg: RunConfig, t_dir: RunDir) -> None:
        trainer = Trainer(t_cfg, self.store, device=str(self.device), progress=self.progress,
                          should_stop=self.should_stop, dist_ctx=self.dist, echo=self.echo)
        try:
            result = trainer.run(resume=True)
        except DivergedError as err:
            raise TeacherRunError(f"teacher run {t_dir.path.name} FAILED ({err}); it cannot be a teacher, and the "
                                  "student run was not started. Change the teacher run's settings "
                                  "(teacher.<section>.<field>=value, e.g. teacher.optim.lr)") from None
        if result.status != "done":
            raise TeacherUnavailableError("interrupted while training the teacher")

    def _teacher_before_writes(self, restart: bool) -> Tuple[Optional[TappedModel], Optional[float]]:
        """The cohort's teacher, prepared before any of its run directories is written (nothing when every run is
        done already and none is restarted: no run will need it)."""
        user = next((c for c, rd in zip(self.cfgs, self.run_dirs) if get_method(c.method).uses_teacher and c.teacher
                     and (restart or not rd.is_done)), None)
        if user is None:
            return None, None
        from hkdbench.benchmark.data.datasets import dataset_info

        info = dataset_info(user.data.dataset)
        return self.prepare_teacher(user, info.num_classes, info.in_chans)

    def probe_teachers(self, cfg: RunConfig, num_classes: int, in_chans: int) -> Dict[str, TappedModel]:
        """Run name -> the best weights of each teacher run ``cfg`` is CKA-probed against (``train.probe_teachers``;
        main process only, as the probe is); each must have been trained on the run's dataset and resolution."""
        if not (cfg.train.probe_teachers and cfg.train.probe_every and self.is_main):
            return {}
        models = {}
        for name in cfg.train.probe_teachers:
            t_dir = RunDir(self.store.root / name)
            t_cfg = t_dir.config()
            if (t_cfg.data.dataset, t_cfg.data.img_size) != (cfg.data.dataset, cfg.data.img_size):
                raise ProbeTeacherMissingError(
                    f"{cfg.run_name()}: probe teacher {name} was trained on {t_cfg.data.dataset} at "
                    f"{t_cfg.data.img_size} px, this run on {cfg.data.dataset} at {cfg.data.img_size} px")
            teacher = create_model(t_cfg.student.name, num_classes, in_chans=in_chans, img_size=cfg.data.img_size)
            teacher.model.load_state_dict(load_weights(t_dir, "best"))
            models[name] = teacher.to(self.device).eval()
        return models

    # -- the cohort -----------------------------------------------------------------------------------------------
    def run(self, resume: bool = False, restart: bool = False, wait_for_lock: bool = True) -> List[RunResult]:
        """Trains every run under its flock (taken in name order, so two cohorts never wait on each other);
        ``wait_for_lock=False``: a run whose lock another process holds is left to it ('owned'), and a cohort of
        one raises RunLockedError."""
        from hkdbench.benchmark.engine.tracking import check_tracker_available
        from hkdbench.benchmark.core.store import RunLockedError

        from hkdbench.benchmark.engine.preflight import check_on_device

        # before any write: changed code, a missing tracker package or probe teacher, a setting the device cannot
        # run, a checkpoint without --resume (not found only after a teacher was trained for it); then the teacher
        for cfg, rd in zip(self.cfgs, self.run_dirs):
            check_method_code(cfg.method, cfg.method_code)
            check_tracker_available(cfg.train.log)
            check_on_device(cfg, self.device)
            if not resume and not restart and not rd.is_done and rd.has_checkpoint:
                raise unfinished_run_error(rd)
        check_probe_teachers(self.cfgs, self.store)
        self.teacher = self._teacher_before_writes(restart)
        results: Dict[str, RunResult] = {}
        with contextlib.ExitStack() as locks:
            held = []
            for cfg, rd in sorted(zip(self.cfgs, self.run_dirs), key=lambda pair: pair[1].path.name):
                try:
                    if self.is_main:  # under DDP only rank 0 holds the flocks (other ranks would wait forever)
                        locks.enter_context(rd.lock(wait=wait_for_lock))
                    held.append(cfg)
                except RunLockedError:
                    if len(self.cfgs) == 1:
                        raise
                    results[rd.path.name] = RunResult("owned", rd)
                except StoreWriteError:
                    if not rd.is_done or restart:
                        raise
                    results[rd.path.name] = self._done_read_only(rd)
            if held:
                for result in self._run_locked([c for c in self.cfgs if c in held], resume, restart):
                    results[result.run_dir.path.name] = result
        return [results[rd.path.name] for rd in self.run_dirs]

    def _done_read_only(self, rd: RunDir) -> RunResult:
        if self.echo:  # a read-only store: a finished run needs no write
            print(f"{rd.path.name}: already done (read-only store: nothing written)", flush=True)
        return RunResult("done", rd, rd.summary())

    def _open(self, cfg: RunConfig, resume: bool, restart: bool) -> _Member:
        """The member of one locked run: claimed, cleaned of stray temp files, reset on restart; done, or with its
        checkpoint read (a damaged one, or one without --resume, fails here, before any training)."""
        rd = self.store.run_dir(cfg)
        member = _Member(cfg, rd, None)
        try:
            if self.is_main:
                rd.claim(cfg)
                if removed := rd.remove_stray_temp_files():  # left by a kill mid-write; we hold the lock
                    self.say(f"{rd.path.name}: removed temp files left by an interrupted write: "
                             f"{', '.join(removed)}", [member])
            if restart and self.is_main:
                rd.reset()
        except StoreWriteError:
            if not rd.is_done or restart:
                raise
            member.status, member.result = "done", self._done_read_only(rd)
            return member
        if rd.is_done:
            self.say(f"{rd.path.name}: already done", [member])
            member.status, member.result = "done", RunResult("done", rd, rd.summary())
            return member
        if rd.has_checkpoint and not resume:
            raise unfinished_run_error(rd)
        member.saved = _read_checkpoint(rd, cfg, self.device) if rd.has_checkpoint else None
        return member

    def _run_locked(self, cfgs: List[RunConfig], resume: bool, restart: bool) -> List[RunResult]:
        members = [self._open(cfg, resume, restart) for cfg in cfgs]
        training = [m for m in members if m.status == "training"]
        if training:
            self._train(training)
        return [m.result for m in members]

    def _train(self, members: List[_Member]) -> None:
        self.log_dirs = [m.run_dir for m in members]
        if self.is_main:
            for m in members:  # the lines said while the teacher was prepared, in the order said
                with open(m.run_dir.log_file, "a") as f:
                    f.writelines(line + "\n" for line in self.early_lines)
        self.swap_rng = len(members) > 1
        first = members[0].cfg
        entry = zoo_entry(first.student.name)
        crop_pct = first.data.crop_pct or entry.crop_pct
        train_loader, test_loader, info = loaders.build_loaders(first.data, self.device, crop_pct,
                                                                 rank=self.dist.rank if self.dist else 0,
                                                                 world_size=self.world_size)
        if jitter_note := loaders.color_jitter_note(first.data.color_jitter, first.data.auto_augment):
            self.say(f"{', '.join(m.name for m in members)}: {jitter_note}", members)
        user = next((m.cfg for m in members if get_method(m.cfg.method).uses_teacher and m.cfg.teacher), None)
        if user and self.teacher[0] is None:  # a run another process reset since the checks: prepared now
            self.teacher = self.prepare_teacher(user, info.num_classes, info.in_chans)
        teacher, teacher_top1 = self.teacher if user else (None, None)
        channels_last = use_channels_last(first.train.channels_last, self.device)
        if teacher is not None and teacher_top1 is None and any(m.saved is None for m in members):
            dtype = autocast_dtype(first.train.precision, self.device)
            teacher_top1 = evaluate(teacher, test_loader, self.device, dtype, channels_last)["top1"]
            self.say(f"teacher {user.teacher.name}: top-1 {teacher_top1:.2f}", members)
        for m in members:
            self._build(m, teacher, teacher_top1, train_loader, test_loader, info, channels_last)
        if len(members) > 1:
            self.say(f"cohort of {len(members)} runs on one data stream"
                     + (f" and one {user.teacher.name} pass per step" if teacher is not None else "") + ": "
                     + ", ".join(m.name for m in members), members)
        stream = DataStream(train_loader, first.train.seed, self.device,
                            loaders.build_mixup(first.data, info.num_classes, first.optim.label_smoothing),
                            channels_last, any(get_method(m.cfg.method).needs_sample_indices for m in members))
        self._loop(members, stream, teacher, test_loader)

    def _build(self, m: _Member, teacher, teacher_top1, train_loader, test_loader, info, channels_last) -> None:
        """The member's student, method, optimiser, EMA, step, probes and tracker, its state from its checkpoint
        (or a fresh one, with env.json) and its RNG."""
        cfg = m.cfg
        uses_teacher = get_method(cfg.method).uses_teacher
        own_teacher = teacher if uses_teacher else None
        loaders.seed_everything(cfg.train.seed)  # the model's randomness: its initialisation first
        student = create_model(cfg.student.name, info.num_classes, in_chans=info.in_chans,
                               img_size=cfg.data.img_size, drop_path_rate=cfg.train.drop_path,
                               pretrained=cfg.student.pretrained, pretrained_sha256=cfg.student.pretrained_sha256)
        train_set = (TrainingSet(train_loader.all_labels()) if get_method(cfg.method).needs_sample_indices
                     else None)
        setup = setup_training(cfg.method, cfg.method_cfg, student, own_teacher, info.num_classes,
                               build_criterion(cfg), train_set, cfg.optim, cfg.train.precision, channels_last,
                               self.device, compile=cfg.train.compile)
        ema = _make_ema(student, cfg.train.ema_decay)
        wrapped = self.dist.wrap(setup.module, setup.method.find_unused_parameters) if self.dist else setup.module
        m.student, m.ema = student, ema
        m.state = {"epoch": 0, "step": 0, "history": [], "partial": None,
                   "teacher_top1": teacher_top1 if uses_teacher else None}
        if m.saved is not None:
            _load_checkpoint(m.saved, setup, ema)
            m.state.update({k: m.saved[k] for k in ("epoch", "step", "history", "partial", "rng", "teacher_top1")})
            self._check_kept_best(m)
            if self.is_main:  # the checkpoint's history is the truth: a kill may have cut off the metrics write
                m.run_dir.write_metrics(m.state["history"])
            m.saved = None
            self.say(f"{m.name}: resuming at epoch {m.state['epoch'] + 1}, step {m.state['step']}", [m])
        elif self.is_main:
            from hkdbench.benchmark.core.store import atomic_write_json
            atomic_write_json(m.run_dir.env_file, {**environment(self.device, self.world_size), **setup.environment(),
                                                   "global_batch": cfg.data.batch_size * self.world_size,
                                                   "lr": cfg.optim.lr, "channels_last": channels_last,
                                                   "autocast": str(setup.dtype) if setup.dtype else "fp32",
                                                   "method_source": method_source(cfg.method),
                                                   "pipeline": PIPELINE_VERSION,
                                                   "cohort": [rd.path.name for rd in self.run_dirs]})
        self.say(f"{m.name}: {cfg.method} {cfg.teacher.name if cfg.teacher else '-'} -> {cfg.student.name} "
                 f"on {cfg.data.dataset}, {cfg.train.epochs} epochs, {len(train_loader)} steps/epoch, "
                 f"device {self.device}{', ' + str(setup.dtype) if setup.dtype else ''}", [m])
        m.ctx = TrainStep(cfg.optim, cfg.train.epochs, len(train_loader), wrapped, setup.module, setup.method,
                          setup.optimizer, setup.scaler, self.device, ema, setup.dtype, channels_last)
        from hkdbench.benchmark.probes.hooks import build_probes
        m.ctx.probes = build_probes(cfg, student, own_teacher, test_loader, self.device, setup.dtype,
                                    channels_last, self.is_main,
                                    self.probe_teachers(cfg, info.num_classes, info.in_chans))
        # TensorBoard / W&B mirror of metrics.jsonl (train.log)
        from hkdbench.benchmark.engine.tracking import NullTracker, open_tracker

        m.tracker = (open_tracker(cfg, m.name, str(m.run_dir.tracking_dir), len(m.state["history"]))
                     if self.is_main else NullTracker())
        m.rng = _get_rng()

    # -- the loop -------------------------------------------------------------------------------------------------
    def _loop(self, members: List[_Member], stream: DataStream, teacher, test_loader) -> None:
        epochs = max(m.cfg.train.epochs for m in members)
        first_epoch = min(m.position for m in members)[0]
        for epoch in range(first_epoch, epochs):
            in_epoch = [m for m in members if m.status == "training" and m.position[0] <= epoch < m.cfg.train.epochs]
            if not in_epoch:
                continue
            for m in in_epoch:
                self._begin_epoch(m, epoch, stream)
            stopped_at = self._train_epoch(in_epoch, stream, teacher, epoch)
            if stopped_at is not None:
                for m in [m for m in members if m.status == "training"]:
                    self._stop(m, epoch, stopped_at)
                return
            for m in [m for m in in_epoch if m.status == "training"]:
                with self._rng_of(m):
                    self._end_epoch(m, epoch, test_loader)
        for m in [m for m in members if m.status == "training"]:  # killed after its last checkpoint, before DONE
            self._finish(m)

    def _begin_epoch(self, m: _Member, epoch: int, stream) -> None:
        start = m.state["step"] if epoch == m.state["epoch"] else 0
        m.sums = _EpochSums(m.state["partial"] if epoch == m.state["epoch"] else None)
        if start == 0:  # the model's randomness of the epoch; mid-epoch, the state the checkpoint kept
            loaders.seed_everything(m.cfg.train.seed * 100_003 + epoch)
            m.rng = _get_rng()
        else:
            m.rng = m.state["rng"]
            _set_rng(m.rng)
        m.state["epoch"], m.state["step"] = epoch, start
        # tqdm on a terminal (a cohort of one), a line every train.log_interval steps elsewhere
        from hkdbench.benchmark.engine.progress import EpochProgress

        m.progress = EpochProgress(epoch=epoch, epochs=m.cfg.train.epochs, steps=len(stream), start_step=start,
                                   interval=m.cfg.train.log_interval if self.is_main else 0,
                                   bar=self.progress and self.is_main and len(self.cfgs) == 1,
                                   say=lambda line, m=m: self.say(line if len(self.cfgs) == 1 else
                                                                  f"{m.cfg.method}: {line}", [m]))

    def _train_epoch(self, members: List[_Member], stream, teacher, epoch: int) -> Optional[int]:
        """Runs the epoch for ``members`` (each from its own step); returns the step to resume at if a stop was
        requested."""
        start = min(m.state["step"] for m in members)
        try:
            for step, batch in stream.batches(epoch, start):
                active = [m for m in members if m.trains_at(epoch, step)]
                tic = time.perf_counter()
                shared, users = self._teacher_pass(active, teacher, batch)
                share = (time.perf_counter() - tic) / max(len(users), 1)
                for m in active:
                    tic = time.perf_counter()
                    with self._rng_of(m):
                        values, correct = m.ctx.step(batch, epoch, step, shared)
                    total = sum(v for k, v in values.items() if k.startswith(LOSS_PREFIX))
                    if not math.isfinite(total):
                        self._fail_diverged(m, epoch, step, values)
                        continue
                    seconds = time.perf_counter() - tic + (share if m in users else 0.0)
                    m.sums.add(values, batch.labels.shape[0] * self.world_size, correct, seconds)
                    m.state["step"] = step + 1
                    m.progress.update(total, values["lr"], batch.labels.shape[0] * self.world_size)
                if not any(m.status == "training" for m in members):
                    return None
                if self.should_stop() and step + 1 < len(stream):
                    return step + 1
        finally:
            for m in members:
                if m.progress is not None:
                    m.progress.close()
        return None

    def _teacher_pass(self, active: List[_Member], teacher, batch) -> Tuple[Optional[Features], List[_Member]]:
        """The plain teacher pass of the step and the members that share it (None and none when fewer than two
        read one: a single reader runs it in its own step, as it always did)."""
        users = [m for m in active if m.ctx.method.uses_teacher and m.ctx.method.plain_teacher_stages() is not None]
        if teacher is None or len(users) < 2:
            return None, []
        stages = set().union(*(m.ctx.method.plain_teacher_stages() for m in users))
        return users[0].ctx.teacher_pass(batch.images, stages), users

    @contextlib.contextmanager
    def _rng_of(self, m: _Member):
        """Runs the block with the member's own RNG state (a model's randomness: dropout, drop-path, sampling)
        in the global generators, and keeps what the block leaves in them. A cohort of one needs no swap."""
        if not self.swap_rng:
            yield
            return
        _set_rng(m.rng)
        try:
            yield
        finally:
            m.rng = _get_rng()

    def _diverged(self, m: _Member, record: Dict[str, Any]) -> str:
        """What shows that the member diverged by the end of an epoch (its evaluation loss, its weights or its EMA's
        not finite), in words; empty when nothing does."""
        tensors = list(m.ctx.module.state_dict().items())
        if m.ema is not None:
            tensors += [(f"ema.{k}", v) for k, v in m.ema.module.state_dict().items()]
        return describe(nonfinite_losses(record), nonfinite_tensors(tensors))

    def _fail_diverged(self, m: _Member, epoch: int, step: int, values: Dict[str, float]) -> None:
        terms = {k[len(LOSS_PREFIX):]: v for k, v in values.items() if k.startswith(LOSS_PREFIX)}
        reason = f"non-finite loss at epoch {epoch + 1}, step {step}: " + ", ".join(
            f"{k}={v}" for k, v in terms.items())
        self._fail(m, reason, epoch=epoch + 1, step=step, losses=terms)

    def _fail(self, m: _Member, reason: str, **details: Any) -> None:
        """Marks the member FAILED with ``reason``: no summary, no DONE; the other members go on."""
        if self.is_main:
            m.run_dir.mark_failed(reason, **details)
        self.say(f"{m.name}: FAILED: {reason}", [m])
        m.status, m.result = "failed", RunResult("failed", m.run_dir, reason=reason)
        m.tracker.close()

    def _stop(self, m: _Member, epoch: int, step: int) -> None:
        """A stop request: the member's checkpoint at the cohort's step (a member that had not reached it keeps
        the checkpoint it has)."""
        if m.position == (epoch, step):
            with self._rng_of(m):
                self._save_checkpoint(m, epoch, step, m.sums)
            self.say(f"{m.name}: stop requested; checkpoint saved at epoch {epoch + 1}, step {step}", [m])
        m.tracker.close()
        m.status, m.result = "interrupted", RunResult("interrupted", m.run_dir)

    def _end_epoch(self, m: _Member, epoch: int, test_loader) -> None:
        history = m.state["history"]
        record = self._epoch_record(m, epoch, test_loader)
        history.append(record)
        if seen := self._diverged(m, record):
            if self.is_main:  # the epoch that diverged, for the record; its weights are kept nowhere
                m.run_dir.write_metrics(history)
            self._fail(m, f"diverged at the end of epoch {epoch + 1}: {seen}", epoch=epoch + 1,
                       losses=nonfinite_losses(record))
            return
        self._keep_best(m)  # before the checkpoint: a kill in between redoes this epoch
        m.state["epoch"], m.state["step"], m.state["partial"] = epoch + 1, 0, None
        self._save_checkpoint(m, epoch + 1, 0, None)
        if self.is_main:
            m.run_dir.write_metrics(history)
        m.tracker.log_epoch(record)
        line = _format_epoch(record, m.cfg.train.epochs)
        self.say(line if len(self.cfgs) == 1 else f"{m.name}: {line}", [m])
        if epoch + 1 == m.cfg.train.epochs:
            self._finish(m)

    def _finish(self, m: _Member) -> None:
        history, rd = m.state["history"], m.run_dir
        summary = self._summary(m)
        if self.is_main:
            rd.write_metrics(history)  # DONE never comes with metrics short of the final epoch
            save_weights(rd, "last", m.student.model.state_dict())
            if m.ema is not None:
                save_weights(rd, "last", m.ema.module.state_dict(), ema=True)
            rd.mark_done(summary)
        m.tracker.log_summary(summary)
        m.tracker.close()
        self.say(f"{rd.path.name}: done; best top-1 {summary['best_top1']:.2f} (epoch {summary['best_epoch']}), "
                 f"last {summary['last_top1']:.2f}", [m])
        m.status, m.result = "done", RunResult("done", rd, summary)

    def _epoch_record(self, m: _Member, epoch: int, test_loader) -> Dict[str, Any]:
        cfg, ctx, sums = m.cfg, m.ctx, m.sums
        record: Dict[str, Any] = {"epoch": epoch + 1}
        means, correct, images = sums.means(), float(sums.correct), sums.images / self.world_size
        if self.dist:  # the epoch of every rank, not rank 0's share alone (ranks see equal batch sizes)
            from hkdbench.benchmark.engine.distributed import reduce_sums

            keys = sorted(means)
            reduced = reduce_sums([means[k] for k in keys] + [correct, images])
            means = {k: v / self.world_size for k, v in zip(keys, reduced)}
            correct, images = reduced[-2], reduced[-1]
        record.update(means)
        record["lr"] = ctx.schedule.value(epoch, ctx.steps - 1)  # the epoch's lr (its last step's, per update)
        record["train_loss"] = sum(v for k, v in means.items() if k.startswith(LOSS_PREFIX))
        record["train_top1"] = 100.0 * correct / max(images, 1)
        record["epoch_time_s"] = sums.seconds
        record["images_per_s"] = sums.images / max(sums.seconds, 1e-9)
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
            ev = evaluate(ctx.module.student, test_loader, self.device, ctx.dtype, ctx.channels_last)
            record.update({"top1": ev["top1"], "top5": ev["top5"], "eval_loss": ev["loss"]})
            if m.ema is not None:
                ev = evaluate(m.ema.module, test_loader, self.device, ctx.dtype, ctx.channels_last)
                record.update({"ema_top1": ev["top1"], "ema_top5": ev["top5"]})
        if ctx.probes is not None:
            record.update(ctx.probes.epoch_values(epoch, epoch + 1 == cfg.train.epochs))
        return record

    def _keep_best(self, m: _Member) -> None:
        """Keeps the weights of the epoch just recorded as best.pt (best_ema.pt) when it beats every earlier
        evaluated epoch, as timm's CheckpointSaver keeps model_best (a tie keeps the earlier epoch)."""
        if not self.is_main:
            return
        history = m.state["history"]
        if best_record(history, "top1") is history[-1]:
            save_weights(m.run_dir, "best", m.student.model.state_dict())
        if m.ema is not None and best_record(history, "ema_top1") is history[-1]:
            save_weights(m.run_dir, "best", m.ema.module.state_dict(), ema=True)

    def _check_kept_best(self, m: _Member) -> None:
        """A checkpoint whose history has a best epoch comes with that epoch's weights (written before it)."""
        if not self.is_main:
            return
        for key, ema in (("top1", False), ("ema_top1", True)):
            best = best_record(m.state["history"], key)
            path = m.run_dir.weights_file("best", ema)
            if best is not None and not path.exists():
                raise DamagedCheckpointError(
                    f"{m.run_dir.checkpoint_file} records a best epoch {best['epoch']} but {path.name} is missing (a "
                    "checkpoint from before best weights were kept, or a deleted file); pass --restart to train the "
                    "run again")

    def _teacher_provenance(self, cfg: RunConfig) -> Dict[str, Any]:
        """Which teacher weights the run used: the best or last of a teacher run here, or a checkpoint file."""
        if cfg.teacher is None or not get_method(cfg.method).uses_teacher:
            return {"teacher_weights": None, "teacher_run": None}
        if cfg.teacher.checkpoint:
            return {"teacher_weights": "checkpoint", "teacher_run": None}
        if cfg.teacher_recipe is None:  # timm's pretrained weights, as they are
            return {"teacher_weights": f"pretrained:{cfg.teacher.pretrained}", "teacher_run": None}
        from hkdbench.benchmark.recipes.resolve import teacher_run_config

        return {"teacher_weights": cfg.teacher.weights, "teacher_run": teacher_run_config(cfg).run_name()}

    def _summary(self, m: _Member) -> Dict[str, Any]:
        cfg, rd, history = m.cfg, m.run_dir, m.state["history"]
        evaluated = [r for r in history if "top1" in r]
        best = best_record(history, "top1")
        last = evaluated[-1]
        summary = {
            "run": rd.path.name, "hash": cfg.run_hash(), "kind": cfg.kind, "method": cfg.method,
            "teacher": cfg.teacher.name if cfg.teacher else None, "student": cfg.student.name,
            "teacher_family": zoo_entry(cfg.teacher.name).family if cfg.teacher else None,
            "student_family": zoo_entry(cfg.student.name).family, "dataset": cfg.data.dataset,
            "recipe": cfg.recipe, "seed": cfg.train.seed, "epochs": cfg.train.epochs,
            # each accuracy is that of weights the run keeps: best.pt (best epoch by top-1) and final.pt
            "best_top1": best["top1"], "best_top5": best["top5"], "best_epoch": best["epoch"],
            "best_weights": rd.weights_file("best").name,
            "last_top1": last["top1"], "last_top5": last["top5"], "last_epoch": last["epoch"],
            "last_weights": rd.weights_file("last").name,
            "teacher_top1": m.state["teacher_top1"], **self._teacher_provenance(cfg),
            "student_params": m.student.deploy_parameter_count(),
            "method_extra_params": m.ctx.method.extra_parameter_count(),
            "train_time_s": sum(r["epoch_time_s"] for r in history),
            "images_per_s": float(np.mean([r["images_per_s"] for r in history])),
            "global_batch": cfg.data.batch_size * self.world_size, "device": str(self.device),
            "pipeline": PIPELINE_VERSION, "cohort_size": len(self.cfgs), "finished": timestamp(),
        }
        if "ema_top1" in last:
            ema_best = best_record(history, "ema_top1")
            summary.update({"ema_best_top1": ema_best["ema_top1"], "ema_best_epoch": ema_best["epoch"],
                            "ema_best_weights": rd.weights_file("best", ema=True).name,
                            "ema_last_top1": last["ema_top1"],
                            "ema_last_weights": rd.weights_file("last", ema=True).name})
        return summary

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def _save_checkpoint(self, m: _Member, epoch: int, step: int, sums: Optional[_EpochSums]) -> None:
        """The member's training state; its RNG is the one in the global generators (call under _rng_of)."""
        if not self.is_main:
            return
        ctx = m.ctx
        state = {
            "module": ctx.module.state_dict(), "optimizer": ctx.optimizer.state_dict(),
            "scaler": ctx.scaler.state_dict(), "ema": m.ema.state_dict() if m.ema is not None else None,
            "epoch": epoch, "step": step, "history": m.state["history"],
            "partial": sums.state() if sums is not None else None,
            "rng": _get_rng(), "teacher_top1": m.state["teacher_top1"], "config_hash": m.cfg.run_hash(),
        }
        atomic_torch_save(m.run_dir.checkpoint_file, state)


class Trainer(CohortTrainer):
    """Trains one run (its teacher first when needed): a cohort of one. A diverged run raises DivergedError."""

    def __init__(self, cfg: RunConfig, store: RunStore, device: Optional[str] = None,
                 progress: Optional[bool] = None, should_stop: Callable[[], bool] = lambda: False, dist_ctx=None,
                 echo: bool = True):
        super().__init__([cfg], store, device, progress, should_stop, dist_ctx, echo)
        self.cfg, self.run_dir = cfg, self.run_dirs[0]

    def run(self, resume: bool = False, restart: bool = False, wait_for_lock: bool = True) -> RunResult:
        """``wait_for_lock=False`` raises RunLockedError at once when another process holds the run's lock (a
        sweep's job for a run a racing sweep already trains)."""
        result = super().run(resume, restart, wait_for_lock)[0]
        if result.status == "failed":
            raise DivergedError(result.reason)
        return result


def _read_checkpoint(rd: RunDir, cfg: RunConfig, device) -> Dict[str, Any]:
    """The saved training state; a file that is empty, truncated or foreign is named with what to do."""
    path = rd.checkpoint_file
    what_to_do = ("start the run over with --restart (its progress is lost), or put back a good copy of the "
                  "file and --resume")
    if path.stat().st_size == 0:
        raise DamagedCheckpointError(f"{path} is empty (0 bytes: a disk fault or a copy cut short; hkdbench "
                                     f"itself writes it atomically); {what_to_do}")
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as err:  # a truncated zip, pickle garbage, ...: torch raises many kinds
        raise DamagedCheckpointError(f"{path} cannot be read ({type(err).__name__}: {err}); it is truncated "
                                     f"or not a checkpoint of this run; {what_to_do}") from None
    if not isinstance(state, dict) or state.get("config_hash") != cfg.run_hash():
        raise DamagedCheckpointError(f"{path} is not a checkpoint of this run (its config hash differs from "
                                     f"{cfg.run_hash()}); {what_to_do}")
    return state


def _load_checkpoint(state: Dict[str, Any], setup, ema) -> None:
    setup.module.load_state_dict(state["module"])
    setup.optimizer.load_state_dict(state["optimizer"])
    setup.scaler.load_state_dict(state["scaler"])
    if ema is not None and state["ema"] is not None:
        ema.load_state_dict(state["ema"])


class RunExistsError(HkdbenchError, RuntimeError):
    pass


def unfinished_run_error(rd: RunDir) -> RunExistsError:
    """The error of a run with a checkpoint opened without --resume or --restart."""
    return RunExistsError(f"{rd.path} has a checkpoint from an earlier, unfinished run; pass --resume to continue "
                          "it or --restart to start over")


def check_probe_teachers(cfgs: Sequence[RunConfig], store: RunStore) -> None:
    """Raises ProbeTeacherMissingError, before anything is written, when a run to train names a probe teacher run
    (``train.probe_teachers``) that has not finished and is not the cohort's own teacher (trained first)."""
    trained_here = {c.teacher_run for c in cfgs}
    for cfg in cfgs:
        missing = [name for name in cfg.train.probe_teachers
                   if name not in trained_here and not RunDir(store.root / name).is_done]
        if missing and not store.run_dir(cfg).is_done:
            raise ProbeTeacherMissingError(
                f"{cfg.run_name()}: train.probe_teachers names teacher run(s) with no finished run in "
                f"{store.root}: {', '.join(missing)}. Train them first (a sweep trains its teachers before its "
                f"students), or leave them out of train.probe_teachers")


class DamagedCheckpointError(HkdbenchError, RuntimeError):
    pass


def best_record(history: List[Dict[str, Any]], key: str = "top1") -> Optional[Dict[str, Any]]:
    """The first epoch record with the highest ``key`` among those evaluated (None before any): a later epoch
    must beat it strictly, as timm's CheckpointSaver replaces model_best only on a greater metric."""
    best = None
    for record in history:
        if key in record and (best is None or record[key] > best[key]):
            best = record
    return best


def _format_epoch(r: Dict[str, Any], epochs: int) -> str:
    terms = " ".join(f"{k[len(LOSS_PREFIX):]}={v:.4f}" for k, v in r.items() if k.startswith(LOSS_PREFIX))
    acc = f" top1={r['top1']:.2f} top5={r['top5']:.2f}" if "top1" in r else ""
    ema = f" ema_top1={r['ema_top1']:.2f}" if "ema_top1" in r else ""
    return (f"epoch {r['epoch']}/{epochs} {terms}{acc}{ema} lr={r['lr']:.2e} "
            f"time={r['epoch_time_s']:.1f}s {r['images_per_s']:.0f} img/s")


def train(cfg: RunConfig, runs_dir: Optional[str] = None, resume: bool = False, restart: bool = False,
          device: Optional[str] = None, progress: Optional[bool] = None, **kwargs) -> RunResult:
    """Trains one run (its teacher first when needed) in the run store at ``runs_dir``."""
    return Trainer(cfg, RunStore(runs_dir), device=device, progress=progress, **kwargs).run(resume, restart)



def train_cohort(cfgs: Sequence[RunConfig], runs_dir: Optional[str] = None, resume: bool = False,
                 restart: bool = False, device: Optional[str] = None, progress: Optional[bool] = None,
                 wait_for_lock: bool = True, **kwargs) -> List[RunResult]:
    """Trains the runs of one cohort (see cohort.py) in one process; one RunResult per run, in order. Status
    'done', 'interrupted' (a stop request: every member has a checkpoint at the same step), 'failed' (diverged;
    the others went on) or 'owned' (another process holds its lock, with ``wait_for_lock=False``)."""
    return CohortTrainer(cfgs, RunStore(runs_dir), device=device, progress=progress, **kwargs).run(
        resume, restart, wait_for_lock)
