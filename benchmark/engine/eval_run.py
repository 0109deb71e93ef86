"""``hkdbench eval RUN``: top-1 / top-5 of a run's kept weights (best or last epoch, or the EMA's) and of its
teacher, on the run's test set or on other data (``--data-root``, ``data.*`` overrides), as timm's
``validate.py`` does for a checkpoint. Also the one place that rebuilds a run's deployable student from the store
(``load_student``), which ``hkdbench export`` uses."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

from hkdbench.benchmark.core.config import (ConfigError, DataConfig, RunConfig, build_dataclass, deep_merge,
                                       parse_overrides, to_dict)
from hkdbench.benchmark.engine.records import load_weights
from hkdbench.benchmark.engine.teacher import teacher_source
from hkdbench.benchmark.core.errors import StoreError
from hkdbench.benchmark.core.store import RunDir


def open_run(path: str | Path, ema: bool = False) -> RunDir:
    """A run directory of the store, named clearly when it is not one, has not finished, or (``ema``) kept no EMA."""
    rd = RunDir(Path(path))
    try:
        is_run = rd.config_file.is_file()
    except (OSError, ValueError):  # a name too long, a NUL: no such run either
        is_run = False
    if not is_run:
        raise StoreError(f"{path} is not a run directory (no config.json); runs are RUNS_DIR/<run name>/")
    if not rd.is_done:
        raise ConfigError(f"{rd.path.name} has not finished (status {rd.status()}); its kept weights may be "
                          "missing or stale: finish it first (hkdbench train ... --resume)")
    if ema and not rd.config().train.ema_decay:
        raise ConfigError(f"{rd.path.name} has no EMA weights: it was trained without an EMA of the student "
                          "(train.ema_decay=0); leave out --ema to use its own weights (best.pt, or final.pt "
                          "with --weights last)")
    return rd


def eval_data(cfg: RunConfig, overrides: Sequence[str] = ()) -> DataConfig:
    """The run's data settings with ``data.*`` overrides (another root, a subset, a batch size)."""
    extra = parse_overrides(list(overrides))
    if set(extra) - {"data"}:
        raise ConfigError(f"eval takes data.* overrides only, got {', '.join(sorted(set(extra) - {'data'}))}")
    changed = extra.get("data", {})
    for key in ("dataset", "img_size", "pipeline"):
        if key in changed:
            raise ConfigError(f"data.{key} cannot change at evaluation: the weights were trained for "
                              f"{key}={getattr(cfg.data, key)!r}")
    return build_dataclass(DataConfig, deep_merge(to_dict(cfg.data), changed), "data")


def load_student(rd: RunDir, weights: str = "best", ema: bool = False):
    """The run's student as a TappedModel (the bare timm model is ``.model``) with its kept weights, in eval
    mode on the CPU: no train-time module of the method comes with it."""
    from hkdbench.benchmark.data.datasets import dataset_info
    from hkdbench.benchmark.models.zoo import create_model

    cfg = rd.config()
    info = dataset_info(cfg.data.dataset)
    student = create_model(cfg.student.name, info.num_classes, in_chans=info.in_chans, img_size=cfg.data.img_size)
    student.model.load_state_dict(load_weights(rd, weights, ema))
    return student.eval()


def load_teacher(cfg: RunConfig, store_root: Path):
    """The teacher the run distilled from (``teacher.teacher_source``): its checkpoint, timm's pretrained weights,
    or its teacher run's."""
    from hkdbench.benchmark.data.datasets import dataset_info
    from hkdbench.benchmark.core.store import RunStore

    source = teacher_source(cfg)
    if source is None:
        raise ConfigError(f"the run ({cfg.kind}, method {cfg.method}) has no teacher to evaluate")
    info = dataset_info(cfg.data.dataset)
    teacher = source.build(info.num_classes, info.in_chans)
    if source.is_run:
        teacher.model.load_state_dict(load_weights(source.run_dir(RunStore(store_root)), cfg.teacher.weights))
    return teacher.eval()


def evaluate_run(path: str | Path, weights: str = "best", ema: bool = False, teacher: bool = False,
                 overrides: Sequence[str] = (), device: Optional[str] = None) -> Dict[str, Dict[str, Any]]:
    """``{'student': {'top1', 'top5', 'loss', 'weights'}, 'teacher': {...}}`` (teacher with ``teacher``)."""
    from hkdbench.benchmark.data.loaders import build_loaders
    from hkdbench.benchmark.data.datasets import check_data_available
    from hkdbench.benchmark.models.zoo import zoo_entry
    from hkdbench.benchmark.engine.evaluation import autocast_dtype, evaluate, select_device, use_channels_last

    rd = open_run(path, ema)
    cfg = rd.config()
    data = eval_data(cfg, overrides)
    check_data_available(data)
    dev = select_device(device)
    crop_pct = data.crop_pct or zoo_entry(cfg.student.name).crop_pct
    _, test_loader, _ = build_loaders(data, dev, crop_pct)
    dtype = autocast_dtype(cfg.train.precision, dev)
    channels_last = use_channels_last(cfg.train.channels_last, dev)
    models = {"student": (load_student(rd, weights, ema), rd.weights_file(weights, ema).name)}
    if teacher:
        models["teacher"] = (load_teacher(cfg, rd.path.parent), teacher_source(cfg).label())
    results = {}
    for role, (model, label) in models.items():
        model = model.to(dev)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        scores = evaluate(model, test_loader, dev, dtype, channels_last)
        results[role] = {**scores, "weights": label}
    return results

