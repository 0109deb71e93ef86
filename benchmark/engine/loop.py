"""The training loop of a cohort: per step one batch of the shared stream and, when two or more members read it,
one plain teacher pass for all of them; then each member's step under its own RNG state. Per epoch and member: its
metrics line (evaluation at the evaluated epochs), its best weights, an atomic checkpoint. A stop request saves
every member at the same step; a member that diverges fails alone (under DDP, on every rank at the same step)."""
from __future__ import annotations

import contextlib
import math
import time

import torch.distributed
from typing import Callable, Dict, List, Optional, Tuple

from hkdbench.methods import get_method

from hkdbench.benchmark.core.config import RunConfig
from hkdbench.benchmark.data import loaders
from hkdbench.benchmark.data.stream import DataStream
from hkdbench.benchmark.engine.divergence import describe, nonfinite_losses, nonfinite_tensors
from hkdbench.benchmark.engine.evaluation import autocast_dtype, evaluate, use_channels_last
from hkdbench.benchmark.engine.lifecycle import RunLifecycle
from hkdbench.benchmark.engine.member import Member
from hkdbench.benchmark.engine.member_setup import build_member
from hkdbench.benchmark.engine.progress import EpochProgress
from hkdbench.benchmark.engine.records import (EpochSums, epoch_record, evaluation_fields, format_epoch, keep_best,
                                               run_summary, save_checkpoint)
from hkdbench.benchmark.engine.seeding import rng_state, set_rng_state
from hkdbench.benchmark.engine.teacher import teacher_provenance
from hkdbench.benchmark.engine.teacher_outputs import RecordedTeacher
from hkdbench.benchmark.models.taps import Features
from hkdbench.benchmark.models.zoo import zoo_entry
from hkdbench.benchmark.core.store import LOSS_PREFIX

TeacherFor = Callable[[RunConfig, object], Tuple[object, Optional[float]]]


