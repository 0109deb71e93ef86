"""A cohort member made ready to train: its student (seeded by the run's seed), method, optimiser, EMA, step, probes
and tracker; its state from its checkpoint (a resume) or a fresh one with its env.json; its RNG."""
from __future__ import annotations

from typing import Any, Dict, Optional

from hkdbench.methods import TrainingSet, get_method, method_source

from hkdbench.benchmark.core.config import PIPELINE_VERSION
from hkdbench.benchmark.core.store import atomic_write_json
from hkdbench.benchmark.engine.environment import environment
from hkdbench.benchmark.engine.lifecycle import RunLifecycle
from hkdbench.benchmark.engine.member import Member
from hkdbench.benchmark.engine.dist_bn import RankBatchNorm
from hkdbench.benchmark.engine.ranks import RankStates
from hkdbench.benchmark.engine.records import check_kept_best, restore_checkpoint
from hkdbench.benchmark.engine.seeding import rng_state, seed_everything
from hkdbench.benchmark.engine.step_log import StepLog
from hkdbench.benchmark.engine.step import TrainingSetup, TrainStep, _make_ema, build_criterion, setup_training
from hkdbench.benchmark.engine.teacher import load_probe_teachers
from hkdbench.benchmark.engine.tracking import NullTracker, open_tracker
from hkdbench.benchmark.models.zoo import create_model
from hkdbench.benchmark.probes.hooks import build_probes


def build_member(m: Member, runs: RunLifecycle, teacher, teacher_top1: Optional[float], loaders,
                 channels_last: bool) -> None:
    """Builds ``m`` to train with ``teacher`` (when its method uses one) on ``loaders`` (train, test, dataset info)."""
    cfg = m.cfg
    train_loader, test_loader, info = loaders
    uses_teacher = get_method(cfg.method).uses_teacher
    own_teacher = teacher if uses_teacher else None
    seed_everything(cfg.train.seed)  # the model's randomness: its initialisation first
    student = create_model(cfg.student.name, info.num_classes, in_chans=info.in_chans,
                           img_size=cfg.data.img_size, drop_path_rate=cfg.train.drop_path,
                           pretrained=cfg.student.pretrained, pretrained_sha256=cfg.student.pretrained_sha256)
    layout = runs.layout(cfg)
    if cfg.train.sync_bn and layout.processes > 1:  # one process per rank (ranks.check_layout)
        import torch.nn as nn

        nn.SyncBatchNorm.convert_sync_batchnorm(student.model)
    train_set = (TrainingSet(train_loader.all_labels()) if get_method(cfg.method).needs_sample_indices
                 else None)
    setup = setup_training(cfg.method, cfg.method_cfg, student, own_teacher, info.num_classes,
                           build_criterion(cfg), train_set, cfg.optim, cfg.train.precision, channels_last,
                           runs.device, compile=cfg.train.compile)
    ema = _make_ema(student, cfg.train.ema_decay)
    # DDP where each process trains one rank; ranks emulated in turn average their gradients themselves
    ddp = runs.dist is not None and not layout.emulated
    wrapped = runs.dist.wrap(setup.module, setup.method.find_unused_parameters) if ddp else setup.module
    m.student, m.ema = student, ema
    bn = RankBatchNorm(layout, setup.module, ema) if cfg.train.dist_bn == "reduce" else None
    m.ranks = RankStates(layout, setup.module, runs.device, bn)
    if layout.emulated:  # the values a rank's forward takes from every rank, as DDP's collectives give them
        setup.method.exchange = m.ranks.exchange
    m.state = {"epoch": 0, "step": 0, "history": [], "partial": None,
               "teacher_top1": teacher_top1 if uses_teacher else None}
    if m.saved is not None:
        _resume(m, runs, setup)
        if m.state.get("ranks") is not None:  # this process's ranks' own states; its first's generators
            first_rng = m.ranks.load(m.state["ranks"])
            m.state["rng"] = first_rng if first_rng is not None else m.state["rng"]
    elif runs.is_main:
        atomic_write_json(m.run_dir.env_file, _environment(m, runs, setup, channels_last))
    runs.say(f"{m.name}: {cfg.method} {cfg.teacher.name if cfg.teacher else '-'} -> {cfg.student.name} "
             f"on {cfg.data.dataset}, {cfg.train.epochs} epochs, {len(train_loader)} steps/epoch, "
             f"device {runs.device}{', ' + str(setup.dtype) if setup.dtype else ''}", [m])
    m.ctx = TrainStep(cfg.optim, cfg.train.epochs, len(train_loader), wrapped, setup.module, setup.method,
                      setup.optimizer, setup.scaler, runs.device, ema, setup.dtype, channels_last,
                      compiled=setup.compile_backend is not None, ranks=m.ranks)
    probe_teachers = (load_probe_teachers(cfg, runs.store, info.num_classes, info.in_chans, runs.device)
                      if runs.is_main else {})  # the probe runs in the main process only
    m.ctx.probes = build_probes(cfg, student, own_teacher, test_loader, runs.device, setup.dtype,
                                channels_last, runs.is_main, probe_teachers)
    _open_logs(m, runs, len(train_loader))
    m.rng = rng_state(runs.device)


def _open_logs(m: Member, runs: RunLifecycle, steps_per_epoch: int) -> None:
    """The member's tracker (TensorBoard / W&B mirror of metrics.jsonl and steps.jsonl: train.log) and per-step
    log, from the optimiser step its checkpoint reached: the per-step records a killed attempt wrote past it go."""
    done = m.state["epoch"] * steps_per_epoch + m.state["step"]
    if runs.is_main:
        m.run_dir.keep_steps_through(done)
    m.tracker = (open_tracker(m.cfg, m.name, str(m.run_dir.tracking_dir), done) if runs.is_main else NullTracker())
    m.step_log = StepLog(m.run_dir if runs.is_main else None, m.tracker, m.cfg.train.log_interval, steps_per_epoch)


def _resume(m: Member, runs: RunLifecycle, setup: TrainingSetup) -> None:
    m.state.update(restore_checkpoint(m.saved, setup, m.ema))
    if runs.is_main:
        check_kept_best(m.run_dir, m.cfg, m.state["history"])
        # the checkpoint's history is the truth: a kill may have cut off the metrics write
        m.run_dir.write_metrics(m.state["history"])
    m.saved = None
    runs.say(f"{m.name}: resuming at epoch {m.state['epoch'] + 1}, step {m.state['step']}", [m])


def _environment(m: Member, runs: RunLifecycle, setup: TrainingSetup, channels_last: bool) -> Dict[str, Any]:
    """The member's env.json: versions and hardware, how it trains here, its method's source, its cohort."""
    cfg = m.cfg
    return {**environment(runs.device, runs.world_size), **setup.environment(),
            "global_batch": cfg.data.batch_size * cfg.train.world, "world": cfg.train.world,
            "ranks_per_process": cfg.train.world // runs.world_size,
            "lr": cfg.optim.lr, "channels_last": channels_last,
            "autocast": str(setup.dtype) if setup.dtype else "fp32",
            "method_source": method_source(cfg.method),
            "pipeline": PIPELINE_VERSION,
            "cohort": [rd.path.name for rd in runs.run_dirs]}
