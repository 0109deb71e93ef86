"""The overhead benchmark: what each method costs to train, for one teacher/student pair and batch size.

For every method, in one process (so the numbers are comparable), on synthetic images and labels:

* **step time**: the trainer's own step (``step.TrainStep``, built by the trainer's ``step.setup_training``:
  lr schedule, the method's forward with the teacher under autocast, the summed loss, ``backward()``, clipping,
  the optimiser step and the one host sync the trainer does per step), ``warmup`` untimed steps then ``repeats``
  timed ones (CUDA synchronised around each, as timm's ``benchmark.py``); the median is reported, with
  images/s = batch / median.
* **peak memory**: on CUDA ``torch.cuda.max_memory_allocated`` from before the models are built to the end of
  the timed steps, i.e. weights + gradients + optimiser state + activations of the step. On CPU the increase of
  the process's peak resident set: ``/proc/self/clear_refs`` is written ``5`` (resets ``VmHWM``) after a
  garbage collection and ``malloc_trim``, ``VmRSS`` is read as the baseline, and ``VmHWM`` after the steps. This
  is a whole-process measure (the allocator may keep freed memory), coarser than the CUDA counter; ``None`` where
  ``/proc`` does not allow it.
* **train FLOPs per image**: ``torch.utils.flop_counter.FlopCounterMode`` over one full train step (teacher
  forward, student forward and backward, the method's modules), divided by the batch size.
* **extra parameters**: the method's own trainable parameters (``Distiller.extra_parameter_count``).

Each value also as a ratio to the student trained alone (method ``none``) and to ``kd``. Each method's result is
stored through the run store as a run of kind ``'overhead'`` (``RunDir.store_measurement``: config, environment,
summary, DONE), named by the store's rule from its :class:`~hkdbench.benchmark.core.config.OverheadConfig`, which
``RunDir.overhead_config()`` reads back; ``hkdbench collect`` picks it up with the training runs. Teachers and
students have random weights: cost does not depend on them.

:func:`method_costs` is the quick static counterpart (``hkdbench methods --pair``): each method built on the pair,
nothing run, its extra parameters, the training memory they add and its buffers.
"""
from __future__ import annotations

import ctypes
import gc
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from hkdbench.benchmark.core.config import ConfigError, OverheadConfig
from hkdbench.benchmark.core.store import RunStore
from hkdbench.benchmark.engine.environment import environment

BASELINES = ("none", "kd")


# --------------------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------------------

