"""One optimisation step (:class:`TrainStep`: the distiller's forward passes and losses, backward, clipping, the
optimiser, the schedule, the student EMA), what it is built from (:func:`setup_training`, shared by the trainer
and the overhead benchmark), the module that holds student and method together, and the criterion."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from hkdbench.methods import Distiller, Targets, TrainingSet, get_method, method_config

from hkdbench.benchmark.core.config import OptimConfig, RunConfig
from hkdbench.benchmark.core.store import LOSS_PREFIX, STAT_PREFIX
from hkdbench.benchmark.data.stream import Batch
from hkdbench.benchmark.models.taps import Features, TappedModel
from hkdbench.benchmark.engine.optim import LRSchedule, build_optimizer, is_fused
from hkdbench.benchmark.engine.evaluation import _autocast, autocast_dtype, enable_cudnn_benchmark


class TrainModule(nn.Module):
    """The student and the method's modules as one module (what the optimiser, DDP and checkpoints see)."""

    def __init__(self, student: TappedModel, method: Distiller):
        super().__init__()
        self.student = student
        self.method = method

    def forward(self, images, targets: Targets, epoch: int):
        return self.method.training_step(images, targets, epoch)


@dataclass
class TrainingSetup:
    """The pieces of a training step, on the device: the method, the module the optimiser holds, the optimiser,
    the GradScaler (on under fp16), the autocast dtype (None for fp32), the memory format, and how the step runs
    (recorded in env.json: fused optimiser kernels, cuDNN's autotuner, torch.compile)."""
    method: Distiller
    module: TrainModule
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    dtype: Optional[torch.dtype]
    channels_last: bool
    cudnn_benchmark: bool = False
    compile_backend: Optional[str] = None  # None: not compiled

    def environment(self) -> Dict[str, Any]:
        return {"fused_optimizer": is_fused(self.optimizer), "cudnn_benchmark": self.cudnn_benchmark,
                "compile": self.compile_backend is not None, "compile_backend": self.compile_backend}


def setup_training(method: str, method_options: Optional[Mapping[str, Any]], student: TappedModel,
                   teacher: Optional[TappedModel], num_classes: int, criterion: nn.Module,
                   train_set: Optional[TrainingSet], optim: OptimConfig, precision: str, channels_last: bool,
                   device: torch.device, compile: bool = False) -> TrainingSetup:
    """Builds the method on the pair, moves the module and the teacher to ``device`` (channels_last if asked),
    compiles the trained modules if asked (``train.compile``), turns cuDNN's autotuner on (CUDA) and builds the
    optimiser (fused on CUDA) and the GradScaler: the one setup the trainer and ``hkdbench overhead`` share, so
    that the benchmark times the step that training runs."""
    distiller = get_method(method).build(method_config(method, method_options), student, teacher, num_classes,
                                         criterion, train_set)
    module = TrainModule(student, distiller).to(device)
    if teacher is not None:
        teacher.to(device)
    if channels_last:
        module.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher.to(memory_format=torch.channels_last)
    backend = compile_trained_modules(module) if compile else None
    dtype = autocast_dtype(precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    optimizer = build_optimizer(optim, [module], distiller.optimizer_groups())
    return TrainingSetup(distiller, module, optimizer, scaler, dtype, channels_last,
                         cudnn_benchmark=enable_cudnn_benchmark(device), compile_backend=backend)


def compile_trained_modules(module: TrainModule) -> str:
    """``train.compile``: torch.compile, in place (``nn.Module.compile``), of what the step trains: the tapped
    student, whose stage hooks are traced with it (they only store the stage outputs), and each of the method's
    own modules that has a forward (of a container, what it holds). The frozen teacher and the method's loss
    arithmetic stay eager.

    In place, so parameter names, state dicts and checkpoints are those of the eager modules, and DDP wraps the
    module as before; the compiled graphs run inside it (their gradients are all-reduced after each compiled
    backward, not bucket by bucket within it). Inductor is told to draw random numbers (dropout, drop path, CRD's
    negatives) with torch's eager generator (``fallback_random``), so a compiled run makes the same draws and its
    result differs from the eager run's by float rounding only. The backend is inductor unless
    ``$HKDBENCH_COMPILE_BACKEND`` names another (the CPU tests use ``aot_eager``: inductor's C++ build of the
    kernels takes minutes on a small CPU). Returns the backend, for env.json."""
    import torch._inductor.config

    backend = compile_backend()
    torch._inductor.config.fallback_random = True
    module.student.compile(backend=backend)
    _compile_callables(module.method, backend)
    return backend


def compile_backend() -> str:
    return os.environ.get("HKDBENCH_COMPILE_BACKEND") or "inductor"


def _compile_callables(parent: nn.Module, backend: str) -> None:
    for child in parent.children():
        if type(child).forward is nn.Module.forward:  # a container (ModuleDict, ModuleList) or a forward-less holder
            _compile_callables(child, backend)
        else:
            child.compile(backend=backend)


def build_criterion(cfg: RunConfig) -> nn.Module:
    from timm.loss import SoftTargetCrossEntropy

    if cfg.data.mixup > 0 or cfg.data.cutmix > 0:
        return SoftTargetCrossEntropy()  # mixup already folds label smoothing into the soft targets
    return nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)


