"""Host-to-device copies that do not make the host wait.

A plain ``tensor.to('cuda')`` from pageable memory is a synchronous copy: the host waits until every kernel queued
before it has run (``torch.cuda.set_sync_debug_mode`` reports it). The data stream's small host-side tensors (an
epoch's order, RandAugment's draws) go through pinned memory and a non-blocking copy instead: the copy is queued on
the current stream, ordered before every kernel issued after it, and the host goes on issuing work.
"""
from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """``tensor`` (on the host) on ``device``, without a host synchronisation on CUDA. The pinned block is not
    reused before the copy has run (torch's caching host allocator records the copy's event), so the caller may
    drop it at once."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