def _proc_status_kb(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of a window: CUDA allocator peak on GPU, resident-set increase (VmHWM - VmRSS) on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start: Optional[int] = None
        self.ok = True

    def __enter__(self) -> "PeakMemory":
        _trim_heap()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            except OSError:
                self.ok = False
            self.start = _proc_status_kb("VmRSS")
            self.ok = self.ok and self.start is not None
        return self

    def __exit__(self, *exc) -> None:
        return None

    def peak_mb(self) -> Optional[float]:
        """Peak memory in MiB above the window's start (the models and optimiser state are built inside)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self.start) / 2 ** 20
        if not self.ok:
            return None
        hwm = _proc_status_kb("VmHWM")
        return None if hwm is None else (hwm - self.start) / 1024


# --------------------------------------------------------------------------------------------------------------
# One method
# --------------------------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_method(cfg: OverheadConfig) -> Dict[str, Any]:
    """Builds the pair and the method, and measures one method's train step (see the module docstring)."""
    from hkdbench.methods import TrainingSet, get_method

    from hkdbench.benchmark.core.config import OptimConfig
    from hkdbench.benchmark.engine.seeding import seed_everything
    from hkdbench.benchmark.data.stream import prepare_batch
    from hkdbench.benchmark.engine.evaluation import use_channels_last
    from hkdbench.benchmark.engine.step import TrainStep, setup_training
    from hkdbench.benchmark.models.zoo import create_model

    device = torch.device(cfg.device)
    method_cls = get_method(cfg.method)
    seed_everything(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    images = torch.randn(cfg.batch_size, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g).to(device)
    labels = torch.randint(0, cfg.num_classes, (cfg.batch_size,), generator=g).to(device)

    with PeakMemory(device) as mem:
        teacher = None
        if method_cls.uses_teacher:
            teacher = create_model(cfg.teacher, cfg.num_classes, in_chans=cfg.in_chans, img_size=cfg.img_size)
        student = create_model(cfg.student, cfg.num_classes, in_chans=cfg.in_chans, img_size=cfg.img_size)
        # a method with per-sample state (CRD's memory banks, whose step cost and memory grow with the training
        # set) is sized by the CIFAR-sized stand-in; the measured batch is its first samples
        train_set = TrainingSet.stand_in(cfg.num_classes) if method_cls.needs_sample_indices else None
        index = torch.arange(cfg.batch_size, device=device) if method_cls.needs_sample_indices else None
        optim = OptimConfig(name=cfg.optimizer, lr=1e-4)
        # the trainer's own setup (channels_last as its train.channels_last=auto) and step (schedule, autocast,
        # backward, clipping, optimiser, the one host sync)
        setup = setup_training(cfg.method, None, student, teacher, cfg.num_classes, nn.CrossEntropyLoss(),
                               train_set, optim, cfg.precision, channels_last=use_channels_last("auto", device),
                               device=device, compile=cfg.compile)
        method = setup.method
        total_steps = cfg.warmup + cfg.repeats + 1
        train_step = TrainStep(optim, 1, total_steps, setup.module, setup.module, method, setup.optimizer,
                               setup.scaler, device, dtype=setup.dtype, channels_last=setup.channels_last)
        step_index = iter(range(total_steps))
        batch = prepare_batch(images, labels, index, channels_last=setup.channels_last)

        def step() -> None:
            train_step.step(batch, 0, next(step_index))

        for _ in range(cfg.warmup):
            step()
        times: List[float] = []
        for _ in range(cfg.repeats):
            _sync(device)
            tic = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - tic)
        peak = mem.peak_mb()

    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()

    median = statistics.median(times)
    result = {
        "step_time_ms": 1000 * median, "step_time_ms_mean": 1000 * statistics.fmean(times),
        "step_time_ms_min": 1000 * min(times), "step_times_ms": [1000 * t for t in times],
        "images_per_s": cfg.batch_size / median,
        "peak_memory_mb": peak, "train_gflops_per_image": flops / cfg.batch_size / 1e9,
        "extra_params": method.extra_parameter_count(), "student_params": student.deploy_parameter_count(),
        "teacher_params": teacher.deploy_parameter_count() if teacher is not None else None,
    }
    del setup, method, student, teacher
    _trim_heap()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


RATIO_KEYS = ("step_time_ms", "images_per_s", "peak_memory_mb", "train_gflops_per_image")


def add_ratios(results: Dict[str, Dict[str, Any]]) -> None:
    """``<key>_vs_none`` / ``<key>_vs_kd`` for every measured value, and ``extra_params_vs_*`` as a ratio of
    the training parameters (student + method modules), in place."""
    for base in BASELINES:
        ref = results.get(base)
        for r in results.values():
            for key in RATIO_KEYS:
                a, b = r.get(key), (ref or {}).get(key)
                r[f"{key}_vs_{base}"] = (a / b) if (a is not None and b) else None
            if ref is not None:
                r[f"train_params_vs_{base}"] = ((r["student_params"] + r["extra_params"])
                                               / (ref["student_params"] + ref["extra_params"]))


def run_overhead(teacher: str, student: str, methods: Optional[Sequence[str]] = None, batch_size: int = 32,
                 img_size: Optional[int] = None, warmup: int = 3, repeats: int = 10, device: Optional[str] = None,
                 runs_dir: Optional[str] = None, num_classes: int = 100, precision: str = "auto",
                 restart: bool = False, compile: bool = False, echo=print) -> Dict[str, Dict[str, Any]]:
    """Measures every method (default: all registered) and stores one ``overhead`` run per method. ``precision``
    'auto' (the default) times the step training runs on the device: ``train.precision``'s 'auto' as training
    resolves it (bf16 on a GPU that has it, fp16 on one without, fp32 on a CPU); the run records the resolved name."""
    from hkdbench.methods import method_code

    from hkdbench.benchmark.engine.evaluation import autocast_dtype, select_device
    from hkdbench.benchmark.models.zoo import zoo_entry

    ordered = _methods_in_order(teacher, student, methods)
    if img_size is None:
        img_size = max(zoo_entry(teacher).img_size, zoo_entry(student).img_size)
    if warmup < 0 or repeats < 1 or batch_size < 1:
        raise ConfigError("overhead needs --warmup >= 0, --repeats >= 1 and --batch-size >= 1")
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    dev = select_device(device)
    if precision == "auto":
        precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast_dtype(precision, dev)]
    base = OverheadConfig(teacher=teacher, student=student, method="none", batch_size=batch_size,
                          img_size=img_size, num_classes=num_classes, warmup=warmup, repeats=repeats,
                          precision=precision, device=str(dev), compile=compile)
    configs = {name: replace(base, method=name, method_code=method_code(name)) for name in ordered}
    store = RunStore(runs_dir)
    planned = [store.run_dir(cfg) for cfg in configs.values()]
    if not restart and all(rd.is_done for rd in planned):
        for rd in planned:
            echo(f"{rd.path.name}: already done (pass --restart to measure again)")
        return {rd.summary()["method"]: rd.summary() for rd in planned}
    # one untimed pass first: one-time costs (allocator pools, kernel caches, lazy imports) then land on no method
    measure_method(replace(base, warmup=1, repeats=1))
    results: Dict[str, Dict[str, Any]] = {}
    for name, cfg in configs.items():
        try:
            results[name] = measure_method(cfg)
        except NotImplementedError as err:
            echo(f"{name:<8} not supported for {teacher} -> {student}: {err}")
            continue
        r = results[name]
        echo(f"{name:<8} {r['step_time_ms']:9.2f} ms/step {r['images_per_s']:9.1f} img/s "
             f"{_fmt(r['peak_memory_mb'])} MiB {r['train_gflops_per_image']:9.3f} GFLOP/img "
             f"{r['extra_params'] / 1e6:8.3f}M extra")
    add_ratios(results)
    env = environment(dev)
    for name, r in results.items():  # the baselines too: the figures show them next to the methods
        _store_result(store, configs[name], r, env, restart, echo)
    return results


