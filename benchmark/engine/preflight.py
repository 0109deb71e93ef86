"""The checks a run's inputs pass before anything is written: its data is there and readable, and its teacher's
checkpoint loads into the teacher (or the teacher run it would train is a valid config with readable data)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Iterable, Optional

from hkdbench.benchmark.core.config import ConfigError, RunConfig


def check_run_inputs(cfg: RunConfig) -> None:
    from hkdbench.benchmark.data.datasets import check_data_available

    check_data_available(cfg.data)
    check_eval_crop(cfg)
    check_teacher(cfg)


def check_eval_crop(cfg: RunConfig) -> None:
    """The evaluation resizes to floor(img_size / crop_pct), then center-crops img_size: below img_size (a crop_pct
    above 1) timm's transform, which the per-image path runs, pads the crop; the in-memory path would cut it short."""
    from hkdbench.benchmark.data.loaders import in_memory_path
    from hkdbench.benchmark.models.zoo import zoo_entry

    data = cfg.data
    crop_pct = data.crop_pct or zoo_entry(cfg.student.name).crop_pct
    resize = math.floor(data.img_size / crop_pct)
    if data.pipeline == "paper224" and resize < data.img_size and in_memory_path(data):
        raise ConfigError(f"data.crop_pct={crop_pct:g} resizes the evaluation images to {resize} px, below "
                          f"data.img_size={data.img_size}, and the in-memory evaluation cannot pad its center crop; "
                          "give data.crop_pct <= 1, or data.in_memory=no (timm's transform, which pads)")


def check_teacher(cfg: RunConfig) -> None:
    from hkdbench.benchmark.data.datasets import check_data_available, dataset_info
    from hkdbench.benchmark.engine.teacher import CHECKPOINT, teacher_source

    source = teacher_source(cfg)
    if source is None:
        return
    if source.kind == CHECKPOINT:
        info = dataset_info(cfg.data.dataset)
        source.build(info.num_classes, info.in_chans)  # loads the checkpoint: it must fit the teacher
        return
    if not source.is_run:  # timm's pretrained weights as they are: found in the cache with the config
        return
    from hkdbench.benchmark.models.pretrained import warn_scratch_imagenet_teacher

    t_cfg = source.run_config  # its teacher.* overrides were validated with the config
    check_data_available(t_cfg.data)
    check_eval_crop(t_cfg)
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
        check_eval_crop(cfg)
        teacher = cfg.teacher
        if teacher is not None and teacher.checkpoint:
            teacher_key = (teacher.name, teacher.checkpoint, teacher.checkpoint_ema, cfg.data.dataset,
                           cfg.data.img_size)
            if teacher_key not in seen:
                seen.add(teacher_key)
                check_teacher(cfg)


def check_on_device(cfg: RunConfig, device) -> None:
    """What the run's device decides, before anything is written: its precision, and whether one batch of its
    images fits the device's memory at all (the least a step needs; the models' activations come on top)."""
    if cfg.train.precision == "fp16" and device.type == "cpu":
        # refused, not warned about: the run would take 3-20x as long (a step of vit_mini / resnet_mini, 2-core
        # Xeon) for a setting meant for a GPU, a warning in a batch job's log goes unread, and one override fixes it
        raise ConfigError("train.precision=fp16 on the CPU: torch's float16 autocast runs there 3 to 20 times slower "
                          "than fp32. Use train.precision=auto (fp32 on a CPU), fp32 or bf16, or run it on a GPU")
    _check_batch_fits(cfg, device)


def _check_batch_fits(cfg: RunConfig, device) -> None:
    from hkdbench.benchmark.data.datasets import dataset_info
    from hkdbench.benchmark.models.zoo import zoo_entry

    data = cfg.data
    channels = dataset_info(data.dataset).in_chans
    eval_side = math.floor(data.img_size / (data.crop_pct or zoo_entry(cfg.student.name).crop_pct))
    need = 4 * channels * max(data.batch_size * data.img_size ** 2, data.eval_batch_size * eval_side ** 2)
    have = _device_memory(device)
    if have is not None and need > have:
        raise ConfigError(f"data.img_size={data.img_size} with data.batch_size={data.batch_size} (data."
                          f"eval_batch_size={data.eval_batch_size}): one batch of images alone needs "
                          f"{need / 2 ** 30:.2f} GiB as float32, more than the {have / 2 ** 30:.2f} GiB of memory of "
                          f"{device}; lower data.img_size or the batch sizes")


def _device_memory(device) -> Optional[int]:
    """The device's total memory in bytes (the host's RAM for the CPU); None when it cannot be told."""
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
