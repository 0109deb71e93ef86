"""The common training harness: one loop for every method, teacher runs included.

Per step: the distiller's ``training_step`` (student forward with taps, teacher forward once without
gradients, loss terms), the sum of the terms, backward (with a GradScaler under fp16), optional gradient
clipping, the optimiser step, the student EMA. Per epoch: evaluation (student and EMA), one metrics line, an
atomic checkpoint. A resumed run continues bit for bit: the data order and every random draw come from
(seed, epoch), and a checkpoint taken mid-epoch (on a stop request such as Slurm's USR2) also stores the RNG
states and the partial epoch's sums.
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

from hkdbench.methods import Distiller, TrainingSet, get_method

from hkdbench.benchmark.data import loaders
from hkdbench.benchmark.config import RunConfig
from hkdbench.benchmark.models.taps import TappedModel
from hkdbench.benchmark.models.zoo import create_model, zoo_entry
from hkdbench.benchmark.engine.environment import environment
from hkdbench.benchmark.store import RunDir, RunStore, StoreWriteError, timestamp
from hkdbench.benchmark.engine.checkpoint import (_get_rng, _set_rng, atomic_torch_save, load_teacher_weights,
                                                  load_weights, save_weights)
from hkdbench.benchmark.engine.evaluation import evaluate, select_device, use_channels_last
from hkdbench.benchmark.engine.step import TrainStep, _EpochSums, _make_ema, build_criterion, setup_training

log = logging.getLogger("hkdbench")


class DivergedError(RuntimeError):
    """The loss became NaN or infinite; the run is marked FAILED."""


class TeacherUnavailableError(RuntimeError):
    """A stop request arrived while the teacher of this run was being trained (its checkpoint is saved)."""


@dataclass
class RunResult:
    status: str                      # 'done', 'interrupted'
    run_dir: RunDir
    summary: Optional[Dict[str, Any]] = None


# --------------------------------------------------------------------------------------------------------------
# Devices, precision (the optimiser and the schedule are in optim.py)
# --------------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------------
# Building the pieces of a run
# --------------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------

class Trainer:
    def __init__(self, cfg: RunConfig, store: RunStore, device: Optional[str] = None, progress: Optional[bool] = None,
                 should_stop: Callable[[], bool] = lambda: False, dist_ctx=None, echo: bool = True):
        self.cfg, self.store = cfg, store
        self.device = select_device(device)
        # a tqdm bar when the output is a terminal; else (a Slurm log, a redirect) a line every train.log_interval steps
        self.progress = sys.stdout.isatty() and sys.stderr.isatty() if progress is None else progress
        self.should_stop = should_stop
        self.dist = dist_ctx
        self.echo = echo
        self.run_dir = store.run_dir(cfg)

    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.rank == 0

    def say(self, message: str) -> None:
        if self.is_main:
            log.info(message)
            if self.echo:
                print(message, flush=True)
            with open(self.run_dir.log_file, "a") as f:
                f.write(message + "\n")

    # -- teacher --------------------------------------------------------------------------------------------------
    def prepare_teacher(self, num_classes: int, in_chans: int) -> Tuple[Optional[TappedModel], Optional[float]]:
        cfg = self.cfg
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
        from hkdbench.benchmark.recipes import teacher_run_config

        t_cfg = teacher_run_config(cfg)
        t_dir = self.store.run_dir(t_cfg)
        if not t_dir.is_done:
            self.say(f"teacher {cfg.teacher.name}: no finished run at {t_dir.path}; training it first")
            result = Trainer(t_cfg, self.store, device=str(self.device), progress=self.progress,
                             should_stop=self.should_stop, dist_ctx=self.dist, echo=self.echo).run(resume=True)
            if result.status != "done":
                raise TeacherUnavailableError("interrupted while training the teacher")
        which = cfg.teacher.weights
        teacher.model.load_state_dict(load_weights(t_dir, which))
        recorded = t_dir.summary()
        self.say(f"teacher {cfg.teacher.name}: the {which} weights of {t_dir.path.name} "
                 f"(epoch {recorded.get(f'{which}_epoch', '?')}, top-1 {recorded[f'{which}_top1']:.2f})")
        return teacher.to(self.device), recorded[f"{which}_top1"]

    # -- main loop ------------------------------------------------------------------------------------------------
    def run(self, resume: bool = False, restart: bool = False, wait_for_lock: bool = True) -> RunResult:
        """Trains the run under its flock; ``wait_for_lock=False`` raises RunLockedError at once when another
        process holds it (a sweep's job for a run a racing sweep already trains)."""
        from hkdbench.benchmark.engine.tracking import check_tracker_available

        check_tracker_available(self.cfg.train.log)  # a missing tracker package fails before anything is written
        rd = self.run_dir
        try:
            # under DDP only rank 0 holds the run's flock (the other ranks would wait on it forever)
            with rd.lock(wait=wait_for_lock) if self.is_main else contextlib.nullcontext():
                return self._run_locked(resume, restart)
        except StoreWriteError:
            if not rd.is_done or restart:
                raise
            if self.echo:  # a read-only store: a finished run needs no write
                print(f"{rd.path.name}: already done (read-only store: nothing written)", flush=True)
            return RunResult("done", rd, rd.summary())

    def _run_locked(self, resume: bool, restart: bool) -> RunResult:
        cfg, rd = self.cfg, self.run_dir
        if self.is_main:
            rd.claim(cfg)
            if removed := rd.remove_stray_temp_files():  # left by a kill mid-write; we hold the lock
                self.say(f"{rd.path.name}: removed temp files left by an interrupted write: {', '.join(removed)}")
        if restart and self.is_main:
            rd.reset()
        if rd.is_done:
            self.say(f"{rd.path.name}: already done")
            return RunResult("done", rd, rd.summary())
        if rd.has_checkpoint and not resume:
            raise RunExistsError(f"{rd.path} has a checkpoint from an earlier, unfinished run; pass --resume to "
                                 "continue it or --restart to start over")
        saved = self._read_checkpoint() if rd.has_checkpoint else None  # a damaged one fails before any work

        entry = zoo_entry(cfg.student.name)
        crop_pct = cfg.data.crop_pct or entry.crop_pct
        train_loader, test_loader, info = loaders.build_loaders(cfg.data, self.device, crop_pct,
                                                                 rank=self.dist.rank if self.dist else 0,
                                                                 world_size=self.world_size)
        if jitter_note := loaders.color_jitter_note(cfg.data.color_jitter, cfg.data.auto_augment):
            self.say(f"{rd.path.name}: {jitter_note}")
        teacher, teacher_top1 = self.prepare_teacher(info.num_classes, info.in_chans)

        loaders.seed_everything(cfg.train.seed)
        student = create_model(cfg.student.name, info.num_classes, in_chans=info.in_chans,
                               img_size=cfg.data.img_size, drop_path_rate=cfg.train.drop_path,
                               pretrained=cfg.student.pretrained, pretrained_sha256=cfg.student.pretrained_sha256)
        train_set = (TrainingSet(train_loader.all_labels()) if get_method(cfg.method).needs_sample_indices
                     else None)
        channels_last = use_channels_last(cfg.train.channels_last, self.device)
        setup = setup_training(cfg.method, cfg.method_cfg, student, teacher, info.num_classes, build_criterion(cfg),
                               train_set, cfg.optim, cfg.train.precision, channels_last, self.device,
                               compile=cfg.train.compile)
        method, module, optimizer, scaler, dtype = (setup.method, setup.module, setup.optimizer, setup.scaler,
                                                    setup.dtype)
        ema = _make_ema(student, cfg.train.ema_decay)
        mixup = loaders.build_mixup(cfg.data, info.num_classes, cfg.optim.label_smoothing)
        wrapped = self.dist.wrap(module, method.find_unused_parameters) if self.dist else module

        state = {"epoch": 0, "step": 0, "history": [], "partial": None, "teacher_top1": teacher_top1}
        if saved is not None:
            state = self._load_checkpoint(saved, module, optimizer, scaler, ema, state)
            self._check_kept_best(state["history"])
            if self.is_main:  # the checkpoint's history is the truth: a kill may have cut off the metrics write
                rd.write_metrics(state["history"])
            self.say(f"{rd.path.name}: resuming at epoch {state['epoch'] + 1}, step {state['step']}")
        elif self.is_main:
            from hkdbench.benchmark.store import atomic_write_json
            atomic_write_json(rd.env_file, {**environment(self.device, self.world_size), **setup.environment(),
                                            "global_batch": cfg.data.batch_size * self.world_size,
                                            "lr": cfg.optim.lr, "channels_last": channels_last,
                                            "autocast": str(dtype) if dtype else "fp32"})
        if state["teacher_top1"] is None and teacher is not None:
            state["teacher_top1"] = evaluate(teacher, test_loader, self.device, dtype, channels_last)["top1"]
            self.say(f"teacher {cfg.teacher.name}: top-1 {state['teacher_top1']:.2f}")

        self.say(f"{rd.path.name}: {cfg.method} {cfg.teacher.name if cfg.teacher else '-'} -> {cfg.student.name} "
                 f"on {cfg.data.dataset}, {cfg.train.epochs} epochs, {len(train_loader)} steps/epoch, "
                 f"device {self.device}{', ' + str(dtype) if dtype else ''}")
        history: List[Dict[str, Any]] = state["history"]
        ctx = TrainStep(cfg.optim, cfg.train.epochs, len(train_loader), wrapped, module, method, optimizer, scaler,
                        self.device, ema, mixup, dtype, channels_last)
        from hkdbench.benchmark.probes.hooks import build_probes
        ctx.probes = build_probes(cfg, student, teacher, test_loader, self.device, dtype, channels_last, self.is_main)
        # TensorBoard / W&B mirror of metrics.jsonl (train.log)
        from hkdbench.benchmark.engine.tracking import NullTracker, open_tracker

        tracker = open_tracker(cfg, rd.path.name, str(rd.tracking_dir), len(history)) if self.is_main else NullTracker()
        for epoch in range(state["epoch"], cfg.train.epochs):
            start_step = state["step"] if epoch == state["epoch"] else 0
            sums = _EpochSums(state["partial"] if epoch == state["epoch"] else None)
            if start_step == 0:
                loaders.seed_everything(cfg.train.seed * 100_003 + epoch)
            else:
                _set_rng(state["rng"])
            stopped_at = self._train_epoch(ctx, train_loader, epoch, start_step, sums)
            if stopped_at is not None:
                self._save_checkpoint(module, optimizer, scaler, ema, epoch, stopped_at, history, sums,
                                      state["teacher_top1"])
                self.say(f"{rd.path.name}: stop requested; checkpoint saved at epoch {epoch + 1}, step {stopped_at}")
                tracker.close()
                return RunResult("interrupted", rd)
            record = self._epoch_record(ctx, epoch, sums, test_loader, ema)
            history.append(record)
            self._keep_best(history, student, ema)  # before the checkpoint: a kill in between redoes this epoch
            self._save_checkpoint(module, optimizer, scaler, ema, epoch + 1, 0, history, None, state["teacher_top1"])
            if self.is_main:
                rd.write_metrics(history)
            tracker.log_epoch(record)
            self.say(_format_epoch(record, cfg.train.epochs))
        summary = self._summary(history, student, method, state["teacher_top1"])
        if self.is_main:
            rd.write_metrics(history)  # DONE never comes with metrics short of the final epoch
            save_weights(rd, "last", student.model.state_dict())
            if ema is not None:
                save_weights(rd, "last", ema.module.state_dict(), ema=True)
            rd.mark_done(summary)
        tracker.log_summary(summary)
        tracker.close()
        self.say(f"{rd.path.name}: done; best top-1 {summary['best_top1']:.2f} (epoch {summary['best_epoch']}), "
                 f"last {summary['last_top1']:.2f}")
        return RunResult("done", rd, summary)

    @property
    def world_size(self) -> int:
        return self.dist.world_size if self.dist else 1

    def _train_epoch(self, ctx: "TrainStep", loader, epoch: int, start_step: int, sums: _EpochSums) -> Optional[int]:
        """Runs the epoch from ``start_step``; returns the step to resume at if a stop was requested."""
        # tqdm on a terminal, a line every train.log_interval steps elsewhere
        from hkdbench.benchmark.engine.progress import EpochProgress

        progress = EpochProgress(epoch=epoch, epochs=self.cfg.train.epochs, steps=ctx.steps, start_step=start_step,
                                 interval=self.cfg.train.log_interval if self.is_main else 0,
                                 bar=self.progress and self.is_main, say=self.say)
        step = start_step
        with_index = ctx.method.needs_sample_indices
        for images, labels, *index in loader.batches(self.cfg.train.seed, epoch, start_step, with_index):
            tic = time.perf_counter()
            values, correct = ctx.step(images, labels, epoch, step, *index)
            total = sum(v for k, v in values.items() if k.startswith("loss/"))
            if not math.isfinite(total):
                self._fail_diverged(epoch, step, values)
            sums.add(values, labels.shape[0] * self.world_size, correct, time.perf_counter() - tic)
            step += 1
            progress.update(total, values["lr"], labels.shape[0] * self.world_size)
            if self.should_stop() and step < ctx.steps:
                progress.close()
                return step
        progress.close()
        return None

    def _fail_diverged(self, epoch: int, step: int, values: Dict[str, float]) -> None:
        terms = {k[5:]: v for k, v in values.items() if k.startswith("loss/")}
        reason = f"non-finite loss at epoch {epoch + 1}, step {step}: " + ", ".join(
            f"{k}={v}" for k, v in terms.items())
        if self.is_main:
            self.run_dir.mark_failed(reason, epoch=epoch + 1, step=step, losses=terms)
        self.say(f"{self.run_dir.path.name}: FAILED: {reason}")
        raise DivergedError(reason)

    def _epoch_record(self, ctx, epoch, sums: _EpochSums, test_loader, ema) -> Dict[str, Any]:
        cfg = self.cfg
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
        record["train_loss"] = sum(v for k, v in means.items() if k.startswith("loss/"))
        record["train_top1"] = 100.0 * correct / max(images, 1)
        record["epoch_time_s"] = sums.seconds
        record["images_per_s"] = sums.images / max(sums.seconds, 1e-9)
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
            ev = evaluate(ctx.module.student, test_loader, self.device, ctx.dtype, ctx.channels_last)
            record.update({"top1": ev["top1"], "top5": ev["top5"], "eval_loss": ev["loss"]})
            if ema is not None:
                ev = evaluate(ema.module, test_loader, self.device, ctx.dtype, ctx.channels_last)
                record.update({"ema_top1": ev["top1"], "ema_top5": ev["top5"]})
        if ctx.probes is not None:
            record.update(ctx.probes.epoch_values(epoch, epoch + 1 == cfg.train.epochs))
        return record

    def _keep_best(self, history: List[Dict[str, Any]], student: TappedModel, ema) -> None:
        """Keeps the weights of the epoch just recorded as best.pt (best_ema.pt) when it beats every earlier
        evaluated epoch, as timm's CheckpointSaver keeps model_best (a tie keeps the earlier epoch)."""
        if not self.is_main:
            return
        if best_record(history, "top1") is history[-1]:
            save_weights(self.run_dir, "best", student.model.state_dict())
        if ema is not None and best_record(history, "ema_top1") is history[-1]:
            save_weights(self.run_dir, "best", ema.module.state_dict(), ema=True)

    def _check_kept_best(self, history: List[Dict[str, Any]]) -> None:
        """A checkpoint whose history has a best epoch comes with that epoch's weights (written before it)."""
        if not self.is_main:
            return
        for key, ema in (("top1", False), ("ema_top1", True)):
            best = best_record(history, key)
            path = self.run_dir.weights_file("best", ema)
            if best is not None and not path.exists():
                raise RuntimeError(f"{self.run_dir.checkpoint_file} records a best epoch {best['epoch']} but "
                                   f"{path.name} is missing (a checkpoint from before best weights were kept, or "
                                   "a deleted file); pass --restart to train the run again")

    def _teacher_provenance(self) -> Dict[str, Any]:
        """Which teacher weights the run used: the best or last of a teacher run here, or a checkpoint file."""
        cfg = self.cfg
        if cfg.teacher is None or not get_method(cfg.method).uses_teacher:
            return {"teacher_weights": None, "teacher_run": None}
        if cfg.teacher.checkpoint:
            return {"teacher_weights": "checkpoint", "teacher_run": None}
        if cfg.teacher_recipe is None:  # timm's pretrained weights, as they are
            return {"teacher_weights": f"pretrained:{cfg.teacher.pretrained}", "teacher_run": None}
        from hkdbench.benchmark.recipes import teacher_run_config

        return {"teacher_weights": cfg.teacher.weights, "teacher_run": teacher_run_config(cfg).run_name()}

    def _summary(self, history, student: TappedModel, method: Distiller, teacher_top1) -> Dict[str, Any]:
        cfg, rd = self.cfg, self.run_dir
        evaluated = [r for r in history if "top1" in r]
        best = best_record(history, "top1")
        last = evaluated[-1]
        summary = {
            "run": self.run_dir.path.name, "hash": cfg.run_hash(), "kind": cfg.kind, "method": cfg.method,
            "teacher": cfg.teacher.name if cfg.teacher else None, "student": cfg.student.name,
            "teacher_family": zoo_entry(cfg.teacher.name).family if cfg.teacher else None,
            "student_family": zoo_entry(cfg.student.name).family, "dataset": cfg.data.dataset,
            "recipe": cfg.recipe, "seed": cfg.train.seed, "epochs": cfg.train.epochs,
            # each accuracy is that of weights the run keeps: best.pt (best epoch by top-1) and final.pt
            "best_top1": best["top1"], "best_top5": best["top5"], "best_epoch": best["epoch"],
            "best_weights": rd.weights_file("best").name,
            "last_top1": last["top1"], "last_top5": last["top5"], "last_epoch": last["epoch"],
            "last_weights": rd.weights_file("last").name,
            "teacher_top1": teacher_top1, **self._teacher_provenance(),
            "student_params": student.deploy_parameter_count(),
            "method_extra_params": method.extra_parameter_count(),
            "train_time_s": sum(r["epoch_time_s"] for r in history),
            "images_per_s": float(np.mean([r["images_per_s"] for r in history])),
            "global_batch": cfg.data.batch_size * self.world_size, "device": str(self.device),
            "finished": timestamp(),
        }
        if "ema_top1" in last:
            ema_best = best_record(history, "ema_top1")
            summary.update({"ema_best_top1": ema_best["ema_top1"], "ema_best_epoch": ema_best["epoch"],
                            "ema_best_weights": rd.weights_file("best", ema=True).name,
                            "ema_last_top1": last["ema_top1"],
                            "ema_last_weights": rd.weights_file("last", ema=True).name})
        return summary

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def _save_checkpoint(self, module, optimizer, scaler, ema, epoch, step, history, sums, teacher_top1):
        if not self.is_main:
            return
        state = {
            "module": module.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None, "epoch": epoch, "step": step,
            "history": history, "partial": sums.state() if sums is not None else None,
            "rng": _get_rng(), "teacher_top1": teacher_top1, "config_hash": self.cfg.run_hash(),
        }
        atomic_torch_save(self.run_dir.checkpoint_file, state)

    def _read_checkpoint(self) -> Dict[str, Any]:
        """The saved training state; a file that is empty, truncated or foreign is named with what to do."""
        path = self.run_dir.checkpoint_file
        what_to_do = ("start the run over with --restart (its progress is lost), or put back a good copy of the "
                      "file and --resume")
        if path.stat().st_size == 0:
            raise DamagedCheckpointError(f"{path} is empty (0 bytes: a disk fault or a copy cut short; hkdbench "
                                         f"itself writes it atomically); {what_to_do}")
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as err:  # a truncated zip, pickle garbage, ...: torch raises many kinds
            raise DamagedCheckpointError(f"{path} cannot be read ({type(err).__name__}: {err}); it is truncated "
                                         f"or not a checkpoint of this run; {what_to_do}") from None
        if not isinstance(state, dict) or state.get("config_hash") != self.cfg.run_hash():
            raise DamagedCheckpointError(f"{path} is not a checkpoint of this run (its config hash differs from "
                                         f"{self.cfg.run_hash()}); {what_to_do}")
        return state

    def _load_checkpoint(self, state, module, optimizer, scaler, ema, defaults) -> Dict[str, Any]:
        module.load_state_dict(state["module"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state["ema"] is not None:
            ema.load_state_dict(state["ema"])
        return {**defaults, **{k: state[k] for k in ("epoch", "step", "history", "partial", "rng", "teacher_top1")}}


class RunExistsError(RuntimeError):
    pass


class DamagedCheckpointError(RuntimeError):
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
    terms = " ".join(f"{k[5:]}={v:.4f}" for k, v in r.items() if k.startswith("loss/"))
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
    """Trains the runs of one cohort (see cohort.py); one RunResult per run, in order. Status 'done',
    'interrupted' (a stop request: every member has a checkpoint at the same step), 'failed' (diverged; the
    others went on) or 'owned' (another process holds its lock, with ``wait_for_lock=False``)."""
    from hkdbench.benchmark.engine.cohort import check_cohort
    from hkdbench.benchmark.store import RunLockedError

    check_cohort(cfgs)
    results = []
    for cfg in cfgs:  # TEMPORARY: one after the other, until the shared-stream loop lands
        trainer = Trainer(cfg, RunStore(runs_dir), device=device, progress=progress, **kwargs)
        try:
            results.append(trainer.run(resume, restart, wait_for_lock))
        except DivergedError:
            results.append(RunResult("failed", trainer.run_dir))
        except RunLockedError:
            results.append(RunResult("owned", trainer.run_dir))
    return results