def _methods_in_order(teacher: str, student: str, methods: Optional[Sequence[str]]) -> List[str]:
    """The methods to measure (default: all registered), the baselines first and always (every method gets its
    ratios); an unknown model or method fails here, before anything is measured."""
    from hkdbench.methods import get_method, list_methods

    from hkdbench.benchmark.models.zoo import zoo_entry

    zoo_entry(teacher), zoo_entry(student)
    names = list(methods) if methods else list(list_methods())
    for name in names:
        get_method(name)
    return list(BASELINES) + [n for n in names if n not in BASELINES]


def _store_result(store: RunStore, cfg: OverheadConfig, result: Dict[str, Any], env: Dict[str, Any],
                  restart: bool, echo) -> None:
    """One method's measurement as a finished run of kind ``overhead`` (a finished one is kept unless restart)."""
    from hkdbench.methods import get_method

    from hkdbench.benchmark.models.zoo import zoo_entry

    rd = store.run_dir(cfg)
    if rd.is_done and not restart:
        echo(f"{rd.path.name}: already done, kept (pass --restart to store the new measurement)")
        return
    uses_teacher = get_method(cfg.method).uses_teacher
    rd.path.mkdir(parents=True, exist_ok=True)
    with rd.lock():
        summary = {"run": rd.path.name, "hash": cfg.run_hash(), "kind": cfg.kind, "method": cfg.method,
                   "teacher": cfg.teacher if uses_teacher else None, "student": cfg.student,
                   "teacher_family": zoo_entry(cfg.teacher).family if uses_teacher else None,
                   "student_family": zoo_entry(cfg.student).family, "dataset": "synthetic",
                   "overhead_teacher": cfg.teacher, "batch_size": cfg.batch_size, "img_size": cfg.img_size,
                   "num_classes": cfg.num_classes, "precision": cfg.precision, "warmup": cfg.warmup,
                   "repeats": cfg.repeats, "device": cfg.device, **result}
        rd.store_measurement(cfg, env, summary)


def method_costs(teacher: str, student: str, num_classes: int) -> Dict[str, Any]:
    """Every registered method built on the pair (random weights, at the larger of their input sizes): its extra
    trainable parameters, the memory they add in training (weights + gradients + two AdamW moments, fp32: 16
    bytes each) and its buffers (a per-sample method's sized by the CIFAR-sized stand-in training set). A method
    that does not support the pair has ``unsupported`` (the reason) instead."""
    from hkdbench.methods import TrainingSet, list_methods, method_config

    from hkdbench.benchmark.models.zoo import create_model, zoo_entry

    size = max(zoo_entry(teacher).img_size, zoo_entry(student).img_size)
    teacher_model = create_model(teacher, num_classes, in_chans=3, img_size=size)
    student_model = create_model(student, num_classes, in_chans=3, img_size=size)
    stand_in = TrainingSet.stand_in(num_classes)
    costs: Dict[str, Dict[str, Any]] = {}
    for name, cls in list_methods().items():
        try:
            method = cls.build(method_config(name), student_model, teacher_model if cls.uses_teacher else None,
                               num_classes, train_set=stand_in)
        except NotImplementedError as err:
            costs[name] = {"unsupported": str(err)}
            continue
        params = method.extra_parameter_count()
        costs[name] = {"extra_params": params, "extra_train_mb": params * 16 / 2 ** 20,
                       "buffers_mb": sum(b.numel() * b.element_size() for b in method.buffers()) / 2 ** 20}
        del method
    return {"img_size": size, "student_params": student_model.deploy_parameter_count(),
            "train_set_size": stand_in.size, "methods": costs}


def _fmt(v) -> str:
    return f"{v:9.1f}" if v is not None else f"{'n/a':>9}"
