"""What a run keeps and in which form: the checkpoint a resume reads (its keys; mid-epoch also the RNG state and
the partial epoch's sums), the kept weights (best.pt, final.pt and their EMA twins), one metrics line per epoch and
the summary. The store (``core/store.py``) names the files and writes them atomically; this module decides what is
in them (torch files through :func:`atomic_torch_save`, the JSON ones through the store's writers)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from hkdbench.benchmark.core.config import PIPELINE_VERSION, RunConfig
from hkdbench.benchmark.core.errors import HkdbenchError
from hkdbench.benchmark.core.store import RunDir, atomic_replace, timestamp
from hkdbench.benchmark.engine.member import Member
from hkdbench.benchmark.engine.seeding import rng_state
from hkdbench.benchmark.models.zoo import zoo_entry
from hkdbench.benchmark.core.store import LOSS_PREFIX


class CheckpointError(HkdbenchError, RuntimeError):
    """A weights file that cannot be read or does not fit its model."""


class DamagedCheckpointError(HkdbenchError, RuntimeError):
    """A run's checkpoint that cannot be resumed from (empty, truncated, another run's, or without its best weights)."""


class MissingWeightsError(HkdbenchError, FileNotFoundError):
    """A finished run lacks the weights asked for (e.g. a run from before best.pt was kept)."""


def atomic_torch_save(path: Path, obj: Any) -> None:
    """torch.save through the store's atomic replace: a full disk leaves the previous file and a clear error."""
    with atomic_replace(path) as tmp:
        torch.save(obj, tmp)


# -- the kept weights ----------------------------------------------------------------------------------------------

def save_weights(rd: RunDir, which: str, state_dict: Dict[str, torch.Tensor], ema: bool = False) -> None:
    """Keeps ``state_dict`` (moved to the CPU) as the run's ``which`` weights, atomically."""
    atomic_torch_save(rd.weights_file(which, ema), {k: v.detach().cpu() for k, v in state_dict.items()})


def load_weights(rd: RunDir, which: str, ema: bool = False) -> Dict[str, torch.Tensor]:
    """The state dict kept as the run's ``which`` weights; a clear error when the run never wrote it."""
    path = rd.weights_file(which, ema)
    if not path.exists():
        raise MissingWeightsError(
            f"{rd.path.name} has no {path.name} ({which} weights{' of the EMA' if ema else ''}): the run "
            "finished before hkdbench kept them (or they were deleted). Train it again with --restart, or "
            "use weights it kept (a teacher's: --teacher-weights last, final.pt, whose accuracy is last_top1)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (truncated zip, pickle garbage, ...: torch raises many kinds)
        raise CheckpointError(f"{path} cannot be read ({type(err).__name__}: {err}); the run's {which} weights "
                              "are damaged: train the run again with --restart, or put back a good copy") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors; the run's {which} weights are "
                              "damaged: train the run again with --restart, or put back a good copy")
    return state


def selection_key(cfg: RunConfig, ema: bool = False) -> str:
    """The score that picks a run's kept best weights: validation top-1 with ``data.val_split``, else test top-1
    (timm's model_best, the papers' convention: selection on the test set)."""
    key = "val_top1" if cfg.data.val_split else "top1"
    return f"ema_{key}" if ema else key


def keep_best(m: Member) -> None:
    """Keeps the weights of the epoch just recorded as best.pt (best_ema.pt) when it beats every earlier
    evaluated epoch by :func:`selection_key`, as timm's CheckpointSaver keeps model_best (a tie keeps the earlier
    epoch)."""
    history = m.state["history"]
    if best_record(history, selection_key(m.cfg)) is history[-1]:
        save_weights(m.run_dir, "best", m.student.model.state_dict())
    if m.ema is not None and best_record(history, selection_key(m.cfg, ema=True)) is history[-1]:
        save_weights(m.run_dir, "best", m.ema.module.state_dict(), ema=True)


def keep_last(m: Member) -> None:
    save_weights(m.run_dir, "last", m.student.model.state_dict())
    if m.ema is not None:
        save_weights(m.run_dir, "last", m.ema.module.state_dict(), ema=True)


def check_kept_best(rd: RunDir, cfg: RunConfig, history: List[Dict[str, Any]]) -> None:
    """A checkpoint whose history has a best epoch comes with that epoch's weights (written before it)."""
    for ema in (False, True):
        best = best_record(history, selection_key(cfg, ema))
        path = rd.weights_file("best", ema)
        if best is not None and not path.exists():
            raise DamagedCheckpointError(
                f"{rd.checkpoint_file} records a best epoch {best['epoch']} but {path.name} is missing (a "
                "checkpoint from before best weights were kept, or a deleted file); pass --restart to train the "
                "run again")


