"""``hkdbench export RUN --format timm|safetensors|onnx``: the deployable student of a run (the bare timm model
with the run's kept weights; none of the method's train-time modules) for use outside hkdbench.

* ``timm``: a folder in timm's hub layout, ``config.json`` (architecture, model arguments, pretrained config) +
  ``model.safetensors``. Plain timm loads it with ``timm.create_model('local-dir:FOLDER', pretrained=True)``, or
  with ``timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=FOLDER/'model.safetensors',
  num_classes=N), num_classes=N, in_chans=C, **model_args)``, whose pretrained config is then ARCH's own: pass
  config.json's ``pretrained_cfg`` to ``resolve_data_config(pretrained_cfg=...)``. Needs a timm architecture (the
  papers' models).
* ``safetensors``: one ``<run>.safetensors`` file (state dict of the bare model), the same config in its metadata
  (key ``timm_config``).
* ``onnx``: ``<run>.onnx`` (input ``images`` N x C x H x W with a dynamic batch, output ``logits``), needs the
  ``onnx`` package (extra ``[onnx]``).

The pretrained config is the run's own evaluation transform in timm's words, so that
``timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))`` on the dataset's PIL images gives
the inputs the run was scored on (``eval_preprocessing``):

* ``paper224``: resize to floor(img_size / crop_pct) and center crop, with the run's crop_pct and eval
  interpolation (crop_mode ``center``).
* ``small``: the native image zero-padded to img_size. timm's ``center`` mode says it with a crop_pct > 1 whose
  resize is the native size (a no-op) and whose center crop, larger than the image, pads it with zeros as the run
  did. Runs that squashed larger images down instead (img_size below the native size, or a dataset of mixed
  sizes) cannot be exported: timm has no transform for that resize.

Nor can a ``paper224`` run whose crop_pct > 1 resized below img_size on the in-memory path (its center crop came
out short where timm's pads). Every format carries the config, so every format refuses these, before writing.

Channels: the config's ``in_chans``, ``input_size`` and mean/std are the dataset's, one channel for grayscale
sets such as Fashion-MNIST. timm's transform keeps the PIL image's channels, so open grayscale images in mode
``L`` (``Image.open(f).convert('L')``; timm's ``create_dataset(..., input_img_mode='L')``), as torchvision's
FashionMNIST gives them, not converted to RGB.
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from hkdbench.benchmark.core.config import ConfigError, DataConfig, RunConfig
from hkdbench.benchmark.core.store import atomic_replace, atomic_write_bytes, check_folder

FORMATS = ("timm", "safetensors", "onnx")


def timm_config(cfg: RunConfig, model: torch.nn.Module, architecture: Optional[str]) -> Dict[str, Any]:
    """The model's description in timm's hub ``config.json`` format, with the run's evaluation transform."""
    from hkdbench.benchmark.data.datasets import dataset_info

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
            **eval_preprocessing(cfg.data, run_crop_pct(cfg)), "fixed_input_size": hasattr(model, "patch_embed"),
            "num_classes": info.num_classes,
            "first_conv": getattr(model, "pretrained_cfg", {}).get("first_conv"),
            "classifier": getattr(model, "pretrained_cfg", {}).get("classifier"),
        },
        "hkdbench": {"run": None, "hash": cfg.run_hash(), "method": cfg.method,
                     "teacher": cfg.teacher.name if cfg.teacher else None, "zoo_model": cfg.student.name},
    }


def run_crop_pct(cfg: RunConfig) -> float:
    """The crop_pct the run's loaders were given (as the trainer and ``hkdbench eval`` resolve it)."""
    from hkdbench.benchmark.models.zoo import zoo_entry

    return cfg.data.crop_pct or zoo_entry(cfg.student.name).crop_pct


def eval_preprocessing(data: DataConfig, crop_pct: float) -> Dict[str, Any]:
    """The run's evaluation transform as timm's pretrained-config fields (input_size, interpolation, crop_pct,
    crop_mode, mean, std), chosen so that timm's ``transforms_imagenet_eval`` computes the same inputs; a
    ConfigError when timm has no way to say it."""
    from hkdbench.benchmark.data.datasets import dataset_info

    info = dataset_info(data.dataset)
    if data.pipeline == "paper224":
        _check_paper224_crop(data, info.in_memory, crop_pct)
    else:
        _check_small_padding(data, info.native_size, info.in_memory)
        crop_pct = _crop_pct_resizing_to(data.img_size, info.native_size)
    return {"input_size": [info.in_chans, data.img_size, data.img_size], "interpolation": data.eval_interpolation,
            "crop_pct": crop_pct, "crop_mode": "center", "mean": list(info.mean), "std": list(info.std)}


