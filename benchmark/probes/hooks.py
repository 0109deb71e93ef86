"""Probes run during training and logged into ``metrics.jsonl`` (the trainer calls :class:`TrainingProbes` at
three points: once after the models are built, inside the step before ``backward()``, and when an epoch's record
is written).

* **CKA** every ``train.probe_every`` epochs: minibatch CKA (unbiased HSIC, :class:`CKAAccumulator`) between every
  teacher stage and every student stage on a fixed probe set of ``train.probe_images`` test images (a seeded draw,
  the same images and the same minibatches at every probe and in every run of a sweep), both models in eval mode,
  kernel ``train.probe_kernel``. Keys: ``cka/<kernel>/t{i}_s{j}`` (teacher stage i, student stage j). A run
  without a teacher of its own (the student alone) is probed against each run of ``train.probe_teachers`` instead:
  keys ``cka@<teacher run>/<kernel>/t{i}_s{j}``, the same measurement, the reference of "CKA change from none".
* **Gradient conflict** every ``train.conflict_every`` steps: the cosine between the gradients of the task term
  (``'ce'``) and of the sum of the distillation terms on the student's own parameters, whole model and per block
  (:func:`student_blocks`), via ``torch.autograd.grad`` before the step's backward (extra backward passes only on
  those steps). Per epoch: ``conflict/cosine`` (mean over measured steps), ``conflict/norm_ratio``
  (||g_distill|| / ||g_task||), ``conflict/fraction`` (share of measured steps with cosine < 0),
  ``conflict/steps``, ``conflict/task_norm``, ``conflict/distill_norm``, ``conflict/block/<name>`` (mean cosine)
  and ``conflict/block_fraction/<name>``.

Neither probe consumes random numbers or touches ``.grad``, so switching them on does not change the training
trajectory. A run resumed mid-epoch reports the conflict values of the steps since the resume for that epoch.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Dict, List, Optional

import torch

from hkdbench.benchmark.core.store import CONFLICT_COSINE, CONFLICT_FRACTION, CONFLICT_NORM_RATIO, cka_key, cka_prefix
from hkdbench.benchmark.models.taps import STAGES
from hkdbench.methods.base import TASK_LOSS

from hkdbench.benchmark.probes.cka import CKAAccumulator
from hkdbench.benchmark.probes.conflict import ConflictTracker, gradient_conflict, student_blocks

PROBE_SEED = 20240501


def _loader_size(loader) -> Optional[int]:
    if hasattr(loader, "labels"):
        return len(loader.labels)
    if hasattr(loader, "dataset"):
        return len(loader.dataset)
    return None


def probe_set(loader, n_images: int, batch_size: int) -> List[torch.Tensor]:
    """A fixed probe set from an evaluation loader, as a list of minibatches (CPU tensors).

    The images are a seeded random draw of ``n_images`` positions of the loader's (ordered) test set, kept in
    test-set order, so class-sorted sets (ImageNet val) are still covered. Minibatches have ``batch_size`` images;
    a last one with fewer than 4 (the unbiased HSIC minimum) is merged into the one before.
    """
    total = _loader_size(loader)
    wanted = None
    if total is not None and total > n_images:
        g = torch.Generator().manual_seed(PROBE_SEED)
        wanted = torch.randperm(total, generator=g)[:n_images].sort().values
    kept: List[torch.Tensor] = []
    count, offset = 0, 0
    for images, _ in loader.batches():
        b = images.shape[0]
        if wanted is None:
            take = images[: n_images - count]
        else:
            lo, hi = torch.searchsorted(wanted, torch.tensor([offset, offset + b])).tolist()
            take = images[(wanted[lo:hi] - offset).to(images.device)] if hi > lo else images[:0]
        offset += b
        if take.shape[0]:
            kept.append(take.detach().cpu())
            count += take.shape[0]
        if count >= n_images:
            break
    if not kept:
        raise ValueError("the CKA probe set is empty: the test set has no images")
    flat = torch.cat(kept)
    chunks = list(flat.split(batch_size))
    if len(chunks) > 1 and chunks[-1].shape[0] < 4:
        last = chunks.pop()
        chunks[-1] = torch.cat([chunks[-1], last])
    if chunks[0].shape[0] < 4:
        raise ValueError(f"the CKA probe set has {flat.shape[0]} images; it needs at least 4")
    return chunks


@torch.no_grad()
def cka_matrix(teacher, student, batches: List[torch.Tensor], device, kernel: str = "linear",
               autocast=None, channels_last: bool = False, prefix: str = cka_prefix()) -> Dict[str, float]:
    """``{'<prefix>/<kernel>/t{i}_s{j}': value}`` for all stage pairs, both models in eval mode (restored after)."""
    acc = CKAAccumulator.for_models(teacher, student, STAGES, STAGES, kernel=kernel)
    modes = (teacher.training, student.training)
    teacher.eval()
    student.eval()
    try:
        for images in batches:
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast() if autocast is not None else contextlib.nullcontext():
                t_out = teacher(images, stages=STAGES)
                s_out = student(images, stages=STAGES)
            acc.update({k: v.float() for k, v in t_out.stages.items()},
                       {k: v.float() for k, v in s_out.stages.items()})
    finally:
        teacher.train(modes[0])
        student.train(modes[1])
    return {cka_key(prefix, kernel, t, s): (None if math.isnan(v) else v) for (t, s), v in acc.as_dict().items()}


class TrainingProbes:
    """The probes of one run; a no-op for every probe whose cadence is 0."""

    def __init__(self, cfg, student, teacher, test_loader, device, autocast=None, channels_last: bool = False,
                 is_main: bool = True, probe_teachers: Optional[Dict[str, Any]] = None):
        t = cfg.train
        self.probe_every, self.conflict_every, self.kernel = t.probe_every, t.conflict_every, t.probe_kernel
        self.student, self.teacher, self.device = student, teacher, device
        # key prefix -> teacher: the run's own teacher, or the teacher runs a run without one is probed against
        self.references = {cka_prefix(): teacher} if teacher is not None else {
            cka_prefix(name): model for name, model in (probe_teachers or {}).items()}
        self.autocast, self.channels_last = autocast, channels_last
        self.batches: Optional[List[torch.Tensor]] = None
        # CKA needs a teacher to compare with; it is run by the main process only.
        if self.probe_every and self.references and is_main:
            self.batches = probe_set(test_loader, t.probe_images, min(cfg.data.eval_batch_size, t.probe_images))
        self.tracker = ConflictTracker()
        self.blocks = student_blocks(student) if self.conflict_every else None

    @property
    def active(self) -> bool:
        return self.batches is not None or bool(self.conflict_every)

    # -- inside the step, before backward -------------------------------------------------------------------------
    def on_losses(self, losses: Dict[str, torch.Tensor], global_step: int, scaler=None) -> None:
        """Measures the gradient conflict on this step if the cadence says so. Under an enabled GradScaler (fp16)
        both losses are multiplied by its scale against underflow; cosines and the norm ratio do not depend on it,
        the logged norms are divided back."""
        if not self.conflict_every or global_step % self.conflict_every:
            return
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        distill = [v for k, v in losses.items() if k != TASK_LOSS]
        if TASK_LOSS not in losses or not distill:
            return  # the student alone (or a method without a task term): nothing to compare
        task = losses[TASK_LOSS].float() * scale
        distill_sum = sum(v.float() for v in distill) * scale
        stats = gradient_conflict(task, distill_sum, blocks=self.blocks)
        if scale != 1.0:
            stats.task_norm, stats.distill_norm = stats.task_norm / scale, stats.distill_norm / scale
        self.tracker.update(stats)

    # -- when the epoch's record is written -----------------------------------------------------------------------
    def epoch_values(self, epoch: int, last_epoch: bool) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        if self.batches is not None and ((epoch + 1) % self.probe_every == 0 or last_epoch):
            tic = time.perf_counter()
            for prefix, teacher in self.references.items():
                out.update(cka_matrix(teacher, self.student, self.batches, self.device, self.kernel,
                                      self.autocast, self.channels_last, prefix))
            out["cka_time_s"] = time.perf_counter() - tic
        if self.conflict_every and len(self.tracker):
            s = self.tracker.epoch_summary()
            out.update({CONFLICT_COSINE: s["mean_cosine"], CONFLICT_NORM_RATIO: s["mean_norm_ratio"],
                        CONFLICT_FRACTION: s["conflict_fraction"], "conflict/steps": s["steps"],
                        "conflict/task_norm": s["mean_task_norm"], "conflict/distill_norm": s["mean_distill_norm"]})
            out.update({f"conflict/block/{b}": v for b, v in s["block_mean_cosine"].items()})
            out.update({f"conflict/block_fraction/{b}": v for b, v in s["block_conflict_fraction"].items()})
        return out


def build_probes(cfg, student, teacher, test_loader, device, dtype=None, channels_last: bool = False,
                 is_main: bool = True, probe_teachers: Optional[Dict[str, Any]] = None) -> Optional[TrainingProbes]:
    """The run's probes, or None when every probe is off (the trainer then does nothing extra).
    ``probe_teachers``: run name -> loaded teacher, for a run without a teacher of its own."""
    if not cfg.train.probe_every and not cfg.train.conflict_every:
        return None
    autocast = (lambda: torch.autocast(device_type=device.type, dtype=dtype)) if dtype is not None else None
    probes = TrainingProbes(cfg, student, teacher, test_loader, device, autocast, channels_last, is_main,
                            probe_teachers)
    return probes if probes.active else None