class CohortLoop:
    """Trains the opened members of ``runs`` to their last epoch or a stop request. ``teacher_for(cfg, info)``: the
    cohort's teacher and its top-1 (None: measured here); ``progress``: a tqdm bar (a cohort of one on a terminal),
    else a line every ``train.log_interval`` steps."""

    def __init__(self, runs: RunLifecycle, teacher_for: TeacherFor, progress: bool,
                 should_stop: Callable[[], bool]):
        self.runs, self.teacher_for, self.progress, self.should_stop = runs, teacher_for, progress, should_stop
        self.alone = len(runs.cfgs) == 1
        self.swap_rng = False  # several runs in training: each member's RNG state is swapped in for its work
        self.val_loader = None  # the images data.val_split holds out (the cohort's members share the split)

    def train(self, members: List[Member]) -> None:
        runs = self.runs
        runs.start_logs(members)
        self.swap_rng = len(members) > 1
        first = members[0].cfg
        train_loaders, test_loader, info = self._loaders(first, members)
        self.val_loader = self._val_loader(first)
        train_loader = train_loaders[0]
        user = next((m.cfg for m in members if get_method(m.cfg.method).uses_teacher and m.cfg.teacher), None)
        teacher, teacher_top1 = self.teacher_for(user, info) if user else (None, None)
        channels_last = use_channels_last(first.train.channels_last, runs.device)
        if teacher is not None and teacher_top1 is None and any(m.saved is None for m in members):
            dtype = autocast_dtype(first.train.precision, runs.device)
            teacher_top1 = evaluate(teacher, test_loader, runs.device, dtype, channels_last)["top1"]
            runs.say(f"teacher {user.teacher.name}: top-1 {teacher_top1:.2f}", members)
        for m in members:
            build_member(m, runs, teacher, teacher_top1, (train_loader, test_loader, info), channels_last)
        if len(members) > 1:
            runs.say(f"cohort of {len(members)} runs on one data stream"
                     + (f" and one {user.teacher.name} pass per step" if teacher is not None else "") + ": "
                     + ", ".join(m.name for m in members), members)
        stream = DataStream(train_loaders, first.train.seed, runs.device,
                            loaders.build_mixup(first.data, info.num_classes, first.optim.label_smoothing),
                            channels_last, any(get_method(m.cfg.method).needs_sample_indices for m in members),
                            ranks=runs.layout(first).ranks)
        self._epochs(members, stream, teacher, test_loader)

    def _loaders(self, first: RunConfig, members: List[Member]):
        """The cohort's training loaders (one per rank this process trains: its members share the data settings
        and train.world), its evaluation loader and its dataset's info."""
        runs, layout = self.runs, self.runs.layout(first)
        crop_pct = first.data.crop_pct or zoo_entry(first.student.name).crop_pct
        built = loaders.build_rank_loaders(first.data, runs.device, crop_pct, layout.ranks, layout.world,
                                           layout.process, layout.processes)
        if jitter_note := loaders.color_jitter_note(first.data.color_jitter, first.data.auto_augment):
            runs.say(f"{', '.join(m.name for m in members)}: {jitter_note}", members)
        return built

    def _val_loader(self, first: RunConfig):
        layout = self.runs.layout(first)
        crop_pct = first.data.crop_pct or zoo_entry(first.student.name).crop_pct
        return loaders.build_val_loader(first.data, self.runs.device, crop_pct, layout.process, layout.processes)

    def _epochs(self, members: List[Member], stream: DataStream, teacher, test_loader) -> None:
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

    def _begin_epoch(self, m: Member, epoch: int, stream) -> None:
        start = m.state["step"] if epoch == m.state["epoch"] else 0
        m.sums = EpochSums(m.state["partial"] if epoch == m.state["epoch"] else None)
        if start == 0:  # each rank's model randomness of the epoch; mid-epoch, the state the checkpoint kept
            m.ranks.seed_epoch(m.cfg.train.seed, epoch)
            m.rng = rng_state(self.runs.device)
        else:
            m.rng = m.state["rng"]
            set_rng_state(m.rng, self.runs.device)
        m.state["epoch"], m.state["step"] = epoch, start
        is_main = self.runs.is_main
        m.progress = EpochProgress(epoch=epoch, epochs=m.cfg.train.epochs, steps=len(stream), start_step=start,
                                   interval=m.cfg.train.log_interval if is_main else 0,
                                   bar=self.progress and is_main and self.alone,
                                   say=lambda line, m=m: self.runs.say(line if self.alone else
                                                                       f"{m.cfg.method}: {line}", [m]))

    def _train_epoch(self, members: List[Member], stream, teacher, epoch: int) -> Optional[int]:
        """Runs the epoch for ``members`` (each from its own step); returns the step to resume at if a stop was
        requested."""
        start = min(m.state["step"] for m in members)
        world = members[0].cfg.train.world  # a cohort's members share it (cohort.stream_key)
        try:
            lookahead = stream.lookahead(epoch, start)  # each step draws the next batch before its host read
            for step, batches in lookahead:  # one batch per rank this process trains
                active = [m for m in members if m.trains_at(epoch, step)]
                tic = time.perf_counter()
                shared, users = self._teacher_passes(active, teacher, batches, epoch, step)
                share = (time.perf_counter() - tic) / max(len(users), 1)
                outcomes = [self._member_step(m, lookahead, batches, epoch, step, shared, share if m in users else 0.0)
                            for m in active]
                self._count_step(active, outcomes, epoch, step, batches[0].labels.shape[0] * world)
                if not any(m.status == "training" for m in members):
                    return None
                if self.should_stop() and step + 1 < len(stream):
                    return step + 1
        finally:
            for m in members:
                if m.progress is not None:
                    m.progress.close()
        return None

    def _teacher_passes(self, active: List[Member], teacher, batches, epoch: int, step: int
                        ) -> Tuple[Optional[List[Features]], List[Member]]:
        """The plain teacher pass of each rank's batch of the step and the members that share them (None and none
        when fewer than two read one: a single reader runs it in its own step, as it always did). A cohort that
        reads stored outputs takes them from the store for every reader."""
        users = [m for m in active if m.ctx.method.uses_teacher and m.ctx.method.plain_teacher_stages() is not None]
        if isinstance(teacher, RecordedTeacher):
            return (teacher.outputs.features(epoch, step, self.runs.layout(active[0].cfg).ranks), users) \
                if users else (None, [])
        if teacher is None or len(users) < 2:
            return None, []
        stages = set().union(*(m.ctx.method.plain_teacher_stages() for m in users))
        return [users[0].ctx.teacher_pass(batch.images, stages) for batch in batches], users

    @contextlib.contextmanager
    def _rng_of(self, m: Member):
        """Runs the block with the member's own RNG state (a model's randomness: dropout, drop-path, sampling)
        in the global generators, and keeps what the block leaves in them. A cohort of one needs no swap."""
        if not self.swap_rng:
            yield
            return
        set_rng_state(m.rng, self.runs.device)
        try:
            yield
        finally:
            m.rng = rng_state(self.runs.device)

    def _member_step(self, m: Member, lookahead, batches, epoch: int, step: int, shared: Optional[List[Features]],
                     teacher_share: float) -> Tuple[Dict[str, float], int, float]:
        """The member's step under its RNG: its host values, correct count and seconds (its share of the
        cohort's teacher pass included, the next batch's draw made inside its step left out)."""
        tic = time.perf_counter()
        with self._rng_of(m):
            values, correct = m.ctx.step_ranks(batches, epoch, step, shared, before_read=lookahead.draw_next)
        return values, correct, time.perf_counter() - tic - lookahead.take_draw_seconds() + teacher_share

    def _count_step(self, active: List[Member], outcomes, epoch: int, step: int, images: int) -> None:
        """Each member's step added to its epoch, or the member FAILED where its loss is not finite on some rank:
        decided by every rank together after the cohort's step, so that all ranks fail the same members at the same
        step and keep pairing the same members' collectives."""
        totals = [sum(v for k, v in values.items() if k.startswith(LOSS_PREFIX)) for values, _, _ in outcomes]
        diverged_on = self._first_rank([not math.isfinite(total) for total in totals])
        for m, (values, correct, seconds), total, rank in zip(active, outcomes, totals, diverged_on):
            if rank is not None:
                self._fail_diverged(m, epoch, step, values, rank)
                continue
            m.sums.add(values, images, correct, seconds)
            m.state["step"] = step + 1
            m.progress.update(total, values["lr"], images)
            m.step_log.add(values, epoch, step, images, seconds)

    def _first_rank(self, flags: List[bool]) -> List[Optional[int]]:
        """For each flag, the lowest rank where it is set (None: nowhere); the same on every rank under DDP."""
        dist = self.runs.dist
        return dist.first_rank(flags) if dist is not None else [0 if flag else None for flag in flags]

    def _on_rank(self, value, rank: int, text: str) -> Tuple[object, str]:
        """``value`` as rank ``rank`` saw it, and ``text`` that says which rank that was (nothing in one process)."""
        dist = self.runs.dist
        if dist is None:
            return value, text
        return dist.from_rank(value, rank), f"{text} on rank {rank} of {dist.world_size}"

    def _fail_diverged(self, m: Member, epoch: int, step: int, values: Dict[str, float], rank: int) -> None:
        values, where = self._on_rank(values, rank, f"at epoch {epoch + 1}, step {step}")
        terms = {k[len(LOSS_PREFIX):]: v for k, v in values.items() if k.startswith(LOSS_PREFIX)}
        reason = f"non-finite loss {where}: " + ", ".join(f"{k}={v}" for k, v in terms.items())
        self.runs.fail(m, reason, epoch=epoch + 1, step=step, losses=terms)

    def _stop(self, m: Member, epoch: int, step: int) -> None:
        """A stop request: the member's checkpoint at the cohort's step (a member that had not reached it keeps
        the checkpoint it has)."""
        saved = m.position == (epoch, step)
        if saved:
            with self._rng_of(m):
                ranks = self._rank_states(m)
                if self.runs.is_main:
                    save_checkpoint(m, epoch, step, m.sums, ranks)
        self.runs.stopped(m, epoch, step, saved)

    def _end_epoch(self, m: Member, epoch: int, test_loader) -> None:
        runs, history = self.runs, m.state["history"]
        record = epoch_metrics(m, epoch, self.runs, test_loader, self.val_loader)
        history.append(record)
        seen = divergence_seen(m, record)
        (rank,) = self._first_rank([bool(seen)])  # a rank's own buffers (PAT's feedback) may diverge alone
        if rank is not None:
            seen, where = self._on_rank(seen, rank, f"at the end of epoch {epoch + 1}")
            if runs.is_main:  # the epoch that diverged, for the record; its weights are kept nowhere
                m.run_dir.write_metrics(history)
            runs.fail(m, f"diverged {where}: {seen}", epoch=epoch + 1, losses=nonfinite_losses(record))
            return
        m.state["epoch"], m.state["step"], m.state["partial"] = epoch + 1, 0, None
        ranks = self._rank_states(m)
        if runs.is_main:
            keep_best(m)  # before the checkpoint: a kill in between redoes this epoch
            save_checkpoint(m, epoch + 1, 0, None, ranks)
            m.run_dir.write_metrics(history)
        m.tracker.log_epoch(record, (epoch + 1) * m.ctx.steps)
        line = format_epoch(record, m.cfg.train.epochs)
        runs.say(line if self.alone else f"{m.name}: {line}", [m])
        if epoch + 1 == m.cfg.train.epochs:
            self._finish(m)

    def _rank_states(self, m: Member) -> Optional[Dict[int, object]]:
        """Every rank's own state (``ranks.RankStates``) on every process, for a checkpoint; None with one rank. Called
        by every process at the same point, with the member's generators in place."""
        if m.cfg.train.world == 1:
            return None
        mine = m.ranks.local_states(rng_state(self.runs.device))
        if self.runs.dist is None:
            return mine
        parts = [None] * self.runs.world_size
        torch.distributed.all_gather_object(parts, mine)
        return {rank: state for part in parts for rank, state in part.items()}

    def _finish(self, m: Member) -> None:
        runs = self.runs
        summary = run_summary(m, teacher_provenance(m.cfg), runs.device, len(runs.cfgs))
        runs.finish(m, summary)


