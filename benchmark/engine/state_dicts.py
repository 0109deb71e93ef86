"""A state dict from a file into a model, checked to fit: the teacher checkpoints a run names by path
(``teacher.checkpoint``), including state dicts written by the timm 0.6.x of the HKD papers (e.g. the CIFAR-100
teachers OFA-KD released): the wrappers timm and DDP put around the weights are removed and the keys whose layout
changed since are remapped by the model family's timm filter (Swin: the patch merging moved from the end of stage i
to the start of stage i+1, the classifier from ``head`` to ``head.fc``, and the relative-position index and
attention mask stopped being saved)."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Dict

import torch
import torch.nn as nn

from hkdbench.benchmark.engine.records import CheckpointError

_WRAPPERS = ("state_dict", "model", "module")
_EMA_WRAPPERS = ("state_dict_ema", "model_ema")


def read_state_dict(path: str, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    try:
        Path(path).stat()
    except FileNotFoundError:
        pass  # said below
    except (OSError, ValueError) as err:  # a name too long, below a file, a NUL
        raise CheckpointError(f"teacher checkpoint {path} cannot be read ({getattr(err, 'strerror', None) or err})"
                              ) from None
    if Path(path).is_dir():
        raise CheckpointError(f"teacher checkpoint {path} is a directory; --teacher-checkpoint takes a file (a state "
                              "dict saved with torch.save, e.g. a .pth of the reference's teachers)")
    if not Path(path).is_file():
        raise CheckpointError(f"teacher checkpoint {path!r} does not exist")
    if Path(path).stat().st_size == 0:
        raise CheckpointError(f"teacher checkpoint {path} is empty (0 bytes; an interrupted copy?); copy it again "
                              "or pass another --teacher-checkpoint")
    try:
        raw: Any = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated zip, pickle garbage, ...: torch raises many kinds
        raise CheckpointError(f"teacher checkpoint {path} cannot be read ({type(err).__name__}: {err}); it is "
                              "truncated or not a torch checkpoint: copy it again or pass another "
                              "--teacher-checkpoint") from None
    if isinstance(raw, dict):
        keys = _EMA_WRAPPERS + _WRAPPERS if use_ema else _WRAPPERS
        for key in keys:
            if isinstance(raw.get(key), dict):
                raw = raw[key]
                break
        else:
            if use_ema:
                raise CheckpointError(f"{path} has no EMA weights (looked for {', '.join(_EMA_WRAPPERS)})")
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    # DDP / DataParallel prefix
    return {k[7:] if k.startswith("module.") else k: v for k, v in raw.items()}


def remap_legacy_keys(state: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Applies the timm filter of the model's family (the conversions timm ships for old checkpoints)."""
    module = importlib.import_module(type(model).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state
    return filter_fn(state, model)


def load_state_dict_into(model: nn.Module, path: str, use_ema: bool = False) -> None:
    load_fitting(model, remap_legacy_keys(read_state_dict(path, use_ema), model), str(path))


def load_fitting(model: nn.Module, state: Dict[str, torch.Tensor], source: str) -> None:
    """Loads ``state`` into ``model`` when every key and shape fits; else a CheckpointError naming ``source``, the
    keys that differ and the model's number of classes (torch's own error is a dump of every mismatch)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    resized = [f"{k} {tuple(state[k].shape)} (the model: {tuple(own[k].shape)})" for k in own
               if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or resized:
        problems = [f"{what} {_few(keys)}" for what, keys in (("keys of another shape:", resized),
                                                              ("missing keys", missing),
                                                              ("unexpected keys", unexpected)) if keys]
        classes = getattr(model, "num_classes", None)
        raise CheckpointError(f"{source} does not fit {type(model).__name__}"
                              + (f" with {classes} classes" if classes else "") + ": " + "; ".join(problems)
                              + " (is the model name, the dataset or its number of classes right?)")
    model.load_state_dict(state)


def _few(keys, n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")
