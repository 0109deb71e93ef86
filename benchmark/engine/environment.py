"""The provenance every run records in env.json: versions, git sha, host, CPU, device, world size."""
from __future__ import annotations

import os
import platform
from typing import Any, Dict

import torch

from hkdbench.benchmark.core.store import cpu_model, git_sha, timestamp


def environment(device: torch.device, world_size: int = 1) -> Dict[str, Any]:
    import timm

    import hkdbench

    env = {
        "hkdbench": hkdbench.__version__, "python": platform.python_version(), "torch": torch.__version__,
        "timm": timm.__version__, "git_sha": git_sha(), "host": platform.node(), "device": str(device),
        "world_size": world_size, "cpu_threads": torch.get_num_threads(), "cpu": cpu_model(),
        "cpu_count": os.cpu_count(), "time": timestamp(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env