def epoch_metrics(m: Member, epoch: int, runs: RunLifecycle, test_loader, val_loader) -> Dict[str, object]:
    """The member's metrics line of an epoch: its training sums, the student's and the EMA's scores on the test set
    and the validation split (``val_loader``; None: none) at an evaluated epoch, the probes' values."""
    cfg, ctx = m.cfg, m.ctx
    lr = ctx.schedule.value(epoch, ctx.steps - 1)  # the epoch's lr (its last step's, per update)
    record = epoch_record(epoch, m.sums, lr, runs.world_size, runs.dist is not None)
    if m.ranks.bn is not None:  # train.dist_bn='reduce': timm's distribute_bn after every epoch
        m.ranks.bn.reduce_model()
    if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
        student, ema = ctx.module.student, (m.ema.module if m.ema is not None else None)

        def score(model, loader):  # None: no EMA, or no validation split
            if model is None or loader is None:
                return None
            return evaluate(model, loader, runs.device, ctx.dtype, ctx.channels_last)
        scores, val = score(student, test_loader), score(student, val_loader)
        if m.ranks.bn is not None:  # ... and the EMA's before its evaluation
            m.ranks.bn.reduce_ema()
        record.update(evaluation_fields(scores, score(ema, test_loader), val, score(ema, val_loader)))
    if ctx.probes is not None:
        record.update(ctx.probes.epoch_values(epoch, epoch + 1 == cfg.train.epochs))
    return record


def divergence_seen(m: Member, record: Dict[str, object]) -> str:
    """What shows that the member diverged by the end of an epoch (its evaluation loss, its weights or its EMA's
    not finite), in words; empty when nothing does."""
    tensors = list(m.ctx.module.state_dict().items())
    if m.ema is not None:
        tensors += [(f"ema.{k}", v) for k, v in m.ema.module.state_dict().items()]
    return describe(nonfinite_losses(record), nonfinite_tensors(tensors))
