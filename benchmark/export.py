"""``hkdbench export RUN --format timm|safetensors|onnx``: the deployable student of a run (the bare timm model
with the run's kept weights; none of the method's train-time modules) for use outside hkdbench.

* ``timm``: a folder in timm's hub layout, ``config.json`` (architecture, model arguments, pretrained config with
  the run's input size, normalisation, crop and interpolation) + ``model.safetensors``. Plain timm loads it with
  ``timm.create_model('local-dir:FOLDER', pretrained=True)``, or with
  ``timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=FOLDER/'model.safetensors',
  num_classes=N), num_classes=N, in_chans=C, **model_args)``. Needs a timm architecture (the papers' models).
* ``safetensors``: one ``<run>.safetensors`` file (state dict of the bare model), the same config in its metadata
  (key ``timm_config``).
* ``onnx``: ``<run>.onnx`` (input ``images`` N x C x H x W with a dynamic batch, output ``logits``), needs the
  ``onnx`` package (extra ``[onnx]``).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from hkdbench.benchmark.config import ConfigError, RunConfig

FORMATS = ("timm", "safetensors", "onnx")


def timm_config(cfg: RunConfig, model: torch.nn.Module, architecture: Optional[str]) -> Dict[str, Any]:
    """The model's description in timm's hub ``config.json`` format, with the run's data settings."""
    from hkdbench.benchmark.data.datasets import dataset_info
    from hkdbench.benchmark.models.zoo import zoo_entry

    info = dataset_info(cfg.data.dataset)
    size = cfg.data.img_size
    model_args: Dict[str, Any] = {"in_chans": info.in_chans}
    if hasattr(model, "patch_embed") and size != 224:  # ViT/Swin/Mixer record their input size
        model_args["img_size"] = size
    return {
        "architecture": architecture or cfg.student.name,
        "num_classes": info.num_classes,
        "num_features": getattr(model, "num_features", None),
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [info.in_chans, size, size], "fixed_input_size": hasattr(model, "patch_embed"),
            "interpolation": cfg.data.eval_interpolation,
            "crop_pct": cfg.data.crop_pct or zoo_entry(cfg.student.name).crop_pct, "crop_mode": "center",
            "mean": list(info.mean), "std": list(info.std), "num_classes": info.num_classes,
            "first_conv": getattr(model, "pretrained_cfg", {}).get("first_conv"),
            "classifier": getattr(model, "pretrained_cfg", {}).get("classifier"),
        },
        "hkdbench": {"run": None, "hash": cfg.run_hash(), "method": cfg.method,
                     "teacher": cfg.teacher.name if cfg.teacher else None, "zoo_model": cfg.student.name},
    }


def check_format(fmt: str, architecture: Optional[str], zoo_name: str) -> None:
    """Fails before anything is written: an unknown format, a missing package, a model timm cannot build."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; allowed: {', '.join(FORMATS)}")
    if fmt == "onnx" and importlib.util.find_spec("onnx") is None:
        raise ConfigError("--format onnx needs the onnx package: pip install 'hkdbench[onnx]' (or pip install onnx)")
    if fmt == "timm" and architecture is None:
        raise ConfigError(f"--format timm needs a timm architecture; {zoo_name} is one of hkdbench's own small "
                          "configurations, which plain timm cannot build by name: export it with --format "
                          "safetensors or onnx")


def export_run(path: str | Path, fmt: str, out: Optional[str | Path] = None, weights: str = "best",
               ema: bool = False) -> Path:
    """Writes the export and returns its path (a folder for ``timm``, a file otherwise)."""
    from hkdbench.benchmark.eval_run import load_student, open_run
    from hkdbench.benchmark.models.pretrained import zoo_architecture

    rd = open_run(path)
    cfg = rd.config()
    architecture = zoo_architecture(cfg.student.name)
    check_format(fmt, architecture, cfg.student.name)
    model = load_student(rd, weights, ema).model
    config = timm_config(cfg, model, architecture)
    config["hkdbench"].update(run=rd.path.name, weights=rd.weights_file(weights, ema).name)
    folder = Path(out) if out else rd.path / "export"
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "timm":
        _save_safetensors(model, folder / "model.safetensors", config)
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        return folder
    target = folder / f"{rd.path.name}.{'onnx' if fmt == 'onnx' else 'safetensors'}"
    if fmt == "safetensors":
        _save_safetensors(model, target, config)
    else:
        _save_onnx(model, target, config)
    return target


def _save_safetensors(model: torch.nn.Module, target: Path, config: Dict[str, Any]) -> None:
    from safetensors.torch import save_file

    # contiguous copies: tied or strided views cannot be written as they are
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    temp = target.with_name(f".{target.name}.tmp")
    save_file(tensors, str(temp), metadata={"format": "pt", "timm_config": json.dumps(config)})
    temp.replace(target)


def _save_onnx(model: torch.nn.Module, target: Path, config: Dict[str, Any]) -> None:
    import onnx

    example = torch.zeros(1, *config["pretrained_cfg"]["input_size"])
    temp = target.with_name(f".{target.name}.tmp")
    torch.onnx.export(model.eval(), (example,), str(temp), input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    proto = onnx.load(str(temp))
    onnx.helper.set_model_props(proto, {"timm_config": json.dumps(config)})
    onnx.checker.check_model(proto)
    onnx.save(proto, str(temp))
    temp.replace(target)
