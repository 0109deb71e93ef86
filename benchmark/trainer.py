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
import copy
import logging
import math
import random
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from hkdbench.methods import Distiller, Targets, TrainingSet, get_method, method_config

from . import data as data_lib
from .config import OptimConfig, RunConfig
from .models import TappedModel, create_model, zoo_entry
from .optim import LRSchedule, build_optimizer
from .store import RunDir, RunStore, StoreWriteError, atomic_torch_save, environment, timestamp

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

def select_device(requested: Optional[str] = None) -> torch.device:
    if requested and requested != "auto":
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {requested!r} requested but CUDA is not available")
        return device
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """None for fp32; bf16 where the GPU supports it ('auto'), fp16 otherwise. CPU runs fp32 on 'auto'."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# --------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, dtype: Optional[torch.dtype],
             channels_last: bool) -> Dict[str, float]:
    from .distributed import reduce_sums, sync_buffers

    sync_buffers(model)  # DDP: every rank evaluates rank 0's model (BN statistics), on its shard of the test set
    was_training = model.training
    model.eval()
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    for images, labels in loader.batches():
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(device, dtype):
            logits = model(images).logits if isinstance(model, TappedModel) else model(images)
        logits = logits.float()
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(1).sum().item()
        total += labels.numel()
    model.train(was_training)
    correct1, correct5, total, loss_sum = reduce_sums([correct1, correct5, total, loss_sum])
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total, "loss": loss_sum / total}


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class _EpochSums:
    """Running sums of one epoch's per-term losses and statistics (kept in checkpoints mid-epoch)."""

    def __init__(self, state: Optional[Dict[str, Any]] = None):
        state = state or {}
        self.sums: Dict[str, float] = dict(state.get("sums", {}))
        self.steps: int = state.get("steps", 0)
        self.images: int = state.get("images", 0)
        self.correct: int = state.get("correct", 0)
        self.seconds: float = state.get("seconds", 0.0)

    def add(self, values: Dict[str, float], images: int, correct: int, seconds: float) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1
        self.images += images
        self.correct += correct
        self.seconds += seconds

    def means(self) -> Dict[str, float]:
        return {k: v / max(self.steps, 1) for k, v in self.sums.items()}

    def state(self) -> Dict[str, Any]:
        return {"sums": self.sums, "steps": self.steps, "images": self.images, "correct": self.correct,
                "seconds": self.seconds}


# --------------------------------------------------------------------------------------------------------------
# Building the pieces of a run
# --------------------------------------------------------------------------------------------------------------

class TrainModule(nn.Module):
    """The student and the method's modules as one module (what the optimiser, DDP and checkpoints see)."""

    def __init__(self, student: TappedModel, method: Distiller):
        super().__init__()
        self.student = student
        self.method = method

    def forward(self, images, targets: Targets, epoch: int):
        return self.method.training_step(images, targets, epoch)


def load_teacher_weights(teacher: TappedModel, path: str, use_ema: bool = False) -> None:
    from .checkpoints import load_state_dict_into

    load_state_dict_into(teacher.model, path, use_ema=use_ema)