# -- the checkpoint ------------------------------------------------------------------------------------------------

RESUMED = ("epoch", "step", "history", "partial", "rng", "teacher_top1")  # the member's state a resume takes back


def save_checkpoint(m: Member, epoch: int, step: int, sums: Optional[EpochSums],
                    ranks: Optional[Dict[int, Any]] = None) -> None:
    """The member's training state at (epoch, step); its RNG is the one in the global generators (the member's
    own at its turn). ``ranks``: with train.world > 1, every rank's own state by rank (``ranks.RankStates``:
    its generators, its per-rank buffers), which the module and the RNG above hold of rank 0 only."""
    ctx = m.ctx
    state = {
        "module": ctx.module.state_dict(), "optimizer": ctx.optimizer.state_dict(),
        "scaler": ctx.scaler.state_dict(), "ema": m.ema.state_dict() if m.ema is not None else None,
        "epoch": epoch, "step": step, "history": m.state["history"],
        "partial": sums.state() if sums is not None else None,
        "rng": rng_state(ctx.device), "teacher_top1": m.state["teacher_top1"], "config_hash": m.cfg.run_hash(),
        "ranks": ranks,
    }
    atomic_torch_save(m.run_dir.checkpoint_file, state)


def read_checkpoint(rd: RunDir, cfg: RunConfig, device) -> Dict[str, Any]:
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


def restore_checkpoint(state: Dict[str, Any], setup, ema) -> Dict[str, Any]:
    """Loads the checkpoint's weights and optimiser state into ``setup`` (a TrainingSetup) and ``ema``; returns the
    member's state it resumes with (:data:`RESUMED`)."""
    setup.module.load_state_dict(state["module"])
    setup.optimizer.load_state_dict(state["optimizer"])
    setup.scaler.load_state_dict(state["scaler"])
    if ema is not None and state["ema"] is not None:
        ema.load_state_dict(state["ema"])
    return {**{k: state[k] for k in RESUMED}, "ranks": state.get("ranks")}


def checkpoint_position(rd: RunDir) -> Optional[Tuple[int, int]]:
    """(epoch, step) a resume of the run starts at (0-based epoch), from its checkpoint; None when it has none or
    the file cannot be read (the resume itself says what is wrong). Memory-mapped: the tensors are not read."""
    try:
        state = torch.load(rd.checkpoint_file, map_location="cpu", weights_only=False, mmap=True)
        return int(state["epoch"]), int(state["step"])
    except Exception:  # noqa: BLE001 (missing, truncated, foreign: torch raises many kinds)
        return None


class EpochSums:
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


# -- the metrics lines and the summary ----------------------------------------------------------------------------

def epoch_record(epoch: int, sums: EpochSums, lr: float, world_size: int, distributed: bool) -> Dict[str, Any]:
    """The training part of an epoch's metrics line: the mean of each term over its steps, the lr, the training
    loss and top-1, the time and throughput. Under DDP the sums of every rank, not rank 0's share alone (ranks see
    equal batch sizes)."""
    record: Dict[str, Any] = {"epoch": epoch + 1}
    means, correct, images = sums.means(), float(sums.correct), sums.images / world_size
    if distributed:
        from hkdbench.benchmark.engine.distributed import reduce_sums

        keys = sorted(means)
        reduced = reduce_sums([means[k] for k in keys] + [correct, images])
        means = {k: v / world_size for k, v in zip(keys, reduced)}
        correct, images = reduced[-2], reduced[-1]
    record.update(means)
    record["lr"] = lr
    record["train_loss"] = sum(v for k, v in means.items() if k.startswith(LOSS_PREFIX))
    record["train_top1"] = 100.0 * correct / max(images, 1)
    record["epoch_time_s"] = sums.seconds
    record["images_per_s"] = sums.images / max(sums.seconds, 1e-9)
    return record


def evaluation_fields(student: Dict[str, float], ema: Optional[Dict[str, float]],
                      val: Optional[Dict[str, float]] = None, ema_val: Optional[Dict[str, float]] = None
                      ) -> Dict[str, Any]:
    """The scores of an evaluated epoch (``evaluation.evaluate``'s) as its metrics line names them: on the test set,
    and on the held-out validation images (``val``, ``ema_val``) with ``data.val_split``."""
    fields = {"top1": student["top1"], "top5": student["top5"], "eval_loss": student["loss"]}
    if ema is not None:
        fields.update({"ema_top1": ema["top1"], "ema_top5": ema["top5"]})
    if val is not None:
        fields.update({"val_top1": val["top1"], "val_loss": val["loss"]})
    if ema_val is not None:
        fields["ema_val_top1"] = ema_val["top1"]
    return fields


