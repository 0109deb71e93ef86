"""The checks a run's inputs pass before anything is written: its data is there and readable, and its teacher's
checkpoint loads into the teacher (or the teacher run it would train is a valid config with readable data)."""
from __future__ import annotations

import dataclasses
import json
from typing import Iterable

from hkdbench.benchmark.config import RunConfig


def check_run_inputs(cfg: RunConfig) -> None:
    from hkdbench.benchmark.data.datasets import check_data_available

    check_data_available(cfg.data)
    check_teacher(cfg)


def check_teacher(cfg: RunConfig) -> None:
    from hkdbench.methods import get_method

    from hkdbench.benchmark.data.datasets import check_data_available, dataset_info

    if cfg.teacher is None or not get_method(cfg.method).uses_teacher:
        return
    if cfg.teacher.checkpoint:
        from hkdbench.benchmark.models.zoo import create_model
        from hkdbench.benchmark.engine.checkpoint import load_teacher_weights

        info = dataset_info(cfg.data.dataset)
        teacher = create_model(cfg.teacher.name, info.num_classes, in_chans=info.in_chans, img_size=cfg.data.img_size)
        load_teacher_weights(teacher, cfg.teacher.checkpoint, cfg.teacher.checkpoint_ema)
        return
    if cfg.teacher_recipe is None:  # timm's pretrained weights as they are: found in the cache with the config
        return
    from hkdbench.benchmark.models.pretrained import warn_scratch_imagenet_teacher
    from hkdbench.benchmark.recipes import teacher_run_config

    t_cfg = teacher_run_config(cfg)  # its teacher.* overrides were validated with the config
    check_data_available(t_cfg.data)
    warn_scratch_imagenet_teacher(t_cfg)


def check_sweep_inputs(configs: Iterable[RunConfig]) -> None:
    """The same checks for a sweep, once per distinct data setting and teacher checkpoint, before any job is
    submitted: a damaged file fails the sweep here, not in every job of an array."""
    from hkdbench.benchmark.data.datasets import check_data_available

    seen = set()
    for cfg in configs:
        data_key = json.dumps(dataclasses.asdict(cfg.data), sort_keys=True, default=str)
        if data_key not in seen:
            seen.add(data_key)
            check_data_available(cfg.data)
        teacher = cfg.teacher
        if teacher is not None and teacher.checkpoint:
            teacher_key = (teacher.name, teacher.checkpoint, teacher.checkpoint_ema, cfg.data.dataset,
                           cfg.data.img_size)
            if teacher_key not in seen:
                seen.add(teacher_key)
                check_teacher(cfg)