class TrainStep:
    """One optimisation step of one run on a prepared batch (``data.stream.Batch``: augmented, mixed, in the
    memory format): lr schedule, forward (method + teacher) under autocast, summed loss, backward, clipping,
    optimiser and EMA updates, then one read of the step's values from the device (its one host
    synchronisation, ``tests/test_host_sync.py``). The trainer runs it; ``hkdbench overhead`` times it."""
    probes = None  # a probes.hooks.TrainingProbes when train.probe_every / train.conflict_every are on

    def __init__(self, optim: OptimConfig, epochs: int, steps: int, wrapped, module, method, optimizer, scaler,
                 device: torch.device, ema=None, dtype=None, channels_last: bool = False, compiled: bool = False,
                 ranks=None):
        self.optim, self.epochs, self.steps = optim, epochs, steps
        self.ranks = ranks  # a ranks.RankStates where this process trains several ranks of train.world
        self.compiled = compiled  # the trained modules run under torch.compile (train.compile)
        self.wrapped, self.module, self.method = wrapped, module, method
        self.optimizer, self.scaler, self.ema = optimizer, scaler, ema
        self.dtype, self.channels_last = dtype, channels_last
        self.device = device
        self.schedule = LRSchedule(optim, optimizer, epochs, steps)

    def teacher_pass(self, images: torch.Tensor, stages) -> Features:
        """The plain teacher pass (no gradients) a cohort shares, under this step's autocast."""
        self.method.teacher.eval()
        with torch.no_grad(), _autocast(self.device, self.dtype):
            return self.method.teacher(images, stages=tuple(sorted(stages)))

    def step(self, batch: Batch, epoch: int, step: int, shared_teacher: Optional[Features] = None,
             before_read: Optional[Callable[[], None]] = None) -> Tuple[Dict[str, float], int]:
        """``shared_teacher``: the plain teacher pass on ``batch.images`` (a cohort's), which the method then
        takes instead of running the teacher itself. ``before_read``: called once the step's work is queued,
        before its host read (the trainer draws the next batch there, while the device runs this step)."""
        with self._graph_settings():
            return self._step(batch, epoch, step, shared_teacher, before_read)

    def step_ranks(self, batches: List[Batch], epoch: int, step: int,
                   shared_teachers: Optional[List[Optional[Features]]] = None,
                   before_read: Optional[Callable[[], None]] = None) -> Tuple[Dict[str, float], int]:
        """One global step of the ranks this process trains, ``batches[j]`` (and ``shared_teachers[j]``) its j-th
        rank's: :meth:`step` where it trains one; else each rank's forward and backward in turn as that rank
        (``ranks.RankStates.as_rank``), their gradients' mean over every rank of train.world, one optimiser step.
        The host values: each term's mean over this process's ranks, their correct count summed. ``before_read``:
        as :meth:`step`'s."""
        shared_teachers = shared_teachers or [None] * len(batches)
        if len(batches) == 1:
            return self.step(batches[0], epoch, step, shared_teachers[0], before_read)
        with self._graph_settings():
            return self._emulated_step(batches, epoch, step, shared_teachers, before_read)

    def _emulated_step(self, batches: List[Batch], epoch: int, step: int, shared_teachers: List[Optional[Features]],
                       before_read: Optional[Callable[[], None]]) -> Tuple[Dict[str, float], int]:
        from hkdbench.benchmark.engine.pairwise import PairwiseSum
        from hkdbench.benchmark.engine.ranks import take_grads

        lr = self.schedule.apply(epoch, step)
        self.module.train()
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer.zero_grad(set_to_none=True)
        exchange = self.ranks.exchange
        exchange.begin_step()
        self.ranks.begin_step()
        if self.method.takes_rank_means():
            shared_teachers = self._collect_rank_means(batches, epoch, shared_teachers)
        grads, terms, correct = PairwiseSum(), [], 0
        for j, (batch, shared) in enumerate(zip(batches, shared_teachers)):
            exchange.next_rank()
            with self.ranks.as_rank(j):
                losses, hits = self._rank_backward(batch, epoch, step, shared, probe=j == 0)
                if self.ranks.bn is not None:
                    self.ranks.bn.after_micro_batch(j)
            grads.add(take_grads(params))
            terms.append(self._host_tensors(losses))
            correct = correct + hits
        exchange.finish_step()
        self.ranks.mean_gradients(params, grads.total())
        self._optimise()
        if before_read is not None:
            before_read()
        host = self._read_means(terms, correct)
        host["lr"] = lr
        return host, int(host.pop("correct"))

    def _collect_rank_means(self, batches: List[Batch], epoch: int, shared_teachers: List[Optional[Features]]
                            ) -> List[Optional[Features]]:
        """The collecting pass (``engine/exchange.py``): every rank's forward as that rank, its generators and
        buffers put back afterwards, for the values its method takes the mean of over the ranks. With gradients
        on, as the real pass: the same kernels (an attention without gradients may take another, a compiled module
        another graph), so the same values. Returns each rank's plain teacher pass, which the real pass reuses."""
        exchange, teachers = self.ranks.exchange, []
        for j, (batch, shared) in enumerate(zip(batches, shared_teachers)):
            stages = self.method.plain_teacher_stages()
            if shared is None and stages is not None:
                shared = self.teacher_pass(batch.images, stages)
            with self.ranks.as_rank(j), self.ranks.restoring(), exchange.collecting():
                with _autocast(self.device, self.dtype), self.method.sharing_teacher_pass(batch.images, shared):
                    self.module(batch.images, batch.targets, epoch)
            teachers.append(shared)
        exchange.settle_means()
        return teachers

    def _rank_backward(self, batch: Batch, epoch: int, step: int, shared: Optional[Features], probe: bool):
        """One rank's forward, losses and backward (its gradients left on the parameters); its loss terms and
        correct count, on the device. The probes see the first rank's terms."""
        with _autocast(self.device, self.dtype), self.method.sharing_teacher_pass(batch.images, shared):
            s_out, losses = self.module(batch.images, batch.targets, epoch)
        loss = sum(v.float() for v in losses.values())
        if probe and self.probes is not None:
            self.probes.on_losses(losses, epoch * self.steps + step, self.scaler)
        self.scaler.scale(loss).backward()
        return losses, (s_out.logits.detach().argmax(-1) == batch.labels).sum()

    def _optimise(self) -> None:
        """Clipping, the optimiser (through the GradScaler), rank 0's shared buffers everywhere, the EMA."""
        if self.optim.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.module.parameters(), self.optim.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.ranks.sync_shared_buffers()
        if self.ema is not None:
            bn = self.ranks.bn  # train.dist_bn='reduce': every rank's EMA follows its own BatchNorm statistics
            with bn.first_rank_statistics() if bn is not None else contextlib.nullcontext():
                self.ema.update(self.module.student.model)
            if bn is not None:
                bn.after_optimiser_step()

    def _host_tensors(self, losses: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The step's loss terms (float32, as logged before) and the method's statistics (in their own dtype), on the
        device, by their metric keys."""
        values = {f"{LOSS_PREFIX}{k}": v.detach().float() for k, v in losses.items()}
        values.update({f"{STAT_PREFIX}{k}": torch.as_tensor(v, device=self.device).detach()
                       for k, v in self.method.statistics().items()})
        return values

    def _read_means(self, terms: List[Dict[str, torch.Tensor]], correct: torch.Tensor) -> Dict[str, float]:
        """Each term's mean over the ranks and the correct count, in one transfer (float64, as :meth:`_read_values`)."""
        means = {k: torch.stack([t[k].reshape(()).to(torch.float64) for t in terms]).mean() for k in terms[0]}
        means["correct"] = correct.to(torch.float64)
        packed = torch.stack(list(means.values()))
        return dict(zip(means, packed.tolist()))

    def _graph_settings(self):
        """A compiled step with a probe that differentiates the losses before the backward (the gradient-conflict
        probe's ``autograd.grad(..., retain_graph=True)``) compiles and runs its graphs without AOTAutograd's
        donated buffers: donation lets a compiled backward overwrite the tensors its forward saved, which a second
        backward through the same graph still needs (AOTAutograd refuses it). On every step, not only the measured
        ones: a graph's backward is compiled once, at its first backward, which may be a plain step's (after a
        resume, or a recompile such as CRD's memory at step 1). The cost: the backward cannot reuse those tensors'
        memory for its own."""
        if self.compiled and self.probes is not None and self.probes.retains_graph:
            import torch._functorch.config

            return torch._functorch.config.patch(donated_buffer=False)
        return contextlib.nullcontext()

    def _step(self, batch: Batch, epoch: int, step: int, shared_teacher: Optional[Features],
              before_read: Optional[Callable[[], None]]) -> Tuple[Dict[str, float], int]:
        lr = self.schedule.apply(epoch, step)
        self.module.train()
        with _autocast(self.device, self.dtype), self.method.sharing_teacher_pass(batch.images, shared_teacher):
            s_out, losses = self.wrapped(batch.images, batch.targets, epoch)
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
        correct = (s_out.logits.detach().argmax(-1) == batch.labels).sum()
        if before_read is not None:
            before_read()
        host = self._read_values(losses, correct)
        host["lr"] = lr
        return host, int(host.pop("correct"))

    def _read_values(self, losses: Dict[str, torch.Tensor], correct: torch.Tensor) -> Dict[str, float]:
        """The step's loss terms, the method's statistics and the correct count in one device-to-host transfer:
        the step's one synchronisation (the trainer checks the host values for divergence). Packed in float64,
        which holds each float32 value (and the count) exactly: the floats ``.item()`` gave term by term."""
        values = self._host_tensors(losses)
        values["correct"] = correct
        packed = torch.stack([torch.as_tensor(v, device=self.device).detach().reshape(()).to(torch.float64)
                              for v in values.values()])
        return dict(zip(values, packed.tolist()))


def _make_ema(student: TappedModel, decay: float):
    if decay <= 0:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(student.model, decay=decay)  # the bare timm model: evaluated, never tapped