def best_record(history: List[Dict[str, Any]], key: str = "top1") -> Optional[Dict[str, Any]]:
    """The first epoch record with the highest ``key`` among those evaluated (None before any): a later epoch
    must beat it strictly, as timm's CheckpointSaver replaces model_best only on a greater metric."""
    best = None
    for record in history:
        if key in record and (best is None or record[key] > best[key]):
            best = record
    return best


def format_epoch(r: Dict[str, Any], epochs: int) -> str:
    """The epoch's log line."""
    terms = " ".join(f"{k[len(LOSS_PREFIX):]}={v:.4f}" for k, v in r.items() if k.startswith(LOSS_PREFIX))
    acc = f" top1={r['top1']:.2f} top5={r['top5']:.2f}" if "top1" in r else ""
    ema = f" ema_top1={r['ema_top1']:.2f}" if "ema_top1" in r else ""
    val = f" val_top1={r['val_top1']:.2f}" if "val_top1" in r else ""
    return (f"epoch {r['epoch']}/{epochs} {terms}{acc}{ema}{val} lr={r['lr']:.2e} "
            f"time={r['epoch_time_s']:.1f}s {r['images_per_s']:.0f} img/s")


def run_summary(m: Member, teacher: Dict[str, Any], device, cohort_size: int) -> Dict[str, Any]:
    """The finished run's summary.json; ``teacher``: which teacher weights it used (``teacher.teacher_provenance``)."""
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
        # best_*: the epoch of highest test top-1 (the papers' convention); its weights are best.pt only without
        # data.val_split (with it, best.pt holds the validation-selected epoch, selected_*); last_*: final.pt
        "best_top1": best["top1"], "best_top5": best["top5"], "best_epoch": best["epoch"],
        **_kept_best(cfg, rd, history),
        "last_top1": last["top1"], "last_top5": last["top5"], "last_epoch": last["epoch"],
        "last_weights": rd.weights_file("last").name,
        "teacher_top1": m.state["teacher_top1"], **teacher,
        "student_params": m.student.deploy_parameter_count(),
        "method_extra_params": m.ctx.method.extra_parameter_count(),
        "train_time_s": sum(r["epoch_time_s"] for r in history),
        "images_per_s": float(np.mean([r["images_per_s"] for r in history])),
        "global_batch": cfg.data.batch_size * cfg.train.world, "world": cfg.train.world, "device": str(device),
        "pipeline": PIPELINE_VERSION, "cohort_size": cohort_size, "finished": timestamp(),
    }
    if "ema_top1" in last:
        ema_best = best_record(history, "ema_top1")
        summary.update({"ema_best_top1": ema_best["ema_top1"], "ema_best_epoch": ema_best["epoch"],
                        **_kept_best(cfg, rd, history, ema=True), "ema_last_top1": last["ema_top1"],
                        "ema_last_weights": rd.weights_file("last", ema=True).name})
    return summary


def kept_weights_scores(summary: Dict[str, Any], which: str) -> str:
    """The prefix of the summary's keys that score the run's ``which`` kept weights ('best': best.pt, 'last':
    final.pt): 'selected' for best.pt of a run with data.val_split, else ``which``."""
    return "selected" if which == "best" and "selected_top1" in summary else which


def _kept_best(cfg: RunConfig, rd: RunDir, history: List[Dict[str, Any]], ema: bool = False) -> Dict[str, Any]:
    """What the summary says of best.pt (best_ema.pt): without data.val_split, the test-selected epoch's weights;
    with it, the validation-selected epoch (selected_*: its test top-1, its epoch, its validation top-1)."""
    prefix, weights = ("ema_" if ema else ""), rd.weights_file("best", ema).name
    if not cfg.data.val_split:
        return {f"{prefix}best_weights": weights}
    chosen = best_record(history, selection_key(cfg, ema))
    return {f"{prefix}selected_top1": chosen[f"{prefix}top1"], f"{prefix}selected_epoch": chosen["epoch"],
            f"{prefix}selected_val_top1": chosen[f"{prefix}val_top1"], f"{prefix}selected_weights": weights}
