"""timm's pretrained weights as teachers (``--teacher-pretrained``, ``teacher_pretrained`` in presets).

A name is timm's ``architecture.tag`` (``swin_tiny_patch4_window7_224.ms_in1k``) or a bare architecture (timm's
default tag). It resolves through timm's pretrained config to the Hugging Face hub repo and a file in the hub
cache (``HF_HOME`` / ``HF_HUB_CACHE``); with ``HF_HUB_OFFLINE=1`` only the cache is read, and weights that are not
there fail with a clear error when the run's config is built, before anything is written. The weights' identity,
the resolved name and the SHA-256 of the file, is part of the config, so it enters the hash of every run that
uses them (the teacher run that fine-tunes them, or the student run that distils from them as they are).
"""
from __future__ import annotations

import hashlib
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from hkdbench.benchmark.core.config import ConfigError, is_weight_file
from hkdbench.benchmark.core.errors import HkdbenchError


_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's hub loader looks for, in its order


class PretrainedUnavailableError(HkdbenchError, FileNotFoundError):
    """The weights are not in the cache and cannot be downloaded (offline), or the name is unknown."""


@dataclass(frozen=True)
class PretrainedWeights:
    name: str           # architecture.tag, as timm resolved it
    architecture: str
    file: Path
    sha256: str
    num_classes: int    # the classifier the weights come with


def resolve_pretrained(name: str, architecture: Optional[str] = None, classifier: str = "") -> PretrainedWeights:
    """Finds (or downloads, when online) the weights file of ``name`` through timm's config and the hub cache; or,
    for a local weight file, that file, taken as weights of ``architecture`` (``classifier``: its head's module)."""
    if is_weight_file(name):
        if architecture is None:
            raise PretrainedUnavailableError(f"pretrained weights file {name}: a local file needs a timm model to "
                                             "load it into")
        return local_weights(name, architecture, classifier)
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    architecture, tag = split_model_name_tag(name)
    if not timm.is_model(architecture):
        raise PretrainedUnavailableError(f"pretrained weights {name!r}: {architecture!r} is not a timm architecture")
    try:
        cfg = get_pretrained_cfg(name if tag else architecture, allow_unregistered=False)
    except RuntimeError:  # timm: "Invalid pretrained tag"
        cfg = None
    if cfg is None:
        known = ", ".join(timm.list_pretrained(f"{architecture}.*")) or "none"
        raise PretrainedUnavailableError(f"timm has no pretrained weights {name!r}; tags of {architecture}: {known}")
    full_name = f"{architecture}.{cfg.tag}" if cfg.tag else architecture
    if not cfg.hf_hub_id:
        raise PretrainedUnavailableError(f"{full_name}: timm hosts these weights outside the Hugging Face hub "
                                         f"({cfg.url or 'no url'}); download them and pass the file as a checkpoint")
    path = _hub_file(cfg.hf_hub_id, full_name)
    return PretrainedWeights(full_name, architecture, path, file_sha256(path), int(cfg.num_classes or 0))


