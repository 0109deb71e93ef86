"""The device, the autocast precision and the evaluation pass (top-1/top-5 and loss on the test loader)."""

from __future__ import annotations

import contextlib
from typing import Dict, Optional

import torch
import torch.nn as nn


from hkdbench.benchmark.core.config import ConfigError
from hkdbench.benchmark.models.taps import TappedModel


DEVICES = "auto, cpu, cuda, cuda:N (the GPU of index N)"


def select_device(requested: Optional[str] = None) -> torch.device:
    """``--device``: CUDA when present for None or 'auto'; a device named that this machine lacks is a ConfigError."""
    if not requested or requested == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ConfigError(f"unknown device {requested!r}; allowed: {DEVICES}") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {requested!r} is not supported; allowed: {DEVICES}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {requested!r} requested but CUDA is not available; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device {requested!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def enable_cudnn_benchmark(device: torch.device) -> bool:
    """On CUDA, lets cuDNN time its convolution algorithms once per input shape and keep the fastest (a run's
    shapes are fixed, so the timing pays for itself); the CPU has nothing to choose. Called when a run sets up its
    training (the trainer, ``hkdbench overhead``). Returns the setting, for env.json. The algorithm chosen may
    differ from run to run, so CUDA runs are equal up to float rounding, not bit for bit."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return torch.backends.cudnn.benchmark


def use_channels_last(setting: str, device: torch.device) -> bool:
    """``train.channels_last``: 'yes', 'no', or 'auto' (on CUDA only, where it speeds up convolutions)."""
    return setting == "yes" or (setting == "auto" and device.type == "cuda")


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """None for fp32; bf16 where the GPU supports it ('auto'), fp16 otherwise. CPU runs fp32 on 'auto'."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, dtype: Optional[torch.dtype],
             channels_last: bool) -> Dict[str, float]:
    from hkdbench.benchmark.engine.distributed import reduce_sums, sync_buffers

    sync_buffers(model)  # DDP: every rank evaluates rank 0's model (BN statistics), on its shard of the test set
    was_training = model.training
    model.eval()
    # loss sum, top-1 and top-5 hits, summed on the device in float64 (as exact as Python's sums of the batches'
    # values were) and read once at the end, not three times per batch
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    total = 0
    for images, labels in loader.batches():
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(device, dtype):
            logits = model(images).logits if isinstance(model, TappedModel) else model(images)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        batch = (nn.functional.cross_entropy(logits, labels, reduction="sum"), hits[:, 0].sum(), hits.any(1).sum())
        sums += torch.stack([v.to(torch.float64) for v in batch])
        total += labels.numel()
    model.train(was_training)
    loss_sum, correct1, correct5 = sums.tolist()
    correct1, correct5, total, loss_sum = reduce_sums([correct1, correct5, total, loss_sum])
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total, "loss": loss_sum / total}


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