_EXPORTABLE = ("exportable evaluations: the 'small' pipeline at data.img_size >= the native size of a dataset of "
               "fixed-size images (zero padding), and the 'paper224' pipeline (resize + center crop) with "
               "crop_pct <= 1, or any crop_pct with data.in_memory=no")


def _check_small_padding(data: DataConfig, native: int, fixed_size: bool) -> None:
    """The 'small' pipeline pads the native image to img_size; it resizes (torch's antialiased bilinear on floats,
    not Pillow) only images larger than img_size, which timm's transform cannot reproduce."""
    if not fixed_size:  # a dataset read whole is one (N, C, H, W) tensor; the others have images of any size
        raise ConfigError(f"cannot export the preprocessing of this run: the 'small' pipeline on {data.dataset} "
                          "pads or squashes each image by its own size, which timm's eval transform cannot "
                          f"express; {_EXPORTABLE}")
    if data.img_size < native:
        raise ConfigError(f"cannot export the preprocessing of this run: data.img_size={data.img_size} is below "
                          f"{data.dataset}'s native {native} px, so its evaluation squashed the images with torch's "
                          f"antialiased bilinear resize, which timm's eval transform (Pillow) does not compute; "
                          f"{_EXPORTABLE}")


def _check_paper224_crop(data: DataConfig, fixed_size: bool, crop_pct: float) -> None:
    """The in-memory path crops img_size out of the resized image; with crop_pct > 1 the resize is smaller than
    img_size and that crop is cut short, where timm's center crop would pad."""
    in_memory = fixed_size if data.in_memory == "auto" else data.in_memory == "yes"
    if in_memory and math.floor(data.img_size / crop_pct) < data.img_size:
        raise ConfigError(f"cannot export the preprocessing of this run: crop_pct {crop_pct:g} resizes below "
                          f"data.img_size={data.img_size}, and the in-memory evaluation then cut its center crop "
                          f"short where timm pads it; {_EXPORTABLE}")


def _crop_pct_resizing_to(size: int, scale: int) -> float:
    """A crop_pct for which timm's resize, floor(size / crop_pct), is ``scale``: size / scale unless float
    rounding lands just below it (36 / (36 / 28) = 27.999...), else size / (scale + 0.5)."""
    crop_pct = size / scale
    return crop_pct if math.floor(size / crop_pct) == scale else size / (scale + 0.5)


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
    from hkdbench.benchmark.engine.eval_run import load_student, open_run
    from hkdbench.benchmark.models.zoo import zoo_architecture

    rd = open_run(path, ema)
    folder = check_folder(Path(out) if out else rd.path / "export", "--out")
    cfg = rd.config()
    architecture = zoo_architecture(cfg.student.name)
    check_format(fmt, architecture, cfg.student.name)
    eval_preprocessing(cfg.data, run_crop_pct(cfg))  # refuses before anything is written
    model = load_student(rd, weights, ema).model
    config = timm_config(cfg, model, architecture)
    config["hkdbench"].update(run=rd.path.name, weights=rd.weights_file(weights, ema).name)
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "timm":
        _save_safetensors(model, folder / "model.safetensors", config)
        atomic_write_bytes(folder / "config.json", (json.dumps(config, indent=2) + "\n").encode())
        return folder
    target = folder / f"{rd.path.name}.{'onnx' if fmt == 'onnx' else 'safetensors'}"
    if fmt == "safetensors":
        _save_safetensors(model, target, config)
    else:
        _save_onnx(model, target, config)
    return target


def _save_safetensors(model: torch.nn.Module, target: Path, config: Dict[str, Any]) -> None:
    from safetensors.torch import save

    # contiguous copies: tied or strided views cannot be written as they are
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    # as bytes through the store's atomic write: safetensors' save_file creates its file with mode 0600
    atomic_write_bytes(target, save(tensors, metadata={"format": "pt", "timm_config": json.dumps(config)}))


def _save_onnx(model: torch.nn.Module, target: Path, config: Dict[str, Any]) -> None:
    import onnx

    example = torch.zeros(1, *config["pretrained_cfg"]["input_size"])
    with atomic_replace(target) as temp:
        torch.onnx.export(model.eval(), (example,), temp, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
        proto = onnx.load(temp)
        onnx.helper.set_model_props(proto, {"timm_config": json.dumps(config)})
        onnx.checker.check_model(proto)
        onnx.save(proto, temp)