def _hub_file(repo_id: str, name: str) -> Path:
    """The cached file when there is one (no request at all); else a download, unless HF_HUB_OFFLINE is set."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    repo, _, revision = repo_id.partition("@")
    for filename in _WEIGHT_FILES:
        cached = try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(cached, str):
            return Path(cached)
    offline = constants.HF_HUB_OFFLINE
    problems = []
    unreachable = None if offline else hub_unreachable(constants.ENDPOINT)
    if unreachable:
        problems.append(unreachable)
    elif not offline:
        for filename in _WEIGHT_FILES:
            try:
                return Path(hf_hub_download(repo, filename, revision=revision or None))
            except Exception as err:  # no such file, a hub error, ...: say what the hub answered
                problems.append(f"{filename}: {type(err).__name__}")
    raise PretrainedUnavailableError(
        f"pretrained weights {name} (hub repo {repo}) are not in the hub cache {constants.HF_HUB_CACHE}"
        f"{' and HF_HUB_OFFLINE is set' if offline else ' and could not be downloaded (' + '; '.join(problems) + ')'}"
        f". Fetch them on a machine with network (python -c \"import timm; timm.create_model('{name}', "
        "pretrained=True)\") into the same HF_HOME, or give the teacher as a local weight file")


HUB_PROBE_TIMEOUT_S = 5.0


def hub_unreachable(endpoint: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> Optional[str]:
    """Why the hub at ``endpoint`` cannot be reached (one TCP connection, at most ``timeout`` s), or None. The hub
    client retries a connection error 5 times per file with back-off (about 60 s for the two files timm tries):
    without a network the answer comes at once. Behind a proxy the probe cannot tell, so it says nothing."""
    import socket
    import urllib.parse
    import urllib.request

    url = urllib.parse.urlsplit(endpoint)
    if url.hostname is None or urllib.request.getproxies().get(url.scheme):
        return None
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as err:
        return (f"the hub {endpoint} cannot be reached: {err.strerror or type(err).__name__}; without a network "
                "set HF_HUB_OFFLINE=1 to read only the cache")
    return None


def local_weights(name: str, architecture: str, classifier: str) -> PretrainedWeights:
    """A local weight file (a state dict, or a timm checkpoint holding one) as ``architecture``'s weights, named by
    its absolute path; its classes are those of its ``classifier`` head."""
    path = Path(name).expanduser().absolute()
    if not path.is_file():
        raise PretrainedUnavailableError(f"pretrained weights file {name}: no such file")
    state = read_weight_file(path)
    head = state.get(f"{classifier}.weight")
    return PretrainedWeights(str(path), architecture, path, file_sha256(path), int(head.shape[0]) if head is not None
                             and head.dim() >= 1 else 0)


def read_weight_file(path: Path) -> Dict[str, torch.Tensor]:
    """The state dict of a local weight file as timm's loader reads it (a checkpoint's EMA weights first, as timm);
    a file that is not one is named."""
    from timm.models import load_state_dict

    try:
        state = load_state_dict(str(path))
    except Exception as err:  # noqa: BLE001 (truncated zip, pickle garbage, a tensor of unsafe type: many kinds)
        raise PretrainedUnavailableError(f"pretrained weights file {path} cannot be read as a state dict "
                                         f"({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedUnavailableError(f"pretrained weights file {path} does not hold a state dict of tensors")
    return state


_HASHES: Dict[Tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """The file's SHA-256, computed once per (path, size, mtime) in a process (sweeps resolve many runs)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def load_pretrained_into(model: nn.Module, name: str, sha256: Optional[str], num_classes: int, in_chans: int) -> None:
    """Loads the weights ``name`` into a zoo model built by timm with the same architecture. A classifier of
    another size is left at its fresh init (timm's rule); a file whose hash is not the recorded one is refused."""
    from timm.models import load_pretrained

    built = getattr(model, "pretrained_cfg", {}).get("architecture")
    weights = resolve_pretrained(name, built, _classifier(model))
    if built != weights.architecture:
        raise ConfigError(f"pretrained weights {weights.name} are for {weights.architecture}, but the model is "
                          f"{built or 'not a timm-registered architecture'}")
    if sha256 and weights.sha256 != sha256:
        raise ConfigError(f"pretrained weights {weights.name}: {weights.file} has SHA-256 {weights.sha256[:12]}..., "
                          f"the run recorded {sha256[:12]}...: the cached file changed, so this is another run")
    cfg = {**model.pretrained_cfg, "file": str(weights.file), "num_classes": weights.num_classes}
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    load_pretrained(model, pretrained_cfg=cfg, num_classes=num_classes, in_chans=in_chans, filter_fn=filter_fn)


def _classifier(model: nn.Module) -> str:
    """The module name of the model's classifier head, as timm's pretrained config names it."""
    head = getattr(model, "pretrained_cfg", {}).get("classifier") or ""
    return head[0] if isinstance(head, (tuple, list)) else head


def check_fits(path: Path, model: nn.Module) -> None:
    """The local file's tensors fit ``model`` (built with the file's classes, 3 channels), but for what timm's loader
    adapts (the classifier, dropped when the classes differ); else an error naming the file and the keys."""
    state, own = read_weight_file(path), model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    resized = [f"{k} {tuple(state[k].shape)} (the model: {tuple(own[k].shape)})" for k in own
               if k in state and state[k].shape != own[k].shape]
    found = (("keys of another shape:", resized), ("missing keys", missing), ("unexpected keys", unexpected))
    problems = [f"{what} {_few(keys)}" for what, keys in found if keys]
    if problems:
        architecture = getattr(model, "pretrained_cfg", {}).get("architecture")
        raise ConfigError(f"pretrained weights file {path} does not fit {architecture}: {'; '.join(problems)} (are "
                          "they weights of this architecture?)")


def _few(keys, n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def used_as_is(weights_num_classes: int, dataset: str, num_classes: int) -> bool:
    """ImageNet weights on ImageNet are the teacher as they are (OFA-KD's ImageNet teachers); on any other
    dataset they initialise a teacher run that fine-tunes them (PAT's CIFAR teachers)."""
    return dataset == "imagenet" and weights_num_classes == num_classes


def warn_scratch_imagenet_teacher(teacher_cfg) -> Optional[str]:
    """A loud warning (returned and issued) when a teacher run would train an ImageNet teacher from scratch."""
    if teacher_cfg.data.dataset != "imagenet" or teacher_cfg.student.pretrained:
        return None
    message = (f"WARNING: the teacher {teacher_cfg.student.name} would be TRAINED FROM SCRATCH on ImageNet "
               f"({teacher_cfg.train.epochs} epochs, run {teacher_cfg.run_name()}); the papers used timm's pretrained "
               "teachers: give --teacher-pretrained NAME (teacher_pretrained.<teacher>=NAME in a preset) or "
               "--teacher-checkpoint PATH")
    warnings.warn(message, stacklevel=2)
    print(message, file=sys.stderr, flush=True)
    return message