def build_criterion(cfg: RunConfig) -> nn.Module:
    from timm.loss import SoftTargetCrossEntropy

    if cfg.data.mixup > 0 or cfg.data.cutmix > 0:
        return SoftTargetCrossEntropy()  # mixup already folds label smoothing into the soft targets
    return nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)


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
        from .recipes import teacher_run_config

        t_cfg = teacher_run_config(cfg)
        t_dir = self.store.run_dir(t_cfg)
        if not t_dir.is_done:
            self.say(f"teacher {cfg.teacher.name}: no finished run at {t_dir.path}; training it first")
            result = Trainer(t_cfg, self.store, device=str(self.device), progress=self.progress,
                             should_stop=self.should_stop, dist_ctx=self.dist, echo=self.echo).run(resume=True)
            if result.status != "done":
                raise TeacherUnavailableError("interrupted while training the teacher")
        which = cfg.teacher.weights
        teacher.model.load_state_dict(t_dir.load_weights(which))
        recorded = t_dir.summary()
        self.say(f"teacher {cfg.teacher.name}: the {which} weights of {t_dir.path.name} "
                 f"(epoch {recorded.get(f'{which}_epoch', '?')}, top-1 {recorded[f'{which}_top1']:.2f})")
        return teacher.to(self.device), recorded[f"{which}_top1"]

    # -- main loop ------------------------------------------------------------------------------------------------
    def run(self, resume: bool = False, restart: bool = False, wait_for_lock: bool = True) -> RunResult:
        """Trains the run under its flock; ``wait_for_lock=False`` raises RunLockedError at once when another
        process holds it (a sweep's job for a run a racing sweep already trains)."""
        from .tracking import check_tracker_available

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
        train_loader, test_loader, info = data_lib.build_loaders(cfg.data, self.device, crop_pct,
                                                                 rank=self.dist.rank if self.dist else 0,
                                                                 world_size=self.world_size)
        if jitter_note := data_lib.color_jitter_note(cfg.data.color_jitter, cfg.data.auto_augment):
            self.say(f"{rd.path.name}: {jitter_note}")
        teacher, teacher_top1 = self.prepare_teacher(info.num_classes, info.in_chans)

        data_lib.seed_everything(cfg.train.seed)
        student = create_model(cfg.student.name, info.num_classes, in_chans=info.in_chans,
                               img_size=cfg.data.img_size, drop_path_rate=cfg.train.drop_path,
                               pretrained=cfg.student.pretrained, pretrained_sha256=cfg.student.pretrained_sha256)
        criterion = build_criterion(cfg)
        method_cls = get_method(cfg.method)
        train_set = TrainingSet(train_loader.all_labels()) if method_cls.needs_sample_indices else None
        method = method_cls.build(method_config(cfg.method, cfg.method_cfg), student, teacher, info.num_classes,
                                  criterion, train_set)
        module = TrainModule(student, method).to(self.device)
        channels_last = cfg.train.channels_last == "yes" or (cfg.train.channels_last == "auto"
                                                            and self.device.type == "cuda")
        if channels_last:
            module.to(memory_format=torch.channels_last)
            if teacher is not None:
                teacher.to(memory_format=torch.channels_last)
        dtype = autocast_dtype(cfg.train.precision, self.device)
        scaler = torch.amp.GradScaler(self.device.type, enabled=dtype == torch.float16)
        optimizer = build_optimizer(cfg.optim, [module], method.optimizer_groups())
        ema = _make_ema(student, cfg.train.ema_decay)
        mixup = data_lib.build_mixup(cfg.data, info.num_classes, cfg.optim.label_smoothing)
        wrapped = self.dist.wrap(module, method.find_unused_parameters) if self.dist else module

        state = {"epoch": 0, "step": 0, "history": [], "partial": None, "teacher_top1": teacher_top1}
        if saved is not None:
            state = self._load_checkpoint(saved, module, optimizer, scaler, ema, state)
            self._check_kept_best(state["history"])
            if self.is_main:  # the checkpoint's history is the truth: a kill may have cut off the metrics write
                rd.write_metrics(state["history"])
            self.say(f"{rd.path.name}: resuming at epoch {state['epoch'] + 1}, step {state['step']}")
        elif self.is_main:
            from .store import atomic_write_json
            atomic_write_json(rd.env_file, {**environment(self.device, self.world_size),
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
        from .probing import build_probes  # CKA / gradient-conflict probes (None when off)
        ctx.probes = build_probes(cfg, student, teacher, test_loader, self.device, dtype, channels_last, self.is_main)
        from .tracking import NullTracker, open_tracker  # TensorBoard / W&B mirror of metrics.jsonl (train.log)

        tracker = open_tracker(cfg, rd.path.name, str(rd.tracking_dir), len(history)) if self.is_main else NullTracker()
        for epoch in range(state["epoch"], cfg.train.epochs):
            start_step = state["step"] if epoch == state["epoch"] else 0
            sums = _EpochSums(state["partial"] if epoch == state["epoch"] else None)
            if start_step == 0:
                data_lib.seed_everything(cfg.train.seed * 100_003 + epoch)
            else:
                _set_rng(state["rng"])
            stopped_at = self._train_epoch(ctx, train_loader, epoch, start_step, sums)
            if stopped_at is not None:
                self._save_checkpoint(module, optimizer, scaler, ema, epoch, stopped_at, history, sums,
                                      state["teacher_top1"])
                self.say(f"{rd.path.name}: stop requested; checkpoint saved at epoch {epoch + 1}, step {stopped_at}")
                tracker.close()
                return RunResult("interrupted", rd)
            record = self._epoch_record(ctx, epoch, sums, test_loader, ema, method)
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
            rd.save_weights("last", student.model.state_dict())
            if ema is not None:
                rd.save_weights("last", ema.module.state_dict(), ema=True)
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
        from .progress import EpochProgress  # tqdm on a terminal, a line every train.log_interval steps elsewhere

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

    def _epoch_record(self, ctx, epoch, sums: _EpochSums, test_loader, ema, method) -> Dict[str, Any]:
        cfg = self.cfg
        record: Dict[str, Any] = {"epoch": epoch + 1}
        means, correct, images = sums.means(), float(sums.correct), sums.images / self.world_size
        if self.dist:  # the epoch of every rank, not rank 0's share alone (ranks see equal batch sizes)
            from .distributed import reduce_sums

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
            self.run_dir.save_weights("best", student.model.state_dict())
        if ema is not None and best_record(history, "ema_top1") is history[-1]:
            self.run_dir.save_weights("best", ema.module.state_dict(), ema=True)

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
        from .recipes import teacher_run_config

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


class TrainStep:
    """One optimisation step: lr schedule, mixup, forward (method + teacher) under autocast, summed loss,
    backward, clipping, optimiser and EMA updates. The trainer runs it; ``hkdbench overhead`` times it."""
    probes = None  # a probing.TrainingProbes when train.probe_every / train.conflict_every are on

    def __init__(self, optim: OptimConfig, epochs: int, steps: int, wrapped, module, method, optimizer, scaler,
                 device: torch.device, ema=None, mixup=None, dtype=None, channels_last: bool = False):
        self.optim, self.epochs, self.steps = optim, epochs, steps
        self.wrapped, self.module, self.method = wrapped, module, method
        self.optimizer, self.scaler, self.ema, self.mixup = optimizer, scaler, ema, mixup
        self.dtype, self.channels_last = dtype, channels_last
        self.device = device
        self.schedule = LRSchedule(optim, optimizer, epochs, steps)

    def step(self, images, labels, epoch: int, step: int, index=None) -> Tuple[Dict[str, float], int]:
        """``index``: the samples' training-set indices, for a method that needs them (kept under mixup: row i
        mixes sample i, weight lambda, with its partner, as CRD's reference passes it)."""
        lr = self.schedule.apply(epoch, step)
        targets = Targets(hard=labels, index=index)
        if self.mixup is not None:
            images, soft = self.mixup(images, labels)
            targets = Targets(hard=soft.argmax(-1), soft=soft, index=index)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        self.module.train()
        with _autocast(self.device, self.dtype):
            s_out, losses = self.wrapped(images, targets, epoch)
        loss = sum(v.float() for v in losses.values())
        if self.probes is not None:  # gradient conflict needs the terms before backward
            self.probes.on_losses(losses, epoch * self.steps + step, self.scaler)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.optim.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.module.parameters(), self.optim.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.module.student.model)
        values = {f"loss/{k}": v.detach().float() for k, v in losses.items()}
        correct = (s_out.logits.detach().argmax(-1) == labels).sum()
        host = {k: v.item() for k, v in values.items()}  # one sync per step: NaN checks and logging
        host.update({f"stat/{k}": float(v) for k, v in self.method.statistics().items()})
        host["lr"] = lr
        return host, int(correct.item())


def _make_ema(student: TappedModel, decay: float):
    if decay <= 0:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(student.model, decay=decay)  # the bare timm model: evaluated, never tapped


def _get_rng() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


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
